"""A Flax NNX reimplementation of hy3dgen's ``Hunyuan3DDiT`` (the Hunyuan3D 2.0 flow-matching DiT).

Laid out as jax-ml/bonsai lays out a model: this module holds the network and its configuration
(:class:`ModelConfig`, a frozen dataclass with named presets, :data:`PRESETS`: ``"v2.0"``,
``"mini"`` (Hunyuan3D-2mini) and ``"testbed"`` (the testbed v2 DiT sizes); the fast and turbo DiTs of
each family are the same preset with ``guidance_embed=True``); :mod:`timi_jax.params` holds the torch -> Flax key table and the loading, and this
module does not import it (``Hunyuan3DDiT`` builds randomly initialised weights;
``timi_jax.from_checkpoint`` / ``from_torch`` build it and fill it).

Same constructor arguments as hy3dgen, the same module names (so that :mod:`timi_jax.params` maps
hy3dgen's state dict onto it key by key) and the same numerics:

* joint attention over ``[condition; latent]`` tokens (Sec. 3, Eq.1 of the paper), no positional
  embedding, softmax scale ``head_dim ** -0.5``;
* QK RMSNorm computed in float32 (eps 1e-6), cast back to the value dtype;
* affine-free LayerNorm with eps 1e-6 (half precision computed in float32, like PyTorch);
* tanh-approximated GELU, adaLN modulation ``(1 + scale) * norm(x) + shift`` with gates;
* the sinusoidal timestep embedding exactly as hy3dgen calls it (see :func:`timestep_embedding`).

``model(x, t, cond)``: ``x`` (B, L, in_channels), ``t`` (B,) in [0, 1] as hy3dgen's pipeline passes
it, ``cond`` (B, M, context_in_dim) -> velocity (B, L, in_channels).

``param_dtype`` is the storage dtype of the weights, ``dtype`` the compute dtype (both float32 by
default; bfloat16 / float16 work). A hy3dgen model moved to one dtype with ``.to(dtype)``
corresponds to ``param_dtype == dtype``.

TIMI's guidance pass (:meth:`Hunyuan3DDiT.instance_probabilities`) runs only the first double
blocks and returns the head-averaged instance probability maps ``P = A_zc M^T`` (Eq.2) of each,
read from the unnormalised weights of the block's own attention (:func:`instance_probability_heads`)
-- the normalised L x M attention matrix ``A_zc`` is never formed as an array of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "ModelConfig",
    "PRESETS",
    "Hunyuan3DDiT",
    "DoubleStreamBlock",
    "SingleStreamBlock",
    "timestep_embedding",
    "layer_norm",
    "attention",
    "softmax_weights",
    "weighted_values",
    "instance_probability_heads",
    "attention_and_probabilities",
    "query_probabilities",
]

_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """hy3dgen's ``Hunyuan3DDiT`` constructor arguments (defaults: the 1.1B-parameter Hunyuan3D 2.0
    DiT, preset ``"v2.0"``). Checked on construction: ``hidden_size`` divisible by ``num_heads``
    and ``sum(axes_dim)`` equal to the head dim, as hy3dgen requires."""

    in_channels: int = 64
    context_in_dim: int = 1536
    hidden_size: int = 1024
    mlp_ratio: float = 4.0
    num_heads: int = 16
    depth: int = 16
    depth_single_blocks: int = 32
    axes_dim: tuple[int, ...] = (64,)
    theta: int = 10_000
    qkv_bias: bool = True
    time_factor: float = 1000
    guidance_embed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {list(self.axes_dim)} must sum to the head dim "
                             f"{self.head_dim} (hidden_size / num_heads), as in hy3dgen")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def v2_0(cls) -> "ModelConfig":
        """Hunyuan3D 2.0's DiT (``tencent/Hunyuan3D-2``, ``hunyuan3d-dit-v2-0``): hy3dgen's defaults."""
        return cls()

    @classmethod
    def mini(cls) -> "ModelConfig":
        """Hunyuan3D-2mini's DiT (``tencent/Hunyuan3D-2mini``, ``hunyuan3d-dit-v2-mini``): 8 double- and
        16 single-stream blocks (as third-party copies of its config.yaml have it), the other fields
        v2.0's: 559,196,224 parameters, the published "0.6 B" (its 512 latent tokens are the VAE's
        ``num_latents``, not a DiT setting). TIMI's ``guided_layers=4`` guides half of its double
        blocks (a quarter of v2.0's 16). ``-fast`` / ``-turbo``: ``.replace(guidance_embed=True)``."""
        return cls(depth=8, depth_single_blocks=16)

    @classmethod
    def testbed(cls) -> "ModelConfig":
        """A small DiT of the testbed's size (``timi.testbed.model.SIZES['v2']``: 128 wide, 4 + 1
        blocks, 8 latent channels, 64-dim condition tokens), for tests and CPU runs."""
        return cls(in_channels=8, context_in_dim=64, hidden_size=128, num_heads=4, depth=4,
                   depth_single_blocks=1, axes_dim=(32,))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ModelConfig":
        """From hy3dgen's keyword arguments (e.g. a ``config.yaml``'s ``model.params``); keys that are
        no constructor argument are ignored, as hy3dgen's ``**kwargs`` does."""
        if kwargs.get("ckpt_path") is not None:
            raise TypeError("timi_jax.Hunyuan3DDiT builds the network only; load a checkpoint with "
                            "timi_jax.from_checkpoint(path) or timi_jax.params.load_into(model, path).")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named configurations: ``ModelConfig.preset(name)`` / ``Hunyuan3DDiT(PRESETS[name])``.
PRESETS: dict[str, ModelConfig] = {"v2.0": ModelConfig.v2_0(), "mini": ModelConfig.mini(),
                                   "testbed": ModelConfig.testbed()}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(f t'), sin(f t')]`` of ``t' = time_factor * t`` (float32).

    hy3dgen calls its ``timestep_embedding(t, 256, self.time_factor)``: the model's
    ``time_factor`` (1000) lands in the *max_period* slot while the multiplier keeps its default
    1000. :class:`Hunyuan3DDiT` calls this function the same way so the frequencies are identical.
    """
    t = jnp.asarray(time_factor * jnp.asarray(t), jnp.float32)  # scaled in t's dtype, as torch
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def layer_norm(x: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
    """Affine-free LayerNorm over the last axis (biased variance; half precision computed in
    float32, like PyTorch's kernels)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def softmax_weights(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unnormalised attention weights of Eq.1 and their row sums, float32.

    q (B, Lq, H, D), k (B, Lk, H, D) -> ``e = exp(q k^T / sqrt(D) - rowmax)`` (B, H, Lq, Lk) and
    ``den = sum_k e`` (B, H, Lq), so that ``softmax(q k^T / sqrt(D)) = e / den``. The row maximum
    only guards ``exp`` against overflow and cancels in ``e / den``; it is held constant under
    differentiation, which changes no gradient.
    """
    q, k = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # heads-major: 25% faster guidance on CPU
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    return e, jnp.sum(e, axis=-1)


def weighted_values(e: jax.Array, den: jax.Array, v: jax.Array) -> jax.Array:
    """``(e / den) v`` from :func:`softmax_weights`, dividing the (B, Lq, H, Dv) output instead of
    the (B, H, Lq, Lk) weights (one pass over the weights fewer). Float32."""
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), jnp.swapaxes(v, 1, 2),
                     preferred_element_type=jnp.float32)
    return jnp.swapaxes(out / den[..., None], 1, 2)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention. q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H*D), scale D**-0.5.

    On CPU, :func:`softmax_weights` + :func:`weighted_values` (normalising the output rather than
    the weights: XLA:CPU runs ``jax.nn.dot_product_attention``'s generic softmax 1.4x slower
    forward and ~3x slower forward + backward on one core; see docs/benchmarks.md); float16 is
    computed in float32 there (XLA:CPU has no float16 matmul with float32 accumulation).
    Elsewhere ``jax.nn.dot_product_attention`` (XLA, or cuDNN where it applies).
    """
    if jax.default_backend() == "cpu":
        if q.dtype == jnp.float16:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        out = weighted_values(*softmax_weights(q, k), v.astype(q.dtype)).astype(v.dtype)
    else:
        out = jax.nn.dot_product_attention(q, k, v)
    return out.reshape(*out.shape[:2], -1)


def instance_probability_heads(e: jax.Array, den: jax.Array, mask_values: jax.Array,
                               per_head: bool = False) -> jax.Array:
    """Eq.2 from the weights of the latent queries: ``P = mean_h A_zc M^T`` (B, Lq, K) float32, or
    one map per head, (B, H, Lq, K), with ``per_head`` (``TIMIConfig.per_head``).

    ``e`` (B, H, Lq, S) and ``den`` (B, H, Lq) from :func:`softmax_weights` of the latent queries
    over all ``S = M + L`` keys; ``mask_values`` (B, M, K) the instance masks of the M condition
    tokens (the first M keys). ``A_zc = e[..., :M] / den`` is never formed.
    """
    m = mask_values.shape[1]
    p = jnp.einsum("bhqm,bmk->bhqk", e[..., :m], mask_values.astype(jnp.float32))
    p = p / den[..., None]
    return p if per_head else jnp.mean(p, axis=1)


def attention_and_probabilities(q: jax.Array, k: jax.Array, v: jax.Array, mask_values: jax.Array,
                                latent: slice, per_head: bool = False) -> tuple[jax.Array, jax.Array]:
    """A guided layer's attention output (B, Lq, H*D) and Eq.2's P of its latent queries, from ONE set
    of weights (:func:`softmax_weights`, float32; the output cast back to ``v``'s dtype).

    ``latent``: which queries are latent tokens (hy3dgen 2.0's joint attention: those after the M
    condition tokens; 2.1's cross-attention: those after the time token); ``mask_values`` (B, M, K)
    the instance masks of the first M keys (the condition tokens). P as :func:`instance_probability_heads`.
    """
    e, den = softmax_weights(q.astype(jnp.float32), k.astype(jnp.float32))
    out = weighted_values(e, den, v.astype(jnp.float32)).astype(v.dtype)
    probs = instance_probability_heads(e[:, :, latent], den[:, :, latent], mask_values, per_head)
    return out.reshape(*out.shape[:2], -1), probs


def query_probabilities(q: jax.Array, k: jax.Array, mask_values: jax.Array, latent: slice,
                        per_head: bool = False) -> jax.Array:
    """Only P of :func:`attention_and_probabilities`: the weights of the latent queries alone, no
    attention output (the last guided layer, after which the forward stops)."""
    e, den = softmax_weights(q[:, latent].astype(jnp.float32), k.astype(jnp.float32))
    return instance_probability_heads(e, den, mask_values, per_head)


def _split_heads(qkv: jax.Array, num_heads: int):
    """hy3dgen's ``rearrange(qkv, 'B L (K H D) -> K B H L D', K=3)``, as (B, L, H, D) each."""
    b, l, c = qkv.shape
    qkv = qkv.reshape(b, l, 3, num_heads, c // (3 * num_heads))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class _Ctx:
    """Constructor settings shared by all sub-modules."""

    def __init__(self, dtype, param_dtype, rngs):
        self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs

    def linear(self, din: int, dout: int, bias: bool = True) -> nnx.Linear:
        return nnx.Linear(din, dout, use_bias=bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, rngs=self.rngs)


class RMSNorm(nnx.Module):
    """``(x * rsqrt(mean(x^2) + 1e-6))`` in float32, cast back, times a learned scale."""

    def __init__(self, dim: int, ctx: _Ctx):
        self.scale = nnx.Param(jnp.ones((dim,), ctx.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + _NORM_EPS)
        y = (xf * rrms).astype(x.dtype)
        return y * self.scale[...]


class QKNorm(nnx.Module):
    def __init__(self, dim: int, ctx: _Ctx):
        self.query_norm = RMSNorm(dim, ctx)
        self.key_norm = RMSNorm(dim, ctx)

    def __call__(self, q, k, v):
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden_dim: int, ctx: _Ctx):
        self.in_layer = ctx.linear(in_dim, hidden_dim)
        self.out_layer = ctx.linear(hidden_dim, hidden_dim)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class MLP(nnx.Module):
    """hy3dgen's ``nn.Sequential(Linear, GELU(tanh), Linear)`` (torch keys ``.0`` and ``.2``)."""

    def __init__(self, dim: int, hidden: int, ctx: _Ctx):
        self.fc1 = ctx.linear(dim, hidden)
        self.fc2 = ctx.linear(hidden, dim)

    def __call__(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class SelfAttention(nnx.Module):
    """Holds the qkv projection, QK norm and output projection of one stream."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, ctx: _Ctx):
        self.num_heads = num_heads
        self.qkv = ctx.linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads, ctx)
        self.proj = ctx.linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = _split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nnx.Module):
    """adaLN modulation: ``lin(silu(vec))`` split into (shift, scale, gate) x (2 if double else 1)."""

    def __init__(self, dim: int, double: bool, ctx: _Ctx):
        self.multiplier = 6 if double else 3
        self.lin = ctx.linear(dim, self.multiplier * dim)

    def __call__(self, vec):
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        return jnp.split(out, self.multiplier, axis=-1)


def _modulate(x, shift, scale):
    return (1 + scale) * layer_norm(x) + shift


class DoubleStreamBlock(nnx.Module):
    """Separate weights for latent (``img``) and condition (``txt``) tokens, one joint attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 ctx: _Ctx):
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, True, ctx)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, ctx)
        self.img_mlp = MLP(hidden_size, mlp_hidden, ctx)
        self.txt_mod = Modulation(hidden_size, True, ctx)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, ctx)
        self.txt_mlp = MLP(hidden_size, mlp_hidden, ctx)

    def joint_qkv(self, img, txt, vec):
        """Modulations and the joint q, k, v over ``[txt; img]`` tokens, each (B, M+L, H, D)."""
        img_mod = self.img_mod(vec)
        txt_mod = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(_modulate(img, img_mod[0], img_mod[1]))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(_modulate(txt, txt_mod[0], txt_mod[1]))
        q = jnp.concatenate([txt_q, img_q], axis=1)
        k = jnp.concatenate([txt_k, img_k], axis=1)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        return (img_mod, txt_mod), (q, k, v)

    def finish(self, img, txt, mods, attn):
        """Residual attention and MLP updates from the joint attention output (B, M+L, hidden)."""
        (i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2), (t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2) = mods
        m = txt.shape[1]
        txt_attn, img_attn = attn[:, :m], attn[:, m:]
        img = img + i_g1 * self.img_attn.proj(img_attn)
        img = img + i_g2 * self.img_mlp(_modulate(img, i_sh2, i_sc2))
        txt = txt + t_g1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_g2 * self.txt_mlp(_modulate(txt, t_sh2, t_sc2))
        return img, txt

    def __call__(self, img, txt, vec):
        mods, (q, k, v) = self.joint_qkv(img, txt, vec)
        return self.finish(img, txt, mods, attention(q, k, v))

    def call_with_probabilities(self, img, txt, vec, mask_values, per_head: bool = False):
        """The block's outputs and the head-averaged instance probabilities of its latent tokens.

        ``mask_values`` (B, M, K): pooled instance masks of the condition tokens. Eq.2,
        ``P = A_zc M^T`` with ``A_zc`` the latent-to-condition block of the joint softmax (Eq.1),
        is read from the block's own attention weights (one ``q k^T``, float32): the same
        unnormalised weights give the attention output and, over the condition keys, P.
        Returns ``(img, txt, P)`` with P (B, L, K), or (B, H, L, K) with ``per_head``.
        """
        mods, (q, k, v) = self.joint_qkv(img, txt, vec)
        attn, probs = attention_and_probabilities(q, k, v, mask_values, slice(txt.shape[1], None), per_head)
        img, txt = self.finish(img, txt, mods, attn)
        return img, txt, probs

    def probabilities(self, img, txt, vec, mask_values, per_head: bool = False):
        """Only P (B, L, K) of :meth:`call_with_probabilities`: the latent queries' weights, no
        attention output (the last guided block: nothing after it is evaluated)."""
        _, (q, k, _) = self.joint_qkv(img, txt, vec)
        return query_probabilities(q, k, mask_values, slice(txt.shape[1], None), per_head)


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP over the joint sequence (fused ``linear1`` / ``linear2``)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, ctx: _Ctx):
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = ctx.linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = ctx.linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads, ctx)
        self.modulation = Modulation(hidden_size, False, ctx)

    def __call__(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(_modulate(x, shift, scale))
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size:]
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(jnp.concatenate([attention(q, k, v), gelu_tanh(mlp)], axis=-1))
        return x + gate * out


class LastLayer(nnx.Module):
    def __init__(self, hidden_size: int, out_channels: int, ctx: _Ctx):
        self.linear = ctx.linear(hidden_size, out_channels)
        self.adaLN_modulation = ctx.linear(hidden_size, 2 * hidden_size)  # torch: .1 after SiLU

    def __call__(self, x, vec):
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(vec)), 2, axis=-1)
        return self.linear(_modulate(x, shift[:, None], scale[:, None]))


class Hunyuan3DDiT(nnx.Module):
    """hy3dgen's ``Hunyuan3DDiT`` in Flax NNX, randomly initialised.

    ``Hunyuan3DDiT(config)`` with a :class:`ModelConfig` (default: the v2.0 preset), or with
    hy3dgen's keyword arguments (``Hunyuan3DDiT(hidden_size=..., depth=...)``; they replace the
    config's fields). Keyword-only extras: ``dtype`` (compute), ``param_dtype`` (storage) and
    ``rngs`` (random initialisation; default ``nnx.Rngs(0)``). Weights come from
    :mod:`timi_jax.params` (``from_torch``, ``from_checkpoint``, ``load_into``).
    """

    def __init__(self, config: ModelConfig | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, **hy3dgen_kwargs):
        base = ModelConfig() if config is None else config
        config = ModelConfig.from_kwargs(**{**base.as_dict(), **hy3dgen_kwargs})
        ctx = _Ctx(dtype, param_dtype, rngs if rngs is not None else nnx.Rngs(0))
        self.config = config
        hidden_size, num_heads, mlp_ratio = config.hidden_size, config.num_heads, config.mlp_ratio
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels
        self.context_in_dim = config.context_in_dim
        self.hidden_size = hidden_size
        self.mlp_ratio = mlp_ratio
        self.num_heads = num_heads
        self.depth = config.depth
        self.depth_single_blocks = config.depth_single_blocks
        self.axes_dim = config.axes_dim
        self.theta = config.theta
        self.qkv_bias = config.qkv_bias
        self.time_factor = config.time_factor
        self.guidance_embed = config.guidance_embed
        self.dtype = dtype
        self.param_dtype = param_dtype

        self.latent_in = ctx.linear(config.in_channels, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size, ctx)
        self.cond_in = ctx.linear(config.context_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(256, hidden_size, ctx) if config.guidance_embed else None
        self.double_blocks = nnx.List(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, config.qkv_bias, ctx) for _ in range(config.depth)])
        self.single_blocks = nnx.List(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio, ctx)
             for _ in range(config.depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, self.out_channels, ctx)

    # -- pieces of the forward, public for per-block parity tests and the guidance pass --
    def embed(self, x, t, cond, guidance=None):
        """Input projections and the conditioning vector: ``(latent, cond, vec)``.

        ``cond`` may also be hy3dgen's ``{'main': cond}`` dict."""
        if isinstance(cond, Mapping):
            cond = cond["main"]
        x = jnp.asarray(x, self.dtype)
        cond = jnp.asarray(cond, self.dtype)
        latent = self.latent_in(x)
        # hy3dgen passes time_factor as max_period (see timestep_embedding)
        vec = self.time_in(timestep_embedding(t, 256, self.time_factor).astype(latent.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("This model has guidance_embed=True: pass guidance=<scale> (B,).")
            vec = vec + self.guidance_in(
                timestep_embedding(guidance, 256, self.time_factor).astype(latent.dtype))
        return latent, self.cond_in(cond), vec

    def __call__(self, x, t, cond, guidance=None):
        """Velocity prediction: x (B, L, C), t (B,) in [0, 1], cond (B, M, context_in_dim) (or
        hy3dgen's ``{'main': cond}``) -> (B, L, C)."""
        latent, cond, vec = self.embed(x, t, cond, guidance)
        for block in self.double_blocks:
            latent, cond = block(latent, cond, vec)
        m = cond.shape[1]
        h = jnp.concatenate([cond, latent], axis=1)
        for block in self.single_blocks:
            h = block(h, vec)
        return self.final_layer(h[:, m:], vec)

    def instance_probabilities(self, x, t, cond, mask_tokens, num_layers: int, guidance=None,
                               per_head: bool = False):
        """Truncated forward: P (Eq.2) of the first ``num_layers`` double blocks.

        ``mask_tokens`` (B, K, M) or (K, M): instance masks pooled onto the condition tokens
        (``timi_core.pool_masks``; the torch adapter's ``tokens``). Returns a list of
        ``num_layers`` float32 arrays (B, L, K) ((B, H, L, K) with ``per_head``); no block after the
        last guided one is evaluated.
        """
        if not 0 < num_layers <= self.depth:
            raise ValueError(f"num_layers={num_layers} must be in 1..depth={self.depth}")
        latent, cond, vec = self.embed(x, t, cond, guidance)
        tokens = batched_mask_tokens(mask_tokens, latent.shape[0], cond.shape[1])
        mask_values = jnp.swapaxes(tokens, 1, 2)  # (B, M, K)
        probs = []
        for block in self.double_blocks[:num_layers - 1]:
            latent, cond, p = block.call_with_probabilities(latent, cond, vec, mask_values, per_head)
            probs.append(p)
        probs.append(self.double_blocks[num_layers - 1].probabilities(latent, cond, vec, mask_values, per_head))
        return probs


def batched_mask_tokens(mask_tokens, batch: int, num_cond: int) -> jax.Array:
    """Condition-token masks as float32 (B, K, M); a (K, M) array is shared by the whole batch."""
    tokens = jnp.asarray(mask_tokens, jnp.float32)
    if tokens.ndim == 2:
        tokens = jnp.broadcast_to(tokens, (batch, *tokens.shape))
    if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != num_cond:
        raise ValueError(f"mask_tokens has shape {tuple(tokens.shape)}; expected (B, K, M) or (K, M) "
                         f"with B={batch} and M={num_cond} condition tokens")
    return tokens

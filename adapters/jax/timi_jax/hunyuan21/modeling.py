"""Hunyuan3D 2.1's DiT (``HunYuanDiTPlain``) in Flax NNX: the network of
:mod:`timi_torch.hunyuan21.modeling`, same configuration (:class:`DiT21Config`, presets ``"2.1"``
and ``"2.1-tiny"``) and numbers (float32 parity with it and with upstream's fixture,
``tests/test_jax_hunyuan21.py``). Weights come from :mod:`timi_jax.hunyuan21.params`, which this
module does not import.

The architecture (see the torch module's docstring): the time token prepended to the embedded
latent tokens; per block self-attention, cross-attention to the condition tokens (Eq.1's ``A_zc``
is this softmax, normalised over the condition tokens), an MLP or a top-k mixture of experts;
U-Net long skips in the second half; head-interleaved q/k/v as upstream. The MoE runs every
expert on every token and weights the outputs by the gate scores of the top-k experts (0
elsewhere): static shapes for XLA, the same sum as upstream's routed computation, ``num_experts /
top_k`` times its FLOPs in those blocks. Attention pooling (off in the released model) is not
ported.

TIMI's guidance pass (:meth:`HunYuanDiTPlain.instance_probabilities`, what :func:`timi_jax.sample`
calls) runs the first blocks and returns Eq.2's P of each one's cross-attention: the latent queries
(:data:`LATENT_QUERIES`, after the time token) against the condition tokens, from the same weights as
the block's output (:func:`timi_jax.modeling.attention_and_probabilities`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from timi_torch.guidance import SITES
from timi_torch.hunyuan21.modeling import PRESETS, DiT21Config

from ..modeling import attention_and_probabilities, batched_mask_tokens, query_probabilities

__all__ = ["HunYuanDiTPlain", "DiT21Config", "PRESETS"]

_EPS = 1e-6
#: The latent queries of a block's cross-attention (Eq.2's ``q_z``): those after the time token, as
#: the torch backend's attention site for 2.1 says (``timi_torch.guidance.SITES["2.1"]``).
LATENT_QUERIES = SITES["2.1"].latent_queries(0)


class _Ctx:
    def __init__(self, dtype, param_dtype, rngs):
        self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs

    def linear(self, din, dout, bias=True):
        return nnx.Linear(din, dout, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

    def norm(self, kind, width):
        if kind == "layer":     # two-pass variance, as torch's LayerNorm
            return nnx.LayerNorm(width, epsilon=_EPS, use_fast_variance=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, rngs=self.rngs)
        return nnx.RMSNorm(width, epsilon=_EPS, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)


def _heads(t, heads, parts):
    """Upstream's head-interleaved split: (B, S, parts*H*D) -> parts x (B, S, H, D)."""
    t = t.reshape(*t.shape[:2], heads, parts, -1)
    return [t[..., i, :] for i in range(parts)]


def attention(q, k, v):
    """q (B, S, H, D), k, v (B, M, H, D) -> (B, S, H*D), softmax over the keys, scale D**-0.5, float32."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
    return out.reshape(*out.shape[:2], -1).astype(v.dtype)


class Attention(nnx.Module):
    """``attn1`` (self) or ``attn2`` (cross) with upstream's parameter names."""

    def __init__(self, dim, kv_dim, cfg: DiT21Config, cross: bool, ctx: _Ctx):
        self.heads, self.cross, self.qk_norm = cfg.num_heads, cross, cfg.qk_norm
        self.to_q = ctx.linear(dim, dim, cfg.qkv_bias)
        self.to_k = ctx.linear(kv_dim, dim, cfg.qkv_bias)
        self.to_v = ctx.linear(kv_dim, dim, cfg.qkv_bias)
        if cfg.qk_norm:
            self.q_norm = ctx.norm(cfg.qk_norm_type, cfg.head_dim)
            self.k_norm = ctx.norm(cfg.qk_norm_type, cfg.head_dim)
        self.out_proj = ctx.linear(dim, dim)

    def qkv(self, x, y=None):
        """(q, k, v) heads, QK-normalised: (B, S, H, D) queries, keys and values."""
        if self.cross:
            (q,) = _heads(self.to_q(x), self.heads, 1)
            k, v = _heads(jnp.concatenate([self.to_k(y), self.to_v(y)], -1), self.heads, 2)
        else:
            q, k, v = _heads(jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], -1), self.heads, 3)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x, y=None):
        return self.out_proj(attention(*self.qkv(x, y)))


class FeedForward(nnx.Module):
    """``fc1 -> GELU (erf) -> fc2``: the blocks' MLP and each MoE expert (torch ``net.0.proj`` / ``net.2``)."""

    def __init__(self, width, ctx: _Ctx):
        self.fc1, self.fc2 = ctx.linear(width, 4 * width), ctx.linear(4 * width, width)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class MoE(nnx.Module):
    def __init__(self, width, cfg: DiT21Config, ctx: _Ctx):
        self.top_k = cfg.moe_top_k
        self.experts = nnx.List([FeedForward(width, ctx) for _ in range(cfg.num_experts)])
        self.gate = nnx.Param(jnp.zeros((cfg.num_experts, width), ctx.param_dtype))
        self.shared_experts = FeedForward(width, ctx)

    def __call__(self, x):
        scores = jax.nn.softmax(x @ self.gate[...].T.astype(x.dtype), axis=-1)          # (B, S, E)
        kth = jax.lax.top_k(scores, self.top_k)[0][..., -1:]
        weights = jnp.where(scores >= kth, scores, 0)
        out = sum(weights[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return out + self.shared_experts(x)


class Block(nnx.Module):
    def __init__(self, cfg: DiT21Config, layer: int, ctx: _Ctx):
        D = cfg.hidden_size
        self.norm1, self.norm2, self.norm3 = (ctx.norm(cfg.norm_type, D) for _ in range(3))
        self.attn1 = Attention(D, D, cfg, False, ctx)
        self.attn2 = Attention(D, cfg.context_dim, cfg, True, ctx)
        self.has_skip, self.use_moe = cfg.has_skip(layer), cfg.is_moe(layer)
        if self.has_skip:
            self.skip_norm = ctx.norm(cfg.norm_type, D)
            self.skip_linear = ctx.linear(2 * D, D)
        self.ffn = MoE(D, cfg, ctx) if self.use_moe else FeedForward(D, ctx)

    def before_cross(self, x, skip=None):
        if self.has_skip:
            x = self.skip_norm(self.skip_linear(jnp.concatenate([skip, x], -1)))
        return x + self.attn1(self.norm1(x))

    def __call__(self, x, cond, skip=None):
        x = self.before_cross(x, skip)
        x = x + self.attn2(self.norm2(x), cond)
        return x + self.ffn(self.norm3(x))

    def call_with_probabilities(self, x, cond, mask_values, skip=None, per_head: bool = False):
        """The block's output and Eq.2's P (B, L, K) ((B, H, L, K) with ``per_head``) of its
        cross-attention, ``A_zc = softmax(q_z k_c^T / sqrt(d))`` over the condition tokens alone,
        from the same weights as the output (float32). ``mask_values`` (B, M, K)."""
        x = self.before_cross(x, skip)
        out, probs = attention_and_probabilities(*self.attn2.qkv(self.norm2(x), cond), mask_values,
                                                 LATENT_QUERIES, per_head)
        x = x + self.attn2.out_proj(out)
        return x + self.ffn(self.norm3(x)), probs

    def probabilities(self, x, cond, mask_values, skip=None, per_head: bool = False):
        """Only P of :meth:`call_with_probabilities` (the last guided block: no attention output)."""
        q, k, _ = self.attn2.qkv(self.norm2(self.before_cross(x, skip)), cond)
        return query_probabilities(q, k, mask_values, LATENT_QUERIES, per_head)


def _sincos(length, width):
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    out = np.outer(np.arange(length, dtype=np.float32).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)[None]


class HunYuanDiTPlain(nnx.Module):
    """``HunYuanDiTPlain(config)`` or with upstream's keywords; ``dtype`` / ``param_dtype`` / ``rngs``
    as :class:`timi_jax.Hunyuan3DDiT`. ``model(x, t, cond)``: x (B, L, C), t (B,) in [0, 1], cond
    (B, M, context_dim) or ``{'main': cond}`` -> velocity (B, L, C)."""

    #: No guidance-distilled 2.1 DiT (``guidance_cond_proj_dim`` is refused): CFG always.
    guidance_embed = False

    def __init__(self, config: DiT21Config | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, **kwargs):
        cfg = config if config is not None else DiT21Config.from_kwargs(**kwargs)
        if cfg.use_attention_pooling:
            raise NotImplementedError("use_attention_pooling=True is not ported to JAX (off in the released 2.1).")
        ctx = _Ctx(dtype, param_dtype, rngs if rngs is not None else nnx.Rngs(0))
        self.config, self.dtype = cfg, dtype
        self.depth = cfg.depth          # the guidable layers: every block's cross-attention
        D = cfg.hidden_size
        self.x_embedder = ctx.linear(cfg.in_channels, D)
        self.t_fc1, self.t_fc2 = ctx.linear(D, 4 * D), ctx.linear(4 * D, D)
        self.blocks = nnx.List([Block(cfg, i, ctx) for i in range(cfg.depth)])
        self.norm_final = ctx.norm("layer", D)
        self.final_linear = ctx.linear(D, cfg.in_channels)

    def time_token(self, t):
        """(B,) -> (B, 1, D): sinusoidal frequencies over ``hidden_size`` channels (sin first), MLP."""
        D = self.config.hidden_size
        half = D // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], -1)
        if D % 2:
            emb = jnp.pad(emb, ((0, 0), (0, 1)))
        return self.t_fc2(jax.nn.gelu(self.t_fc1(emb.astype(self.dtype)), approximate=False))[:, None]

    def embed(self, x, t):
        """The [time; latent] token sequence (B, 1 + L, D) the blocks start from."""
        h = self.x_embedder(jnp.asarray(x, self.dtype))
        if self.config.use_pos_emb:
            h = h + jnp.asarray(_sincos(self.config.input_size, self.config.hidden_size), h.dtype)
        return jnp.concatenate([self.time_token(t).astype(h.dtype), h], axis=1)

    def __call__(self, x, t, cond, guidance=None):
        if guidance is not None:
            raise ValueError("Hunyuan3D 2.1's DiT takes no guidance= (not guidance-distilled).")
        h, _ = self._blocks(self.embed(x, t), self._cond(cond))
        return self.final_linear(self.norm_final(h)[:, 1:])

    def instance_probabilities(self, x, t, cond, mask_tokens, num_layers: int, guidance=None,
                               per_head: bool = False):
        """Truncated forward for TIMI's guidance pass (the counterpart of
        :meth:`timi_jax.Hunyuan3DDiT.instance_probabilities`): P (Eq.2) of the cross-attention of
        the first ``num_layers`` blocks, a list of float32 (B, L, K) ((B, H, L, K) with
        ``per_head``); no block after the last guided one is evaluated. ``mask_tokens`` (B, K, M)
        or (K, M); ``guidance`` must be None."""
        if guidance is not None:
            raise ValueError("Hunyuan3D 2.1's DiT takes no guidance= (not guidance-distilled).")
        if not 0 < num_layers <= self.depth:
            raise ValueError(f"num_layers={num_layers} must be in 1..depth={self.depth}")
        cond = self._cond(cond)
        tokens = batched_mask_tokens(mask_tokens, cond.shape[0], cond.shape[1])
        return self._blocks(self.embed(x, t), cond, jnp.swapaxes(tokens, 1, 2), num_layers, per_head)[1]

    def _cond(self, cond):
        return jnp.asarray(cond["main"] if isinstance(cond, dict) else cond, self.dtype)

    def _blocks(self, h, cond, mask_values=None, num_layers: int | None = None, per_head: bool = False):
        """``(h, probs)``: the blocks with upstream's long skips; with ``mask_values`` (B, M, K) the
        first ``num_layers`` only, P of each, and ``h`` None (nothing after the last one's P)."""
        skips, half, probs = [], self.config.depth // 2, []
        for i, block in enumerate(self.blocks[:num_layers]):
            skip = skips.pop() if i > half else None
            if mask_values is None:
                h = block(h, cond, skip)
            elif i + 1 == num_layers:
                return None, probs + [block.probabilities(h, cond, mask_values, skip, per_head)]
            else:
                h, p = block.call_with_probabilities(h, cond, mask_values, skip, per_head)
                probs.append(p)
            if i < half:
                skips.append(h)
        return h, probs

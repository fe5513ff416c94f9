"""TRELLIS stage 1's flow transformer (``SparseStructureFlowModel``) in Flax NNX: the network of
:mod:`timi_torch.trellis.modeling`, with its configuration (:class:`FlowConfig`, presets
:data:`FLOW_PRESETS`, upstream's constructor keywords) and its numbers (float32 parity with the torch
port and with upstream's fixture, ``tests/test_jax_trellis.py``). Weights come from
:mod:`timi_jax.trellis.params`, which this module does not import.

The architecture (see the torch module's docstring): the (B, C, R, R, R) grid latent is cut into
``patch_size``^3 patches, one token per patch plus a position embedding (``pos_emb``, a
:class:`Buffer`: upstream's state dict holds it, the fixed 3-D sin/cos table of
:func:`~timi_torch.trellis.modeling.position_embedding` until weights are loaded); each
block is adaLN-modulated self-attention, cross-attention to the image tokens after an affine
LayerNorm (plain residual, no modulation) and an adaLN-modulated MLP; a final affine-free LayerNorm
(eps 1e-5) and the output projection back to the grid. Queries and keys are per-head RMS-normalised
(``normalize(x) * gamma * sqrt(D)``) where ``qk_rms_norm`` / ``qk_rms_norm_cross`` say. Computed in
float32 (a released ``use_fp16`` checkpoint is loaded as float32 weights: float32 arithmetic, not
upstream's float16 blocks).

TIMI's guidance pass (:meth:`SparseStructureFlowModel.instance_probabilities`, what
:func:`timi_jax.trellis.sample` differentiates) runs the input layer and the first blocks and
returns Eq.2's P of each one's cross-attention (every voxel token queries the image tokens: Eq.1's
``A_zc`` is that softmax), from the same weights as the block's output
(:func:`timi_jax.modeling.attention_and_probabilities`); nothing after the last guided block's P is
evaluated, so ``dL/dz`` passes through the input layer and those blocks only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from timi_torch.trellis.modeling import FLOW_PRESETS, FlowConfig, position_embedding

from ..modeling import (MLP, MLPEmbedder, Modulation, _Ctx, attention, attention_and_probabilities,
                        batched_mask_tokens, layer_norm, query_probabilities, timestep_embedding)

__all__ = ["SparseStructureFlowModel", "FlowConfig", "FLOW_PRESETS", "patchify", "unpatchify"]

_BLOCK_EPS, _FINAL_EPS = 1e-6, 1e-5      # upstream's block LayerNorms; the final F.layer_norm's default
_ALL_QUERIES = slice(None)                 # every voxel token is a latent query of the cross-attention


def patchify(x, p: int):
    """(B, C, D, H, W) -> (B, D/p * H/p * W/p, C p^3) tokens, channels ordered (C, pd, ph, pw) and
    tokens in (d, h, w) raster order, as upstream."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (d // p) * (h // p) * (w // p), c * p ** 3)


def unpatchify(tokens, p: int, grid: int):
    """The inverse of :func:`patchify`: (B, grid^3, C p^3) -> (B, C, grid p, grid p, grid p)."""
    b, _, cp = tokens.shape
    c = cp // p ** 3
    x = tokens.reshape(b, grid, grid, grid, c, p, p, p).transpose(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, grid * p, grid * p, grid * p)


class Buffer(nnx.Variable):
    """A non-trainable array loaded with the weights (a torch buffer in upstream's state dict)."""


class HeadRMSNorm(nnx.Module):
    """Per-head RMS norm of (..., H, D): ``x / max(|x|, 1e-12) * gamma * sqrt(D)``, ``gamma`` (H, D)."""

    def __init__(self, dim: int, heads: int, ctx: _Ctx):
        self.gamma = nnx.Param(jnp.ones((heads, dim), ctx.param_dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, 1e-12) * self.gamma[...] * x.shape[-1] ** 0.5).astype(x.dtype)


class Attention(nnx.Module):
    """Upstream's full-attention ``MultiHeadAttention``: self (``to_qkv``) or cross (``to_q``,
    ``to_kv``), optional per-head QK RMS norm, ``to_out``; heads split as (parts, H, D)."""

    def __init__(self, channels: int, heads: int, ctx_channels: int, cross: bool, qk_rms_norm: bool, ctx: _Ctx):
        self.heads, self.cross, self.qk_rms_norm = heads, cross, qk_rms_norm
        if cross:
            self.to_q = ctx.linear(channels, channels)
            self.to_kv = ctx.linear(ctx_channels, 2 * channels)
        else:
            self.to_qkv = ctx.linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = HeadRMSNorm(channels // heads, heads, ctx)
            self.k_rms_norm = HeadRMSNorm(channels // heads, heads, ctx)
        self.to_out = ctx.linear(channels, channels)

    def qkv(self, x, context=None):
        """(q, k, v), each (B, S, H, D), QK-normalised."""
        def split(t, parts):
            t = t.reshape(*t.shape[:2], parts, self.heads, -1)
            return [t[:, :, i] for i in range(parts)]

        if self.cross:
            (q,), (k, v) = split(self.to_q(x), 1), split(self.to_kv(context), 2)
        else:
            q, k, v = split(self.to_qkv(x), 3)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def __call__(self, x, context=None):
        return self.to_out(attention(*self.qkv(x, context)))


class CrossBlock(nnx.Module):
    """Upstream's ``ModulatedTransformerCrossBlock`` (keys ``norm2``, ``self_attn``, ``cross_attn``,
    ``mlp.mlp.{0,2}``, ``adaLN_modulation.1`` unless ``share_mod``)."""

    def __init__(self, cfg: FlowConfig, ctx: _Ctx):
        C = cfg.model_channels
        self.share_mod = cfg.share_mod
        self.norm2 = nnx.LayerNorm(C, epsilon=_BLOCK_EPS, use_fast_variance=False, dtype=ctx.dtype,
                                   param_dtype=ctx.param_dtype, rngs=ctx.rngs)
        self.self_attn = Attention(C, cfg.heads, C, False, cfg.qk_rms_norm, ctx)
        self.cross_attn = Attention(C, cfg.heads, cfg.cond_channels, True, cfg.qk_rms_norm_cross, ctx)
        self.mlp = MLP(C, int(C * cfg.mlp_ratio), ctx)
        if not cfg.share_mod:
            self.adaLN_modulation = Modulation(C, True, ctx)

    def modulations(self, mod):
        """The six (B, 1, C) shift / scale / gate arrays: the block's own, or the shared ones."""
        return mod if self.share_mod else self.adaLN_modulation(mod)

    def before_cross(self, x, mods):
        shift, scale, gate = mods[:3]
        return x + self.self_attn(layer_norm(x, _BLOCK_EPS) * (1 + scale) + shift) * gate

    def after_cross(self, x, mods):
        shift, scale, gate = mods[3:]
        return x + self.mlp(layer_norm(x, _BLOCK_EPS) * (1 + scale) + shift) * gate

    def __call__(self, x, mod, context):
        mods = self.modulations(mod)
        x = self.before_cross(x, mods)
        x = x + self.cross_attn(self.norm2(x), context)
        return self.after_cross(x, mods)

    def call_with_probabilities(self, x, mod, context, mask_values, per_head: bool = False):
        """The block's output and Eq.2's P (B, L, K) ((B, H, L, K) with ``per_head``) of its
        cross-attention, from the same attention weights (float32). ``mask_values`` (B, M, K)."""
        mods = self.modulations(mod)
        x = self.before_cross(x, mods)
        out, probs = attention_and_probabilities(*self.cross_attn.qkv(self.norm2(x), context), mask_values,
                                                 _ALL_QUERIES, per_head)
        return self.after_cross(x + self.cross_attn.to_out(out), mods), probs

    def probabilities(self, x, mod, context, mask_values, per_head: bool = False):
        """Only P of :meth:`call_with_probabilities` (the last guided block: no attention output)."""
        q, k, _ = self.cross_attn.qkv(self.norm2(self.before_cross(x, self.modulations(mod))), context)
        return query_probabilities(q, k, mask_values, _ALL_QUERIES, per_head)


class SparseStructureFlowModel(nnx.Module):
    """``SparseStructureFlowModel(config)`` or with upstream's keywords; ``dtype`` / ``param_dtype``
    / ``rngs`` as :class:`timi_jax.Hunyuan3DDiT` (float32 is what is tested). ``model(x, t, cond)``:
    x (B, in_channels, R, R, R), t (B,) = 1000 x flow time (1 = noise), cond (B, M, cond_channels)
    -> velocity (B, out_channels, R, R, R)."""

    #: Not guidance-distilled: upstream's sampler runs CFG (``timi_jax.sampler``'s protocol).
    guidance_embed = False

    def __init__(self, config: FlowConfig | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, **kwargs):
        cfg = config if config is not None else FlowConfig(**kwargs)
        ctx = _Ctx(dtype, param_dtype, rngs if rngs is not None else nnx.Rngs(0))
        self.config, self.dtype = cfg, dtype
        self.depth = cfg.num_blocks     # the guidable layers: every block's cross-attention
        C, p = cfg.model_channels, cfg.patch_size
        self.t_embedder = MLPEmbedder(256, C, ctx)
        if cfg.share_mod:
            self.adaLN_modulation = Modulation(C, True, ctx)
        self.pos_emb = Buffer(jnp.asarray(np.asarray(position_embedding(cfg.grid, C)), param_dtype))
        self.input_layer = ctx.linear(cfg.in_channels * p ** 3, C)
        self.blocks = nnx.List([CrossBlock(cfg, ctx) for _ in range(cfg.num_blocks)])
        self.out_layer = ctx.linear(C, cfg.out_channels * p ** 3)

    def tokens(self, x):
        """(B, C, R, R, R) -> the voxel tokens (B, L, model_channels) before the first block."""
        cfg = self.config
        expected = (cfg.in_channels,) + (cfg.resolution,) * 3
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"latent of shape {tuple(x.shape)} does not fit this model: expected "
                             f"(B, {', '.join(map(str, expected))}).")
        h = self.input_layer(patchify(jnp.asarray(x, self.dtype), cfg.patch_size))
        return h + self.pos_emb[...].astype(h.dtype)

    def modulation(self, t):
        """The timestep's conditioning: (B, C) for per-block adaLN, or the six shared (B, 1, C) arrays."""
        mod = self.t_embedder(timestep_embedding(t, 256, time_factor=1.0).astype(self.dtype))
        return self.adaLN_modulation(mod) if self.config.share_mod else mod

    def __call__(self, x, t, cond):
        h, mod, cond = self.tokens(x), self.modulation(t), jnp.asarray(cond, self.dtype)
        for block in self.blocks:
            h = block(h, mod, cond)
        h = self.out_layer(layer_norm(h, _FINAL_EPS))
        return unpatchify(h, self.config.patch_size, self.config.grid)

    def instance_probabilities(self, x, t, cond, mask_tokens, num_layers: int, guidance=None,
                               per_head: bool = False):
        """Truncated forward for TIMI's guidance pass: P (Eq.2) of the cross-attention of the first
        ``num_layers`` blocks, a list of float32 (B, L, K) ((B, H, L, K) with ``per_head``), L the
        voxel tokens; no block after the last guided one is evaluated. ``mask_tokens`` (B, K, M) or
        (K, M); ``guidance`` must be None (the sampler protocol of :mod:`timi_jax.sampler`)."""
        if guidance is not None:
            raise ValueError("TRELLIS's flow model takes no guidance= (not guidance-distilled).")
        if not 0 < num_layers <= self.depth:
            raise ValueError(f"num_layers={num_layers} must be in 1..depth={self.depth}")
        h, mod, cond = self.tokens(x), self.modulation(t), jnp.asarray(cond, self.dtype)
        mask_values = jnp.swapaxes(batched_mask_tokens(mask_tokens, h.shape[0], cond.shape[1]), 1, 2)
        probs = []
        for block in self.blocks[:num_layers - 1]:
            h, p = block.call_with_probabilities(h, mod, cond, mask_values, per_head)
            probs.append(p)
        return probs + [self.blocks[num_layers - 1].probabilities(h, mod, cond, mask_values, per_head)]

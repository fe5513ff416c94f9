"""TRELLIS stage 1 in PyTorch: the sparse-structure flow transformer and its occupancy decoder.

Written for TIMI from upstream's source (microsoft/TRELLIS, the commit in ``docs/trellis.md``:
``trellis/models/sparse_structure_flow.py``, ``sparse_structure_vae.py``,
``modules/transformer/modulated.py``, ``modules/attention/modules.py``), with upstream's constructor
keywords, ``forward`` signatures and state-dict keys, so the released ``ss_flow_img_dit_L_16l8_fp16``
and ``ss_dec_conv3d_16l8_fp16`` checkpoints load strictly; the numbers match upstream's in float32
(``tests/test_trellis_model.py``, against fixtures made from the upstream source).

:class:`SparseStructureFlowModel` denoises a (B, C, D, H, W) grid latent (8 x 16^3 in the released
model): the grid is cut into ``patch_size``^3 patches, one token per patch (voxel) with a fixed
sin/cos 3-D position embedding; each block is adaLN-modulated self-attention, cross-attention
from every voxel token to the image tokens (no modulation, plain residual) and an adaLN-modulated
MLP. ``forward(x, t, cond)`` takes ``t`` already multiplied by 1000 (upstream's sampler does it)
and returns the velocity, in the same grid layout.

The cross-attention calls the module function :func:`attention` (q, k, v (B, H, S, D) ->
(B, S, H*D)); ``timi_torch.guidance`` routes that function to read Eq.2's ``P`` during a guidance
pass, as on Hunyuan3D. It is Eq.1's ``A_zc`` exactly: the softmax of a voxel token over the image
tokens alone. Self-attention calls SDPA directly.

:class:`SparseStructureDecoder` maps the latent to (B, 1, 4R, 4R, 4R) occupancy logits (conv3d
ResBlocks with channel LayerNorm, upsampling by conv + 3-D pixel shuffle); occupancy is
``decoder(z) > 0``. Loading weights is :mod:`timi_torch.trellis.params`' business.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseStructureFlowModel", "SparseStructureDecoder", "DepthToSpaceDecoder", "FlowConfig", "DecoderConfig", "FLOW_PRESETS",
           "DECODER_PRESETS", "attention", "patchify", "unpatchify", "pixel_shuffle_3d", "position_embedding"]


# --------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """:class:`SparseStructureFlowModel`'s constructor keywords (upstream's names and defaults)."""

    resolution: int = 16
    in_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    out_channels: int = 8
    num_blocks: int = 24
    num_heads: Optional[int] = None
    num_head_channels: Optional[int] = 64
    mlp_ratio: float = 4
    patch_size: int = 2
    pe_mode: str = "ape"
    use_fp16: bool = False
    use_checkpoint: bool = False
    share_mod: bool = False
    qk_rms_norm: bool = False
    qk_rms_norm_cross: bool = False

    def __post_init__(self):
        if self.pe_mode != "ape":
            raise ValueError(f"pe_mode={self.pe_mode!r}: only upstream's 'ape' (the released stage-1 models) is "
                             "implemented; TRELLIS.2's 'rope' is not.")
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution={self.resolution} is not a multiple of patch_size={self.patch_size}.")
        if self.model_channels % self.heads:
            raise ValueError(f"model_channels={self.model_channels} is not a multiple of {self.heads} heads.")

    @property
    def heads(self) -> int:
        return self.num_heads or self.model_channels // self.num_head_channels

    @property
    def grid(self) -> int:
        """Tokens per side: ``resolution // patch_size``."""
        return self.resolution // self.patch_size

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """:class:`SparseStructureDecoder`'s constructor keywords (upstream's names and defaults)."""

    out_channels: int = 1
    latent_channels: int = 8
    num_res_blocks: int = 2
    channels: Sequence[int] = (512, 128, 32)
    num_res_blocks_middle: int = 2
    norm_type: str = "layer"
    use_fp16: bool = False

    def kwargs(self) -> dict:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}


#: Named flow configurations: ``"image-large"`` is upstream's released
#: ``configs/generation/ss_flow_img_dit_L_16l8_fp16.json``; ``"tiny"`` is for tests.
FLOW_PRESETS = {
    "image-large": FlowConfig(resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024,
                              num_blocks=24, num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape",
                              qk_rms_norm=True, use_fp16=True),
    "tiny": FlowConfig(resolution=8, in_channels=4, out_channels=4, model_channels=32, cond_channels=24,
                       num_blocks=3, num_heads=2, mlp_ratio=2, patch_size=2, qk_rms_norm=True, qk_rms_norm_cross=True),
}
#: Named decoder configurations: ``"16l8"`` is upstream's ``configs/vae/ss_vae_conv3d_16l8_fp16.json``.
DECODER_PRESETS = {
    "16l8": DecoderConfig(out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2,
                          channels=(512, 128, 32), use_fp16=True),
    "tiny": DecoderConfig(out_channels=1, latent_channels=4, num_res_blocks=1, num_res_blocks_middle=1,
                          channels=(16, 8)),
}


# --------------------------------------------------------------------------- grid helpers
def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C * p^3, D/p, H/p, W/p), channels ordered (C, pd, ph, pw) as upstream."""
    if patch_size == 1:
        return x
    B, C, D, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, D // p, p, H // p, p, W // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * p ** 3, D // p, H // p, W // p)


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    if patch_size == 1:
        return x
    B, Cp, d, h, w = x.shape
    p = patch_size
    x = x.reshape(B, Cp // p ** 3, p, p, p, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, Cp // p ** 3, d * p, h * p, w * p)


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C s^3, D, H, W) -> (B, C, D s, H s, W s): channel ``c * s^3 + (i s + j) s + k`` goes to
    sub-voxel (i, j, k) of its cell (upstream's order)."""
    B, C, D, H, W = x.shape
    c = C // scale ** 3
    x = x.reshape(B, c, scale, scale, scale, D, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, c, D * scale, H * scale, W * scale)


def position_embedding(grid: int, channels: int) -> torch.Tensor:
    """The fixed 3-D sin/cos embedding of the ``grid``^3 voxel tokens, (grid^3, channels) float32.

    Token ``l`` is voxel ``(l // grid^2, (l // grid) % grid, l % grid)``; for each of its 3
    coordinates ``x``: ``[sin(x f), cos(x f)]`` with ``f = 10000^(-i / F)``, ``F = channels // 6``,
    the three blocks side by side, zero-padded to ``channels``.
    """
    F_ = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(F_, dtype=torch.float32) / F_))
    coords = torch.stack(torch.meshgrid(*[torch.arange(grid)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    args = torch.outer(coords.reshape(-1).float(), freqs)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1).reshape(coords.shape[0], -1)
    return F.pad(emb, (0, channels - emb.shape[1]))


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) float32: ``[cos(t f), sin(t f)]`` with ``f = max_period^(-i / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


# --------------------------------------------------------------------------- layers
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The cross-attention's attention: q (B, H, L, D), k, v (B, H, M, D) -> (B, L, H*D).

    A module function so that ``timi_torch.guidance`` can route it (Eq.2); SDPA at scale D^-1/2."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class _LayerNorm32(nn.LayerNorm):
    """LayerNorm in float32, output in the input's dtype (upstream's ``LayerNorm32``)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class _ChannelLayerNorm32(_LayerNorm32):
    """:class:`_LayerNorm32` over the channel axis 1 of (B, C, ...)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1).contiguous()


class _HeadRMSNorm(nn.Module):
    """Per-head RMS norm of (..., H, D): ``normalize(x) * gamma * sqrt(D)`` in float32 (key ``gamma`` (H, D))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x):
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class _Attention(nn.Module):
    """Upstream's ``MultiHeadAttention`` in its full-attention forms: ``self`` (key ``to_qkv``) or
    ``cross`` (keys ``to_q``, ``to_kv``); optional per-head QK RMS norm; ``to_out``."""

    def __init__(self, channels: int, heads: int, ctx_channels: Optional[int] = None, cross: bool = False,
                 qk_rms_norm: bool = False):
        super().__init__()
        self.heads, self.cross, self.qk_rms_norm = heads, cross, qk_rms_norm
        head_dim = channels // heads
        if cross:
            self.to_q = nn.Linear(channels, channels)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels)
        else:
            self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = _HeadRMSNorm(head_dim, heads)
            self.k_rms_norm = _HeadRMSNorm(head_dim, heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x, context=None):
        B, L, _ = x.shape
        H = self.heads
        if self.cross:
            q = self.to_q(x).reshape(B, L, H, -1)
            k, v = self.to_kv(context).reshape(B, context.shape[1], 2, H, -1).unbind(dim=2)
        else:
            q, k, v = self.to_qkv(x).reshape(B, L, 3, H, -1).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))          # (B, H, S, D)
        if self.cross:
            h = attention(q, k, v)
        else:
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
        return self.to_out(h)


class _FeedForward(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x):
        return self.mlp(x)


class _CrossBlock(nn.Module):
    """Upstream's ``ModulatedTransformerCrossBlock``: adaLN self-attention (gated), cross-attention
    after an affine LayerNorm (plain residual), adaLN MLP (gated)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        C = cfg.model_channels
        self.share_mod = cfg.share_mod
        self.norm1 = _LayerNorm32(C, elementwise_affine=False, eps=1e-6)
        self.norm2 = _LayerNorm32(C, elementwise_affine=True, eps=1e-6)
        self.norm3 = _LayerNorm32(C, elementwise_affine=False, eps=1e-6)
        self.self_attn = _Attention(C, cfg.heads, qk_rms_norm=cfg.qk_rms_norm)
        self.cross_attn = _Attention(C, cfg.heads, cfg.cond_channels, cross=True, qk_rms_norm=cfg.qk_rms_norm_cross)
        self.mlp = _FeedForward(C, cfg.mlp_ratio)
        if not cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, mod, context):
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.unsqueeze(1) for m in mod.chunk(6, dim=1))
        x = x + self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa) * gate_msa
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_size))


def _half_linear_and_conv(module: nn.Module, dtype) -> None:
    """Upstream's ``convert_module_to_f16``: the weights of linear and conv layers in ``dtype``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            m.to(dtype)


# --------------------------------------------------------------------------- models
class SparseStructureFlowModel(nn.Module):
    """TRELLIS's stage-1 flow transformer (upstream's keywords; see :class:`FlowConfig`).

    ``forward(x, t, cond)``: ``x`` (B, in_channels, R, R, R), ``t`` (B,) = 1000 x flow time
    (1 = noise, 0 = data), ``cond`` (B, M, cond_channels) image tokens -> velocity (B,
    out_channels, R, R, R) in ``x``'s dtype. With ``use_fp16`` the blocks' weights are float16
    (norms computed in float32), as upstream.
    """

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int, out_channels: int,
                 num_blocks: int, num_heads: Optional[int] = None, num_head_channels: Optional[int] = 64,
                 mlp_ratio: float = 4, patch_size: int = 2, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, share_mod: bool = False, qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False):
        super().__init__()
        cfg = FlowConfig(resolution, in_channels, model_channels, cond_channels, out_channels, num_blocks, num_heads,
                         num_head_channels, mlp_ratio, patch_size, pe_mode, use_fp16, use_checkpoint, share_mod,
                         qk_rms_norm, qk_rms_norm_cross)
        self.config = cfg
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.model_channels, self.cond_channels, self.patch_size = model_channels, cond_channels, patch_size
        self.num_heads = cfg.heads
        self.dtype = torch.float16 if use_fp16 else torch.float32
        C = model_channels
        self.t_embedder = _TimestepEmbedder(C)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.register_buffer("pos_emb", position_embedding(cfg.grid, C))
        self.input_layer = nn.Linear(in_channels * patch_size ** 3, C)
        self.blocks = nn.ModuleList([_CrossBlock(cfg) for _ in range(num_blocks)])
        self.out_layer = nn.Linear(C, out_channels * patch_size ** 3)
        self.initialize_weights()
        if use_fp16:
            _half_linear_and_conv(self.blocks, torch.float16)

    @classmethod
    def from_config(cls, config: FlowConfig) -> "SparseStructureFlowModel":
        return cls(**config.kwargs())

    def convert_to_fp32(self) -> "SparseStructureFlowModel":
        """Every weight and the blocks' compute dtype in float32 (a ``use_fp16`` checkpoint on the CPU);
        upstream's method of that name leaves ``dtype`` at float16."""
        self.float()
        self.dtype = torch.float32
        return self

    def initialize_weights(self) -> None:
        """Upstream's initialisation: xavier-uniform linears, zero biases, N(0, 0.02) timestep MLP,
        zero adaLN and output layers (a fresh model predicts velocity 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        mods = [self.adaLN_modulation] if self.config.share_mod else [b.adaLN_modulation for b in self.blocks]
        for mod in mods + [nn.Sequential(self.out_layer)]:
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, R, R, R) -> the voxel tokens (B, L, model_channels) before the first block."""
        expected = (self.in_channels,) + (self.resolution,) * 3
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"latent of shape {tuple(x.shape)} does not fit this model: expected (B, {', '.join(map(str, expected))}).")
        h = patchify(x, self.patch_size).flatten(2).transpose(1, 2)
        return self.input_layer(h) + self.pos_emb[None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        mod = self.t_embedder(t)
        if self.config.share_mod:
            mod = self.adaLN_modulation(mod)
        mod, h, cond = mod.type(self.dtype), h.type(self.dtype), cond.type(self.dtype)
        for block in self.blocks:
            h = block(h, mod, cond)
        h = F.layer_norm(h.type(x.dtype), h.shape[-1:])
        h = self.out_layer(h)
        g = self.resolution // self.patch_size
        h = h.transpose(1, 2).reshape(h.shape[0], -1, g, g, g)
        return unpatchify(h, self.patch_size).contiguous()


class _ResBlock3d(nn.Module):
    def __init__(self, channels: int, norm_type: str = "layer"):
        super().__init__()
        if norm_type != "layer":
            raise ValueError(f"norm_type={norm_type!r}: the released decoders use 'layer'.")
        self.norm1 = _ChannelLayerNorm32(channels)
        self.norm2 = _ChannelLayerNorm32(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.skip_connection = nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class _Upsample3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x):
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    """TRELLIS's sparse-structure decoder (upstream's keywords; see :class:`DecoderConfig`):
    ``forward(z)`` (B, latent_channels, R, R, R) -> occupancy logits (B, out_channels, R 2^k, ...)
    with ``k = len(channels) - 1``; occupancy is ``logits > 0``."""

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: Sequence[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        self.config = DecoderConfig(out_channels, latent_channels, num_res_blocks, tuple(channels),
                                    num_res_blocks_middle, norm_type, use_fp16)
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[_ResBlock3d(channels[0], norm_type) for _ in range(num_res_blocks_middle)])
        blocks = []
        for i, ch in enumerate(channels):
            blocks += [_ResBlock3d(ch, norm_type) for _ in range(num_res_blocks)]
            if i < len(channels) - 1:
                blocks.append(_Upsample3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(_ChannelLayerNorm32(channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        if use_fp16:
            _half_linear_and_conv(self.blocks, torch.float16)
            _half_linear_and_conv(self.middle_block, torch.float16)

    @classmethod
    def from_config(cls, config: DecoderConfig) -> "SparseStructureDecoder":
        return cls(**config.kwargs())

    @property
    def upsampling(self) -> int:
        """Output voxels per latent voxel along each axis."""
        return 2 ** (len(self.config.channels) - 1)

    def convert_to_fp32(self) -> "SparseStructureDecoder":
        """Every weight and the blocks' compute dtype in float32."""
        self.float()
        self.dtype = torch.float32
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(z).type(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.type(z.dtype))


@dataclasses.dataclass(frozen=True)
class DepthToSpaceConfig:
    """:class:`DepthToSpaceDecoder`'s keywords."""

    factor: int = 2
    latent_channels: int = 8

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


class DepthToSpaceDecoder(nn.Module):
    """A fixed, parameter-free stage-1 decoder (ours, not upstream's): the latent *is* the occupancy,
    ``{empty, occupied} -> {-1, +1}`` cut into ``factor``^3 blocks (space-to-depth), so ``forward(z)``
    is depth-to-space, (B, factor^3, R, R, R) -> logits (B, 1, R f, R f, R f) (:func:`pixel_shuffle_3d`'s
    order). The grid testbed's latent (``timi.testbed.grid``): it can neither fuse nor split instances
    on its own, so everything the test measures is the flow model's."""

    def __init__(self, factor: int = 2, latent_channels: int = 8):
        super().__init__()
        if latent_channels % factor ** 3:
            raise ValueError(f"latent_channels={latent_channels} is not a multiple of factor^3 = {factor ** 3}.")
        self.config = DepthToSpaceConfig(factor, latent_channels)

    @property
    def upsampling(self) -> int:
        return self.config.factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(z, self.config.factor)


def flow_parameter_count(config: FlowConfig) -> int:
    """Parameters of a flow model of ``config``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = SparseStructureFlowModel.from_config(config)
    return int(sum(np.prod(p.shape) for p in model.parameters()))

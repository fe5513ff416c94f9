"""The testbed model: hy3dgen's own classes at CPU size, plus our point encoder for the ShapeVAE.

* ``ShapeVAE`` (hy3dgen's decoder: ``post_kl`` -> self-attention ``Transformer`` -> cross-attention
  occupancy ``geo_decoder``), trained here on exact occupancy.
* :class:`PointEncoder` (ours; hy3dgen ships no encoder): farthest-point-sampled surface points
  cross-attend to all surface points (3DShape2VecSet style, built from hy3dgen's
  ``ResidualCrossAttentionBlock``/``Transformer``) and give a diagonal Gaussian per latent token.
* ``Hunyuan3DDiT`` (double + single stream blocks) conditioned on ``SingleImageEncoder`` /
  ``DinoImageEncoder`` built from a small DINOv2 config, trained by flow matching.

The config dict has exactly the layout of hy3dgen's ``config.yaml`` (it starts from
:func:`timi_torch.testing.tiny_config`), so the exported directory loads with hy3dgen's own
``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`` / ``from_single_file``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class TestbedSizes:
    """Sizes of a testbed model; the presets are :data:`SIZES` (``v2`` is the shipped one)."""

    num_latents: int = 256
    latent_channels: int = 8
    vae_width: int = 96
    vae_heads: int = 4
    vae_layers: int = 2
    vae_mlp_ratio: int = 2
    encoder_layers: int = 1
    hidden_size: int = 128
    num_heads: int = 4
    depth: int = 4
    depth_single_blocks: int = 1
    cond_width: int = 64
    cond_heads: int = 4
    cond_layers: int = 2
    image_size: int = 224
    scale_factor: float = 1.0
    #: ``dino``: a small DINOv2 trained from scratch with the DiT; ``fixed``: a DINOv2 with no layers whose
    #: weights are set by :func:`set_fixed_conditioner` and frozen (patch colours + explicit positions)
    conditioner: str = "dino"
    #: gain of the fixed conditioner's position channels
    position_gain: float = 3.0
    #: > 0: the first 3 channels of each latent token are its farthest-point sample's position times this
    #: (exact, no posterior noise), the rest are learnt; 0: all channels learnt (hy3dgen's VAE has no
    #: encoder, so this is our choice; it makes a latent token's value say where it is)
    latent_positions: float = 0.0

    def replace(self, **kw) -> "TestbedSizes":
        return TestbedSizes(**{**asdict(self), **kw})

    @property
    def condition_grid(self) -> int:
        return self.image_size // 14


#: named presets: ``v1`` the first testbed model (issue 8: 64 latents, 8x8 condition grid),
#: ``v2`` the single-asset-prior model of issue 12 (256 latents, 16x16 grid), ``v3`` v2 with the fixed
#: conditioner (``docs/testbed.md``: v2's DiT learnt to ignore its trained conditioner), ``tiny`` for tests
SIZES = {
    "v1": TestbedSizes(num_latents=64, vae_width=64, hidden_size=96, image_size=112),
    "v2": TestbedSizes(),
    "v3": TestbedSizes(conditioner="fixed", cond_layers=0),
    "v3p": TestbedSizes(conditioner="fixed", cond_layers=0, latent_positions=1.0),
    "tiny": TestbedSizes(num_latents=32, vae_width=32, vae_heads=2, vae_layers=1, hidden_size=32, num_heads=2,
                         depth=2, cond_width=24, cond_heads=2, cond_layers=1, image_size=56),
}


def hy3dgen_config(sizes: TestbedSizes) -> dict:
    """hy3dgen ``config.yaml`` content (model / vae / conditioner / scheduler / image_processor)."""
    from timi_torch.testing import tiny_config

    cfg = copy.deepcopy(tiny_config(
        depth=sizes.depth, depth_single_blocks=sizes.depth_single_blocks, hidden_size=sizes.hidden_size,
        num_heads=sizes.num_heads, latent_channels=sizes.latent_channels, num_latents=sizes.num_latents,
        cond_width=sizes.cond_width, cond_layers=sizes.cond_layers, image_size=sizes.image_size,
        vae_width=sizes.vae_width, vae_layers=sizes.vae_layers))
    vae = cfg["vae"]["params"]
    vae.update(heads=sizes.vae_heads, geo_decoder_mlp_expand_ratio=sizes.vae_mlp_ratio,
               scale_factor=float(sizes.scale_factor))
    dino = cfg["conditioner"]["params"]["main_image_encoder"]["kwargs"]["config"]
    dino["num_attention_heads"] = sizes.cond_heads
    return cfg


def build_parts(sizes: TestbedSizes) -> dict[str, nn.Module]:
    """Instantiate ``model`` (Hunyuan3DDiT), ``vae`` (ShapeVAE) and ``conditioner`` with hy3dgen's code
    (the conditioner by :func:`build_conditioner`, after the other two)."""
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    cfg = hy3dgen_config(sizes)
    parts = {name: instantiate_from_config(copy.deepcopy(cfg[name])) for name in ("model", "vae")}
    parts["conditioner"] = build_conditioner(sizes)
    return parts


def build_conditioner(sizes: TestbedSizes) -> nn.Module:
    """hy3dgen's ``SingleImageEncoder`` (``DinoImageEncoder``) of ``sizes``: the fixed one
    (:func:`set_fixed_conditioner`), or a trainable DINOv2 whose position embeddings start as a 2-D
    sin-cos table (then train with the rest), so every condition token says where in the image it is
    from the first step on."""
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    if sizes.conditioner not in ("dino", "fixed"):
        raise ValueError(f"unknown conditioner {sizes.conditioner!r}; use 'dino' or 'fixed'")
    cond = instantiate_from_config(copy.deepcopy(hy3dgen_config(sizes)["conditioner"]))
    dino = cond.main_image_encoder.model
    if sizes.conditioner == "fixed":
        set_fixed_conditioner(dino, sizes)
        return cond
    pos = dino.embeddings.position_embeddings  # (1, 1 + g*g, width)
    with torch.no_grad():
        pos[0, 1:] = 0.5 * sincos_2d(sizes.condition_grid, pos.shape[-1])
    return cond


@torch.no_grad()
def set_fixed_conditioner(dino: nn.Module, sizes: TestbedSizes, seed: int = 7) -> None:
    """Weights of a layer-free DINOv2 (hy3dgen's class) whose tokens say what is where, fixed and frozen.

    Half the channels come from the 14x14 patch convolution: the mean of each colour over the
    patch's four 7x7 quarters (12 channels) and fixed random projections of the patch (shading,
    edges); the other half from the position table: the patch centre ``(u, v)`` in [-1, 1] (image x
    right, y up: the world x, y of the front view), a constant, and a 2-D sin-cos table, all times
    ``position_gain``. The DINOv2 output LayerNorm then normalises each token. A query that is linear
    in a latent token's position can then peak on the patches at that position (cosine attention
    with QK-norm), which a trained conditioner has to discover first.
    """
    if sizes.cond_layers != 0:
        raise ValueError("the fixed conditioner has no transformer layers (cond_layers=0)")
    width, grid, gain = sizes.cond_width, sizes.condition_grid, sizes.position_gain
    half = width // 2
    conv = dino.embeddings.patch_embeddings.projection  # Conv2d(3, width, 14, stride 14)
    conv.weight.zero_()
    conv.bias.zero_()
    k = 0
    for c in range(3):
        for by in range(2):
            for bx in range(2):
                conv.weight[k, c, by * 7:(by + 1) * 7, bx * 7:(bx + 1) * 7] = 1.0 / 49
                k += 1
    gen = torch.Generator().manual_seed(seed)
    conv.weight[k:half] = torch.randn(half - k, 3, 14, 14, generator=gen) / (14.0 * 3 ** 0.5)
    pos = dino.embeddings.position_embeddings  # (1, 1 + grid^2, width)
    pos.zero_()
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    vv, uu = torch.meshgrid(-centres, centres, indexing="ij")
    pos[0, 1:, half] = gain * uu.reshape(-1)
    pos[0, 1:, half + 1] = gain * vv.reshape(-1)
    pos[0, 1:, half + 2] = gain
    pos[0, 1:, half + 4:] = gain * sincos_2d(grid, width - half - 4)
    dino.embeddings.cls_token.zero_()
    dino.requires_grad_(False)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) 2-D sine-cosine position table (half the channels per axis, as in MAE)."""
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        angles = axis[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, width - table.shape[1])).float()


def farthest_point_sample(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of a farthest-point subset of ``points`` (B, N, 3), starting at index 0."""
    b, n, _ = points.shape
    idx = torch.zeros(b, k, dtype=torch.long, device=points.device)
    dist = torch.full((b, n), float("inf"), device=points.device)
    last = torch.zeros(b, dtype=torch.long, device=points.device)
    ar = torch.arange(b, device=points.device)
    for i in range(k):
        idx[:, i] = last
        d = ((points - points[ar, last][:, None]) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        last = dist.argmax(-1)
    return idx


class PointEncoder(nn.Module):
    """Surface points (B, N, 3) -> Gaussian latent tokens (B, num_latents, C): mean and log-variance."""

    def __init__(self, vae: nn.Module, sizes: TestbedSizes):
        super().__init__()
        from hy3dgen.shapegen.models.autoencoders.attention_blocks import (
            FourierEmbedder, ResidualCrossAttentionBlock, Transformer)

        width = sizes.vae_width
        self.num_latents = sizes.num_latents
        self.latent_positions = float(sizes.latent_positions)
        self.fourier = FourierEmbedder(num_freqs=8, include_pi=False)
        self.input_proj = nn.Linear(self.fourier.out_dim, width)
        self.cross = ResidualCrossAttentionBlock(width=width, heads=sizes.vae_heads, qkv_bias=False, qk_norm=True)
        self.self_attn = Transformer(n_ctx=sizes.num_latents, width=width, layers=sizes.encoder_layers,
                                     heads=sizes.vae_heads, qkv_bias=False, qk_norm=True)
        self.ln = nn.LayerNorm(width)
        self.to_moments = nn.Linear(width, 2 * sizes.latent_channels)
        with torch.no_grad():  # start with a small posterior noise (std e^-2.5) so the decoder can read the mean
            self.to_moments.bias[sizes.latent_channels:] = -5.0

    def forward(self, surface: torch.Tensor, fps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``fps`` (B, L): precomputed farthest-point indices into ``surface`` (else computed here)."""
        idx = farthest_point_sample(surface, self.num_latents) if fps is None else fps
        queries = torch.gather(surface, 1, idx[..., None].expand(-1, -1, 3))
        data = self.input_proj(self.fourier(surface))
        q = self.input_proj(self.fourier(queries))
        x = self.self_attn(self.cross(q, data))
        mean, logvar = self.to_moments(self.ln(x)).chunk(2, dim=-1)
        logvar = logvar.clamp(-20.0, 5.0)
        if self.latent_positions:
            mean = torch.cat([self.latent_positions * queries, mean[..., 3:]], dim=-1)
            logvar = torch.cat([torch.full_like(logvar[..., :3], -20.0), logvar[..., 3:]], dim=-1)
        return mean, logvar


def decode_occupancy(vae: nn.Module, latents: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Occupancy logits (B, Q) of ``queries`` (B, Q, 3) for *unscaled* latents (B, L, C), as hy3dgen decodes."""
    return vae.geo_decoder(queries=queries, latents=vae(latents)).squeeze(-1)


def latent_position_channels(latents: torch.Tensor) -> torch.Tensor:
    """The tokens' positions in a testbed latent with ``latent_positions`` (channels 0-2: the
    farthest-point sample's xyz times ``latent_positions``, times ``scale_factor`` in the DiT's
    latents; ``TIMIConfig.smoothing="positions"`` is scale-free, so no unscaling is needed)."""
    return latents[..., :3]


def token_position_reader(model_config: dict):
    """``TIMIPipeline``'s ``token_positions`` for a model ``config.yaml`` (parsed): the latent's
    position channels when the model was exported by the testbed with ``latent_positions``, else None."""
    sizes = (model_config.get("timi_testbed") or {}).get("sizes") or {}
    return latent_position_channels if float(sizes.get("latent_positions") or 0.0) else None

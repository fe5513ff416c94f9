"""The PyTorch side of the benchmarks: hy3dgen's own pipeline class around a random-weight DiT,
sampled by :class:`timi_torch.TIMIPipeline`'s loop.

Only the denoising loop is timed. The pipeline is a real ``Hunyuan3DDiTFlowMatchingPipeline``
(hy3dgen's scheduler, ``prepare_latents``, ``encode_cond`` with its CFG concatenation) whose
conditioner and image processor are stand-ins that hand out fixed random condition tokens (zeros
for the unconditional branch, as hy3dgen's DINOv2 encoder does) and whose VAE only carries the
latent shape; no image is encoded and no mesh decoded. Plain sampling is the same
``TIMIPipeline`` loop with ``isg=False`` (documented there to perform exactly hy3dgen's operations),
so plain and TIMI differ by the guidance only.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

import timi_core
from timi_core import TIMIConfig

from timi_torch import ConditionMasks, TIMIPipeline

from .config import BenchConfig

__all__ = ["BenchModel", "build_dit", "stripe_token_masks"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_dit(cfg: BenchConfig, seed: int | None = None):
    """hy3dgen's ``Hunyuan3DDiT`` (or, for ``cfg.architecture`` "2.1*", ``timi_torch.hunyuan21``'s
    ``HunYuanDiTPlain``) with ``cfg``'s shapes and random weights (frozen, eval mode)."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    if cfg.architecture != "2.0":
        model = _dit21(cfg)
    else:
        from hy3dgen.shapegen.models.denoisers.hunyuan3ddit import Hunyuan3DDiT

        model = Hunyuan3DDiT(in_channels=cfg.latent_channels, context_in_dim=cfg.context_dim,
                             hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, depth=cfg.depth,
                             depth_single_blocks=cfg.depth_single_blocks, axes_dim=[cfg.head_dim],
                             guidance_embed=cfg.guidance_embed)
    model.requires_grad_(False)
    return model.eval().to(_DTYPES[cfg.dtype])


def dit21_config(cfg: BenchConfig):
    """The ``DiT21Config`` of a 2.1 benchmark: its preset's options with ``cfg``'s shapes."""
    import dataclasses

    from timi_torch.hunyuan21 import PRESETS

    preset = PRESETS[cfg.architecture]
    return dataclasses.replace(preset, input_size=cfg.num_latents, in_channels=cfg.latent_channels,
                               hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, depth=cfg.depth,
                               context_dim=cfg.context_dim, text_len=cfg.num_cond_tokens,
                               num_moe_layers=min(preset.num_moe_layers, cfg.depth))


def _dit21(cfg: BenchConfig):
    from timi_torch.hunyuan21 import HunYuanDiTPlain

    if cfg.guidance_embed:
        raise ValueError("Hunyuan3D 2.1's DiT has no guidance-distilled variant.")
    return HunYuanDiTPlain(config=dit21_config(cfg))


def stripe_token_masks(cfg: BenchConfig, num_instances: int | None = None) -> torch.Tensor:
    """(K, M) condition-token masks: K vertical stripes over the central half of the patch grid,
    pooled with ``timi_core.pool_masks`` (CLS weight 0) -- disjoint, like real instance masks."""
    K = cfg.num_instances if num_instances is None else num_instances
    gh, gw = cfg.patch_grid
    masks = np.zeros((K, gh, gw), dtype=bool)
    lo, hi = gw // 4, gw - gw // 4
    if hi - lo < K:
        lo, hi = 0, gw
    edges = np.linspace(lo, hi, K + 1).round().astype(int)
    for k in range(K):
        masks[k, gh // 4: gh - gh // 4 or gh, edges[k]:edges[k + 1]] = True
    return torch.as_tensor(np.asarray(timi_core.pool_masks(masks, (gh, gw), prefix_tokens=1)), dtype=torch.float32)


class _TokenConditioner(torch.nn.Module):
    """Stand-in for hy3dgen's image conditioner: fixed random tokens; zeros when unconditional."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.register_buffer("tokens", tokens)

    def forward(self, image, **kwargs):
        return {"main": self.tokens.expand(image.shape[0], -1, -1)}

    def unconditional_embedding(self, batch_size, **kwargs):
        return {"main": torch.zeros_like(self.tokens).expand(batch_size, -1, -1)}


class _LatentShape(torch.nn.Module):
    """Stand-in VAE: hy3dgen's ``prepare_latents`` only reads ``vae.latent_shape``."""

    def __init__(self, shape):
        super().__init__()
        self.latent_shape = tuple(shape)


def _image_processor(image):
    return {"image": torch.zeros(1, 3, 1, 1)}


class BenchModel:
    """A random DiT in hy3dgen's pipeline plus a ``TIMIPipeline`` for guided sampling and its copy
    (:meth:`~timi_torch.TIMIPipeline.with_config`) for plain sampling.

    ``sample(guided)`` runs the whole ``cfg.steps``-step loop once from the same seed and returns
    the final latents.
    """

    def __init__(self, cfg: BenchConfig, attention: str = "fused", model=None, device: str | None = None):
        from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
        from hy3dgen.shapegen.schedulers import FlowMatchEulerDiscreteScheduler

        self.cfg = cfg
        self.model = build_dit(cfg) if model is None else model
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        cond = torch.randn(1, cfg.num_cond_tokens, cfg.context_dim, generator=gen)
        dtype = _DTYPES[cfg.dtype]
        self.base = Hunyuan3DDiTFlowMatchingPipeline(
            vae=_LatentShape((cfg.num_latents, cfg.latent_channels)), model=self.model,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
            conditioner=_TokenConditioner(cond), image_processor=_image_processor,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype)
        self.cond = cond
        self.tokens = stripe_token_masks(cfg).to(self.base.device)
        timi_cfg = TIMIConfig(guided_layers=cfg.guided_layers, guided_steps=cfg.guided_steps)
        guided = _RawTokenPipeline(self.base, timi_cfg, attention, self.tokens)
        self.pipelines = {True: guided, False: guided.with_config(timi_cfg.replace(isg=False))}  # same weights
        self._image = Image.new("RGB", (1, 1))

    def noise(self) -> torch.Tensor:
        """The initial latents ``sample`` starts from (hy3dgen's ``prepare_latents``, seeded)."""
        gen = torch.Generator(self.base.device).manual_seed(self.cfg.seed)
        return self.base.prepare_latents(self.cfg.batch_size, self.base.dtype, self.base.device, gen)

    def sample(self, guided: bool) -> torch.Tensor:
        gen = torch.Generator(self.base.device).manual_seed(self.cfg.seed)
        self.pipelines[guided].guide_seconds = 0.0
        images = [self._image] * self.cfg.batch_size
        masks = [self.pipelines[guided].masks] * self.cfg.batch_size
        out = self.pipelines[guided](images, masks, num_inference_steps=self.cfg.steps,
                                     guidance_scale=self.cfg.guidance_scale, generator=gen,
                                     output_type="latent", enable_pbar=False).latents
        if out.is_cuda:
            torch.cuda.synchronize()
        return out.cpu()


class _RawTokenPipeline(TIMIPipeline):
    """``TIMIPipeline`` called with condition-token masks given directly (``masks``: a
    :class:`ConditionMasks` with no image geometry, which the call uses as is). The sampling loop
    and ``guide`` are the adapter's, unchanged; ``guide`` is only extended to add up the wall time
    spent in it (``guide_seconds``)."""

    def __init__(self, base, config, attention, tokens):
        super().__init__(base, config=config, attention=attention)
        g = int(round((tokens.shape[1] - 1) ** 0.5))
        self.masks = ConditionMasks(tokens=tokens, frame_masks=np.zeros((tokens.shape[0], 1, 1), bool),
                                    frame_image=np.zeros((1, 1, 3), np.uint8), image=Image.new("RGB", (1, 1)),
                                    grid=(g, g), prefix_tokens=1)
        self.guide_seconds = 0.0

    def guide(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = super().guide(*args, **kwargs)
        self.guide_seconds += time.perf_counter() - t0
        return out

"""TIMI inside upstream's ``TrellisImageTo3DPipeline`` (for users who have TRELLIS installed).

:func:`guide` swaps the pipeline's stage-1 sampler for one call (the pipeline's own component,
as upstream's ``inject_sampler_multi_image`` swaps sampler methods): ``pipeline.run(image, ...)``
then runs stage 1 with TIMI (:func:`timi_torch.trellis.sampler.sample`, the pipeline's own flow
model, condition and sampler settings) and leaves stage 2 and every decoder (Gaussians, radiance
field, mesh, GLB) untouched.

Masks reach the condition tokens through upstream's image geometry: ``preprocess_image`` crops a
square of side ``int(1.2 * max(bbox))`` centred on the alpha's bounding box (alpha > 0.8 * 255) and
resizes it to 518 px; DINOv2 ViT-L/14 with registers gives ``1 + 4 + 37 * 37`` tokens, the patches
last (:data:`PREFIX_TOKENS`). :func:`condition_token_masks` crops the masks with the same box and
pools them by area onto the 37 x 37 patch grid (``timi_core.pool_masks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numpy as np
import torch
from PIL import Image

import timi_core
from timi_core import TIMIConfig

from ..masks import instance_masks, load_rgba
from .sampler import SamplerSettings, sample

__all__ = ["guide", "condition_token_masks", "crop_box", "as_rgba_input", "GRID", "PREFIX_TOKENS", "GuidedStageOne"]

#: DINOv2 ViT-L/14 with registers at 518 px: the class token and 4 registers come first.
PREFIX_TOKENS = 5
GRID = (37, 37)


def crop_box(alpha: np.ndarray) -> tuple:
    """Upstream ``preprocess_image``'s crop box (left, upper, right, lower) for an (H, W) uint8 alpha."""
    found = np.argwhere(alpha > 0.8 * 255)
    if found.size == 0:
        raise ValueError("the image's foreground (alpha > 80 %, or the union of the masks) is empty.")
    x0, y0, x1, y1 = found[:, 1].min(), found[:, 0].min(), found[:, 1].max(), found[:, 0].max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(max(x1 - x0, y1 - y0) * 1.2)
    return cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2


def condition_token_masks(image, masks, prefix_tokens: int = PREFIX_TOKENS, grid: tuple = GRID) -> torch.Tensor:
    """(K, prefix + gh * gw) float32: each instance's share of every condition token (Eq.2's ``M``)
    in the frame upstream's ``preprocess_image`` makes of ``image``; prefix tokens get 0.

    ``image``: the RGBA picture (alpha = union of the masks when it has none); ``masks``: any form
    ``timi_torch.condition_token_masks`` takes, in the image's own pixel frame.
    """
    m = instance_masks(masks, max_labels=grid[0] * grid[1])
    rgba = load_rgba(image, m)
    box = crop_box(np.asarray(rgba)[..., 3])
    cropped = np.stack([np.asarray(Image.fromarray(k.astype(np.uint8) * 255).crop(box)) > 127 for k in m])
    return torch.from_numpy(np.asarray(timi_core.pool_masks(cropped, grid, prefix_tokens), dtype=np.float32))


@dataclasses.dataclass
class GuidedStageOne:
    """A stand-in for the pipeline's ``sparse_structure_sampler`` with upstream's ``sample`` signature,
    running :func:`timi_torch.trellis.sampler.sample` with TIMI; ``diagnostics`` of the last call."""

    sigma_min: float
    tokens: torch.Tensor
    config: TIMIConfig
    attention: str = "fused"
    diagnostics: list = dataclasses.field(default_factory=list)

    def sample(self, model, noise, cond, neg_cond=None, steps: int = 50, rescale_t: float = 1.0,
               cfg_strength: float = 3.0, cfg_interval=(0.0, 1.0), verbose: bool = True, **_):
        settings = SamplerSettings(steps=int(steps), cfg_strength=float(cfg_strength),
                                   cfg_interval=tuple(cfg_interval), rescale_t=float(rescale_t),
                                   sigma_min=float(self.sigma_min))
        out = sample(model, noise, cond, neg_cond, tokens=self.tokens[None].to(noise.device), config=self.config,
                     settings=settings, attention=self.attention, enable_pbar=verbose)
        self.diagnostics = out.diagnostics
        return _Samples(out.latents)


@dataclasses.dataclass
class _Samples:
    samples: torch.Tensor


@contextlib.contextmanager
def guide(pipeline, image, masks, config: TIMIConfig = TIMIConfig(), attention: str = "fused"):
    """Within the block, ``pipeline.run(image, ...)`` (an upstream ``TrellisImageTo3DPipeline``) runs its
    stage 1 with TIMI on ``masks`` of ``image``; the pipeline's sampler is put back on exit.

    Yields the :class:`GuidedStageOne` in use (its ``diagnostics`` hold the guided steps of the last
    run). ``image`` must be the picture later passed to ``run`` (the masks are cropped as its
    ``preprocess_image`` crops it).
    """
    original = pipeline.sparse_structure_sampler
    sigma_min = getattr(original, "sigma_min", SamplerSettings().sigma_min)
    stage_one = GuidedStageOne(sigma_min, condition_token_masks(image, masks), config, attention)
    pipeline.sparse_structure_sampler = stage_one
    try:
        yield stage_one
    finally:
        pipeline.sparse_structure_sampler = original


def as_rgba_input(image, masks) -> Image.Image:
    """The RGBA picture to hand upstream's ``run`` so that its ``preprocess_image`` uses the masks'
    union as alpha (and needs no background removal) when the picture has none."""
    return load_rgba(image, instance_masks(masks))


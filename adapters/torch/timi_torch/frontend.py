"""The front and back end every TIMI pipeline shares, whatever runs the denoising loop.

hy3dgen's PyTorch pipeline does what is not the DiT: image preprocessing, the DINOv2 conditioner
(with its classifier-free-guidance concatenation), the instance masks' geometry
(:func:`timi_torch.condition_token_masks`) and, after the loop, the ShapeVAE decoding and marching
cubes. ``timi_torch.TIMIPipeline`` and ``timi_jax.TIMIPipelineJAX`` both call

1. :func:`prepare_inputs`: images + masks -> :class:`PreparedInputs` (condition masks, the
   conditioner's tokens, the (B, K_max, M) mask batch of ``timi_core.stack_token_masks``);
2. their own denoising loop on hy3dgen's schedule (:func:`set_schedule`; the guided window from
   :func:`start_noise_levels`);
3. :func:`export_meshes`: latents -> meshes (the one call of hy3dgen's ``_export`` in the project).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import timi_core

from .masks import ConditionMasks, MultiViewConditionMasks, condition_token_masks

__all__ = ["OUTPUT_TYPES", "PreparedInputs", "NoSurfaceError", "as_batch", "check_output_type", "prepare_inputs",
           "set_schedule", "start_noise_levels", "export_meshes", "decode_volume", "surface_at_level"]

OUTPUT_TYPES = ("trimesh", "mesh", "latent")


class NoSurfaceError(RuntimeError):
    """Marching cubes found no surface in a decoded latent."""


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """Stage 1 of a call. ``cond``: hy3dgen's condition dict (``cond['main']`` is (2B, M, D) with
    CFG, conditional branch first); ``tokens``: (B, K_max, M) float32 condition-token masks on the
    pipeline's device."""

    condition_masks: list[ConditionMasks]
    cond: dict
    tokens: torch.Tensor
    batch_size: int
    do_classifier_free_guidance: bool

    @property
    def cond_main(self) -> torch.Tensor:
        """The conditional branch (B, M, D)."""
        return self.cond["main"][: self.batch_size]

    @property
    def uncond_main(self) -> Optional[torch.Tensor]:
        """The unconditional branch (B, M, D), ``None`` without CFG."""
        return self.cond["main"][self.batch_size:] if self.do_classifier_free_guidance else None


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} must be 'trimesh', 'mesh' or 'latent'.")


def as_batch(image, masks) -> tuple[list, list]:
    """``(images, mask_sets)``: one image and its masks, or lists of them (a batch)."""
    images, mask_sets = (image, masks) if isinstance(image, (list, tuple)) else ([image], [masks])
    if len(mask_sets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(mask_sets)} mask sets; pass one per image.")
    return list(images), list(mask_sets)


def prepare_inputs(base, image, masks, *, do_classifier_free_guidance: bool,
                   condition_masks: Optional[Callable] = None) -> PreparedInputs:
    """Stage 1: condition masks, the conditioner's tokens and the stacked mask batch.

    ``base``: a hy3dgen ``Hunyuan3DDiTFlowMatchingPipeline``; ``image``/``masks`` as
    ``TIMIPipeline.__call__`` (a mask set may also be a :class:`ConditionMasks` already computed
    for its image, which is then used as is). ``condition_masks(image, masks)``: how masks become
    :class:`ConditionMasks` (default :func:`condition_token_masks` with ``base``'s geometry).
    """
    images, mask_sets = as_batch(image, masks)
    make = condition_masks or (lambda im, ms: condition_token_masks(im, ms, base))
    cond_masks = [ms if isinstance(ms, (ConditionMasks, MultiViewConditionMasks)) else make(im, ms)
                  for im, ms in zip(images, mask_sets)]
    with torch.no_grad():
        cond_inputs = base.prepare_image([cm.image for cm in cond_masks])
        image_tensor = cond_inputs.pop("image")
        cond = base.encode_cond(image=image_tensor, additional_cond_inputs=cond_inputs,
                                do_classifier_free_guidance=do_classifier_free_guidance, dual_guidance=False)
    tokens = timi_core.stack_token_masks([cm.tokens for cm in cond_masks]).to(base.device)
    return PreparedInputs(cond_masks, cond, tokens, int(image_tensor.shape[0]), do_classifier_free_guidance)


def set_schedule(base, num_inference_steps: int, device=None, sigmas=None):
    """hy3dgen's timesteps for a call, set on its own scheduler exactly as
    ``Hunyuan3DDiTFlowMatchingPipeline.__call__`` sets them (``retrieve_timesteps`` with ``sigmas =
    linspace(0, 1, N)`` unless given; turbo's ``ConsistencyFlowMatchEulerDiscreteScheduler`` keeps
    only their count and picks its own PCM points). Returns ``(timesteps, N, step_sigmas)``:
    ``step_sigmas`` (N+1,) the noise levels the scheduler's Euler steps go between (its final 1
    included) and the timesteps as a tensor on ``device``."""
    import numpy as np
    from hy3dgen.shapegen.pipelines import retrieve_timesteps

    sigmas = np.linspace(0, 1, num_inference_steps) if sigmas is None else sigmas
    timesteps, n = retrieve_timesteps(base.scheduler, num_inference_steps, device, sigmas=sigmas)
    table = getattr(base.scheduler, "sigmas_", None)      # the consistency scheduler's step table
    return timesteps, n, base.scheduler.sigmas if table is None else table


def start_noise_levels(base, timesteps: torch.Tensor) -> list[float]:
    """The noise level (flow time, 0 = noise, 1 = data) each step starts at: ``timesteps /
    num_train_timesteps``, as the DiT sees it (the input of ``TIMIConfig.num_guided_steps``)."""
    return (timesteps.detach().double().cpu() / base.scheduler.config.num_train_timesteps).tolist()


def export_meshes(base, latents: torch.Tensor, output_type: str = "trimesh", *, box_v: float = 1.01,
                  mc_level: float = 0.0, num_chunks: int = 8000, octree_resolution: int = 384, mc_algo=None,
                  enable_pbar: bool = True) -> list:
    """Stage 3: hy3dgen's ShapeVAE decoding + surface extraction of (B, L, C) ``latents``.

    ``output_type``: ``"trimesh"`` or ``"mesh"`` (hy3dgen's raw outputs). Raises
    :class:`NoSurfaceError` when a sample has no surface at ``mc_level``.
    """
    if getattr(base, "grid_latent", False):            # TRELLIS stage 1: the decoder's occupancy logits
        meshes = base.export_meshes(latents)
    else:
        base.set_surface_extractor(mc_algo)
        with torch.no_grad():
            meshes = base._export(latents, "trimesh" if output_type == "trimesh" else "mesh", box_v, mc_level,
                                  num_chunks, octree_resolution, mc_algo, enable_pbar=enable_pbar)
    failed = [b for b, m in enumerate(meshes) if m is None]
    if failed:
        raise NoSurfaceError(f"surface extraction found no surface for sample(s) {failed} at mc_level={mc_level} "
                             f"(octree_resolution={octree_resolution}); try another mc_level or seed.")
    return meshes


def decode_volume(base, latents: torch.Tensor, *, box_v: float = 1.01, num_chunks: int = 8000,
                  octree_resolution: int = 384) -> torch.Tensor:
    """The first half of :func:`export_meshes`: hy3dgen's ShapeVAE decoding of (B, L, C) ``latents``
    to the (B, R+1, R+1, R+1) float32 occupancy logits on its whole query grid (hy3dgen's dense
    ``VanillaVolumeDecoder`` whatever ``vae.volume_decoder`` is: a coarse-to-fine grid is exact only
    near one iso level). With :func:`surface_at_level` it gives the same mesh as :func:`export_meshes`
    with dense decoding at any ``mc_level``, so one decoding serves many iso levels."""
    from .decoding import volume_decoder

    if getattr(base, "grid_latent", False):            # TRELLIS stage 1: (B, N, N, N) decoder logits
        return base.decode_volume(latents)
    vae = base.vae
    with torch.no_grad():
        decoded = vae(1.0 / vae.scale_factor * latents)
        return volume_decoder("dense")(decoded, vae.geo_decoder, bounds=box_v, num_chunks=num_chunks,
                                       octree_resolution=octree_resolution, enable_pbar=False)


def surface_at_level(base, grid_logits: torch.Tensor, level: float, *, box_v: float = 1.01,
                     octree_resolution: int = 384):
    """The second half of :func:`export_meshes` for one sample: the ``trimesh.Trimesh`` of the (R+1)^3
    ``grid_logits`` at iso level ``level`` (hy3dgen's surface extractor and trimesh export; inside is
    where the logit exceeds ``level``, so a higher level gives a smaller shape), or ``None`` when
    the level crosses no voxel."""
    import numpy as np
    from hy3dgen.shapegen.pipelines import export_to_trimesh

    if getattr(base, "grid_latent", False):
        return base.surface_at_level(grid_logits, level)
    lo, hi = float(grid_logits.min()), float(grid_logits.max())
    if not lo < level < hi:
        return None
    out = base.vae.surface_extractor(grid_logits[None], mc_level=float(level), bounds=box_v,
                                     octree_resolution=octree_resolution)[0]
    if out is None or len(out.mesh_f) == 0:
        return None
    out.mesh_f = np.ascontiguousarray(out.mesh_f)
    return export_to_trimesh(out)

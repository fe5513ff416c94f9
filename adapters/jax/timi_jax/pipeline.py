"""The JAX sampler behind the same front door as ``timi_torch.TIMIPipeline``.

hy3dgen's PyTorch pipeline keeps doing what is not the DiT: image preprocessing, the DINOv2
conditioner, the instance masks' geometry (``timi_torch.condition_token_masks``), the initial noise
(``prepare_latents`` with the caller's generator) and the ShapeVAE meshing. Only the denoising loop,
guidance included, runs in JAX: :func:`timi_jax.sample` on the DiT converted by
:func:`timi_jax.from_torch`. The call signature mirrors ``TIMIPipeline.__call__``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from timi_core import TIMIConfig

from .params import from_torch
from .sampler import SampleOutput, sample

__all__ = ["TIMIPipelineJAX"]


class TIMIPipelineJAX:
    """``TIMIPipelineJAX(base, config)``: ``base`` a loaded ``Hunyuan3DDiTFlowMatchingPipeline``.

    ``dtype``: the JAX DiT's compute/parameter dtype (default float32). ``mesh``: a
    :func:`timi_jax.data_parallel_mesh` to shard a batch of images over devices.
    """

    def __init__(self, base, config: TIMIConfig = TIMIConfig(), *, dtype=jnp.float32, mesh=None):
        self.base, self.config, self.mesh = base, config, mesh
        self.model = from_torch(base.model, dtype=dtype)
        self.last_output: SampleOutput | None = None
        self.diagnostics: list = []

    def __call__(self, image, masks, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 generator=None, output_type: str = "trimesh", latents=None, box_v: float = 1.01,
                 octree_resolution: int = 384, mc_level: float = 0.0, mc_algo=None,
                 num_chunks: int = 8000, enable_pbar: bool = False):
        """Sample shapes for ``image`` (or a list) and its instance ``masks`` (or a list);
        arguments as ``timi_torch.TIMIPipeline``. ``output_type``: ``'trimesh'``, ``'mesh'`` or
        ``'latent'`` (a torch tensor (B, L, C), like hy3dgen). The per-step ``L_sep`` values are
        in ``self.last_output.losses``."""
        import torch
        from timi_torch import TIMIPipeline, condition_token_masks

        if output_type not in ("trimesh", "mesh", "latent"):
            raise ValueError(f"output_type={output_type!r} must be 'trimesh', 'mesh' or 'latent'.")
        base = self.base
        images, mask_sets = (image, masks) if isinstance(image, (list, tuple)) else ([image], [masks])
        if len(mask_sets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(mask_sets)} mask sets; pass one "
                             "per image.")
        cond_masks = [condition_token_masks(im, ms, base) for im, ms in zip(images, mask_sets)]
        with torch.no_grad():
            inputs = base.prepare_image([cm.image for cm in cond_masks])
            image_tensor = inputs.pop("image")
            do_cfg = guidance_scale >= 0 and not self.model.guidance_embed
            cond = base.encode_cond(image=image_tensor, additional_cond_inputs=inputs,
                                    do_classifier_free_guidance=do_cfg, dual_guidance=False)["main"]
        batch = image_tensor.shape[0]
        tokens = TIMIPipeline._stack_tokens(cond_masks, "cpu")
        if latents is None:  # the torch pipeline's own noise: same generator, same latents
            latents = base.prepare_latents(batch, base.dtype, base.device, generator)

        def as_jax(t):
            return jnp.asarray(t.detach().float().cpu().numpy())

        out = sample(self.model, as_jax(latents), as_jax(cond[:batch]),
                     as_jax(cond[batch:]) if do_cfg else None, as_jax(tokens),
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     config=self.config,
                     num_train_timesteps=base.scheduler.config.num_train_timesteps,
                     shift=base.scheduler.config.get("shift", 1.0), mesh=self.mesh)
        self.last_output = out
        self.diagnostics = step_diagnostics(out, self.config, num_inference_steps)
        result = torch.from_numpy(np.array(out.latents.astype(jnp.float32))).to(
            device=base.device, dtype=base.dtype)
        if output_type == "latent":
            return result
        meshes = base._export(result, "trimesh" if output_type == "trimesh" else "mesh", box_v,
                              mc_level, num_chunks, octree_resolution, mc_algo,
                              enable_pbar=enable_pbar)
        failed = [b for b, m in enumerate(meshes) if m is None]
        if failed:
            raise RuntimeError(f"surface extraction found no surface for sample(s) {failed} at "
                               f"mc_level={mc_level}; try another mc_level or seed.")
        return meshes


def step_diagnostics(out: SampleOutput, config: TIMIConfig, num_inference_steps: int) -> list:
    """``timi_torch.StepDiagnostics`` (one per guided step) from a :class:`SampleOutput`."""
    from timi_torch import StepDiagnostics

    losses, scales, updates = (np.asarray(a, dtype=np.float64) for a in (out.losses, out.scales, out.max_updates))
    return [StepDiagnostics(i, i / max(num_inference_steps - 1, 1), losses[i].tolist(), scales[i].tolist(),
                            updates[i].tolist())
            for i in range(num_inference_steps) if config.guidance_active(i)]

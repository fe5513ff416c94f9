"""The JAX sampler behind the same front door as ``timi_torch.TIMIPipeline``.

hy3dgen's PyTorch pipeline keeps doing what is not the DiT, through the front and back end both
backends share (:mod:`timi_torch.frontend`): image preprocessing, the DINOv2 conditioner, the
instance masks' geometry, the initial noise (``prepare_latents`` with the caller's generator) and
the ShapeVAE meshing. Only the denoising loop, guidance included, runs in JAX:
:func:`timi_jax.sample` on the DiT converted by :func:`jax_dit` (hy3dgen 2.0's ``Hunyuan3DDiT`` or
Hunyuan3D 2.1's ``HunYuanDiTPlain``, whose pipeline is hy3dgen's around our torch DiT). The call
signature and the returned :class:`timi_core.TIMIPipelineOutput` are ``TIMIPipeline``'s.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np

from timi_core import StepDiagnostics, TIMIConfig, TIMIPipelineOutput
from timi_core.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, OCTREE_RESOLUTION

from .params import from_torch
from .sampler import SampleOutput, sample

__all__ = ["TIMIPipelineJAX", "jax_dit", "step_diagnostics", "scheduler_schedule"]


class TIMIPipelineJAX:
    """``TIMIPipelineJAX(base, config)``: ``base`` a loaded ``Hunyuan3DDiTFlowMatchingPipeline``
    (holding hy3dgen 2.0's DiT or 2.1's, ``timi_torch.hunyuan21.build_pipeline``).

    ``config``: the calls' default ``TIMIConfig`` (a call may pass its own; :meth:`with_config`
    gives a copy with another default). ``dtype``: the JAX DiT's compute/parameter dtype (default
    float32). ``mesh``: a :func:`timi_jax.data_parallel_mesh` to shard a batch of images over devices.
    """

    def __init__(self, base, config: TIMIConfig = TIMIConfig(), *, dtype=jnp.float32, mesh=None):
        self.base, self.config, self.mesh = base, config, mesh
        self.model = jax_dit(base.model, dtype=dtype)

    def with_config(self, config: TIMIConfig) -> "TIMIPipelineJAX":
        """A shallow copy (same hy3dgen pipeline, same JAX weights) whose calls default to ``config``."""
        other = copy.copy(self)
        other.config = config
        return other

    def num_guided_steps(self, num_inference_steps: int, config: TIMIConfig | None = None) -> int:
        """How many leading steps a call with ``num_inference_steps`` guides (as ``TIMIPipeline``'s)."""
        cfg = self.config if config is None else config
        timesteps, _ = scheduler_schedule(self.base, num_inference_steps)
        return cfg.num_guided_steps((np.asarray(timesteps, np.float64) / self.base.scheduler.config.num_train_timesteps).tolist())

    def __call__(self, image, masks, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 guidance_scale: float = GUIDANCE_SCALE, generator=None, output_type: str = "trimesh", latents=None,
                 box_v: float = 1.01, octree_resolution: int = OCTREE_RESOLUTION, mc_level: float = 0.0, mc_algo=None,
                 num_chunks: int = 8000, enable_pbar: bool = False, config: TIMIConfig | None = None,
                 recorder=None) -> TIMIPipelineOutput:
        """Sample shapes for ``image`` (or a list) and its instance ``masks`` (or a list); arguments
        and output as ``timi_torch.TIMIPipeline`` (``latents`` a torch tensor (B, L, C), like
        hy3dgen). ``recorder`` is not supported: the attention is recorded from the torch DiT."""
        import torch
        from timi_torch.frontend import check_output_type, export_meshes, prepare_inputs
        from timi_torch.memory import check_memory

        # 1. check the arguments
        check_output_type(output_type)
        check_memory(None if output_type == "latent" else octree_resolution, num_inference_steps, self.base.device)
        if recorder is not None:
            raise NotImplementedError("TIMIPipelineJAX records no attention; use timi_torch.TIMIPipeline "
                                      "with a recorder.")
        cfg = self.config if config is None else config
        base = self.base

        # 2. condition tokens and condition-token masks (shared front end)
        do_cfg = guidance_scale >= 0 and not self.model.guidance_embed
        inputs = prepare_inputs(base, image, masks, do_classifier_free_guidance=do_cfg)
        if latents is None:  # the torch pipeline's own noise: same generator, same latents
            latents = base.prepare_latents(inputs.batch_size, base.dtype, base.device, generator)

        # 3. the denoising loop, one compiled JAX program
        def as_jax(t):
            return jnp.asarray(t.detach().float().cpu().numpy())

        uncond = inputs.uncond_main
        out = sample(self.model, as_jax(latents), as_jax(inputs.cond_main),
                     as_jax(uncond) if uncond is not None else None, as_jax(inputs.tokens),
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, config=cfg,
                     num_train_timesteps=base.scheduler.config.num_train_timesteps,
                     schedule=scheduler_schedule(base, num_inference_steps), mesh=self.mesh)
        result = torch.from_numpy(np.array(out.latents.astype(jnp.float32))).to(
            device=base.device, dtype=base.dtype)

        # 4. meshes (shared back end)
        meshes = None
        if output_type != "latent":
            meshes = export_meshes(base, result, output_type, box_v=box_v, mc_level=mc_level, num_chunks=num_chunks,
                                   octree_resolution=octree_resolution, mc_algo=mc_algo, enable_pbar=enable_pbar)
        return TIMIPipelineOutput(meshes, result, step_diagnostics(out))


def jax_dit(torch_model, *, dtype=jnp.float32):
    """The Flax copy of a loaded torch DiT, by its family (``timi_torch.guidance.attention_site``):
    :class:`timi_jax.Hunyuan3DDiT` for hy3dgen 2.0's, :class:`timi_jax.hunyuan21.HunYuanDiTPlain` for 2.1's."""
    from timi_torch.guidance import SITES, attention_site

    if attention_site(torch_model) == SITES["2.1"]:
        from .hunyuan21.params import from_torch as from_torch21

        return from_torch21(torch_model, dtype=dtype)
    return from_torch(torch_model, dtype=dtype)


def scheduler_schedule(base, num_inference_steps: int):
    """``(timesteps (N,), sigmas (N+1,))`` numpy arrays, set by hy3dgen's own scheduler exactly as its
    pipeline sets them (:func:`timi_torch.frontend.set_schedule`): the flow-matching scheduler's
    float32 arrays or the turbo consistency scheduler's float64 ones."""
    from timi_torch.frontend import set_schedule

    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a whole number of at least 1.")
    timesteps, _, sigmas = set_schedule(base, int(num_inference_steps), "cpu")
    return timesteps.cpu().numpy(), sigmas.cpu().numpy()


def step_diagnostics(out: SampleOutput) -> list[StepDiagnostics]:
    """``StepDiagnostics`` (one per guided step, the first ``out.num_guided``) from a :class:`SampleOutput`."""
    rows = [np.asarray(a, dtype=np.float64) for a in (out.losses, out.scales, out.max_updates, out.common_gradients,
                                                     out.common_smoothed, out.common_updates)]
    times = out.times if out.times is not None else np.zeros(len(rows[0]))
    return [StepDiagnostics(i, float(times[i]), *(r[i].tolist() for r in rows)) for i in range(out.num_guided)]

"""``TrellisPipeline``: image + masks -> TRELLIS stage-1 structure -> mesh, with TIMI, for ``timi generate``.

A TRELLIS folder in upstream's layout (``pipeline.json`` naming ``sparse_structure_flow_model`` and
``sparse_structure_decoder`` checkpoints, :mod:`timi_torch.trellis.params`) plus the image conditioner
it was trained with, in hy3dgen's format: ``conditioner.json`` (``{"conditioner": <hy3dgen config
section>, "image_processor": <section>}``) and ``conditioner.safetensors``. Upstream's released
folder has no such files (its DINOv2 ViT-L/14-reg comes from ``torch.hub``): run it through
upstream's own pipeline with :func:`timi_torch.trellis.guide` instead. The grid testbed
(``--model trellis-testbed``) is such a folder.

The pipeline has the surface the application reads from ``timi_torch.TIMIPipeline`` (``base`` with
``model``, ``conditioner``, ``image_processor``, ``prepare_image``, ``encode_cond``; ``__call__``
returning a ``TIMIPipelineOutput``; ``num_guided_steps``; ``condition_masks``), so the condition
masks are computed by the one door ``timi_torch.condition_token_masks`` and the front end
``timi_torch.frontend.prepare_inputs``. A call runs in stages: 1. inputs (condition tokens, masks);
2. noise from ``generator``; 3. :func:`timi_torch.trellis.sample` (upstream's sampler, TIMI in the
guided window); 4. meshes from the decoder's logits (:meth:`export_meshes`).

``guidance_scale`` is hy3dgen's ``w`` (``v = u + w (c - u)``): TRELLIS's CFG ``(1 + s) c - s u`` is the
same with ``s = w - 1``, so ``--guidance-scale`` means one thing on both families.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from timi_core import TIMIConfig, TIMIPipelineOutput

from ..frontend import check_output_type, prepare_inputs
from ..guidance import MODES
from ..masks import condition_token_masks
from .decoding import occupancy_mesh
from .params import load_stage1
from .sampler import SamplerSettings, flow_times, sample

__all__ = ["TrellisPipeline", "CONDITIONER_FILE", "CONDITIONER_WEIGHTS", "is_trellis_folder"]

CONDITIONER_FILE, CONDITIONER_WEIGHTS = "conditioner.json", "conditioner.safetensors"


def is_trellis_folder(path) -> bool:
    """Whether ``path`` is a folder in TRELLIS's layout (holds ``pipeline.json``)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    return p.is_dir() and (p / "pipeline.json").is_file()


def _hy3dgen_method(name: str):
    from hy3dgen.shapegen.pipelines import Hunyuan3DDiTPipeline

    return getattr(Hunyuan3DDiTPipeline, name)


class TrellisPipeline:
    """TIMI on TRELLIS's stage 1 (see the module docstring). ``flow``: a ``SparseStructureFlowModel``;
    ``decoder``: latent -> (B, 1, N, N, N) occupancy logits; ``conditioner`` / ``image_processor``:
    hy3dgen's (``SingleImageEncoder``, ``ImageProcessorV2``); ``box``: half the side of the cube the
    occupancy grid covers (upstream: 0.5)."""

    grid_latent = True

    def __init__(self, flow, decoder, conditioner, image_processor, settings: SamplerSettings = SamplerSettings(),
                 config: TIMIConfig = TIMIConfig.paper(), attention: str = "fused", box: float = 0.5):
        if attention not in MODES:
            raise ValueError(f"attention={attention!r} must be one of {MODES}.")
        self.model, self.decoder, self.conditioner, self.image_processor = flow, decoder, conditioner, image_processor
        self.settings, self.config, self.attention, self.box = settings, config, attention, float(box)
        self.gradient_hook: Optional[Callable] = None

    # ---------------------------------------------------------------- what the app reads
    @property
    def base(self) -> "TrellisPipeline":
        """The pipeline itself: the application reads ``pipe.base.model`` etc. as on hy3dgen's."""
        return self

    family = "trellis"
    vae = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def prepare_image(self, image) -> dict:
        return _hy3dgen_method("prepare_image")(self, image)

    def encode_cond(self, image, additional_cond_inputs, do_classifier_free_guidance, dual_guidance):
        return _hy3dgen_method("encode_cond")(self, image, additional_cond_inputs, do_classifier_free_guidance,
                                              dual_guidance)

    def prepare_latents(self, batch_size: int, dtype, device, generator) -> torch.Tensor:
        """Starting noise (B, C, R, R, R) from ``generator`` (hy3dgen's signature)."""
        shape = (batch_size, self.model.in_channels) + (self.model.resolution,) * 3
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    #: the model's timestep at pure noise (``1000 t`` with ``t = 1``)
    noise_timestep = 1000.0

    def with_config(self, config: TIMIConfig) -> "TrellisPipeline":
        other = copy.copy(self)
        other.config = config
        return other

    def condition_masks(self, image, masks, names=None):
        return condition_token_masks(image, masks, self, names=names)

    def _settings(self, num_inference_steps, guidance_scale) -> SamplerSettings:
        changes = {}
        if num_inference_steps is not None:
            changes["steps"] = int(num_inference_steps)
        if guidance_scale is not None:
            changes["cfg_strength"] = float(guidance_scale) - 1.0
        return dataclasses.replace(self.settings, **changes)

    def num_guided_steps(self, num_inference_steps: Optional[int] = None, config: Optional[TIMIConfig] = None,
                         sigmas=None) -> int:
        cfg = self.config if config is None else config
        settings = self._settings(num_inference_steps, None)
        return cfg.num_guided_steps(1.0 - flow_times(settings.steps, settings.rescale_t)[:-1])

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path, config: TIMIConfig = TIMIConfig.paper(), *, device="cpu", attention: str = "fused"):
        """Load a TRELLIS folder that carries its conditioner (module docstring). ``config``: the calls'
        default, the paper's literal form on TRELLIS (docs/results.md: the rule chose it)."""
        from hy3dgen.shapegen.pipelines import instantiate_from_config
        from safetensors.torch import load_file

        folder = Path(os.path.expanduser(os.fspath(path)))
        flow, decoder, settings = load_stage1(folder, device)
        spec_file = folder / CONDITIONER_FILE
        if not spec_file.is_file() or not (folder / CONDITIONER_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{folder} has no {CONDITIONER_FILE} + {CONDITIONER_WEIGHTS}: `timi generate` runs TRELLIS folders that "
                "carry their image conditioner (the grid testbed); for upstream's released model use "
                "timi_torch.trellis.guide(pipeline, ...) on TRELLIS's own pipeline (docs/trellis.md).")
        spec = json.loads(spec_file.read_text())
        conditioner = instantiate_from_config(copy.deepcopy(spec["conditioner"]))
        conditioner.load_state_dict({k: v.float() for k, v in load_file(str(folder / CONDITIONER_WEIGHTS)).items()})
        processor = instantiate_from_config(copy.deepcopy(spec["image_processor"]))
        box = json.loads((folder / "pipeline.json").read_text())["args"].get("box", 0.5)
        decoder = decoder.convert_to_fp32() if hasattr(decoder, "convert_to_fp32") else decoder.float()
        return cls(flow.convert_to_fp32(), decoder, conditioner.to(device).eval(), processor, settings, config,
                   attention, box)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(self, image, masks, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 generator=None, output_type: str = "trimesh", callback: Optional[Callable] = None,
                 callback_steps: int = 1, enable_pbar: bool = True, latents: Optional[torch.Tensor] = None,
                 config: Optional[TIMIConfig] = None, recorder=None, **_unused) -> TIMIPipelineOutput:
        """Sample the stage-1 structure of ``image`` with its instances kept apart (TIMI); arguments as
        ``timi_torch.TIMIPipeline.__call__`` (``num_inference_steps`` / ``guidance_scale`` default to
        the folder's ``pipeline.json``). ``recorder``: as ``TIMIPipeline``'s (the first guided layers'
        cross-attention of each step's conditional forward)."""
        # 1. inputs: condition tokens and the masks on them (the shared front end)
        check_output_type(output_type)
        cfg = self.config if config is None else config
        settings = self._settings(num_inference_steps, guidance_scale)
        inputs = prepare_inputs(self, image, masks, do_classifier_free_guidance=True,
                                condition_masks=self.condition_masks)
        # 2. noise
        noise = (self.prepare_latents(inputs.batch_size, torch.float32, self.device, generator) if latents is None
                 else latents.float())
        # 3. upstream's sampler, TIMI in the guided window
        latents, diagnostics, recordings = self._sample(noise, inputs, cfg, settings, callback, callback_steps,
                                                        enable_pbar, recorder)
        # 4. meshes
        meshes = None if output_type == "latent" else self.export_meshes(latents)
        return TIMIPipelineOutput(meshes, latents, diagnostics, recordings)

    def _sample(self, noise, inputs, config, settings, callback, callback_steps, enable_pbar, recorder):
        """Stage 3 of a call: ``(latents, diagnostics, recordings)`` from :func:`timi_torch.trellis.sample`
        (``timi_jax.trellis.TrellisPipelineJAX`` runs the JAX sampler here instead)."""
        step_callback = None
        if callback is not None:
            def step_callback(i, t, x):
                if i % callback_steps == 0:
                    callback(i, t, x)
        out = sample(self.model, noise, inputs.cond_main.float(), inputs.uncond_main.float(), tokens=inputs.tokens,
                     config=config, settings=settings, attention=self.attention, gradient_hook=self.gradient_hook,
                     callback=step_callback, enable_pbar=enable_pbar, recorder=recorder)
        return out.latents, out.diagnostics, list(recorder.records) if recorder is not None else None

    # ---------------------------------------------------------------- decoding
    def decode_volume(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, N, N) float32 occupancy logits of the decoder."""
        with torch.no_grad():
            return self.decoder(latents.float())[:, 0].float()

    def surface_at_level(self, grid_logits: torch.Tensor, level: float):
        """The mesh of one (N, N, N) logit grid at iso level ``level``, or ``None`` when it crosses no voxel."""
        lo, hi = float(grid_logits.min()), float(grid_logits.max())
        if not lo < level < hi:
            return None
        return occupancy_mesh(grid_logits - level, bounds=self.box)

    def export_meshes(self, latents: torch.Tensor) -> list:
        """One mesh (level 0 of the decoder's logits) per sample; ``None`` for a sample with no occupied voxel."""
        return [occupancy_mesh(g, bounds=self.box) for g in self.decode_volume(latents)]


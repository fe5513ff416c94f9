"""``TIMIPipeline``: hy3dgen's Hunyuan3D-DiT flow-matching sampler with TIMI guidance.

One denoising loop in diffusers style that reuses the wrapped hy3dgen pipeline's scheduler,
conditioner, image processor, DiT and ShapeVAE. A call runs in numbered stages: check the
arguments; condition tokens and masks (:func:`timi_torch.frontend.prepare_inputs`, shared with
``timi_jax``); timesteps and noise; the loop; meshes (:func:`timi_torch.frontend.export_meshes`).
It returns a :class:`timi_core.TIMIPipelineOutput` and keeps nothing on the pipeline; the
``TIMIConfig`` may be the call's own. Per step ``i`` (paper Sec. 4, Fig. 2):

1. if step ``i`` lies in the guided window (``config.num_guided_steps`` of the scheduler's noise
   levels: the paper's first 30 % of the trajectory by default): ISG (Eqs.2-4, :mod:`timi_torch.guidance`) on the conditional
   branch gives ``dL_sep/dz``; SGU (Eqs.5-7, ``timi_core.sgu_update``, smoothing along the latent
   token axis ``axes=(1,)``) updates ``z_t``, all in float32;
2. hy3dgen's classifier-free-guidance step on the (updated) latent, with hy3dgen's scheduler
   (its ``FlowMatchEulerDiscreteScheduler`` or turbo's ``ConsistencyFlowMatchEulerDiscreteScheduler``,
   whichever the model's ``config.yaml`` names; their ``step`` is called as hy3dgen calls it).

Guidance-distilled DiTs (``guidance_embed=True``: the fast and turbo models) have no CFG batch;
hy3dgen passes them ``guidance=torch.tensor([guidance_scale] * B)`` in the model dtype, and so does
this loop, in the sampling forward and in the guidance pass (which then runs on the single branch).

Float32 master latent: when some step is guided (``num_guided > 0``) the loop carries ``z_t`` in float32
for the whole run, whatever the model's dtype. The DiT sees ``z_t`` cast to the model dtype; the
guided update is applied to the float32 latent; the Euler step is hy3dgen's
``scheduler.step`` (which also keeps its step index) on the float32 latent and the float32 velocity,
i.e. ``z + (sigma_next - sigma) * v.float()`` with no cast back. Only the returned latents are
cast to the model dtype, once, at the very end (hy3dgen's output dtype; its VAE runs in that dtype).
So a guided update far below the model dtype's spacing (the first momentum step moves ``z`` by at
most ``(1 - beta) * alpha * std(z)``, 0.01 std(z) with the paper's values) is not rounded away in
float16/bfloat16. For float32 models this is exactly the previous computation.

With guidance off the loop performs exactly hy3dgen's operations in the model dtype, so the latents
equal ``Hunyuan3DDiTFlowMatchingPipeline.__call__``'s bit for bit (tested on CPU in float32 and
bfloat16).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from timi_core import StepDiagnostics, TIMIConfig, TIMIPipelineOutput
from timi_core.defaults import DECODING, GUIDANCE_SCALE, NUM_INFERENCE_STEPS, OCTREE_RESOLUTION, default_threads

from .decoding import set_decoding
from .frontend import check_output_type, export_meshes, prepare_inputs, set_schedule, start_noise_levels
from .guidance import MODES, SITES, attention_site, guidable_layers, guided_update, observed
from .hunyuan21 import FAMILY as HY21_FAMILY, SUBFOLDER as HY21_SUBFOLDER, build_pipeline, is_hunyuan21
from .masks import ConditionMasks, condition_token_masks

__all__ = ["TIMIPipeline", "TIMIPipelineOutput", "StepDiagnostics", "ModelLoadError", "torch_threads"]

DEFAULT_SUBFOLDER = "hunyuan3d-dit-v2-0"


def default_subfolder(model_id: str) -> str:
    """hy3dgen's subfolder of a model id: ``hunyuan3d-dit-v2-1`` for ``*/Hunyuan3D-2.1``, else 2.0's."""
    return HY21_SUBFOLDER if model_id.rstrip("/").split("/")[-1] == HY21_FAMILY else DEFAULT_SUBFOLDER


def _from_files(cfg: Path, ckpt: Path, device, dtype, **kwargs):
    """A hy3dgen pipeline from ``config.yaml`` and a checkpoint: hy3dgen's loader, or for a
    Hunyuan3D 2.1 config :func:`timi_torch.hunyuan21.build_pipeline`."""
    import yaml
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline as Base

    config = yaml.safe_load(Path(cfg).read_text())
    if is_hunyuan21(config):
        return build_pipeline(config, ckpt, device=device, dtype=dtype, **kwargs)
    return Base.from_single_file(str(ckpt), str(cfg), device=device, dtype=dtype,
                                 use_safetensors=Path(ckpt).suffix == ".safetensors", **kwargs)


class ModelLoadError(ValueError):
    """hy3dgen could not build the pipeline from a model's files (config.yaml and weights disagree)."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with ``n`` torch intra-op threads (``None``: as set), restoring the previous number afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _on_its_threads(call):
    """A pipeline method run on the pipeline's ``num_threads`` (:func:`torch_threads`)."""
    @functools.wraps(call)
    def run(self, *args, **kwargs):
        with torch_threads(self.num_threads):   # timi_core.defaults: as timi generate --threads
            return call(self, *args, **kwargs)
    return run


def _check_config(config) -> None:
    if not isinstance(config, TIMIConfig):
        raise TypeError(f"config must be a timi_core.TIMIConfig, got {type(config).__name__}.")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_call_args(num_inference_steps, guidance_scale, octree_resolution, sigmas, meshes: bool = True,
                     device=None) -> None:
    """The sampler's numeric arguments, checked as ``timi generate`` checks its options, and what
    they need in memory (:func:`timi_torch.memory.check_memory`) before anything is allocated."""
    import numbers

    from .memory import check_memory

    if sigmas is None and (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
                           or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a whole number of at least 1.")
    if not np.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number.")
    if octree_resolution is None or int(octree_resolution) < 8:
        raise ValueError(f"octree_resolution={octree_resolution!r} must be at least 8.")
    check_memory(int(octree_resolution) if meshes else None,
                 len(sigmas) if num_inference_steps is None else int(num_inference_steps), device)


class TIMIPipeline:
    """TIMI multi-instance image-to-3D sampling on a loaded hy3dgen pipeline.

    >>> from timi_torch import TIMIPipeline                                  # doctest: +SKIP
    >>> pipe = TIMIPipeline.from_pretrained()           # the shipped testbed model  # doctest: +SKIP
    >>> pipe = TIMIPipeline.from_pretrained("tencent/Hunyuan3D-2")           # doctest: +SKIP
    >>> out = pipe("scene.png", masks, generator=torch.manual_seed(0))       # doctest: +SKIP
    >>> mesh, steps = out.meshes[0], out.diagnostics                         # doctest: +SKIP

    ``base``: a ``hy3dgen.shapegen.Hunyuan3DDiTFlowMatchingPipeline``; ``config``: the default
    ``timi_core.TIMIConfig`` of the calls (paper defaults); a call may pass its own ``config``, and
    :meth:`with_config` gives a copy with another default. A call returns a
    :class:`timi_core.TIMIPipelineOutput`; the pipeline keeps no state between calls.
    ``gradient_hook(grad, step) -> grad``: optional, applied to ``dL_sep/dz`` (B, L, C) float32 of
    each guided step before SGU (Eqs.5-7); for controls such as ``timi.testbed.controls``.
    ``num_threads``: the torch intra-op threads its calls run on (``None``: as torch is set);
    :meth:`from_pretrained` chooses it as ``timi generate --threads`` does (``timi_core.defaults``).
    ``token_positions(x1) -> (B, L, D)``: optional, the latent tokens' positions in space read from
    a clean latent ``x1`` (B, L, C); needed by ``TIMIConfig(smoothing="positions")`` (Eq.5 over
    positions; ``smoothing="decoder"`` reads them from the VAE decoder instead,
    :class:`timi_torch.positions.DecoderAttentionPositions`). A guided step passes the reader the sampler's latest clean-latent prediction
    ``x1 = z + (1 - sigma) v`` (flow time ``sigma``, velocity ``v`` after CFG): the previous step's,
    and at the first step that of one extra forward at the starting noise.
    """

    def __init__(self, base, config: TIMIConfig = TIMIConfig(), attention: str = "fused",
                 gradient_hook: Optional[Callable] = None, token_positions: Optional[Callable] = None,
                 num_threads: Optional[int] = None):
        try:
            attention_site(getattr(base, "model", None))
        except TypeError:
            raise TypeError("TIMIPipeline needs a loaded hy3dgen Hunyuan3DDiTFlowMatchingPipeline (with a "
                            "Hunyuan3DDiT or Hunyuan3D 2.1 HunYuanDiTPlain `model`), got "
                            f"{type(base).__name__}.") from None
        _check_config(config)
        if attention not in MODES:
            raise ValueError(f"attention={attention!r} must be one of {MODES}.")
        self.base = base
        self.config = config
        self.attention = attention
        self.gradient_hook = gradient_hook
        self.token_positions = token_positions
        self.num_threads = num_threads

    def with_config(self, config: TIMIConfig) -> "TIMIPipeline":
        """A shallow copy (same hy3dgen pipeline and weights) whose calls default to ``config``."""
        _check_config(config)
        other = copy.copy(self)
        other.config = config
        return other

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path=None, config: TIMIConfig = TIMIConfig(), *, device=None, dtype=None,
                        subfolder: Optional[str] = None, variant: Optional[str] = "fp16",
                        use_safetensors: bool = True, config_path=None, attention: str = "fused",
                        decoding: Optional[str] = DECODING, num_threads: Optional[int] = None,
                        **kwargs) -> "TIMIPipeline":
        """Load through hy3dgen's own loaders and wrap.

        ``path`` may be (a) a model directory holding ``config.yaml`` and ``model[.variant]
        .safetensors``; (b) a single checkpoint file (then ``config_path`` is required); or (c) a
        hy3dgen model id such as ``"tencent/Hunyuan3D-2"``, resolved by hy3dgen as
        ``$HY3DGEN_MODELS/<path>/<subfolder>`` (default ``~/.cache/hy3dgen``) and otherwise the hub
        (``subfolder`` default: ``hunyuan3d-dit-v2-1`` for ``*/Hunyuan3D-2.1``, whose models are
        only looked up locally, else ``hunyuan3d-dit-v2-0``);
        (d) ``None``: the small model shipped with the project (``timi.testbed.default_model_path()``;
        the application resolves ``--model`` through ``timi.pipelines.resolve_model``).
        A folder whose ``config.yaml`` names Hunyuan3D 2.1's ``HunYuanDiTPlain`` is built by
        :func:`timi_torch.hunyuan21.build_pipeline` (its ``model.fp16.ckpt`` is used when the
        ``.safetensors`` file is absent). ``device`` defaults to CUDA when available; ``dtype`` to
        float16 on CUDA, float32 on CPU.
        ``decoding``: the volume decoding of its meshes (``timi_core.defaults.DECODING``, coarse-to-fine
        as ``timi generate``; ``"dense"``: hy3dgen's; ``None``: leave the loaded VAE's). ``num_threads``:
        the torch threads its calls run on; default as ``timi generate --threads``: 1 for a checkpoint
        below ``timi_core.defaults.SMALL_MODEL_BYTES`` (the shipped model), else all usable cores.
        Raises ``FileNotFoundError`` for missing files and :class:`ModelLoadError` when hy3dgen
        cannot build the model from them.
        """
        import yaml

        if path is None:
            from timi.testbed import default_model_path

            path = default_model_path()
        try:
            base, ckpt = cls._load_base(path, device, dtype, subfolder, variant, use_safetensors, config_path, **kwargs)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, ImportError, yaml.YAMLError) as e:
            raise ModelLoadError(f"could not build the model from {os.fspath(path)!r} ({_one_line(e)}); its "
                                 "config.yaml is incomplete or does not match the weights - restore the model's "
                                 "files.") from e
        set_decoding(base, decoding)
        if num_threads is None:
            num_threads = default_threads(ckpt.stat().st_size if ckpt is not None and ckpt.is_file() else None)
        return cls(base, config=config, attention=attention, num_threads=num_threads)

    @staticmethod
    def _load_base(path, device, dtype, subfolder, variant, use_safetensors, config_path, **kwargs):
        """(hy3dgen's pipeline, the checkpoint file it was read from, or ``None`` when not known)."""
        from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline as Base

        device = device or _default_device()
        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        ext = "safetensors" if use_safetensors else "ckpt"
        ckpt_name = f"model{'' if variant is None else '.' + variant}.{ext}"
        p = Path(os.path.expanduser(os.fspath(path)))
        subfolder = subfolder or default_subfolder(os.fspath(path))
        if p.is_dir():
            cfg, ckpt = p / "config.yaml", p / ckpt_name
            other = ckpt.with_suffix(".ckpt" if use_safetensors else ".safetensors")
            if not ckpt.is_file() and other.is_file():
                ckpt = other                              # e.g. 2.1's model.fp16.ckpt
            missing = [str(f) for f in (cfg, ckpt) if not f.is_file()]
            if missing:
                present = sorted(f.name for f in p.iterdir())
                raise FileNotFoundError(
                    f"model directory {p} lacks {missing} (it holds {present}); hy3dgen needs config.yaml "
                    f"and {ckpt_name} (choose the file with variant=... / use_safetensors=...).")
            return _from_files(cfg, ckpt, device, dtype, **kwargs), ckpt
        elif p.suffix in (".safetensors", ".ckpt"):
            if config_path is None or not Path(config_path).is_file():
                raise FileNotFoundError(f"a single-file checkpoint needs config_path=<its config.yaml>; got {config_path!r}.")
            if not p.is_file():
                raise FileNotFoundError(f"checkpoint file {p} does not exist.")
            return _from_files(Path(config_path), p, device, dtype, **kwargs), p
        else:
            root = os.environ.get("HY3DGEN_MODELS", "~/.cache/hy3dgen")
            local = Path(os.path.expanduser(os.path.join(root, os.fspath(path), subfolder)))
            if subfolder == HY21_SUBFOLDER:
                if not local.is_dir():
                    raise FileNotFoundError(f"could not load {os.fspath(path)!r}: no local model at {local} (Hunyuan3D "
                                            "2.1 models are not downloaded); put it there, set HY3DGEN_MODELS, "
                                            "or pass the model directory.")
                return TIMIPipeline._load_base(local, device, dtype, subfolder, variant, use_safetensors, None, **kwargs)
            if local.is_dir() and not (local / ckpt_name).is_file():
                raise FileNotFoundError(f"{local} exists but holds no {ckpt_name} "
                                        f"(it holds {sorted(f.name for f in local.iterdir())}).")
            try:
                base = Base.from_pretrained(os.fspath(path), device=device, dtype=dtype, subfolder=subfolder,
                                            variant=variant, use_safetensors=use_safetensors, **kwargs)
            except Exception as e:  # hy3dgen falls back to a hub download, which may fail opaquely
                if local.is_dir():
                    raise
                raise FileNotFoundError(
                    f"could not load {os.fspath(path)!r}: no local model at {local} and the hub download "
                    f"failed ({_one_line(e)}). Put the model there, set HY3DGEN_MODELS, or pass "
                    "a model directory.") from e
            return base, local / ckpt_name

    # ------------------------------------------------------------------ helpers
    @property
    def family(self) -> str:
        """``"2.0"`` (hy3dgen's ``Hunyuan3DDiT``, every Hunyuan3D-2 variant) or ``"2.1"``."""
        return next(name for name, site in SITES.items() if site == attention_site(self.base.model))

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def condition_masks(self, image, masks, names=None) -> ConditionMasks:
        """:func:`timi_torch.condition_token_masks` with this pipeline's processor and conditioner."""
        return condition_token_masks(image, masks, self.base, names=names)

    def num_guided_steps(self, num_inference_steps: int, config: Optional[TIMIConfig] = None, sigmas=None) -> int:
        """How many leading steps a call with ``num_inference_steps`` guides (``config``: default
        ``self.config``): ``TIMIConfig.num_guided_steps`` on this model's scheduler's schedule."""
        cfg = self.config if config is None else config
        timesteps, _, _ = set_schedule(self.base, num_inference_steps, "cpu", sigmas)
        return cfg.num_guided_steps(start_noise_levels(self.base, timesteps))

    def _guided_layers(self, config: TIMIConfig) -> int:
        depth = guidable_layers(self.base.model)
        n = config.guided_layers
        if n > depth:
            warnings.warn(f"TIMIConfig.guided_layers={n} exceeds the model's {depth} guidable blocks; "
                          f"guiding all {depth}.", stacklevel=3)
        return min(n, depth)

    def guide(self, latents, timestep, cond_main, tokens, momentum=None, *, step: int = 0,
              config: Optional[TIMIConfig] = None, guidance: Optional[torch.Tensor] = None,
              positions: Optional[torch.Tensor] = None):
        """One ISG + SGU update (Eqs.2-7) of ``latents`` (B, L, C) -> (latents, momentum, diagnostics).

        ``latents`` in any dtype; the returned latents are float32 (``latents`` upcast minus the
        float32 momentum), not rounded to the model dtype. ``config``: default ``self.config``.
        ``guidance``: the (B,) guidance-scale tensor of a guidance-distilled DiT
        (``guidance_embed=True``), passed to its forward as hy3dgen's pipeline passes it.
        ``positions``: the tokens' positions (B, L, D) when ``config.needs_positions`` (Eq.5 over positions).
        """
        cfg = self.config if config is None else config
        distilled = bool(getattr(self.base.model, "guidance_embed", False))
        if distilled and guidance is None:
            raise ValueError("this DiT is guidance-distilled (guidance_embed=True): pass guidance=<(B,) scale tensor>.")
        model_kwargs = {"guidance": guidance} if distilled else {}
        return guided_update(self.base.model, latents, timestep, cond_main, tokens, momentum, cfg,
                             self._guided_layers(cfg), self.attention, step=step, gradient_hook=self.gradient_hook,
                             positions=positions, model_kwargs=model_kwargs)

    # ------------------------------------------------------------------ sampling
    def position_reader(self, cfg: TIMIConfig) -> Callable:
        """The tokens' positions for Eq.5 over positions: the latents' own (``smoothing="positions"``,
        ``token_positions``) or the VAE decoder's attention (``"decoder"``, any hy3dgen model)."""
        if cfg.smoothing == "decoder":
            from .positions import DecoderAttentionPositions

            return DecoderAttentionPositions(self.base.vae)
        if self.token_positions is None:
            raise ValueError("TIMIConfig.smoothing='positions' needs a pipeline that can read the latent tokens' "
                             "positions (TIMIPipeline(token_positions=...)); this model's pipeline has none - "
                             "use smoothing='decoder' (positions from the VAE decoder) or 'tokens'.")
        return self.token_positions

    def _velocity(self, latents, t, cond, do_cfg: bool, guidance_scale: float, guidance):
        """hy3dgen's velocity at ``latents`` (cast to the model dtype), after classifier-free guidance."""
        base = self.base
        model_latents = latents.to(base.dtype)                  # no-op without guidance
        latent_model_input = torch.cat([model_latents] * 2) if do_cfg else model_latents
        timestep = t.expand(latent_model_input.shape[0]).to(base.dtype) / base.scheduler.config.num_train_timesteps
        noise_pred = base.model(latent_model_input, timestep, cond, guidance=guidance)
        if do_cfg:
            noise_pred_cond, noise_pred_uncond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        return noise_pred

    @torch.no_grad()
    def clean_prediction(self, latents, t, cond, do_cfg: bool = True, guidance_scale: float = 5.0, guidance=None):
        """``x1 = z + (1 - sigma) v`` (float32): the clean latent the sampler predicts from ``latents``
        at the scheduler timestep ``t`` (flow time ``sigma = t / num_train_timesteps``), ``v`` the
        velocity after classifier-free guidance (``cond``: the conditional and unconditional tokens
        when ``do_cfg``, as hy3dgen batches them)."""
        sigma = float(t) / self.base.scheduler.config.num_train_timesteps
        v = self._velocity(latents, t, cond, do_cfg, guidance_scale, guidance)
        return latents.to(torch.float32) + (1.0 - sigma) * v.to(torch.float32)

    @_on_its_threads
    @torch.no_grad()
    def __call__(self, image, masks, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 guidance_scale: float = GUIDANCE_SCALE, generator=None, output_type: str = "trimesh",
                 callback: Optional[Callable] = None, callback_steps: int = 1, sigmas=None, box_v: float = 1.01,
                 octree_resolution: int = OCTREE_RESOLUTION,
                 mc_level: float = 0.0, mc_algo=None, num_chunks: int = 8000, enable_pbar: bool = True,
                 latents: Optional[torch.Tensor] = None, config: Optional[TIMIConfig] = None,
                 recorder=None) -> TIMIPipelineOutput:
        """Sample 3D shapes of ``image`` with its instances kept apart (TIMI).

        ``image``: a path, PIL image or (H, W, 3|4) array (or a list of them, a batch);
        ``masks``: its instance masks, see :func:`timi_torch.condition_token_masks`, or the
        :class:`ConditionMasks` already computed for the image (a list, one per image, for a
        batch). Other arguments as in hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline``;
        ``callback(step, t, scheduler_output)`` is called every ``callback_steps`` steps (with
        guidance on, ``scheduler_output.prev_sample`` is the float32 master latent).
        ``output_type``: ``"trimesh"`` (meshes), ``"mesh"`` (hy3dgen's raw outputs) or ``"latent"``
        (no meshes). ``config``: this call's ``TIMIConfig`` (default ``self.config``).
        ``recorder``: an observer of the denoiser's conditional forward (the hook behind
        ``timi.report.AttentionRecorder``): for each step ``i`` with ``recorder.wants(i)``, the
        first ``recorder.layers`` guided layers call ``recorder.observe(i, layer, q_z, k)`` (latent
        queries, keys with the condition tokens first); its
        ``records`` become the output's ``recordings``.

        Returns a :class:`timi_core.TIMIPipelineOutput`: ``meshes`` (None for ``"latent"``), the
        (B, L, C) ``latents`` in the model's dtype, one ``StepDiagnostics`` per guided step, and
        ``recordings``.
        """
        # 1. check the arguments
        check_output_type(output_type)
        _check_call_args(num_inference_steps, guidance_scale, octree_resolution, sigmas,
                         meshes=output_type != "latent", device=self.base.device)
        cfg = self.config if config is None else config
        _check_config(cfg)
        base = self.base
        base.set_surface_extractor(mc_algo)
        device, dtype = base.device, base.dtype

        # 2. condition tokens and condition-token masks (shared front end)
        do_cfg = guidance_scale >= 0 and not getattr(base.model, "guidance_embed", False)
        inputs = prepare_inputs(base, image, masks, do_classifier_free_guidance=do_cfg,
                                condition_masks=self.condition_masks)
        batch_size, cond = inputs.batch_size, inputs.cond

        # 3. timesteps and initial latents (hy3dgen's)
        timesteps, num_inference_steps, _ = set_schedule(base, num_inference_steps, device, sigmas)
        if latents is None:
            latents = base.prepare_latents(batch_size, dtype, device, generator)
        else:
            latents = latents.to(device=device, dtype=dtype)
        guidance = None
        if getattr(base.model, "guidance_embed", False):  # guidance-distilled DiT: hy3dgen's tensor
            guidance = torch.tensor([guidance_scale] * batch_size, device=device, dtype=dtype)
        num_train = base.scheduler.config.num_train_timesteps
        noise_levels = start_noise_levels(base, timesteps)
        num_guided = cfg.num_guided_steps(noise_levels)   # the guided window
        by_position = num_guided > 0 and cfg.needs_positions
        reader = self.position_reader(cfg) if by_position else None

        # 4. denoising loop: guided update (ISG + SGU) then hy3dgen's (CFG) Euler step
        diagnostics = []
        momentum = None
        clean = None    # the sampler's latest clean-latent prediction (Eq.5 over positions only)
        # Guidance on: float32 master latent (module docstring). Off: hy3dgen's loop, model dtype.
        master = num_guided > 0
        if master:
            latents = latents.to(torch.float32)
        for i, t in enumerate(tqdm(timesteps, disable=not enable_pbar, desc="TIMI sampling")):
            timestep = t.expand(batch_size).to(dtype) / num_train
            if i < num_guided:
                positions = None
                if by_position:
                    if clean is None:   # first guided step: one extra forward at the current latent
                        clean = self.clean_prediction(latents, t, cond, do_cfg, guidance_scale, guidance)
                    positions = reader(clean).to(torch.float32)
                latents, momentum, diag = self.guide(latents, timestep, inputs.cond_main, inputs.tokens, momentum,
                                                     step=i, config=cfg, guidance=guidance, positions=positions)
                diagnostics.append(diag)

            with observed(recorder, i, inputs.tokens.shape[-1], base.model):
                noise_pred = self._velocity(latents, t, cond, do_cfg, guidance_scale, guidance)
            if by_position and i + 1 < num_guided:
                clean = latents.to(torch.float32) + (1.0 - float(noise_levels[i])) * noise_pred.to(torch.float32)
            if master:
                # hy3dgen's step on the float32 latent with a float32 velocity: it computes
                # float32 sample + (sigma_next - sigma) * v and casts to v's dtype, float32 here.
                noise_pred = noise_pred.to(torch.float32)
            outputs = base.scheduler.step(noise_pred, t, latents)
            latents = outputs.prev_sample
            if callback is not None and i % callback_steps == 0:
                callback(i // getattr(base.scheduler, "order", 1), t, outputs)

        # 5. the master latent, rounded once; meshes (shared back end)
        latents = latents.to(dtype)
        meshes = None
        if output_type != "latent":
            meshes = export_meshes(base, latents, output_type, box_v=box_v, mc_level=mc_level, num_chunks=num_chunks,
                                   octree_resolution=octree_resolution, mc_algo=mc_algo, enable_pbar=enable_pbar)
        return TIMIPipelineOutput(meshes, latents, diagnostics,
                                  list(recorder.records) if recorder is not None else None)


"""TRELLIS stage 1's sampler as upstream runs it, with TIMI guidance on the grid latent.

Upstream (``trellis/pipelines/samplers/flow_euler.py``, ``FlowEulerGuidanceIntervalSampler``):
flow time runs from ``t = 1`` (noise) to ``t = 0`` (data) on ``linspace(1, 0, steps + 1)`` rescaled
``t -> r t / (1 + (r - 1) t)`` (``rescale_t = r``); the model receives ``1000 t``; inside
``cfg_interval`` the velocity is ``(1 + s) v(cond) - s v(neg_cond)`` (two forwards; the negative
condition is zeros), outside it ``v(cond)``; the Euler step is ``x_prev = x_t - (t - t_prev) v``;
the clean prediction ``x_0 = (1 - sigma_min) x_t - (sigma_min + (1 - sigma_min) t) v``.
Every upstream sample method is ``@torch.no_grad``, so TIMI needs this loop of its own; with
guidance off it performs upstream's operations in upstream's order, so the latents equal
upstream's bit for bit (``tests/test_trellis_sampler.py``, against the stored trajectory).

TIMI (paper Sec. 4) in the guided window, before the step's velocity: ISG on the conditional
branch (Eq.2 on the first ``guided_layers`` blocks' cross-attention, Eqs.3-4; the forward stops
after the last of them, so the gradient passes through ``input_layer`` and those blocks only),
then SGU with Eq.5 **as the paper writes it**: a 3-D Gaussian over D, H, W of the (B, C, D, H, W)
latent (:func:`timi_torch.guidance.guided_update`, the step every sampler shares). The window is
``TIMIConfig.num_guided_steps`` of the noise levels ``1 - t`` (0 = noise, as on Hunyuan3D): by
default the steps that start in the first 30 % of the trajectory.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from timi_core import StepDiagnostics, TIMIConfig

from ..guidance import MODES, guidable_layers, guided_update, observed

__all__ = ["SamplerSettings", "StageOneOutput", "flow_times", "sample", "clean_prediction"]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Stage-1 sampler settings (upstream's ``sparse_structure_sampler`` params and ``sigma_min``).

    Defaults: upstream's app (12 steps, CFG 7.5) with the interval and time rescale reported for the
    hub's ``pipeline.json`` (cfg_interval (0.5, 1.0), rescale_t 3.0; not verifiable from here) and
    the training ``sigma_min`` 1e-5.
    """

    steps: int = 12
    cfg_strength: float = 7.5
    cfg_interval: tuple[float, float] = (0.5, 1.0)
    rescale_t: float = 3.0
    sigma_min: float = 1e-5

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be a whole number of at least 1.")
        for name in ("cfg_strength", "rescale_t", "sigma_min"):
            if not np.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number.")
        if self.rescale_t <= 0:
            raise ValueError(f"rescale_t={self.rescale_t!r} must be > 0.")


@dataclasses.dataclass(frozen=True)
class StageOneOutput:
    """One stage-1 run: the (B, C, R, R, R) ``latents`` (float32), one ``StepDiagnostics`` per guided
    step, and the latent after every step (``trajectory``, when asked for)."""

    latents: torch.Tensor
    diagnostics: list[StepDiagnostics]
    trajectory: Optional[list[torch.Tensor]] = None


def flow_times(steps: int, rescale_t: float) -> np.ndarray:
    """Upstream's time grid (float64, ``steps + 1`` values from 1 down to 0)."""
    t = np.linspace(1, 0, steps + 1)
    return rescale_t * t / (1 + (rescale_t - 1) * t)


def _velocity(model, x, t: float, cond, neg_cond, settings: SamplerSettings):
    """Upstream's ``_inference_model``: ``1000 t`` as a float32 (B,) tensor, CFG inside the interval."""
    timestep = torch.tensor([1000 * t] * x.shape[0], device=x.device, dtype=torch.float32)
    pred = model(x, timestep, cond)
    lo, hi = settings.cfg_interval
    if neg_cond is not None and lo <= t <= hi:
        neg = model(x, timestep, neg_cond)
        return (1 + settings.cfg_strength) * pred - settings.cfg_strength * neg
    return pred


def clean_prediction(x, t: float, v, sigma_min: float):
    """Upstream's ``x_0`` from ``x_t`` and the velocity ``v``."""
    return (1 - sigma_min) * x - (sigma_min + (1 - sigma_min) * t) * v


def _guided_layers(model, config: TIMIConfig) -> int:
    depth = guidable_layers(model)
    if config.guided_layers > depth:
        warnings.warn(f"TIMIConfig.guided_layers={config.guided_layers} exceeds the model's {depth} blocks; "
                      f"guiding all {depth}.", stacklevel=3)
    return min(config.guided_layers, depth)


def _batched(cond: torch.Tensor, batch: int) -> torch.Tensor:
    """Upstream repeats a batch-1 condition to the latent batch."""
    return cond.repeat(batch, *([1] * (cond.ndim - 1))) if cond.shape[0] == 1 and batch > 1 else cond


@torch.no_grad()
def sample(model, noise: torch.Tensor, cond: torch.Tensor, neg_cond: Optional[torch.Tensor] = None, *,
           tokens: Optional[torch.Tensor] = None, config: Optional[TIMIConfig] = None,
           settings: SamplerSettings = SamplerSettings(), attention: str = "fused",
           gradient_hook: Optional[Callable] = None, callback: Optional[Callable] = None,
           keep_trajectory: bool = False, enable_pbar: bool = True, recorder=None) -> StageOneOutput:
    """Sample stage-1 latents from ``noise`` (B, C, R, R, R) with ``model`` (a
    :class:`~timi_torch.trellis.SparseStructureFlowModel`), optionally with TIMI.

    ``cond`` (B or 1, M, cond_channels) image tokens; ``neg_cond``: the negative condition
    (upstream: zeros; ``None``: no CFG). ``tokens`` (B, K, M): Eq.2's condition-token masks (needed
    when ``config`` guides any step); ``config``: ``None`` or a ``TIMIConfig`` with guidance off
    runs upstream's sampler exactly. ``gradient_hook(grad, step) -> grad`` acts on ``dL/dz``
    before SGU (controls). ``callback(step, t, latents)`` after every step. ``recorder``: an
    observer of each step's conditional forward (``timi.report.AttentionRecorder``,
    :func:`timi_torch.guidance.observed`).
    """
    if attention not in MODES:
        raise ValueError(f"attention={attention!r} must be one of {MODES}.")
    times = flow_times(settings.steps, settings.rescale_t)
    num_guided = 0 if config is None else config.num_guided_steps(1.0 - times[:-1])
    if num_guided and tokens is None:
        raise ValueError("TIMI guidance needs the condition-token masks (tokens=(B, K, M)).")
    batch = noise.shape[0]
    cond = _batched(cond, batch)
    neg_cond = None if neg_cond is None else _batched(neg_cond, batch)
    layers = _guided_layers(model, config) if num_guided else 0
    x, momentum = noise, None
    if num_guided:
        x = x.to(torch.float32)
        tokens = _batched(tokens.to(device=x.device, dtype=torch.float32), batch)
    diagnostics, trajectory = [], []
    for i in tqdm(range(settings.steps), disable=not enable_pbar, desc="TRELLIS stage 1"):
        t, t_prev = times[i], times[i + 1]
        if i < num_guided:
            timestep = torch.full((batch,), 1000 * t, device=x.device, dtype=torch.float32)
            x, momentum, diag = guided_update(model, x, timestep, cond, tokens, momentum, config, layers, attention,
                                              step=i, gradient_hook=gradient_hook, time=1.0 - t)
            diagnostics.append(diag)
        with observed(recorder, i, cond.shape[1], model):              # the conditional forward comes first
            v = _velocity(model, x, t, cond, neg_cond, settings)
        x = x - (t - t_prev) * v
        if keep_trajectory:
            trajectory.append(x.clone())
        if callback is not None:
            callback(i, t, x)
    return StageOneOutput(x, diagnostics, trajectory if keep_trajectory else None)

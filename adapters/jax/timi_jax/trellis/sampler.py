"""TRELLIS stage 1's sampler in JAX, with TIMI on the grid latent, as one compiled program.

The schedule and the steps are :func:`timi_torch.trellis.sample`'s (upstream's
``FlowEulerGuidanceIntervalSampler``): flow time on :func:`flow_times` (``linspace(1, 0, steps + 1)``
with ``rescale_t``), the model fed ``1000 t`` as float32, CFG ``(1 + s) v(cond) - s v(neg_cond)``
inside ``cfg_interval`` (both branches in one forward of the doubled batch) and ``v(cond)`` outside,
the Euler step ``x <- x - (t - t_prev) v``. Which steps take CFG and which are guided is known before
the run (both sets are runs of consecutive steps, since ``t`` falls), so the program is a
``lax.scan`` per run of steps with equal (guided, CFG) flags, each with its choice compiled in: no
``lax.cond`` on a step index.

TIMI in the guided window, ``TIMIConfig.num_guided_steps(1 - times[:-1])`` (the first steps, as the
torch sampler): before the step's velocity, on the conditional branch, ``jax.grad`` of ``L_sep``
(the mean over the first ``guided_layers`` blocks of ``timi_core.instance_separation_loss`` on P
from :meth:`SparseStructureFlowModel.instance_probabilities`) w.r.t. the latent, then
``timi_core.sgu_step`` with Eq.5 a 3-D Gaussian over D, H, W (``axes=(2, 3, 4)``) and momentum
carried across steps (:func:`timi_jax.sampler.guided_step`, shared with the Hunyuan3D sampler).
Float32 throughout.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from timi_core import TIMIConfig
from timi_torch.trellis.sampler import SamplerSettings, flow_times

from ..sampler import SampleOutput, _num_layers, guided_step
from .modeling import SparseStructureFlowModel

__all__ = ["sample", "StageOneOutput", "SamplerSettings", "flow_times", "GRID_AXES"]

#: Eq.5's axes on the (B, C, D, H, W) grid latent.
GRID_AXES = (2, 3, 4)


@dataclasses.dataclass(frozen=True)
class StageOneOutput(SampleOutput):
    """:class:`timi_jax.SampleOutput` of a stage-1 run: ``latents`` (B, C, R, R, R) float32, the
    per-step diagnostics (N, B) (0 on unguided steps), ``num_guided``, ``times`` (flow time at
    each step's start, 1 = noise) and, when asked for, ``trajectory`` (N, B, C, R, R, R): the
    latent after every step."""

    trajectory: jax.Array | None = None


def _runs(guided: list[bool], cfg: list[bool]) -> tuple[tuple[int, int, bool, bool], ...]:
    """``(start, stop, guided, cfg)`` for each run of consecutive steps with equal flags."""
    runs, start = [], 0
    for flags, group in itertools.groupby(zip(guided, cfg)):
        n = len(list(group))
        runs.append((start, start + n, *flags))
        start += n
    return tuple(runs)


@partial(jax.jit, static_argnames=("graphdef", "config", "num_layers", "runs", "keep_trajectory"))
def _sample_program(graphdef, state, noise, cond, neg_cond, tokens, timesteps, dts, cfg_weights, *,
                    config: TIMIConfig, num_layers: int, runs, keep_trajectory: bool):
    model = nnx.merge(graphdef, state)
    batch = noise.shape[0]
    zeros = (jnp.zeros((batch,), jnp.float32),) * 6

    def velocity(x, ts, do_cfg):
        if not do_cfg:
            return model(x, ts, cond)
        pred, neg = jnp.split(model(jnp.concatenate([x, x]), jnp.concatenate([ts, ts]),
                                    jnp.concatenate([cond, neg_cond])), 2)
        return cfg_weights[0] * pred - cfg_weights[1] * neg

    def body(guided, do_cfg):
        def step(carry, xs):
            x, m = carry
            t, dt = xs
            ts = jnp.full((batch,), t)
            if guided:
                x, m, diag = guided_step(model, x, m, ts, cond, tokens, config, num_layers, GRID_AXES)
            else:
                diag = zeros
            x = x - dt * velocity(x, ts, do_cfg)
            return (x, m), (diag, x if keep_trajectory else None)
        return step

    carry, diags, trajectory = (noise, jnp.zeros_like(noise)), [], []
    for start, stop, guided, do_cfg in runs:
        carry, (diag, xs) = jax.lax.scan(body(guided, do_cfg), carry, (timesteps[start:stop], dts[start:stop]))
        diags.append(diag)
        trajectory.append(xs)
    diags = tuple(jnp.concatenate([d[i] for d in diags]) for i in range(6))
    return carry[0], diags, jnp.concatenate(trajectory) if keep_trajectory else None


def _batched(a, batch: int, name: str):
    a = jnp.asarray(a, jnp.float32)
    if a.shape[0] == 1 and batch > 1:       # upstream repeats a batch-1 condition to the latent batch
        a = jnp.broadcast_to(a, (batch, *a.shape[1:]))
    if a.shape[0] != batch:
        raise ValueError(f"{name} has batch {a.shape[0]}; expected 1 or the latent batch {batch}.")
    return a


def sample(model: SparseStructureFlowModel, noise, cond, neg_cond=None, *, tokens=None,
           config: TIMIConfig | None = None, settings: SamplerSettings = SamplerSettings(),
           keep_trajectory: bool = False) -> StageOneOutput:
    """Stage-1 latents from ``noise`` (B, C, R, R, R), as :func:`timi_torch.trellis.sample`.

    ``cond`` (B or 1, M, cond_channels) image tokens; ``neg_cond`` the negative condition (upstream:
    zeros; ``None``: no CFG); ``tokens`` (B or 1, K, M) or (K, M): Eq.2's condition-token masks,
    needed when ``config`` guides any step; ``config=None`` or guidance off runs upstream's sampler.
    One compiled program per (model structure, shapes, config, step layout); new noise, conditions,
    masks or ``cfg_strength`` reuse it.
    """
    times = flow_times(settings.steps, settings.rescale_t)
    config = TIMIConfig(isg=False) if config is None else config
    num_guided = config.num_guided_steps(1.0 - times[:-1])
    noise = jnp.asarray(noise, jnp.float32)
    batch = noise.shape[0]
    cond = _batched(cond, batch, "cond")
    lo, hi = settings.cfg_interval
    cfg = [bool(neg_cond is not None and lo <= t <= hi) for t in times[:-1]]
    neg_cond = _batched(neg_cond, batch, "neg_cond") if any(cfg) else None
    num_layers = 0
    if num_guided:
        if tokens is None:
            raise ValueError("TIMI guidance needs the condition-token masks (tokens=(B, K, M)).")
        num_layers = _num_layers(model, config)
        tokens = jnp.asarray(tokens, jnp.float32)
        tokens = _batched(tokens, batch, "tokens") if tokens.ndim == 3 else tokens
    else:
        tokens = None
    graphdef, state = nnx.split(model)
    weights = jnp.asarray([1 + settings.cfg_strength, settings.cfg_strength], jnp.float32)
    latents, diags, trajectory = _sample_program(
        graphdef, state, noise, cond, neg_cond, tokens, jnp.asarray((1000 * times[:-1]).astype(np.float32)),
        jnp.asarray((times[:-1] - times[1:]).astype(np.float32)), weights, config=config, num_layers=num_layers,
        runs=_runs([i < num_guided for i in range(settings.steps)], cfg), keep_trajectory=keep_trajectory)
    return StageOneOutput(latents, *diags, num_guided=num_guided, times=times[:-1], trajectory=trajectory)

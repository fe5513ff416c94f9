"""hy3dgen's flow-matching Euler sampler with classifier-free guidance and TIMI, as one XLA program.

Schedule (``Hunyuan3DDiTFlowMatchingPipeline`` + ``FlowMatchEulerDiscreteScheduler``, hy3dgen
2.0.2): ``sigmas = linspace(0, 1, N)`` (t = 0 is noise, t = 1 data), shifted by
``shift * s / (1 + (shift - 1) * s)``, cast to float32; ``timesteps = sigmas * 1000``; the model
gets ``t = timesteps[i] / 1000`` in the latent dtype; a final sigma 1 is appended, so the Euler step
``x <- x + (sigma[i+1] - sigma[i]) * v`` of the last step has ``dt = 0``. CFG runs the batch
``[cond; uncond]`` and mixes ``v = v_u + w (v_c - v_u)``; guidance-distilled models
(``guidance_embed``) get ``guidance = w`` and no CFG, as in hy3dgen.

Turbo models use hy3dgen's ``ConsistencyFlowMatchEulerDiscreteScheduler``: :func:`consistency_schedule`
(or the scheduler's own arrays) passed as ``schedule``; its last step ends at sigma 1 (``dt > 0``).

TIMI (paper Sec. 4): at the steps of the guided window (``TIMIConfig.num_guided_steps``), before the CFG step and on the conditional branch
only, ``jax.value_and_grad`` of ``L_sep`` (Eqs.2-4, ``timi_core.instance_separation_loss``, mean
over the first ``guided_layers`` double blocks, summed over independent samples) through the
forward truncated after those blocks (:meth:`Hunyuan3DDiT.instance_probabilities`, P as an
attention output with the masks as values), then ``timi_core.sgu_update(axes=(1,))`` (Eqs.5-7,
smoothing along hy3dgen's latent-token axis, momentum carried across steps). Loss, gradient and
update are float32 whatever the model's dtype, and with guidance on the latent itself is carried in
float32 for the whole run (a float32 master latent, as ``timi_torch.TIMIPipeline``): the model sees
it cast to its dtype, the update and the Euler step ``z + (sigma[i+1] - sigma[i]) * float32(v)`` are
applied to it in float32, and it is cast to the model dtype once, at the end. (With guidance off
the loop is hy3dgen's: each Euler step is cast back to the model dtype.) The step loop is
``lax.scan`` and the guided/plain choice ``lax.cond`` on the step index, so the whole run is
compiled once.

Batches of seeds or scenes can be sharded data-parallel over devices (:func:`data_parallel_mesh`).

The model is hy3dgen 2.0's DiT (:class:`timi_jax.Hunyuan3DDiT`, P from the first double blocks'
joint attention) or Hunyuan3D 2.1's (:class:`timi_jax.hunyuan21.HunYuanDiTPlain`, P from the first
blocks' cross-attention, time token excluded): the sampler only calls the model's forward and its
``instance_probabilities`` (the truncated guidance pass) and reads ``dtype``, ``depth`` (the
guidable layers) and ``guidance_embed``. 2.1's pipeline runs the same schedule and CFG as 2.0's.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import timi_core
from timi_core import TIMIConfig

from .modeling import Hunyuan3DDiT, batched_mask_tokens

if TYPE_CHECKING:  # not imported at run time: 2.1's module imports torch
    from .hunyuan21.modeling import HunYuanDiTPlain

__all__ = ["flow_matching_schedule", "consistency_schedule", "schedule_of", "sample", "prepare_sample", "SampleOutput",
           "data_parallel_mesh", "separation_loss_and_grad", "guided_step"]


def flow_matching_schedule(num_inference_steps: int, *, num_train_timesteps: int = 1000,
                           shift: float = 1.0, sigmas=None):
    """``(timesteps (N,), sigmas (N+1,))`` float32, exactly as hy3dgen's
    ``FlowMatchEulerDiscreteScheduler`` sets them."""
    if sigmas is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        sigmas = np.linspace(0, 1, num_inference_steps)
    s = np.asarray(sigmas, dtype=np.float64)
    s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    timesteps = s * np.float32(num_train_timesteps)
    return timesteps, np.concatenate([s, np.ones(1, np.float32)])


def consistency_schedule(num_inference_steps: int, *, num_train_timesteps: int = 1000,
                         pcm_timesteps: int = 50):
    """``(timesteps (N,), sigmas (N+1,))`` float64, as hy3dgen's
    ``ConsistencyFlowMatchEulerDiscreteScheduler`` (the turbo models') sets them: N points
    ``floor(linspace(0, pcm_timesteps, N, endpoint=False))`` of its PCM grid of ``linspace(0, 1,
    num_train_timesteps)``, then a final sigma 1 (so the last step ends at the data, ``dt > 0``)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
    grid = np.linspace(0, 1, num_train_timesteps)
    ratio = num_train_timesteps // pcm_timesteps
    euler = np.concatenate([[0], (np.arange(1, pcm_timesteps) * ratio).round().astype(np.int64) - 1])
    picks = np.floor(np.linspace(0, pcm_timesteps, num_inference_steps, endpoint=False)).astype(np.int64)
    s = grid[euler][picks]
    return s * num_train_timesteps, np.concatenate([s, np.ones(1)])


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """``latents`` (B, L, C) in the model's dtype and per-step diagnostics, each (N, B) float32 and
    0 for unguided steps (as ``timi_core.StepDiagnostics``): ``losses`` ``L_sep`` before the step's
    update, ``scales`` the step size lambda (Eq.6; ``alpha`` without GM), ``max_updates`` the
    largest ``|z_new - z|`` of the float32 latent, ``common_gradients`` / ``common_smoothed`` /
    ``common_updates`` the share of the raw gradient / Eq.5's output / the step common to all
    tokens (:func:`timi_core.common_share`). ``num_guided``: the guided window (the first
    steps, ``TIMIConfig.num_guided_steps``); ``times``: each step's starting noise level."""

    latents: jax.Array
    losses: jax.Array
    scales: jax.Array
    max_updates: jax.Array
    common_gradients: jax.Array
    common_smoothed: jax.Array
    common_updates: jax.Array
    num_guided: int = 0
    times: np.ndarray | None = None   # (N,) the noise level each step starts at (flow time)


def _guidance_vector(model: Hunyuan3DDiT | HunYuanDiTPlain, batch: int, guidance_scale, dtype):
    return jnp.full((batch,), guidance_scale, dtype) if model.guidance_embed else None


def _loss_and_grad(model: Hunyuan3DDiT | HunYuanDiTPlain, z, t, cond, tokens, config: TIMIConfig, num_layers: int,
                   guidance=None):
    def total(zf):
        probs = model.instance_probabilities(zf.astype(model.dtype), t, cond, tokens, num_layers,
                                             guidance, config.per_head)
        per_layer = jnp.stack([timi_core.instance_separation_loss(p, config.eps,
                                                                  config.detach_weights,
                                                                  config.normalize_instances)
                               for p in probs])  # (layers, B[, H])
        if config.per_head:  # Eqs.3-4 per head, then the mean over heads
            per_layer = jnp.mean(per_layer, axis=-1)
        loss = jnp.mean(per_layer, axis=0)
        return jnp.sum(loss), loss  # samples are independent: d(sum)/dz_b = dL_b/dz_b

    (_, loss), grad = jax.value_and_grad(total, has_aux=True)(z.astype(jnp.float32))
    return loss, grad


def separation_loss_and_grad(model: Hunyuan3DDiT | HunYuanDiTPlain, latents, t, cond, mask_tokens,
                             config: TIMIConfig = TIMIConfig(), num_layers: int | None = None):
    """Per-sample ``L_sep`` (B,) (mean over the guided layers of Eq.4) and ``dL_sep/dz`` float32.

    The counterpart of ``timi_torch.guidance.separation_loss_and_grad``; ``t`` (B,) in [0, 1],
    ``cond`` the conditional tokens (B, M, D), ``mask_tokens`` (B, K, M) or (K, M).
    """
    num_layers = _num_layers(model, config) if num_layers is None else num_layers
    graphdef, state = nnx.split(model)
    return _loss_and_grad_jit(graphdef, state, latents, jnp.asarray(t), cond, mask_tokens,
                              config=config, num_layers=num_layers)


@partial(jax.jit, static_argnames=("graphdef", "config", "num_layers"))
def _loss_and_grad_jit(graphdef, state, latents, t, cond, tokens, *, config, num_layers):
    return _loss_and_grad(nnx.merge(graphdef, state), latents, t, cond, tokens, config, num_layers)


def guided_step(model: Hunyuan3DDiT | HunYuanDiTPlain, z, m, t, cond, tokens, config: TIMIConfig, num_layers: int,
                axes: tuple[int, ...], guidance=None):
    """One ISG (Eqs.2-4) + SGU (Eqs.5-7) update of the float32 latent ``z`` with momentum ``m``, Eq.5
    along ``axes``: ``(z_new, m_new, diagnostics)``, the diagnostics six (B,) arrays in
    :class:`SampleOutput`'s order (``L_sep``, lambda, largest ``|z_new - z|``, common shares of the
    gradient, Eq.5's output and the update). ``t`` (B,) as the model's forward takes it. The step
    every JAX sampler (Hunyuan3D, TRELLIS) makes."""
    loss, grad = _loss_and_grad(model, z, t, cond, tokens, config, num_layers, guidance)
    z_new, m_new, scale, smoothed = timi_core.sgu_step(z, grad, m, config, axes=axes)
    max_update = jnp.max(jnp.abs(z_new - z), axis=tuple(range(1, z.ndim)))
    shares = tuple(timi_core.common_share(x, axes) for x in (grad, smoothed, z_new - z))
    return z_new, m_new, (loss, scale, max_update, *shares)


@partial(jax.jit, static_argnames=("graphdef", "config", "num_layers", "do_cfg", "master"))
def _sample_program(graphdef, state, noise, cond, uncond, tokens, t_model, dts, guided, guidance_scale,
                    *, config: TIMIConfig, num_layers: int, do_cfg: bool, master: bool):
    model = nnx.merge(graphdef, state)
    batch = noise.shape[0]
    guidance = _guidance_vector(model, batch, guidance_scale, model.dtype)
    cond_in = jnp.concatenate([cond, uncond], axis=0) if do_cfg else cond
    no_loss = jnp.zeros((batch,), jnp.float32)

    def velocity(z, t):
        if do_cfg:
            v = model(jnp.concatenate([z, z], axis=0), jnp.full((2 * batch,), t), cond_in)
            v_cond, v_uncond = jnp.split(v, 2, axis=0)
            return v_uncond + guidance_scale.astype(v.dtype) * (v_cond - v_uncond)
        return model(z, jnp.full((batch,), t), cond_in, guidance)

    def guide(z, m, t):
        return guided_step(model, z, m, jnp.full((batch,), t), cond, tokens, config, num_layers, (1,), guidance)

    # Some step guided (``master``): the carried latent is float32 (cast for the model only).

    def step(carry, xs):
        z, m = carry
        g, t, dt = xs
        if master:
            z, m, diag = jax.lax.cond(g, guide, lambda z, m, t: (z, m, (no_loss,) * 6), z, m, t)
        else:
            diag = (no_loss,) * 6
        v = velocity(z.astype(model.dtype), t)
        # scheduler.step: float32 sample + (sigma_next - sigma) * v, cast to v's dtype; with the
        # master latent the same in float32 (float32 v) and no cast back
        z = z.astype(jnp.float32) + dt * v.astype(jnp.float32)
        z = z if master else z.astype(v.dtype)
        return (z, m), diag

    carry = (noise.astype(jnp.float32) if master else noise, jnp.zeros(noise.shape, jnp.float32))
    (latents, _), diags = jax.lax.scan(step, carry, (guided, t_model, dts))
    return latents.astype(model.dtype), diags


def _num_layers(model: Hunyuan3DDiT | HunYuanDiTPlain, config: TIMIConfig) -> int:
    if config.guided_layers > model.depth:
        warnings.warn(f"TIMIConfig.guided_layers={config.guided_layers} exceeds the model's "
                      f"{model.depth} guidable blocks; guiding all {model.depth}.",
                      stacklevel=3)
    return min(config.guided_layers, model.depth)


def data_parallel_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) for :func:`sample`'s ``mesh`` argument."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def sample(model: Hunyuan3DDiT | HunYuanDiTPlain, noise, cond, uncond=None, mask_tokens=None, *,
           num_inference_steps: int = 50, guidance_scale: float = 5.0,
           config: TIMIConfig | None = TIMIConfig(), num_train_timesteps: int = 1000,
           shift: float = 1.0, sigmas=None, schedule=None, mesh: Mesh | None = None) -> SampleOutput:
    """Sample latents with hy3dgen's schedule and CFG, with TIMI guidance when ``config`` says so.

    ``noise`` (B, L, C): the initial latents (hy3dgen's ``prepare_latents``; cast to the model's
    dtype). The returned latents are in the model's dtype; with guidance on they were carried in
    float32 during the run and are rounded once at the end (see the module docstring).
    ``cond`` (B, M, D): conditional tokens; ``uncond``: the unconditional ones (default zeros, hy3dgen's
    unconditional embedding for the DINOv2 conditioner). ``mask_tokens`` (B, K, M) or (K, M):
    instance masks pooled onto the condition tokens (``timi_core.pool_masks``), needed when
    guidance is on. ``config=None`` or ``TIMIConfig(isg=False)``: plain hy3dgen sampling. ``mesh``:
    shard the batch over the mesh's first axis (data parallel; B must be a multiple of its size)
    with the weights replicated. ``schedule``: ``(timesteps (N,), sigmas (N+1,))`` of another
    scheduler (turbo's :func:`consistency_schedule`); default hy3dgen's flow-matching one. The
    guided steps are the schedule's first ``config.num_guided_steps(timesteps / num_train_timesteps)``.

    One compiled program per (model structure, shapes, dtypes, config, step count); later calls
    with new noise, conditions or masks reuse it.
    """
    args, static = prepare_sample(model, noise, cond, uncond, mask_tokens,
                                  num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, config=config,
                                  num_train_timesteps=num_train_timesteps, shift=shift,
                                  sigmas=sigmas, schedule=schedule, mesh=mesh)
    latents, diags = _sample_program(*args, **static)
    timesteps, _ = schedule_of(num_inference_steps, num_train_timesteps, shift, sigmas, schedule)
    times = np.asarray(timesteps, np.float64) / num_train_timesteps
    num_guided = (TIMIConfig(isg=False) if config is None else config).num_guided_steps(times.tolist())
    return SampleOutput(latents, *diags, num_guided=num_guided, times=times)


def schedule_of(num_inference_steps, num_train_timesteps=1000, shift=1.0, sigmas=None, schedule=None):
    """``(timesteps (N,), sigmas (N+1,))``: ``schedule`` when given (e.g. :func:`consistency_schedule`
    or a hy3dgen scheduler's own arrays), else :func:`flow_matching_schedule`."""
    if schedule is not None:
        timesteps, sig = (np.asarray(a) for a in schedule)
        if timesteps.ndim != 1 or sig.shape != (timesteps.shape[0] + 1,):
            raise ValueError(f"schedule: timesteps {timesteps.shape} and sigmas {sig.shape} must be (N,) and (N+1,)")
        return timesteps, sig
    return flow_matching_schedule(num_inference_steps, num_train_timesteps=num_train_timesteps, shift=shift,
                                  sigmas=sigmas)


def prepare_sample(model: Hunyuan3DDiT | HunYuanDiTPlain, noise, cond, uncond=None, mask_tokens=None, *,
                   num_inference_steps: int = 50, guidance_scale: float = 5.0,
                   config: TIMIConfig | None = TIMIConfig(), num_train_timesteps: int = 1000,
                   shift: float = 1.0, sigmas=None, schedule=None, mesh: Mesh | None = None):
    """Validated ``(args, static_kwargs)`` of the compiled sampling program (see :func:`sample`);
    ``_sample_program(*args, **static_kwargs)`` runs it, ``.lower(...)`` compiles it ahead of time
    (:mod:`timi_jax.bench`)."""
    config = TIMIConfig(isg=False) if config is None else config
    dtype = model.dtype
    noise = jnp.asarray(noise, dtype)
    cond = jnp.asarray(cond, dtype)
    if noise.ndim != 3 or cond.ndim != 3 or cond.shape[0] != noise.shape[0]:
        raise ValueError(f"noise {noise.shape} and cond {cond.shape} must be (B, L, C) and "
                         "(B, M, D) with the same batch size B")
    uncond = jnp.zeros_like(cond) if uncond is None else jnp.asarray(uncond, dtype)
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond {uncond.shape} must have cond's shape {cond.shape}")
    timesteps, sig = schedule_of(num_inference_steps, num_train_timesteps, shift, sigmas, schedule)
    num_guided = config.num_guided_steps((np.asarray(timesteps, np.float64) / num_train_timesteps).tolist())
    num_layers = 0
    if num_guided > 0:
        if mask_tokens is None:
            raise ValueError("TIMI guidance is on: pass mask_tokens (B, K, M) or (K, M) from "
                             "timi_core.pool_masks, or config=None for plain sampling")
        if model.depth == 0:
            raise ValueError("the model has no blocks to guide")
        num_layers = _num_layers(model, config)
        tokens = batched_mask_tokens(mask_tokens, noise.shape[0], cond.shape[1])
    else:
        tokens = None
    # hy3dgen: t.to(model dtype) / num_train; dt = sigma_next - sigma in the schedule's dtype,
    # rounded to float32 where it meets the velocity
    t_model = jnp.asarray(np.asarray(timesteps).astype(jnp.dtype(dtype))) / num_train_timesteps
    dts = jnp.asarray((sig[1:] - sig[:-1]).astype(np.float32))
    guided = jnp.asarray(np.arange(len(timesteps)) < num_guided)
    do_cfg = guidance_scale >= 0 and not model.guidance_embed
    graphdef, state = nnx.split(model)
    if mesh is not None:
        n_dev = mesh.devices.size
        if noise.shape[0] % n_dev:
            raise ValueError(f"batch {noise.shape[0]} is not a multiple of the {n_dev} devices of "
                             "the mesh: pad the batch or use fewer devices")
        batch_spec = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
        replicated = NamedSharding(mesh, PartitionSpec())
        noise, cond, uncond = (jax.device_put(a, batch_spec) for a in (noise, cond, uncond))
        if tokens is not None:
            tokens = jax.device_put(tokens, batch_spec)
        state = jax.device_put(state, replicated)
    args = (graphdef, state, noise, cond, uncond, tokens, t_model, dts, guided,
            jnp.asarray(guidance_scale, jnp.float32))
    return args, dict(config=config, num_layers=num_layers, do_cfg=do_cfg, master=num_guided > 0)

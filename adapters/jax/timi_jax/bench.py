"""Timing of the compiled sampler: compile time apart from run time, guided vs plain.

>>> from timi_jax.bench import compare_guided_plain                        # doctest: +SKIP
>>> compare_guided_plain(model, noise, cond, None, tokens, num_inference_steps=50)  # doctest: +SKIP
{'plain': {'compile_s': ..., 'run_s': ..., ...}, 'guided': {...}, 'overhead': 1.3}

Compilation is ahead of time (``jit(...).lower(...).compile()``) and timed on its own; runs are
timed on the compiled executable with ``block_until_ready``, so they hold no tracing or compiling.
"""

from __future__ import annotations

import statistics
import time

import jax

from timi_core import TIMIConfig

from .sampler import _sample_program, prepare_sample

__all__ = ["compile_sampler", "time_sampler", "compare_guided_plain"]


def compile_sampler(model, noise, cond, uncond=None, mask_tokens=None, **sample_kwargs):
    """``(run, compile_s)``: :func:`timi_jax.sample`'s program for these arguments compiled ahead of
    time (``jit(...).lower(...).compile()``, timed), and ``run()`` -> latents, which calls the
    compiled executable and blocks until the latents exist (no tracing or compiling inside)."""
    args, static = prepare_sample(model, noise, cond, uncond, mask_tokens, **sample_kwargs)
    start = time.perf_counter()
    compiled = _sample_program.lower(*args, **static).compile()
    compile_s = time.perf_counter() - start
    dynamic = args[1:]  # the graphdef is static; the compiled program takes the rest

    def run():
        latents, _ = compiled(*dynamic)
        return latents.block_until_ready()

    return run, compile_s


def time_sampler(model, noise, cond, uncond=None, mask_tokens=None, *, repeats: int = 3,
                 **sample_kwargs) -> dict:
    """``{'compile_s', 'run_s' (median), 'runs_s', 'per_step_s', 'steps', 'batch', 'device'}``
    for :func:`timi_jax.sample` with these arguments."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    run, compile_s = compile_sampler(model, noise, cond, uncond, mask_tokens, **sample_kwargs)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = run()
        runs.append(time.perf_counter() - start)
    sigmas = sample_kwargs.get("sigmas")
    steps = len(sigmas) if sigmas is not None else int(sample_kwargs.get("num_inference_steps", 50))
    run_s = statistics.median(runs)
    return dict(compile_s=compile_s, run_s=run_s, runs_s=runs, per_step_s=run_s / steps,
                steps=steps, batch=int(latents.shape[0]), device=str(jax.devices()[0]))


def compare_guided_plain(model, noise, cond, uncond=None, mask_tokens=None, *,
                         config: TIMIConfig = TIMIConfig(), repeats: int = 3,
                         **sample_kwargs) -> dict:
    """Plain hy3dgen sampling vs TIMI-guided sampling of the same inputs;
    ``overhead = guided run_s / plain run_s``."""
    plain = time_sampler(model, noise, cond, uncond, None, repeats=repeats,
                         config=config.replace(isg=False), **sample_kwargs)
    guided = time_sampler(model, noise, cond, uncond, mask_tokens, repeats=repeats, config=config,
                          **sample_kwargs)
    return dict(plain=plain, guided=guided, overhead=guided["run_s"] / plain["run_s"])

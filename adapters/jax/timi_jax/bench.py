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

__all__ = ["time_sampler", "compare_guided_plain"]


def time_sampler(model, noise, cond, uncond=None, mask_tokens=None, *, repeats: int = 3,
                 **sample_kwargs) -> dict:
    """``{'compile_s', 'run_s' (median), 'runs_s', 'per_step_s', 'steps', 'batch', 'device'}``
    for :func:`timi_jax.sample` with these arguments."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    args, static = prepare_sample(model, noise, cond, uncond, mask_tokens, **sample_kwargs)
    start = time.perf_counter()
    compiled = _sample_program.lower(*args, **static).compile()
    compile_s = time.perf_counter() - start
    dynamic = args[1:]  # the graphdef is static; the compiled program takes the rest
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*dynamic))
        runs.append(time.perf_counter() - start)
    steps = int(args[6].shape[0])
    run_s = statistics.median(runs)
    return dict(compile_s=compile_s, run_s=run_s, runs_s=runs, per_step_s=run_s / steps,
                steps=steps, batch=int(args[2].shape[0]), device=str(jax.devices()[0]))


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

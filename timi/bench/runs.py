"""``overhead``, ``scaling`` and ``backends``: whole-sampler timings (plain vs TIMI, torch vs JAX).

All timings are wall-clock medians of interleaved repeats in one process (:func:`timing.interleaved`),
after ``warmup`` untimed calls of each variant. JAX programs are compiled ahead of time
(``timi_jax.bench.compile_sampler``) and the compile time is reported apart as ``compile_s``.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from .config import BenchConfig
from .floor import overhead_floor
from .timing import interleaved, machine_info, timed

__all__ = ["overhead", "scaling", "backends", "OVERHEAD_TARGET"]

OVERHEAD_TARGET = 1.05


def _samplers(cfg: BenchConfig, backend: str):
    """(plain_fn, timi_fn, extras) for one backend, built on the same weights and inputs."""
    from .torch_backend import BenchModel

    bench = BenchModel(cfg)
    if backend == "torch":
        bench.guide_runs_s = []

        def timi():
            out = bench.sample(True)
            bench.guide_runs_s.append(bench.pipelines[True].guide_seconds)
            return out

        return (lambda: bench.sample(False)), timi, bench
    if backend == "jax":
        from .jax_backend import JaxSampler

        js = JaxSampler(bench)
        return (lambda: js.run(False)), (lambda: js.run(True)), js
    raise ValueError(f"backend={backend!r} must be 'torch' or 'jax'.")


def _latent_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def _as_numpy(x):
    return x.float().numpy() if hasattr(x, "numpy") and hasattr(x, "float") else np.asarray(x)


def overhead(cfg: BenchConfig, backend: str = "torch", repeats: int = 3, warmup: int = 1,
             _machine: bool = True, _step_times: bool = True) -> dict:
    """Plain vs TIMI sampling, same model / seed / schedule: medians and ``ratio = timi_s / plain_s``,
    next to the FLOP floor (:func:`timi.bench.floor.overhead_floor`)."""
    machine = machine_info() if _machine else None
    plain, timi, holder = _samplers(cfg, backend)
    if backend == "jax":  # both programs compiled ahead of time, timed apart
        compile_s = {"plain": holder.compile(False), "timi": holder.compile(True)}
    res = interleaved({"plain": plain, "timi": timi}, repeats=repeats, warmup=warmup)
    plain_s, timi_s = res["plain"]["median_s"], res["timi"]["median_s"]
    out = {
        "benchmark": "overhead",
        "backend": backend,
        "plain_s": plain_s,
        "timi_s": timi_s,
        "ratio": timi_s / plain_s,
        "target_ratio": OVERHEAD_TARGET,
        **overhead_floor(cfg),
        "plain_runs_s": res["plain"]["runs_s"],
        "timi_runs_s": res["timi"]["runs_s"],
        "warmup_s": {k: v["warmup_s"] for k, v in res.items()},
        "repeats": repeats,
        "config": cfg.as_dict(),
    }
    if backend == "jax":
        out["compile_s"] = compile_s
        if _step_times:  # less noisy estimate: a compiled guidance pass and CFG step, timed apart
            st = holder.step_times()
            out["guide_s_per_guided_step"] = st["guide_s"]
            out["plain_step_s"] = st["step_s"]
            out["ratio_from_step_times"] = 1 + cfg.guided_steps * st["guide_s"] / (cfg.steps * st["step_s"])
    else:  # where the extra time goes: wall time inside TIMIPipeline.guide (ISG + SGU) per run
        n = len(res["timi"]["runs_s"])
        guide_s = statistics.median(holder.guide_runs_s[-n:])   # the timed runs' guidance time
        out["guide_s_runs"] = holder.guide_runs_s[-n:]
        out["guide_s_per_guided_step"] = guide_s / max(cfg.guided_steps, 1)
        out["plain_step_s"] = plain_s / cfg.steps
        # less noisy estimate: the wall time spent inside TIMIPipeline.guide during the TIMI runs,
        # added to the plain run (the rest of a TIMI run is the plain loop)
        out["ratio_from_guide_time"] = 1 + guide_s / plain_s
    # sanity: guidance changed the sample, plain sampling is deterministic
    out["max_abs_latent_diff_timi_vs_plain"] = _latent_diff(_as_numpy(plain()), _as_numpy(timi()))
    if _machine:
        out["machine"] = machine
    return out


def scaling(cfg: BenchConfig, backend: str = "torch", ks=(1, 2, 4, 8), ls=(256, 512, 1024, 3072),
            repeats: int = 2, warmup: int = 1) -> dict:
    """Overhead over K instances (at ``cfg.num_latents``) and L latent tokens (at ``cfg.num_instances``).

    Each point runs the samplers for ONE step, guided (``step_ratio`` = guided / plain one-step
    sampling: ``1 + guidance pass / CFG step``), interleaved, ``repeats`` rounds after ``warmup``.
    A sampler's time is T steps plus a guidance pass on t of them, so the overhead of ``cfg``'s
    schedule follows as ``ratio = 1 + (t / T) * (step_ratio - 1)``, reported with the floor of the
    same schedule. (Whole multi-step runs per point cost minutes at L=3072 on a CPU and their
    ratio drowns in noise; one step, repeated, measures the same two quantities.)
    """
    machine = machine_info()
    frac = cfg.guided_steps / cfg.steps
    rows = []
    for sweep, values in (("K", ks), ("L", ls)):
        for v in values:
            point = cfg.replace(num_instances=v) if sweep == "K" else cfg.replace(num_latents=v)
            one = point.replace(steps=1, guided_steps=1)
            r = overhead(one, backend, repeats=repeats, warmup=warmup, _machine=False, _step_times=False)
            fl = overhead_floor(point)
            rows.append({"sweep": sweep, "K": point.num_instances, "L": point.num_latents,
                         "plain_step_s": r["plain_s"], "guided_step_s": r["timi_s"],
                         "step_ratio": r["ratio"], "ratio": 1 + frac * (r["ratio"] - 1),
                         "floor": fl["floor"], "floor_input_grad": fl["floor_input_grad"],
                         "floor_as_implemented": fl["floor_as_implemented"]})
    k_rows = [r for r in rows if r["sweep"] == "K"]
    l_rows = [r for r in rows if r["sweep"] == "L"]
    return {
        "benchmark": "scaling",
        "backend": backend,
        "rows": rows,
        "plain_s": [r["plain_step_s"] for r in rows],
        "timi_s": [r["guided_step_s"] for r in rows],
        "ratio": [r["ratio"] for r in rows],
        "ratio_definition": "1 + (t/T) * (guided one-step time / plain one-step time - 1), t/T of config",
        "ratio_spread_over_K": max(r["ratio"] for r in k_rows) - min(r["ratio"] for r in k_rows) if k_rows else None,
        # seconds of one guidance pass vs L ("no worse than linear in L"):
        "guidance_pass_s_over_L": [r["guided_step_s"] - r["plain_step_s"] for r in l_rows],
        "repeats": repeats,
        "warmup": warmup,
        "config": cfg.as_dict(),
        "machine": machine,
    }


def backends(cfg: BenchConfig, repeats: int = 3, guided: bool = True) -> dict:
    """The whole (guided) sampler: ``timi_jax.sample`` (compiled) vs ``TIMIPipeline`` on the same
    weights, noise, conditions and masks. ``ratio = jax_s / torch_s`` (< 1: JAX faster)."""
    from .jax_backend import JaxSampler, jax_available
    from .torch_backend import BenchModel

    why = jax_available()
    if why:
        raise RuntimeError(why)
    machine = machine_info()
    bench = BenchModel(cfg)
    js = JaxSampler(bench)
    compile_s = js.compile(guided)
    first_s, _ = timed(lambda: js.run(guided))  # JAX's warm-up: the first run of the compiled program
    res = interleaved({"torch": lambda: bench.sample(guided), "jax": lambda: js.run(guided)},
                      repeats=repeats, warmup=0)  # JAX's first run above is its warm-up
    torch_s, jax_s = res["torch"]["median_s"], res["jax"]["median_s"]
    diff = _latent_diff(_as_numpy(bench.sample(guided)), _as_numpy(js.run(guided)))
    return {
        "benchmark": "backends",
        "backend": "torch+jax",
        "guided": guided,
        "torch_s": torch_s,
        "jax_s": jax_s,
        "plain_s": None,
        "timi_s": {"torch": torch_s, "jax": jax_s},
        "ratio": jax_s / torch_s,
        "speedup_jax_over_torch": torch_s / jax_s,
        "jax_first_call_s": first_s,
        "jax_compile_s": compile_s,
        "torch_runs_s": res["torch"]["runs_s"],
        "jax_runs_s": res["jax"]["runs_s"],
        "max_abs_latent_diff_jax_vs_torch": diff,
        "jax_device": js.device,
        "repeats": repeats,
        "config": cfg.as_dict(),
        "machine": machine,
    }


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

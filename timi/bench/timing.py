"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a machine description."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

__all__ = ["interleaved", "machine_info", "write_json", "timed"]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call; ``fn`` must block until its work is done."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Run every function ``warmup`` times, then ``repeats`` rounds in alternating order (ABBA...) so
    slow drifts of a shared machine hit all of them alike.

    Returns ``{name: {"median_s", "runs_s", "warmup_s"}}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    names = list(fns)
    out = {n: {"runs_s": [], "warmup_s": []} for n in names}
    for _ in range(warmup):
        for n in names:
            out[n]["warmup_s"].append(timed(fns[n])[0])
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n]["runs_s"].append(timed(fns[n])[0])
    for n in names:
        out[n]["median_s"] = statistics.median(out[n]["runs_s"])
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model, cores, load, library versions and the UTC time (no GPU is used by these benchmarks
    unless torch/jax pick one; ``accelerator`` says which device ran)."""
    import torch

    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "hy3dgen": _version("hy3dgen"),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def write_json(result: dict, path) -> None:
    """Write ``result`` (adding the load average at the end of the run) to ``path``."""
    if hasattr(os, "getloadavg"):
        result.setdefault("machine", {})["load_avg_at_end"] = list(os.getloadavg())
    from timi.io import write_text

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text(p, json.dumps(result, indent=2, sort_keys=False) + "\n")  # atomic: no partial JSON


def limit_threads(threads: int) -> None:
    """``threads`` > 0: the process runs on its first ``threads`` usable CPUs (``sched_setaffinity``,
    which binds every thread, XLA's pool included) with ``threads`` torch intra-op threads.

    XLA's ``--xla_cpu_multi_thread_eigen=false`` does not bind XLA:CPU's own thread pool (measured:
    a "single-threaded" JAX forward used 1.9 cores on 2), so the affinity is what makes a
    ``--threads 1`` comparison of PyTorch and JAX one core against one core. Call it before JAX
    runs anything. On a shared machine one thread per process also avoids OpenMP barrier stalls
    that slowed 2-thread torch ~10x whenever another process took a core.
    """
    if threads <= 0:
        return
    import torch

    torch.set_num_threads(threads)
    if hasattr(os, "sched_setaffinity"):
        usable = sorted(os.sched_getaffinity(0))
        if threads < len(usable):
            os.sched_setaffinity(0, usable[:threads])

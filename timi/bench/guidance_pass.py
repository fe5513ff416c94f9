"""``guidance-pass``: one ISG + SGU pass (Eqs.2-7: forward through the first ``guided_layers``
double blocks, ``L_sep``, backward, SGU update) at the real Hunyuan3D shapes, fused vs explicit P.

Method. Each (mode, repeat) runs in a *fresh* Python subprocess (``python -m
timi.bench.guidance_pass --worker``) that builds hy3dgen's ``Hunyuan3DDiT`` with only the guided
double blocks (``depth=guided_layers``, ``depth_single_blocks=0``; the truncated forward never
reaches the others) and calls ``TIMIPipeline.guide`` once -- the adapter's own ISG + SGU step.

* time: wall clock of that call;
* memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's high-water mark of the
  process's resident set) after the call, minus the resident set just before it (``VmRSS`` in
  ``/proc/self/status``): the peak working memory of the pass itself, weights and inputs excluded.
  On a GPU: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the pass.
  torch has no CPU allocator statistics and ``tracemalloc`` does not see its allocations; a fresh
  process per mode keeps one mode's high-water mark out of the other's.

Modes are interleaved over repeats (fused, explicit, explicit, fused, ...).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from .config import BenchConfig

__all__ = ["guidance_pass", "run_pass"]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_pass(cfg: BenchConfig, mode: str) -> dict:
    """One guidance pass in *this* process: {seconds, baseline_rss_mib, peak_rss_mib, pass_peak_mib, loss}."""
    import torch

    from .torch_backend import BenchModel

    bench = BenchModel(cfg, attention=mode)
    pipe = bench.pipelines[True]
    B = cfg.batch_size
    z = bench.noise()
    timestep = torch.full((B,), 0.5, dtype=bench.base.dtype)        # mid-schedule; any t costs the same
    cond_main = bench.cond.to(bench.base.device, bench.base.dtype).expand(B, -1, -1)
    tokens = bench.tokens.expand(B, -1, -1)
    cuda = z.is_cuda
    if cuda:  # on a GPU: torch's allocator statistics instead of the process RSS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = _rss_mib()
    t0 = time.perf_counter()
    _, _, diag = pipe.guide(z, timestep, cond_main, tokens, None, step=0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mib()
    return {"mode": mode, "seconds": seconds, "baseline_rss_mib": baseline, "peak_rss_mib": peak,
            "pass_peak_mib": max(peak - baseline, 0.0), "loss": diag.loss, "scale": diag.scale,
            "memory_counter": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss - VmRSS"}


def _spawn(cfg: BenchConfig, mode: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "timi.bench.guidance_pass", "--worker", mode, "--threads", str(threads),
           json.dumps(cfg.as_dict())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"guidance-pass worker ({mode}) failed with exit code {proc.returncode}:\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def guidance_pass(cfg: BenchConfig, repeats: int = 1, threads: int = 0) -> dict:
    """Fused vs explicit guidance pass: median time and pass peak memory of each, their ratios."""
    from .timing import machine_info

    if cfg.depth_single_blocks or cfg.depth != cfg.guided_layers:
        raise ValueError("guidance-pass builds only the guided double blocks: use depth=guided_layers and "
                         f"depth_single_blocks=0 (got depth={cfg.depth}, single={cfg.depth_single_blocks}).")
    machine = machine_info()
    runs = {"fused": [], "explicit": []}
    for r in range(repeats):
        for mode in (("fused", "explicit") if r % 2 == 0 else ("explicit", "fused")):
            runs[mode].append(_spawn(cfg, mode, threads))
    med = {m: {"seconds": statistics.median(x["seconds"] for x in v),
               "pass_peak_mib": statistics.median(x["pass_peak_mib"] for x in v)} for m, v in runs.items()}
    lf, le = runs["fused"][0]["loss"][0], runs["explicit"][0]["loss"][0]
    return {
        "benchmark": "guidance-pass",
        "backend": "torch",
        "fused_s": med["fused"]["seconds"],
        "explicit_s": med["explicit"]["seconds"],
        "time_ratio": med["fused"]["seconds"] / med["explicit"]["seconds"],       # <= 1: fused no slower
        "fused_peak_mib": med["fused"]["pass_peak_mib"],
        "explicit_peak_mib": med["explicit"]["pass_peak_mib"],
        "memory_ratio": med["explicit"]["pass_peak_mib"] / max(med["fused"]["pass_peak_mib"], 1e-9),  # >= 2 target
        "plain_s": med["explicit"]["seconds"],     # the reference path, for tools reading plain/timi keys
        "timi_s": med["fused"]["seconds"],
        "ratio": med["fused"]["seconds"] / med["explicit"]["seconds"],
        "loss_rel_diff_fused_vs_explicit": abs(lf - le) / max(abs(le), 1e-12),
        "runs": runs,
        "memory_method": "ru_maxrss after the pass minus VmRSS before it, one fresh subprocess per run",
        "repeats": repeats,
        "threads": threads,
        "config": cfg.as_dict(),
        "machine": machine,
    }


def _worker_main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="internal: one guidance pass, JSON on stdout")
    ap.add_argument("--worker", required=True, choices=["fused", "explicit"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("config")
    a = ap.parse_args(argv)
    from .timing import limit_threads

    limit_threads(a.threads)
    print(json.dumps(run_pass(BenchConfig(**json.loads(a.config)), a.worker)))


if __name__ == "__main__":
    _worker_main()

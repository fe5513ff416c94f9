"""``timi bench gpu``: the figures a lent GPU should give, in one command (issue 29).

1. full-size Hunyuan3D-2.0 DiT (random weights, fp16), 50 steps: plain vs TIMI (``overhead``);
2. volume decoding of hy3dgen 2.0's full-width ShapeVAE (random weights) at octree 384, dense vs
   coarse-to-fine (``timi bench mesh --full-width``);
3. the whole guided sampler, JAX vs PyTorch (``backends``).

Each part is timed and kept apart: one that fails (JAX missing, out of memory) is recorded with its
one-line error and the others still run. ``--tiny`` runs the same parts on toy sizes on the CPU
(CI). The result is one JSON and one Markdown table, with the paper's figures beside.
"""

from __future__ import annotations

import time
import traceback
from typing import Callable

#: The paper's per-scene times on one GPU (Table 1: Hunyuan3D-2.0 base, and with TIMI).
PAPER_S = {"base": 54.2, "timi": 59.2}


def _part(name: str, fn: Callable[[], dict], say: Callable[[str], None]) -> dict:
    say(f"{name} ...")
    t0 = time.perf_counter()
    try:
        out = {"ok": True, **fn()}
    except Exception as e:  # one part failing must not lose the others' figures
        out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
               "traceback": traceback.format_exc()[-2000:]}
    out["wall_s"] = time.perf_counter() - t0
    say(f"{name}: {'done' if out['ok'] else out['error']} ({out['wall_s']:.1f} s)")
    return out


def run_suite(tiny: bool = False, repeats: int = 2, device: str | None = None,
              say: Callable[[str], None] = lambda s: None) -> dict:
    """The three parts (module docstring); ``repeats`` timed rounds of the samplers."""
    import torch

    from timi.pipelines import resolve_device

    from . import mesh as bench_mesh
    from .config import full_size_config, tiny_config
    from .runs import backends, overhead
    from .timing import machine_info

    dev = resolve_device(device)
    cfg = tiny_config() if tiny else full_size_config()
    resolutions = (32, 64) if tiny else (384,)
    vae_params = bench_mesh.TINY_VAE if tiny else bench_mesh.FULL_WIDTH_VAE
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32

    def mesh_part() -> dict:
        vae, z = bench_mesh.full_width_vae(device=dev, dtype=dtype, params=vae_params)
        rows = bench_mesh.bench_latents(vae, [z], resolutions, ["coarse-to-fine"], names=["random latent"])
        return {"rows": rows, "summary": bench_mesh.summary(rows), "table": bench_mesh.markdown(rows)}

    parts = {
        "overhead": _part("DiT plain vs TIMI", lambda: overhead(cfg, "torch", repeats=repeats, warmup=1,
                                                                _machine=False), say),
        "mesh": _part("volume decoding", mesh_part, say),
        "backends": _part("JAX vs PyTorch", lambda: backends(cfg, repeats=repeats), say),
    }
    return {"benchmark": "gpu", "tiny": tiny, "device": dev, "parts": parts, "paper_s": PAPER_S,
            "machine": machine_info()}


def _f(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    """One table of the headline figures (and the decoding table), with the paper's beside."""
    p = result["parts"]
    o, m, b = p["overhead"], p["mesh"], p["backends"]
    lines = [f"`timi bench gpu{' --tiny' if result['tiny'] else ''}` on {result['device']} "
             f"({result['machine'].get('accelerator')}; {result['machine'].get('cpu', '')})", "",
             "| figure | value | paper (one GPU, whole scene) |", "|---|---|---|"]
    if o["ok"]:
        lines += [f"| DiT sampling, plain (s) | {_f(o['plain_s'])} | {PAPER_S['base']} s (base model) |",
                  f"| DiT sampling, TIMI (s) | {_f(o['timi_s'])} | {PAPER_S['timi']} s (TIMI) |",
                  f"| TIMI / plain | {_f(o['ratio'], '.3f')} | {PAPER_S['timi'] / PAPER_S['base']:.3f} |"]
    else:
        lines.append(f"| DiT plain vs TIMI | failed: {o['error']} | |")
    if m["ok"]:
        for s in m["summary"]:
            lines.append(f"| volume decoding, octree {s['resolution']}, {s['decoding']} (s) | {_f(s['seconds'])} "
                         f"(IoU {s['min_iou']:.4f}) | |")
    else:
        lines.append(f"| volume decoding | failed: {m['error']} | |")
    if b["ok"]:
        lines += [f"| guided sampler, PyTorch (s) | {_f(b['torch_s'])} | |",
                  f"| guided sampler, JAX (s) | {_f(b['jax_s'])} (+ {_f(b['jax_compile_s'])} s compile) | |"]
    else:
        lines.append(f"| JAX vs PyTorch | failed: {b['error']} | |")
    if m["ok"]:
        lines += ["", m["table"]]
    return "\n".join(lines)

"""Markdown tables from ``timi bench ... --json`` results (what ``docs/benchmarks.md`` shows)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["render"]


def _f(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _overhead(rs: list[dict]) -> list[str]:
    out = ["| backend | steps (guided) | plain s | TIMI s | TIMI / plain | from guidance-pass time | FLOP floor (b=2) "
           "| floor (b=1) | floor as implemented | target |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        c = r["config"]
        out.append(f"| {r['backend']} | {c['steps']} ({c['guided_steps']}) | {_f(r['plain_s'], 2)} | "
                   f"{_f(r['timi_s'], 2)} | **{_f(r['ratio'])}** | {_f(r.get('ratio_from_guide_time', r.get('ratio_from_step_times')))} | "
                   f"{_f(r['floor'])} | {_f(r['floor_input_grad'])} | {_f(r.get('floor_as_implemented'))} | "
                   f"<= {r['target_ratio']} |")
    extra = [f"- {r['backend']}: runs plain {[round(x, 2) for x in r['plain_runs_s']]} s, TIMI "
             f"{[round(x, 2) for x in r['timi_runs_s']]} s" +
             (f"; one guidance pass {_f(r['guide_s_per_guided_step'])} s vs one plain CFG step "
              f"{_f(r['plain_step_s'])} s" if "guide_s_per_guided_step" in r else "") +
             (f"; JAX compile {_f(r['compile_s']['plain'], 1)} s (plain), {_f(r['compile_s']['timi'], 1)} s (TIMI)"
              if "compile_s" in r else "") for r in rs]
    return out + [""] + extra


def _guidance(r: dict) -> list[str]:
    c = r["config"]
    return [f"Shapes: hidden {c['hidden_size']}, {c['num_heads']} heads, L={c['num_latents']}, "
            f"M={c['num_cond_tokens']}, K={c['num_instances']}, {c['guided_layers']} double blocks, batch "
            f"{c['batch_size']}, {c['dtype']}; {r['repeats']} fresh process(es) per mode, {r.get('threads', 0)} thread(s).",
            "",
            "| P path | time s | pass peak memory MiB |", "|---|---|---|",
            f"| fused (masks as extra SDPA values, one call per block) | {_f(r['fused_s'], 2)} | {_f(r['fused_peak_mib'], 0)} |",
            f"| explicit softmax | {_f(r['explicit_s'], 2)} | {_f(r['explicit_peak_mib'], 0)} |",
            "",
            f"Time fused / explicit **{_f(r['time_ratio'])}** (target <= 1); memory explicit / fused "
            f"**{_f(r['memory_ratio'], 2)}** (target >= 2); L_sep relative difference between the paths "
            f"{r['loss_rel_diff_fused_vs_explicit']:.1e}."]


def _backends(r: dict) -> list[str]:
    c = r["config"]
    return ["| sampler | steps (guided) | PyTorch s | JAX s | JAX compile s | JAX / PyTorch time | max abs latent diff |",
            "|---|---|---|---|---|---|---|",
            f"| {'TIMI' if r['guided'] else 'plain'} | {c['steps']} ({c['guided_steps']}) | {_f(r['torch_s'], 2)} | "
            f"{_f(r['jax_s'], 2)} | {_f(r['jax_compile_s'], 1)} | **{_f(r['ratio'])}** | "
            f"{r['max_abs_latent_diff_jax_vs_torch']:.1e} |"]


def _scaling(r: dict) -> list[str]:
    c = r["config"]
    out = [f"One-step samplers (plain vs guided), {r['repeats']} interleaved repeat(s) after {r.get('warmup', 0)} "
           f"warm-up per point, backend {r['backend']}; overhead for the {c['steps']}-step / {c['guided_steps']}-guided "
           "schedule = 1 + (t/T)(guided step / plain step - 1).",
           "", "| sweep | K | L | plain step s | guided step s | overhead | FLOP floor | floor as implemented |",
           "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['sweep']} | {row['K']} | {row['L']} | {_f(row['plain_step_s'], 3)} | "
                   f"{_f(row['guided_step_s'], 3)} | {_f(row['ratio'])} | {_f(row['floor'])} | "
                   f"{_f(row.get('floor_as_implemented'))} |")
    return out


def _machine(m: dict) -> list[str]:
    return [f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs (usable {m['usable_cpus']}), torch threads "
            f"{m['torch_threads']}; accelerator: {m['accelerator']}",
            f"- torch {m['torch']}, jax {m['jax']} / jaxlib {m['jaxlib']}, flax {m['flax']}, hy3dgen {m['hy3dgen']}, "
            f"Python {m['python']}",
            f"- run at {m['utc']}, load average at start {m.get('load_avg_1_5_15')}, at end {m.get('load_avg_at_end')}"]


def render(paths) -> str:
    """Markdown for the given result files, grouped by benchmark, with each run's machine line."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    lines: list[str] = []
    overheads = [r for r in results if r.get("benchmark") == "overhead"]
    if overheads:
        lines += ["### overhead", ""] + _overhead(overheads) + [""]
    for r in results:
        kind = r.get("benchmark")
        if kind == "guidance-pass":
            lines += ["### guidance-pass", ""] + _guidance(r) + [""]
        elif kind == "backends":
            lines += ["### backends", ""] + _backends(r) + [""]
        elif kind == "scaling":
            lines += ["### scaling", ""] + _scaling(r) + [""]
    lines += ["### machine (per result file)", ""]
    for p, r in zip(paths, results):
        lines += [f"`{Path(p).name}`:"] + _machine(r["machine"]) + [""]
    return "\n".join(lines)

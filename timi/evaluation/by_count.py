"""Every paired table split by the scene's instance count (issue 36 item 4), read from ``per_scene.csv``.

``timi eval`` writes one row per (run, scene[@seed]) with the scene's ground-truth instance count
``n_gt``; this module pairs each run with the base model on the same (scene, seed) and reports, for
2, 3 and 4 instances and pooled: the surface area over the base's (geometric mean), and the paired
differences run - base of SSR, SSR at matched size, FS-S and LCD, each with its 90 % bootstrap
interval (:func:`timi.evaluation.paired.bootstrap_mean_interval`, the interval every table uses). Runs
from several ``--out`` folders (e.g. a variants folder and its seeds) can be read together.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .paired import LEVEL, bootstrap_mean_interval
from .report import geometric_mean_interval

__all__ = ["read_rows", "by_count", "by_count_markdown", "BASE_LABEL"]

BASE_LABEL = "base model (no TIMI)"
#: (column, label, sign for "better"): the differences reported
METRICS = (("ssr", "SSR", 1), ("matched_ssr", "SSR, matched size", 1), ("fs_s", "FS-S", 1), ("lcd", "LCD", -1))


def read_rows(paths) -> dict[str, dict[str, dict]]:
    """``{run label: {scene: row}}`` from ``per_scene.csv`` files (or folders holding one); status ok only."""
    out: dict[str, dict[str, dict]] = {}
    for p in map(Path, paths):
        p = p / "per_scene.csv" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no per_scene.csv (run `timi eval` or `timi testbed variants` with --out).")
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                if r["status"] == "ok":
                    out.setdefault(r["run"], {})[r["scene"]] = r
    return out


def _float(row: dict, key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


def by_count(rows: dict[str, dict[str, dict]], run: str, base: str = BASE_LABEL, counts=(2, 3, 4)) -> list[dict]:
    """One dict per instance count (and ``"all"``): pairs, area / base with interval, and per metric the
    mean difference run - base with its interval (matched-size SSR: the run's matched score minus the
    base's own)."""
    if run not in rows or base not in rows:
        raise KeyError(f"no rows for {run if run not in rows else base!r}; runs found: {sorted(rows)}.")
    pairs = [(rows[run][s], rows[base][s]) for s in rows[run] if s in rows[base]]
    out = []
    for k in list(counts) + ["all"]:
        sel = [(a, b) for a, b in pairs if k == "all" or int(_float(b, "n_gt")) == k]
        entry = {"k": k, "pairs": len(sel)}
        ratios = [_float(a, "area") / _float(b, "area") for a, b in sel if _float(a, "area") > 0 and _float(b, "area") > 0]
        entry["area"] = geometric_mean_interval(ratios) if ratios else (math.nan,) * 3
        for key, _, _ in METRICS:
            own = "ssr" if key == "matched_ssr" else key
            d = np.array([_float(a, key) - _float(b, own) for a, b in sel])
            d = d[np.isfinite(d)]
            entry[key] = (float(d.mean()), *bootstrap_mean_interval(d)) if d.size else (math.nan,) * 3
        out.append(entry)
    return out


def _cell(mean: float, lo: float, hi: float, sign: int) -> str:
    if math.isnan(mean):
        return "n/a"
    bold = lo > 0 or hi < 0
    verdict = "" if not bold else (" **better**" if (lo > 0) == (sign > 0) else " **worse**")
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{verdict}"


def by_count_markdown(rows: dict[str, dict[str, dict]], runs=None, base: str = BASE_LABEL) -> str:
    """One table per run (every run but the base by default), rows 2 / 3 / 4 instances and pooled."""
    runs = [r for r in (runs or sorted(rows)) if r != base]
    head = ["instances", "pairs", "area / base"] + [f"{label} - base" for _, label, _ in METRICS]
    lines = [f"Paired (scene, seed) differences vs `{base}`; {LEVEL:.0%} bootstrap intervals; **bold**: the "
             "interval excludes 0."]
    for run in runs:
        lines += ["", f"### {run}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in by_count(rows, run, base):
            m, lo, hi = e["area"]
            area = "n/a" if math.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
            cells = [_cell(*e[key], sign) for key, _, sign in METRICS]
            lines.append("| " + " | ".join([str(e["k"]), str(e["pairs"]), area] + cells) + " |")
    return "\n".join(lines) + "\n"

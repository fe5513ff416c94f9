"""Which way SSR moves (issue 12): part-count transitions base -> run, and fusion against the gap.

SSR (Eq.10) is ``min(Np, Ng) / max(Np, Ng)``: it is below 1 both when instances fuse (fewer
separate parts than instances) and when one breaks into fragments (more). A guidance that splits
some fused scenes and fragments others can leave the mean SSR unchanged. From a ``timi eval
--baseline`` output (``per_scene.csv``) and the scenes' ``layout.json`` (``timi testbed scenes``):

* :func:`transitions`: for each (scene, seed) pair, the base model's part-count category (fewer /
  right / more) against the run's, a 3 x 3 count table;
* :func:`fusion_by_gap`: the share of pairs with fewer parts than instances per range of the
  scene's smallest placement gap (``layout.json`` ``gaps``, in hy3dgen's box units).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

CATEGORIES = ("fewer", "right", "more")


def _category(n_pred: int, n_gt: int) -> str:
    return "fewer" if n_pred < n_gt else "more" if n_pred > n_gt else "right"


def read_part_counts(per_scene_csv: str | Path, label: str) -> dict[str, tuple[int, int]]:
    """``{scene id (with @seed): (n_pred, n_gt)}`` of the scored rows of run ``label``."""
    rows = {}
    with open(per_scene_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["run"] == label and r["status"] == "ok":
                rows[r["scene"]] = (int(r["n_pred"]), int(r["n_gt"]))
    if not rows:
        raise ValueError(f"{per_scene_csv} has no scored rows of run {label!r}.")
    return rows


def transitions(per_scene_csv: str | Path, base_label: str, run_label: str) -> dict[str, dict[str, int]]:
    """``counts[base category][run category]`` over the pairs scored in both runs."""
    base, run = read_part_counts(per_scene_csv, base_label), read_part_counts(per_scene_csv, run_label)
    counts = {a: {b: 0 for b in CATEGORIES} for a in CATEGORIES}
    for sid in sorted(set(base) & set(run)):
        counts[_category(*base[sid])][_category(*run[sid])] += 1
    return counts


def smallest_gap(scene_dir: str | Path) -> float:
    """The smallest placement gap of a testbed scene (``layout.json``)."""
    gaps = json.loads((Path(scene_dir) / "layout.json").read_text()).get("gaps") or []
    if not gaps:
        raise ValueError(f"{scene_dir}/layout.json lists no gaps (not a multi-instance testbed scene).")
    return float(min(gaps))


def fusion_by_gap(per_scene_csv: str | Path, dataset_dir: str | Path, label: str,
                  edges=(0.0, 0.07, 0.1, 1.0)) -> list[dict]:
    """Per gap range ``[lo, hi)``: pairs, and the share with fewer parts than instances (fused)."""
    counts = read_part_counts(per_scene_csv, label)
    gaps = {sid: smallest_gap(Path(dataset_dir) / sid.split("@")[0]) for sid in counts}
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ids = [s for s in counts if lo <= gaps[s] < hi]
        fused = sum(_category(*counts[s]) == "fewer" for s in ids)
        out.append({"low": lo, "high": hi, "pairs": len(ids), "fused": fused,
                    "share_fused": fused / len(ids) if ids else float("nan")})
    return out


def fusion_markdown(per_scene_csv: str | Path, dataset_dir: str | Path, base_label: str,
                    run_labels: list[str], edges=(0.0, 0.07, 0.1, 1.0)) -> str:
    """Both tables as Markdown: transitions base -> each run, and fusion by gap for every run."""
    lines = []
    for label in run_labels:
        t = transitions(per_scene_csv, base_label, label)
        n = sum(sum(row.values()) for row in t.values())
        lines += [f"### {base_label} -> {label} ({n} pairs): separate parts vs instances\n",
                  "| base \\ run | " + " | ".join(CATEGORIES) + " |", "|---|---|---|---|"]
        lines += [f"| {a} | " + " | ".join(str(t[a][b]) for b in CATEGORIES) + " |" for a in CATEGORIES]
        lines.append("")
    head = "| run | " + " | ".join(f"gap [{lo:g}, {hi:g}): fused" for lo, hi in zip(edges[:-1], edges[1:])) + " |"
    lines += ["### Share of pairs with fewer parts than instances, by the scene's smallest gap\n", head,
              "|---|" + "---|" * (len(edges) - 1)]
    for label in [base_label, *run_labels]:
        rows = fusion_by_gap(per_scene_csv, dataset_dir, label, edges)
        lines.append(f"| {label} | " + " | ".join(f"{r['fused']}/{r['pairs']}" + (f" ({100 * r['share_fused']:.0f} %)"
                                                                               if r["pairs"] else "") for r in rows) + " |")
    return "\n".join(lines) + "\n"


def spearman_gap_fusion(per_scene_csv: str | Path, dataset_dir: str | Path, label: str):
    """Spearman correlation (scipy) between the smallest gap and the part-count shortfall
    ``max(0, n_gt - n_pred)``: negative when wider gaps fuse less."""
    from scipy.stats import spearmanr

    counts = read_part_counts(per_scene_csv, label)
    ids = sorted(counts)
    gap = np.array([smallest_gap(Path(dataset_dir) / s.split("@")[0]) for s in ids])
    short = np.array([max(0, counts[s][1] - counts[s][0]) for s in ids])
    res = spearmanr(gap, short)
    return float(res.statistic), float(res.pvalue), len(ids)

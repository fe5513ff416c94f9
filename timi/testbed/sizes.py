"""How large the generated surfaces are (issue 12): does a guided run separate instances or shrink them?

A guidance can raise SSR (Eq.10) without any instance-aware change: if it makes every shape thinner,
gaps open between adjacent instances and fused pairs come apart, while the scene's F-score falls.
From the meshes that ``timi eval`` caches (``OUT/cache/<run>/<scene>/scene.ply``):

* :func:`area_table`: for each (scene, seed) pair, the surface area of a run's scene mesh over the
  base model's, summarised by the geometric mean with a paired bootstrap interval on the log ratios
  (a surface scaled by ``s`` has ``s**2`` times the area), and the area of each run's meshes over
  the ground truth's (the sum of ``gt/instance_XX.ply``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh


def surface_areas(run_dir: str | Path) -> dict[str, float]:
    """``{scene id: surface area of its cached scene.ply}`` for one cached run folder."""
    return {p.parent.name: float(trimesh.load(p, force="mesh").area) for p in sorted(Path(run_dir).glob("*/scene.ply"))}


def ground_truth_area(scene_dir: str | Path) -> float:
    """Total surface area of a testbed scene's ground-truth instances (``gt/instance_XX.ply``)."""
    meshes = sorted(Path(scene_dir).glob("gt/instance_*.ply"))
    if not meshes:
        raise FileNotFoundError(f"{scene_dir}: no gt/instance_*.ply")
    return float(sum(trimesh.load(p, force="mesh").area for p in meshes))


def geometric_mean_interval(ratios: np.ndarray) -> tuple[float, float, float]:
    """Geometric mean of positive ratios and the bootstrap interval of it (on the log ratios)."""
    from timi.evaluation.paired import bootstrap_mean_interval

    logs = np.log(np.asarray(ratios, dtype=float))
    lo, hi = bootstrap_mean_interval(logs)
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


def area_table(dataset_dir: str | Path, eval_out: str | Path, labels: list[str], base_label: str,
               seeds: tuple[int, ...] = (0,)) -> str:
    """Markdown: per run, area over the base model's (paired) and over the ground truth's."""
    from timi.evaluation.runner import cached_runs

    areas: dict[str, dict[str, float]] = {}
    for seed in seeds:
        runs = cached_runs(eval_out, seed)
        for label in [base_label, *labels]:
            if label not in runs:
                raise FileNotFoundError(f"{eval_out}: no cached run labelled {label!r} for seed {seed}; "
                                        f"found {sorted(runs)}")
            for sid, area in surface_areas(runs[label]).items():
                areas.setdefault(label, {})[f"{sid}@seed{seed}"] = area
    gt = {}
    lines = ["| run | pairs | area / base (geometric mean) [90 %] | area / ground truth (geometric mean) |",
             "|---|---|---|---|"]
    for label in [base_label, *labels]:
        mine = areas[label]
        for key in mine:
            sid = key.split("@seed")[0]
            if sid not in gt:
                gt[sid] = ground_truth_area(Path(dataset_dir) / sid)
        to_gt = float(np.exp(np.mean(np.log([mine[k] / gt[k.split("@seed")[0]] for k in mine]))))
        if label == base_label:
            lines.append(f"| {label} | {len(mine)} | 1 | {to_gt:.3f} |")
            continue
        common = sorted(set(mine) & set(areas[base_label]))
        if not common:
            raise ValueError(f"run {label!r} and the base share no (scene, seed) pair.")
        g, lo, hi = geometric_mean_interval([mine[k] / areas[base_label][k] for k in common])
        lines.append(f"| {label} | {len(common)} | {g:.3f} [{lo:.3f}, {hi:.3f}] | {to_gt:.3f} |")
    return "\n".join(lines)

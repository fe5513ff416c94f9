"""Score one generated scene against its ground-truth instances: the six numbers of Table 1.

LCD (Eqs.8-9), CD-S, FS-S (scene level), SSR (Eq.10), CD-O, FS-O (object level). Every convention
and its source is listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import trimesh

from .alignment import (ICP_ITERATIONS, icp_align, icp_align_search, normalize_per_axis,
                        scene_normalization)
from .instances import (MIN_AREA_FRACTION, layout_consistency_distance, match_parts_to_instances,
                        separation_success_rate, split_instances)
from .pointclouds import (FSCORE_THRESHOLD, POINTS_PER_OBJECT, chamfer_distance, check_mesh, f_score,
                          sample_surface_points)

#: The six metrics of Table 1 in the paper's column order (lower is better for LCD, CD-*).
METRIC_NAMES = ("lcd", "cd_s", "fs_s", "ssr", "cd_o", "fs_o")
METRIC_LABELS = {"lcd": "LCD ↓", "cd_s": "CD-S ↓", "fs_s": "FS-S ↑", "ssr": "SSR ↑",
                 "cd_o": "CD-O ↓", "fs_o": "FS-O ↑"}
ALIGN_MODES = ("icp", "icp-search", "none")


@dataclass(frozen=True)
class SceneScores:
    """The six Table-1 numbers for one scene, plus the counts and per-object values behind them."""

    lcd: float
    cd_s: float
    fs_s: float
    ssr: float
    cd_o: float
    fs_o: float
    n_pred: int
    n_gt: int
    cd_objects: tuple[float, ...] = ()
    fs_objects: tuple[float, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cd_objects"], d["fs_objects"] = list(self.cd_objects), list(self.fs_objects)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SceneScores":
        d = dict(d)
        d["cd_objects"], d["fs_objects"] = tuple(d.get("cd_objects", ())), tuple(d.get("fs_objects", ()))
        return cls(**d)


def _check_instances(meshes, what: str) -> list[trimesh.Trimesh]:
    if isinstance(meshes, trimesh.Trimesh) or not isinstance(meshes, Sequence):
        raise TypeError(f"{what} must be a list of trimesh.Trimesh (one per instance).")
    if len(meshes) == 0:
        raise ValueError(f"{what} is empty: at least one instance mesh is needed.")
    return [check_mesh(m, f"{what}[{i}]") for i, m in enumerate(meshes)]


def score_scene(pred: trimesh.Trimesh | Sequence[trimesh.Trimesh], gt_instances: Sequence[trimesh.Trimesh], *,
                points_per_object: int = POINTS_PER_OBJECT, threshold: float = FSCORE_THRESHOLD,
                seed: int = 0, align: str = "icp", icp_iterations: int = ICP_ITERATIONS,
                min_area_fraction: float = MIN_AREA_FRACTION, icp_points: int | None = None) -> SceneScores:
    """Score a prediction against the ground-truth instance meshes of one scene.

    ``pred``: either one scene mesh (the instances are then its connected components without
    specks, matched to ground truth by centroid, see :func:`match_parts_to_instances`) or a list of
    per-instance meshes, paired with ``gt_instances`` by index (MIDI's convention: mask order).

    ``align``: ``"icp"`` (default: both scenes normalised to the [-0.95, 0.95] box, then rigid ICP of
    the prediction onto the ground truth, ``icp_iterations`` steps, as MIDI), ``"icp-search"`` (ICP
    from each of the 24 axis rotations, best kept) or ``"none"`` (the prediction is already in the
    ground truth's frame; both get the ground truth's normalisation, no ICP anywhere).

    ``icp_points``: fit each ICP on at most this many predicted points (seeded subset; the transform
    is applied to all points and every metric uses all points). ``None`` (default) fits on all points,
    as MIDI; a few thousand give nearly the same transform several times faster (docs/metrics.md).

    All distances are in the normalised ground-truth frame (longest side 1.9), so ``threshold`` and
    the CD values mean the same for every scene. Sampling is seeded: ``seed`` fixes every draw.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align={align!r} is unknown; use one of {ALIGN_MODES}.")
    gt = _check_instances(gt_instances, "gt_instances")
    if isinstance(pred, trimesh.Trimesh):
        pred_scene = check_mesh(pred, "pred")
        pred_instances = None
    else:
        pred_instances = _check_instances(pred, "pred")
        if len(pred_instances) != len(gt):
            raise ValueError(
                f"pred has {len(pred_instances)} instance meshes but there are {len(gt)} ground-truth "
                "instances; per-instance predictions are paired by index. Pass one scene mesh instead "
                "to have its parts matched to the ground truth."
            )
        pred_scene = trimesh.util.concatenate(pred_instances)
    gt_scene = trimesh.util.concatenate(gt)
    n_scene = points_per_object * len(gt)

    # speck-free connected components: N_pred, parts of an unsplit prediction, normalisation box
    components = split_instances(pred_scene, min_area_fraction, "pred scene")

    # --- scene level: common frame, alignment, CD-S / FS-S -------------------------------------
    to_gt = scene_normalization(gt_scene.bounds)
    gt_points = trimesh.transform_points(sample_surface_points(gt_scene, n_scene, [seed, 0], "gt scene"), to_gt)
    pred_points = sample_surface_points(pred_scene, n_scene, [seed, 0], "pred scene")
    if align == "none":
        to_pred = to_gt
    else:
        # the box of the speck-free geometry: a far floater must not shrink the scene
        pre = scene_normalization(trimesh.util.concatenate(components).bounds)
        fit = icp_align_search if align == "icp-search" else icp_align
        moved = trimesh.transform_points(pred_points, pre)
        to_pred = fit(moved, gt_points, icp_iterations, max_points=icp_points, seed=seed).matrix @ pre
    pred_points = trimesh.transform_points(pred_points, to_pred)
    cd_s = chamfer_distance(pred_points, gt_points)
    fs_s = f_score(pred_points, gt_points, threshold)

    # --- instances: N_pred, centroids, LCD, SSR ------------------------------------------------
    n_pred = len(components)
    ssr = separation_success_rate(n_pred, len(gt))
    parts = pred_instances if pred_instances is not None else components
    part_centroids = trimesh.transform_points(np.array([p.centroid for p in parts]), to_pred)
    gt_centroids = trimesh.transform_points(np.array([g.centroid for g in gt]), to_gt)
    lcd = layout_consistency_distance(part_centroids, gt_centroids)

    # --- object level: pairing, per-axis normalisation, ICP, CD-O / FS-O ------------------------
    if pred_instances is not None:
        groups = [[i] for i in range(len(gt))]
    else:
        groups = match_parts_to_instances(part_centroids, gt_centroids)
    cd_objects, fs_objects = [], []
    for i, (g_mesh, group) in enumerate(zip(gt, groups)):
        p_mesh = trimesh.util.concatenate([parts[j] for j in group])
        p = sample_surface_points(p_mesh, points_per_object, [seed, 1, i], f"pred object {i}")
        g = sample_surface_points(g_mesh, points_per_object, [seed, 1, i], f"gt object {i}")
        p = normalize_per_axis(trimesh.transform_points(p, to_pred))
        g = normalize_per_axis(trimesh.transform_points(g, to_gt))
        if align != "none":
            p = icp_align(p, g, icp_iterations, max_points=icp_points, seed=seed).points
        cd_objects.append(chamfer_distance(p, g))
        fs_objects.append(f_score(p, g, threshold))

    return SceneScores(
        lcd=lcd, cd_s=cd_s, fs_s=fs_s, ssr=ssr,
        cd_o=float(np.mean(cd_objects)), fs_o=float(np.mean(fs_objects)),
        n_pred=n_pred, n_gt=len(gt), cd_objects=tuple(cd_objects), fs_objects=tuple(fs_objects),
    )

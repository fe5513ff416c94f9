"""Instance-level metrics: instance counting, Separation Success Rate (Eq.10), Layout Consistency
Distance (Eqs.8-9) and matching of predicted parts to ground-truth instances."""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from .pointclouds import as_points, check_mesh

#: A connected component whose surface area is below this share of the whole mesh's area is a
#: speck (marching-cubes floater) and is not counted as an instance. The paper gives no value;
#: at Hunyuan3D's octree resolution 384 a few-voxel floater is ~1e-4 of a scene's area, while a
#: genuine object 1/30 of the scene's size is still ~1e-3 of it. See docs/metrics.md.
MIN_AREA_FRACTION = 1e-3


def split_instances(mesh: trimesh.Trimesh, min_area_fraction: float = MIN_AREA_FRACTION,
                    name: str = "mesh") -> list[trimesh.Trimesh]:
    """Connected components of ``mesh`` (faces sharing a vertex after merging coincident vertices),
    largest first, without specks smaller than ``min_area_fraction`` of the total area."""
    check_mesh(mesh, name)
    if not 0 <= min_area_fraction < 1:
        raise ValueError(f"min_area_fraction must be in [0, 1); got {min_area_fraction!r}.")
    merged = mesh.copy()
    merged.merge_vertices()
    parts = merged.split(only_watertight=False)
    total = float(sum(p.area for p in parts))
    kept = [p for p in parts if p.area >= min_area_fraction * total and p.area > 0]
    return sorted(kept, key=lambda p: -p.area)


def count_instances(mesh: trimesh.Trimesh, min_area_fraction: float = MIN_AREA_FRACTION) -> int:
    """Number of independent instances in ``mesh``: connected components after removing specks
    (components below ``min_area_fraction`` of the total surface area). Used as N_pred in Eq.10."""
    return len(split_instances(mesh, min_area_fraction))


def separation_success_rate(n_pred: int, n_gt: int) -> float:
    """Eq.10: ``SSR = min(N_pred, N_gt) / max(N_pred, N_gt)``; 0 when nothing is predicted."""
    for name, n in (("n_pred", n_pred), ("n_gt", n_gt)):
        if isinstance(n, bool) or not float(n).is_integer() or n < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {n!r}.")
    if n_gt == 0:
        raise ValueError("n_gt is 0: a scene without ground-truth instances cannot be scored.")
    return min(n_pred, n_gt) / max(n_pred, n_gt)


PART_COUNT_CLASSES = ("fewer", "right", "more")


def part_count_class(n_pred: int, n_gt: int) -> str:
    """Which way a part count misses: ``fewer`` separate parts than instances (some fused or bridged),
    the ``right`` number, or ``more`` (fragments). SSR (Eq.10) is below 1 either way; this tells which."""
    return "fewer" if n_pred < n_gt else "more" if n_pred > n_gt else "right"


def layout_consistency_distance(pred_centroids, gt_centroids) -> float:
    """Eqs.8-9: centroid Chamfer distance with **Euclidean** (not squared) distances.

    ``LCD = mean_{x in C_pred} min_y |x - y| + mean_{y in C_gt} min_x |y - x|`` for ``(P, 3)`` and
    ``(G, 3)`` arrays of instance centroids.
    """
    pred = as_points(pred_centroids, "pred_centroids")
    gt = as_points(gt_centroids, "gt_centroids")
    d = cdist(pred, gt)
    return float(d.min(axis=1).mean() + d.min(axis=0).mean())


def match_parts_to_instances(part_centroids, gt_centroids) -> list[list[int]]:
    """Assign predicted parts to ground-truth instances by their centroids; every instance gets parts.

    1. One-to-one Hungarian assignment (:func:`scipy.optimize.linear_sum_assignment`) minimising the
       summed centroid distance.
    2. A ground-truth instance left without a part (fewer parts than instances: fused prediction)
       shares the part with the nearest centroid, so the fusion shows in its object-level scores.
    3. A part left unassigned (more parts than instances: a fractured object) joins the instance
       with the nearest centroid, so no predicted geometry is dropped.

    Returns, for each ground-truth instance, the indices of its parts.
    """
    parts = as_points(part_centroids, "part_centroids")
    gt = as_points(gt_centroids, "gt_centroids")
    d = cdist(parts, gt)
    rows, cols = linear_sum_assignment(d)
    groups: list[list[int]] = [[] for _ in range(len(gt))]
    for r, c in zip(rows, cols):
        groups[c].append(int(r))
    assigned = set(int(r) for r in rows)
    for p in range(len(parts)):
        if p not in assigned:
            groups[int(np.argmin(d[p]))].append(p)
    for g in range(len(gt)):
        if not groups[g]:
            groups[g].append(int(np.argmin(d[:, g])))
    return [sorted(g) for g in groups]

"""Point-set metrics: surface sampling, Chamfer distance and F-score (MIDI's conventions).

Conventions (see ``docs/metrics.md``; source: VAST-AI-Research/MIDI-3D ``midi/utils/metrics.py``):

* Chamfer distance is the sum of the two mean **squared** nearest-neighbour distances,
  ``CD = mean_a min_b |a-b|^2 + mean_b min_a |b-a|^2`` (MIDI's CUDA kernel returns squared
  distances; ``compute_chamfer_distance`` adds the two means).
* F-score uses **Euclidean** (not squared) nearest-neighbour distances with a strict test
  ``d < threshold``: precision = share of ``a`` within the threshold of ``b``, recall = share of
  ``b`` within the threshold of ``a``, ``F = 2PR / (P + R)`` (0 when both are 0; MIDI adds 1e-8 to the
  denominator instead, which differs by < 1e-7).

Nearest neighbours come from :class:`scipy.spatial.cKDTree` (exact).
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

#: Points sampled per object surface (MIDI: ``num_surface_samples_per_object = 20480`` and
#: ``trimesh.sample.sample_surface(mesh, 20480)`` for predictions).
POINTS_PER_OBJECT = 20480
#: F-score distance threshold (MIDI: ``compute_fscore(..., tau=0.1)``).
FSCORE_THRESHOLD = 0.1


def as_points(points, name: str = "points") -> np.ndarray:
    """``points`` as a float64 ``(N, 3)`` array with N >= 1 and finite values, else a clear error."""
    if isinstance(points, (trimesh.Trimesh, trimesh.Scene)):
        raise TypeError(
            f"{name} is a mesh; point metrics take (N, 3) point arrays. "
            "Sample it first with timi.metrics.sample_surface_points(mesh, n, seed)."
        )
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3); got {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 points); a metric needs at least one point on each side.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite coordinates; clean the mesh or points first.")
    return arr


def check_mesh(mesh, name: str = "mesh") -> trimesh.Trimesh:
    """``mesh`` if it is a :class:`trimesh.Trimesh` with faces and positive surface area, else an error."""
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"{name} must be a trimesh.Trimesh; got {type(mesh).__name__}.")
    if len(mesh.faces) == 0 or not np.isfinite(mesh.area) or mesh.area <= 0:
        raise ValueError(
            f"{name} is empty (faces: {len(mesh.faces)}, area: {mesh.area:.3g}); "
            "nothing can be sampled from it. Check that generation produced geometry."
        )
    if not np.all(np.isfinite(mesh.vertices)):
        raise ValueError(f"{name} has NaN or infinite vertices.")
    return mesh


def sample_surface_points(mesh: trimesh.Trimesh, count: int = POINTS_PER_OBJECT, seed: int | list[int] = 0,
                          name: str = "mesh") -> np.ndarray:
    """``count`` points drawn uniformly by area on ``mesh`` (``trimesh.sample.sample_surface``).

    ``seed`` is anything :func:`numpy.random.default_rng` takes; the same seed on the same mesh gives
    the same points, so an identical prediction scores CD 0 exactly.
    """
    check_mesh(mesh, name)
    if int(count) < 1:
        raise ValueError(f"count must be >= 1; got {count}.")
    points, _ = trimesh.sample.sample_surface(mesh, int(count), seed=np.random.default_rng(seed))
    return np.asarray(points, dtype=np.float64)


def nearest_distances(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each point of ``a`` to its nearest point in ``b``, and from ``b`` to ``a``."""
    a, b = as_points(a, "a"), as_points(b, "b")
    d_ab, _ = cKDTree(b).query(a, k=1)
    d_ba, _ = cKDTree(a).query(b, k=1)
    return d_ab, d_ba


def chamfer_terms(a, b) -> tuple[float, float]:
    """The two halves of the Chamfer distance: ``mean(d_ab^2)`` and ``mean(d_ba^2)``."""
    d_ab, d_ba = nearest_distances(a, b)
    return float(np.mean(d_ab**2)), float(np.mean(d_ba**2))


def chamfer_distance(a, b) -> float:
    """Symmetric Chamfer distance with squared distances, ``mean(d_ab^2) + mean(d_ba^2)`` (MIDI).

    ``a``, ``b``: ``(N, 3)`` and ``(M, 3)`` point arrays.
    """
    t_ab, t_ba = chamfer_terms(a, b)
    return t_ab + t_ba


def f_score(a, b, threshold: float = FSCORE_THRESHOLD) -> float:
    """F-score at ``threshold`` on Euclidean nearest-neighbour distances (MIDI, tau = 0.1).

    Precision: share of ``a`` (prediction) closer than ``threshold`` to ``b``; recall: share of ``b``
    (ground truth) closer than ``threshold`` to ``a``; ``F = 2PR / (P + R)``, 0 if both are 0.
    """
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite number > 0; got {threshold!r}.")
    d_ab, d_ba = nearest_distances(a, b)
    precision = float(np.mean(d_ab < threshold))
    recall = float(np.mean(d_ba < threshold))
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)

"""Alignment of a generated shape to its ground truth before measuring it.

Generated shapes live in the model's canonical box (Hunyuan3D: about [-1, 1]^3), ground truth in
its own frame. Following MIDI's evaluation (VAST-AI-Research/MIDI-3D,
``midi/systems/system_midi.py::compute_metrics`` and ``midi/utils/metrics.py::icp``):

* scene level: rigid ICP of the predicted points onto the ground-truth points, 50 iterations;
* object level: every object normalised **per axis** to [-0.95, 0.95]
  (``normalize_`` in ``compute_metrics``), then rigid ICP, 50 iterations.

MIDI's predictions already share the ground truth's scene frame; ours do not, so scenes are first
brought to a common frame by :func:`scene_normalization` (isotropic: bounding-box centre to the
origin, longest side to 1.9, i.e. the same [-0.95, 0.95] box as MIDI's object normalisation but
without distorting the aspect ratio). This is a documented deviation (``docs/metrics.md``).

ICP is :func:`trimesh.registration.icp` (cKDTree correspondences + Procrustes) with reflection and
scaling disabled, like MIDI's ``compute_rigid_transform`` (proper rotation + translation).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import trimesh

from .pointclouds import as_points

#: MIDI's normalisation box half-size: ``1.9 * (x - min) / range - 0.95``.
BOX_HALF = 0.95
#: MIDI: ``icp(..., max_iterations=50)`` at both levels.
ICP_ITERATIONS = 50
#: Stop ICP when the cost drops by less than this (MIDI: ``tolerance=1e-5``).
ICP_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Alignment:
    """Result of an ICP alignment: ``matrix`` (4, 4) maps the source onto the target."""

    matrix: np.ndarray
    points: np.ndarray
    cost: float


def normalize_per_axis(points, half: float = BOX_HALF) -> np.ndarray:
    """MIDI's object normalisation: each axis independently mapped from [min, max] to [-half, half].

    An axis with zero range is left at ``-half`` (MIDI replaces a zero range by 1).
    """
    p = as_points(points)
    lo, hi = p.min(axis=0), p.max(axis=0)
    rng = np.where(hi - lo == 0, 1.0, hi - lo)
    return 2.0 * half * (p - lo) / rng - half


def scene_normalization(bounds, half: float = BOX_HALF) -> np.ndarray:
    """4x4 similarity that moves the centre of ``bounds`` (2, 3) to 0 and scales its longest side to 2*half."""
    b = np.asarray(bounds, dtype=np.float64)
    if b.shape != (2, 3) or not np.all(np.isfinite(b)):
        raise ValueError(f"bounds must be a finite (2, 3) array [min, max]; got {b.shape}.")
    extent = float(np.max(b[1] - b[0]))
    if extent <= 0:
        raise ValueError("the geometry has zero extent (a single point); it cannot be normalised.")
    scale = 2.0 * half / extent
    matrix = np.eye(4)
    matrix[:3, :3] *= scale
    matrix[:3, 3] = -scale * (b[0] + b[1]) / 2.0
    return matrix


def icp_align(source, target, iterations: int = ICP_ITERATIONS, tolerance: float = ICP_TOLERANCE,
              initial: np.ndarray | None = None, max_points: int | None = None, seed: int = 0) -> Alignment:
    """Rigid ICP of ``source`` points onto ``target`` points (trimesh; no scaling, no reflection).

    ``max_points``: fit the transform on at most this many source points (a seeded random subset,
    matched against all target points) and apply it to all; ``None`` uses every point (MIDI).
    ``cost`` is trimesh's mean squared residual of the fitted points.
    """
    src, dst = as_points(source, "source"), as_points(target, "target")
    start = np.eye(4) if initial is None else np.asarray(initial, dtype=np.float64)
    fit = src
    if max_points is not None and len(src) > max_points:
        fit = src[np.random.default_rng(seed).choice(len(src), int(max_points), replace=False)]
    if iterations < 1:
        matrix, cost = start, float("nan")
    else:
        matrix, _, cost = trimesh.registration.icp(
            fit, dst, initial=start, threshold=tolerance, max_iterations=int(iterations),
            reflection=False, scale=False, translation=True,
        )
    matrix = np.asarray(matrix)
    return Alignment(matrix, trimesh.transform_points(src, matrix), float(cost))


def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations mapping the coordinate axes onto themselves (signed permutations, det +1)."""
    rotations = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            r = np.zeros((3, 3))
            r[range(3), perm] = signs
            if np.linalg.det(r) > 0:
                rotations.append(r)
    return rotations


def icp_align_search(source, target, iterations: int = ICP_ITERATIONS, tolerance: float = ICP_TOLERANCE,
                     max_points: int | None = None, seed: int = 0) -> Alignment:
    """ICP started from each of the 24 axis rotations (about the source centroid); lowest cost wins.

    Not in MIDI (its frames already agree up to small errors); useful when the prediction's up/front
    axes differ from the ground truth's (``align="icp-search"`` in :func:`timi.metrics.score_scene`).
    """
    src, dst = as_points(source, "source"), as_points(target, "target")
    c_src, c_dst = src.mean(axis=0), dst.mean(axis=0)
    best = None
    for r in cube_rotations():
        initial = np.eye(4)
        initial[:3, :3] = r
        initial[:3, 3] = c_dst - r @ c_src
        result = icp_align(src, dst, iterations, tolerance, initial=initial, max_points=max_points, seed=seed)
        if best is None or result.cost < best.cost:
            best = result
    return best

"""How large a generated scene comes out, and its scores at the base model's size (issue 27).

A guidance can raise SSR (Eq.10) without any instance-aware change: if it makes every shape
thinner, gaps open between adjacent instances and fused pairs come apart. To tell separation from
shrinkage, every ``timi eval`` run is also scored **at matched size**: the run's final latents
(kept in the cache) are decoded once to their occupancy logits, and the iso level (hy3dgen's
``mc_level``) is found by root finding (:func:`scipy.optimize.brentq`) at which the scene's
surface area equals the base model's on the same scene and seed. The mesh at that level is scored
like any other. A run that only shrinks every shape gets its base scores back at matched size; a
run that moves instances apart keeps its gain.

* :class:`IsoSurfaces`: one decoded latent, a mesh at any iso level;
* :func:`match_area`: the level (and mesh) whose surface area equals a target;
* :func:`mesh_size`: surface area and enclosed volume of a mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import trimesh

__all__ = ["IsoSurfaces", "MatchedSurface", "match_area", "mesh_size", "AREA_RTOL"]

#: Relative tolerance of the area match (``|area - target| <= AREA_RTOL * target``).
AREA_RTOL = 1e-3
#: The first step of the bracket search, as a part of the field's range (then doubled).
INITIAL_STEP = 1 / 256


def mesh_size(mesh: Optional[trimesh.Trimesh]) -> tuple[float, float]:
    """``(surface area, enclosed volume)`` of a mesh; ``(0, 0)`` for ``None`` or an empty mesh.
    The volume is the divergence-theorem volume of trimesh, taken in absolute value (marching-cubes
    surfaces are closed inside their grid)."""
    if mesh is None or len(mesh.faces) == 0:
        return 0.0, 0.0
    return float(mesh.area), float(abs(mesh.volume))


@dataclass(frozen=True)
class IsoSurfaces:
    """One decoded occupancy field: ``extract(level)`` gives its mesh at an iso level (``None`` where
    the level crosses no voxel); ``low``/``high`` bound the field's values; ``level`` is the level
    the generation itself used. A higher level gives a smaller shape."""

    extract: Callable[[float], Optional[trimesh.Trimesh]]
    low: float
    high: float
    level: float = 0.0


@dataclass(frozen=True)
class MatchedSurface:
    """The result of :func:`match_area`: the iso ``level``, its ``mesh`` and ``area``, and whether the
    target was reached within the tolerance (``matched``; else the closest level that was tried)."""

    level: float
    mesh: Optional[trimesh.Trimesh]
    area: float
    matched: bool


def match_area(surfaces: IsoSurfaces, target_area: float, rtol: float = AREA_RTOL,
               max_evaluations: int = 60) -> MatchedSurface:
    """The iso level at which the surface area equals ``target_area``.

    The generation's own level is tried first and kept when it already matches (the base run
    against itself is the identity). Otherwise the area, which falls as the level rises, is
    bracketed between that level and the field's bound on the side the target lies, and the root of
    ``area(level) - target`` is found by Brent's method. Where the target is out of reach
    (``matched=False``), the closest level tried is returned.
    """
    from scipy.optimize import brentq

    if not (np.isfinite(target_area) and target_area > 0):
        raise ValueError(f"match_area: target area {target_area!r} must be a positive number.")
    cache: dict[float, tuple[Optional[trimesh.Trimesh], float]] = {}

    def area_at(level: float) -> float:
        if level not in cache:
            if len(cache) >= max_evaluations:
                raise _Budget()
            mesh = surfaces.extract(level)
            cache[level] = (mesh, mesh_size(mesh)[0])
        return cache[level][1] - target_area

    def best(matched: bool) -> MatchedSurface:
        level = min(cache, key=lambda lv: abs(cache[lv][1] - target_area))
        mesh, area = cache[level]
        return MatchedSurface(float(level), mesh, float(area), matched)

    tol = rtol * target_area
    own = float(surfaces.level)
    f0 = area_at(own)
    if abs(f0) <= tol:
        return best(True)
    span = surfaces.high - surfaces.low
    # too large -> raise the level (towards high); too small -> lower it (towards low). The area is
    # not monotone over the whole range (near the field's minimum the "inside" fills the grid and
    # the surface shrinks to the grid's few lowest voxels), so the bracket grows outward from the
    # own level in doubling steps until the area crosses the target.
    direction = 1.0 if f0 > 0 else -1.0
    limit = (surfaces.high if f0 > 0 else surfaces.low) - direction * 1e-6 * max(span, 1e-12)
    inner, step = own, INITIAL_STEP * max(span, 1e-12)
    try:
        while True:
            edge = own + direction * step
            if direction * (edge - limit) >= 0:
                edge = limit
            f_edge = area_at(edge)
            if abs(f_edge) <= tol:
                return best(True)
            if np.sign(f_edge) != np.sign(f0):
                break
            if edge == limit:
                return best(False)
            inner, step = edge, 2 * step
    except _Budget:
        return best(False)
    lo, hi = sorted((inner, edge))
    try:
        brentq(lambda lv: _stop_when_close(area_at(lv), tol), lo, hi, xtol=1e-9 * max(span, 1e-12),
               maxiter=max_evaluations)
    except (_Close, _Budget):
        pass
    except (RuntimeError, ValueError):   # no convergence, or area not monotone in the bracket
        pass
    result = best(False)
    return MatchedSurface(result.level, result.mesh, result.area, abs(result.area - target_area) <= tol)


class _Close(Exception):
    """Raised inside the root finder once the area is within the tolerance."""


class _Budget(Exception):
    """Raised inside the root finder when the extraction budget is spent."""


def _stop_when_close(f: float, tol: float) -> float:
    if abs(f) <= tol:
        raise _Close()
    return f

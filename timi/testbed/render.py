"""CPU front-view renderer: orthographic sphere tracing of the exact primitive SDFs.

Camera convention (shared with the layout JSON): world +y is up, the camera sits on +z and looks
along -z; image column ``u`` maps to world x, image row ``v`` to world -y; the image covers
``[-extent, extent]^2``. The same ray hits give the RGBA render (Lambert shading, transparent
background composited on white) and the label map (0 = background, k = instance k), so a pixel is
foreground in the image exactly when it is non-zero in the label map.
"""

from __future__ import annotations

import numpy as np

from .primitives import Primitive, scene_sdf

LIGHT_DIR = np.array([-0.4, 0.5, 0.77]) / np.linalg.norm([-0.4, 0.5, 0.77])
AMBIENT = 0.35


def pixel_centres(resolution: int, extent: float) -> np.ndarray:
    """World (x, y) of each pixel centre, shape (H, W, 2)."""
    c = (np.arange(resolution) + 0.5) / resolution * 2.0 - 1.0
    xs = c * extent
    ys = -c * extent
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)


def trace(primitives: list[Primitive], resolution: int = 256, extent: float = 1.0,
          max_steps: int = 128, hit_eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Sphere-trace one ray per pixel. Returns hit points (H, W, 3) (NaN on misses) and labels (H, W)."""
    xy = pixel_centres(resolution, extent).reshape(-1, 2)
    z0, z_far = 2.0, -2.0
    origin = np.concatenate([xy, np.full((len(xy), 1), z0)], axis=1)
    t = np.zeros(len(xy))
    active = np.arange(len(xy))
    hit = np.zeros(len(xy), dtype=bool)
    for _ in range(max_steps):
        if active.size == 0:
            break
        pts = origin[active].copy()
        pts[:, 2] -= t[active]
        d, _ = scene_sdf(primitives, pts)
        done_hit = d < hit_eps
        hit[active[done_hit]] = True
        t[active] += np.maximum(d, 0.0)
        escaped = (z0 - t[active]) < z_far
        active = active[~done_hit & ~escaped]
    points = origin.copy()
    points[:, 2] -= t
    labels = np.zeros(len(xy), dtype=np.uint8)
    if hit.any():
        _, which = scene_sdf(primitives, points[hit])
        labels[hit] = which.astype(np.uint8) + 1
    points[~hit] = np.nan
    return points.reshape(resolution, resolution, 3), labels.reshape(resolution, resolution)


def _normals(primitives: list[Primitive], points: np.ndarray, labels: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Unit normals by central differences of the hit instance's SDF."""
    out = np.zeros_like(points)
    for k, prim in enumerate(primitives, start=1):
        sel = labels == k
        if not sel.any():
            continue
        p = points[sel]
        grad = np.stack([prim.sdf(p + h * e) - prim.sdf(p - h * e) for e in np.eye(3)], axis=-1)
        out[sel] = grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)
    return out


def render(primitives: list[Primitive], resolution: int = 256, extent: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Front-view RGBA image (uint8, white RGB where transparent) and label map (uint8)."""
    points, labels = trace(primitives, resolution, extent)
    flat_labels = labels.reshape(-1)
    fg = flat_labels > 0
    rgba = np.full((flat_labels.size, 4), 255, dtype=np.float64)
    rgba[:, 3] = 0.0
    if fg.any():
        normals = _normals(primitives, points.reshape(-1, 3)[fg], flat_labels[fg])
        lambert = np.clip(normals @ LIGHT_DIR, 0.0, 1.0)
        shade = AMBIENT + (1.0 - AMBIENT) * lambert
        colors = np.array([p.color for p in primitives], dtype=np.float64)[flat_labels[fg] - 1]
        rgba[fg, :3] = colors * shade[:, None]
        rgba[fg, 3] = 255.0
    rgba = np.clip(np.round(rgba), 0, 255).astype(np.uint8).reshape(resolution, resolution, 4)
    return rgba, labels

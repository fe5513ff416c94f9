"""Occupancy and a mesh from TRELLIS stage 1's decoder logits.

Upstream keeps the voxels with ``decoder(z) > 0`` (``coords``) for stage 2. For a mesh of the coarse
structure (what ``timi generate`` writes from stage 1 alone) the logits are meshed at level 0 by
marching cubes (scikit-image), padded by one voxel of "empty" so that every surface closes, in
upstream's unit cube ``[-0.5, 0.5]^3`` (voxel centres at ``(i + 0.5) / N - 0.5``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["occupancy_mesh", "occupied_voxels"]


def occupied_voxels(logits: torch.Tensor) -> torch.Tensor:
    """Upstream's ``coords``: (N, 4) int32 ``[batch, x, y, z]`` of the voxels with ``logits > 0``
    (``logits`` (B, 1, N, N, N))."""
    return torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].int()


def occupancy_mesh(logits, bounds: float = 0.5):
    """A ``trimesh.Trimesh`` of the level-0 surface of one (N, N, N) logit grid (or (1, N, N, N)), in
    ``[-bounds, bounds]^3``; ``None`` when no voxel is occupied."""
    import trimesh
    from skimage.measure import marching_cubes

    grid = np.asarray(logits.detach().float().cpu() if isinstance(logits, torch.Tensor) else logits, np.float32)
    grid = grid.reshape(grid.shape[-3:])
    if not (grid > 0).any():
        return None
    floor = min(float(grid.min()), -1.0)
    padded = np.pad(grid, 1, constant_values=floor)
    verts, faces, _, _ = marching_cubes(padded, level=0.0)
    n = grid.shape[0]
    verts = (verts - 1 + 0.5) / n * (2 * bounds) - bounds
    return trimesh.Trimesh(verts, faces[:, ::-1], process=False)

"""Grid testbed latent (issue 36): a TRELLIS-shaped (8, 16, 16, 16) latent of a testbed scene, no VAE.

TRELLIS's stage 1 denoises a ``C x D x H x W`` grid latent (8 x 16^3), each voxel a token, with
cross-attention from every voxel token to the image tokens. The grid testbed gives that shape a
*fixed, invertible* encoding of the scene's exact occupancy, so that nothing but the flow model is
learnt and a decoder can neither fuse nor split instances on its own:

* :func:`occupancy_grid`: the exact ground truth (the union SDF of the scene's primitives,
  :func:`timi.testbed.primitives.scene_sdf`, negative inside) at the centres of a 32^3 grid over
  hy3dgen's decoding box ``[-1.01, 1.01]^3`` (the box the token testbed decodes and meshes in);
* :func:`encode`: ``{0, 1} -> {-1, +1}``, then space-to-depth by 2: ``(B, 1, 32^3) -> (B, 8, 16^3)``;
* :func:`decode`: depth-to-space, ``(B, 8, 16^3) -> (B, 1, 32^3)`` occupancy logits (occupied where
  ``> 0``): the exact inverse of :func:`encode` on its image, and what the exported folder's
  ``DepthToSpaceDecoder`` (``timi_torch.trellis``) computes;
* :func:`logits_to_mesh`: marching cubes at level 0 on the logits (optionally Gaussian-smoothed and
  upsampled), placed in the box, so :func:`timi.metrics.score_scene` scores it like the token
  testbed's meshes.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from .data import BOX

#: occupancy grid resolution, space-to-depth factor, latent channels and latent resolution
GRID = 32
FACTOR = 2
CHANNELS = FACTOR**3
LATENT_RESOLUTION = GRID // FACTOR
#: name of this encoding in the exported ``testbed.json``
ENCODING = "space_to_depth_32"


def cell_centres(res: int = GRID, box: float = BOX) -> np.ndarray:
    """(res, res, res, 3) world xyz of the grid's cell centres; array axes (i, j, k) = (x, y, z)."""
    c = -box + (np.arange(res) + 0.5) * (2 * box / res)
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)


def occupancy_grid(primitives, res: int = GRID, box: float = BOX) -> np.ndarray:
    """(res, res, res) bool: exact occupancy (union SDF < 0) of ``primitives`` at the cell centres."""
    from .primitives import scene_sdf

    pts = cell_centres(res, box).reshape(-1, 3)
    return (scene_sdf(primitives, pts)[0] < 0).reshape(res, res, res)


def encode(occupancy: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Occupancy (B, R, R, R) (bool or {0, 1}) -> latent (B, 8, R/2, R/2, R/2) float32 in {-1, +1}:
    space-to-depth by 2 (upstream TRELLIS's ``patchify`` order, the inverse of :func:`decode`)."""
    from timi_torch.trellis.modeling import patchify

    occ = torch.as_tensor(occupancy if torch.is_tensor(occupancy) else np.asarray(occupancy))
    return patchify(occ.float()[:, None] * 2 - 1, FACTOR)


def decode(z: torch.Tensor) -> torch.Tensor:
    """Latent (B, 8, R, R, R) -> occupancy logits (B, 1, 2R, 2R, 2R) (occupied where > 0): depth-to-space,
    what ``timi_torch.trellis.DepthToSpaceDecoder`` (the exported model's decoder) computes."""
    from timi_torch.trellis.modeling import pixel_shuffle_3d

    return pixel_shuffle_3d(z, FACTOR)


def logits_to_mesh(logits: np.ndarray | torch.Tensor, box: float = BOX, upsample: int = 1,
                   sigma: float = 0.0) -> trimesh.Trimesh | None:
    """Level-0 surface of (R, R, R) cell-centre logits over ``[-box, box]^3``
    (``timi_torch.trellis.decoding.occupancy_mesh``); None if nothing is occupied.

    ``sigma`` (in cells) smooths the logits with a Gaussian and ``upsample`` > 1 resamples them
    trilinearly at the centres of a grid ``upsample`` times finer, which rounds the staircase of a
    binary field and opens one-cell contacts between instances.
    """
    from scipy import ndimage
    from timi_torch.trellis.decoding import occupancy_mesh

    v = logits.detach().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits)
    v = v.astype(np.float64)
    if sigma > 0:
        v = ndimage.gaussian_filter(v, sigma, mode="nearest")
    if upsample > 1:
        fine = (np.arange(v.shape[0] * upsample) + 0.5) / upsample - 0.5  # fine centres, coarse index units
        v = ndimage.map_coordinates(v, np.stack(np.meshgrid(fine, fine, fine, indexing="ij")), order=1,
                                    mode="nearest")
    return occupancy_mesh(v, bounds=box)


def grid_ceiling(dataset_dir, limit: int | None = None, upsample: int = 1, sigma: float = 0.0,
                 points_per_object: int = 20480, progress: bool = True) -> dict:
    """The encoding's ceiling on a folder of scenes (``timi testbed scenes``): exact occupancy ->
    :func:`encode` -> :func:`decode` -> :func:`logits_to_mesh` -> :func:`timi.metrics.score_scene`, as
    ``timi eval`` scores a generated mesh: the best a perfect flow model could reach. Instances
    closer than about a cell (0.063) touch at 32^3 and come back fused (``part_counts["fewer"]``)."""
    from tqdm import tqdm

    from timi.evaluation.dataset import discover_scenes
    from timi.metrics import PART_COUNT_CLASSES, part_count_class, score_scene

    from .scenes import load_layout

    rows = []
    for folder in tqdm(discover_scenes(dataset_dir)[:limit], desc="grid ceiling", disable=not progress):
        gt = [trimesh.load(f, force="mesh") for f in sorted((folder / "gt").glob("instance_*.ply"))]
        occ = occupancy_grid(load_layout(folder)[0])
        mesh = logits_to_mesh(decode(encode(occ[None]))[0, 0], upsample=upsample, sigma=sigma)
        if mesh is None:
            rows.append({"scene": folder.name, "k": len(gt), "error": "no surface"})
            continue
        sc = score_scene(mesh, gt, points_per_object=points_per_object)
        rows.append({"scene": folder.name, "k": len(gt), "fs_s": sc.fs_s, "cd_s": sc.cd_s, "ssr": sc.ssr,
                     "fs_o": sc.fs_o, "n_pred": sc.n_pred})
    ok = [r for r in rows if "error" not in r]
    counts = {c: sum(part_count_class(r["n_pred"], r["k"]) == c for r in ok) for c in PART_COUNT_CLASSES}
    return {"dataset": str(dataset_dir), "n": len(rows), "failed": len(rows) - len(ok), "upsample": upsample,
            "sigma": sigma, "mean": {k: float(np.mean([r[k] for r in ok])) for k in ("fs_s", "cd_s", "ssr", "fs_o")}
            if ok else {}, "part_counts": counts, "fused_share": counts["fewer"] / len(ok) if ok else float("nan"),
            "rows": rows}

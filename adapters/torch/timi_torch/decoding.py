"""Volume decoding: the ShapeVAE's occupancy logits on the marching-cubes grid, dense or coarse-to-fine.

hy3dgen decodes a latent by querying its geometry decoder at every point of an ``(R+1)^3`` grid
(``VanillaVolumeDecoder``), though marching cubes only reads the values next to the surface. Its
coarse-to-fine answer, ``HierarchicalVolumeDecoding`` (hy3dgen 2.0.2), cannot be used as it is:
it places the fine queries at ``index * cell_size`` in the *integer* dtype of the index, so every
fine query lands on one corner of the box, and it only decodes batches of one. FlashVDM's decoder
needs the distilled turbo VAE for its adaptive key/value selection.

:class:`CoarseToFineVolumeDecoder` keeps hy3dgen's decoder interface (a drop-in for
``vae.volume_decoder``) and its grid points exactly (the same float32 ``linspace`` per axis):

1. decode the grid at a coarse resolution ``R / 2^k`` >= 64 (a sub-grid of the final one; grids
   below 128 are decoded densely);
2. per level, find the coarse cells whose corners lie on both sides of the iso level, widen that
   set by ``margin`` cells, and decode only the finer grid's points inside those cells; every
   other point takes the trilinear interpolation of its coarse cell, whose corners are all on one
   side, so it is on that side too; then decode the corners of any finer cell the surface crosses
   that still hold an interpolated value, until there are none (the surface followed out of the
   band, so every crossing cell's corners carry the decoder's own values);
3. the result is the full ``(B, R+1, R+1, R+1)`` grid: exact wherever a surface was found, finite
   everywhere, so hy3dgen's surface extractor reads it unchanged.

The mesh equals the dense one unless a surface passes through a coarse cell of the last level
without changing the sign of any corner of it or of its neighbours (a feature thinner than a few
coarse cells, far from any other surface); a level where most cells need refining is decoded
densely. ``timi bench mesh`` measures the difference (volume
IoU, Chamfer) and the queries saved; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DECODINGS", "CoarseToFineVolumeDecoder", "volume_decoder", "set_decoding", "grid_axes"]

#: Names of the volume decodings (``--decoding``/``--dense-decoding`` on the command line).
DECODINGS = ("coarse-to-fine", "dense")


def grid_axes(bounds, resolution: int) -> list[np.ndarray]:
    """The per-axis coordinates of hy3dgen's query grid (``generate_dense_grid_points``: float32
    ``linspace`` of ``resolution + 1`` points over the box ``bounds``, a half-width or 6 numbers)."""
    if isinstance(bounds, (int, float)):
        bounds = [-bounds, -bounds, -bounds, bounds, bounds, bounds]
    lo, hi = np.asarray(bounds[:3]), np.asarray(bounds[3:6])
    return [np.linspace(lo[a], hi[a], int(resolution) + 1, dtype=np.float32) for a in range(3)]


def _levels(resolution: int, min_resolution: int) -> list[int]:
    """Resolutions from coarse to ``resolution``, halving while even and at least ``min_resolution``."""
    levels = [int(resolution)]
    while levels[0] % 2 == 0 and levels[0] // 2 >= min_resolution:
        levels.insert(0, levels[0] // 2)
    return levels


def _crossing_cells(values: torch.Tensor, level: float) -> torch.Tensor:
    """(r, r, r) bool: cells of an (r+1)^3 grid whose 8 corners are not all on one side of ``level``."""
    inside = (values > level).float()[None, None]
    some_in = F.max_pool3d(inside, 2, stride=1)
    some_out = F.max_pool3d(1.0 - inside, 2, stride=1)
    return (some_in * some_out)[0, 0] > 0


def _dilate(cells: torch.Tensor, margin: int) -> torch.Tensor:
    if margin <= 0:
        return cells
    out = F.max_pool3d(cells.float()[None, None], 2 * margin + 1, stride=1, padding=margin)
    return out[0, 0] > 0


def _corners_of_cells(cells: torch.Tensor) -> torch.Tensor:
    """(r+1)^3 bool: the corners of the marked cells of an (r+1)^3 grid."""
    return F.max_pool3d(F.pad(cells.float()[None, None], (1, 1, 1, 1, 1, 1)), 2, stride=1)[0, 0] > 0


def _points_of_cells(cells: torch.Tensor) -> torch.Tensor:
    """(2r+1)^3 bool: the finer grid's points that are corners of (sub-cells of) the marked coarse cells."""
    return _corners_of_cells(cells.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2))


class CoarseToFineVolumeDecoder:
    """A drop-in for hy3dgen's ``vae.volume_decoder`` that decodes only near the surface (module
    docstring). ``min_resolution``: the coarsest grid is the smallest ``R / 2^k`` at least this (64,
    hy3dgen's own choice: with 32, a 200-face fragment of the demo scene fell between coarse points);
    ``margin``: coarse cells added around each crossing cell before refining; ``dense_above``: when
    more than this fraction of a level's cells need refining (a field whose surface is everywhere,
    such as a random-weight VAE's), that level is decoded densely, which is then exact and barely
    dearer; ``max_closure_rounds``: after each level, the corners of every cell the surface crosses
    that still hold an interpolated value are decoded, and again for the cells that reveals, up to
    this many rounds (a few points; it makes every crossing cell's corners exact).

    ``queries``: how many points the last call sent to the geometry decoder (for ``timi bench mesh``).
    """

    def __init__(self, min_resolution: int = 64, margin: int = 1, dense_above: float = 0.5,
                 max_closure_rounds: int = 16):
        self.min_resolution, self.margin, self.dense_above = int(min_resolution), int(margin), float(dense_above)
        self.max_closure_rounds = int(max_closure_rounds)
        self.queries = 0

    def _decode(self, latents, geo_decoder, points: torch.Tensor, num_chunks: int, progress) -> torch.Tensor:
        out = []
        for start in range(0, points.shape[0], num_chunks):
            chunk = points[start:start + num_chunks][None].to(latents.dtype)
            out.append(geo_decoder(queries=chunk, latents=latents)[0, :, 0].float())
            if progress is not None:
                progress.update(1)
        self.queries += int(points.shape[0])
        return torch.cat(out) if out else points.new_zeros(0)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, geo_decoder: Callable, bounds=1.01, num_chunks: int = 10000,
                 octree_resolution: int = 384, mc_level: float = 0.0, enable_pbar: bool = True,
                 **kwargs) -> torch.Tensor:
        self.queries = 0
        return torch.stack([self._one(latents[b:b + 1], geo_decoder, bounds, int(num_chunks), int(octree_resolution),
                                      float(mc_level), enable_pbar) for b in range(latents.shape[0])])

    def _one(self, latents, geo_decoder, bounds, num_chunks, resolution, level, enable_pbar) -> torch.Tensor:
        from tqdm.auto import tqdm

        device = latents.device
        axes = [torch.from_numpy(a).to(device) for a in grid_axes(bounds, resolution)]
        levels = _levels(resolution, self.min_resolution)

        def points(index: torch.Tensor, stride: int) -> torch.Tensor:   # (N, 3) grid indices -> coordinates
            return torch.stack([axes[a][index[:, a] * stride] for a in range(3)], dim=1)

        r0 = levels[0]
        stride = resolution // r0
        progress = tqdm(desc=f"Volume decoding, coarse-to-fine {r0}->{resolution}", unit="chunk",
                        disable=not enable_pbar)
        coarse = torch.stack(torch.meshgrid(*[torch.arange(r0 + 1, device=device)] * 3, indexing="ij"), -1)
        values = self._decode(latents, geo_decoder, points(coarse.reshape(-1, 3), stride), num_chunks,
                              progress).reshape((r0 + 1,) * 3)
        exact = torch.ones_like(values, dtype=torch.bool)
        for r in levels[1:]:
            stride = resolution // r
            cells = _dilate(_crossing_cells(values, level), self.margin)
            values = F.interpolate(values[None, None], size=(r + 1,) * 3, mode="trilinear", align_corners=True)[0, 0]
            coarse_exact, exact = exact, torch.zeros_like(values, dtype=torch.bool)
            exact[::2, ::2, ::2] = coarse_exact
            if float(cells.float().mean()) > self.dense_above:
                wanted = torch.ones_like(exact)
            else:
                wanted = _points_of_cells(cells)
            # then, until none is left, the corners of every cell the surface now crosses
            for _ in range(self.max_closure_rounds):
                wanted &= ~exact
                index = wanted.nonzero()
                if not len(index):
                    break
                values[wanted] = self._decode(latents, geo_decoder, points(index, stride), num_chunks, progress)
                exact |= wanted
                wanted = _corners_of_cells(_crossing_cells(values, level))
        progress.close()
        return values


def volume_decoder(decoding: str):
    """The ``vae.volume_decoder`` object for a decoding name of :data:`DECODINGS`."""
    if decoding == "coarse-to-fine":
        return CoarseToFineVolumeDecoder()
    if decoding == "dense":
        from hy3dgen.shapegen.models.autoencoders.volume_decoders import VanillaVolumeDecoder

        return VanillaVolumeDecoder()
    raise ValueError(f"decoding={decoding!r}: use one of {', '.join(DECODINGS)}.")


def set_decoding(base, decoding: Optional[str]) -> None:
    """Make hy3dgen pipeline ``base`` decode its latents with ``decoding`` (``None``: leave as is)."""
    if decoding is not None:
        base.vae.volume_decoder = volume_decoder(decoding)

"""``timi bench mesh``: dense vs coarse-to-fine volume decoding, same latents, one run (issue 29).

Per (latent, octree resolution, decoding): seconds, geometry-decoder queries, peak memory above
the start, and the mesh against the dense one: volume IoU of the solids (grid cells enclosed by
the iso surface) and the Chamfer distance between the two surfaces, relative to the dense mesh's
bounding-box diagonal (:func:`compare_meshes`).

Latents come from the shipped model (or ``--model``) sampled without TIMI on the scenes of a
``timi eval`` dataset folder (default: the shipped example scene), or, with ``--full-width``,
from a ShapeVAE with hy3dgen 2.0's decoder width and random weights (:func:`full_width_vae`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

#: hy3dgen 2.0's ShapeVAE (``hunyuan3d-dit-v2-0/config.yaml``, ``vae.params``): the decoder the
#: real weights run, here with random weights (``--full-width``).
FULL_WIDTH_VAE = dict(num_latents=3072, embed_dim=64, num_freqs=8, include_pi=False, heads=16, width=1024,
                      num_decoder_layers=16, qkv_bias=False, qk_norm=True, scale_factor=0.9990943042622529)

GOAL_SPEEDUP, GOAL_IOU, GOAL_CHAMFER = 5.0, 0.99, 0.01


@dataclass
class DecodeResult:
    grid: "object"            # (R+1)^3 float32 torch tensor
    seconds: float
    queries: int
    peak_bytes: int | None


class PeakMemory:
    """Peak CUDA memory allocated in a block above its start (``peak`` stays ``None`` on the CPU:
    the process's resident set cannot tell one decoding's peak once the allocator holds memory)."""

    def __init__(self, device):
        self.cuda, self.peak = str(device).startswith("cuda"), None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated() - self._start)
        return False


def decode(vae, latents, decoding: str, octree_resolution: int, *, num_chunks: int = 8000,
           mc_level: float = 0.0, box_v: float = 1.01) -> DecodeResult:
    """One latent (1, L, C), decoded to its grid with ``decoding`` (:data:`timi_torch.decoding.DECODINGS`)."""
    import torch
    from timi_torch.decoding import volume_decoder

    decoder = volume_decoder(decoding)
    counted = [0]

    def count(module, args, kwargs, out):
        q = kwargs["queries"]
        counted[0] += int(q.shape[0] * q.shape[1])

    hook = vae.geo_decoder.register_forward_hook(count, with_kwargs=True)
    try:
        with PeakMemory(latents.device) as mem, torch.no_grad():
            if latents.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoded = vae(1.0 / vae.scale_factor * latents)
            grid = decoder(decoded, vae.geo_decoder, bounds=box_v, num_chunks=num_chunks,
                           octree_resolution=octree_resolution, mc_level=mc_level, enable_pbar=False)
            if latents.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    return DecodeResult(grid[0].float().cpu(), seconds, counted[0], mem.peak)


def solid(grid: np.ndarray, level: float) -> np.ndarray:
    """Cells enclosed by the iso surface: every grid point not connected to the box's boundary
    through points at or below ``level`` (cavities count as inside, as the surface encloses them)."""
    from scipy import ndimage

    outside = ~(grid > level)
    labels, _ = ndimage.label(outside)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    return ~np.isin(labels, border[border > 0])


def compare_meshes(reference, other, *, points: int = 20000, seed: int = 0) -> float:
    """Chamfer distance (MIDI's, squared, :func:`timi.metrics.chamfer_distance`) between surface
    samples of two meshes (the same seed: identical meshes give exactly 0), its square root divided
    by the reference's bounding-box diagonal."""
    from timi.metrics.pointclouds import chamfer_distance, sample_surface_points

    a = sample_surface_points(reference, points, seed=seed)
    b = sample_surface_points(other, points, seed=seed)
    diagonal = float(np.linalg.norm(reference.bounds[1] - reference.bounds[0]))
    return float(np.sqrt(chamfer_distance(a, b)) / diagonal)


def extractor(vae) -> Callable:
    """``extract(grid, level, resolution)``: hy3dgen's surface extraction and trimesh export of a
    grid of ``vae`` (:func:`timi_torch.frontend.surface_at_level`, which reads only ``base.vae``)."""
    from types import SimpleNamespace

    from timi_torch.frontend import surface_at_level

    holder = SimpleNamespace(vae=vae)
    return lambda grid, level, resolution: surface_at_level(holder, grid, level, octree_resolution=resolution)


def _same_mesh(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (a.vertices.shape == b.vertices.shape and a.faces.shape == b.faces.shape
            and bool(np.array_equal(a.faces, b.faces)) and bool(np.array_equal(a.vertices, b.vertices)))


def bench_latents(vae, latents: Sequence, resolutions: Sequence[int], decodings: Sequence[str], *,
                  level: float = 0.0, names: Sequence[str] | None = None,
                  progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Rows of the benchmark: each latent at each resolution, each decoding, dense first.

    Meshes come from hy3dgen's surface extractor (:func:`extractor`)."""
    extract = extractor(vae)
    names = list(names or [f"latent {i}" for i in range(len(latents))])
    decodings = ["dense"] + [d for d in decodings if d != "dense"]
    rows = []
    for name, z in zip(names, latents):
        for r in resolutions:
            ref = None
            for d in decodings:
                progress(f"{name} @ {r}: {d}")
                out = decode(vae, z, d, r, mc_level=level)
                grid = out.grid.numpy()
                mesh = extract(out.grid, level, r)
                row = dict(latent=name, resolution=int(r), decoding=d, seconds=out.seconds, queries=out.queries,
                           peak_mb=None if out.peak_bytes is None else out.peak_bytes / 2**20,
                           faces=0 if mesh is None else int(len(mesh.faces)))
                if d == "dense":
                    ref = (grid, mesh, out)
                    row.update(iou=1.0, chamfer=0.0, identical=True, speedup=1.0, query_ratio=1.0)
                else:
                    a, b = solid(ref[0], level), solid(grid, level)
                    union = int((a | b).sum())
                    row.update(iou=float((a & b).sum() / union) if union else 1.0,
                               chamfer=(compare_meshes(ref[1], mesh) if ref[1] is not None and mesh is not None
                                        else float("nan")),
                               identical=_same_mesh(ref[1], mesh), speedup=ref[2].seconds / out.seconds,
                               query_ratio=ref[2].queries / max(out.queries, 1))
                rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (resolution, decoding): total seconds and queries, speed-up over dense, worst IoU and Chamfer."""
    out = []
    keys = sorted({(r["resolution"], r["decoding"]) for r in rows}, key=lambda k: (k[0], k[1] != "dense", k[1]))
    for res, dec in keys:
        sel = [r for r in rows if r["resolution"] == res and r["decoding"] == dec]
        dense = [r for r in rows if r["resolution"] == res and r["decoding"] == "dense"]
        seconds, dense_s = sum(r["seconds"] for r in sel), sum(r["seconds"] for r in dense)
        queries, dense_q = sum(r["queries"] for r in sel), sum(r["queries"] for r in dense)
        out.append(dict(resolution=res, decoding=dec, latents=len(sel), seconds=seconds, queries=queries,
                        speedup=dense_s / seconds if seconds else float("nan"),
                        query_ratio=dense_q / queries if queries else float("nan"),
                        peak_mb=max((r["peak_mb"] for r in sel if r["peak_mb"] is not None), default=None),
                        identical=sum(bool(r["identical"]) for r in sel), min_iou=min(r["iou"] for r in sel),
                        max_chamfer=max(r["chamfer"] for r in sel)))
    return out


def markdown(rows: list[dict]) -> str:
    """The summary table (Markdown)."""
    lines = ["| octree | decoding | latents | seconds | speed-up | decoder queries | fewer queries | "
             "CUDA peak (MiB) | identical meshes | volume IoU (worst) | Chamfer / diagonal (worst) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['resolution']} | {s['decoding']} | {s['latents']} | {s['seconds']:.2f} | "
                     f"{s['speedup']:.2f}x | {s['queries']:,} | {s['query_ratio']:.1f}x | "
                     f"{'n/a (CPU)' if s['peak_mb'] is None else format(s['peak_mb'], '.0f')} | "
                     f"{s['identical']}/{s['latents']} | "
                     f"{s['min_iou']:.4f} | {s['max_chamfer']:.2e} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """One line per (resolution, non-dense decoding): does it give the same mesh (IoU >= 0.99,
    Chamfer <= 1 % of the diagonal) and how much faster."""
    lines = []
    for s in summary(rows):
        if s["decoding"] == "dense":
            continue
        same = s["min_iou"] >= GOAL_IOU and s["max_chamfer"] <= GOAL_CHAMFER
        lines.append(f"octree {s['resolution']}, {s['decoding']}: {s['speedup']:.1f}x faster than dense, "
                     f"{'the same mesh' if same else 'NOT the same mesh'} (worst IoU {s['min_iou']:.4f}, "
                     f"worst Chamfer {s['max_chamfer']:.1e} of the diagonal)")
    return lines


#: A small ShapeVAE for seconds-long smoke runs (``--tiny``).
TINY_VAE = dict(FULL_WIDTH_VAE, num_latents=256, embed_dim=8, heads=4, width=64, num_decoder_layers=1)


def full_width_vae(seed: int = 0, device: str = "cpu", dtype=None, params: dict = FULL_WIDTH_VAE):
    """hy3dgen's ``ShapeVAE`` at 2.0's sizes (``params``, default :data:`FULL_WIDTH_VAE`), random
    weights from ``seed``, its occupancy centred so a random latent has a surface at level 0, and
    one such latent."""
    import torch
    from hy3dgen.shapegen.models.autoencoders import ShapeVAE
    from timi_torch.testing import calibrate_surface

    torch.manual_seed(seed)
    vae = ShapeVAE(**params).eval()
    calibrate_surface(vae, seed)
    vae = vae.to(device=device, dtype=dtype or torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn((1, *vae.latent_shape), generator=g) * vae.scale_factor
    return vae, z.to(device=device, dtype=dtype or torch.float32)


def scene_latents(pipe, scenes: Sequence, *, steps: int = 50, seed: int = 0) -> list:
    """Final latents (1, L, C) of the base model (TIMI off) on ``(image, masks)`` pairs, seed ``seed``."""
    import torch
    from timi_core import TIMIConfig

    out = []
    for image, masks in scenes:
        g = torch.Generator(device="cpu").manual_seed(seed)
        res = pipe(image, masks, num_inference_steps=steps, generator=g, output_type="latent", enable_pbar=False,
                   config=TIMIConfig(isg=False))
        out.append(res.latents.float())
    return out

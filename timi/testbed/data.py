"""Training cache of testbed samples: surface points, exact occupancy, FPS queries, conditioner images.

For each sample (see :mod:`timi.testbed.scenes`):

* ``surface`` (N_s, 3): points sampled uniformly on the ground-truth surface (the union of a
  compound asset's parts), in random order; the VAE encoder reads the first ``n_surface``;
* ``fps`` (L,): farthest-point-sampled indices into those first ``n_surface`` points: the encoder's
  latent-token queries (computed once here instead of at every training step);
* ``volume`` / ``near`` (N_q, 3) query points, uniform in hy3dgen's box ``[-1.01, 1.01]^3`` and
  jittered around the surface (three widths), with exact occupancy from the primitives' SDFs;
* ``gap`` (N_g, 3) query points between nearby surfaces of different primitives (instance gaps,
  part creases; :func:`gap_queries`), with exact occupancy, for the VAE's gap stage;
* ``thin`` (N_t, 3) query points inside the thin parts of the shape (a torus's tube, a cone's tip;
  :func:`thin_queries`), with exact occupancy, for the decoder stage: there a decoder breaks a part;
* ``image`` (3, S, S): the render through hy3dgen's own ``ImageProcessorV2`` (alpha crop, recentre
  with border 0.15 on white, 512 px, [-1, 1]) and then the conditioner's resize to ``S``, i.e.
  exactly what ``DinoImageEncoder`` sees at inference;
* ``num_instances``: 1 for a single asset (the DiT trains on these only), 2-4 for the share of
  multi-instance scenes that the VAE alone sees (``n_multi``).

Sample ``i`` draws from its own seed sequence, so the cache is the same whatever the number of
worker processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh

from .primitives import scene_sdf
from .scenes import generate_scene

BOX = 1.01
NEAR_SIGMAS = (0.005, 0.015, 0.04)
#: index offset of the multi-instance scenes in the train split (disjoint from the assets' indices)
MULTI_OFFSET = 1_000_000


def conditioner_image(rgba: np.ndarray, image_size: int) -> torch.Tensor:
    """(3, S, S) float tensor in [-1, 1]: hy3dgen's ImageProcessorV2 then the encoder's Resize(S)."""
    from hy3dgen.shapegen.preprocessors import ImageProcessorV2
    from PIL import Image
    from torchvision import transforms

    processed = ImageProcessorV2(size=512, border_ratio=0.15)(Image.fromarray(rgba, mode="RGBA"))["image"]
    resize = transforms.Resize(image_size, transforms.InterpolationMode.BILINEAR, antialias=True)
    return resize(processed)[0]


def farthest_point_indices(points: np.ndarray, k: int) -> np.ndarray:
    """Indices (k,) of a farthest-point subset of ``points`` (N, 3), starting at index 0."""
    idx = np.zeros(k, dtype=np.int64)
    dist = np.full(len(points), np.inf)
    last = 0
    for i in range(k):
        idx[i] = last
        dist = np.minimum(dist, ((points - points[last]) ** 2).sum(-1))
        last = int(dist.argmax())
    return idx


def gap_queries(primitives, rng: np.random.Generator, n: int, reach: float = 0.25) -> np.ndarray:
    """(n, 3) points on segments between nearby surfaces of *different* primitives (plus 0.01
    jitter): the gaps between instances and the creases between an asset's parts, the regions
    where a decoder fuses or separates. A single primitive: near-surface points (sigma 0.02)."""
    from scipy.spatial import cKDTree

    pts = [trimesh.sample.sample_surface(p.mesh(), 1500, seed=int(rng.integers(2**31)))[0] for p in primitives]
    starts, ends = [], []
    for a in range(len(pts)):
        others = np.concatenate([pts[b] for b in range(len(pts)) if b != a]) if len(pts) > 1 else None
        if others is None:
            break
        d, j = cKDTree(others).query(pts[a])
        keep = d < reach
        starts.append(pts[a][keep])
        ends.append(others[j[keep]])
    if not starts or sum(len(x) for x in starts) == 0:
        base = pts[0][rng.integers(len(pts[0]), size=n)]
        return np.clip(base + rng.normal(size=(n, 3)) * 0.02, -BOX, BOX)
    a, b = np.concatenate(starts), np.concatenate(ends)
    pick = rng.integers(len(a), size=n)
    u = rng.uniform(size=(n, 1))
    out = a[pick] + u * (b[pick] - a[pick]) + rng.normal(size=(n, 3)) * 0.01
    return np.clip(out, -BOX, BOX)


def thin_queries(primitives, rng: np.random.Generator, n: int, max_thickness: float = 0.16,
                 n_candidates: int = 4000) -> np.ndarray:
    """(n, 3) points inside the thin parts of the union of ``primitives`` (plus 0.005 jitter).

    From surface points, march inwards along the normal until the exact SDF turns positive again;
    where that chord is at most ``max_thickness`` long (about seven marching-cubes cells at octree
    96: a torus's tube, a cone's tip, a thin slab), draw points along it. These are the regions that
    a smooth decoder drops below its iso-level, so that a connected shape comes back in pieces.
    Without thin parts: interior points near the surface (sigma 0.02)."""
    mesh = trimesh.util.concatenate([p.mesh() for p in primitives])
    pts, face = trimesh.sample.sample_surface(mesh, n_candidates, seed=int(rng.integers(2**31)))
    on_union = np.abs(scene_sdf(primitives, pts)[0]) < 2e-3  # not a part's face buried in another part
    pts, normals = pts[on_union], mesh.face_normals[face[on_union]]
    steps = np.linspace(0.01, max_thickness, 16)
    probe = pts[:, None, :] - normals[:, None, :] * steps[None, :, None]
    inside = scene_sdf(primitives, probe.reshape(-1, 3))[0].reshape(len(pts), len(steps)) < 0
    exit_at = np.argmin(inside, axis=1)  # first probe outside again
    thin = inside[:, 0] & ~inside.all(1)
    if not thin.any():
        base = pts[rng.integers(len(pts), size=n)]
        return np.clip(base + rng.normal(size=(n, 3)) * 0.02, -BOX, BOX)
    keep = np.flatnonzero(thin)
    pick = keep[rng.integers(len(keep), size=n)]
    u = rng.uniform(0.05, 1.0, size=(n, 1)) * steps[exit_at[pick], None]
    out = pts[pick] - normals[pick] * u + rng.normal(size=(n, 3)) * 0.005
    return np.clip(out, -BOX, BOX)


def scene_samples(scene, rng: np.random.Generator, n_surface: int = 4096, n_query: int = 4096,
                  n_gap: int = 2048, n_thin: int = 2048) -> dict:
    combined = trimesh.util.concatenate(scene.instance_meshes())
    surface = trimesh.sample.sample_surface(combined, n_surface, seed=int(rng.integers(2**31)))[0]
    surface = surface[rng.permutation(len(surface))]
    volume = rng.uniform(-BOX, BOX, size=(n_query, 3))
    pick = trimesh.sample.sample_surface(combined, n_query, seed=int(rng.integers(2**31)))[0]
    sigma = np.asarray(NEAR_SIGMAS)[rng.integers(len(NEAR_SIGMAS), size=(n_query, 1))]
    near = np.clip(pick + rng.normal(size=(n_query, 3)) * sigma, -BOX, BOX)
    out = {
        "surface": surface.astype(np.float32),
        "volume": volume.astype(np.float32),
        "volume_occ": scene_sdf(scene.primitives, volume)[0] < 0,
        "near": near.astype(np.float32),
        "near_occ": scene_sdf(scene.primitives, near)[0] < 0,
    }
    # drawn last, so the arrays above do not depend on whether gap queries are made
    gap = gap_queries(scene.primitives, rng, n_gap)
    out["gap"], out["gap_occ"] = gap.astype(np.float32), scene_sdf(scene.primitives, gap)[0] < 0
    thin = thin_queries(scene.primitives, rng, n_thin)  # after the gap queries: those stay as they were
    out["thin"], out["thin_occ"] = thin.astype(np.float32), scene_sdf(scene.primitives, thin)[0] < 0
    return out


def _sample(args: tuple) -> dict:
    seed, i, image_size, num_latents, n_encoder = args
    torch.set_num_threads(1)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99, i)))
    if i < MULTI_OFFSET:
        scene = generate_scene(seed, "train", i, num_instances=1)
    else:
        scene = generate_scene(seed, "train", i, num_instances=int(rng.integers(2, 5)))
    out = scene_samples(scene, rng)
    out["fps"] = farthest_point_indices(out["surface"][:n_encoder], num_latents)
    out["image"] = conditioner_image(scene.image, image_size).numpy().astype(np.float16)
    out["num_instances"] = scene.num_instances
    return out


def map_jobs(fn, jobs: list, workers: int = 1, desc: str = "", progress: bool = True) -> list:
    """``[fn(j) for j in jobs]`` with a progress bar, in ``workers`` spawned processes when > 1 (the
    result does not depend on ``workers``: each job draws from its own seed)."""
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc=desc, disable=not progress, mininterval=5.0)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            return list(tqdm(pool.imap(fn, jobs, chunksize=8), **bar))
    return [fn(j) for j in tqdm(jobs, **bar)]


def build_cache(path: str | Path, n: int, seed: int = 0, image_size: int = 224, num_latents: int = 256,
                n_encoder: int = 2048, n_multi: int = 0, workers: int = 1, progress: bool = True) -> Path:
    """Write ``n`` single assets (train split, indices ``0..n-1``) and ``n_multi`` multi-instance
    scenes (indices from :data:`MULTI_OFFSET`) to ``path`` (.npz); reuse it if it matches."""
    path = Path(path)
    meta = {"n": n, "n_multi": n_multi, "seed": seed, "image_size": image_size, "num_latents": num_latents,
            "n_encoder": n_encoder, "cache_version": 3}
    if path.exists():
        with np.load(path) as f:
            if all(k in f and int(f[k]) == v for k, v in meta.items()):
                return path
    jobs = [(seed, i, image_size, num_latents, n_encoder) for i in range(n)]
    jobs += [(seed, MULTI_OFFSET + j, image_size, num_latents, n_encoder) for j in range(n_multi)]
    rows = map_jobs(_sample, jobs, workers, "training cache", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.stack([r[k] for r in rows]) for k in rows[0]}, **meta)
    tmp.replace(path)
    return path

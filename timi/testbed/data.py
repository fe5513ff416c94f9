"""Training cache of testbed scenes: surface points, exact occupancy samples and conditioner images.

For each scene of a split (see :mod:`timi.testbed.scenes`):

* ``surface`` (N_s, 3): points sampled uniformly on the ground-truth meshes (the VAE encoder input);
* ``volume`` / ``near`` (N_q, 3) query points, uniform in hy3dgen's box ``[-1.01, 1.01]^3`` and
  jittered around the surface, with exact occupancy from the primitives' signed distances;
* ``image`` (3, S, S): the render through hy3dgen's own ``ImageProcessorV2`` (alpha crop, recentre
  with border 0.15 on white, 512 px, [-1, 1]) and then the conditioner's resize to ``S``, i.e.
  exactly what ``DinoImageEncoder`` sees at inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh

from .primitives import scene_sdf
from .scenes import generate_scene

BOX = 1.01


def conditioner_image(rgba: np.ndarray, image_size: int) -> torch.Tensor:
    """(3, S, S) float tensor in [-1, 1]: hy3dgen's ImageProcessorV2 then the encoder's Resize(S)."""
    from hy3dgen.shapegen.preprocessors import ImageProcessorV2
    from PIL import Image
    from torchvision import transforms

    processed = ImageProcessorV2(size=512, border_ratio=0.15)(Image.fromarray(rgba, mode="RGBA"))["image"]
    resize = transforms.Resize(image_size, transforms.InterpolationMode.BILINEAR, antialias=True)
    return resize(processed)[0]


def scene_samples(scene, rng: np.random.Generator, n_surface: int = 4096, n_query: int = 4096) -> dict:
    meshes = scene.instance_meshes()
    combined = trimesh.util.concatenate(meshes)
    surface = trimesh.sample.sample_surface(combined, n_surface, seed=int(rng.integers(2**31)))[0]
    volume = rng.uniform(-BOX, BOX, size=(n_query, 3))
    pick = trimesh.sample.sample_surface(combined, n_query, seed=int(rng.integers(2**31)))[0]
    sigma = np.where(rng.uniform(size=(n_query, 1)) < 0.5, 0.01, 0.04)
    near = np.clip(pick + rng.normal(size=(n_query, 3)) * sigma, -BOX, BOX)
    return {
        "surface": surface.astype(np.float32),
        "volume": volume.astype(np.float32),
        "volume_occ": scene_sdf(scene.primitives, volume)[0] < 0,
        "near": near.astype(np.float32),
        "near_occ": scene_sdf(scene.primitives, near)[0] < 0,
    }


def build_cache(path: str | Path, n: int, seed: int = 0, split: str = "train", image_size: int = 112,
                progress: bool = True) -> Path:
    """Write the cache of scenes ``0..n-1`` of ``split`` to ``path`` (.npz); reuse it if complete."""
    from tqdm import tqdm

    path = Path(path)
    if path.exists():
        with np.load(path) as f:
            if int(f["n"]) == n and int(f["seed"]) == seed and int(f["image_size"]) == image_size:
                return path
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99,)))
    keys = ("surface", "volume", "volume_occ", "near", "near_occ")
    out = {k: [] for k in keys}
    images, counts = [], []
    for i in tqdm(range(n), desc=f"training cache ({split})", disable=not progress):
        scene = generate_scene(seed, split, i)
        samples = scene_samples(scene, rng)
        for k in keys:
            out[k].append(samples[k])
        images.append(conditioner_image(scene.image, image_size).numpy().astype(np.float16))
        counts.append(len(scene.primitives))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.stack(v) for k, v in out.items()}, image=np.stack(images),
             num_instances=np.array(counts), n=n, seed=seed, image_size=image_size)
    tmp.replace(path)
    return path

"""Procedural multi-object scenes with exact ground truth (issue 8).

A scene holds 1 to 4 primitives (:mod:`timi.testbed.primitives`) of random kind, size, colour and
rotation. Each new primitive is pushed along a random direction against one already placed until
the gap between surfaces reaches a drawn target (most often ~0: touching, the case where
instances fuse). The scene is then centred and uniformly scaled so its bounding box spans at most
``[-0.9, 0.9]`` on every axis, inside hy3dgen's decoding box (``box_v = 1.01``).

Determinism: scene ``i`` of split ``s`` with base seed ``seed`` draws from
``numpy.random.SeedSequence(seed, spawn_key=(SPLITS[s], i))``, so splits never share a scene and
every scene is reproducible on its own.

Folder layout written by :func:`write_scene` (one sub-folder per scene, see ``docs/testbed.md``)::

    <scene_id>/image.png        RGBA front view (alpha 0 = background, RGB white there)
    <scene_id>/masks.png        label map, uint8: 0 background, k = instance k (1..K)
    <scene_id>/gt/instance_XX.ply  ground-truth mesh of instance XX (01..K), world frame
    <scene_id>/scene.glb        all instances, one named node each (instance_XX)
    <scene_id>/layout.json      primitives (kind, params, rotation, translation, scale, colour),
                                bounding boxes, centroids, camera, seed
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image
from scipy.spatial.transform import Rotation

from .primitives import PRIMITIVE_KINDS, Primitive
from .render import render

SPLITS = {"train": 0, "val": 1, "test": 2}
SCENE_HALF_EXTENT = 0.9
IMAGE_RESOLUTION = 256
MIN_INSTANCE_PIXELS = 120
LAYOUT_VERSION = 1


@dataclass
class Scene:
    """A generated scene: placed primitives, its render and label map, and its id/seed."""

    scene_id: str
    seed: int
    split: str
    index: int
    primitives: list[Primitive]
    image: np.ndarray  # (H, W, 4) uint8
    labels: np.ndarray  # (H, W) uint8

    def instance_meshes(self) -> list[trimesh.Trimesh]:
        return [p.mesh() for p in self.primitives]

    def scene_mesh(self) -> trimesh.Scene:
        scene = trimesh.Scene()
        for k, mesh in enumerate(self.instance_meshes(), start=1):
            scene.add_geometry(mesh, node_name=f"instance_{k:02d}", geom_name=f"instance_{k:02d}")
        return scene

    def layout(self) -> dict:
        instances = []
        for k, (prim, mesh) in enumerate(zip(self.primitives, self.instance_meshes()), start=1):
            instances.append({
                "label": k,
                "name": f"instance_{k:02d}",
                **prim.to_json(),
                "bounds": mesh.bounds.tolist(),
                "centroid": mesh.centroid.tolist(),
                "visible_pixels": int((self.labels == k).sum()),
            })
        return {
            "version": LAYOUT_VERSION,
            "scene_id": self.scene_id,
            "seed": self.seed,
            "split": self.split,
            "index": self.index,
            "num_instances": len(self.primitives),
            "instances": instances,
            "camera": {
                "type": "orthographic",
                "position_axis": "+z",
                "look_direction": [0.0, 0.0, -1.0],
                "up": [0.0, 1.0, 0.0],
                "image_extent": [-1.0, 1.0],
                "resolution": int(self.image.shape[0]),
                "pixel_to_world": "x = ((u + 0.5) / W * 2 - 1) * extent, y = -((v + 0.5) / H * 2 - 1) * extent",
            },
            "frame": "world: +y up, camera on +z; scene bbox inside [-0.9, 0.9]^3 (hy3dgen box_v 1.01)",
        }


def _random_primitive(rng: np.random.Generator) -> Primitive:
    kind = PRIMITIVE_KINDS[rng.integers(len(PRIMITIVE_KINDS))]
    size = rng.uniform(0.25, 0.55)
    if kind == "box":
        params = {"half": (size * rng.uniform(0.45, 1.0, size=3)).tolist()}
    elif kind == "sphere":
        params = {"radius": size * rng.uniform(0.7, 1.0)}
    elif kind in ("cylinder", "cone"):
        params = {"radius": size * rng.uniform(0.5, 0.9), "half_height": size * rng.uniform(0.5, 1.0)}
    elif kind == "capsule":
        params = {"radius": size * rng.uniform(0.3, 0.5), "half_length": size * rng.uniform(0.3, 0.7)}
    else:
        params = {"major": size * rng.uniform(0.6, 0.8), "minor": size * rng.uniform(0.18, 0.3)}
    rotation = Rotation.random(random_state=rng).as_matrix()
    return Primitive(kind=kind, params=params, rotation=rotation)


def _colors(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """Distinct saturated colours: hues spread by the golden ratio from a random start."""
    h0 = rng.uniform()
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((h0 + 0.618034 * i) % 1.0, rng.uniform(0.55, 0.9), rng.uniform(0.65, 0.95))
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _surface_samples(prim: Primitive, n: int, seed: int) -> np.ndarray:
    return trimesh.sample.sample_surface(prim.mesh(), n, seed=seed)[0]


def _gap(new: Primitive, new_pts_local: np.ndarray, others: list[Primitive], others_pts: np.ndarray) -> float:
    """Approximate surface gap: min of each side's SDF over the other side's surface samples."""
    pts = new_pts_local + new.translation
    d1 = min(o.sdf(pts).min() for o in others)
    d2 = new.sdf(others_pts).min()
    return float(min(d1, d2))


def _place(rng: np.random.Generator, prim: Primitive, placed: list[Primitive], seed: int) -> None:
    """Move ``prim`` along a random direction from a placed one until the gap reaches a drawn target."""
    anchor = placed[rng.integers(len(placed))]
    direction = rng.normal(size=3)
    direction[2] *= 0.35  # mostly across the image plane, so instances are seen side by side
    direction /= np.linalg.norm(direction)
    u = rng.uniform()
    target = 0.004 if u < 0.6 else (rng.uniform(0.02, 0.08) if u < 0.85 else rng.uniform(0.1, 0.3))
    prim.translation = np.zeros(3)
    local_pts = _surface_samples(prim, 800, seed)
    others_pts = np.concatenate([_surface_samples(o, 800, seed + j + 1) for j, o in enumerate(placed)])
    lo, hi = 0.0, 3.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        prim.translation = anchor.translation + mid * direction
        if _gap(prim, local_pts, placed, others_pts) >= target:
            hi = mid
        else:
            lo = mid
    prim.translation = anchor.translation + hi * direction


def _normalise(primitives: list[Primitive]) -> None:
    """Centre the scene's bounding box at the origin and scale it into [-0.9, 0.9]^3."""
    bounds = np.array([p.mesh().bounds for p in primitives])
    lo, hi = bounds[:, 0].min(axis=0), bounds[:, 1].max(axis=0)
    centre = 0.5 * (lo + hi)
    factor = 2 * SCENE_HALF_EXTENT / (hi - lo).max()
    for p in primitives:
        p.translation = (p.translation - centre) * factor
        p.scale *= factor


def scene_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    return np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index))


def generate_scene(seed: int = 0, split: str = "test", index: int = 0, num_instances: int | None = None,
                   resolution: int = IMAGE_RESOLUTION, max_tries: int = 50) -> Scene:
    """Scene ``index`` of ``split`` for base ``seed`` (deterministic). ``num_instances`` forces K (1-4)."""
    if num_instances is not None and not 1 <= num_instances <= 4:
        raise ValueError(f"num_instances must be in 1..4, got {num_instances}")
    rng = np.random.default_rng(scene_seed(seed, split, index))
    for _ in range(max_tries):
        k = int(num_instances or rng.integers(1, 5))
        colors = _colors(rng, k)
        prims: list[Primitive] = []
        for i in range(k):
            prim = _random_primitive(rng)
            prim.color = colors[i]
            if prims:
                _place(rng, prim, prims, seed=int(rng.integers(2**31)))
            prims.append(prim)
        _normalise(prims)
        image, labels = render(prims, resolution=resolution)
        counts = np.bincount(labels.reshape(-1), minlength=k + 1)[1:]
        if (counts >= MIN_INSTANCE_PIXELS).all():
            return Scene(f"{split}_{index:04d}", seed, split, index, prims, image, labels)
    raise RuntimeError(f"could not draw a scene with every instance visible (seed={seed}, split={split}, index={index})")


def write_scene(scene: Scene, out_dir: str | Path) -> Path:
    """Write one scene folder (layout in the module docstring); returns the folder."""
    folder = Path(out_dir) / scene.scene_id
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image, mode="RGBA").save(folder / "image.png")
    Image.fromarray(scene.labels, mode="L").save(folder / "masks.png")
    for k, mesh in enumerate(scene.instance_meshes(), start=1):
        mesh.export(folder / "gt" / f"instance_{k:02d}.ply")
    scene.scene_mesh().export(folder / "scene.glb")
    (folder / "layout.json").write_text(json.dumps(scene.layout(), indent=1))
    return folder


def load_layout(folder: str | Path) -> list[Primitive]:
    """Primitives of a written scene folder (from its ``layout.json``)."""
    path = Path(folder) / "layout.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {folder} a scene folder written by `timi testbed scenes`?")
    return [Primitive.from_json(d) for d in json.loads(path.read_text())["instances"]]


def make_dataset(out_dir: str | Path, n: int, seed: int = 0, split: str = "test", start: int = 0,
                 num_instances: int | None = None, progress: bool = True) -> list[Path]:
    """Write scenes ``start .. start+n-1`` of ``split`` into ``out_dir`` (skips folders already complete)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for i in tqdm(range(start, start + n), desc=f"scenes ({split})", disable=not progress):
        folder = out / f"{split}_{i:04d}"
        if (folder / "layout.json").exists():
            folders.append(folder)
            continue
        folders.append(write_scene(generate_scene(seed, split, i, num_instances=num_instances), out))
    return folders

"""Procedural single assets and multi-instance scenes with exact ground truth (issues 8, 12).

Two kinds of sample, one generator (:func:`generate_scene`):

* a **single asset** (``num_instances=1``): one primitive, or a compound of 2-4 primitives
  (:mod:`timi.testbed.primitives`) that overlap and form one connected shape, each part in its own
  colour (real assets are multi-part). This is what the testbed model is trained on, the way
  Hunyuan3D was trained on single objects;
* a **multi-instance scene** (``num_instances`` 2-4): separate primitives, each one instance, whose
  surface gaps after normalisation are drawn in :data:`SCENE_GAP` (at least two marching-cubes
  cells at octree resolution 96, so the VAE can represent the gap) and placed mostly side by side
  across the image plane, so instances are adjacent (sometimes overlapping) in the image.

Each new primitive is pushed along a random direction against one already placed until the surface
gap reaches a drawn target (negative: interpenetration depth). The sample is then centred and
uniformly scaled so its bounding box spans exactly ``[-0.9, 0.9]`` on its longest axis, inside
hy3dgen's decoding box (``box_v = 1.01``). Scene gaps are drawn in the normalised frame: the
placement runs twice, the second time with the targets divided by the first pass's scale factor,
and the final gaps are checked.

Determinism: sample ``i`` of split ``s`` with base seed ``seed`` draws from
``numpy.random.SeedSequence(seed, spawn_key=(SPLITS[s], i))`` (``num_instances`` part of the draw),
so splits never share a sample and every sample is reproducible on its own.

Folder layout written by :func:`write_scene` (one sub-folder per scene, see ``docs/testbed.md``)::

    <scene_id>/image.png        RGBA front view (alpha 0 = background, RGB white there)
    <scene_id>/masks.png        label map, uint8: 0 background, k = instance k (1..K)
    <scene_id>/gt/instance_XX.ply  ground-truth mesh of instance XX (01..K), world frame
                                (a compound asset: the exact union of its parts, by manifold3d)
    <scene_id>/scene.glb        all instances, one named node each (instance_XX)
    <scene_id>/layout.json      primitives (kind, params, rotation, translation, scale, colour,
                                instance), instances (bounds, centroid, pixels), gaps, camera, seed
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass, field
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
LAYOUT_VERSION = 2
#: surface gap between the instances of a multi-instance scene, after normalisation (world units):
#: >= 2 marching-cubes cells at octree resolution 96 (2 * 2.02 / 96 = 0.042)
SCENE_GAP = (0.05, 0.15)
MIN_SCENE_GAP = 0.042
#: number of parts of a single asset (1..4) and their probabilities
ASSET_PARTS = (1, 2, 3, 4)
ASSET_PART_PROBS = (0.25, 0.3, 0.25, 0.2)
#: interpenetration depth of a part into the part it is attached to (before normalisation)
ASSET_OVERLAP = (0.03, 0.12)


@dataclass
class Scene:
    """A generated sample: placed primitives, which instance each belongs to, render, label map, id."""

    scene_id: str
    seed: int
    split: str
    index: int
    primitives: list[Primitive]
    image: np.ndarray  # (H, W, 4) uint8
    labels: np.ndarray  # (H, W) uint8, instance ids 1..K
    instance_of: list[int] = field(default_factory=list)  # 1-based instance of each primitive
    _meshes: list | None = field(default=None, repr=False, compare=False)
    _gaps: list | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.instance_of:
            self.instance_of = list(range(1, len(self.primitives) + 1))

    @property
    def num_instances(self) -> int:
        return max(self.instance_of)

    def parts(self, k: int) -> list[Primitive]:
        """Primitives of instance ``k`` (1-based)."""
        return [p for p, i in zip(self.primitives, self.instance_of) if i == k]

    def instance_meshes(self) -> list[trimesh.Trimesh]:
        """Ground-truth mesh per instance (a compound: the union of its parts, coloured per part)."""
        if self._meshes is None:
            self._meshes = [union_mesh(self.parts(k)) for k in range(1, self.num_instances + 1)]
        return [m.copy() for m in self._meshes]

    def scene_mesh(self) -> trimesh.Scene:
        scene = trimesh.Scene()
        for k, mesh in enumerate(self.instance_meshes(), start=1):
            scene.add_geometry(mesh, node_name=f"instance_{k:02d}", geom_name=f"instance_{k:02d}")
        return scene

    def gaps(self) -> list[float]:
        """Surface gap of every pair of instances (world units; negative = they overlap), computed once."""
        if self._gaps is not None:
            return list(self._gaps)
        meshes = self.instance_meshes()
        out = []
        for a in range(len(meshes)):
            for b in range(a + 1, len(meshes)):
                out.append(_mesh_gap(meshes[a], self.parts(a + 1), meshes[b], self.parts(b + 1)))
        self._gaps = out
        return list(out)

    def layout(self) -> dict:
        instances = []
        for k, mesh in enumerate(self.instance_meshes(), start=1):
            instances.append({
                "label": k,
                "name": f"instance_{k:02d}",
                "parts": [j for j, i in enumerate(self.instance_of) if i == k],
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
            "kind": "single asset" if self.num_instances == 1 else "multi-instance scene",
            "num_instances": self.num_instances,
            "primitives": [{**p.to_json(), "instance": i} for p, i in zip(self.primitives, self.instance_of)],
            "instances": instances,
            "gaps": [round(g, 5) for g in self.gaps()],
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


def union_mesh(parts: list[Primitive]) -> trimesh.Trimesh:
    """Watertight mesh of the union of ``parts`` (manifold3d), each face coloured by its part."""
    meshes = [p.mesh() for p in parts]
    if len(meshes) == 1:
        return meshes[0]
    mesh = trimesh.boolean.union(meshes, engine="manifold")
    owner = np.stack([p.sdf(mesh.triangles_center) for p in parts]).argmin(axis=0)
    colors = np.array([[*p.color, 255] for p in parts], dtype=np.uint8)
    mesh.visual.face_colors = colors[owner]
    return mesh


def _mesh_gap(mesh_a, parts_a, mesh_b, parts_b, n: int = 4000) -> float:
    """Surface gap between two instances: min over each one's surface samples of the other's SDF."""
    pa = trimesh.sample.sample_surface(mesh_a, n, seed=1)[0]
    pb = trimesh.sample.sample_surface(mesh_b, n, seed=2)[0]
    da = min(p.sdf(pb).min() for p in parts_a)
    db = min(p.sdf(pa).min() for p in parts_b)
    return float(min(da, db))


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


@dataclass
class _Draw:
    """Everything random about one primitive's placement, drawn once so placement can be redone."""

    prim: Primitive
    anchor: int
    direction: np.ndarray
    target: float
    seed: int


def _place(draw: _Draw, placed: list[Primitive], target: float) -> None:
    """Move ``draw.prim`` along its direction from its anchor until the gap to all placed ones reaches ``target``."""
    prim, anchor = draw.prim, placed[draw.anchor]
    prim.translation = np.zeros(3)
    local_pts = _surface_samples(prim, 800, draw.seed)
    others_pts = np.concatenate([_surface_samples(o, 800, draw.seed + j + 1) for j, o in enumerate(placed)])
    lo, hi = 0.0, 3.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        prim.translation = anchor.translation + mid * draw.direction
        if _gap(prim, local_pts, placed, others_pts) >= target:
            hi = mid
        else:
            lo = mid
    prim.translation = anchor.translation + hi * draw.direction


def _bbox_scale(primitives: list[Primitive]) -> tuple[np.ndarray, float]:
    bounds = np.array([p.mesh().bounds for p in primitives])
    lo, hi = bounds[:, 0].min(axis=0), bounds[:, 1].max(axis=0)
    return 0.5 * (lo + hi), 2 * SCENE_HALF_EXTENT / (hi - lo).max()


def _normalise(primitives: list[Primitive]) -> float:
    """Centre the bounding box at the origin and scale it into [-0.9, 0.9]^3; returns the factor."""
    centre, factor = _bbox_scale(primitives)
    for p in primitives:
        p.translation = (p.translation - centre) * factor
        p.scale *= factor
    return factor


def _draws(rng: np.random.Generator, n: int, gap_range: tuple[float, float], sign: float) -> list[_Draw]:
    out = []
    for i in range(n):
        prim = _random_primitive(rng)
        direction = rng.normal(size=3)
        direction[2] *= 0.35  # mostly across the image plane, so parts/instances are seen side by side
        direction /= np.linalg.norm(direction)
        out.append(_Draw(prim, int(rng.integers(max(i, 1))), direction, sign * rng.uniform(*gap_range),
                         int(rng.integers(2**31))))
    return out


def _assemble(draws: list[_Draw], scale: float = 1.0) -> list[Primitive]:
    placed: list[Primitive] = []
    for i, d in enumerate(draws):
        d.prim.translation, d.prim.scale = np.zeros(3), 1.0
        if i:
            _place(d, placed, d.target * scale)
        placed.append(d.prim)
    return placed


def _draw_asset(rng: np.random.Generator) -> tuple[list[Primitive], list[int]]:
    """A single asset: 1-4 overlapping parts (connected), each its own colour, all instance 1."""
    n = int(rng.choice(ASSET_PARTS, p=ASSET_PART_PROBS))
    colors = _colors(rng, n)
    draws = _draws(rng, n, ASSET_OVERLAP, -1.0)
    prims = _assemble(draws)
    for p, c in zip(prims, colors):
        p.color = c
    _normalise(prims)
    return prims, [1] * n


def _draw_multi(rng: np.random.Generator, k: int) -> tuple[list[Primitive], list[int]]:
    """K separate primitives whose normalised gaps are drawn in SCENE_GAP."""
    colors = _colors(rng, k)
    draws = _draws(rng, k, SCENE_GAP, 1.0)
    for d, c in zip(draws, colors):
        d.prim.color = c
    _, f1 = _bbox_scale(_assemble(draws))
    prims = _assemble(draws, scale=1.0 / f1)  # targets in the normalised frame
    _normalise(prims)
    return prims, list(range(1, k + 1))


def scene_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    return np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index))


def generate_scene(seed: int = 0, split: str = "test", index: int = 0, num_instances: int | None = None,
                   resolution: int = IMAGE_RESOLUTION, max_tries: int = 50) -> Scene:
    """Sample ``index`` of ``split`` for base ``seed`` (deterministic).

    ``num_instances``: 1 = a single asset, 2-4 = a multi-instance scene with gaps, None = K drawn
    uniformly in 1..4. Redrawn (from the same stream) until every instance covers at least
    :data:`MIN_INSTANCE_PIXELS` pixels and, for scenes, every pair of instances is at least
    :data:`MIN_SCENE_GAP` apart.
    """
    if num_instances is not None and not 1 <= num_instances <= 4:
        raise ValueError(f"num_instances must be in 1..4, got {num_instances}")
    rng = np.random.default_rng(scene_seed(seed, split, index))
    for _ in range(max_tries):
        k = int(num_instances or rng.integers(1, 5))
        prims, instance_of = _draw_asset(rng) if k == 1 else _draw_multi(rng, k)
        image, part_labels = render(prims, resolution=resolution)
        labels = np.asarray([0, *instance_of], dtype=np.uint8)[part_labels]
        counts = np.bincount(labels.reshape(-1), minlength=k + 1)[1:]
        if not (counts >= MIN_INSTANCE_PIXELS).all():
            continue
        scene = Scene(f"{split}_{index:04d}", seed, split, index, prims, image, labels, instance_of)
        if k == 1 or min(scene.gaps()) >= MIN_SCENE_GAP:
            return scene
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


def load_layout(folder: str | Path) -> tuple[list[Primitive], list[int]]:
    """Primitives of a written scene folder and the 1-based instance of each (from ``layout.json``)."""
    path = Path(folder) / "layout.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {folder} a scene folder written by `timi testbed scenes`?")
    layout = json.loads(path.read_text())
    if layout.get("version", 1) < 2:
        raise ValueError(f"{path} has layout version {layout.get('version', 1)}; rewrite it with "
                         "`timi testbed scenes` (version 2: primitives grouped into instances)")
    return ([Primitive.from_json(d) for d in layout["primitives"]], [int(d["instance"]) for d in layout["primitives"]])


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

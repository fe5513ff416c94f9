"""Evaluation datasets: one sub-folder per scene (the layout ``timi testbed scenes`` writes).

::

    DATASET_DIR/
      <scene_id>/
        image.png              RGBA input view (alpha 0 = background)
        masks.png | masks.npy  instance masks: a label map (0 background, k = instance k, 1..K)
                               or a (K, H, W) array; read by :func:`timi.masks_io.load_masks`
        gt/instance_XX.(ply|glb|obj)   ground-truth mesh of instance XX = 01..K (mask label k)
        ...                    anything else (scene.glb, layout.json) is ignored

Instance ``k`` of the masks is paired with ``gt/instance_{k:02d}.*``: the numbers must be exactly
1..K, the same K as the masks (a mismatch is an error naming both sides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from timi.masks_io import MaskInputError, load_masks

MASK_FILES = ("masks.png", "masks.npy")
GT_SUFFIXES = (".ply", ".glb", ".obj")
_GT_NAME = re.compile(r"^instance_(\d+)$")


class SceneError(ValueError):
    """A scene folder that cannot be evaluated; the message names the file and the fix."""


@dataclass
class SceneData:
    """One loaded scene: RGBA ``image`` (H, W, 4) uint8, ``masks`` (K, H, W) bool, K gt meshes."""

    scene_id: str
    folder: Path
    image: np.ndarray
    masks: np.ndarray
    gt_meshes: list[trimesh.Trimesh]
    gt_paths: list[Path]


def discover_scenes(dataset_dir: str | Path) -> list[Path]:
    """Sub-folders of ``dataset_dir`` (not hidden), sorted by name: each one is a scene."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise SceneError(f"{root}: dataset folder does not exist; pass a folder with one sub-folder per scene.")
    scenes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not scenes:
        raise SceneError(f"{root}: holds no scene folders (see docs/metrics.md for the layout); "
                         "make some with `timi testbed scenes --out DIR`.")
    return scenes


def _load_gt(folder: Path) -> list[Path]:
    gt_dir = folder / "gt"
    if not gt_dir.is_dir():
        raise SceneError(f"{gt_dir}: missing; put one ground-truth mesh per instance there as instance_XX.ply|glb|obj.")
    found: dict[int, Path] = {}
    for p in sorted(gt_dir.iterdir()):
        m = _GT_NAME.match(p.stem)
        if p.suffix.lower() in GT_SUFFIXES and m:
            k = int(m.group(1))
            if k in found:
                raise SceneError(f"{p}: instance {k} has two ground-truth files ({found[k].name}, {p.name}); keep one.")
            found[k] = p
    if not found:
        raise SceneError(f"{gt_dir}: no ground-truth file instance_XX.ply|glb|obj; add one per instance.")
    return [found[k] for k in sorted(found)]


def load_mesh(path: Path) -> trimesh.Trimesh:
    """One mesh from a PLY/GLB/OBJ file (a multi-node GLB is flattened with its node transforms)."""
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as e:  # trimesh raises many kinds on bad files
        raise SceneError(f"{path}: cannot be read as a mesh ({type(e).__name__}: {e}).") from e
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise SceneError(f"{path}: holds no triangles; export the instance as a triangle mesh.")
    return mesh


def load_scene(folder: str | Path) -> SceneData:
    """Load and check one scene folder; every problem raises :class:`SceneError`."""
    folder = Path(folder)
    image_path = folder / "image.png"
    if not image_path.is_file():
        raise SceneError(f"{image_path}: missing; each scene needs its input view as image.png (RGBA).")
    try:
        image = np.asarray(Image.open(image_path).convert("RGBA"))
    except Exception as e:
        raise SceneError(f"{image_path}: unreadable image ({type(e).__name__}: {e}).") from e
    mask_path = next((folder / n for n in MASK_FILES if (folder / n).is_file()), None)
    if mask_path is None:
        raise SceneError(f"{folder}: no masks.png or masks.npy; add the instance masks (label map 0..K).")
    try:
        masks = load_masks(mask_path, image_size=image.shape[:2])
    except MaskInputError as e:
        raise SceneError(str(e)) from e
    gt_paths = _load_gt(folder)
    numbers = [int(_GT_NAME.match(p.stem).group(1)) for p in gt_paths]
    if numbers != list(range(1, masks.shape[0] + 1)):
        raise SceneError(
            f"{folder}: the masks hold {masks.shape[0]} instances (1..{masks.shape[0]}) but gt/ holds instances "
            f"{numbers}; instance k of the masks must have gt/instance_{{k:02d}}.*."
        )
    gt = [load_mesh(p) for p in gt_paths]
    return SceneData(folder.name, folder, image, masks, gt, gt_paths)

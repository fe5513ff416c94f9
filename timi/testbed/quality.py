"""Quality checks of a testbed model: the VAE's reconstruction ceiling, and the side-by-side figure.

``vae_ceiling`` encodes the ground-truth surfaces of a folder of scenes (what ``timi testbed
scenes`` writes) with the model's point encoder (shipped beside the hy3dgen weights) and decodes
them with hy3dgen's own ``ShapeVAE.latents2mesh`` (what the pipeline does after sampling), then
scores the meshes with :func:`timi.metrics.score_scene` as ``timi eval`` does: the best a perfect
DiT could reach with this VAE. ``exact_part_count`` meshes the exact SDF on the same grid: the part
count no VAE meshed at that resolution can beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh


#: half-size of the box hy3dgen's ``latents2mesh`` decodes and meshes (the pipeline's ``box_v``)
MESH_BOUNDS = 1.01


def load_encoder(model_dir: str | Path):
    """(hy3dgen ``ShapeVAE``, our ``PointEncoder``, sizes) of an exported testbed model directory."""
    from .export import ENCODER_FILE, load_groups, load_pipeline, testbed_extra
    from .model import PointEncoder, TestbedSizes

    d = Path(model_dir)
    extra = testbed_extra(d)
    if "sizes" not in extra or not (d / ENCODER_FILE).exists():
        raise FileNotFoundError(f"{d} holds no testbed encoder ({ENCODER_FILE} and the sizes in config.yaml); "
                                "export it with `timi testbed train` / `timi testbed export`")
    sizes = TestbedSizes(**extra["sizes"])
    vae = load_pipeline(d).vae.float().eval()
    encoder = PointEncoder(vae, sizes)
    encoder.load_state_dict(load_groups(d)["encoder"])
    return vae, encoder.eval(), sizes


def exact_part_count(folder: str | Path, octree_resolution: int = 96, bounds: float = MESH_BOUNDS) -> int:
    """Separate parts of a scene's exact ground truth on the grid the VAE is meshed on.

    The union SDF of the scene's primitives (``layout.json``) at the points of hy3dgen's own
    ``generate_dense_grid_points`` over ``[-bounds, bounds]^3`` (what ``latents2mesh`` decodes),
    marched at 0 and counted as ``timi eval`` counts N_pred (:func:`timi.metrics.count_instances`).
    A VAE meshed at this resolution cannot do better; for the testbed's scenes (gaps of at least two
    cells at 96) this is the number of instances.
    """
    from hy3dgen.shapegen.models.autoencoders.volume_decoders import generate_dense_grid_points
    from skimage.measure import marching_cubes

    from timi.metrics import count_instances

    from .primitives import scene_sdf
    from .scenes import load_layout

    primitives, _ = load_layout(folder)
    box = np.full(3, float(bounds))
    xyz, shape, _ = generate_dense_grid_points(-box, box, octree_resolution)
    sdf = scene_sdf(primitives, xyz.reshape(-1, 3).astype(np.float64))[0].reshape(shape)
    verts, faces, *_ = marching_cubes(-sdf, 0.0)
    return count_instances(trimesh.Trimesh(verts, faces, process=False))


@torch.no_grad()
def vae_ceiling(model_dir: str | Path, dataset_dir: str | Path, octree_resolution: int = 96,
                n_surface: int = 2048, points_per_object: int = 20480, limit: int | None = None,
                progress: bool = True) -> dict:
    """Ground-truth surface -> encoder -> hy3dgen decoder + marching cubes -> Table-1 metrics, per scene."""
    from hy3dgen.shapegen.pipelines import export_to_trimesh
    from tqdm import tqdm

    from timi.evaluation.dataset import discover_scenes
    from timi.metrics import PART_COUNT_CLASSES, part_count_class, score_scene

    from .data import farthest_point_indices

    vae, encoder, sizes = load_encoder(model_dir)
    folders = discover_scenes(dataset_dir)[:limit]
    rows = []
    for folder in tqdm(folders, desc="VAE ceiling", disable=not progress):
        gt = [trimesh.load(f, force="mesh") for f in sorted((folder / "gt").glob("instance_*.ply"))]
        surface = trimesh.sample.sample_surface(trimesh.util.concatenate(gt), n_surface, seed=0)[0]
        surface = surface.astype(np.float32)
        fps = torch.from_numpy(farthest_point_indices(surface, sizes.num_latents))[None]
        mean, _ = encoder(torch.from_numpy(surface)[None], fps)
        out = vae.latents2mesh(vae(mean), bounds=MESH_BOUNDS, mc_level=0.0, num_chunks=20000,
                               octree_resolution=octree_resolution, enable_pbar=False)
        mesh = export_to_trimesh(out)[0]
        if mesh is None:
            rows.append({"scene": folder.name, "k": len(gt), "error": "no surface"})
            continue
        sc = score_scene(mesh, gt, points_per_object=points_per_object)
        rows.append({"scene": folder.name, "k": len(gt), "lcd": sc.lcd, "cd_s": sc.cd_s, "fs_s": sc.fs_s,
                     "ssr": sc.ssr, "cd_o": sc.cd_o, "fs_o": sc.fs_o, "n_pred": sc.n_pred,
                     "n_exact": exact_part_count(folder, octree_resolution, MESH_BOUNDS)})
    ok = [r for r in rows if "error" not in r]
    #: scenes with fewer parts than instances (bridged), the right number, more (fragmented)
    counts = {c: sum(part_count_class(r["n_pred"], r["k"]) == c for r in ok) for c in PART_COUNT_CLASSES}
    keys = ("lcd", "cd_s", "fs_s", "ssr", "cd_o", "fs_o")
    return {"model": str(model_dir), "dataset": str(dataset_dir), "octree_resolution": octree_resolution,
            "n": len(rows), "failed": len(rows) - len(ok),
            "mean": {k: float(np.mean([r[k] for r in ok])) for k in keys} if ok else {},
            "right_part_count": counts["right"] / len(ok) if ok else float("nan"),
            #: the same count for the exact ground truth on the same grid: what no VAE can beat
            "exact_right_part_count": float(np.mean([r["n_exact"] == r["k"] for r in ok])) if ok else float("nan"),
            "part_counts": counts,
            "rows": rows}


def side_by_side(scene_dirs: list[Path], columns: dict[str, list[trimesh.Trimesh | None]], out: str | Path,
                 view: str = "three-quarter") -> Path:
    """Figure: input image | one column per method (generated mesh split by instance) | ground truth.

    ``columns`` maps a title to one scene mesh per scene (or None). Generated meshes are split into
    instances with :func:`timi.instances.split_instances` (projection into the input masks) and
    coloured per instance; unclaimed parts are grey.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from timi.instances import instance_colors, split_instances
    from timi.report import render_views

    titles = ["input"] + list(columns) + ["ground truth"]
    fig, axes = plt.subplots(len(scene_dirs), len(titles), figsize=(2.6 * len(titles), 2.6 * len(scene_dirs)),
                             squeeze=False)
    for r, folder in enumerate(scene_dirs):
        image = np.asarray(Image.open(folder / "image.png").convert("RGBA"))
        labels = np.asarray(Image.open(folder / "masks.png"))
        k = int(labels.max())
        masks = np.stack([labels == i for i in range(1, k + 1)])
        colors = instance_colors(k).astype(np.float64) / 255.0
        gt = [trimesh.load(folder / "gt" / f"instance_{i:02d}.ply", force="mesh") for i in range(1, k + 1)]
        panels = [image[..., :3] * (image[..., 3:] / 255.0) / 255.0 + (1 - image[..., 3:] / 255.0)]
        for title, meshes in columns.items():
            mesh = meshes[r]
            if mesh is None or len(mesh.faces) == 0:
                panels.append(np.ones((256, 256, 3)))
                continue
            split = split_instances(mesh, masks)
            parts = list(split.meshes) + [split.parts[i] for i in split.unclaimed]
            cols = np.concatenate([colors[:, :3], np.full((len(split.unclaimed), 3), 0.6)])
            panels.append(render_views(parts, cols, samples=60_000)[view])
        panels.append(render_views(gt, colors[:, :3], samples=60_000)[view])
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c])
        axes[r, 0].set_ylabel(folder.name)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def figure_from_eval(dataset_dir: str | Path, eval_out: str | Path, scene_ids: list[str], out: str | Path,
                     labels: tuple[str, ...] = ("base model (no TIMI)", "TIMI"), seed: int = 0,
                     size: str = "own") -> Path:
    """Side-by-side figure from a ``timi eval`` output folder (its cache of generated meshes, ``seed``).
    ``size="matched"``: each guided run's mesh at the base model's surface area (``matched.ply``,
    :mod:`timi.evaluation.sizes`); unguided runs are at that size already."""
    import json

    from timi.evaluation.runner import MATCHED_MESH, cached_runs

    if size not in ("own", "matched"):
        raise ValueError(f"size={size!r}: use 'own' or 'matched'.")

    runs = cached_runs(eval_out, seed)
    missing = [label for label in labels if label not in runs]
    if missing:
        raise FileNotFoundError(f"{eval_out}: no cached run labelled {missing}; found {sorted(runs)}")
    columns = {}
    for label in labels:
        guided = json.loads((runs[label] / "config.json").read_text()).get("config", {}).get("isg", True)
        name = MATCHED_MESH if size == "matched" and guided else "scene.ply"
        meshes = []
        for sid in scene_ids:
            path = runs[label] / sid / name
            meshes.append(trimesh.load(path, force="mesh") if path.exists() else None)
        columns[label] = meshes
    return side_by_side([Path(dataset_dir) / sid for sid in scene_ids], columns, out)

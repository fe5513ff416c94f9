"""Quality checks of a training run: the VAE's reconstruction ceiling, and the side-by-side figure.

``vae_ceiling`` encodes validation scenes' ground-truth surfaces with the run's encoder and decodes
them with hy3dgen's own ``ShapeVAE.latents2mesh`` (what the pipeline does after sampling), then
scores the meshes with :func:`timi.metrics.score_scene` like ``timi eval``: the best a perfect DiT
could reach with this VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh


@torch.no_grad()
def vae_ceiling(run: str | Path, n: int = 12, split: str = "val", seed: int = 0, octree_resolution: int = 96,
                num_instances: int | None = None) -> dict:
    from hy3dgen.shapegen.pipelines import export_to_trimesh

    from timi.metrics import score_scene

    from .data import scene_samples
    from .model import TestbedSizes
    from .scenes import generate_scene
    from .train import TrainConfig, Trainer

    blob = torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=False)
    trainer = Trainer(run, None, TrainConfig(**blob["cfg"]), TestbedSizes(**blob["sizes"]), progress=False)
    trainer.encoder.eval()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = generate_scene(seed, split, 500 + i, num_instances=num_instances)
        surface = torch.from_numpy(scene_samples(scene, rng)["surface"][: trainer.cfg.n_surface])[None]
        mean, _ = trainer.encoder(surface)
        out = trainer.vae.latents2mesh(trainer.vae(mean), bounds=1.01, mc_level=0.0, num_chunks=20000,
                                       octree_resolution=octree_resolution, enable_pbar=False)
        mesh = export_to_trimesh(out)[0]
        if mesh is None:
            rows.append({"scene": scene.scene_id, "error": "no surface"})
            continue
        s = score_scene(mesh, scene.instance_meshes(), points_per_object=4096)
        rows.append({"scene": scene.scene_id, "k": len(scene.primitives), "lcd": s.lcd, "cd_s": s.cd_s,
                     "fs_s": s.fs_s, "ssr": s.ssr, "cd_o": s.cd_o, "fs_o": s.fs_o, "n_pred": s.n_pred})
    ok = [r for r in rows if "error" not in r]
    keys = [k for k in ok[0] if k not in ("scene", "k")] if ok else []
    return {"n": n, "failed": len(rows) - len(ok),
            "mean": {k: float(np.mean([r[k] for r in ok])) for k in keys}, "rows": rows}


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
                     labels: tuple[str, ...] = ("base model (no TIMI)", "TIMI")) -> Path:
    """Side-by-side figure from a ``timi eval`` output folder (its cache of generated meshes)."""
    import json

    runs = {}
    for cfg in Path(eval_out).glob("cache/*/config.json"):
        runs[json.loads(cfg.read_text()).get("first_label")] = cfg.parent
    missing = [label for label in labels if label not in runs]
    if missing:
        raise FileNotFoundError(f"{eval_out}: no cached run labelled {missing}; found {sorted(runs)}")
    columns = {}
    for label in labels:
        meshes = []
        for sid in scene_ids:
            path = runs[label] / sid / "scene.ply"
            meshes.append(trimesh.load(path, force="mesh") if path.exists() else None)
        columns[label] = meshes
    return side_by_side([Path(dataset_dir) / sid for sid in scene_ids], columns, out)

"""How much a testbed model's DiT uses its image condition (``timi testbed condition-use``).

A conditional flow-matching model whose velocity loss is the same with the image condition as with
hy3dgen's unconditional embedding (zeros) has learnt the unconditional latent distribution only: it
makes plausible shapes that ignore the image, and the attention of its latent tokens to the image
tokens (``A_zc`` of Eq.2, which TIMI steers) carries no instance information to steer.

For each scene of a folder (what ``timi testbed scenes`` writes) the ground-truth surface is encoded
with the model's point encoder (``x_1 = mean * scale_factor``, the latents the DiT was trained on),
noised as in training (``x_t = t x_1 + (1 - t) x_0``, fixed noise per scene, tokens paired as the
model's training paired them: ``train_config.coupling`` in its config), and the velocity loss
``|v(x_t, t, c) - (x_1 - x_0)|^2`` is measured with the scene's image condition ``c`` and with zeros.
The paired difference (unconditional - conditional, per scene) gets a bootstrap 90 % interval
(:func:`timi.evaluation.paired.bootstrap_mean_interval`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .train import losses_with_and_without_image

#: noise levels (hy3dgen's t: 0 = noise, 1 = data) at which the loss is compared; 0.05 is inside
#: TIMI's guided window (the first 30 % of the steps), where the image has most to tell
DEFAULT_TS = (0.05, 0.2, 0.5, 0.8)


@torch.no_grad()
def condition_use(model_dir: str | Path, dataset_dir: str | Path, ts: tuple[float, ...] = DEFAULT_TS,
                  limit: int | None = None, n_surface: int = 2048, seed: int = 0, progress: bool = True) -> dict:
    """Per-``t`` mean loss with / without the condition, their paired difference and its interval."""
    import trimesh
    from PIL import Image
    from tqdm import tqdm

    from timi.evaluation.dataset import discover_scenes
    from timi.evaluation.paired import bootstrap_mean_interval

    from .data import conditioner_image, farthest_point_indices
    from .export import load_pipeline, testbed_extra
    from .quality import load_encoder

    vae, encoder, sizes = load_encoder(model_dir)
    coupling = testbed_extra(model_dir).get("train_config", {}).get("coupling", "independent")  # the loss it was trained on
    pipe = load_pipeline(model_dir)
    dit, cond = pipe.model.float().eval(), pipe.conditioner.float().eval()
    folders = discover_scenes(dataset_dir)[:limit]
    losses = np.zeros((len(folders), len(ts), 2))
    for i, folder in enumerate(tqdm(folders, desc="condition use", disable=not progress)):
        gt = [trimesh.load(f, force="mesh") for f in sorted((folder / "gt").glob("instance_*.ply"))]
        surface = trimesh.sample.sample_surface(trimesh.util.concatenate(gt), n_surface, seed=seed)[0]
        surface = torch.from_numpy(surface.astype(np.float32))[None]
        fps = torch.from_numpy(farthest_point_indices(surface[0].numpy(), sizes.num_latents))[None]
        x1 = encoder(surface, fps)[0] * float(vae.scale_factor)
        rgba = np.asarray(Image.open(folder / "image.png").convert("RGBA"))
        c = cond(image=conditioner_image(rgba, sizes.image_size)[None])["main"]
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        for j, t in enumerate(ts):
            losses[i, j] = losses_with_and_without_image(dit, x1, torch.randn(x1.shape, generator=gen), t, c,
                                                           coupling)
    rows = []
    for j, t in enumerate(ts):
        diff = losses[:, j, 1] - losses[:, j, 0]
        low, high = bootstrap_mean_interval(diff)
        rows.append({"t": float(t), "conditional": float(losses[:, j, 0].mean()),
                     "unconditional": float(losses[:, j, 1].mean()), "difference": float(diff.mean()),
                     "low": low, "high": high,
                     "relative": float(diff.mean() / max(losses[:, j, 1].mean(), 1e-12))})
    return {"model": str(model_dir), "dataset": str(dataset_dir), "n": len(folders), "coupling": coupling, "by_t": rows,
            "per_scene": [{"scene": f.name, "losses": losses[i].tolist()} for i, f in enumerate(folders)]}


def condition_use_markdown(res: dict) -> str:
    """The table docs/results.md shows (one row per t)."""
    lines = ["| t | loss with image | loss with zeros | zeros - image [90 % interval] | relative |",
             "|---|---|---|---|---|"]
    for r in res["by_t"]:
        lines.append(f"| {r['t']:g} | {r['conditional']:.3f} | {r['unconditional']:.3f} | "
                     f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | {r['relative']:.1%} |")
    return "\n".join(lines)

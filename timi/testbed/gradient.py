"""Where TIMI's update points (issue 12): how much of ``dL_sep/dz`` separates the instances.

At the first guided step (the seeded noise latent, ``t = 0``), for a configuration of Eqs.2-4:

* *common share* ``|mean_v g_v|^2 / mean_v |g_v|^2``: the part of the gradient's energy that moves
  every latent token the same way (1/L for independent zero-mean token gradients; 1 for a pure
  common shift, which changes no token relative to another);
* *between-instance share* ``sum_k n_k |mean_{v in k} g_v - mean_v g_v|^2 / sum_v |g_v|^2``, the
  tokens grouped by the instance they attend to most in the first block (argmax over k of Eq.2's
  ``P``): the part that moves one instance's tokens differently from another's, which is what a
  separation needs (a one-way ANOVA decomposition of the gradient);
* the same two of the step's direction (the configuration's Eq.5, then its ``common`` choice,
  :func:`timi_core.select_common`; Eq.6 only scales it);
* the same two after Eq.5 as the configuration applies it (``timi_core.smooth_gradient``): along the
  token axis (``smoothing="tokens"``, as the adapters apply it to hy3dgen's token latents), or over
  the tokens' positions read from the sampler's clean-latent prediction at that step
  (``smoothing="positions"`` or ``"decoder"``, ``TIMIPipeline.clean_prediction``).

``timi testbed gradient DATA --variant NAME=FIELD=VALUE ...`` prints the means over scenes with
paired bootstrap intervals against the paper's configuration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import timi_core
from timi_core import TIMIConfig


def shares(g: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(common share, between-instance share) of a token gradient ``g`` (L, C) grouped by ``labels`` (L,)."""
    g = g.double()
    total = (g ** 2).sum()
    mean = g.mean(0)
    common = float(len(g) * (mean ** 2).sum() / total)
    between = sum(int((labels == k).sum()) * ((g[labels == k].mean(0) - mean) ** 2).sum()
                  for k in labels.unique())
    return common, float(between / total)


def gradient_structure(pipe, image, masks, config: TIMIConfig, seed: int = 0) -> dict:
    """Shares of ``dL_sep/dz`` at the first guided step, raw and after Eq.5 (see the module doc)."""
    from timi_torch.guidance import guided_probabilities, separation_loss_and_grad

    from .mechanism import _encode

    model = pipe.base.model
    _, cond_main, tokens = _encode(pipe, image, masks)
    z = pipe.base.prepare_latents(1, torch.float32, pipe.device, torch.Generator(device=pipe.device).manual_seed(seed))
    t = torch.zeros(1, device=pipe.device)
    layers = min(config.guided_layers, len(model.double_blocks))
    with torch.no_grad():
        labels = guided_probabilities(model, z.float(), t, cond_main, tokens, 1)[0][0].argmax(-1)
    _, g = separation_loss_and_grad(model, z, t, cond_main, tokens, config, layers)
    positions = None
    if config.smoothing != "tokens":
        from timi_torch.frontend import prepare_inputs

        full = prepare_inputs(pipe.base, image, masks, do_classifier_free_guidance=True,
                              condition_masks=pipe.condition_masks)
        positions = pipe.position_reader(config)(pipe.clean_prediction(z, t, full.cond))
    smooth = timi_core.smooth_gradient(g, config.replace(sr=True), (1,), positions)
    applied = smooth if config.sgu and config.sr else g
    direction = timi_core.select_common(applied, config.common, (1,)) if config.sgu else g
    (c, b), (cs, bs), (cd, bd) = shares(g[0], labels), shares(smooth[0], labels), shares(direction[0], labels)
    return {"common": c, "between": b, "common_smoothed": cs, "between_smoothed": bs,
            "common_step": cd, "between_step": bd}


def run_gradient(model_dir: str | Path, dataset_dir: str | Path, variants: dict[str, TIMIConfig], *, seed: int = 0,
                 limit: int | None = None, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from timi.evaluation.dataset import discover_scenes, load_scene
    from timi.pipelines import load_pipeline

    pipe = load_pipeline(str(model_dir), device="cpu", dtype="float32")
    rows = []
    for folder in tqdm(discover_scenes(dataset_dir)[:limit], desc="gradient", disable=not progress):
        scene = load_scene(folder)
        rows.append({"scene": scene.scene_id, **{name: gradient_structure(pipe, scene.image, scene.masks, cfg, seed)
                                                 for name, cfg in variants.items()}})
    return rows


def gradient_markdown(rows: list[dict], reference: str) -> str:
    """Means over scenes; each variant's paired difference from ``reference`` with its 90 % interval."""
    from timi.evaluation.paired import bootstrap_mean_interval

    names = [k for k in rows[0] if k != "scene"]
    fields = ("common", "between", "common_smoothed", "between_smoothed", "common_step", "between_step")
    heads = ("common share", "between-instance share", "common share after Eq.5", "between-instance share after Eq.5",
             "common share of the step", "between-instance share of the step")
    lines = ["| variant | " + " | ".join(heads) + " |", "|---|" + "---|" * len(fields)]
    for name in names:
        cells = []
        for f in fields:
            v = np.array([r[name][f] for r in rows])
            cell = f"{v.mean():.3f}"
            if name != reference:
                d = v - np.array([r[reference][f] for r in rows])
                lo, hi = bootstrap_mean_interval(d)
                cell += f" ({d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}])"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\n{len(rows)} scenes; in brackets: the paired difference from `{reference}` and its 90 % "
                 "bootstrap interval.")
    return "\n".join(lines) + "\n"

"""How TIMI acts on the attention (issue 12): purity, selectivity and instance mass of P, key similarity.

For scenes of a folder (``timi testbed scenes``) and a model, per guided layer ``l``:

* **Guided runs** (``TIMIPipeline``, base vs TIMI, same seed): at the last guided step, from the
  denoiser's conditional forward (recorded by :class:`timi.report.AttentionRecorder`, the hook
  passed to the pipeline's call, with the config passed to the call too):
  *purity* of each instance's image map (share of its masked mass on its own mask), *selectivity*
  ``mean_v max_k P[v,k] / sum_k P[v,k]`` (chance 1/K), *instance mass* ``mean_v sum_k P[v,k]``
  (how much attention the latent tokens pay to any instance; Eq.2's ``P``), and the cosine
  between the instances' mean key vectors (head-averaged).
* **Direct optimisation** of the first latent (t = 0): ``steps`` plain gradient steps
  ``z <- z - 0.1 std(z) g / max|g|`` on Eq.4 as written and on Eq.4 with ``P`` normalised over
  the instances (``P / sum_k P``: a probability over instances); selectivity and mass before and
  after. It tells what the loss *can* change by moving z: cause (a) of issue 12 (Eq.4 lowered by
  raising mass, with no competition between instances) vs cause (b) (instances indistinguishable).

``timi testbed mechanism DATA --model DIR --out FILE.json`` writes one row per (scene, seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import timi_core
from timi_core import TIMIConfig


def selectivity_and_mass(P: torch.Tensor) -> tuple[float, float]:
    """(selectivity, instance mass) of ``P`` (L, K): means over the latent tokens."""
    P = P.detach().float()
    mass = P.sum(-1)
    return float((P.max(-1).values / mass.clamp_min(1e-12)).mean()), float(mass.mean())


def _encode(pipe, image, masks):
    from timi_torch.frontend import prepare_inputs

    inputs = prepare_inputs(pipe.base, image, masks, do_classifier_free_guidance=False,
                            condition_masks=pipe.condition_masks)
    return inputs.condition_masks[0], inputs.cond_main, inputs.tokens


def optimise_latent(pipe, image, masks, *, steps: int = 30, normalise: bool = False, seed: int = 0,
                    layers: int = 4) -> dict:
    """Plain gradient steps on the first latent (t = 0); selectivity/mass per layer before and after."""
    from timi_torch.guidance import frozen_parameters, guidable_layers, guided_probabilities

    model = pipe.base.model
    layers = min(layers, guidable_layers(model))
    _, cond_main, tokens = _encode(pipe, image, masks)
    gen = torch.Generator(device=pipe.device).manual_seed(int(seed))
    z = pipe.base.prepare_latents(1, torch.float32, pipe.device, gen).float()
    t = torch.full((1,), float(getattr(pipe.base, "noise_timestep", 0.0)), device=pipe.device)  # pure noise
    out = {"loss": []}
    with frozen_parameters(model):
        for i in range(steps + 1):
            with torch.enable_grad():
                zz = z.clone().requires_grad_(True)
                Ps = guided_probabilities(model, zz, t, cond_main, tokens, layers)
                if i in (0, steps):
                    key = "before" if i == 0 else "after"
                    out[key] = [selectivity_and_mass(P[0]) for P in Ps]
                loss = torch.stack([timi_core.instance_separation_loss(P, 1e-6, normalize_instances=normalise)
                                    for P in Ps]).mean(0).sum()
                out["loss"].append(float(loss.detach()))
                if i == steps:
                    break
                (g,) = torch.autograd.grad(loss, zz)
            z = z - 0.1 * z.std() * g / g.abs().max().clamp_min(1e-12)
    return out


def guided_run(pipe, image, masks, config: TIMIConfig, *, seed: int = 0, steps: int = 50) -> dict:
    """Per guided layer at the last guided step: purity, selectivity, mass, key cosine (conditional forward)."""
    from timi.report import AttentionRecorder

    from timi.pipelines import pipeline_depth

    cm = pipe.condition_masks(image, masks)
    layers = min(config.guided_layers, pipeline_depth(pipe))
    last = pipe.num_guided_steps(steps, config.replace(isg=True)) - 1  # the guided window, also for the base run
    recorder = AttentionRecorder(cm.tokens, layers=layers, steps=last + 1)
    gen = torch.Generator(device=pipe.device).manual_seed(int(seed))
    out = pipe(image, cm, num_inference_steps=steps, generator=gen, output_type="latent", enable_pbar=False,
               config=config, recorder=recorder)
    k = cm.num_instances
    off = ~np.eye(k, dtype=bool)
    rows = []
    for r in sorted((r for r in out.recordings if r.step == last), key=lambda r: r.layer):
        sel, mass = selectivity_and_mass(torch.from_numpy(r.probability))
        rows.append({"layer": r.layer, "purity": float(np.mean(r.purity)), "selectivity": sel, "mass": mass,
                     "key_cosine": float(r.key_cosine[off].mean()) if k > 1 else float("nan")})
    return {"layers": rows, "loss": [d.loss[0] for d in out.diagnostics]}


def run_mechanism(model_dir: str | Path, dataset_dir: str | Path, *, seeds=(0,), limit: int | None = None,
                  opt_steps: int = 30, config: TIMIConfig = TIMIConfig(), progress: bool = True,
                  steps: int = 50) -> list[dict]:
    from tqdm import tqdm

    from timi.evaluation.dataset import discover_scenes, load_scene
    from timi.pipelines import load_pipeline

    pipe = load_pipeline(str(model_dir), device="cpu", dtype="float32")
    rows = []
    folders = discover_scenes(dataset_dir)[:limit]
    for folder in tqdm(folders, desc="mechanism", disable=not progress):
        scene = load_scene(folder)
        for seed in seeds:
            row = {"scene": f"{scene.scene_id}@seed{seed}", "k": int(scene.masks.shape[0])}
            row["base"] = guided_run(pipe, scene.image, scene.masks, config.replace(isg=False), seed=seed, steps=steps)
            row["timi"] = guided_run(pipe, scene.image, scene.masks, config, seed=seed, steps=steps)
            if seed == seeds[0]:
                row["opt_eq4"] = optimise_latent(pipe, scene.image, scene.masks, steps=opt_steps, seed=seed,
                                                 layers=config.guided_layers)
                row["opt_normalised"] = optimise_latent(pipe, scene.image, scene.masks, steps=opt_steps,
                                                        normalise=True, seed=seed, layers=config.guided_layers)
            rows.append(row)
    return rows


def summarise(rows: list[dict], per_scene_csv: str | Path | None = None) -> str:
    """Markdown: per layer, mean purity / selectivity / mass / key cosine, base vs TIMI; the direct
    optimisation; with ``per_scene_csv`` (from ``timi eval``, same seeds) the Spearman correlation
    between the change of purity and the change of SSR."""
    n_layers = len(rows[0]["base"]["layers"])
    lines = ["| layer | purity base -> TIMI | selectivity base -> TIMI | mass base -> TIMI | key cosine |",
             "|---|---|---|---|---|"]
    for l in range(n_layers):
        get = lambda run, f: float(np.nanmean([r[run]["layers"][l][f] for r in rows]))  # noqa: E731
        lines.append(f"| {l} | {get('base', 'purity'):.3f} -> {get('timi', 'purity'):.3f} | "
                     f"{get('base', 'selectivity'):.3f} -> {get('timi', 'selectivity'):.3f} | "
                     f"{get('base', 'mass'):.3f} -> {get('timi', 'mass'):.3f} | {get('base', 'key_cosine'):.3f} |")
    opt = [r for r in rows if "opt_eq4" in r]
    if opt:
        lines += ["", "| direct optimisation of z | layer | selectivity before -> after | mass before -> after |",
                  "|---|---|---|---|"]
        for name in ("opt_eq4", "opt_normalised"):
            for l in range(n_layers):
                sb = np.mean([r[name]["before"][l][0] for r in opt])
                sa = np.mean([r[name]["after"][l][0] for r in opt])
                mb = np.mean([r[name]["before"][l][1] for r in opt])
                ma = np.mean([r[name]["after"][l][1] for r in opt])
                label = "Eq.4 as written" if name == "opt_eq4" else "P normalised over instances"
                lines.append(f"| {label} | {l} | {sb:.3f} -> {sa:.3f} | {mb:.3f} -> {ma:.3f} |")
        chance = np.mean([1.0 / r["k"] for r in opt])
        lines.append(f"\nChance selectivity (mean 1/K): {chance:.3f}. Scenes: {len(opt)}.")
    if per_scene_csv is not None:
        import csv

        from scipy.stats import spearmanr

        ssr: dict[tuple[str, str], float] = {}
        with open(per_scene_csv) as f:
            for r in csv.DictReader(f):
                if r["status"] == "ok":
                    ssr[(r["run"], r["scene"])] = float(r["ssr"])
        dp, ds = [], []
        for r in rows:
            # an eval with one seed names scenes without the "@seed<s>" suffix
            sid = r["scene"] if ("TIMI", r["scene"]) in ssr else r["scene"].split("@")[0]
            a, b = ("base model (no TIMI)", sid), ("TIMI", sid)
            if a in ssr and b in ssr:
                dp.append(np.mean([x["purity"] for x in r["timi"]["layers"]]) -
                          np.mean([x["purity"] for x in r["base"]["layers"]]))
                ds.append(ssr[b] - ssr[a])
        if len(dp) >= 3:
            rho, pval = spearmanr(dp, ds)
            lines.append(f"\nChange of mean purity vs change of SSR (TIMI - base), {len(dp)} (scene, seed) pairs: "
                         f"Spearman rho = {rho:.3f} (p = {pval:.3g}).")
    return "\n".join(lines)

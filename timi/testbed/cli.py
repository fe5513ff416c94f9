"""``timi testbed ...``: write procedural scenes, train the testbed model, export it for hy3dgen."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from timi.cli_common import ADDRESS_OPTION, ENGINE_OPTION, GPUS_PER_WORKER_OPTION, WORKERS_OPTION

app = typer.Typer(help="Procedural assets and scenes with exact ground truth, and the small shipped "
                       "Hunyuan3D-architecture model.",
                  no_args_is_help=True)


@app.command()
def scenes(
    out: Path = typer.Option(..., "--out", help="Folder that receives one sub-folder per scene."),
    n: int = typer.Option(16, "--n", min=1, help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", help="Base seed (scene i of a split is reproducible on its own)."),
    split: str = typer.Option("test", "--split", help="train | val | test (disjoint seed streams)."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first scene."),
    num_instances: int = typer.Option(0, "--num-instances", min=0, max=4,
                                      help="1 = single assets (1-4 overlapping parts, one instance); 2-4 = "
                                           "scenes of K separate instances with gaps of 0.05-0.15; 0 = K random."),
) -> None:
    """Write N samples: image.png, masks.png, gt/instance_XX.ply, scene.glb, layout.json."""
    from .scenes import SPLITS, make_dataset

    if split not in SPLITS:
        raise typer.BadParameter(f"unknown split {split!r}; use one of {list(SPLITS)}", param_hint="--split")
    folders = make_dataset(out, n, seed=seed, split=split, start=start, num_instances=num_instances or None)
    typer.echo(f"wrote {len(folders)} scenes to {out}")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run folder: cache, checkpoint.pt (resumed if present), loss curve."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training samples, weights, batches and noise."),
    n_train: int = typer.Option(2000, "--n-train", min=1, help="Single assets (split 'train'): VAE and DiT."),
    n_multi: int = typer.Option(400, "--n-multi", min=0,
                                help="Multi-instance scenes (split 'train') that only the VAE sees."),
    vae_steps: int = typer.Option(3000, "--vae-steps", min=0),
    vae_gap_steps: int = typer.Option(0, "--vae-gap-steps", min=0,
                                      help="Second VAE stage: half multi-instance batches, queries in the gaps."),
    vae_decoder_steps: int = typer.Option(0, "--vae-decoder-steps", min=0,
                                          help="Third VAE stage: the decoder alone (encoder and latents kept), "
                                               "half multi-instance batches, queries in gaps and thin parts."),
    vae_decoder_lr: float = typer.Option(2e-4, "--vae-decoder-lr", min=0.0,
                                         help="Peak learning rate of the decoder stage."),
    decoder_uniform_queries: int = typer.Option(1024, "--decoder-uniform-queries", min=1,
                                                help="Uniform queries per sample in the decoder stage "
                                                     "(up to the cache's 4096)."),
    decoder_latent_noise: float = typer.Option(0.0, "--decoder-latent-noise", min=0.0,
                                               help="Decoder stage: perturb each latent by Gaussian noise of up "
                                                    "to this many latent stds (drawn uniformly), so that latents "
                                                    "near the encoder's decode to whole shapes."),
    dit_steps: int = typer.Option(3000, "--dit-steps", min=0),
    preset: str = typer.Option("v2", "--preset",
                               help="Model sizes: v2 (shipped), v3 (v2 with the fixed conditioner), v3p (v3 + "
                                    "positions in the latents), v1 (first testbed), tiny."),
    dit_lr: float = typer.Option(1e-3, "--dit-lr", min=0.0, help="Peak learning rate of the DiT (cosine decay)."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="torch device for training (cpu, cuda)."),
    dit_batch: int = typer.Option(16, "--dit-batch", min=1, help="DiT batch size."),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes that build the training cache."),
    cache: Path = typer.Option(None, "--cache", help="Training cache .npz (default: OUT/train_cache.npz)."),
    init_from: Path = typer.Option(None, "--init-from",
                                   help="Start from an exported model directory (e.g. the shipped one): its VAE "
                                        "and encoder (fine-tuned if the latent layout differs), and its DiT when "
                                        "the sizes match (fresh optimiser)."),
    init_dit: bool = typer.Option(True, "--init-dit/--no-init-dit",
                                  help="With --init-from: also take its DiT (when the sizes match)."),
    save_every: int = typer.Option(250, "--save-every", min=1,
                                   help="Checkpoint (and, for the DiT, condition-use line) every N steps."),
    condition: str = typer.Option("image", "--condition",
                                  help="image, or oracle: a control whose condition tokens are the clean latents."),
    coupling: str = typer.Option("independent", "--coupling",
                                 help="independent (hy3dgen's training), or ot: each noise token paired with "
                                      "a data token of the same sample by an optimal assignment."),
    export: Path = typer.Option(None, "--export", help="Also write the hy3dgen model directory here."),
) -> None:
    """Train the testbed ShapeVAE and DiT (resumable) and export an hy3dgen model directory."""
    import torch

    from .data import build_cache
    from .export import export_model_dir
    from .model import SIZES
    from .train import COUPLINGS, Trainer, TrainConfig

    if coupling not in COUPLINGS:
        raise typer.BadParameter(f"unknown coupling {coupling!r}; use one of {list(COUPLINGS)}", param_hint="--coupling")
    if preset not in SIZES:
        raise typer.BadParameter(f"unknown preset {preset!r}; use one of {list(SIZES)}", param_hint="--preset")
    torch.set_num_threads(threads)
    cfg = TrainConfig(seed=seed, n_train=n_train, n_multi=n_multi, vae_steps=vae_steps,
                      vae_gap_steps=vae_gap_steps, vae_decoder_steps=vae_decoder_steps,
                      vae_decoder_lr=vae_decoder_lr, decoder_uniform_queries=decoder_uniform_queries,
                      decoder_latent_noise=decoder_latent_noise, dit_steps=dit_steps, dit_lr=dit_lr, threads=threads,
                      save_every=save_every, condition=condition, device=device, dit_batch=dit_batch,
                      coupling=coupling)
    sizes = SIZES[preset]
    cache = build_cache(cache or out / "train_cache.npz", n_train, seed=seed, image_size=sizes.image_size,
                        num_latents=sizes.num_latents, n_encoder=cfg.n_surface, n_multi=n_multi, workers=workers)
    trainer = Trainer(out, cache, cfg, sizes)
    if init_from is not None and not trainer.ckpt.exists():
        typer.echo(f"starting from {init_from}: its {trainer.init_from(init_from, dit=init_dit)}")
    summary = trainer.run()
    groups = trainer.export_state()
    final = sizes.replace(scale_factor=trainer.state["scale_factor"])
    for target in [out / "model"] + ([export] if export else []):
        export_model_dir(groups, final, target, extra={"train_config": cfg.__dict__, "preset": preset,
                                                       "summary": summary, "parent": trainer.state.get("parent")})
        typer.echo(f"exported hy3dgen model directory: {target}")
    typer.echo(f"summary: {summary}")


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Run folder holding checkpoint.pt (from `timi testbed train`)."),
    out: Path = typer.Option(..., "--out", help="hy3dgen model directory to write."),
    ema: bool = typer.Option(True, "--ema/--live",
                             help="The DiT's EMA weights (what training exports), or its live weights: for a "
                                  "short probe, whose EMA (0.999) still mostly holds the initial weights."),
) -> None:
    """Export a (possibly unfinished) training checkpoint as an hy3dgen model directory."""
    import json

    import torch

    from .export import export_model_dir
    from .model import TestbedSizes
    from .train import Trainer, TrainConfig

    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        raise typer.BadParameter(f"{ckpt} not found; run `timi testbed train --out {run}` first", param_hint="RUN")
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    sizes, cfg = TestbedSizes(**blob["sizes"]), TrainConfig(**{**blob["cfg"], "device": "cpu"})
    trainer = Trainer(run, None, cfg, sizes, progress=False)
    st = trainer.state
    extra = {"train_config": blob["cfg"], "vae_step": st["vae_step"], "dit_step": st["dit_step"],
             "vae_decoder_step": st.get("vae_decoder_step", 0),
             "weights": "ema" if ema else "live", "parent": st.get("parent")}
    export_model_dir(trainer.export_state(ema=ema), sizes.replace(scale_factor=st["scale_factor"]), out, extra=extra)
    typer.echo(json.dumps({"exported": str(out), **extra["train_config"], "dit_step": st["dit_step"]}))


@app.command()
def ceiling(
    dataset: Path = typer.Argument(..., help="Folder of scenes (from `timi testbed scenes`)."),
    model: Path = typer.Option(None, "--model", help="Exported testbed model directory (default: the shipped one)."),
    octree_resolution: int = typer.Option(96, "--octree-resolution", min=16),
    limit: int = typer.Option(None, "--limit", min=1),
    out: Path = typer.Option(None, "--out", help="Write the per-scene rows as JSON here."),
) -> None:
    """VAE reconstruction ceiling: ground-truth surface -> encoder -> hy3dgen decoder -> metrics."""
    import json

    from timi.io import write_text

    from timi.pipelines import resolve_model

    from .quality import vae_ceiling

    res = vae_ceiling(model or resolve_model(None), dataset, octree_resolution=octree_resolution, limit=limit)
    if out is not None:
        write_text(out, json.dumps(res, indent=1))
    m = res["mean"]
    typer.echo(f"{res['n']} scenes ({res['failed']} without surface), octree {octree_resolution}: "
               + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
               + f"; right number of parts on {res['right_part_count']:.0%}"
               + f" (exact SDF on the same grid: {res['exact_right_part_count']:.0%}); scenes with fewer / the right"
               + " number of / more parts than instances: " + " / ".join(str(v) for v in res["part_counts"].values()))


@app.command("train-grid")
def train_grid(
    out: Path = typer.Argument(..., help="Run folder: checkpoint.pt (resumed if present), train.log, model/."),
    steps: int = typer.Option(3000, "--steps", min=1, help="Training steps (batch --batch)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training assets, weights, batches and noise."),
    n_train: int = typer.Option(1600, "--n-train", min=1, help="Single assets (split 'train', 0..N-1)."),
    batch: int = typer.Option(16, "--batch", min=1),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate (warm-up, cosine decay)."),
    num_blocks: int = typer.Option(4, "--num-blocks", min=1, help="Flow transformer blocks."),
    model_channels: int = typer.Option(128, "--model-channels", min=8),
    save_every: int = typer.Option(200, "--save-every", min=1, help="Checkpoint every N steps."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes that build the cache."),
    cache: Path = typer.Option(None, "--cache", help="Grid cache .npz (default: OUT/grid_cache.npz)."),
    export: Path = typer.Option(None, "--export", help="Also write the model folder here."),
) -> None:
    """Train the grid testbed: TRELLIS's stage-1 flow model on the fixed 8 x 16^3 occupancy encoding
    (docs/testbed.md, "Grid testbed"); writes OUT/model (ss_flow.json + ss_flow.safetensors)."""
    import torch

    from .grid_train import GridConfig, GridTrainer, build_grid_cache, export_grid_model

    torch.set_num_threads(threads)
    cfg = GridConfig(seed=seed, n_train=n_train, steps=steps, batch=batch, lr=lr, num_blocks=num_blocks,
                     model_channels=model_channels, save_every=save_every, threads=threads)
    cache = build_grid_cache(cache or out / "grid_cache.npz", n_train, seed=seed, workers=workers)
    trainer = GridTrainer(out, cache, cfg)
    summary = trainer.run()
    for target in [out / "model"] + ([export] if export else []):
        typer.echo(f"exported grid model: {export_grid_model(trainer, target)}")
    typer.echo(f"summary: {summary}")


@app.command("export-grid")
def export_grid(
    run: Path = typer.Argument(..., help="Run folder holding checkpoint.pt (from `timi testbed train-grid`)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write."),
    ema: bool = typer.Option(True, "--ema/--live", help="EMA weights (default) or the live ones."),
) -> None:
    """Export a grid run's checkpoint (any step) in the TRELLIS layout."""
    import torch

    from .grid_train import GridConfig, GridTrainer, export_grid_model

    if not (run / "checkpoint.pt").exists():
        raise typer.BadParameter(f"{run} has no checkpoint.pt", param_hint="RUN")
    saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["cfg"]
    trainer = GridTrainer(run, None, GridConfig(**saved), progress=False)
    typer.echo(f"exported grid model at step {trainer.state['step']}: {export_grid_model(trainer, out, ema=ema)}")


@app.command("grid-ceiling")
def grid_ceiling_cmd(
    dataset: Path = typer.Argument(..., help="Folder of scenes (from `timi testbed scenes`)."),
    limit: int = typer.Option(None, "--limit", min=1),
    upsample: int = typer.Option(1, "--upsample", min=1, help="Resample the 32^3 logits this much finer."),
    sigma: float = typer.Option(0.0, "--sigma", min=0.0, help="Gaussian smoothing of the logits (cells)."),
    out: Path = typer.Option(None, "--out", help="Write the per-scene rows as JSON here."),
) -> None:
    """Ceiling of the grid encoding: exact 32^3 occupancy -> encode -> decode -> mesh -> metrics."""
    import json

    from timi.io import write_text

    from .grid import grid_ceiling

    res = grid_ceiling(dataset, limit=limit, upsample=upsample, sigma=sigma)
    if out is not None:
        write_text(out, json.dumps(res, indent=1))
    typer.echo(f"{res['n']} scenes ({res['failed']} without surface): "
               + ", ".join(f"{k} {v:.4f}" for k, v in res["mean"].items())
               + "; fewer / the right number of / more parts than instances: "
               + " / ".join(str(v) for v in res["part_counts"].values()) + f" (fused share {res['fused_share']:.0%})")


@app.command("condition-use")
def condition_use_cmd(
    dataset: Path = typer.Argument(..., help="Folder of scenes (from `timi testbed scenes`)."),
    model: Path = typer.Option(None, "--model", help="Exported testbed model directory (default: the shipped one)."),
    limit: int = typer.Option(None, "--limit", min=1),
    seed: int = typer.Option(0, "--seed", help="Seed of the surface samples and the noise."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads."),
    out: Path = typer.Option(None, "--out", help="Write the result (per t and per scene) as JSON here."),
) -> None:
    """Does the DiT use its image? Velocity loss with the image condition vs with zeros, per noise level."""
    import json

    import torch

    from timi.io import write_text
    from timi.pipelines import resolve_model

    from .condition_use import condition_use, condition_use_markdown

    torch.set_num_threads(threads)
    res = condition_use(model or resolve_model(None), dataset, limit=limit, seed=seed)
    if out is not None:
        write_text(out, json.dumps(res, indent=1))
    typer.echo(f"{res['n']} scenes\n" + condition_use_markdown(res))


@app.command()
def mechanism(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    model: Path = typer.Option(None, "--model", help="Model directory (default: the shipped one)."),
    seed: list[int] = typer.Option([0], "--seed", help="Sampling seed(s); repeat for several."),
    limit: int = typer.Option(None, "--limit", min=1),
    opt_steps: int = typer.Option(30, "--opt-steps", min=1, help="Steps of the direct optimisation of z."),
    steps: int = typer.Option(50, "--steps", min=1, help="Sampling steps of the guided runs (as timi eval's --steps)."),
    out: Path = typer.Option(..., "--out", help="JSON file for the per-(scene, seed) rows."),
    eval_dir: Path = typer.Option(None, "--eval-dir",
                                  help="A `timi eval --baseline` output on the same scenes and seeds: "
                                       "correlate the change of purity with the change of SSR."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads."),
    alpha: float = typer.Option(0.1, "--alpha", min=0.0, help="TIMI's step size (Eq.6) in the guided run."),
    normalize_instances: bool = typer.Option(False, "--normalize-instances/--as-written",
                                             help="Guided run with P normalised over the instances "
                                                  "(TIMIConfig.normalize_instances) instead of Eq.4 as written."),
    set_: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE",
                                   help="Change the guided run's TIMIConfig further, as in `timi eval` "
                                        "(e.g. smoothing=positions)."),
) -> None:
    """Purity, selectivity, instance mass and key similarity of P (Eq.2), base vs TIMI (docs/results.md)."""
    import json

    import torch

    from timi.io import write_text

    from timi.pipelines import resolve_model


    from .mechanism import run_mechanism, summarise

    # --alpha and --normalize-instances first, so that a --set of the same field wins
    from timi.evaluation.cli import _base_config
    config = _base_config([f"alpha={alpha}", f"normalize-instances={normalize_instances}", *set_])
    torch.set_num_threads(threads)
    rows = run_mechanism(resolve_model(str(model) if model else None), dataset, seeds=tuple(seed), limit=limit,
                         opt_steps=opt_steps, config=config, steps=steps)
    write_text(out, json.dumps(rows, indent=1))
    csv_path = eval_dir / "per_scene.csv" if eval_dir else None
    typer.echo(summarise(rows, csv_path))


@app.command()
def fusion(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    eval_dir: Path = typer.Option(..., "--eval-dir", help="A `timi eval --baseline` output on these scenes."),
    run: list[str] = typer.Option(["TIMI"], "--run", help="Row label(s) of the eval table to compare with the base."),
    base: str = typer.Option("base model (no TIMI)", "--base", help="Row label of the base model."),
) -> None:
    """Which way SSR moves: part-count transitions base -> run (fused / right / fragments), and the
    share of fused pairs by the scene's smallest gap (docs/results.md)."""
    from rich.console import Console

    from timi.cli_common import run_cli

    from .fusion import fusion_markdown, spearman_gap_fusion

    def report() -> str:
        csv_path = eval_dir / "per_scene.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"--eval-dir {eval_dir}: {csv_path} does not exist; run `timi eval ... --baseline "
                                    f"--out {eval_dir}` first.")
        lines = [fusion_markdown(csv_path, dataset, base, list(run))]
        for label in [base, *run]:
            rho, p, n = spearman_gap_fusion(csv_path, dataset, label)
            lines.append(f"{label}: Spearman(smallest gap, missing parts) = {rho:+.2f} (p = {p:.2g}, {n} pairs)")
        return "\n".join(lines)

    typer.echo(run_cli(report, Console(stderr=True, soft_wrap=True)))


@app.command()
def sizes(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    eval_dir: Path = typer.Option(..., "--eval-dir", help="A `timi eval --baseline` output on these scenes."),
    run: list[str] = typer.Option(["TIMI"], "--run", help="Run label(s) as first cached (config.json's first_label)."),
    base: str = typer.Option("base model (no TIMI)", "--base", help="Label of the base model's run."),
    seed: list[int] = typer.Option([0], "--seed", help="Sampling seed(s); repeat for several."),
) -> None:
    """Surface area of the generated meshes, run / base (paired) and / ground truth: does a guidance
    separate instances or shrink them? (docs/results.md)"""
    from rich.console import Console

    from timi.cli_common import run_cli

    from .sizes import area_table

    typer.echo(run_cli(lambda: area_table(dataset, eval_dir, list(run), base, tuple(dict.fromkeys(seed))),
                       Console(stderr=True, soft_wrap=True)))


@app.command()
def gradient(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    model: Path = typer.Option(None, "--model", help="Model directory (default: the shipped one)."),
    variant: list[str] = typer.Option([], "--variant", metavar="NAME=FIELD=VALUE[,FIELD=VALUE]",
                                      help="A TIMIConfig to compare with the paper's (repeatable), e.g. "
                                           "normalised=normalize-instances=true."),
    seed: int = typer.Option(0, "--seed"),
    limit: int = typer.Option(None, "--limit", min=1),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads."),
    out: Path = typer.Option(None, "--out", help="JSON file for the per-scene rows."),
) -> None:
    """How much of TIMI's gradient moves the instances apart, at the first guided step (docs/results.md)."""
    import json

    import torch
    from rich.console import Console

    from timi.cli_common import run_cli
    from timi.io import write_text
    from timi.pipelines import resolve_model

    from .gradient import gradient_markdown, run_gradient

    from .controls import parse_variants

    def parse() -> dict:
        return {"paper": TIMIConfig.paper(), **parse_variants(variant)}

    from timi_core import TIMIConfig

    variants = run_cli(parse, Console(stderr=True, soft_wrap=True))
    torch.set_num_threads(threads)
    rows = run_gradient(model or resolve_model(None), dataset, variants, seed=seed, limit=limit)
    if out is not None:
        write_text(out, json.dumps(rows, indent=1))
    typer.echo(gradient_markdown(rows, "paper"))


@app.command()
def variants(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    variant: list[str] = typer.Option([], "--variant", metavar="NAME=FIELD=VALUE[,FIELD=VALUE]",
                                      help="A TIMIConfig over the paper's form (repeatable), e.g. "
                                           "'common removed=common=remove'; 'paper=' is the paper's form."),
    controls: bool = typer.Option(True, "--controls/--no-controls",
                                  help="Also run each variant with its gradient's token rows shuffled."),
    controls_for: list[str] = typer.Option([], "--controls-for", metavar="NAME",
                                           help="Run the shuffled control only for these variants (repeatable; "
                                                "default: every variant)."),
    model: str = typer.Option(None, "--model", help="Model directory (default: the shipped one)."),
    seed: list[int] = typer.Option([0], "--seed", help="Sampling seed(s); repeat for several."),
    limit: int = typer.Option(None, "--limit", min=1),
    octree_resolution: int = typer.Option(384, "--octree-resolution", min=8),
    steps: int = typer.Option(50, "--steps", min=1),
    points: int = typer.Option(20480, "--points", min=1),
    icp_points: int = typer.Option(None, "--icp-points", min=3),
    device: str = typer.Option(None, "--device"),
    out: Path = typer.Option(Path("outputs/variants"), "--out", help="Output folder (cache shared with `timi eval`)."),
    quiet: bool = typer.Option(False, "--quiet"),
    engine: str = ENGINE_OPTION,
    address: str = ADDRESS_OPTION,
    gpus_per_worker: float = GPUS_PER_WORKER_OPTION,
    workers: int = WORKERS_OPTION,
) -> None:
    """Base model vs TIMI variants, each beside its shuffled-gradient control, with matched-size
    scores, areas and the paired differences variant - control (docs/results.md, issue 27)."""
    from rich.console import Console

    from timi.cli_common import engine_errors, engine_from_options, run_cli
    from timi.evaluation.cli import evaluate_and_report
    from timi.evaluation.generators import TIMITorchGenerator
    from timi.evaluation.runner import MetricSettings
    from timi.evaluation.runs import BASELINE_LABEL, Run
    from timi.pipelines import resolve_model
    from timi_core import TIMIConfig

    from .controls import (ShuffledGradientGenerator, control_label, default_rule_markdown, parse_variants,
                           variant_control_markdown)

    def parse() -> dict:
        configs = parse_variants(variant) or {"paper": TIMIConfig.paper()}
        unknown = sorted(set(controls_for) - set(configs))
        if unknown:
            raise ValueError(f"--controls-for {', '.join(map(repr, unknown))}: no such --variant; use one of "
                             f"{', '.join(map(repr, configs))}.")
        return configs

    configs = run_cli(parse, Console(stderr=True, soft_wrap=True))
    ray_engine = engine_from_options(engine, address, gpus_per_worker, workers)
    model = model or str(resolve_model(None))
    options = dict(device=device, octree_resolution=octree_resolution, steps=steps)
    shuffled = ShuffledGradientGenerator(model, **options)
    runs = [Run(BASELINE_LABEL, TIMIConfig.paper(isg=False))]
    for name, config in configs.items():
        runs.append(Run(name, config, group="variants"))
        if controls and (not controls_for or name in controls_for):
            runs.append(Run(control_label(name), config, group="controls", generator=shuffled))
    with engine_errors():
        summaries, paths = evaluate_and_report(dataset, runs, TIMITorchGenerator(model, **options), out,
                                               seeds=list(dict.fromkeys(seed)), limit=limit, quiet=quiet,
                                               metrics=MetricSettings(points_per_object=points, icp_points=icp_points),
                                               title=f"timi testbed variants {dataset}", engine=ray_engine)
    typer.echo(paths["markdown"].read_text())
    if controls:
        typer.echo(variant_control_markdown(summaries))
        typer.echo(default_rule_markdown(summaries))


@app.command()
def control(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    model: str = typer.Option(None, "--model", help="Model directory, as given to `timi eval` (default: the shipped one)."),
    set_: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help="Change the TIMIConfig, as in `timi eval`."),
    seed: list[int] = typer.Option([0], "--seed", help="Sampling seed(s); repeat for several (one pair per scene and seed)."),
    limit: int = typer.Option(None, "--limit", min=1),
    octree_resolution: int = typer.Option(384, "--octree-resolution", min=8),
    steps: int = typer.Option(50, "--steps", min=1),
    points: int = typer.Option(20480, "--points", min=1),
    icp_points: int = typer.Option(None, "--icp-points", min=3),
    device: str = typer.Option(None, "--device"),
    out: Path = typer.Option(Path("outputs/eval"), "--out", help="`timi eval`'s output folder (its cache is shared); "
                                                               "the report goes to OUT/control/."),
    quiet: bool = typer.Option(False, "--quiet"),
    engine: str = ENGINE_OPTION,
    address: str = ADDRESS_OPTION,
    gpus_per_worker: float = GPUS_PER_WORKER_OPTION,
    workers: int = WORKERS_OPTION,
) -> None:
    """Base vs TIMI vs TIMI with its gradient's token rows shuffled (a control for the update's direction)."""
    from timi.cli_common import engine_errors, engine_from_options
    from timi.evaluation.generators import TIMITorchGenerator
    from timi.evaluation.paired import LEVEL, paired_table
    from timi.evaluation.runner import MetricSettings
    from timi.evaluation.runs import BASELINE_LABEL, TIMI_LABEL, Run
    from timi.pipelines import resolve_model

    from timi.evaluation.cli import _base_config, evaluate_and_report

    from .controls import CONTROL_LABEL, ShuffledGradientGenerator

    config = _base_config(set_)
    ray_engine = engine_from_options(engine, address, gpus_per_worker, workers)
    model = model or str(resolve_model(None))
    options = dict(device=device, octree_resolution=octree_resolution, steps=steps)
    runs = [Run(BASELINE_LABEL, config.replace(isg=False)), Run(TIMI_LABEL, config),
            Run(CONTROL_LABEL, config, generator=ShuffledGradientGenerator(model, **options))]
    with engine_errors():
        summaries, paths = evaluate_and_report(dataset, runs, TIMITorchGenerator(model, **options), out, seeds=seed,
                                               metrics=MetricSettings(points_per_object=points, icp_points=icp_points),
                                               limit=limit, quiet=quiet, title=f"timi testbed control {dataset}",
                                               report_dir=out / "control", engine=ray_engine)
    typer.echo(paths["markdown"].read_text())
    typer.echo(paired_table([summaries[1]], summaries[2], f"TIMI - control (paired, {LEVEL:.0%} bootstrap interval)",
                            against="control"))


@app.command()
def figure(
    dataset: Path = typer.Argument(..., help="Folder of multi-instance scenes (from `timi testbed scenes`)."),
    eval_dir: Path = typer.Option(..., "--eval-dir", help="A `timi eval` / `timi testbed variants` output on them."),
    scene: list[str] = typer.Option(..., "--scene", help="Scene id (a row of the figure); repeat."),
    run: list[str] = typer.Option(["base model (no TIMI)", "TIMI"], "--run",
                                  help="Run label (a column, as first cached); repeat."),
    size: str = typer.Option("own", "--size", help="own: the meshes as generated; matched: guided runs at the "
                                                    "base model's surface area (docs/metrics.md)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed of the cached runs."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Side-by-side picture of cached runs on the same scenes: rows scenes, columns runs, with the
    ground truth (docs/results.md)."""
    from rich.console import Console

    from timi.cli_common import run_cli

    from .quality import figure_from_eval

    path = run_cli(lambda: figure_from_eval(dataset, eval_dir, list(scene), out, labels=tuple(run), seed=seed,
                                            size=size), Console(stderr=True, soft_wrap=True))
    typer.echo(f"wrote {path}")


@app.command("by-count")
def by_count_cmd(
    eval_dirs: list[Path] = typer.Argument(..., help="--out folders (or per_scene.csv files) of timi eval / timi testbed variants."),
    run: Optional[list[str]] = typer.Option(None, "--run", help="Run label(s) to report (default: every run but the base)."),
    base: str = typer.Option("base model (no TIMI)", "--base", help="Label of the base run."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the Markdown here."),
) -> None:
    """Every paired table split by instance count (2, 3, 4, pooled): area / base, SSR, matched-size SSR, FS-S, LCD."""
    from timi.evaluation.by_count import by_count_markdown, read_rows

    try:
        text = by_count_markdown(read_rows(eval_dirs), run or None, base)
    except (FileNotFoundError, KeyError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(text)
    if out is not None:
        out.write_text(text)

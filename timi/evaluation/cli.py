"""``timi eval DATASET_DIR``: generate, cache, score and tabulate (see docs/metrics.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from timi.cli_common import (ADDRESS_OPTION, ENGINE_OPTION, GPUS_PER_WORKER_OPTION, PRESET_HELP, WORKERS_OPTION,
                             engine_errors, engine_from_options)
from timi_core import TIMIConfig


def _check_model_supports(model: str, runs) -> None:
    """Refuse, before anything runs, a configuration the model cannot sample (one line)."""
    from timi.pipelines import token_positions

    wants = [r.label for r in runs
             if r.config.enabled and r.config.needs_positions and r.config.smoothing == "positions"]
    if wants and token_positions(model) is None:
        raise typer.BadParameter(f"smoothing=positions (run {wants[0]!r}) needs latents that carry their tokens' "
                                 f"positions, and {model}'s do not (only testbed models with latent_positions); "
                                 "use smoothing=decoder (positions from the VAE decoder) or smoothing=tokens",
                                 param_hint="--set/--sweep")


def config_from_settings(settings: List[str], base: TIMIConfig) -> TIMIConfig:
    """``base`` with ``FIELD=VALUE`` settings applied (validated); ``ValueError`` names the bad one."""
    from .runs import SWEEPABLE, _parse_value

    for item in settings:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in SWEEPABLE:
            raise ValueError(f"{item!r}: use FIELD=VALUE with FIELD one of {', '.join(SWEEPABLE)}")
        base = base.replace(**{name: _parse_value(name, value, getattr(base, name))})
    return base


def _base_config(settings: List[str], preset: str = "default") -> TIMIConfig:
    try:
        base = TIMIConfig.preset(preset)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    try:
        return config_from_settings(settings, base)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--set") from None


def evaluate_and_report(dataset_dir, runs, generate, out, *, seeds, metrics, limit=None, quiet=False, title=None,
                        report_dir=None, engine=None):
    """The one evaluation loop of the commands: every seed of ``seeds`` (an :class:`Evaluator` each,
    the same ``metrics``), merged into one summary per run (:func:`merge_seeds`), and the report
    (tables with sizes and matched-size scores, CSVs, plots) written to ``report_dir`` (default ``out``,
    whose ``cache/`` holds the outputs). ``engine``: ``None`` runs here, one unit after another; a
    :class:`timi.evaluation.ray_engine.RayEngine` runs the units on a Ray cluster, on the same cache.
    Returns ``(summaries, paths)``."""
    from .report import write_report
    from .runner import Evaluator, merge_seeds

    evaluators = [Evaluator(dataset_dir, generate, out, seed=seed, metrics=metrics, limit=limit,
                            progress=not quiet, log=typer.echo if quiet else None) for seed in dict.fromkeys(seeds)]
    if engine is None:
        per_seed = [(e.seed, e.evaluate(runs)) for e in evaluators]
    else:
        per_seed = engine.evaluate(evaluators, runs, progress=not quiet, log=typer.echo if quiet else None)
    summaries = merge_seeds(per_seed)
    return summaries, write_report(summaries, out if report_dir is None else report_dir, title=title)


def eval_command(
    dataset_dir: Path = typer.Argument(..., help="Folder with one sub-folder per scene: image.png, masks.png|npy, "
                                                 "gt/instance_XX.ply|glb|obj (docs/metrics.md)."),
    model: Optional[str] = typer.Option(None, "--model", help="hy3dgen model directory or id (e.g. tencent/Hunyuan3D-2); "
                                        "default: the shipped testbed model (unless --generator/--predictions)."),
    generator: Optional[str] = typer.Option(None, "--generator", metavar="MODULE:CALLABLE",
                                            help="Use another generator: generate(image, masks, config, seed) -> "
                                                 "(mesh, instance meshes or None, seconds)."),
    predictions: List[Path] = typer.Option([], "--predictions", help="Score another method's outputs: a "
                                           "folder PRED_DIR with one folder per scene id holding instance_XX.* or "
                                           "scene.* (docs/metrics.md). Repeatable."),
    label: List[str] = typer.Option([], "--label", help="Table row name of each --predictions, in order "
                                    "(default: the folder name)."),
    no_timi: bool = typer.Option(False, "--no-timi", help="Evaluate the base model only (TIMIConfig.isg=False)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the base model as a row of the table."),
    ablation: List[str] = typer.Option([], "--ablation", help="Paper ablation: components (Table 2), layers (3), "
                                       "steps (4), sgu-parts (5), alpha (6), sigma (7); or table2..table7. Repeatable."),
    sweep: List[str] = typer.Option([], "--sweep", metavar="FIELD=V1,V2",
                                    help="Sweep one TIMIConfig field, e.g. alpha=0.1,0.2. Repeatable."),
    set_: List[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help="Change the base TIMIConfig, e.g. alpha=0.2."),
    preset: str = typer.Option("default", "--preset", help="The base TIMIConfig. " + PRESET_HELP),
    out: Path = typer.Option(Path("outputs/eval"), "--out", help="Output folder (cache, tables, plots)."),
    seeds: List[int] = typer.Option([0], "--seed", help="Sampling seed (the same for every scene and run). "
                                    "Repeat for several: each (scene, seed) is one pair of the paired comparison."),
    steps: int = typer.Option(50, "--steps", min=1, help="Denoising steps."),
    guidance_scale: float = typer.Option(5.0, "--guidance-scale", help="Classifier-free guidance scale."),
    octree_resolution: int = typer.Option(384, "--octree-resolution", min=8, help="Marching-cubes grid."),
    decoding: str = typer.Option("dense", "--decoding", help="Volume decoding: dense (hy3dgen's, the default, as "
                                                            "every published score) or coarse-to-fine (the same mesh "
                                                            "in a fraction of the time; docs/benchmarks.md)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 | bfloat16 | float32."),
    points: int = typer.Option(20480, "--points", min=1, help="Surface points per object (MIDI: 20480)."),
    threshold: float = typer.Option(0.1, "--fscore-threshold", help="F-score distance threshold (MIDI: 0.1)."),
    align: str = typer.Option("icp", "--align", help="icp | icp-search | none (docs/metrics.md)."),
    icp_points: Optional[int] = typer.Option(None, "--icp-points", min=3,
                                             help="Fit ICP on N points per cloud (faster; default all, as MIDI)."),
    metric_seed: int = typer.Option(0, "--metric-seed", help="Seed of the metrics' surface sampling and ICP, the same "
                                    "for every sampling seed (so runs made one --seed at a time share their scores)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N scenes."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    engine: str = ENGINE_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    gpus_per_worker: Optional[float] = GPUS_PER_WORKER_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
) -> None:
    """Evaluate TIMI on a folder of scenes: Table-1 metrics (LCD, CD-S, FS-S, SSR, CD-O, FS-O, s/scene) as
    Markdown and CSV, ablations of Tables 2-7 and plots of metric vs swept parameter. Outputs are cached
    per (scene, configuration): run the same command again to resume."""
    from timi.metrics import ALIGN_MODES

    from .dataset import SceneError, discover_scenes
    from .generators import PredictionReader, TIMITorchGenerator, load_generator_factory
    from .runner import MetricSettings
    from .runs import Run, plan_runs

    if model is not None and generator is not None:
        raise typer.BadParameter("pass exactly one of --model (hy3dgen model) or --generator MODULE:CALLABLE",
                                 param_hint="--model")
    if model is None and generator is None and not predictions:
        from timi.pipelines import ModelNotFoundError, resolve_model

        try:
            model = resolve_model(None)  # the model shipped with the project, as `timi generate`
        except ModelNotFoundError as e:
            raise typer.BadParameter(f"no --model given and {e}", param_hint="--model") from None
    if model is None and generator is None and (ablation or sweep or no_timi or baseline or set_):
        raise typer.BadParameter("--ablation/--sweep/--no-timi/--baseline/--set need a model (--model or "
                                 "--generator); --predictions only scores existing outputs", param_hint="--predictions")
    if len(label) > len(predictions):
        raise typer.BadParameter(f"{len(label)} labels for {len(predictions)} --predictions", param_hint="--label")
    if align not in ALIGN_MODES:
        raise typer.BadParameter(f"{align!r}; use one of {', '.join(ALIGN_MODES)}", param_hint="--align")
    base = _base_config(set_, preset)
    ray_engine = engine_from_options(engine, address, gpus_per_worker, workers)
    try:
        discover_scenes(dataset_dir)
        runs = [] if model is None and generator is None else plan_runs(
            no_timi=no_timi, with_baseline=baseline, ablations=ablation, sweeps=sweep, base=base)
        readers = [Run(name, base, group="main", generator=PredictionReader(path))
                   for path, name in zip(predictions, label + [p.name for p in predictions[len(label):]])]
    except (ValueError, SceneError) as e:
        raise typer.BadParameter(str(e)) from None
    # Table 1's order: base model, other methods, TIMI (and its ablations)
    n_first = 1 if runs and not runs[0].config.isg else 0
    runs = runs[:n_first] + readers + runs[n_first:]
    if len({r.label for r in runs}) != len(runs):
        raise typer.BadParameter("two rows share a label; name the --predictions with distinct --label values")
    generate = None
    if generator is not None:
        try:
            generate = load_generator_factory(generator)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--generator") from None
    elif model is not None:
        from timi.pipelines import DECODINGS

        if decoding not in DECODINGS:
            raise typer.BadParameter(f"{decoding!r}: use one of {', '.join(DECODINGS)}.", param_hint="--decoding")
        _check_model_supports(model, runs)
        try:
            from timi.generate import check_fits

            check_fits(octree_resolution, steps, device)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        generate = TIMITorchGenerator(model, device=device, dtype=dtype, steps=steps, guidance_scale=guidance_scale,
                                      octree_resolution=octree_resolution, decoding=decoding)
    # one metric seed for every sampling seed: pairs differ only in sampling, and a seed evaluated on its
    # own (e.g. in a second process) is scored as it is in a multi-seed call, so its scores are reused
    metrics = MetricSettings(points_per_object=points, threshold=threshold, align=align, seed=metric_seed,
                             icp_points=icp_points)
    with engine_errors():  # Ray missing, or no cluster at --address: one line, exit 2
        summaries, paths = evaluate_and_report(dataset_dir, runs, generate, out, seeds=seeds, metrics=metrics,
                                               limit=limit, quiet=quiet, title=f"timi eval {dataset_dir}",
                                               engine=ray_engine)
    typer.echo(paths["markdown"].read_text())
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
    if all(s.n_ok == 0 for s in summaries):
        typer.echo("no scene could be scored; see the reasons above.", err=True)
        raise typer.Exit(1)

"""``timi bench {overhead,guidance-pass,backends,scaling}`` (typer); ``--json PATH`` saves the result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from .config import ARCHITECTURES, BenchConfig, default_config, full_size_config, guidance_pass_config, hunyuan21_config, tiny_config

app = typer.Typer(help="Benchmarks: TIMI overhead vs plain sampling, guidance-pass memory, JAX vs PyTorch, "
                       "scaling in K and L (docs/benchmarks.md).", no_args_is_help=True)

_JSON = typer.Option(None, "--json", help="Write the full result (timings, config, machine) to this JSON file.")
_TINY = typer.Option(False, "--tiny", help="Seconds-long smoke configuration (CI).")
_REPEATS = typer.Option(3, "--repeats", min=1, help="Timed rounds (interleaved); the median is reported.")
_THREADS = typer.Option(0, "--threads", min=0, help="CPU threads per process (0: the libraries' default; 1: also "
                                                    "single-threaded XLA). Use 1 on a shared, busy machine.")


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _config(base: BenchConfig, **kw) -> BenchConfig:
    try:
        return base.replace(**_overrides(**kw))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers such as 1,2,4,8; got {text!r}.") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name} needs positive integers; got {text!r}.")
    return values


def _emit(result: dict, path: Optional[Path], lines: list[str]) -> None:
    from .timing import write_json

    for line in lines:
        typer.echo(line)
    if path is not None:
        write_json(result, path)
        typer.echo(f"wrote {path}")


def _threads(n: int) -> None:
    from .timing import limit_threads

    limit_threads(n)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


# Shape options shared by the sampler benchmarks (None = the preset's value).
def _shape_options(steps, guided_steps, hidden, heads, depth, single_depth, num_latents, num_cond, instances,
                   guided_layers, seed, dtype):
    return dict(steps=steps, guided_steps=guided_steps, hidden_size=hidden, num_heads=heads, depth=depth,
                depth_single_blocks=single_depth, num_latents=num_latents, num_cond_tokens=num_cond,
                num_instances=instances, guided_layers=guided_layers, seed=seed, dtype=dtype)


_STEPS = typer.Option(None, "--steps", help="Sampling steps T.")
_GSTEPS = typer.Option(None, "--guided-steps", help="Guided steps t (the first t of T).")
_HIDDEN = typer.Option(None, "--hidden", help="DiT width.")
_HEADS = typer.Option(None, "--heads", help="Attention heads.")
_DEPTH = typer.Option(None, "--depth", help="Double-stream blocks.")
_SDEPTH = typer.Option(None, "--single-depth", help="Single-stream blocks.")
_L = typer.Option(None, "--latents", help="Latent tokens L.")
_M = typer.Option(None, "--cond-tokens", help="Condition tokens M (1 + a square grid).")
_K = typer.Option(None, "--instances", help="Instances K.")
_LAYERS = typer.Option(None, "--guided-layers", help="Guided double blocks l.")
_SEED = typer.Option(None, "--seed", help="Seed of weights, noise and conditions.")
_DTYPE = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16.")


@app.command()
def overhead(
    backend: str = typer.Option("torch", "--backend", help="torch | jax."),
    full_size: bool = typer.Option(False, "--full-size", help="Real Hunyuan3D shapes, 50 steps / 15 guided (GPU)."),
    tiny: bool = _TINY, repeats: int = _REPEATS,
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed calls of each variant first."),
    steps: Optional[int] = _STEPS, guided_steps: Optional[int] = _GSTEPS, hidden: Optional[int] = _HIDDEN,
    heads: Optional[int] = _HEADS, depth: Optional[int] = _DEPTH, single_depth: Optional[int] = _SDEPTH,
    latents: Optional[int] = _L, cond_tokens: Optional[int] = _M, instances: Optional[int] = _K,
    guided_layers: Optional[int] = _LAYERS, seed: Optional[int] = _SEED, dtype: Optional[str] = _DTYPE,
    distilled: bool = typer.Option(False, "--guidance-distilled", help="A guidance-distilled DiT (guidance_embed, the fast / turbo models): one branch per step, no CFG pair."),
    model: str = typer.Option("2.0", "--model", help="DiT architecture: 2.0 (hy3dgen's Hunyuan3DDiT, the presets "
                              "above) | 2.1 (Hunyuan3D 2.1's HunYuanDiTPlain, released shapes; GPU) | 2.1-tiny | "
                              "trellis (TRELLIS stage 1, released shapes; GPU) | trellis-testbed-size."),
    threads: int = _THREADS, json_path: Optional[Path] = _JSON,
) -> None:
    """Plain vs TIMI sampling (same model, seed, schedule): medians, ratio timi/plain and its FLOP floor."""
    _threads(threads)
    from .runs import overhead as run
    from .trellis import TRELLIS_SHAPES, trellis_overhead

    if model in TRELLIS_SHAPES:
        if backend != "torch":
            raise typer.BadParameter(f"--model {model}: torch backend only.")
        r = trellis_overhead(model, steps=steps, guided_layers=guided_layers or 4, repeats=repeats, warmup=warmup,
                             seed=seed or 0)
        _emit(r, json_path, [f"overhead [TRELLIS stage 1, {model}, {r['device']}] plain {_fmt(r['plain_s'])} s, TIMI "
                             f"{_fmt(r['timi_s'])} s, ratio {_fmt(r['ratio'])} (FLOP estimate {_fmt(r['floor'])}, input-grad-only "
                             f"{_fmt(r['floor_input_grad'])}: "
                             f"{r['guided_steps']} of {r['steps']} steps guided through {r['guided_layers']} of "
                             f"{r['flow']['num_blocks']} blocks, {r['plain_forwards']} plain forwards)"])
        return
    if backend not in ("torch", "jax"):
        raise typer.BadParameter(f"--backend must be torch or jax, got {backend!r}.")
    if model not in ARCHITECTURES:
        raise typer.BadParameter(f"--model must be one of {', '.join(ARCHITECTURES)}, got {model!r}.")
    if model != "2.0" and (backend == "jax" or distilled or single_depth):
        raise typer.BadParameter(f"--model {model}: torch backend only, no single-stream blocks, no distilled variant.")
    if model != "2.0":
        base = hunyuan21_config(model)
    else:
        base = tiny_config() if tiny else full_size_config() if full_size else default_config()
    cfg = _config(base, **_shape_options(steps, guided_steps, hidden, heads, depth, single_depth, latents,
                                         cond_tokens, instances, guided_layers, seed, dtype))
    if distilled:
        cfg = cfg.replace(guidance_embed=True)
    if backend == "jax":
        from .jax_backend import jax_available

        why = jax_available()
        if why:
            typer.echo(why, err=True)
            raise typer.Exit(2)
    r = run(cfg, backend, repeats=repeats, warmup=warmup)
    lines = [f"overhead [{backend}] plain {_fmt(r['plain_s'])} s, TIMI {_fmt(r['timi_s'])} s, "
             f"ratio {_fmt(r['ratio'])} (target <= {r['target_ratio']}; FLOP floor {_fmt(r['floor'])}, "
             f"input-grad-only floor {_fmt(r['floor_input_grad'])}, as implemented "
             f"{_fmt(r['floor_as_implemented'])})"]
    if "guide_s_per_guided_step" in r:
        est = r.get("ratio_from_guide_time", r.get("ratio_from_step_times"))
        lines.append(f"  plain step {_fmt(r['plain_step_s'])} s; one guidance pass "
                     f"{_fmt(r['guide_s_per_guided_step'])} s; overhead from these = {_fmt(est)}")
    if "compile_s" in r:
        lines.append(f"  JAX compile: plain {_fmt(r['compile_s']['plain'])} s, TIMI {_fmt(r['compile_s']['timi'])} s")
    _emit(r, json_path, lines)


@app.command("guidance-pass")
def guidance_pass_cmd(
    tiny: bool = _TINY,
    repeats: int = typer.Option(1, "--repeats", min=1, help="Fresh-process runs per mode (interleaved)."),
    latents: Optional[int] = _L, cond_tokens: Optional[int] = _M, instances: Optional[int] = _K,
    hidden: Optional[int] = _HIDDEN, heads: Optional[int] = _HEADS, guided_layers: Optional[int] = _LAYERS,
    seed: Optional[int] = _SEED, dtype: Optional[str] = _DTYPE,
    threads: int = _THREADS, json_path: Optional[Path] = _JSON,
) -> None:
    """One guidance pass (Eqs.2-7, first 4 double blocks, forward + backward) at the real shapes
    (hidden 1024, 16 heads, L=3072, M=1370): fused vs explicit P, time and peak memory."""
    _threads(threads)
    from .guidance_pass import guidance_pass

    base = tiny_config().replace(depth_single_blocks=0) if tiny else guidance_pass_config()
    cfg = _config(base, num_latents=latents, num_cond_tokens=cond_tokens, num_instances=instances,
                  hidden_size=hidden, num_heads=heads, seed=seed, dtype=dtype)
    if guided_layers is not None:
        cfg = _config(cfg, guided_layers=guided_layers, depth=guided_layers)
    r = guidance_pass(cfg, repeats=repeats, threads=threads)
    _emit(r, json_path, [
        f"guidance pass fused {_fmt(r['fused_s'])} s / {_fmt(r['fused_peak_mib'])} MiB; explicit "
        f"{_fmt(r['explicit_s'])} s / {_fmt(r['explicit_peak_mib'])} MiB",
        f"  time fused/explicit {_fmt(r['time_ratio'])} (target <= 1); memory explicit/fused "
        f"{_fmt(r['memory_ratio'])} (target >= 2); loss rel. diff {_fmt(r['loss_rel_diff_fused_vs_explicit'])}"])


@app.command()
def backends(
    tiny: bool = _TINY, repeats: int = _REPEATS,
    full_size: bool = typer.Option(False, "--full-size", help="Real Hunyuan3D shapes, 50 steps / 15 guided (GPU)."),
    plain: bool = typer.Option(False, "--plain", help="Time plain sampling instead of the guided sampler."),
    steps: Optional[int] = _STEPS, guided_steps: Optional[int] = _GSTEPS, hidden: Optional[int] = _HIDDEN,
    heads: Optional[int] = _HEADS, depth: Optional[int] = _DEPTH, single_depth: Optional[int] = _SDEPTH,
    latents: Optional[int] = _L, cond_tokens: Optional[int] = _M, instances: Optional[int] = _K,
    guided_layers: Optional[int] = _LAYERS, seed: Optional[int] = _SEED, dtype: Optional[str] = _DTYPE,
    threads: int = _THREADS, json_path: Optional[Path] = _JSON,
) -> None:
    """The whole guided sampler, JAX (compiled; compile time apart) vs PyTorch, same config and inputs."""
    _threads(threads)
    from .jax_backend import jax_available
    from .runs import backends as run

    why = jax_available()
    if why:
        typer.echo(why, err=True)
        raise typer.Exit(2)
    cfg = _config(tiny_config() if tiny else full_size_config() if full_size else default_config(),
                  **_shape_options(steps, guided_steps, hidden, heads, depth, single_depth, latents,
                                   cond_tokens, instances, guided_layers, seed, dtype))
    r = run(cfg, repeats=repeats, guided=not plain)
    _emit(r, json_path, [
        f"backends ({'TIMI' if not plain else 'plain'}) torch {_fmt(r['torch_s'])} s, JAX {_fmt(r['jax_s'])} s "
        f"(+ {_fmt(r['jax_compile_s'])} s compile): JAX/torch time {_fmt(r['ratio'])} "
        f"(speed-up {_fmt(r['speedup_jax_over_torch'])}x); max |latent diff| {_fmt(r['max_abs_latent_diff_jax_vs_torch'])}"])


@app.command()
def scaling(
    backend: str = typer.Option("torch", "--backend", help="torch | jax."),
    ks: str = typer.Option("1,2,4,8", "--ks", help="Instance counts K (at the config's L)."),
    ls: str = typer.Option("256,512,1024,3072", "--ls", help="Latent token counts L (at the config's K)."),
    tiny: bool = _TINY,
    repeats: int = typer.Option(2, "--repeats", min=1, help="Timed rounds per point."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed calls of each variant per point."),
    steps: Optional[int] = typer.Option(None, "--steps", help="T of the schedule the ratio is given for."),
    guided_steps: Optional[int] = typer.Option(None, "--guided-steps", help="t of that schedule."),
    hidden: Optional[int] = _HIDDEN, heads: Optional[int] = _HEADS, depth: Optional[int] = _DEPTH,
    single_depth: Optional[int] = _SDEPTH, cond_tokens: Optional[int] = _M, instances: Optional[int] = _K,
    guided_layers: Optional[int] = _LAYERS, seed: Optional[int] = _SEED, dtype: Optional[str] = _DTYPE,
    threads: int = _THREADS, json_path: Optional[Path] = _JSON,
) -> None:
    """Overhead ratio for K = 1, 2, 4, 8 instances and L = 256, 512, 1024, 3072 latent tokens (from
    repeated one-step guided vs plain sampling; the ratio is given for the default 20 / 6 schedule)."""
    _threads(threads)
    from .runs import scaling as run

    if backend not in ("torch", "jax"):
        raise typer.BadParameter(f"--backend must be torch or jax, got {backend!r}.")
    base = tiny_config() if tiny else default_config()
    cfg = _config(base, **_shape_options(steps, guided_steps, hidden,
                                         heads, depth, single_depth, None, cond_tokens, instances, guided_layers,
                                         seed, dtype))
    r = run(cfg, backend, ks=_ints(ks, "--ks"), ls=_ints(ls, "--ls"), repeats=repeats, warmup=warmup)
    lines = [f"scaling [{backend}] one-step timings, ratio for {cfg.steps} steps / {cfg.guided_steps} guided, "
             f"repeats {repeats}"]
    for row in r["rows"]:
        lines.append(f"  K={row['K']:>2} L={row['L']:>5}: plain step {_fmt(row['plain_step_s'])} s, guided step "
                     f"{_fmt(row['guided_step_s'])} s, overhead {_fmt(row['ratio'])} (floor {_fmt(row['floor'])})")
    _emit(r, json_path, lines)


@app.command()
def mesh(
    scenes: Optional[Path] = typer.Option(None, "--scenes", help="A `timi eval` dataset folder: its first --n scenes "
                                                                 "(default: the shipped example scene)."),
    n: int = typer.Option(3, "--n", min=1, help="How many scenes of --scenes."),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or id (default: the shipped one)."),
    full_width: bool = typer.Option(False, "--full-width", help="Instead: hy3dgen 2.0's full-width ShapeVAE with "
                                                                "random weights and one random latent."),
    octree: str = typer.Option("128,256", "--octree", help="Octree resolutions, comma-separated."),
    steps: int = typer.Option(50, "--steps", min=1, help="Sampling steps of the scenes' latents."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: CUDA when available)."),
    tiny: bool = typer.Option(False, "--tiny", help="Smoke run (CI, ~30 s): the example scene, 8 steps, "
                                                    "octree 64,128."),
    threads: int = _THREADS, json_path: Optional[Path] = _JSON,
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table to this file."),
) -> None:
    """Dense vs coarse-to-fine volume decoding of the same latents: seconds, decoder queries, CUDA
    peak memory, and the mesh against dense (identical?, volume IoU, Chamfer / diagonal)."""
    _threads(threads)
    import torch

    from timi.io import write_text
    from timi.pipelines import load_pipeline, resolve_device
    from . import mesh as bench
    from .timing import machine_info

    resolutions = (64, 128) if tiny else _ints(octree, "--octree")
    steps = 8 if tiny else steps
    dev = resolve_device(device)
    say = (lambda s: typer.echo(f"  {s}", err=True))
    if full_width:
        vae, z = bench.full_width_vae(device=dev)
        latents, names = [z], ["random latent"]
    else:
        pipe = load_pipeline(model, device=dev)
        vae = pipe.base.vae
        pairs, names = _bench_scenes(scenes, 1 if tiny else n)
        latents = bench.scene_latents(pipe, pairs, steps=steps)

    with torch.no_grad():
        rows = bench.bench_latents(vae, latents, resolutions, ["coarse-to-fine"], names=names,
                                   progress=say)
    table = bench.markdown(rows)
    result = dict(benchmark="mesh", rows=rows, summary=bench.summary(rows), machine=machine_info(),
                  source="full-width random VAE" if full_width else str(scenes or "example scene"),
                  model=None if full_width else str(model or "shipped"))
    if markdown_path is not None:
        write_text(markdown_path, table + "\n")
    _emit(result, json_path, [table, ""] + bench.verdict(rows))


def _bench_scenes(folder: Optional[Path], n: int) -> tuple[list, list]:
    """``([(image, masks), ...], names)``: the first ``n`` scenes of a dataset folder, or the example."""
    from timi.evaluation.dataset import SceneError, discover_scenes, load_scene

    try:
        if folder is None:
            from timi.testbed import example_scene_path

            loaded = [load_scene(example_scene_path())]
        else:
            loaded = [load_scene(p) for p in discover_scenes(folder)[:n]]
    except SceneError as e:
        raise typer.BadParameter(str(e), param_hint="--scenes") from None
    return [(s.image, s.masks) for s in loaded], [s.scene_id for s in loaded]


@app.command()
def gpu(
    tiny: bool = typer.Option(False, "--tiny", help="Toy sizes on the CPU, seconds (CI rehearsal)."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Timed rounds of the samplers."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: CUDA when available)."),
    out: Path = typer.Option(Path("outputs/bench-gpu"), "--out", help="Folder for gpu.json and gpu.md."),
    threads: int = _THREADS,
) -> None:
    """On a lent GPU, in one run: full-size DiT fp16 50 steps plain vs TIMI, full-width volume
    decoding at octree 384 dense vs coarse-to-fine, JAX vs PyTorch; one JSON and one Markdown
    table beside the paper's 54.2 s / 59.2 s. A part that fails is recorded and the others run."""
    _threads(threads)
    from timi.io import write_text

    from .gpu import markdown as gpu_markdown, run_suite
    from .timing import write_json

    result = run_suite(tiny=tiny, repeats=repeats, device=device, say=lambda s: typer.echo(f"  {s}", err=True))
    table = gpu_markdown(result)
    write_json(result, out / "gpu.json")
    write_text(out / "gpu.md", table + "\n")
    typer.echo(table)
    typer.echo(f"wrote {out / 'gpu.json'}, {out / 'gpu.md'}")
    failed = [k for k, v in result["parts"].items() if not v["ok"]]
    if failed:
        typer.echo(f"failed parts: {', '.join(failed)} (errors in gpu.json)", err=True)
        raise typer.Exit(1)


@app.command()
def report(files: list[Path] = typer.Argument(..., help="JSON files written by the other sub-commands.")) -> None:
    """Markdown tables (as in docs/benchmarks.md) from result JSON files."""
    from .report import render

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise typer.BadParameter(f"no such result file(s): {missing}")
    typer.echo(render(files))


def main() -> None:
    app()

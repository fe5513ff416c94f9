"""``timi generate`` (typer): one scene (:func:`timi.generate.generate`) or many (:mod:`timi.batch`).

Kept apart from :mod:`timi.generate` so that :mod:`timi.batch`, which runs ``generate`` per scene,
and the command that dispatches to it import in one direction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from timi_core import defaults

from .cli_common import (ADDRESS_OPTION, ENGINE_OPTION, GPUS_PER_WORKER_OPTION, PRESET_HELP, WORKERS_OPTION, run_cli,
                         split_image_and_masks)
from .generate import GenerateOptions, generate, parse_views, summary_table
from .io import MESH_FORMATS

#: ``--out``'s formats, as the writer accepts them (.glb, .obj, .ply or .stl)
_FORMATS = ", ".join(list(MESH_FORMATS)[:-1]) + " or " + list(MESH_FORMATS)[-1]
GENERATE_HELP = """Generate a 3D scene from IMAGE and its instance masks with TIMI guidance.

Any shape DiT of the Hunyuan3D-2 family (--model FOLDER: standard, -fast, -turbo, mini, mv):


  timi generate scene.png --masks labels.png -o scene.glb
  timi generate scene.png --masks labels.png -o scene.glb --model models/Hunyuan3D-2/hunyuan3d-dit-v2-0-turbo --steps 5
  timi generate scene.png --masks labels.png -o scene.glb --model models/Hunyuan3D-2mini/hunyuan3d-dit-v2-mini-fast --steps 10
  timi generate scene.png --masks labels.png -o scene.glb --model DIT_FOLDER --flashvdm --mc-algo mc

Multi-view (Hunyuan3D-2mv): one picture and one mask source per view (front, left, back, right); an
instance keeps its label value (label map) or file name (folder of mask PNGs) in every view, and
may be missing from some views:


  timi generate --view front=front.png --view left=left.png \\
      --view-masks front=front_labels.png --view-masks left=left_labels.png \\
      --model models/Hunyuan3D-2mv/hunyuan3d-dit-v2-mv-turbo --steps 5 -o scene.glb

Many scenes: a folder with one sub-folder per scene (image.png + masks.png|masks.npy) or a manifest
(.csv/.jsonl: image, masks, out, optional seed; paths relative to it), here or on a Ray cluster;
existing outputs are skipped (--overwrite), a failed scene is reported and skipped (exit 1 at the end):


  timi generate scenes/ --out meshes/
  timi generate scenes.csv --engine ray --address auto --gpus-per-worker 0.5

The guided window is the paper's first 30 % of the trajectory (15 of 50 steps, 9 of 30, 2 of turbo's
5); --guided-steps N guides the first N steps instead."""


def generate_command(
    image_and_masks: Optional[list[Path]] = typer.Argument(None, metavar="IMAGE", help="Input picture (PNG/JPEG; RGBA alpha = foreground, else the masks' union). Paths after the first one are more mask files, so `--masks a.png b.png` works. Not with --view. Or many scenes: a folder of scene folders, or a manifest .csv/.jsonl (docs/usage.md)."),
    masks: Optional[list[Path]] = typer.Option(None, "--masks", "-m", help="Label-map PNG, folder or list of mask PNGs, (K,H,W) .npy, or SAM/Grounded-SAM RLE .json. Repeat for several files."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help=f"Scene mesh to write: {_FORMATS} (by its extension; written atomically). A folder of scenes: the folder for their meshes."),
    model: Optional[str] = typer.Option(None, help="hy3dgen model folder of any variant, e.g. one named hunyuan3d-dit-v2-0-turbo (config.yaml + model.fp16.safetensors), or id (tencent/Hunyuan3D-2 under $HY3DGEN_MODELS); default: the shipped model."),
    view: Optional[list[str]] = typer.Option(None, "--view", help="Multi-view input (Hunyuan3D-2mv): VIEW=PICTURE, VIEW one of front, left, back, right. Repeat per view."),
    view_masks: Optional[list[str]] = typer.Option(None, "--view-masks", help="VIEW=MASKS for each --view: a label map (labels are instance ids in every view), a folder of mask PNGs (file names are the ids), a (K,H,W) .npy (slice k is instance k) or an RLE .json."),
    backend: str = typer.Option("torch", help="torch (hy3dgen) or jax."),
    steps: int = typer.Option(defaults.NUM_INFERENCE_STEPS, help="Denoising steps."),
    guidance_scale: float = typer.Option(defaults.GUIDANCE_SCALE, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Random seed of the initial noise."),
    alpha: float = typer.Option(0.1, help="TIMI update size alpha (Eq.6)."),
    sigma: float = typer.Option(1.5, help="Gaussian smoothing sigma of the gradient (Eq.5)."),
    guided_layers: int = typer.Option(4, help="Guide the first N double-stream blocks."),
    guided_steps: Optional[int] = typer.Option(None, help="Guide the first N denoising steps (default: the --guided-fraction window)."),
    guided_fraction: float = typer.Option(0.3, help="Guide the steps that start in this first part of the trajectory (noise level below it; paper: 15/50 = 0.3)."),
    preset: str = typer.Option("default", "--preset", help=PRESET_HELP),
    no_timi: bool = typer.Option(False, "--no-timi", help="Plain hy3dgen sampling (no guidance), for comparison."),
    octree_resolution: int = typer.Option(defaults.OCTREE_RESOLUTION, help="Marching-cubes grid resolution."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16 (auto: fp16 on cuda, fp32 on cpu)."),
    split_instances: bool = typer.Option(False, "--split-instances", help="Write one named node per instance (connected parts assigned by the masks)."),
    report: Optional[Path] = typer.Option(None, help="Folder for report PNGs (instance maps, L_sep/lambda, coloured views)."),
    overlap: str = typer.Option("error", help="Overlapping masks: error, first or last (which mask keeps a shared pixel)."),
    assign: str = typer.Option("projection", help="How --split-instances gives parts to instances: projection (into the input view's masks) or tokens (the instance map carried from the latent tokens through the VAE decoder)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: 1 for small models such as the shipped one, all usable cores for checkpoints of 200 MB and more; docs/benchmarks.md)."),
    flashvdm: bool = typer.Option(False, "--flashvdm", help="Decode with hy3dgen's turbo VAE and FlashVDM (enable_flashvdm); needs hunyuan3d-vae-v2-0-turbo (or -mini-turbo) beside the model folder. Changes the decoding only."),
    dense_decoding: bool = typer.Option(False, "--dense-decoding", help="Decode the VAE on the whole marching-cubes grid (hy3dgen's default) instead of coarse-to-fine near the surface; the mesh is the same (docs/benchmarks.md), only slower. Changes the decoding only."),
    mc_algo: Optional[str] = typer.Option(None, "--mc-algo", help="Surface extractor: mc (marching cubes, CPU) or dmc (CUDA, needs diso). Changes the decoding only."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Many scenes: generate the scenes whose output exists too (default: skip them)."),
    engine: str = ENGINE_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    gpus_per_worker: Optional[float] = GPUS_PER_WORKER_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
) -> None:
    """Generate a 3D scene from IMAGE and its instance masks with TIMI guidance (see GENERATE_HELP)."""
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    from .cli_common import engine_from_options

    ray_engine = engine_from_options(engine, address, gpus_per_worker, workers)

    def options(batch: bool = False) -> GenerateOptions:
        views, vmasks = parse_views(view), parse_views(view_masks, "--view-masks")
        if batch:
            image, mask_paths = None, []
        elif views:
            image, mask_paths = (image_and_masks or [None])[0], list(masks or []) + list((image_and_masks or [])[1:])
        elif not image_and_masks or not masks:
            raise ValueError("give IMAGE --masks MASKS (one picture) or --view VIEW=PICTURE with --view-masks "
                             "VIEW=MASKS (multi-view), or a folder of scenes or a manifest; see timi generate --help.")
        else:
            image, mask_paths = split_image_and_masks(image_and_masks, masks)
        if out is None and not batch:
            raise ValueError("--out: give the scene file to write, e.g. --out scene.glb.")
        return GenerateOptions(image=image, masks=mask_paths, out=out, model=model, backend=backend, steps=steps,
                               guidance_scale=guidance_scale, seed=seed, alpha=alpha, sigma=sigma,
                               guided_layers=guided_layers, guided_steps=guided_steps,
                               guided_fraction=guided_fraction, preset=preset, timi=not no_timi,
                               octree_resolution=octree_resolution, device=device, dtype=dtype,
                               split_instances=split_instances, report=report, overlap=overlap, assign=assign,
                               progress=not quiet, threads=threads, flashvdm=flashvdm, mc_algo=mc_algo,
                               dense_decoding=dense_decoding,
                               views=views, view_masks=vmasks)

    if image_and_masks and not masks and not view and len(image_and_masks) == 1:
        from .batch import batch_command, is_batch_input

        if is_batch_input(image_and_masks[0]):  # a folder of scenes or a manifest (docs/usage.md, "Many scenes")
            return batch_command(image_and_masks[0], out, lambda: options(batch=True), ray_engine, overwrite, quiet, err)
    if ray_engine is not None:
        raise typer.BadParameter("runs many scenes: give a folder of scenes or a manifest (.csv, .jsonl) instead of "
                                 "IMAGE --masks", param_hint="--engine ray")
    opts = run_cli(options, err)
    result = run_cli(lambda: generate(opts, log=lambda m: err.print(m, markup=False, highlight=False)), err)
    table, lines = summary_table(result)
    console = Console(soft_wrap=True)
    console.print(table)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    if result.split is not None:
        console.print(result.split.summary(), markup=False, highlight=False)
    if result.report_files:
        console.print(f"report: {len(result.report_files)} files in {opts.report}", markup=False, highlight=False)

"""``timi generate``: image + instance masks -> 3D scene file (and per-instance meshes, and a report).

The Python entry point is :func:`generate`; the ``timi generate`` command parses its options into
:class:`GenerateOptions` and calls it. Stages (each timed in the end summary): read inputs, load
the model, map the masks onto the condition tokens, denoise (TIMI-guided, progress bar), mesh
(hy3dgen's volume decoding + marching cubes, progress bar), split into instances, write, report.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
from timi_core import defaults
from timi_core.defaults import SMALL_MODEL_BYTES  # noqa: F401  (the --threads rule's size, read by tests)

from .inspect_cmd import prepare_masks
from .io import OutputError, check_mesh_path, check_writable, first_missing, mesh_bytes, write_bytes
from .masks_io import InstanceMasks, check_input_picture
from .pipelines import (BACKENDS, DTYPES, MC_ALGOS, BackendUnavailableError, ModelNotFoundError,  # noqa: F401
                        check_backend, check_mc_algo, is_multiview, load_pipeline, model_config_path, pipeline_depth,
                        resolve_device, resolve_model, turbo_vae_path)

__all__ = ["GenerateOptions", "GenerateResult", "generate", "resolve_model", "ModelNotFoundError", "check_options",
           "prepare_masks", "choose_threads"]

ASSIGN_METHODS = ("projection", "tokens")
#: torch.Generator seeds: 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1


@dataclasses.dataclass
class GenerateOptions:
    """Everything ``timi generate`` accepts (see ``timi generate --help``); the defaults it shares with
    the library (``TIMIPipeline``) come from :mod:`timi_core.defaults`."""

    image: Optional[Path]
    masks: list[Path]
    out: Path
    model: Optional[str] = None
    backend: str = "torch"
    steps: int = defaults.NUM_INFERENCE_STEPS
    guidance_scale: float = defaults.GUIDANCE_SCALE
    seed: int = 0
    alpha: float = 0.1
    sigma: float = 1.5
    guided_layers: int = 4
    guided_steps: Optional[int] = None   # None: the guided_fraction window (the paper's 15 of 50 steps)
    guided_fraction: float = 0.3
    preset: str = "default"           # TIMIConfig.preset: default or paper
    timi: bool = True
    octree_resolution: int = defaults.OCTREE_RESOLUTION
    device: Optional[str] = None
    dtype: str = "auto"
    split_instances: bool = False
    report: Optional[Path] = None
    overlap: str = "error"
    assign: str = "projection"
    progress: bool = True
    threads: Optional[int] = None     # torch intra-op threads; None: choose_threads(model)
    flashvdm: bool = False            # decode with the turbo VAE + FlashVDM (hy3dgen's enable_flashvdm)
    mc_algo: Optional[str] = None     # hy3dgen's surface extractor: mc or dmc
    dense_decoding: bool = False      # decode the whole grid (hy3dgen's) instead of defaults.DECODING
    views: dict = dataclasses.field(default_factory=dict)       # multi-view: {view: picture}
    view_masks: dict = dataclasses.field(default_factory=dict)  # multi-view: {view: mask source}


@dataclasses.dataclass
class GenerateResult:
    out: Path
    mesh: object                       # trimesh.Trimesh of the whole scene
    masks: InstanceMasks
    timings: dict[str, float]
    diagnostics: list
    split: object = None               # timi.instances.InstanceSplit when split_instances / report
    warnings: list[str] = dataclasses.field(default_factory=list)
    report_files: list[Path] = dataclasses.field(default_factory=list)
    latents: object = None             # (1, L, C) torch tensor the mesh was decoded from
    recordings: list = dataclasses.field(default_factory=list)  # timi.report.StepMaps (--report, torch)
    stage_notes: dict[str, str] = dataclasses.field(default_factory=dict)  # what a stage's time covers


def choose_threads(model: str) -> int:
    """The default ``--threads`` for ``model``'s checkpoint (``timi_core.defaults.default_threads``, the
    rule ``TIMIPipeline.from_pretrained`` follows too): 1 for a small one, else all usable cores."""
    p = Path(model).expanduser()
    config = model_config_path(model)  # a folder, or an id's local copy under $HY3DGEN_MODELS
    folder = config.parent if config is not None else p
    files = [p] if p.is_file() else [*folder.glob("model*.safetensors"), *folder.glob("model*.ckpt")] if folder.is_dir() else []
    return defaults.default_threads(max((f.stat().st_size for f in files), default=None))


class _Clock:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t


def _config(opts: GenerateOptions):
    from timi_core import TIMIConfig

    from .pipelines import family_preset

    cfg = TIMIConfig.preset(family_preset(opts.model, opts.preset), alpha=opts.alpha, sigma=opts.sigma, guided_layers=opts.guided_layers,
                            guided_steps=opts.guided_steps, guided_fraction=opts.guided_fraction)
    return cfg if opts.timi else cfg.replace(isg=False)


def check_options(opts: GenerateOptions) -> tuple[Path, str]:
    """Every check that needs no model: options, output paths (probed, nothing left behind), the
    picture, the model argument. Returns (output path, model). Raises the bad-input errors."""
    check_settings(opts)
    out = check_writable(check_mesh_path(opts.out))
    if opts.report is not None:
        if Path(opts.report).exists() and not Path(opts.report).is_dir():
            raise OutputError(f"{opts.report}: --report needs a folder, and this is a file; pass a folder name.")
        check_writable(opts.report, folder=True)
    resolve_device(opts.device)
    if opts.views:
        _check_views(opts)
    else:
        check_input_picture(opts.image, opts.masks)
    return out, check_model(opts)


def check_settings(opts: GenerateOptions) -> None:
    """The options' own checks (choices, numbers, backend), none of a path: what a batch checks once."""
    from timi_core import PRESETS

    for name, value, choices in (("--assign", opts.assign, ASSIGN_METHODS), ("--backend", opts.backend, BACKENDS),
                                 ("--preset", opts.preset, tuple(PRESETS)),
                                 ("--dtype", opts.dtype, DTYPES)):
        if value not in choices:
            raise ValueError(f"{name} {value!r}: choose one of {', '.join(choices)}.")
    check_backend(opts.backend)  # fail early when the JAX adapter cannot sample
    check_mc_algo(opts.mc_algo)
    for name, value, lo in (("--steps", opts.steps, 1), ("--octree-resolution", opts.octree_resolution, 8),
                            ("--guided-layers", opts.guided_layers, 1),
                            ("--guided-steps", 0 if opts.guided_steps is None else opts.guided_steps, 0),
                            ("--threads", 1 if opts.threads is None else opts.threads, 1)):
        if value < lo:
            raise ValueError(f"{name} {value}: must be at least {lo}.")
    check_fits(opts.octree_resolution, opts.steps, opts.device)
    if not (math.isfinite(opts.guided_fraction) and 0 <= opts.guided_fraction <= 1):
        raise ValueError(f"--guided-fraction {opts.guided_fraction}: must be a number from 0 to 1 (paper: 0.3).")
    if not 0 <= opts.seed <= MAX_SEED:
        raise ValueError(f"--seed {opts.seed}: must be a whole number from 0 to {MAX_SEED} (2^64 - 1).")
    for name, value in (("--guidance-scale", opts.guidance_scale), ("--alpha", opts.alpha), ("--sigma", opts.sigma)):
        if not math.isfinite(value):
            raise ValueError(f"{name} {value}: must be a finite number.")


def check_fits(octree_resolution: int, steps: int, device=None) -> None:
    """``--octree-resolution`` and ``--steps`` whose memory estimate exceeds what is available here
    (:func:`timi_torch.memory.check_memory`): refused before anything is allocated (a ``ValueError``)."""
    from timi_torch.memory import check_memory

    check_memory(octree_resolution, steps, device, names=("--octree-resolution ", "--steps "))


def check_model(opts: GenerateOptions) -> str:
    """``--model`` resolved, and checked against the input form (one picture or views) and ``--flashvdm``."""
    model = resolve_model(opts.model)
    if opts.views and model_config_path(model) is not None and not is_multiview(model):
        raise ValueError(f"--view: --model {model} takes one picture (its image processor is not hy3dgen's "
                         "MVImageProcessorV2); pass IMAGE --masks ..., or a multi-view model (Hunyuan3D-2mv).")
    if not opts.views and is_multiview(model):
        raise ValueError(f"--model {model} is multi-view (Hunyuan3D-2mv): pass the pictures as --view front=a.png "
                         "--view left=b.png with --view-masks front=... --view-masks left=...")
    if opts.flashvdm:
        turbo_vae_path(model)
    return model


def _check_views(opts: GenerateOptions) -> None:
    """The multi-view form: pictures and mask sources per view, the same views, nothing single-view."""
    from .masks_io import MaskFileNotFoundError, read_image_size

    if opts.image is not None or opts.masks:
        raise ValueError("--view: give the pictures as --view NAME=PICTURE only, not also IMAGE / --masks.")
    if set(opts.view_masks) != set(opts.views):
        raise ValueError(f"--view-masks: give one mask source per view; views {sorted(opts.views)}, "
                         f"masks for {sorted(opts.view_masks)}.")
    for flag, on in (("--split-instances", opts.split_instances), ("--report", opts.report is not None),
                     ("--assign tokens", opts.assign == "tokens")):
        if on:
            raise ValueError(f"{flag} takes one picture; it is not available with --view (multi-view input).")
    for view, picture in opts.views.items():
        read_image_size(picture)
        if not Path(opts.view_masks[view]).exists():
            raise MaskFileNotFoundError(f"{opts.view_masks[view]}: mask source of view {view!r} not found; check the path.")


def parse_views(items: Optional[list[str]], flag: str = "--view") -> dict:
    """``NAME=PATH`` items -> ``{NAME: Path}`` (each view once)."""
    out: dict = {}
    for item in items or []:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: write it as VIEW=PATH, e.g. {flag} front=front.png.")
        if name in out:
            raise ValueError(f"{flag} {name}: given twice; one {flag} per view.")
        out[name] = Path(path)
    return out


def generate(opts: GenerateOptions, log=print, check=None, load=None) -> GenerateResult:
    """Run the whole command. Raises :class:`MaskInputError`, :class:`OutputError`,
    :class:`ModelNotFoundError`, ``ValueError`` for bad input (all before the model loads) and
    ``RuntimeError`` for failures while running. Nothing is written unless the run succeeds.

    ``check``: called with no arguments after every denoising step and between the stages; what it
    raises stops the run there (``timi app``: cancel, a lost client, ``--max-run-seconds``).
    ``load(opts, model)``: gives the pipeline, after the inputs are checked (default :func:`load_for`;
    a batch, :mod:`timi.batch`, loads it once for all its scenes)."""
    from timi_torch.pipeline import torch_threads

    out, model = check_options(opts)
    with torch_threads(opts.threads or choose_threads(model)):
        return _generate(opts, out, model, log, check or (lambda: None), load or load_for)


def load_for(opts: GenerateOptions, model: str):
    """The pipeline ``opts`` run on (the one door, :func:`timi.pipelines.load_pipeline`)."""
    return load_pipeline(model, backend=opts.backend, device=opts.device, dtype=opts.dtype, config=_config(opts),
                         flashvdm=opts.flashvdm, mc_algo=opts.mc_algo, threads=opts.threads,
                         decoding="dense" if opts.dense_decoding else defaults.DECODING)


def _view_masks(opts: GenerateOptions, model: str):
    """Multi-view inputs checked with the model's geometry (no weights): (instances, condition masks, notes)."""
    import timi_torch

    from .masks_io import MaskInputError
    from .pipelines import geometry_pipeline

    pictures = {v: str(p) for v, p in opts.views.items()}
    sources = {v: str(p) for v, p in opts.view_masks.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cond = timi_torch.condition_token_masks(pictures, sources, geometry_pipeline(model))
        except ValueError as e:
            raise MaskInputError(f"--view-masks: {e}") from None
    first = next(iter(cond.views.values()))
    found = InstanceMasks(first.frame_masks, list(cond.names), [sources[v] for v in cond.views][:1] * cond.num_instances)
    notes = []
    if cond.num_instances == 1 and opts.timi:
        notes.append("only one instance mask: TIMI's separation loss has nothing to separate (Eq.4); pass one mask per object.")
    return found, cond, notes


def _generate(opts: GenerateOptions, out: Path, model: str, log, check, load) -> GenerateResult:
    clock = _Clock()
    # 1. the inputs, checked with the model's geometry (its config.yaml) before any weight loads; the
    #    condition masks computed here are the loaded model's own (the same geometry, from the same file)
    with clock.stage("inputs"):
        if opts.views:
            found, cond_preview, notes = _view_masks(opts, model)
        else:
            found, cond_preview, notes = prepare_masks(opts.image, opts.masks, model, opts.overlap, opts.timi)
    for n in notes:
        log(f"warning: {n}")

    def note(message: str) -> None:  # a warning found later: in the result's warnings, and shown once, now
        notes.append(message)
        log(f"warning: {message}")

    log(f"{found.count} instance(s): " + ", ".join(found.names) + f"; condition grid {cond_preview.grid[0]}x{cond_preview.grid[1]}")

    import torch
    import timi_torch
    from timi_torch.frontend import NoSurfaceError, export_meshes

    # 2. the pipeline (the one door), and the masks on its condition tokens
    with clock.stage("load model"):
        pipe = load(opts, model)
    cond = cond_preview
    if model_config_path(model) is None and not opts.views:  # the preview used Hunyuan3D 2.0's geometry: the model's own now
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*only one instance mask.*")  # already in the notes
            cond = timi_torch.condition_token_masks(str(opts.image), found.masks, pipe.base, names=found.names)

    depth = pipeline_depth(pipe)
    if opts.timi and opts.guided_layers > depth:
        note(f"--guided-layers {opts.guided_layers} exceeds the model's {depth} double-stream blocks; guiding all {depth}.")
    if opts.timi and pipe.num_guided_steps(opts.steps, _config(opts)) == 0:
        asked = (f"--guided-steps {opts.guided_steps}" if opts.guided_steps is not None
                 else f"--guided-fraction {opts.guided_fraction:g}")
        note(f"{asked} guides no step: this run is plain hy3dgen sampling (TIMI guidance off), as asked; "
             "drop it for the paper's window (the first 30 % of the steps); --no-timi turns guidance off on purpose.")
    recorder = None
    if opts.report is not None:
        if opts.backend == "jax":
            note("--backend jax: the report has no instance maps (they are recorded from the torch DiT).")
        else:
            from .report import AttentionRecorder

            recorder = AttentionRecorder(cond.tokens, layers=min(opts.guided_layers, depth),
                                         steps=max(pipe.num_guided_steps(opts.steps, _config(opts).replace(isg=True)), 1))

    # 3. denoise (either backend, one call)
    check()
    step_check = {} if opts.backend == "jax" else {"callback": lambda step, t, outputs: check()}
    generator = torch.Generator(device=resolve_device(opts.device)).manual_seed(opts.seed)
    with clock.stage("denoise"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*guided_layers.*exceeds.*")
        warnings.filterwarnings("ignore", message=".*only one instance mask.*")
        output = pipe(cond.image if opts.views else str(opts.image), cond, num_inference_steps=opts.steps,
                      guidance_scale=opts.guidance_scale, generator=generator, output_type="latent",
                      enable_pbar=opts.progress, recorder=recorder, config=_config(opts), **step_check)
    latents = output.latents
    check()

    # 4. mesh (the shared back end)
    with clock.stage("mesh"):
        try:
            meshes = export_meshes(pipe.base, latents, "trimesh", octree_resolution=opts.octree_resolution,
                                   mc_algo=opts.mc_algo, enable_pbar=opts.progress)
        except NoSurfaceError:
            meshes = []
        mesh = meshes[0] if meshes else None
        if mesh is None or len(mesh.faces) == 0:
            raise RuntimeError(
                f"surface extraction found no surface (octree resolution {opts.octree_resolution}); "
                "try another --seed or a higher --octree-resolution."
            )

    check()
    # 5. split into instances
    split = None
    if opts.split_instances or opts.report is not None:
        from .instances import split_instances, split_instances_by_tokens

        with clock.stage("split"):
            if opts.assign == "tokens":
                split = split_instances_by_tokens(mesh, pipe, latents, cond, names=found.names)
            else:
                split = split_instances(mesh, found.masks, names=found.names,
                                        foreground=np.asarray(cond.image)[..., 3] > 127)
    # 6. write: the report first, the mesh last; a failure in either leaves neither behind
    with clock.stage("write"):
        scene = mesh
        if opts.split_instances:
            from .instances import instance_scene

            if out.suffix.lower() in (".ply", ".stl"):
                note(f"{out.suffix} holds one mesh, so the instance nodes are merged; use .glb or .obj to keep them.")
            scene = instance_scene(split)
        data = mesh_bytes(scene, out)
    result = GenerateResult(out, mesh, found, clock.timings, list(output.diagnostics), split, notes, latents=latents,
                            recordings=list(output.recordings or []),
                            stage_notes=stage_notes(opts, pipe, len(output.diagnostics), depth))
    report = Path(opts.report) if opts.report is not None else None
    created = first_missing(report) if report is not None else None
    try:
        if report is not None:
            from .report import write_report

            with clock.stage("report"):
                write_report(report, opts, result, cond, files=result.report_files)
        with clock.stage("write"):
            write_bytes(out, data)
    except BaseException:
        _remove(result.report_files, created)
        raise
    return result


def stage_notes(opts: GenerateOptions, pipe, guided: int, depth: int) -> dict[str, str]:
    """What the denoise and mesh stages' times cover (issue 38): how many steps TIMI guided and through
    how many of the DiT's blocks each guided step differentiates, which sets TIMI's cost (a few of
    the full-size DiT's 48 blocks: about 1.03x plain sampling; 4 of the shipped model's 5: well above),
    and the decoding."""
    model = getattr(getattr(pipe, "base", None), "model", None)
    blocks = sum(len(getattr(model, name, ())) for name in ("double_blocks", "single_blocks", "blocks")) or depth
    if guided:
        denoise = (f"{opts.steps} steps, {guided} TIMI-guided: each differentiates through the first "
                   f"{min(opts.guided_layers, depth)} of the DiT's {blocks} blocks")
    else:
        denoise = f"{opts.steps} steps, none guided (plain hy3dgen sampling)"
    decoding = "flashvdm" if opts.flashvdm else "dense" if opts.dense_decoding else defaults.DECODING
    return {"inputs": "read and check the picture and masks (and import torch, hy3dgen)", "denoise": denoise,
            "mesh": f"{decoding} decoding, octree {opts.octree_resolution}"}


def _remove(files: list[Path], folder: Optional[Path]) -> None:
    for f in files:
        Path(f).unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ CLI


def summary_table(result: GenerateResult):
    """A rich table: time per stage and what it covers, instances found, unclaimed parts, L_sep first -> last."""
    from rich.table import Table

    t = Table(title=f"timi generate -> {result.out}", show_header=True)
    t.add_column("stage")
    t.add_column("time", justify="right")
    t.add_column("what")
    for name, sec in result.timings.items():
        t.add_row(name, f"{sec:.2f} s", result.stage_notes.get(name, ""))
    t.add_row("total", f"{sum(result.timings.values()):.2f} s", "", style="bold")
    lines = [f"instances given: {result.masks.count} ({', '.join(result.masks.names)})",
             f"mesh: {len(result.mesh.vertices)} vertices, {len(result.mesh.faces)} faces"]
    if result.split is not None:
        lines.append(f"instances found: {result.split.found}/{result.masks.count} "
                     f"({len(result.split.parts)} connected parts, {len(result.split.unclaimed)} unclaimed)")
    if result.diagnostics:
        d0, d1 = result.diagnostics[0], result.diagnostics[-1]
        lines.append(f"L_sep: {d0.loss[0]:.4f} (step {d0.step}) -> {d1.loss[0]:.4f} (step {d1.step}), "
                     f"{len(result.diagnostics)} guided steps")
    else:
        lines.append("TIMI guidance: off")
    return t, lines

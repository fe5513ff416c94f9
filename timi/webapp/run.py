"""What the page's buttons do, without Gradio: the same functions as ``timi inspect`` and
``timi generate``, on files in folders of the app's own.

* :func:`save_picture` - an uploaded picture, checked as the command line checks ``IMAGE``;
* :func:`preview` - the masks through :func:`timi.inspect_cmd.prepare_masks` (the checks and
  warnings of ``timi inspect`` / ``timi generate``) and its picture :func:`timi.inspect_cmd.overlay_figure`;
* :func:`masks_from_files` - uploaded mask files, read by the command line's reader;
* :func:`run` - :func:`timi.generate.generate` (``--split-instances``, optionally ``--report``, and a
  ``--no-timi`` run with the same seed for the side-by-side), in a new folder per run, plus one GLB
  per instance for download;
* :func:`page_options` - the page's settings checked against this server's bounds (:class:`AppConfig`);
* :func:`prune` - the app's folder kept small: the last runs, pictures of the last day;
* :func:`page_error` - an exception as the one line the command line prints, without server paths
  and with the page's names for the settings instead of the command line's flags.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..cli_common import error_line
from ..generate import GenerateOptions, generate, load_for, summary_table
from ..inspect_cmd import overlay_figure, prepare_masks, save_figure
from ..masks_io import MaskInputError, check_input_picture
from .masks import labels_from_masks, write_masks_json

__all__ = ["AppConfig", "PAGE_OPTIONS", "PAGE_LABELS", "page_defaults", "page_options", "open_picture", "save_picture",
           "Preview", "preview", "masks_from_files", "RunOutput", "RunStopped", "run", "prune", "page_error", "MAX_PIXELS",
           "MAX_OCTREE", "STOPPED_LINE", "stop_runs"]

log = logging.getLogger("timi.app")

#: The ``timi generate`` options the page offers (their defaults are ``GenerateOptions``'s).
PAGE_OPTIONS = ("timi", "seed", "steps", "guidance_scale", "alpha", "sigma", "guided_layers", "guided_steps",
                "octree_resolution")
#: The page's names of the settings (its labels), used in its error lines instead of the flags.
PAGE_LABELS = {"timi": "TIMI guidance", "seed": "seed", "steps": "steps", "guidance_scale": "guidance scale",
               "alpha": "alpha", "sigma": "sigma", "guided_layers": "guided layers", "guided_steps": "guided steps",
               "octree_resolution": "octree resolution"}
#: The largest picture the page takes (width x height), besides the upload size limit.
MAX_PIXELS = 4096 * 4096
#: The highest octree resolution ``--max-octree`` may allow (512: ~3 GB for meshing; 1024 needs ~24 GiB).
MAX_OCTREE = 512
#: The status line of a run stopped by its user (cancel, or the page closed).
STOPPED_LINE = "stopped: the run was cancelled; nothing was written."


def page_defaults(cfg: "Optional[AppConfig]" = None) -> dict:
    """{option: default} for :data:`PAGE_OPTIONS`, read from :class:`timi.generate.GenerateOptions`;
    with ``cfg``, steps and octree resolution at most its bounds (so every default runs as is)."""
    fields = {f.name: f.default for f in dataclasses.fields(GenerateOptions)}
    found = {k: fields[k] for k in PAGE_OPTIONS}
    if cfg is not None:
        found["steps"] = min(found["steps"], cfg.max_steps)
        found["octree_resolution"] = min(found["octree_resolution"], cfg.max_octree)
    return found


@dataclasses.dataclass
class AppConfig:
    """Everything that comes from the command line (never from the page)."""

    model: str                         # resolved (timi.pipelines.resolve_model)
    workdir: Path                      # the app's folder: one sub-folder per picture and per run
    device: Optional[str] = None
    backend: str = "torch"
    threads: Optional[int] = None
    sam: object = None                 # timi.webapp.sam.SamClicker when --sam-checkpoint was given
    max_steps: int = 50                # --max-steps: the most sampling steps a run may ask for
    max_octree: int = 384              # --max-octree: the highest octree resolution (at most MAX_OCTREE)
    max_run_seconds: Optional[float] = 900.0   # --max-run-seconds: a run is stopped after this (None: no limit)
    keep_runs: int = 20                # --keep-runs: run folders kept in the work folder (the newest)
    runs_per_client: int = 2           # --runs-per-client: runs queued or running per page session
    max_queued_runs: int = 4           # --max-queued-runs: runs waiting, all sessions together
    picture_hours: float = 24.0        # picture folders older than this are removed (a page session's lifetime)
    running: set = dataclasses.field(default_factory=set)   # the stop flags of the runs under way (stop_runs)


def new_folder(cfg: AppConfig, prefix: str) -> Path:
    """A fresh folder under the app's workdir (so runs never share outputs)."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=cfg.workdir))


def _too_large(w, h) -> MaskInputError:
    return MaskInputError(f"the picture is {w}x{h}; the page takes at most 4096x4096 pixels - make it smaller "
                          "(hy3dgen works at 512 px anyway).")


def open_picture(path, name: str = "the upload") -> Image.Image:
    """An uploaded file as a decoded picture, its size checked from the header before any pixel is
    decoded (Pillow reads the size lazily). One-line errors naming ``name`` (the upload's own file
    name, never the server's path) for a file that is no picture, a decompression bomb, a picture
    above :data:`MAX_PIXELS` and a truncated or damaged one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MaskInputError(f"{name}: the picture has over {Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); "
                             "the page takes at most 4096x4096 pixels - make it smaller.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise MaskInputError(f"{name}: not a picture this page can read; upload a PNG or JPEG picture.") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise _too_large(w, h)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        img.close()
        raise MaskInputError(f"{name}: the picture is damaged or cut short ({' '.join(str(e).split())}); "
                             "save it again as PNG and upload that.") from None
    return img


def save_picture(picture, folder: Path) -> Path:
    """An uploaded picture -> ``folder/picture.png`` (alpha kept), checked as ``timi generate`` checks
    its ``IMAGE`` (:func:`timi.masks_io.check_input_picture`). ``picture``: Gradio's file data (a dict
    with ``path`` and ``orig_name``: opened by :func:`open_picture`), a file path, a PIL image or an array."""
    name = "the upload"
    if isinstance(picture, dict):
        name = Path(picture.get("orig_name") or "the upload").name
        picture = picture.get("path")
        if picture is None:
            raise MaskInputError("the upload has no file; upload the picture again.")
    if isinstance(picture, (str, Path)):
        img = open_picture(picture, name)
    else:
        img = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise _too_large(w, h)
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    path = Path(folder) / "picture.png"
    img.save(path)
    check_input_picture(path, hint="upload the picture itself; its masks go in the paint or upload tab")
    return path


def _masks_file(labels, path: Path, names) -> Path:
    """The page's masks as a file ``timi generate --masks`` reads (:func:`write_masks_json`)."""
    found = write_masks_json(labels, path, names)
    if found is None:
        raise MaskInputError("no instance masks yet; propose, paint, upload or click them first.")
    return found


@dataclasses.dataclass
class Preview:
    count: int
    names: list[str]
    notes: list[str]
    figure: Path            # the masks on the condition-token grid (``timi inspect``'s picture)


def preview(image: Path, labels: np.ndarray, names: Sequence[str], cfg: AppConfig, folder: Path,
            timi: bool = True) -> Preview:
    """The masks as ``timi generate`` will see them: written as a mask file, read and checked by
    :func:`prepare_masks` against the model's geometry, drawn by :func:`overlay_figure`."""
    masks = _masks_file(labels, Path(folder) / "masks.json", names)
    found, cond, notes = prepare_masks(image, [masks], cfg.model, "error", timi)
    fig = overlay_figure(cond, found.names, title=f"{found.count} instances on the condition tokens")
    return Preview(found.count, list(found.names), list(notes), save_figure(fig, Path(folder) / "masks_on_tokens.png"))


def masks_from_files(image: Path, files: Sequence[str | Path], cfg: AppConfig, overlap: str = "error"):
    """Uploaded mask files (every format ``timi generate --masks`` reads; several files = one
    instance each) -> (labels, names, notes), checked by :func:`prepare_masks`."""
    files = [Path(f) for f in files]
    if not files:
        raise MaskInputError("no mask files uploaded; add a label map, mask PNGs, an .npy or an RLE .json.")
    for f in files:       # mask pictures: the size from the header first, as for the picture
        if f.suffix.lower() not in (".npy", ".json"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    with Image.open(f) as img:
                        w, h = img.size
                except Image.DecompressionBombError:
                    raise MaskInputError(f"{f.name}: over {Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); a "
                                         "mask has the picture's size (at most 4096x4096).") from None
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                    continue        # the command line's reader says what is wrong with it
            if w * h > MAX_PIXELS:
                raise MaskInputError(f"{f.name}: {w}x{h} pixels; a mask has the picture's size (at most 4096x4096).")
    found, _, notes = prepare_masks(image, files if len(files) > 1 else files[0], cfg.model, overlap, True)
    return labels_from_masks(found.masks), list(found.names), list(notes)


@dataclasses.dataclass
class RunOutput:
    folder: Path
    scene: Path                         # GLB, one coloured node per instance
    instances: list[Path]               # one GLB per instance that got geometry (and ``unclaimed``)
    pictures: list[tuple[Path, str]]    # report pictures with captions
    lines: list[str]                    # ``timi generate``'s summary lines and warnings
    base_scene: Optional[Path] = None   # the --no-timi run (side by side), when asked
    base_pictures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


_CAPTIONS = {"views.png": "views", "guidance.png": "L_sep, lambda, purity", "masks_on_tokens.png": "masks on tokens"}


def _pictures(report: Path, tag: str) -> list[tuple[Path, str]]:
    files = sorted(report.glob("*.png")) if report.is_dir() else []
    return [(p, f"{tag}: {_CAPTIONS.get(p.name, p.stem.replace('_', ' '))}") for p in files]


def _instance_files(result, folder: Path) -> list[Path]:
    """One GLB per node of the scene ``timi generate --split-instances`` wrote (the same coloured
    nodes, :func:`timi.instances.instance_scene`)."""
    from ..instances import instance_scene
    from ..io import write_mesh

    scene = instance_scene(result.split)
    return [write_mesh(scene.geometry[name], folder / f"{name}.glb") for name in scene.graph.nodes_geometry
            if name in scene.geometry]


class RunStopped(RuntimeError):
    """A run stopped before its end: cancelled, its client gone, or over ``--max-run-seconds``."""


def page_options(params: dict, cfg: AppConfig) -> dict:
    """The page's settings (keys of :data:`PAGE_OPTIONS`) -> ``GenerateOptions`` keywords, the paper's
    defaults for the rest, checked against this server's bounds (:class:`AppConfig`), so an API call
    cannot ask for more than the page offers. Empty guided steps: the paper's fraction of the steps."""
    defaults = page_defaults(cfg)
    opts = {**defaults, **{k: v for k, v in params.items() if k in PAGE_OPTIONS}}
    if isinstance(opts["guided_steps"], str):          # the page's text box: empty, or a whole number
        text = opts["guided_steps"].strip()
        if text and not text.isdigit():
            raise ValueError(f"guided steps {text!r}: enter a whole number, or leave it empty for the paper's first 30 %.")
        opts["guided_steps"] = int(text) if text else None
    for k, v in opts.items():
        if v is None and k != "guided_steps":
            raise ValueError(f"{PAGE_LABELS[k]} is empty; enter a value (default: {defaults[k]}).")
    for k in ("seed", "steps", "guided_layers", "guided_steps", "octree_resolution"):
        if isinstance(opts[k], float):
            if not opts[k].is_integer():
                raise ValueError(f"--{k.replace('_', '-')} {opts[k]}: must be a whole number.")
            opts[k] = int(opts[k])
    for k, hi in (("steps", cfg.max_steps), ("octree_resolution", cfg.max_octree), ("guided_steps", cfg.max_steps)):
        if opts[k] is not None and opts[k] > hi:
            raise ValueError(f"--{k.replace('_', '-')} {opts[k]}: this server allows at most {hi}; choose a lower value.")
    return opts


def _checker(cfg: AppConfig, stop: Optional[threading.Event]):
    """The check :func:`timi.generate.generate` calls at every step: raises :class:`RunStopped` once
    ``stop`` is set or the run is over ``cfg.max_run_seconds``."""
    limit = cfg.max_run_seconds
    deadline = time.monotonic() + limit if limit else None

    def check():
        if stop is not None and stop.is_set():
            raise RunStopped(STOPPED_LINE)
        if deadline is not None and time.monotonic() > deadline:
            raise RunStopped(f"the run took longer than {limit:g} s, this server's limit, and was stopped; "
                             "nothing was written - use fewer steps or a lower octree resolution.")
    return check


def run(image: Path, labels: np.ndarray, names: Sequence[str], params: dict, cfg: AppConfig, *,
        report: bool = True, compare: bool = False, progress: Callable[[float, str], None] | None = None,
        stop: Optional[threading.Event] = None) -> RunOutput:
    """``timi generate IMAGE --masks masks.json --split-instances [--report]`` with the page's options
    (keys of :data:`PAGE_OPTIONS`, checked by :func:`page_options`), in a new folder; ``compare`` adds
    the same run with ``--no-timi``. ``stop`` (set: cancelled) and ``cfg.max_run_seconds`` are
    checked at every denoising step; a run that stops raises :class:`RunStopped` and leaves no folder."""
    say = progress or (lambda f, d: None)
    opts = page_options(params, cfg)
    stop = threading.Event() if stop is None else stop
    check = _checker(cfg, stop)
    folder = new_folder(cfg, "run-")
    cfg.running.add(stop)
    try:
        masks = _masks_file(labels, folder / "masks.json", names)
        lines: list[str] = []
        say(0.0, "TIMI" if opts["timi"] else "plain hy3dgen sampling")
        result = _generate(image, masks, folder, "scene.glb", opts, cfg, report, lines, check)
        out = RunOutput(folder, result.out, _instance_files(result, folder / "instances"),
                        _pictures(folder / "report", "TIMI" if opts["timi"] else "no TIMI"), lines)
        if compare and opts["timi"]:
            say(0.5, "the same seed without TIMI")
            lines.append("--- the same seed without TIMI ---")
            base = _generate(image, masks, folder / "base", "scene.glb", {**opts, "timi": False}, cfg, report, lines,
                             check)
            out.base_scene = base.out
            out.base_pictures = _pictures(folder / "base" / "report", "no TIMI")
        check()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)   # a failed or stopped run leaves nothing behind
        raise
    finally:
        cfg.running.discard(stop)
    say(1.0, "done")
    prune(cfg, keep=folder)
    return out


def stop_runs(cfg: AppConfig, timeout: float = 30.0) -> bool:
    """Stop the runs under way (the app is closing) and wait up to ``timeout`` s for them to end;
    whether they did. Each ends at its next step and removes its folder."""
    for flag in list(cfg.running):
        flag.set()
    end = time.monotonic() + timeout
    while cfg.running and time.monotonic() < end:
        time.sleep(0.05)
    return not cfg.running


def prune(cfg: AppConfig, keep: Optional[Path] = None) -> list[Path]:
    """Remove all but the newest ``cfg.keep_runs`` run folders and the picture folders older than
    ``cfg.picture_hours`` (never ``keep``); returns what was removed. The page has its copies of a
    run's files (Gradio's cache), so an old run folder is no longer needed."""
    if not cfg.workdir.is_dir():
        return []
    runs = sorted(cfg.workdir.glob("run-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    old = time.time() - cfg.picture_hours * 3600
    gone = [p for p in runs[max(cfg.keep_runs, 1):] if p != keep]
    gone += [p for p in cfg.workdir.glob("picture-*") if p.stat().st_mtime < old and p != keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


class PipelineCache:
    """The app's pipeline, loaded by the first run and kept for the next ones (runs go one at a
    time: the run button's concurrency limit is 1). A run whose loading settings differ (model,
    backend, device, dtype, decoding) replaces it, so at most one model is held."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key, self._pipe = None, None
        self.loads = 0

    def load(self, opts: GenerateOptions, model: str):
        key = (model, opts.backend, opts.device, opts.dtype, opts.flashvdm, opts.mc_algo, opts.dense_decoding)
        with self._lock:
            if key != self._key:
                self._key, self._pipe = None, None           # free the old model before loading another
                self._pipe, self._key = load_for(opts, model), key
                self.loads += 1
            return self._pipe


PIPELINES = PipelineCache()


def _generate(image, masks, folder: Path, name: str, opts: dict, cfg: AppConfig, report: bool, lines: list, check=None):
    gen = GenerateOptions(image=Path(image), masks=[Path(masks)], out=folder / name, model=cfg.model,
                          backend=cfg.backend, device=cfg.device, threads=cfg.threads, split_instances=True,
                          report=folder / "report" if report else None, progress=True, **opts)
    result = generate(gen, log=lambda m: lines.append(m), check=check, load=PIPELINES.load)  # warnings included
    lines += summary_table(result)[1]
    lines += result.split.summary().splitlines()
    return result


#: An absolute path (POSIX): shown on the page as its last part only.
_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/:;,'\"()\[\]]+/)+([^\s/:;,'\"()\[\]]+)")
_FLAG = re.compile(r"--([a-z][a-z-]*)")


def for_page(text: str) -> str:
    """A line of the command line's as the page shows it: absolute paths (server folders, uploads
    in Gradio's cache) cut to their file name, the page's settings by their labels, not flags."""
    text = _PATH.sub(lambda m: m.group(1), text)
    return _FLAG.sub(lambda m: PAGE_LABELS.get(m.group(1).replace("-", "_"), m.group(0)), text)


def page_error(exc: BaseException) -> str:
    """The one line for the page: the command line's (:func:`timi.cli_common.error_line`) for bad
    input and failures while running, through :func:`for_page`; a stopped run's line as it is;
    anything else is logged with its traceback on the server's console and shown as one line naming it."""
    if isinstance(exc, RunStopped) and str(exc) == STOPPED_LINE:
        return STOPPED_LINE
    found = error_line(exc)
    if found is not None:
        return for_page(found[0])
    log.exception("timi app: unexpected error")
    return for_page(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
                    "(the server's console has the details).")

"""What the page's buttons do, without Gradio: the same functions as ``timi inspect`` and
``timi generate``, on files in folders of the app's own.

* :func:`save_picture` - an uploaded picture, checked as the command line checks ``IMAGE``;
* :func:`preview` - the masks through :func:`timi.inspect_cmd.prepare_masks` (the checks and
  warnings of ``timi inspect`` / ``timi generate``) and its picture :func:`timi.inspect_cmd.overlay_figure`;
* :func:`masks_from_files` - uploaded mask files, read by the command line's reader;
* :func:`run` - :func:`timi.generate.generate` (``--split-instances``, optionally ``--report``, and a
  ``--no-timi`` run with the same seed for the side-by-side), in a new folder per run, plus one GLB
  per instance for download;
* :func:`page_error` - an exception as the one line the command line prints.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from ..cli_common import error_line
from ..generate import GenerateOptions, generate, summary_table
from ..inspect_cmd import overlay_figure, prepare_masks, save_figure
from ..masks_io import MaskInputError, check_input_picture
from .masks import labels_from_masks, write_masks_json

__all__ = ["AppConfig", "PAGE_OPTIONS", "page_defaults", "save_picture", "Preview", "preview", "masks_from_files",
           "RunOutput", "run", "page_error", "MAX_PIXELS"]

log = logging.getLogger("timi.app")

#: The ``timi generate`` options the page offers (their defaults are ``GenerateOptions``'s: the paper's).
PAGE_OPTIONS = ("timi", "seed", "steps", "guidance_scale", "alpha", "sigma", "guided_layers", "guided_steps",
                "octree_resolution")
#: The largest picture the page takes (width x height), besides the upload size limit.
MAX_PIXELS = 4096 * 4096


def page_defaults() -> dict:
    """{option: default} for :data:`PAGE_OPTIONS`, read from :class:`timi.generate.GenerateOptions`."""
    fields = {f.name: f.default for f in dataclasses.fields(GenerateOptions)}
    return {k: fields[k] for k in PAGE_OPTIONS}


@dataclasses.dataclass
class AppConfig:
    """Everything that comes from the command line (never from the page)."""

    model: str                         # resolved (timi.pipelines.resolve_model)
    workdir: Path                      # the app's folder: one sub-folder per picture and per run
    device: Optional[str] = None
    backend: str = "torch"
    threads: Optional[int] = None
    sam: object = None                 # timi.webapp.sam.SamClicker when --sam-checkpoint was given


def new_folder(cfg: AppConfig, prefix: str) -> Path:
    """A fresh folder under the app's workdir (so runs never share outputs)."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=cfg.workdir))


def save_picture(picture, folder: Path) -> Path:
    """An uploaded picture (PIL image or array) -> ``folder/picture.png`` (alpha kept), checked as
    ``timi generate`` checks its ``IMAGE`` (:func:`timi.masks_io.check_input_picture`)."""
    img = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise MaskInputError(f"the picture is {w}x{h}; the page takes at most {MAX_PIXELS // 4096}x4096 pixels - "
                             "make it smaller (hy3dgen works at 512 px anyway).")
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    path = Path(folder) / "picture.png"
    img.save(path)
    check_input_picture(path)
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


def run(image: Path, labels: np.ndarray, names: Sequence[str], params: dict, cfg: AppConfig, *,
        report: bool = True, compare: bool = False, progress: Callable[[float, str], None] | None = None) -> RunOutput:
    """``timi generate IMAGE --masks masks.json --split-instances [--report]`` with the page's options
    (keys of :data:`PAGE_OPTIONS`), in a new folder; ``compare`` adds the same run with ``--no-timi``."""
    say = progress or (lambda f, d: None)
    folder = new_folder(cfg, "run-")
    masks = _masks_file(labels, folder / "masks.json", names)
    opts = {**page_defaults(), **{k: v for k, v in params.items() if k in PAGE_OPTIONS}}
    for k in ("seed", "steps", "guided_layers", "guided_steps", "octree_resolution"):
        if isinstance(opts[k], float):
            if not opts[k].is_integer():
                raise ValueError(f"--{k.replace('_', '-')} {opts[k]}: must be a whole number.")
            opts[k] = int(opts[k])
    lines: list[str] = []
    say(0.0, "TIMI" if opts["timi"] else "plain hy3dgen sampling")
    result = _generate(image, masks, folder, "scene.glb", opts, cfg, report, lines)
    out = RunOutput(folder, result.out, _instance_files(result, folder / "instances"),
                    _pictures(folder / "report", "TIMI" if opts["timi"] else "no TIMI"), lines)
    if compare and opts["timi"]:
        say(0.5, "the same seed without TIMI")
        lines.append("--- the same seed without TIMI (--no-timi) ---")
        base = _generate(image, masks, folder / "base", "scene.glb", {**opts, "timi": False}, cfg, report, lines)
        out.base_scene = base.out
        out.base_pictures = _pictures(folder / "base" / "report", "no TIMI")
    say(1.0, "done")
    return out


def _generate(image, masks, folder: Path, name: str, opts: dict, cfg: AppConfig, report: bool, lines: list):
    gen = GenerateOptions(image=Path(image), masks=[Path(masks)], out=folder / name, model=cfg.model,
                          backend=cfg.backend, device=cfg.device, threads=cfg.threads, split_instances=True,
                          report=folder / "report" if report else None, progress=True, **opts)
    result = generate(gen, log=lambda m: lines.append(m))
    lines += summary_table(result)[1]
    lines += [f"warning: {w}" for w in result.warnings]
    lines += result.split.summary().splitlines()
    return result


def page_error(exc: BaseException) -> str:
    """The one line for the page: the command line's (:func:`timi.cli_common.error_line`) for bad
    input and failures while running; anything else is logged with its traceback on the server's
    console and shown as one line naming it."""
    found = error_line(exc)
    if found is not None:
        return found[0]
    log.exception("timi app: unexpected error")
    return f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} (the server's console has the details)."

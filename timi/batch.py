"""``timi generate`` over many scenes: a folder of scenes or a manifest, here or on a Ray cluster.

Input (docs/usage.md, "Many scenes"):

* a **folder** with one sub-folder per scene holding ``image.png`` and ``masks.png`` or ``masks.npy``
  (the layout of ``timi eval`` datasets and of ``timi testbed scenes``; anything else in a scene
  folder, such as ``gt/``, is ignored): scene ``S`` is written to ``OUT/S.glb``;
* a **manifest**, ``.csv`` (a header line) or ``.jsonl`` (one object per line), with the columns
  ``image``, ``masks`` (one mask source; in JSONL also a list of files) and ``out``, and optionally
  ``seed``; relative paths are resolved against the manifest's folder.

Every scene runs :func:`timi.generate.generate` with the command's options (its seed: the row's,
else ``--seed``), so a scene's mesh is the one ``timi generate IMAGE --masks MASKS --out OUT`` writes.
The pipeline is loaded once per process (local engine) or per worker (``--engine ray``: the
workers of :class:`timi.evaluation.ray_engine.WorkerPool`, as ``timi eval``'s).

Outputs are written atomically (temporary file + rename): an output that exists is complete, so a
rerun skips it (``--overwrite`` generates it again), and the temporary files a killed worker left are
removed before its scene runs again. A scene that fails (an unreadable picture, masks that do not
fit it, no surface) is reported in one line and skipped; the others go on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .io import MESH_FORMATS, remove_stale_temporaries

__all__ = ["BatchItem", "BatchResult", "ManifestError", "MANIFEST_SUFFIXES", "is_batch_input", "read_batch",
           "run_batch"]

#: Manifest formats, by extension.
MANIFEST_SUFFIXES = (".csv", ".jsonl")
#: A manifest's columns: required, then optional.
REQUIRED_COLUMNS = ("image", "masks", "out")
OPTIONAL_COLUMNS = ("seed",)
#: What a folder scene's output is called: ``OUT/<scene>.glb`` (GLB keeps one node per instance).
FOLDER_OUTPUT_SUFFIX = ".glb"


class ManifestError(ValueError):
    """A batch input that cannot be read (exit 2): the line names the file, the row and the fix."""


@dataclass(frozen=True)
class BatchItem:
    """One scene of a batch: ``name`` (its folder's name, or the manifest's ``out`` as written) says
    which in messages and Ray task names; ``seed`` ``None``: the command's ``--seed``."""

    name: str
    image: Path
    masks: tuple[Path, ...]
    out: Path
    seed: Optional[int] = None

    def options(self, template):
        """``template`` (:class:`timi.generate.GenerateOptions`) for this scene."""
        return dataclasses.replace(template, image=self.image, masks=list(self.masks), out=self.out,
                                   seed=template.seed if self.seed is None else self.seed, progress=False)


@dataclass
class BatchResult:
    """What a batch did: scene names generated, skipped (their output existed) and failed (with the reason)."""

    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def is_batch_input(path) -> bool:
    """Whether ``timi generate``'s first argument is many scenes: a folder, or a ``.csv``/``.jsonl`` manifest."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES


# ----------------------------------------------------------------------------------------- reading
def read_batch(source, out=None) -> list[BatchItem]:
    """The scenes of a folder (written to ``out/<scene>.glb``) or of a manifest (``out`` must be ``None``:
    the rows name their outputs). Raises :class:`ManifestError` (one line) for an input that cannot be read."""
    source = Path(source)
    if source.is_dir():
        if out is None or Path(out).is_file():
            raise ManifestError(f"{source}: a folder of scenes needs --out FOLDER (scene S is written to "
                                f"FOLDER/S{FOLDER_OUTPUT_SUFFIX}){'' if out is None else f'; {out} is a file'}.")
        return _scan_folder(source, Path(out))
    if out is not None:
        raise ManifestError(f"{source}: a manifest names each scene's output in its out column; leave --out away.")
    if not source.is_file():
        raise ManifestError(f"{source}: manifest not found; check the path.")
    rows = _read_jsonl(source) if source.suffix.lower() == ".jsonl" else _read_csv(source)
    items = [_item(source, line, row) for line, row in rows]
    if not items:
        raise ManifestError(f"{source}: holds no rows; add one row per scene with {', '.join(REQUIRED_COLUMNS)}.")
    first: dict[Path, int] = {}
    for (line, _), item in zip(rows, items):
        key = item.out.resolve()
        if key in first:
            raise ManifestError(f"{source}, line {line}: writes {item.out} as line {first[key]} does; "
                                "give each row its own out.")
        first[key] = line
    return items


def _scan_folder(folder: Path, out: Path) -> list[BatchItem]:
    from .evaluation.dataset import MASK_FILES, SceneError, discover_scenes

    try:
        scenes = discover_scenes(folder)
    except SceneError:
        raise ManifestError(f"{folder}: holds no scene folders; give one sub-folder per scene with image.png and "
                            f"{' or '.join(MASK_FILES)}, or a manifest ({' or '.join(MANIFEST_SUFFIXES)}).") from None
    items = []
    for scene in scenes:
        masks = next((scene / name for name in MASK_FILES if (scene / name).exists()), scene / MASK_FILES[0])
        items.append(BatchItem(scene.name, (scene / "image.png").absolute(), (masks.absolute(),),
                               (out / f"{scene.name}{FOLDER_OUTPUT_SUFFIX}").absolute()))
    return items


def _columns(source: Path, line: int, names) -> None:
    unknown = [n for n in names if n not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    missing = [n for n in REQUIRED_COLUMNS if n not in names]
    if unknown or missing:
        what = f"unknown column {unknown[0]!r}" if unknown else f"no column {missing[0]!r}"
        raise ManifestError(f"{source}, line {line}: {what}; the columns are {', '.join(REQUIRED_COLUMNS)} "
                            f"and optionally {', '.join(OPTIONAL_COLUMNS)}.")


def _read_csv(source: Path) -> list[tuple[int, dict]]:
    try:
        with source.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ManifestError(f"{source}: empty; the first line names the columns "
                                    f"{', '.join(REQUIRED_COLUMNS)} (and optionally {', '.join(OPTIONAL_COLUMNS)}).")
            _columns(source, 1, [(n or "").strip() for n in reader.fieldnames])
            rows = []
            for row in reader:
                if None in row:  # more fields than columns
                    raise ManifestError(f"{source}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                                        f"fields for {len(reader.fieldnames)} columns; quote paths with commas.")
                values = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if any(values.values()):  # blank lines are no rows
                    rows.append((reader.line_num, values))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{source}: cannot be read as CSV ({type(e).__name__}: {e}).") from None


def _read_jsonl(source: Path) -> list[tuple[int, dict]]:
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{source}: cannot be read ({type(e).__name__}: {e}).") from None
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}, line {line}: not JSON ({e.msg}); write one object per line, "
                                'e.g. {"image": "a.png", "masks": "a_masks.png", "out": "a.glb"}.') from None
        if not isinstance(row, dict):
            raise ManifestError(f"{source}, line {line}: not a JSON object; write one object per line, "
                                'e.g. {"image": "a.png", "masks": "a_masks.png", "out": "a.glb"}.')
        _columns(source, line, list(row))
        rows.append((line, row))
    return rows


def _item(source: Path, line: int, row: dict) -> BatchItem:
    from .generate import MAX_SEED

    where = f"{source}, line {line}"
    base = source.parent

    def path(value, column: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(f"{where}: {column} {'is empty' if value in ('', None) else 'is not a path'}; "
                                f"give the row's {column} as a path (relative to {base}).")
        return (base / Path(value.strip()).expanduser()).absolute()

    masks = row["masks"]
    masks = [path(m, "masks") for m in masks] if isinstance(masks, list) and masks else [path(masks, "masks")]
    out = path(row["out"], "out")
    if out.suffix.lower() not in MESH_FORMATS:
        raise ManifestError(f"{where}: out {row['out']!r} has no mesh format; end it in one of "
                            f"{', '.join(MESH_FORMATS)}.")
    if out.is_dir():
        raise ManifestError(f"{where}: out {row['out']!r} is a folder; give a file name such as "
                            f"{Path(row['out']) / 'scene.glb'}.")
    seed = row.get("seed")
    if seed not in (None, ""):
        try:
            seed = int(seed) if not isinstance(seed, (bool, float)) else None
        except ValueError:
            seed = None
        if seed is None or not 0 <= seed <= MAX_SEED:
            raise ManifestError(f"{where}: seed {row['seed']!r} is not a whole number from 0 to 2^64 - 1; "
                                "fix it or leave it empty (then --seed).")
    else:
        seed = None
    return BatchItem(str(row["out"]).strip(), path(row["image"], "image"), tuple(masks), out, seed)


# ----------------------------------------------------------------------------------------- running
class PipelineOnce:
    """``generate``'s ``load``: the pipeline loaded on the first scene that gets that far, then the same one
    for every scene (a batch's scenes share every option the pipeline depends on)."""

    def __init__(self):
        self.pipe = None

    def __call__(self, opts, model):
        if self.pipe is None:
            from .generate import load_for

            self.pipe = load_for(opts, model)
        return self.pipe


def _reason(e: BaseException) -> str:
    from .cli_common import error_line

    line = error_line(e)
    text = line[0].removeprefix("error: ") if line else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def generate_one(generate: Callable, template, item: BatchItem, load) -> tuple[Optional[str], list[str]]:
    """One scene: ``(None, warnings)`` when its output is written, ``(reason, [])`` when it failed (a line)."""
    remove_stale_temporaries(item.out)  # a worker killed while writing this output left them
    try:
        result = generate(item.options(template), log=lambda message: None, load=load)
    except Exception as e:  # the scene's own failure: reported, the others go on
        return _reason(e), []
    return None, list(result.warnings)


class BatchWorker:
    """A Ray worker's state (:class:`timi.evaluation.ray_engine.WorkerPool`): the options, ``generate`` and
    the pipeline, loaded on the worker's first scene."""

    def __init__(self, context):
        self.template, self.generate = context
        self.load = PipelineOnce()

    def generate_scene(self, index: int, item: BatchItem):
        return (index, *generate_one(self.generate, self.template, item, self.load))


class _Progress:
    """One bar over the batch's scenes (throughput and ETA), the scene's name beside it; the lines above it."""

    def __init__(self, total: int, progress: bool, log, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="scene", disable=not progress)
        self.log = log or (lambda line: tqdm.write(line, file=sys.stderr))
        self.result = BatchResult()
        self.warned: set[str] = set()

    def done(self, item: BatchItem, reason: Optional[str], warnings=()) -> None:
        for w in warnings:  # each warning once, with the first scene it came from (options warn for every scene)
            if w not in self.warned:
                self.warned.add(w)
                self.log(f"warning: {item.name}: {w}")
        if reason is None:
            self.result.generated.append(item.name)
        else:
            self.result.failed[item.name] = reason
            self.log(f"error: {item.name}: {reason} (skipped; the other scenes go on)")
        self.bar.set_postfix_str(item.name, refresh=False)
        self.bar.update(1)


def run_batch(items: list[BatchItem], template, *, engine=None, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, generate: Callable | None = None) -> BatchResult:
    """Generate every scene of ``items`` with the options of ``template`` (a
    :class:`timi.generate.GenerateOptions`; its image, masks, out and, for rows with a seed, seed are
    each item's): here (``engine=None``) or on a :class:`~timi.evaluation.ray_engine.RayEngine`. Scenes
    whose output exists are skipped unless ``overwrite``. Bad options raise before anything runs (the
    bad-input errors of :mod:`timi.generate`); a scene's own failure is in the result's ``failed``.
    ``generate``: :func:`timi.generate.generate` (a test may wrap it)."""
    from .generate import check_model, check_settings, generate as generate_scene
    from .pipelines import resolve_device

    if template.views or template.report is not None:
        raise ValueError(f"{'--view' if template.views else '--report'} takes one scene; run it with IMAGE --masks "
                         "MASKS --out OUT, not over a folder or a manifest.")
    check_settings(template)
    resolve_device(template.device)
    model = check_model(template)
    if Path(model).exists():
        model = str(Path(model).absolute())  # the same file for workers started in another folder
    template = dataclasses.replace(template, model=model, progress=False)
    start = time.perf_counter()
    exists = [not overwrite and item.out.exists() for item in items]
    todo = [item for item, e in zip(items, exists) if not e]
    done = [item for item, e in zip(items, exists) if e]
    if done:  # complete: outputs are written atomically
        say = log or (lambda line: print(line, file=sys.stderr))
        say(f"{len(done)} of {len(items)} scenes have their output already ({done[0].out}"
            f"{', ...' if len(done) > 1 else ''}): skipped; --overwrite generates them again.")
    generate = generate or generate_scene
    if engine is None:
        progress_ = _Progress(len(todo), progress, log, "generate")
        load = PipelineOnce()
        try:
            for item in todo:
                progress_.bar.set_postfix_str(item.name)
                progress_.done(item, *generate_one(generate, template, item, load))
        finally:
            progress_.bar.close()
    else:
        progress_ = _run_on_ray(engine, todo, template, generate, progress, log)
    result = progress_.result
    result.skipped = [item.name for item in done]
    result.seconds = time.perf_counter() - start
    return result


def _run_on_ray(engine, todo: list[BatchItem], template, generate, progress, log) -> _Progress:
    """The scenes on a Ray cluster's generation workers (``timi eval``'s pool); a scene whose worker died
    more often than Ray retries it fails; Ctrl-C kills the workers and leaves only complete outputs."""
    from .evaluation.ray_engine import TASK_RETRIES, WorkerPool

    progress_ = _Progress(len(todo), progress, log, "generate (ray)")
    if not todo:
        progress_.bar.close()
        return progress_
    with engine.connected() as ray:
        pool, answered = None, set()
        try:
            pool = WorkerPool(ray, engine, BatchWorker, (template, generate), len(todo))
            for index, item in enumerate(todo):
                pool.submit("generate_scene", f"generate: {item.name}", (index, item))
            for answer in pool.results():
                if answer is None:  # a scene whose worker died every time: found below
                    continue
                index, reason, warnings = answer
                answered.add(index)
                progress_.done(todo[index], reason, warnings)
            for index, item in enumerate(todo):
                if index not in answered:
                    progress_.done(item, f"its Ray worker died {TASK_RETRIES + 1} times")
        finally:
            progress_.bar.close()
            if pool is not None:
                pool.close()
            for index, item in enumerate(todo):  # Ctrl-C: what the killed workers were writing
                if index not in answered:
                    remove_stale_temporaries(item.out)
    return progress_


# ----------------------------------------------------------------------------------------- command line
def batch_command(source, out, options: Callable, engine, overwrite: bool, quiet: bool, err) -> None:
    """``timi generate FOLDER|MANIFEST``: bad input -> one line, exit 2; a failed scene -> its line, the
    others go on, exit 1 at the end; Ctrl-C -> exit 130, only complete outputs left."""
    import typer

    from .cli_common import EXIT_INTERRUPTED, run_cli

    template = run_cli(options, err)
    items = run_cli(lambda: read_batch(source, out), err)

    def run():
        try:
            return run_batch(items, template, engine=engine, overwrite=overwrite, progress=not quiet)
        except KeyboardInterrupt:
            return None

    result = run_cli(run, err)
    if result is None:
        err.print("interrupted (Ctrl-C): stopped; every output written is complete, no partial file is left; "
                  "run the same command to go on.", markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    n = len(result.generated)
    line = f"generated {n} of {len(items)} scenes in {result.seconds:.1f} s"
    if n:
        line += f" ({result.seconds / n:.2f} s/scene)"
    if result.skipped:
        line += f"; {len(result.skipped)} skipped (output exists)"
    typer.echo(line)
    if result.failed:
        names = list(result.failed)
        err.print(f"error: {len(names)} of {len(items)} scenes failed ({', '.join(names[:5])}"
                  f"{', ...' if len(names) > 5 else ''}; the reasons are above); the other outputs are complete.",
                  markup=False, highlight=False)
        raise typer.Exit(1)

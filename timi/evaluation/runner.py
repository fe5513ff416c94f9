"""The evaluation loop: generate every (scene, run) once, cache it, score it, resume after a stop.

Cache layout under ``OUT/cache/<run key>/`` (the key hashes the ``TIMIConfig``, the seed and the
generator's ``identity``, so the same configuration under two labels shares its outputs)::

    config.json                     what the key stands for
    <scene_id>/scene.ply            generated scene mesh
    <scene_id>/instance_XX.ply      per-instance meshes, when the generator gives them
    <scene_id>/latents.npy          the final latents (L, C), when the generator gives them
    <scene_id>/generation.json      seconds; written last, so it marks a complete generation
    <scene_id>/scores-<metric key>.json   the six numbers for one set of metric settings
    <scene_id>/sizes-<metric key>-<base key>.json   area and volume against the base run's, and
                                    the scores at the base run's area (matched size)
    <scene_id>/matched.ply          the mesh at matched size (from latents.npy, another iso level)

Every file is written atomically (:mod:`timi.io`): an interrupted run leaves no half file, and the
next call starts where it stopped. A scene that cannot be loaded, whose generation raises, or whose
output cannot be scored is reported and skipped; the others go on. Scores are always computed on
the mesh read back from the cache, so a resumed evaluation gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import trimesh
from tqdm.auto import tqdm

from timi.io import write_bytes, write_mesh, write_text
from timi.metrics import METRIC_NAMES, SceneScores, score_scene

from .dataset import SceneError, discover_scenes, load_mesh, load_scene
from .generators import generator_identity
from .runs import Run
from timi_core import TIMIConfig


#: The final latents of a generation, in the scene's cache folder (``numpy.save`` format).
LATENTS_FILE = "latents.npy"
#: The scene decoded again at the base model's surface area (:meth:`Evaluator.size_scores`).
MATCHED_MESH = "matched.ply"


def write_latents(path: Path, latents) -> Path:
    """One sample's final latents (L, C) as a ``.npy`` file, written atomically (float32)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(latents, dtype=np.float32))
    return write_bytes(path, buf.getvalue())


@dataclass(frozen=True)
class MetricSettings:
    """Arguments of :func:`timi.metrics.score_scene` (defaults: MIDI's conventions)."""

    points_per_object: int = 20480
    threshold: float = 0.1
    align: str = "icp"
    icp_iterations: int = 50
    min_area_fraction: float = 1e-3
    seed: int = 0
    icp_points: int | None = None

    def key(self) -> str:
        return _digest(dataclasses.asdict(self))[:10]


@dataclass
class SceneResult:
    """Outcome of one (run, scene): ``status`` is ``ok``, ``failed`` (generation or scoring raised)
    or ``bad-scene`` (the scene folder could not be loaded)."""

    run: str
    scene_id: str
    status: str
    scores: SceneScores | None = None
    seconds: float | None = None
    error: str | None = None
    generated: bool = False
    sizes: dict | None = None
    stages: dict | None = None
    """The generation's seconds per stage (``sampling``, ``mesh``) when the generator reports them."""
    scoring_seconds: float | None = None
    """What ``timi eval`` adds: scoring the scene (metrics), and its matched-size decoding and scoring."""
    """Size of the scene against the base model's and the ground truth's, and its scores at the base
    model's surface area (:meth:`Evaluator.size_scores`); ``None`` without a base run."""

    @property
    def matched(self) -> SceneScores | None:
        """The scores at matched size (the base model's surface area), where they were computed."""
        m = (self.sizes or {}).get("matched")
        return SceneScores.from_dict(m["scores"]) if m and m.get("scores") else None


@dataclass
class RunSummary:
    """Means over the scenes of one run that scored (``n_ok`` of ``n_scenes``)."""

    run: Run
    means: dict[str, float]
    seconds: float
    n_ok: int
    n_scenes: int
    results: list[SceneResult] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)   # mean seconds per generation stage
    scoring_seconds: float = float("nan")                           # mean seconds timi eval's scoring took


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


#: TIMIConfig fields added after caches were first written: left out of the key at their default
#: value, so a configuration that does not use them keeps the key (and the cached outputs) it had.
KEY_OMITTED_AT_DEFAULT = {"per_head": False, "smoothing": "tokens", "common": "keep"}


def run_key(run: Run, seed: int, identity: dict) -> str:
    """Cache key of a run: hash of its TIMIConfig fields, the seed and the generator identity.

    Every configuration without guidance (``not config.enabled``: ISG off, or no guided step or
    layer) samples exactly the base model, so they all share one key: that of the paper's form with
    ISG off (``TIMIConfig.paper(isg=False)``), the key base runs had before the default changed.
    """
    config = run.config if run.config.enabled else TIMIConfig.paper(isg=False)
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if not (k in KEY_OMITTED_AT_DEFAULT and v == KEY_OMITTED_AT_DEFAULT[k])}
    return _digest({"config": fields, "seed": seed, "generator": identity})[:12]


def inputs_digest(scene) -> str:
    """Hash of a scene's generation inputs (image and masks): a cached output of other inputs is stale."""
    h = hashlib.sha1()
    for arr in (scene.image, scene.masks):
        arr = np.ascontiguousarray(arr)
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _accepts_scene_id(generate: Callable) -> bool:
    try:
        return "scene_id" in inspect.signature(generate).parameters
    except (TypeError, ValueError):
        return False


def _short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class Evaluator:
    """Evaluate ``generate`` on every scene of ``dataset_dir`` for each run, caching under ``out_dir``.

    ``generate(image, masks, config, seed) -> (scene_mesh, instance_meshes | None, seconds)``, see
    :mod:`timi.evaluation.generators`; a run with its own ``generator`` uses that one instead (then
    ``generate`` may be ``None``). ``limit`` keeps the first N scenes.
    """

    def __init__(self, dataset_dir: str | Path, generate: Callable | None, out_dir: str | Path, *, seed: int = 0,
                 metrics: MetricSettings = MetricSettings(), limit: int | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.dataset_dir = Path(dataset_dir)
        self.generate = generate
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.metrics = metrics
        self.limit = limit
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self._identities: dict[int, dict] = {}

    def __getstate__(self):
        # sent to cluster workers (timi.evaluation.ray_engine): the identity cache is keyed by object ids,
        # which mean nothing in another process
        return {**self.__dict__, "_identities": {}}

    # ----------------------------------------------------------------- paths
    def generator_of(self, run: Run) -> Callable:
        gen = run.generator if run.generator is not None else self.generate
        if gen is None:
            raise ValueError(f"run {run.label!r} has no generator and the evaluator has no default one.")
        return gen

    def identity(self, run: Run) -> dict:
        gen = self.generator_of(run)
        if id(gen) not in self._identities:
            self._identities[id(gen)] = generator_identity(gen)
        return self._identities[id(gen)]

    def run_dir(self, run: Run) -> Path:
        return self.out_dir / "cache" / run_key(run, self.seed, self.identity(run))

    def _write_run_config(self, run: Run) -> None:
        path = self.run_dir(run) / "config.json"
        if not path.exists():
            write_text(path, json.dumps({"config": dataclasses.asdict(run.config), "seed": self.seed,
                                         "generator": self.identity(run), "first_label": run.label}, indent=1, default=str))

    # ----------------------------------------------------------------- one scene
    def _generate(self, run: Run, scene, folder: Path) -> None:
        generate = self.generator_of(run)
        kwargs = {"scene_id": scene.scene_id} if _accepts_scene_id(generate) else {}
        mesh, instances, seconds, *rest = generate(scene.image, scene.masks, run.config, self.seed, **kwargs)
        latents = rest[0] if rest else None
        if mesh is None and instances:
            mesh = trimesh.util.concatenate(list(instances))
        if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
            raise ValueError("the generator returned no triangles (empty scene mesh).")
        # older scores, and temporary files a killed writer left (a cluster worker that died mid-write)
        for pattern in ("scores-*.json", "sizes-*.json", MATCHED_MESH, ".*.tmp"):
            for old in folder.glob(pattern) if folder.is_dir() else ():
                old.unlink()
        write_mesh(mesh, folder / "scene.ply")
        for k, inst in enumerate(instances or [], start=1):
            write_mesh(inst, folder / f"instance_{k:02d}.ply")
        if latents is not None:  # the final latents: decoded again at another iso level (timi.evaluation.sizes)
            write_latents(folder / LATENTS_FILE, latents)
        stages = {k: float(v) for k, v in seconds.items()} if isinstance(seconds, dict) else None
        seconds = sum(stages.values()) if stages is not None else seconds
        info = {"seconds": None if seconds is None else float(seconds), "instances": len(instances or []),
                "inputs": inputs_digest(scene), **({"stages": stages} if stages is not None else {})}
        write_text(folder / "generation.json", json.dumps(info, indent=1))

    def _cached(self, scene, folder: Path) -> bool:
        path = folder / "generation.json"
        if not path.is_file():
            return False
        if json.loads(path.read_text()).get("inputs") != inputs_digest(scene):
            self.log(f"{scene.scene_id}: image or masks changed since {path} was written; generating again.")
            return False
        return True

    def _load_prediction(self, folder: Path):
        info = json.loads((folder / "generation.json").read_text())
        n = int(info.get("instances", 0))
        if n:
            pred = [load_mesh(folder / f"instance_{k:02d}.ply") for k in range(1, n + 1)]
        else:
            pred = load_mesh(folder / "scene.ply")
        seconds = info.get("seconds")
        return pred, None if seconds is None else float(seconds), info.get("stages")

    def generate_unit(self, run: Run, scene) -> tuple[bool, SceneResult | None]:
        """Generate ``run``'s output for a loaded scene unless the cache holds it: ``(generated, None)``,
        or ``(False, failed result)`` when the generation raised (reported, traceback in ``OUT/logs``)."""
        folder = self.run_dir(run) / scene.scene_id
        try:
            if not self._cached(scene, folder):
                self._generate(run, scene, folder)
                return True, None
            return False, None
        except Exception as e:  # a failing generation must not stop the evaluation
            self.log(f"[{run.label}] {scene.scene_id}: generation failed: {_short_error(e)}")
            (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
            write_text(self.out_dir / "logs" / f"{self.run_dir(run).name}_{scene.scene_id}.txt",
                       traceback.format_exc())
            return False, SceneResult(run.label, scene.scene_id, "failed", error=f"generation: {_short_error(e)}")

    def score_unit(self, run: Run, scene, generated: bool = False) -> SceneResult:
        """Scores of ``run``'s cached output on a loaded scene (computed once, then read from the cache)."""
        folder = self.run_dir(run) / scene.scene_id
        score_path = folder / f"scores-{self.metrics.key()}.json"
        try:
            pred, seconds, stages = self._load_prediction(folder)
            if score_path.is_file():
                saved = json.loads(score_path.read_text())
                scores, scoring = SceneScores.from_dict(saved["scores"]), saved.get("seconds")
            else:
                start = time.perf_counter()
                scores = score_scene(pred, scene.gt_meshes, **dataclasses.asdict(self.metrics))
                scoring = time.perf_counter() - start
                write_text(score_path, json.dumps({"metrics": dataclasses.asdict(self.metrics),
                                                   "scores": scores.as_dict(), "seconds": scoring}, indent=1))
        except Exception as e:
            self.log(f"[{run.label}] {scene.scene_id}: scoring failed: {_short_error(e)}")
            return SceneResult(run.label, scene.scene_id, "failed", error=f"scoring: {_short_error(e)}",
                               generated=generated)
        return SceneResult(run.label, scene.scene_id, "ok", scores, seconds, generated=generated, stages=stages,
                           scoring_seconds=scoring)

    def evaluate_scene(self, run: Run, scene) -> SceneResult:
        """Scores of ``run`` on a loaded scene, from the cache when possible (one (scene, run) unit:
        :meth:`generate_unit` then :meth:`score_unit`)."""
        generated, failed = self.generate_unit(run, scene)
        return failed if failed is not None else self.score_unit(run, scene, generated)

    # ----------------------------------------------------------------- sizes
    def size_scores(self, run: Run, scene, base: Run) -> dict:
        """How large ``run``'s scene is, and its scores at the base run's size (issue 27).

        ``area``/``volume`` of the run's scene mesh, of the base run's on the same scene and seed,
        and of the ground truth; with the run's final latents cached and a generator that decodes
        them (``iso_surfaces``), ``matched``: the iso level at which the decoded surface has the
        base run's area (:func:`timi.evaluation.sizes.match_area`), the area reached, and the
        scores of that mesh (``matched.ply``). Cached in ``sizes-<metric key>-<base key>.json``.
        """
        from .sizes import match_area, mesh_size

        folder = self.run_dir(run) / scene.scene_id
        base_folder = self.run_dir(base) / scene.scene_id
        path = folder / f"sizes-{self.metrics.key()}-{self.run_dir(base).name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        start = time.perf_counter()
        area, volume = mesh_size(load_mesh(folder / "scene.ply"))
        base_area, base_volume = mesh_size(load_mesh(base_folder / "scene.ply"))
        gt = [mesh_size(m) for m in scene.gt_meshes]
        info = {"area": area, "volume": volume, "base_area": base_area, "base_volume": base_volume,
                "gt_area": float(sum(a for a, _ in gt)), "gt_volume": float(sum(v for _, v in gt)), "matched": None}
        generator = self.generator_of(run)
        latents = folder / LATENTS_FILE
        if run.config.enabled and latents.is_file() and hasattr(generator, "iso_surfaces") and base_area > 0:
            match = match_area(generator.iso_surfaces(np.load(latents)), base_area)
            matched = {"level": match.level, "area": match.area, "reached": match.matched,
                       "volume": mesh_size(match.mesh)[1], "scores": None}
            if match.mesh is not None:
                write_mesh(match.mesh, folder / MATCHED_MESH)
                scores = score_scene(load_mesh(folder / MATCHED_MESH), scene.gt_meshes,
                                     **dataclasses.asdict(self.metrics))
                matched["scores"] = scores.as_dict()
            info["matched"] = matched
        info["seconds"] = time.perf_counter() - start
        write_text(path, json.dumps(info, indent=1))
        return info

    def sizes_need_generator(self, run: Run) -> bool:
        """Whether :meth:`size_scores` of ``run`` decodes latents with its generator (the model, e.g.
        on a GPU) rather than only reading meshes."""
        return run.config.enabled and hasattr(self.generator_of(run), "iso_surfaces")

    def _with_sizes(self, result: SceneResult, run: Run, scene, base: Run | None,
                    base_result: SceneResult | None) -> SceneResult:
        if base is None or result.status != "ok" or base_result is None or base_result.status != "ok":
            return result
        try:
            result.sizes = self.size_scores(run, scene, base)
            if result.scoring_seconds is not None and result.sizes.get("seconds") is not None:
                result.scoring_seconds += float(result.sizes["seconds"])
        except Exception as e:  # sizes are an addition: a failure is reported, the scores stand
            self.log(f"[{run.label}] {scene.scene_id}: size scoring failed: {_short_error(e)}")
        return result

    # ----------------------------------------------------------------- everything
    def prepare(self, runs: Iterable[Run]) -> tuple[list[Run], list[Path]]:
        """Check ``runs`` (unique labels, a generator each), write each run's ``config.json`` and list
        the scene folders to evaluate (``limit`` applied): what every engine does first."""
        runs = list(runs)
        labels = [r.label for r in runs]
        if len(set(labels)) != len(labels):
            dup = sorted({l for l in labels if labels.count(l) > 1})
            raise ValueError(f"run labels must be unique; repeated: {dup}.")
        folders = discover_scenes(self.dataset_dir)
        if self.limit is not None:
            folders = folders[: self.limit]
        for run in runs:
            self.generator_of(run)
            self._write_run_config(run)
        return runs, folders

    def load_or_skip(self, folder: Path, runs: list[Run]) -> tuple[object | None, list[SceneResult]]:
        """``(scene, [])``, or ``(None, one bad-scene result per run)`` when the folder cannot be loaded (reported)."""
        try:
            return load_scene(folder), []
        except Exception as e:  # SceneError names the problem; anything else is reported as it is
            reason = str(e) if isinstance(e, SceneError) else _short_error(e)
            self.log(f"{folder.name}: skipped, {reason}")
            return None, [SceneResult(run.label, folder.name, "bad-scene", error=reason) for run in runs]

    def evaluate(self, runs: Iterable[Run]) -> list[RunSummary]:
        """All runs on all scenes (scene-major, so each scene is loaded once); returns one summary per run."""
        runs, folders = self.prepare(runs)
        results: dict[str, list[SceneResult]] = {r.label: [] for r in runs}
        base = base_run(runs)
        bar = tqdm(total=len(folders) * len(runs), desc="eval", disable=not self.progress, unit="gen")
        for folder in folders:
            scene, skipped = self.load_or_skip(folder, runs)
            if scene is None:
                for result in skipped:
                    results[result.run].append(result)
                bar.update(len(runs))
                continue
            base_result = None
            for run in ([base] if base is not None else []) + [r for r in runs if r is not base]:
                bar.set_postfix_str(f"{folder.name} | {run.label}")
                result = self.evaluate_scene(run, scene)
                if run is base:
                    base_result = result
                results[run.label].append(self._with_sizes(result, run, scene, base, base_result))
                bar.update(1)
        bar.close()
        return [summarize(run, results[run.label]) for run in runs]


def base_run(runs: Iterable[Run]) -> Run | None:
    """The base model's run among ``runs`` (the first without guidance, sampled by the evaluator's
    own generator): what sizes are compared with and matched to."""
    return next((r for r in runs if not r.config.enabled and r.generator is None), None)


def summarize(run: Run, results: list[SceneResult]) -> RunSummary:
    """Mean of each metric and of the seconds over the scenes that scored (seconds: those that report one)."""
    ok = [r for r in results if r.status == "ok"]
    means = {m: float(np.mean([getattr(r.scores, m) for r in ok])) if ok else float("nan") for m in METRIC_NAMES}
    times = [r.seconds for r in ok if r.seconds is not None and np.isfinite(r.seconds)]
    seconds = float(np.mean(times)) if times else float("nan")
    staged = [r.stages for r in ok if r.stages]
    stages = {k: float(np.mean([st[k] for st in staged])) for k in staged[0]} if len(staged) == len(ok) and ok else {}
    scoring = [r.scoring_seconds for r in ok if r.scoring_seconds is not None]
    return RunSummary(run, means, seconds, len(ok), len(results), results, stage_seconds=stages,
                      scoring_seconds=float(np.mean(scoring)) if scoring else float("nan"))


def cached_runs(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """``{label: run folder}`` of the runs cached under ``OUT/cache/`` for sampling ``seed``.

    The label is the one the run was first cached under (``config.json``'s ``first_label``): a
    configuration evaluated again under another label keeps its folder and its first label. Two
    configurations first cached under one label (e.g. the same control with two ``--set``) cannot be
    told apart by it: that raises ``ValueError``, and the fix is one ``--out`` per configuration.
    """
    runs: dict[str, Path] = {}
    for cfg in sorted(Path(out_dir).glob("cache/*/config.json")):
        info = json.loads(cfg.read_text())
        if int(info.get("seed", 0)) != int(seed):
            continue
        label = info.get("first_label")
        if label in runs:
            raise ValueError(f"{out_dir}: two cached runs are labelled {label!r} for seed {seed} "
                             f"({runs[label].name}, {cfg.parent.name}); evaluate them into separate --out folders.")
        runs[label] = cfg.parent
    return runs


def merge_seeds(per_seed: list[tuple[int, list[RunSummary]]]) -> list[RunSummary]:
    """One summary per run over every (scene, seed); with several seeds a scene id becomes ``<id>@seed<s>``."""
    if len(per_seed) == 1:
        return per_seed[0][1]
    merged = []
    for i, first in enumerate(per_seed[0][1]):
        results = [dataclasses.replace(r, scene_id=f"{r.scene_id}@seed{seed}")
                   for seed, summaries in per_seed for r in summaries[i].results]
        merged.append(summarize(first.run, results))
    return merged

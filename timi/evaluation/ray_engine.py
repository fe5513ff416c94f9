"""``timi eval --engine ray``: the evaluation on a Ray cluster (docs/cluster.md).

Ray is the engine; this module only says what to run. :class:`RayEngine` (where, how many workers)
and :class:`WorkerPool` (the generation workers) are also what ``timi generate`` runs many scenes on
(:mod:`timi.batch`). One unit of work of the evaluation is one (scene, run, seed):

* generation: a pool of Ray actors (:class:`ray.util.ActorPool`), each holding the evaluators of
  every seed, so each loads the pipeline once (on first use) and generates many scenes; an actor
  asks for ``--gpus-per-worker`` GPUs (a fraction puts several on one GPU). A worker that dies is
  restarted by Ray and its scene retried (``max_restarts``, ``max_task_retries``); a scene that
  kills its worker every time is reported as failed, once.
* scoring: Ray tasks on CPU workers (``num_cpus=1``), as each generation finishes;
* sizes (issue 27): after every (scene, run, seed) is scored, the guided runs' matched-size
  scores, on the actors when they decode latents with the model, as CPU tasks otherwise.

Every unit calls the local engine's own code (:meth:`Evaluator.generate_unit`,
:meth:`Evaluator.score_unit`, :meth:`Evaluator._with_sizes`) on the same cache under ``--out``,
which every node must see (a shared file system): a cluster run resumes where it stopped, and the
local engine reads its cache, and the other way round. Files are written atomically, and a scene's
``generation.json`` last, so an interrupted or killed worker leaves no output that counts as complete.

Ray is imported only here, and only when the engine runs: ``timi --help`` and the local engine
need no Ray.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .runner import Evaluator, RunSummary, SceneResult, base_run, summarize
from .runs import Run

#: How often Ray retries a scene whose worker died before reporting it failed.
TASK_RETRIES = 2


#: The longest a wait on the cluster goes without looking for a Ctrl-C that Python dropped (seconds).
POLL_SECONDS = 0.5


class CtrlC:
    """The first Ctrl-C stops a run on the cluster (issue 38).

    Python runs a SIGINT handler in whatever Python code the main thread executes next. When that is
    a finalizer (a ``__del__``, a weak-reference callback: Ray's handles and ``tqdm`` bars have them,
    and the driver drops object refs all the time) or a C++ -> Python callback of Ray's, the
    ``KeyboardInterrupt`` the handler raises is printed as "Exception ignored" and dropped, and the run
    went on (a press lost inside Ray's wait, seen in CI). While installed (the ``with`` block of
    :meth:`RayEngine.connected`, in the main thread), this handler records each press and then does
    what the previous one did; the driver's waits are bounded (:data:`POLL_SECONDS`) and call
    :meth:`check`, which raises ``KeyboardInterrupt`` for a press that was dropped."""

    def __init__(self):
        self.pressed = threading.Event()
        self._installed, self._previous = False, None

    def __enter__(self) -> "CtrlC":
        self.pressed.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed, self._previous = False, None
        self.pressed.clear()          # outside the block a press is no longer this run's

    def _handle(self, signum, frame) -> None:
        self.pressed.set()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)          # Python's own raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` when Ctrl-C was pressed (and its exception was dropped)."""
        if self.pressed.is_set():
            raise KeyboardInterrupt


class EngineError(ValueError):
    """The Ray engine cannot start: Ray is not installed, or no cluster answers at the address."""


def import_ray():
    """The ``ray`` module, or :class:`EngineError` with the line to install it."""
    try:
        import ray
        from ray.util import ActorPool  # noqa: F401
    except ImportError as e:
        raise EngineError(f"--engine ray needs Ray, which is not installed ({e}); "
                          "install it with: pip install 'timi[ray]'") from None
    return ray


# ----------------------------------------------------------------- the units (run on the workers)
def _load(evaluator: Evaluator, folder: str, runs: list[Run]):
    return evaluator.load_or_skip(Path(folder), runs)


class GenerationWorker:
    """A Ray actor's state: the evaluators of every seed (they share one generator, so the pipeline
    is loaded once per actor) and the runs."""

    def __init__(self, context):
        self.evaluators, self.runs = context

    def generate(self, seed: int, index: int, folder: str):
        """Generate one (scene, run, seed) unless cached: ``(unit, generated, result or None, log lines)``,
        ``result`` being the bad-scene or failed-generation result."""
        return _generate(self.evaluators, self.runs, seed, index, folder)

    def sizes(self, seed: int, index: int, folder: str, result: SceneResult, base_result: SceneResult):
        return _sizes((self.evaluators, self.runs), seed, index, folder, result, base_result)


def _with_log(evaluator: Evaluator) -> list[str]:
    lines: list[str] = []
    evaluator.log = lines.append
    return lines


def _generate(evaluators, runs, seed, index, folder):
    evaluator = evaluators[seed]
    log = _with_log(evaluator)
    run = runs[index]
    scene, skipped = _load(evaluator, folder, [run])
    if scene is None:
        return (seed, index, folder), False, skipped[0], log
    generated, failed = evaluator.generate_unit(run, scene)
    return (seed, index, folder), generated, failed, log


def _score(context, seed, index, folder, generated):
    evaluators, runs = context
    evaluator = evaluators[seed]
    log = _with_log(evaluator)
    scene, skipped = _load(evaluator, folder, [runs[index]])
    result = skipped[0] if scene is None else evaluator.score_unit(runs[index], scene, generated)
    return (seed, index, folder), result, log


def _sizes(context, seed, index, folder, result, base_result):
    evaluators, runs = context
    evaluator = evaluators[seed]
    log = _with_log(evaluator)
    scene, _ = _load(evaluator, folder, [runs[index]])
    if scene is not None:
        result = evaluator._with_sizes(result, runs[index], scene, base_run(runs), base_result)
    return (seed, index, folder), result, log


# ----------------------------------------------------------------- the engine (runs on the driver)
@dataclass(frozen=True)
class RayEngine:
    """Where and how to run: ``address`` (``None``: a local Ray instance on this machine's cores;
    ``auto``; ``ray://HOST:10001``), GPUs per generation worker (``None``: 1 when the cluster has
    GPUs, else 0) and the number of workers (``None``: as many as the cluster's GPUs hold, else 1)."""

    address: str | None = None
    gpus_per_worker: float | None = None
    workers: int | None = None
    ctrl_c: CtrlC = field(default_factory=CtrlC, repr=False, compare=False)  # installed by connected()

    def connect(self):
        """Ray, initialised (a call after ``ray.init`` uses that instance); ``(ray, started)``."""
        ray = import_ray()
        self.check_address()
        if ray.is_initialized():
            return ray, False
        options = dict(logging_level=logging.WARNING, log_to_driver=True)
        if self.address is None:
            options["include_dashboard"] = False
        try:
            ray.init(address=self.address, **options)
        except Exception as e:  # ConnectionError, or a gRPC/timeout error from the Ray client
            where = self.address or "a local Ray instance"
            raise EngineError(f"--address {where}: no Ray cluster answers "
                              f"({' '.join(str(e).split())[:200] or type(e).__name__})") from None
        return ray, True

    def check_address(self, timeout: float = 5.0) -> None:
        """A ``HOST:PORT`` or ``ray://HOST:PORT`` address must accept a connection within ``timeout``
        seconds (Ray itself waits minutes for a head node that is not there)."""
        if self.address in (None, "auto", "local"):
            return
        host, sep, port = self.address.removeprefix("ray://").rpartition(":")
        if not sep or not port.isdigit():
            raise EngineError(f"--address {self.address}: use auto, HOST:PORT or ray://HOST:PORT")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as e:
            raise EngineError(f"--address {self.address}: no Ray cluster answers ({e.strerror or e})") from None

    def plan(self, ray, n_units: int) -> tuple[float, int]:
        """``(GPUs per worker, workers)`` on this cluster."""
        gpus_total = float(ray.cluster_resources().get("GPU", 0))
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus_total else 0.0)
        workers = self.workers or (max(1, int(gpus_total // gpus)) if gpus else 1)
        return gpus, max(1, min(workers, n_units))

    @contextmanager
    def connected(self):
        """Ray, initialised for the ``with`` block (and shut down after it when this call started it),
        with Ctrl-C recorded (:class:`CtrlC`, as ``self.ctrl_c``) so that the first press stops the run."""
        ray, started = self.connect()
        try:
            with self.ctrl_c:
                yield ray
        finally:
            if started:
                ray.shutdown()

    def evaluate(self, evaluators: list[Evaluator], runs: list[Run], *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> list[tuple[int, list[RunSummary]]]:
        """Every (scene, run, seed) of the evaluators (one per seed, as the local engine makes them):
        ``[(seed, summaries)]`` in the local engine's order."""
        with self.connected() as ray:
            return _Execution(ray, self, evaluators, runs, progress, log or tqdm.write).run()


class WorkerPool:
    """The generation workers of one run, the one place ``timi eval`` and ``timi generate`` start them:
    ``workers`` Ray actors of ``worker_cls(context)`` in a :class:`ray.util.ActorPool`, each reserving
    its GPUs and no CPU (the CPUs are left to CPU tasks: a worker holding a CPU while it waits for
    scenes could starve them). A worker that dies is restarted by Ray (``max_restarts=-1``) and its
    task retried :data:`TASK_RETRIES` times; after that, :meth:`results` yields ``None`` for it (the
    caller finds the unit that got no answer). ``context`` goes by value (small: pipelines load lazily,
    on a worker's first task), so that Ray can restart an actor. :meth:`close` kills the workers."""

    def __init__(self, ray, engine: RayEngine, worker_cls, context, n_units: int):
        from ray.util import ActorPool

        self.ray, self.ctrl_c = ray, engine.ctrl_c
        gpus, n_workers = engine.plan(ray, n_units)
        worker = ray.remote(worker_cls).options(num_cpus=0, num_gpus=gpus, max_restarts=-1,
                                                max_task_retries=TASK_RETRIES)
        self.actors = [worker.remote(context) for _ in range(n_workers)]
        self.pool = ActorPool(self.actors)

    def submit(self, method: str, name: str, unit: tuple, *args) -> None:
        """Call ``worker.method(*unit, *args)`` on the next free worker, as the Ray task ``name``."""
        self.pool.submit(lambda actor, u: getattr(actor, method).options(name=name).remote(*u, *args), unit)

    def results(self):
        """The answers as they come (any order); ``None`` for a task whose worker died every time.
        Waits at most :data:`POLL_SECONDS` at a time, looking for a dropped Ctrl-C (:class:`CtrlC`)."""
        while self.pool.has_next():
            self.ctrl_c.check()
            try:
                yield self.pool.get_next_unordered(timeout=POLL_SECONDS)
            except self.ray.exceptions.RayError:
                yield None
            except TimeoutError:             # nothing finished yet
                continue

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class _Execution:
    """One evaluation on the cluster: submits the units, gathers the results, cleans up."""

    def __init__(self, ray, engine: RayEngine, evaluators, runs, progress, log):
        self.ray, self.engine, self.log = ray, engine, log
        runs, folders = evaluators[0].prepare(runs)
        for evaluator in evaluators[1:]:
            evaluator.prepare(runs)
        self.runs, self.folders = runs, [str(f) for f in folders]
        self.evaluators = {e.seed: e for e in evaluators}
        self.base = base_run(runs)
        b = runs.index(self.base) if self.base is not None else None
        order = ([b] if b is not None else []) + [i for i in range(len(runs)) if i != b]
        self.base_index = b
        self.units = [(seed, i, folder) for seed in self.evaluators for folder in self.folders for i in order]
        self.results: dict[tuple, SceneResult] = {}
        self.skipped_scenes: set[str] = set()
        n_sizes = len(self.units) if self.base is not None else 0
        self.bar = tqdm(total=len(self.units) + n_sizes, desc="eval (ray)", unit="task", disable=not progress)
        self.actors: list = []
        self.pending: list = []

    # ------------------------------------------------------------- helpers
    def _name(self, unit, what: str | None = None) -> str:
        seed, index, folder = unit
        name = f"{Path(folder).name} | {self.runs[index].label} | seed {seed}"
        return f"{what}: {name}" if what else name

    def _done(self, unit, result: SceneResult | None = None, lines=(), what: str = "scored") -> None:
        for line in lines:
            if line.startswith(f"{Path(unit[2]).name}: skipped"):  # a bad scene: reported once, not per unit
                if unit[2] in self.skipped_scenes:
                    continue
                self.skipped_scenes.add(unit[2])
            self.log(line)
        if result is not None:
            self.results[unit] = result
        self.bar.set_postfix_str(f"{what}: {self._name(unit)}", refresh=False)
        self.bar.update(1)

    def _drain(self, block: bool) -> None:
        """Collect finished CPU tasks (all of them with ``block``)."""
        while self.pending:
            self.engine.ctrl_c.check()       # a Ctrl-C Python dropped (CtrlC)
            ready, self.pending = self.ray.wait(self.pending, num_returns=1 if block else len(self.pending),
                                                timeout=POLL_SECONDS if block else 0)
            for ref in ready:
                unit = self._refs.pop(ref)
                self.submitted.discard(unit)
                try:
                    _, result, lines = self.ray.get(ref)
                except self.ray.exceptions.RayError as e:  # the task's worker died more often than it is retried
                    result, lines = self._lost(unit, f"Ray worker lost ({type(e).__name__})")
                self._done(unit, result, lines)
            if not block:
                return

    def _lost(self, unit, reason: str, what: str = "scoring"):
        seed, index, folder = unit
        error = f"{what}: {reason}"
        return SceneResult(self.runs[index].label, Path(folder).name, "failed", error=error), [
            f"[{self.runs[index].label}] {Path(folder).name}: {error}"]

    def _submit(self, fn, what: str, unit, *args) -> None:
        ref = fn.options(name=self._name(unit, what)).remote(self.context, *unit, *args)
        self._refs[ref] = unit
        self.submitted.add(unit)
        self.pending.append(ref)

    # ------------------------------------------------------------- the phases
    def run(self) -> list[tuple[int, list[RunSummary]]]:
        ray = self.ray
        self._refs: dict = {}
        self.submitted: set = set()
        self.context = ray.put((self.evaluators, self.runs))
        score = ray.remote(num_cpus=1)(_score)
        sizes = ray.remote(num_cpus=1)(_sizes)
        pool = None
        try:
            pool = WorkerPool(ray, self.engine, GenerationWorker, (self.evaluators, self.runs), len(self.units))
            for unit in self.units:
                pool.submit("generate", self._name(unit, "generate"), unit)
            for answer in pool.results():
                if answer is None:  # a scene whose worker died every time: found below
                    continue
                unit, generated, failed, lines = answer
                self._drain(block=False)
                if failed is not None:
                    self._done(unit, failed, lines, "generated")
                else:
                    for line in lines:
                        self.log(line)
                    self._submit(score, "score", unit, generated)
            for unit in self.units:  # units without an answer lost their worker TASK_RETRIES + 1 times
                if unit not in self.results and unit not in self.submitted:
                    self._done(unit, *self._lost(unit, f"its Ray worker died {TASK_RETRIES + 1} times", "generation"))
            self._drain(block=True)
            self._sizes(pool, sizes)
        finally:
            self.bar.close()
            for ref in self.pending:  # Ctrl-C or an error: stop what is still running
                ray.cancel(ref, force=True)
            if pool is not None:
                pool.close()
        return [(seed, [summarize(run, [self.results[(seed, i, f)] for f in self.folders])
                        for i, run in enumerate(self.runs)]) for seed in self.evaluators]

    def _sizes(self, pool, sizes) -> None:
        """Sizes and matched-size scores against the base run (:meth:`Evaluator.size_scores`)."""
        if self.base is None:
            return
        on_actors = {}
        for unit in self.units:
            seed, index, folder = unit
            result, base_result = self.results[unit], self.results[(seed, self.base_index, folder)]
            if result.status != "ok" or base_result.status != "ok":
                self._done(unit, what="sizes")
            elif self.evaluators[seed].sizes_need_generator(self.runs[index]):
                on_actors[unit] = (result, base_result)
                pool.submit("sizes", self._name(unit, "sizes"), unit, result, base_result)
            else:
                self._submit(sizes, "sizes", unit, result, base_result)
        for answer in pool.results():
            if answer is None:  # sizes are an addition: the scores stand
                continue
            unit, result, lines = answer
            self._done(unit, result, lines, "sizes")
            on_actors.pop(unit)
        for unit in on_actors:
            self._done(unit, what="sizes")
        self._drain(block=True)

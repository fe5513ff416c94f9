"""`timi eval --engine ray` (issue 28) on a local Ray instance shared by the module: the same
tables and cache as the local engine, a worker killed mid-scene, Ctrl-C and restart, and the
one-line errors without Ray or a cluster."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from timi.cli import app
from timi.evaluation import MetricSettings, plan_runs
from timi.evaluation.cli import evaluate_and_report

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "timi" / "assets" / "example"
TIMING = ("seconds", "seconds_per_scene", "sampling_seconds", "mesh_seconds", "scoring_seconds")


def _rows(path: Path, drop=TIMING) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(path.open())]


def _stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("cache/*/*/generation.json")}


def _wait_for(condition, seconds: float = 180.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_ray_engine_gives_the_local_engines_tables_and_cache(ray_instance, tmp_path):
    """2 scenes x (base, TIMI) x 2 seeds with the tiny hy3dgen model: per_scene.csv and results.csv as the
    local engine writes them (timing aside), the same cache files, and each engine reads the other's cache."""
    pytest.importorskip("hy3dgen")
    from timi_torch import write_tiny_model_dir

    model = write_tiny_model_dir(tmp_path / "tiny", image_size=112)
    data = tmp_path / "data"
    for name in ("a", "b"):
        shutil.copytree(EXAMPLE, data / name)
    image = np.asarray(Image.open(data / "b" / "image.png").convert("RGBA")).copy()
    image[..., :3] = 255 - image[..., :3]  # another input
    Image.fromarray(image, "RGBA").save(data / "b" / "image.png")
    args = ["eval", str(data), "--model", str(model), "--baseline", "--device", "cpu", "--steps", "2",
            "--octree-resolution", "32", "--points", "300", "--set", "guided_layers=2", "--seed", "0", "--seed", "1",
            "--quiet"]
    ray_args = ["--engine", "ray", "--workers", "2"]
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    for out, extra in ((local, []), (cluster, ray_args)):
        result = CliRunner().invoke(app, args + ["--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    rows = _rows(cluster / "per_scene.csv")
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert rows == _rows(local / "per_scene.csv")
    assert _rows(cluster / "results.csv") == _rows(local / "results.csv")
    assert any(r["matched_level"] for r in rows)  # sizes at matched size, decoded on the actors
    files = {out: sorted(str(p.relative_to(out)) for p in (out / "cache").rglob("*")) for out in (local, cluster)}
    assert files[local] == files[cluster] and not any(f.endswith(".tmp") for f in files[local])
    # each engine reads the other's cache: nothing generated again, the same table
    for out, extra in ((cluster, []), (local, ray_args)):
        stamps, table = _stamps(out), (out / "per_scene.csv").read_text()
        result = CliRunner().invoke(app, args + ["--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert len(stamps) == 8 and _stamps(out) == stamps and (out / "per_scene.csv").read_text() == table


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_killed_worker_and_interrupted_run_resume(ray_instance, tmp_path, monkeypatch):
    """A worker killed mid-scene (``ray.kill``): its scene is generated again by the restarted worker,
    every (scene, run, seed) is scored once, no partial file. Ctrl-C, then the same call: only what was
    not complete is generated, and the table is the local engine's."""
    from ray_helpers import MarkedGenerator, unit_name
    from test_eval_harness import write_scene

    from timi.evaluation.ray_engine import RayEngine

    ray = ray_instance
    data = tmp_path / "data"
    for i in range(3):
        write_scene(data, i)
    runs = plan_runs(with_baseline=True)
    options = dict(seeds=[0, 1], metrics=MetricSettings(points_per_object=300), quiet=True)
    units = {unit_name(f"scene_{i:02d}", r.config, s) for i in range(3) for r in runs for s in (0, 1)}

    def calls(marks: Path) -> list[str]:
        path = marks / "calls.txt"
        return path.read_text().split() if path.is_file() else []

    reference = tmp_path / "local"
    (tmp_path / "m0").mkdir()
    evaluate_and_report(data, runs, MarkedGenerator(tmp_path / "m0"), reference, **options)

    # --- a worker killed while it generates scene_01 (TIMI, seed 1)
    actors = []

    class Recording(ray.util.ActorPool):
        def __init__(self, pool):
            actors.extend(pool)
            super().__init__(pool)

    monkeypatch.setattr(ray.util, "ActorPool", Recording)
    marks, out, hang = tmp_path / "m1", tmp_path / "killed", "scene_01|TIMI|1"
    marks.mkdir()
    killed = []

    def kill():
        if _wait_for(lambda: (marks / "hung").is_file()):
            actor_id = (marks / "hung").read_text()
            victim = next(a for a in actors if a._actor_id.hex() == actor_id)
            ray.kill(victim, no_restart=False)
            killed.append(actor_id)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    summaries, paths = evaluate_and_report(data, runs, MarkedGenerator(marks, hang=hang), out,
                                           engine=RayEngine(workers=2), **options)
    killer.join()
    assert killed, "the worker was never seen mid-scene"
    made = calls(marks)
    assert made.count(hang) == 2 and sorted(set(made)) == sorted(units) and len(made) == len(units) + 1
    scored = [(r["run"], r["scene"]) for r in csv.DictReader(paths["per_scene"].open())]
    assert len(scored) == len(set(scored)) == len(units)
    assert not list(out.rglob("*.tmp"))
    assert paths["per_scene"].read_text() == (reference / "per_scene.csv").read_text()

    # --- Ctrl-C after a few scenes, pressed once (issue 38: the first press stops the run), then the same call
    marks, out = tmp_path / "m2", tmp_path / "interrupted"
    marks.mkdir()

    def interrupt():
        if _wait_for(lambda: len(_stamps(out)) >= 3):
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # Python's own Ctrl-C
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            evaluate_and_report(data, runs, MarkedGenerator(marks, delay=0.5), out, engine=RayEngine(workers=2),
                                **options)
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(2)  # the killed workers are gone
    assert not list(out.rglob("*.tmp"))
    done = _stamps(out)
    assert 3 <= len(done) < len(units)
    before = len(calls(marks))
    _, paths = evaluate_and_report(data, runs, MarkedGenerator(marks), out, engine=RayEngine(workers=2), **options)
    assert len(calls(marks)) - before == len(units) - len(done)
    assert all(_stamps(out)[p] == t for p, t in done.items())
    assert paths["per_scene"].read_text() == (reference / "per_scene.csv").read_text()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_dropped_where_it_landed_still_stops_the_run():
    """Python runs a SIGINT handler in whatever Python code runs next; in a finalizer (or one of Ray's
    C callbacks) its KeyboardInterrupt is printed as "Exception ignored" and dropped, and a run on
    Ray went on (issue 38). ``CtrlC`` records the press, so the engine's next bounded wait raises it."""
    from timi.evaluation.ray_engine import CtrlC

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)   # the handler runs here, in a finalizer ...
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        Finalized()                               # ... whose KeyboardInterrupt Python drops
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is before
    ctrl_c.check()                                # outside its block a press is no longer the run's


def test_without_ray_or_cluster_one_line_and_exit_2(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLE, data / "example")
    args = ["eval", str(data), "--generator", "ray_helpers:MarkedGenerator", "--engine", "ray", "--out",
            str(tmp_path / "out")]
    refused = CliRunner().invoke(app, args + ["--address", "127.0.0.1:1"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == ["error: --address 127.0.0.1:1: no Ray cluster answers "
                                                   "(Connection refused)"]
    for command in ("variants", "control"):  # the testbed's evaluations take the same engine options
        testbed = CliRunner().invoke(app, ["testbed", command, str(data), "--engine", "ray", "--address", "127.0.0.1:1",
                                           "--out", str(tmp_path / "out")])
        assert testbed.exit_code == 2 and testbed.output.strip().splitlines() == [
            "error: --address 127.0.0.1:1: no Ray cluster answers (Connection refused)"], testbed.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1
    assert missing.output.startswith("error: --engine ray needs Ray") and "pip install 'timi[ray]'" in missing.output
    local_only = CliRunner().invoke(app, ["eval", str(data), "--generator", "ray_helpers:MarkedGenerator",
                                          "--workers", "2"])
    assert local_only.exit_code == 2 and "--workers needs --engine ray" in local_only.output
    assert not (tmp_path / "out").exists()  # nothing ran

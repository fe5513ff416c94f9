"""Tests of the evaluation harness (timi.evaluation) with a fake generator: tables, caching, resume,
skip-and-report of bad scenes, ablation/sweep planning, the `timi eval` command."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image
from typer.testing import CliRunner

from timi.cli import app
from timi.evaluation import Evaluator, MetricSettings, SceneError, load_scene, plan_runs, write_report
from timi.evaluation.runs import ablation_runs, sweep_runs
from timi.metrics import score_scene
from timi_core import TIMIConfig

POINTS = 400
FAST = MetricSettings(points_per_object=POINTS)
REPO = Path(__file__).resolve().parents[1]

# image hash -> ground-truth meshes, so the fake generator can "see" the answer
_GT_BY_IMAGE: dict[str, list[trimesh.Trimesh]] = {}
_FAIL_IMAGES: set[str] = set()
_EMPTY_IMAGES: set[str] = set()


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def fake_generate(image, masks, config: TIMIConfig, seed: int):
    """The ground truth with instance k moved by ``config.alpha`` along its own direction (so the
    metrics worsen with alpha); the base model (isg off) moves every instance by 0.3 instead."""
    key = _key(image)
    if key in _FAIL_IMAGES:
        raise RuntimeError("out of memory (simulated)")
    if key in _EMPTY_IMAGES:
        return trimesh.Trimesh(), None, 0.1
    gt = _GT_BY_IMAGE[key]
    assert masks.shape[0] == len(gt)
    shift = config.alpha if config.isg else 0.3
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])
    moved = [m.copy().apply_translation(shift * directions[k % 4]) for k, m in enumerate(gt)]
    return trimesh.util.concatenate(moved), None, 1.0 + 0.1 * len(gt)


class CountingGenerator:
    """Wraps ``fake_generate``; counts calls and can be told to stop (KeyboardInterrupt) after N."""

    identity = {"generator": "counting-fake"}

    def __init__(self, stop_after: int | None = None):
        self.calls = 0
        self.stop_after = stop_after

    def __call__(self, image, masks, config, seed):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return fake_generate(image, masks, config, seed)


def _scene_meshes(i: int) -> list[trimesh.Trimesh]:
    return [trimesh.creation.box((0.4, 0.4, 0.4)).apply_translation((-0.5, 0, 0)),
            trimesh.creation.icosphere(subdivisions=2, radius=0.2 + 0.02 * i).apply_translation((0.5, 0, 0)),
            trimesh.creation.cylinder(radius=0.15, height=0.4).apply_translation((0, 0.6, 0))][: 2 + i % 2]


def write_scene(root: Path, i: int, *, masks_format: str = "png") -> Path:
    folder = root / f"scene_{i:02d}"
    (folder / "gt").mkdir(parents=True)
    gt = _scene_meshes(i)
    labels = np.zeros((24, 24), np.uint8)
    for k in range(len(gt)):
        labels[2 + 7 * k: 8 + 7 * k, 3 + i: 12 + i] = k + 1
    image = np.full((24, 24, 4), 255, np.uint8)
    image[..., 3] = np.where(labels > 0, 255, 0)
    image[..., 0] = labels * 60 + i
    Image.fromarray(image, "RGBA").save(folder / "image.png")
    if masks_format == "png":
        Image.fromarray(labels, "L").save(folder / "masks.png")
    else:
        np.save(folder / "masks.npy", np.stack([labels == k + 1 for k in range(len(gt))]))
    for k, m in enumerate(gt, start=1):
        m.export(folder / "gt" / f"instance_{k:02d}.{('ply', 'obj', 'glb')[k % 3]}")
    _GT_BY_IMAGE[_key(np.asarray(Image.open(folder / "image.png").convert("RGBA")))] = gt
    return folder


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    for i in range(3):
        write_scene(root, i, masks_format="png" if i != 1 else "npy")
    return root


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


# ---------------------------------------------------------------- tables and values
def test_tables_and_plot_written_with_correct_values(dataset, tmp_path):
    out = tmp_path / "out"
    runs = plan_runs(with_baseline=True, sweeps=["alpha=0,0.05,0.1"])
    summaries = Evaluator(dataset, fake_generate, out, metrics=FAST, progress=False).evaluate(runs)
    paths = write_report(summaries, out, title="test")
    rows = {r["run"]: r for r in _read_csv(paths["csv"])}
    assert set(rows) == {"base model (no TIMI)", "alpha=0.0", "alpha=0.05", "alpha=0.1"}
    assert all(r["scenes_ok"] == "3" for r in rows.values())
    # alpha = 0 reproduces the ground truth: perfect scores
    assert float(rows["alpha=0.0"]["cd_s"]) < 1e-12 and float(rows["alpha=0.0"]["fs_s"]) == 1.0
    assert float(rows["alpha=0.0"]["ssr"]) == 1.0 and float(rows["alpha=0.0"]["lcd"]) < 1e-6
    # larger displacement -> larger layout error
    lcd = [float(rows[f"alpha={a}"]["lcd"]) for a in ("0.0", "0.05", "0.1")]
    assert lcd[0] < lcd[1] < lcd[2] < float(rows["base model (no TIMI)"]["lcd"])
    # seconds per scene = mean of what the generator reported: (1.2 + 1.3 + 1.2) / 3
    assert float(rows["alpha=0.1"]["seconds_per_scene"]) == pytest.approx(3.7 / 3, rel=1e-3)
    # a table mean equals the mean of score_scene on each scene (independent recomputation)
    per_scene = []
    for i in range(3):
        scene = load_scene(dataset / f"scene_{i:02d}")
        pred, _, _ = fake_generate(scene.image, scene.masks, TIMIConfig(alpha=0.05), 0)
        per_scene.append(score_scene(pred, scene.gt_meshes, points_per_object=POINTS).fs_o)
    assert float(rows["alpha=0.05"]["fs_o"]) == pytest.approx(np.mean(per_scene), rel=1e-4)
    md = paths["markdown"].read_text()
    assert "| LCD ↓ | CD-S ↓ | FS-S ↑ | SSR ↑ | CD-O ↓ | FS-O ↑ |" in md.replace("Run | ", "")
    assert "## sweep: alpha" in md and "| alpha=0.05 |" in md
    png = out / "plots" / "sweep_alpha.png"
    assert png.stat().st_size > 10_000 and Image.open(png).size[0] > 800
    assert len(_read_csv(paths["per_scene"])) == 12


# ---------------------------------------------------------------- caching and resume
def test_second_call_uses_the_cache(dataset, tmp_path):
    out = tmp_path / "out"
    runs = plan_runs(with_baseline=True)
    gen = CountingGenerator()
    first = Evaluator(dataset, gen, out, metrics=FAST, progress=False).evaluate(runs)
    assert gen.calls == 6
    again = CountingGenerator()
    second = Evaluator(dataset, again, out, metrics=FAST, progress=False).evaluate(runs)
    assert again.calls == 0
    assert [s.means for s in first] == [s.means for s in second]
    # other metric settings: scores recomputed from the cached meshes, still no generation
    third = Evaluator(dataset, again, out, metrics=MetricSettings(points_per_object=POINTS, threshold=0.05),
                      progress=False).evaluate(runs)
    assert again.calls == 0 and third[1].means["fs_s"] <= first[1].means["fs_s"]
    # the same configuration under another label shares the cache
    relabelled = [r.__class__(f"my label {i}", r.config) for i, r in enumerate(runs)]
    Evaluator(dataset, again, out, metrics=FAST, progress=False).evaluate(relabelled)
    assert again.calls == 0


def test_resume_after_interruption_gives_the_same_table(dataset, tmp_path):
    runs = plan_runs(ablations=["sgu-parts"])  # 3 runs x 3 scenes
    reference = Evaluator(dataset, CountingGenerator(), tmp_path / "ref", metrics=FAST, progress=False).evaluate(runs)
    bars = write_report(reference, tmp_path / "ref")["plot0"]
    assert bars.name == "group_table_5_gm_sr.png" and Image.open(bars).size[0] > 800
    out = tmp_path / "out"
    stopped = CountingGenerator(stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        Evaluator(dataset, stopped, out, metrics=FAST, progress=False).evaluate(runs)
    assert stopped.calls == 4
    assert not list(out.rglob("*.tmp"))  # no half-written file
    rest = CountingGenerator()
    resumed = Evaluator(dataset, rest, out, metrics=FAST, progress=False).evaluate(runs)
    assert rest.calls == 9 - 4
    assert [s.means for s in resumed] == [s.means for s in reference]


# ---------------------------------------------------------------- bad scenes
def test_bad_scenes_are_skipped_and_reported(dataset, tmp_path):
    shutil.rmtree(dataset / "scene_00" / "gt")                                  # no ground truth
    (dataset / "scene_02" / "gt" / "instance_02.glb").rename(dataset / "scene_02" / "gt" / "instance_07.glb")
    fail = write_scene(dataset, 3)                                             # generation raises
    _FAIL_IMAGES.add(_key(np.asarray(Image.open(fail / "image.png").convert("RGBA"))))
    empty = write_scene(dataset, 4)                                            # generator returns nothing
    _EMPTY_IMAGES.add(_key(np.asarray(Image.open(empty / "image.png").convert("RGBA"))))
    (dataset / "scene_05").mkdir()                                             # empty folder
    garbage = write_scene(dataset, 6, masks_format="npy")                      # unreadable masks
    (garbage / "masks.npy").write_bytes(b"not an array")
    broken = write_scene(dataset, 7)                                           # unreadable mesh
    (broken / "gt" / "instance_01.obj").write_text("v 0 0 0\nf 1 2 3\n")
    out = tmp_path / "out"
    summaries = Evaluator(dataset, fake_generate, out, metrics=FAST, progress=False, log=lambda m: None).evaluate(
        plan_runs())
    status = {r.scene_id: (r.status, r.error) for r in summaries[0].results}
    assert status["scene_01"][0] == "ok" and summaries[0].n_ok == 1 and summaries[0].n_scenes == 8
    assert status["scene_00"][0] == "bad-scene" and "gt" in status["scene_00"][1] and "missing" in status["scene_00"][1]
    assert status["scene_02"][0] == "bad-scene" and "[1, 7]" in status["scene_02"][1]
    assert status["scene_03"] == ("failed", "generation: RuntimeError: out of memory (simulated)")
    assert status["scene_04"][0] == "failed" and "no triangles" in status["scene_04"][1]
    assert status["scene_05"][0] == "bad-scene" and "image.png" in status["scene_05"][1]
    assert status["scene_06"][0] == "bad-scene" and "masks.npy" in status["scene_06"][1]
    assert status["scene_07"][0] == "bad-scene" and "instance_01.obj" in status["scene_07"][1]
    md = write_report(summaries, out)["markdown"].read_text()
    assert "## Skipped scenes" in md and "scene_03" in md and "| 1/8 |" in md
    assert (out / "logs").is_dir()


def test_scene_loading_errors_name_the_problem(tmp_path):
    folder = write_scene(tmp_path, 0)
    with pytest.raises(SceneError, match="no scene folders"):
        from timi.evaluation import discover_scenes
        discover_scenes(tmp_path / "scene_00" / "gt")
    (folder / "masks.png").unlink()
    with pytest.raises(SceneError, match="no masks.png or masks.npy"):
        load_scene(folder)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "masks.png")
    with pytest.raises(SceneError, match="masks.png"):
        load_scene(folder)


def test_loads_the_testbed_example_scene():
    scene = load_scene(REPO / "timi" / "assets" / "example")
    assert scene.masks.shape[0] == len(scene.gt_meshes) >= 1
    assert scene.image.shape[:2] == scene.masks.shape[1:] and scene.image.shape[2] == 4


# ---------------------------------------------------------------- run planning
def test_ablations_map_to_timi_config_fields():
    comp = ablation_runs("table2")
    assert [(r.config.isg, r.config.sgu) for r in comp] == [(False, False), (True, False), (True, True)]
    parts = ablation_runs("sgu-parts")
    assert [(r.config.sgu, r.config.gm, r.config.sr) for r in parts] == [(False, True, True), (True, True, False),
                                                                          (True, True, True)]
    assert parts[0].config == comp[1].config  # the paper's Table 5 first row is Table 2's second row
    assert [r.config.guided_layers for r in ablation_runs("layers")] == [1, 2, 3, 4, 5, 8]
    assert [r.config.guided_steps for r in ablation_runs("table4")] == [5, 10, 15, 20, 25]
    assert [r.config.alpha for r in ablation_runs("alpha")] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [r.value for r in ablation_runs("sigma")] == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert [r.config.guided_steps for r in sweep_runs("guided-steps=3,7")] == [3, 7]
    assert [r.config.guided_fraction for r in sweep_runs("guided-fraction=0.2,0.4")] == [0.2, 0.4]
    assert [r.config.sr for r in sweep_runs("sr=off,on")] == [False, True]
    assert [r.label for r in plan_runs()] == ["TIMI"]
    assert [r.config.isg for r in plan_runs(no_timi=True)] == [False]
    for bad, msg in (("gamma=1", "not a TIMIConfig field"), ("alpha", "FIELD=v1"), ("alpha=x", "not a number"),
                     ("alpha=-1", r"alpha=-1.0 is invalid"), ("guided_layers=1.5", "not an integer")):
        with pytest.raises(ValueError, match=msg):
            sweep_runs(bad)
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_runs("table9")


# ---------------------------------------------------------------- the command
def test_timi_eval_command(dataset, tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    args = ["eval", str(dataset), "--generator", f"{__name__}:fake_generate", "--baseline",
            "--sweep", "alpha=0,0.1", "--points", str(POINTS), "--out", str(out), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CD-S" in result.output and (out / "results.md").is_file() and (out / "plots" / "sweep_alpha.png").is_file()
    rows = _read_csv(out / "results.csv")
    assert [r["run"] for r in rows] == ["base model (no TIMI)", "alpha=0.0", "alpha=0.1"]
    bad = runner.invoke(app, ["eval", str(dataset), "--generator", f"{__name__}:fake_generate", "--sweep", "alpha"])
    assert bad.exit_code == 2 and "FIELD=v1" in bad.output
    both = runner.invoke(app, ["eval", str(dataset), "--model", "x", "--generator", f"{__name__}:fake_generate"])
    assert both.exit_code == 2 and "exactly one" in both.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--generator", f"{__name__}:fake_generate"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_changed_scene_inputs_are_generated_again(dataset, tmp_path):
    out = tmp_path / "out"
    runs = plan_runs()
    Evaluator(dataset, CountingGenerator(), out, metrics=FAST, progress=False).evaluate(runs)
    image_path = dataset / "scene_01" / "image.png"
    image = np.asarray(Image.open(image_path).convert("RGBA")).copy()
    image[0, 0, :3] = 7  # another input under the same scene id
    Image.fromarray(image, "RGBA").save(image_path)
    _GT_BY_IMAGE[_key(image)] = _scene_meshes(1)
    gen = CountingGenerator()
    Evaluator(dataset, gen, out, metrics=FAST, progress=False, log=lambda m: None).evaluate(runs)
    assert gen.calls == 1


def test_scoring_another_methods_predictions(dataset, tmp_path):
    pred = tmp_path / "midi_outputs"
    s0 = load_scene(dataset / "scene_00")
    (pred / "scene_00").mkdir(parents=True)
    for k, m in enumerate(s0.gt_meshes, start=1):  # per-instance outputs, paired by index
        m.export(pred / "scene_00" / f"instance_{k:02d}.glb")
    (pred / "scene_00" / "generation.json").write_text(json.dumps({"seconds": 2.5}))
    s1 = load_scene(dataset / "scene_01")
    (pred / "scene_01").mkdir()
    trimesh.util.concatenate([m.copy().apply_translation((0.2, 0, 0)) for m in s1.gt_meshes]).export(
        pred / "scene_01" / "scene.ply")
    (pred / "scene_2").mkdir()  # misnamed: scene_02 has no prediction
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(dataset), "--predictions", str(pred), "--label", "MIDI",
                                      "--points", str(POINTS), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {r["scene"]: r for r in _read_csv(out / "per_scene.csv")}
    assert rows["scene_00"]["status"] == "ok" and float(rows["scene_00"]["cd_s"]) < 1e-12
    assert float(rows["scene_00"]["fs_o"]) == 1.0 and rows["scene_00"]["seconds"] == "2.5"
    assert rows["scene_01"]["status"] == "ok" and rows["scene_01"]["seconds"] == ""
    assert rows["scene_02"]["status"] == "failed" and "no prediction for scene 'scene_02'" in rows["scene_02"]["error"]
    summary = _read_csv(out / "results.csv")
    assert [(r["run"], r["scenes_ok"], r["seconds_per_scene"]) for r in summary] == [("MIDI", "2", "2.5")]
    mixed = CliRunner().invoke(app, ["eval", str(dataset), "--predictions", str(pred), "--sweep", "alpha=0.1"])
    assert mixed.exit_code == 2 and "need a model" in mixed.output
    # one Table 1 with the base model, another method's outputs and TIMI, in the paper's order
    table = CliRunner().invoke(app, ["eval", str(dataset), "--generator", f"{__name__}:fake_generate", "--baseline",
                                     "--predictions", str(pred), "--label", "MIDI", "--points", str(POINTS),
                                     "--out", str(out), "--quiet"])
    assert table.exit_code == 0, table.output
    summary = _read_csv(out / "results.csv")
    assert [(r["run"], r["scenes_ok"]) for r in summary] == [("base model (no TIMI)", "3"), ("MIDI", "2"),
                                                             ("TIMI", "3")]


def test_default_model_is_the_shipped_one(dataset, monkeypatch):
    import timi.testbed

    def missing():
        raise FileNotFoundError("the shipped testbed model is missing at X")

    monkeypatch.setattr(timi.testbed, "default_model_path", missing)
    result = CliRunner().invoke(app, ["eval", str(dataset)])
    assert result.exit_code == 2 and "no --model given" in result.output and "missing at X" in result.output


def test_unguided_configurations_share_one_cache_key():
    from timi.evaluation.runner import run_key
    from timi.evaluation.runs import Run

    ident = {"generator": "fake"}
    unguided = [TIMIConfig(isg=False), TIMIConfig(isg=False, sgu=False), TIMIConfig(guided_steps=0),
                TIMIConfig(guided_layers=0, alpha=0.3), TIMIConfig.paper(isg=False),
                TIMIConfig(isg=False, common="only")]
    keys = {run_key(Run("x", c), 0, ident) for c in unguided}
    assert len(keys) == 1
    # The base model's key does not move when a default changes (caches written earlier stay
    # valid): it is the key every cache since testbed v2 was written with.
    assert keys == {"e1d05731459d"}
    guided = {run_key(Run("x", c), 0, ident) for c in (TIMIConfig(), TIMIConfig(sgu=False), TIMIConfig(alpha=0.2))}
    assert len(guided) == 3 and not (guided & keys)


def test_several_seeds_give_one_pair_per_scene_and_seed(dataset, tmp_path):
    out = tmp_path / "seeds"
    args = ["eval", str(dataset), "--generator", f"{__name__}:fake_generate", "--baseline", "--seed", "0",
            "--seed", "1", "--points", str(POINTS), "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "per_scene.csv")
    ok = {r["scene"] for r in rows if r["run"] == "TIMI" and r["status"] == "ok"}
    assert ok and all(s.endswith(("@seed0", "@seed1")) for s in ok)
    text = (out / "results.md").read_text()
    # the fake TIMI moves instances by 0.1 instead of the base model's 0.3: CD-S lower on every pair
    paired = text[text.index("Paired differences"):]
    line = next(l for l in paired.splitlines() if l.startswith("| TIMI | "))
    assert "**better**" in line.split("|")[3] and f"| {len(ok)} |" in line


def test_a_seed_evaluated_alone_is_scored_as_in_a_multi_seed_call(dataset, tmp_path):
    """The metric seed does not follow the sampling seeds: ``--seed 1`` alone (e.g. in a second
    process) writes the scores that ``--seed 0 --seed 1`` reads, so merging per-seed runs scores
    nothing again, and the merged table equals the one-call table."""
    common = ["--generator", f"{__name__}:fake_generate", "--baseline", "--points", str(POINTS), "--quiet"]
    split, joint = tmp_path / "split", tmp_path / "joint"
    for seeds in (["--seed", "1"], ["--seed", "0"]):
        assert CliRunner().invoke(app, ["eval", str(dataset), *common, *seeds, "--out", str(split)]).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in split.glob("cache/*/*/scores-*.json")}
    both = ["--seed", "0", "--seed", "1"]
    result = CliRunner().invoke(app, ["eval", str(dataset), *common, *both, "--out", str(split)])
    assert result.exit_code == 0, result.output
    after = {p: p.stat().st_mtime_ns for p in split.glob("cache/*/*/scores-*.json")}
    assert before and after == before  # no new score file, none rewritten
    assert CliRunner().invoke(app, ["eval", str(dataset), *common, *both, "--out", str(joint)]).exit_code == 0
    assert (split / "per_scene.csv").read_text() == (joint / "per_scene.csv").read_text()
    # another --metric-seed is another set of scores
    result = CliRunner().invoke(app, ["eval", str(dataset), *common, "--seed", "1", "--metric-seed", "3",
                                      "--out", str(split)])
    assert result.exit_code == 0 and len(list(split.glob("cache/*/*/scores-*.json"))) > len(after)

"""`timi eval --model` end to end on a tiny random-weight hy3dgen model (timi_torch.TIMIPipeline)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("hy3dgen")

from timi.cli import app  # noqa: E402
from timi_torch import write_tiny_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_timi_eval_with_the_torch_pipeline(tmp_path):
    model = write_tiny_model_dir(tmp_path / "tiny", image_size=112)
    data = tmp_path / "data"
    shutil.copytree(REPO / "timi" / "assets" / "example", data / "example")
    out = tmp_path / "out"
    args = ["eval", str(data), "--model", str(model), "--baseline", "--device", "cpu", "--steps", "2",
            "--octree-resolution", "32", "--points", "300", "--set", "guided_layers=2", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"base model (no TIMI)", "TIMI"}
    for row in rows.values():
        assert row["scenes_ok"] == "1", result.output
        assert float(row["seconds_per_scene"]) > 0 and 0 <= float(row["fs_s"]) <= 1
        # issue 38: the Time split into sampling + mesh, and the scoring timi eval adds (not in the Time)
        sampling, mesh, scoring = (float(row[k]) for k in ("sampling_seconds", "mesh_seconds", "scoring_seconds"))
        assert sampling > 0 and mesh > 0 and scoring > 0
        assert sampling + mesh == pytest.approx(float(row["seconds_per_scene"]), rel=1e-2)
    assert "Scoring (s/scene)" in result.output and "not part of the Time" in result.output
    generated = sorted(out.glob("cache/*/example/generation.json"))
    assert len(generated) == 2
    # issue 27: every guided run is also scored at the base model's size, from its cached latents
    assert "SSR - base, matched size" in result.output and "area / base" in result.output
    scenes = {r["run"]: r for r in csv.DictReader((out / "per_scene.csv").open())}
    assert float(scenes["base model (no TIMI)"]["base_area"]) == pytest.approx(float(scenes["TIMI"]["base_area"]))
    assert float(scenes["TIMI"]["area"]) > 0 and scenes["TIMI"]["matched_level"] != ""
    assert len(list(out.glob("cache/*/example/latents.npy"))) == 2
    assert len(list(out.glob("cache/*/example/matched.ply"))) == 1
    stamps = [p.stat().st_mtime_ns for p in generated]
    again = CliRunner().invoke(app, args)  # resumes from the cache: nothing generated again
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in generated] == stamps
    assert list(csv.DictReader((out / "results.csv").open())) == list(rows.values())


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_shuffled_gradient_control_shares_timi_evals_cache(tmp_path):
    """`timi testbed control` after `timi eval`: base and TIMI come from the cache, only the control
    is generated, and its update (TIMI's gradient rows given to random tokens) changes the output."""
    model = write_tiny_model_dir(tmp_path / "tiny", image_size=112)
    data = tmp_path / "data"
    shutil.copytree(REPO / "timi" / "assets" / "example", data / "example")
    out = tmp_path / "out"
    common = ["--model", str(model), "--device", "cpu", "--steps", "2", "--octree-resolution", "32",
              "--points", "300", "--set", "guided_layers=2", "--out", str(out), "--quiet"]
    assert CliRunner().invoke(app, ["eval", str(data), "--baseline", *common]).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.glob("cache/*/example/generation.json")}
    result = CliRunner().invoke(app, ["testbed", "control", str(data), *common])
    assert result.exit_code == 0, result.output
    after = {p: p.stat().st_mtime_ns for p in out.glob("cache/*/example/generation.json")}
    assert len(before) == 2 and len(after) == 3 and all(after[p] == t for p, t in before.items())
    rows = {r["run"]: r for r in csv.DictReader((out / "control" / "results.csv").open())}
    assert set(rows) == {"base model (no TIMI)", "TIMI", "TIMI, gradient rows shuffled (control)"}
    table = result.output[result.output.index("## TIMI - control"):]
    assert "| Run - control |" in table and "\n| TIMI | " in table
    (control,) = set(after) - set(before)
    timi_run = next(p for p in before if '"isg": true' in (p.parents[1] / "config.json").read_text())
    assert (control.parent / "scene.ply").read_bytes() != (timi_run.parent / "scene.ply").read_bytes()

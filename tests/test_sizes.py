"""`timi testbed sizes`: surface-area ratios from a hand-made eval cache (area scales as s**2)."""

from __future__ import annotations

import json
import re

import numpy as np
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from timi.cli import app
from timi.evaluation.runner import cached_runs
from timi.testbed.sizes import area_table

BASE = "base model (no TIMI)"


def _cache(tmp, radii, scale, gt_radius, seeds=(0,)):
    """A `timi eval` cache: base spheres of the given radii, the run's scaled by `scale`."""
    data, out = tmp / "data", tmp / "eval"
    for i, r in enumerate(radii):
        gt = data / f"s{i}" / "gt"
        gt.mkdir(parents=True, exist_ok=True)
        trimesh.creation.icosphere(subdivisions=2, radius=gt_radius).export(gt / "instance_01.ply")
    for seed in seeds:
        for label, s in ((BASE, 1.0), ("TIMI", scale)):
            run = out / "cache" / f"{label[:4]}{seed}"
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"seed": seed, "first_label": label}))
            for i, r in enumerate(radii):
                (run / f"s{i}").mkdir()
                sphere = trimesh.creation.icosphere(subdivisions=2, radius=r)
                sphere.apply_scale(s)
                sphere.export(run / f"s{i}" / "scene.ply")
    return data, out


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(0.2, 0.9), min_size=2, max_size=5), st.floats(0.5, 1.5), st.floats(0.3, 0.8))
def test_area_ratio_is_the_square_of_the_scale(tmp_path_factory, radii, scale, gt_radius):
    data, out = _cache(tmp_path_factory.mktemp("a"), radii, scale, gt_radius)
    table = area_table(data, out, ["TIMI"], BASE)
    row = next(ln for ln in table.splitlines() if ln.startswith("| TIMI |"))
    g, lo, hi, to_gt = map(float, re.findall(r"\d+\.\d+", row))
    assert abs(g - scale**2) < 1e-3 and abs(lo - scale**2) < 1e-3 and abs(hi - scale**2) < 1e-3, row
    expected = np.exp(np.mean(np.log((scale * np.asarray(radii) / gt_radius) ** 2)))
    assert abs(to_gt - expected) < 1e-3 * max(1.0, expected), (row, expected)


def test_runs_are_found_by_seed_and_a_missing_label_is_one_line(tmp_path):
    data, out = _cache(tmp_path, [0.5, 0.6], 0.8, 0.5, seeds=(0, 1))
    assert set(cached_runs(out, 1)) == {BASE, "TIMI"} and cached_runs(out, 2) == {}
    result = CliRunner().invoke(app, ["testbed", "sizes", str(data), "--eval-dir", str(out), "--seed", "0", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "| TIMI | 4 | 0.640 [0.640, 0.640] |" in result.output, result.output
    bad = CliRunner().invoke(app, ["testbed", "sizes", str(data), "--eval-dir", str(out), "--run", "nope"])
    errors = [ln for ln in bad.output.splitlines() if ln.startswith("error:")]
    assert bad.exit_code == 2 and len(errors) == 1 and "'nope'" in errors[0], bad.output


def test_two_runs_first_cached_under_one_label_are_refused(tmp_path):
    data, out = _cache(tmp_path, [0.5, 0.6], 0.8, 0.5)
    twin = out / "cache" / "twin0"
    twin.mkdir()
    (twin / "config.json").write_text(json.dumps({"seed": 0, "first_label": "TIMI"}))
    bad = CliRunner().invoke(app, ["testbed", "sizes", str(data), "--eval-dir", str(out)])
    errors = [ln for ln in bad.output.splitlines() if ln.startswith("error:")]
    assert bad.exit_code == 2 and len(errors) == 1 and "two cached runs are labelled 'TIMI'" in errors[0], bad.output

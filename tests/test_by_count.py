"""``timi testbed by-count``: paired tables split by instance count, read from per_scene.csv."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from timi.evaluation.by_count import by_count, read_rows

FIELDS = ["run", "scene", "status", "lcd", "fs_s", "ssr", "n_gt", "area", "matched_ssr"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        k = 2 + i % 3
        scene = f"s{i}@seed0"
        base = dict(run="base model (no TIMI)", scene=scene, status="ok", lcd=rng.random(), fs_s=rng.random(),
                    ssr=0.5, n_gt=k, area=2.0, matched_ssr="")
        run = dict(run="TIMI", scene=scene, status="ok", lcd=base["lcd"] + 0.1, fs_s=base["fs_s"], ssr=0.5 + 0.1 * k,
                   n_gt=k, area=2.0 * (0.5 if k == 4 else 1.0), matched_ssr=0.5 - 0.1 * (k == 4))
        rows += [base, run]
    rows.append(dict(run="TIMI", scene="broken", status="error", lcd="", fs_s="", ssr="", n_gt=2, area="", matched_ssr=""))
    _write(tmp_path / "per_scene.csv", rows)
    return tmp_path


def test_differences_and_area_are_split_by_instance_count(folder):
    table = {e["k"]: e for e in by_count(read_rows([folder]), "TIMI")}
    assert [table[k]["pairs"] for k in (2, 3, 4, "all")] == [4, 4, 4, 12]
    for k in (2, 3, 4):
        assert table[k]["ssr"][0] == pytest.approx(0.1 * k)                  # run - base, exactly
        assert table[k]["area"][0] == pytest.approx(0.5 if k == 4 else 1.0)   # geometric mean of the ratios
        assert table[k]["matched_ssr"][0] == pytest.approx(-0.1 if k == 4 else 0.0)
    assert table["all"]["ssr"][0] == pytest.approx(0.3)
    assert table["all"]["area"][0] == pytest.approx(0.5 ** (1 / 3))
    assert table["all"]["lcd"][0] == pytest.approx(0.1)


def test_cli_prints_the_tables_and_names_a_missing_folder(folder, tmp_path):
    from timi.cli import app

    result = CliRunner().invoke(app, ["testbed", "by-count", str(folder)])
    assert result.exit_code == 0 and "### TIMI" in result.output and "| 4 | 4 | 0.500" in result.output
    missing = CliRunner().invoke(app, ["testbed", "by-count", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "per_scene.csv" in missing.output

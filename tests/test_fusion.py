"""`timi testbed fusion`: part-count transitions and fusion by gap, on hand-made eval outputs."""

from __future__ import annotations

import csv
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from timi.cli import app
from timi.testbed.fusion import fusion_by_gap, transitions

FIELDS = ["run", "scene", "status", "n_pred", "n_gt"]


def _write(tmp, rows, gaps):
    data = tmp / "data"
    for sid, g in gaps.items():
        (data / sid).mkdir(parents=True, exist_ok=True)
        (data / sid / "layout.json").write_text(json.dumps({"gaps": g}))
    path = tmp / "per_scene.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path, data


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 4), st.integers(0, 6), st.integers(0, 6), st.floats(0.04, 0.15)),
                min_size=1, max_size=12))
def test_transitions_count_each_pair_once_by_both_categories(tmp_path_factory, scenes):
    tmp = tmp_path_factory.mktemp("f")
    rows, gaps = [], {}
    for i, (n_gt, base, run, gap) in enumerate(scenes):
        sid = f"s{i:02d}"
        gaps[sid] = [gap, gap + 0.01]
        rows += [{"run": "base", "scene": f"{sid}@seed0", "status": "ok", "n_pred": base, "n_gt": n_gt},
                 {"run": "TIMI", "scene": f"{sid}@seed0", "status": "ok", "n_pred": run, "n_gt": n_gt}]
    rows.append({"run": "TIMI", "scene": "s99@seed0", "status": "failed", "n_pred": "", "n_gt": ""})
    path, data = _write(tmp, rows, gaps)
    t = transitions(path, "base", "TIMI")
    cat = lambda p, g: "fewer" if p < g else "more" if p > g else "right"  # noqa: E731
    for a in t:
        for b in t[a]:
            assert t[a][b] == sum(cat(bs, g) == a and cat(rs, g) == b for g, bs, rs, _ in scenes)
    bins = fusion_by_gap(path, data, "base", edges=(0.0, 0.1, 1.0))
    assert sum(b["pairs"] for b in bins) == len(scenes)
    assert bins[0]["fused"] == sum(bs < g and gap < 0.1 for g, bs, _, gap in scenes)


def test_command_prints_the_tables_and_names_a_missing_eval(tmp_path):
    rows = [{"run": r, "scene": f"s{i}@seed0", "status": "ok", "n_pred": p, "n_gt": 2}
            for i, (b, t) in enumerate([(1, 2), (2, 2), (1, 1), (2, 3)]) for r, p in (("base model (no TIMI)", b), ("TIMI", t))]
    path, data = _write(tmp_path, rows, {f"s{i}": [0.05 + 0.03 * i] for i in range(4)})
    result = CliRunner().invoke(app, ["testbed", "fusion", str(data), "--eval-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| fewer | 1 | 1 | 0 |" in result.output and "| right | 0 | 1 | 1 |" in result.output
    assert "Spearman" in result.output
    bad = CliRunner().invoke(app, ["testbed", "fusion", str(data), "--eval-dir", str(tmp_path / "nope")])
    errors = [ln for ln in bad.output.splitlines() if ln.startswith("error:")]
    assert bad.exit_code == 2 and len(errors) == 1 and "per_scene.csv does not exist" in errors[0], bad.output

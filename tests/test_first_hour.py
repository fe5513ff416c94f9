"""A new user's first hour (issue 38, item 5): what the command line says, once, on a line of its own,
and what the report's pictures mean (``--out`` naming a folder: tests/test_bad_inputs.py's cases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from torch_helpers import tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "timi" / "assets" / "example"


def _env() -> dict:
    paths = [str(ROOT), str(ROOT / "adapters/torch"), str(ROOT / "adapters/jax"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}


def test_a_run_says_each_thing_once(tiny_model, tmp_path):
    """A JPEG picture's "no alpha channel" warning shows once (it showed at the start and again at the
    end), hy3dgen's "INFO - Loading model from" line not at all, and ``--guided-steps 0`` says that
    the run is unguided because it was asked for (it said only "TIMI guidance: off")."""
    picture = tmp_path / "pic.jpg"
    Image.open(EXAMPLE / "image.png").convert("RGB").save(picture)
    run = subprocess.run([sys.executable, "-m", "timi.cli", "generate", str(picture), "--masks", str(EXAMPLE / "masks.png"),
                          "--out", str(tmp_path / "x.glb"), "--model", str(tiny_model), "--steps", "2",
                          "--octree-resolution", "16", "--guided-steps", "0", "--quiet"],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    both = run.stdout + run.stderr
    assert both.count("has no alpha channel") == 1, both
    assert "Loading model" not in both and " - INFO - " not in both, both
    assert "--guided-steps 0 guides no step" in both and "as asked" in both, both


def test_an_error_line_after_a_progress_bar_starts_its_own_line(capsys):
    """An error or Ctrl-C while a progress bar is drawn: the line starts a line of its own (it was
    glued onto the bar's, whose generator closes only once the traceback is gone)."""
    import typer
    from rich.console import Console
    from tqdm.auto import tqdm

    from timi.cli_common import run_cli

    def work():
        for i in tqdm(range(10), desc="TIMI sampling", file=sys.stderr):
            if i == 3:
                raise ValueError("bad input")

    def decode():
        bar = tqdm(desc="Volume decoding", unit="chunk", file=sys.stderr)
        bar.update(2)
        raise KeyboardInterrupt

    for fn, line in ((work, "error: bad input"), (decode, "interrupted (Ctrl-C)")):
        with pytest.raises(typer.Exit):
            run_cli(fn, Console(stderr=True, soft_wrap=True))
        err = capsys.readouterr().err
        assert line in err and f"\n{line}" in err, repr(err[-300:])


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_help_at_80_columns_cuts_no_word(command):
    from timi.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0 and max(len(line) for line in result.output.splitlines()) <= 80
    assert "…" not in result.output, [line for line in result.output.splitlines() if "…" in line]


def test_out_help_names_every_format_the_writer_takes():
    from timi.cli import app
    from timi.io import MESH_FORMATS

    out = " ".join(CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output.split())
    assert all(ext in out for ext in MESH_FORMATS), out


def test_app_start_up_names_the_command_line_share_option():
    from timi.webapp.cli import launch_options, startup_lines

    assert launch_options("127.0.0.1", None, False, 20)["quiet"]   # Gradio's "set `share=True` in `launch()`" off
    lines = startup_lines("http://127.0.0.1:7860/", share=False)
    assert "Running on local URL:  http://127.0.0.1:7860/" in lines[0]
    assert any("timi app --share" in line for line in lines) and not any("share=True" in line for line in lines)
    assert not any("--share" in line for line in startup_lines("http://127.0.0.1:7860/", share=True))


def test_report_views_take_each_instances_own_colour():
    """The orange box is drawn orange (it was drawn in the palette's blue); instances that look alike
    take the palette, and the legend says which the colours are."""
    from timi.instances import instance_colors
    from timi.report import instance_view_colors

    image = np.asarray(Image.open(EXAMPLE / "image.png").convert("RGB"))
    labels = np.asarray(Image.open(EXAMPLE / "masks.png"))
    masks = np.stack([labels == k for k in (1, 2, 3)])
    colors, note = instance_view_colors(image, masks)
    assert "own" in note and colors.shape == (3, 4)
    for k in range(3):
        np.testing.assert_allclose(colors[k, :3], np.median(image[masks[k]] / 255.0, axis=0))
    assert colors[0, 0] > 0.6 and colors[0, 2] < 0.3          # label_1 is the orange box
    grey = np.full_like(image, 128)
    colors, note = instance_view_colors(grey, masks)
    assert "palette" in note and np.allclose(colors, instance_colors(3) / 255.0)


def test_stage_table_says_what_each_time_covers():
    """The denoise row says how many steps TIMI guided and through how many of the DiT's blocks (what
    sets its cost: 4 of the shipped model's 5 blocks, 4 of the full-size DiT's 48), the mesh row the decoding."""
    from types import SimpleNamespace

    from timi.generate import GenerateOptions, stage_notes

    pipe = SimpleNamespace(base=SimpleNamespace(model=SimpleNamespace(double_blocks=[0] * 4, single_blocks=[0])))
    opts = GenerateOptions(image=None, masks=[], out=Path("x.glb"), octree_resolution=128)
    notes = stage_notes(opts, pipe, guided=15, depth=4)
    assert notes["denoise"] == "50 steps, 15 TIMI-guided: each differentiates through the first 4 of the DiT's 5 blocks"
    assert notes["mesh"] == "coarse-to-fine decoding, octree 128"
    assert "none guided" in stage_notes(opts, pipe, guided=0, depth=4)["denoise"]

"""``timi app``'s functions without a browser: mask proposal, merging, splitting, painting -> label
map, the hand-over to ``timi generate``'s reader, the run (the same code path and result as the
command line), one-line errors, the command's safe defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import hy3dgen.shapegen  # noqa: F401  (binds hy3dgen's log handler to the real stderr, not the runner's)
from typer.testing import CliRunner

from timi.webapp import masks as M
from torch_helpers import tiny_model  # noqa: F401  (fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"


def _iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _matches(labels: np.ndarray, truth: np.ndarray) -> list[float]:
    """Best IoU of each true instance with a proposed one, and one proposed instance per true one."""
    K = int(truth.max())
    assert labels.max() == K, (labels.max(), K)
    ious = np.array([[_iou(labels == i, truth == j) for j in range(1, K + 1)] for i in range(1, K + 1)])
    assert sorted(ious.argmax(1)) == list(range(K)), ious
    return list(ious.max(0))


@pytest.fixture(scope="module")
def example():
    return np.asarray(Image.open(EXAMPLE / "image.png")), np.asarray(Image.open(EXAMPLE / "masks.png")).astype(np.int32)


def touching_scene(H=120, W=200):
    """Two touching boxes, brown and blue, each shaded from dark to light across (no alpha gap)."""
    img = np.zeros((H, W, 4), np.uint8)
    shade = np.linspace(0.5, 1.0, W)[None, :, None]
    truth = np.zeros((H, W), np.int32)
    for k, (ys, xs, colour) in enumerate(((slice(20, 100), slice(20, 100), (200, 90, 40)),
                                          (slice(30, 110), slice(100, 180), (40, 40, 200)))):
        img[ys, xs, :3] = (np.array(colour) * shade[:, xs]).astype(np.uint8)
        img[ys, xs, 3] = 255
        truth[ys, xs] = k + 1
    return img, truth


# ------------------------------------------------------------------------------- proposal


def test_proposal_finds_the_example_instances(example):
    """The example's three objects, each shaded over two or three faces, come out as three masks
    equal to the shipped ground-truth masks (no face split off by its shading)."""
    img, truth = example
    assert min(_matches(M.propose_labels(img), truth)) > 0.98


def test_proposal_splits_touching_objects_by_colour():
    img, truth = touching_scene()
    from skimage.measure import label

    assert label(img[..., 3] > 0).max() == 1  # one connected part of the alpha
    assert min(_matches(M.propose_labels(img), truth)) > 0.95


def test_proposal_on_a_picture_without_alpha(example):
    """No alpha: the foreground is what differs from the border colour (white here)."""
    img, truth = example
    a = img[..., 3:4] / 255.0
    rgb = (img[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    fg = M.foreground_of(rgb)
    assert _iou(fg, truth > 0) > 0.97
    assert min(_matches(M.propose_labels(rgb), truth)) > 0.95
    assert M.propose_labels(np.full((40, 50, 4), 0, np.uint8)).max() == 0  # all transparent: nothing


# ---------------------------------------------------------------------------------- edits


def test_merge_split_remove(example):
    img, truth = example
    merged = M.merge_labels(truth, [1, 3])
    assert merged.max() == 2
    np.testing.assert_array_equal(merged == 1, (truth == 1) | (truth == 3))  # the smaller id keeps its place
    np.testing.assert_array_equal(merged == 2, truth == 2)
    back = M.split_label(merged, 1, img)  # two separate pieces: split into them, in place
    assert back.max() == 3 and min(_matches(back, truth)) == 1.0
    np.testing.assert_array_equal(back == 3, truth == 2)  # the later instance moved up one place
    removed = M.remove_labels(truth, [2])
    assert removed.max() == 2 and not removed[truth == 2].any()
    np.testing.assert_array_equal(removed == 2, truth == 3)
    assert np.array_equal(M.merge_labels(truth, [2]), truth)  # one id: nothing to merge


def test_split_one_piece_by_colour():
    img, truth = touching_scene()
    one = (truth > 0).astype(np.int32)
    two = M.split_label(one, 1, img)
    assert min(_matches(two, truth)) > 0.95
    assert np.array_equal(M.split_label(one, 0, img), one)  # background: unchanged


def test_names_follow_the_edits(example):
    _, truth = example
    names = ["box", "bar", "can"]
    assert M.carry_names(truth, M.merge_labels(truth, [1, 2]), names) == ["box", "can"]
    assert M.carry_names(truth, M.remove_labels(truth, [1]), names) == ["bar", "can"]
    extra = truth.copy()
    extra[:3, :3] = 4
    assert M.carry_names(truth, extra, names, "sam") == ["box", "bar", "can", "sam_4"]


def test_label_at_and_overlay(example):
    img, truth = example
    ys, xs = np.nonzero(truth == 2)
    assert M.label_at(truth, xs[0], ys[0]) == 2 and M.label_at(truth, -1, 0) == 0 and M.label_at(truth, 10**6, 0) == 0
    plain = M.labels_overlay(img, truth)
    sel = M.labels_overlay(img, truth, [2])
    assert plain.shape == img.shape[:2] + (3,) and plain.dtype == np.uint8
    changed = np.any(plain != sel, axis=-1)
    assert changed.any() and (sel[changed] == 0).all()  # the selection is outlined in black ...
    from scipy import ndimage

    near = ndimage.binary_dilation(truth == 2, iterations=2) & ~ndimage.binary_erosion(truth == 2, iterations=2)
    assert not (changed & ~near).any()  # ... along instance 2's border only
    assert (plain[truth == 0] == 255).all()  # transparent background on white


# --------------------------------------------------------------------------------- painting


def test_painted_layers_to_labels():
    """One layer with two palette colours (blended brush edges) and a second layer: three
    instances in layer then palette order; a later layer paints over an earlier one."""
    H, W = 60, 80
    c0, c1, c2 = (np.array(M.parse_colour(M.PALETTE[i])) for i in (0, 1, 2))
    one = np.zeros((H, W, 4), np.uint8)
    one[5:25, 5:30, :3], one[5:25, 5:30, 3] = c1, 255      # palette 1 first in space, but second in palette order
    one[30:55, 5:30, :3], one[30:55, 5:30, 3] = c0, 255
    one[25, 5:30, :3], one[25, 5:30, 3] = (c0 + c1) // 2 + 3, 200   # an anti-aliased seam: nearest colour wins
    one[56, 5:30, 3] = 60                                            # faint brush edge: not painted
    two = np.zeros((H, W, 4), np.uint8)
    two[10:50, 20:70, :3], two[10:50, 20:70, 3] = c2, 255
    labels = M.painted_labels([one, two], (H, W))
    assert labels.max() == 3
    assert (labels[30:55, 5:20] == 1).all() and (labels[5:25, 5:20] == 2).all() and (labels[10:50, 20:70] == 3).all()
    assert (labels[56] == 0).all()
    small = np.asarray(Image.fromarray(two).resize((W // 2, H // 2), Image.NEAREST))  # another canvas size
    assert _iou(M.painted_labels([small], (H, W)) == 1, labels == 3) > 0.9
    assert M.painted_labels([], (H, W)).max() == 0
    assert M.parse_colour("rgb(204, 50, 50)") == (204, 50, 50) and M.parse_colour("rgba(1,2,3,0.5)") == (1, 2, 3)


# ----------------------------------------------------------------- hand-over to the reader


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16), st.booleans())
def test_rle_round_trip_through_the_command_lines_reader(h, w, seed, corner):
    """rle_encode is the inverse of the reader's decoder (timi.masks_io.rle_decode, tested against pycocotools)."""
    from timi.masks_io import rle_decode

    mask = np.random.default_rng(seed).random((h, w)) > 0.5
    mask[0, 0] = corner
    np.testing.assert_array_equal(rle_decode(M.rle_encode(mask)), mask)


def test_masks_json_keeps_order_and_names(example, tmp_path):
    from timi.masks_io import read_masks

    _, truth = example
    path = M.write_masks_json(truth, tmp_path / "m.json", ["box", "bar", "can"])
    found = read_masks(path)
    assert found.names == ["box", "bar", "can"]
    np.testing.assert_array_equal(found.masks, M.masks_from_labels(truth))
    assert M.write_masks_json(np.zeros_like(truth), tmp_path / "none.json") is None


# ------------------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def cfg(tiny_model, tmp_path_factory):
    from timi.webapp.run import AppConfig

    return AppConfig(model=str(tiny_model), workdir=tmp_path_factory.mktemp("appwork"), device="cpu")


FAST = dict(steps=2, guided_steps=2, octree_resolution=16, seed=3)


def test_preview_is_timi_inspects(example, cfg, tmp_path):
    from timi.webapp.run import preview

    img, truth = example
    pv = preview(EXAMPLE / "image.png", truth, ["box", "bar", "can"], cfg, tmp_path)
    assert pv.count == 3 and pv.names == ["box", "bar", "can"] and pv.notes == []
    assert np.asarray(Image.open(pv.figure).convert("L")).std() > 5
    one = (truth > 0).astype(np.int32)  # one instance: the command line's warning, word for word
    notes = preview(EXAMPLE / "image.png", one, ["all"], cfg, tmp_path).notes
    assert any("only one instance mask" in n for n in notes)
    from timi.masks_io import MaskInputError

    outside = truth.copy()
    outside[:3, :3] = 4  # alpha is 0 there
    with pytest.raises(MaskInputError, match="outside the picture's foreground"):
        preview(EXAMPLE / "image.png", outside, [], cfg, tmp_path)


def test_uploaded_files_use_the_command_lines_reader(example, cfg, tmp_path):
    from timi.masks_io import MaskInputError
    from timi.webapp.run import masks_from_files

    _, truth = example
    labels, names, notes = masks_from_files(EXAMPLE / "image.png", [EXAMPLE / "masks.png"], cfg)
    np.testing.assert_array_equal(labels, truth)
    assert names == ["label_1", "label_2", "label_3"]
    for k in range(3):
        Image.fromarray((truth == k + 1).astype(np.uint8) * 255).save(tmp_path / f"cup{k}.png")
    labels, names, _ = masks_from_files(EXAMPLE / "image.png", sorted(tmp_path.glob("cup*.png")), cfg)
    assert names == ["cup0", "cup1", "cup2"] and np.array_equal(labels, truth)
    np.save(tmp_path / "overlap.npy", np.stack([truth == 1, truth > 0]))
    with pytest.raises(MaskInputError, match="overlap"):
        masks_from_files(EXAMPLE / "image.png", [tmp_path / "overlap.npy"], cfg)
    labels, _, _ = masks_from_files(EXAMPLE / "image.png", [tmp_path / "overlap.npy"], cfg, overlap="first")
    assert labels.max() == 2 and (labels[truth == 1] == 1).all()


def test_run_is_timi_generate(example, cfg, tmp_path, monkeypatch):
    """The page's run calls timi.generate.generate with the page's options (the paper's defaults
    for the rest) and gives the same scene as `timi generate` on the same masks; every run writes
    into a folder of its own; the side-by-side adds a --no-timi run of the same seed."""
    import timi.generate
    import timi.webapp.run as R
    from timi.cli import app

    _, truth = example
    calls = []
    real = timi.generate.generate
    monkeypatch.setattr(R, "generate", lambda opts, log, check=None, load=None:
                        calls.append(opts) or real(opts, log=log, check=check, load=load))
    monkeypatch.setattr(R, "PIPELINES", R.PipelineCache())
    seen = []
    out = R.run(EXAMPLE / "image.png", truth, ["box", "bar", "can"], FAST, cfg, report=True, compare=True,
                progress=lambda f, d: seen.append(f))
    assert [o.timi for o in calls] == [True, False] and all(o.split_instances for o in calls)
    assert calls[0].alpha == 0.1 and calls[0].sigma == 1.5 and calls[0].guided_layers == 4 and calls[0].steps == 2
    assert seen[0] == 0.0 and seen[-1] == 1.0
    scene = trimesh.load(out.scene)
    assert set(scene.graph.nodes_geometry) <= {"box", "bar", "can", "unclaimed"}
    assert sorted(p.stem for p in out.instances) == sorted(scene.graph.nodes_geometry)
    assert out.base_scene is not None and out.base_scene.is_file() and out.base_pictures
    assert {p.name for p, _ in out.pictures} >= {"views.png", "guidance.png", "masks_on_tokens.png"}
    assert any(line.startswith("instances given: 3") for line in out.lines)

    masks = tmp_path / "m.json"
    M.write_masks_json(truth, masks, ["box", "bar", "can"])
    result = CliRunner().invoke(app, [str(a) for a in ["generate", EXAMPLE / "image.png", "--masks", masks, "--out",
                                                       tmp_path / "cli.glb", "--model", cfg.model, "--split-instances",
                                                       "--steps", 2, "--guided-steps", 2, "--octree-resolution", 16,
                                                       "--seed", 3, "--quiet"]])
    assert result.exit_code == 0, result.output
    cli = trimesh.load(tmp_path / "cli.glb")
    assert sorted(cli.geometry) == sorted(scene.geometry)
    for name in cli.geometry:
        np.testing.assert_array_equal(cli.geometry[name].vertices, scene.geometry[name].vertices)
    again = R.run(EXAMPLE / "image.png", truth, ["box", "bar", "can"], FAST, cfg, report=False)
    assert again.folder != out.folder and again.folder.parent == out.folder.parent == cfg.workdir
    assert again.pictures == [] and again.base_scene is None
    assert R.PIPELINES.loads == 1          # the model stays loaded between runs (TIMI, its --no-timi twin, again)


def test_errors_are_the_command_lines_one_line(example, cfg):
    from timi.webapp.run import page_error, run

    _, truth = example
    with pytest.raises(ValueError) as e:
        run(EXAMPLE / "image.png", truth, [], {**FAST, "steps": 0}, cfg)
    assert page_error(e.value) == "error: steps 0: must be at least 1."   # the page's label, not the flag
    with pytest.raises(ValueError, match="whole number"):
        run(EXAMPLE / "image.png", truth, [], {**FAST, "steps": 2.5}, cfg)
    line = page_error(TypeError("a\nbug"))
    assert line.startswith("error: unexpected TypeError: a bug") and "\n" not in line
    assert page_error(RuntimeError("surface extraction found no surface")) == "error: surface extraction found no surface"


def test_uploaded_picture_is_checked(tmp_path):
    from timi.masks_io import MaskInputError
    from timi.webapp.run import save_picture

    p = save_picture(Image.open(EXAMPLE / "image.png"), tmp_path)
    assert Image.open(p).mode == "RGBA"
    with pytest.raises(MaskInputError, match="is a mask, not the input picture"):
        save_picture(np.zeros((20, 20), np.uint8), tmp_path)


# ----------------------------------------------------------------------------- the command


def test_safe_defaults(tiny_model):
    from timi.webapp.cli import check_app_options, is_loopback, launch_options

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    cfg, logins, notes = check_app_options(str(tiny_model), "127.0.0.1", None, "cpu", None, "auto", 20, None)
    assert notes == [] and logins == [] and cfg.sam is None and cfg.workdir.is_dir()
    assert (cfg.max_steps, cfg.max_octree, cfg.max_run_seconds) == (50, 384, 900.0)
    with pytest.raises(ValueError, match="--host 0.0.0.0 would let anyone"):
        check_app_options(str(tiny_model), "0.0.0.0", 7999, "cpu", None, "auto", 20, None)
    _, _, notes = check_app_options(str(tiny_model), "0.0.0.0", 7999, "cpu", None, "auto", 20, None, auth="me:pw")
    assert len(notes) == 1 and "not a loopback address" in notes[0]
    opts = launch_options("127.0.0.1", None, False, 20)
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False and opts["max_file_size"] == 20 * 2**20
    assert opts["enable_monitoring"] is False and opts["mcp_server"] is False


@pytest.mark.parametrize("args, words", [
    (["--port", "0"], "--port 0: must be from 1 to 65535"),
    (["--max-upload-mb", "0"], "--max-upload-mb 0.0: must be above 0"),
    (["--model", "/no/such/model"], "no such folder or file"),
    (["--sam-checkpoint", "/no/sam_vit_b.pth"], "--sam-checkpoint /no/sam_vit_b.pth: no such file"),
])
def test_bad_options_one_line_exit_2(args, words):
    from timi.cli import app

    result = CliRunner().invoke(app, ["app", *args])
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and words in errors[0], result.output
    assert "Traceback" not in result.output


def test_page_builds_with_one_run_at_a_time(cfg):
    """The page has the run button's event limited to one at a time (Gradio's queue) and no
    component that takes a path from the page."""
    pytest.importorskip("gradio")
    import gradio as gr

    from timi.webapp.ui import build_app

    demo = build_app(cfg)
    runs = [f for f in demo.fns.values() if getattr(f, "concurrency_id", None) == "timi-run"]
    assert len(runs) == 1 and runs[0].concurrency_limit == 1
    kinds = {type(b).__name__ for b in demo.blocks.values()}
    assert {"Model3D", "ImageEditor", "Gallery", "File"} <= kinds
    assert not any(isinstance(b, gr.FileExplorer) for b in demo.blocks.values())


def test_work_folder_is_pruned(cfg, tmp_path):
    """The newest ``keep_runs`` run folders stay, older ones and day-old picture folders go."""
    import dataclasses
    import os

    from timi.webapp.run import prune

    c = dataclasses.replace(cfg, workdir=tmp_path / "work", keep_runs=2)
    for k in range(4):
        (c.workdir / f"run-{k}").mkdir(parents=True)
        os.utime(c.workdir / f"run-{k}", (1000 + k, 1000 + k))
    (c.workdir / "picture-old").mkdir()
    os.utime(c.workdir / "picture-old", (1000, 1000))
    (c.workdir / "picture-new").mkdir()
    gone = prune(c)
    assert sorted(p.name for p in gone) == ["picture-old", "run-0", "run-1"]
    assert sorted(p.name for p in c.workdir.iterdir()) == ["picture-new", "run-2", "run-3"]

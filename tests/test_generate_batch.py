"""``timi generate`` over a folder of scenes or a manifest (issue 28): the same meshes as one ``timi generate``
per scene with the same seeds, here and on a local Ray instance; a bad scene reported once and skipped,
exit 1; reruns skip existing outputs; a bad manifest is one line, exit 2; a worker that dies mid-write
and Ctrl-C leave only complete outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from timi.cli import app
from torch_helpers import tiny_model  # noqa: F401  (fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"
FAST = ["--steps", "2", "--guided-steps", "2", "--guided-layers", "2", "--octree-resolution", "16", "--device", "cpu",
        "--quiet"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Scenes a and b (b: the example's colours inverted), and c whose masks do not fit its picture."""
    root = tmp_path_factory.mktemp("batch") / "scenes"
    for name in ("a", "b", "c"):
        shutil.copytree(EXAMPLE, root / name)
    image = np.asarray(Image.open(root / "b" / "image.png").convert("RGBA")).copy()
    image[..., :3] = 255 - image[..., :3]
    Image.fromarray(image, "RGBA").save(root / "b" / "image.png")
    Image.fromarray(np.ones((10, 10), np.uint8)).save(root / "c" / "masks.png")
    return root


@pytest.fixture(scope="module")
def singles(tiny_model, data, tmp_path_factory) -> dict:
    """One ``timi generate`` per scene: {(scene, seed): GLB bytes}."""
    out = tmp_path_factory.mktemp("singles")
    meshes = {}
    for name, seed in (("a", 0), ("b", 0), ("a", 3)):
        path = out / f"{name}_{seed}.glb"
        code, output = run("generate", data / name / "image.png", "--masks", data / name / "masks.png", "--out", path,
                           "--model", tiny_model, "--seed", seed, *FAST)
        assert code == 0, output
        meshes[name, seed] = path.read_bytes()
    return meshes


def _tmp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*.tmp")]


def test_folder_and_manifest_give_the_single_meshes_skip_bad_scenes_and_existing_outputs(tiny_model, data, singles,
                                                                                      tmp_path):
    out = tmp_path / "meshes"
    code, output = run("generate", data, "--out", out, "--model", tiny_model, *FAST)
    assert code == 1, output  # scene c failed: reported once, the others complete
    failed = [line for line in output.splitlines() if line.startswith("error: c:")]
    assert len(failed) == 1 and "mask size 10x10 differs from image" in failed[0], output
    assert "generated 2 of 3 scenes" in output and "1 of 3 scenes failed (c;" in output
    assert sorted(p.name for p in out.iterdir()) == ["a.glb", "b.glb"]
    assert (out / "a.glb").read_bytes() == singles["a", 0] and (out / "b.glb").read_bytes() == singles["b", 0]

    # the rerun skips what exists (and says so); --overwrite generates it again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, output = run("generate", data, "--out", out, "--model", tiny_model, *FAST)
    assert code == 1 and "2 of 3 scenes have their output already" in output and "--overwrite" in output
    assert "generated 0 of 3 scenes" in output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    code, output = run("generate", data, "--out", out, "--model", tiny_model, *FAST, "--overwrite")
    assert code == 1 and "generated 2 of 3 scenes" in output
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.iterdir())
    assert (out / "a.glb").read_bytes() == singles["a", 0]

    # a manifest (paths relative to its folder; a per-row seed, else --seed), CSV and JSONL
    rows = [{"image": "scenes/a/image.png", "masks": "scenes/a/masks.png", "out": "m/a3.glb", "seed": 3},
            {"image": str(data / "b" / "image.png"), "masks": "scenes/b/masks.png", "out": "m/b.glb"}]
    shutil.copytree(data, tmp_path / "scenes")
    csv_path = tmp_path / "scenes.csv"
    csv_path.write_text("image,masks,out,seed\n" + "".join(
        f"{r['image']},{r['masks']},{r['out']},{r.get('seed', '')}\n" for r in rows))
    code, output = run("generate", csv_path, "--model", tiny_model, *FAST)
    assert code == 0, output
    assert (tmp_path / "m" / "a3.glb").read_bytes() == singles["a", 3] != singles["a", 0]
    assert (tmp_path / "m" / "b.glb").read_bytes() == singles["b", 0]
    jsonl = tmp_path / "scenes.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "out": r["out"].replace("m/", "j/"), "masks": [r["masks"]]}) + "\n"
                             for r in rows))
    code, output = run("generate", jsonl, "--model", tiny_model, *FAST)
    assert code == 0, output
    assert (tmp_path / "j" / "a3.glb").read_bytes() == singles["a", 3]
    assert not _tmp_files(tmp_path)


@pytest.mark.parametrize("name, text, says", [
    ("m.csv", "image,masks,out,sed\na.png,m.png,a.glb,1\n", "m.csv, line 1: unknown column 'sed'; the columns are"),
    ("m.csv", "image,out\na.png,a.glb\n", "m.csv, line 1: no column 'masks'"),
    ("m.csv", "image,masks,out\na.png,m.png,a.glb\nb.png,,b.glb\n", "m.csv, line 3: masks is empty"),
    ("m.csv", "image,masks,out,seed\na.png,m.png,a.png,1\n", "m.csv, line 2: out 'a.png' has no mesh format"),
    ("m.csv", "image,masks,out,seed\na.png,m.png,a.glb,-1\n", "m.csv, line 2: seed '-1' is not a whole number"),
    ("m.csv", "image,masks,out\na.png,m.png,a.glb\nb.png,n.png,./a.glb\n", "m.csv, line 3: writes"),
    ("m.csv", "image,masks,out\n", "m.csv: holds no rows"),
    ("m.jsonl", '{"image": "a.png", "masks": "m.png", "out": "a.glb"}\n[1]\n', "m.jsonl, line 2: not a JSON object"),
    ("m.jsonl", '{"image": "a.png", "masks": "m.png"', "m.jsonl, line 1: not JSON"),
    ("m.jsonl", '{"image": "a.png", "masks": "m.png", "out": "a.glb", "seed": 1.5}\n', "line 1: seed 1.5 is not"),
])
def test_a_bad_manifest_is_one_line_and_exit_2(tmp_path, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    code, output = run("generate", path, "--quiet")
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1 and output.startswith("error: ") and says in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing ran


def test_batch_usage_errors(data, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, says in (([data], "needs --out FOLDER"),
                       ([data, "--out", tmp_path, "--report", tmp_path / "r"], "--report takes one scene"),
                       ([data / "a" / "image.png", "--masks", data / "a" / "masks.png", "--out", tmp_path / "x.glb",
                         "--engine", "ray"], "give a folder of scenes or a manifest"),
                       ([data, "--out", tmp_path, "--workers", "2"], "--workers needs --engine ray"),
                       ([tmp_path / "empty", "--out", tmp_path / "o"], "holds no scene folders"),
                       ([data, "--out", data / "a" / "image.png"], "image.png is a file")):
        code, output = run("generate", *args, "--quiet")
        assert code == 2 and len(output.strip().splitlines()) == 1 and says in output, output


def test_ctrl_c_leaves_only_complete_outputs_and_the_rerun_goes_on(tiny_model, data, singles, tmp_path, monkeypatch):
    import timi.generate
    from timi.io import atomic_path

    real = timi.generate.generate

    def interrupted_in_b(opts, **kwargs):
        if opts.out.name == "b.glb":
            with atomic_path(opts.out):  # Ctrl-C while the output is being written
                raise KeyboardInterrupt
        return real(opts, **kwargs)

    out = tmp_path / "meshes"
    monkeypatch.setattr(timi.generate, "generate", interrupted_in_b)
    code, output = run("generate", data, "--out", out, "--model", tiny_model, *FAST)
    assert code == 130 and "interrupted (Ctrl-C)" in output and "run the same command to go on" in output
    assert sorted(p.name for p in out.iterdir()) == ["a.glb"] and not _tmp_files(out)
    monkeypatch.setattr(timi.generate, "generate", real)
    code, output = run("generate", data, "--out", out, "--model", tiny_model, *FAST)
    assert code == 1 and "1 of 3 scenes have their output already" in output and "generated 1 of 3" in output
    assert (out / "b.glb").read_bytes() == singles["b", 0]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_ray_gives_the_same_meshes_and_a_dead_worker_leaves_no_partial_file(ray_instance, tiny_model, data, singles,
                                                                            tmp_path):
    """On a local Ray instance (2 workers): the meshes of one ``timi generate`` per scene, the bad scene reported
    once; a worker that dies while writing b's output: b is generated again by the restarted worker, and no
    half-written file is left."""
    from ray_helpers import DyingGenerate

    from timi.batch import read_batch, run_batch
    from timi.evaluation.ray_engine import RayEngine
    from timi.generate import GenerateOptions

    out = tmp_path / "ray"
    code, output = run("generate", data, "--out", out, "--model", tiny_model, *FAST, "--engine", "ray", "--workers", 2)
    assert code == 1, output
    assert sum(line.startswith("error: c:") for line in output.splitlines()) == 1
    assert (out / "a.glb").read_bytes() == singles["a", 0] and (out / "b.glb").read_bytes() == singles["b", 0]

    marks, out = tmp_path / "marks", tmp_path / "dying"
    marks.mkdir()
    template = GenerateOptions(image=None, masks=[], out=None, model=str(tiny_model), steps=2, guided_steps=2,
                               guided_layers=2, octree_resolution=16, device="cpu")
    result = run_batch(read_batch(data, out), template, engine=RayEngine(workers=2), progress=False,
                       generate=DyingGenerate(marks, die_on="b.glb"), log=lambda line: None)
    assert (marks / "died").is_file()
    assert sorted(result.generated) == ["a", "b"] and list(result.failed) == ["c"]
    assert (marks / "calls.txt").read_text().split().count("b.glb") == 2
    assert not _tmp_files(out) and sorted(p.name for p in out.iterdir()) == ["a.glb", "b.glb"]
    assert (out / "b.glb").read_bytes() == singles["b", 0]

"""Bad input as a new user types it (issue 15): every case is one ``error:`` line naming the input
and the fix, exit 2 (bad input), 1 (failure while running) or 130 (Ctrl-C), nothing written, and
model-free checks done before the model loads. The Python API refuses the same mask arrays as the
command line (one validation path, ``timi.masks_io``), and ``docs/usage.md``'s table of accepted
inputs quotes only messages this file checks."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import hy3dgen.shapegen  # noqa: F401  (binds hy3dgen's log handler to the real stderr, not the runner's)
from typer.testing import CliRunner

from timi.cli import app
from torch_helpers import tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "timi" / "assets" / "example"
FAST = ["--steps", "1", "--guided-steps", "1", "--octree-resolution", "16", "--quiet"]

pytestmark = pytest.mark.skipif(not (EXAMPLE / "masks.png").exists(), reason="example scene not present")




@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model) -> dict:
    """Every bad (and a few good) input files, in their own folder (outputs go elsewhere)."""
    d = tmp_path_factory.mktemp("inputs")
    labels = np.asarray(Image.open(EXAMPLE / "masks.png"))
    masks = np.stack([labels == k + 1 for k in range(int(labels.max()))])
    f = {"dir": d, "labels": labels, "masks": masks, "image": d / "image.png", "rgb": d / "rgb.png"}
    shutil.copy(EXAMPLE / "image.png", f["image"])
    Image.open(f["image"]).convert("RGB").save(f["rgb"])
    shutil.copy(EXAMPLE / "masks.png", d / "labels.png")
    for k in range(3):
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(d / f"obj_{k + 1}.png")
    soft = masks.astype(np.float32)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neg", -1.0), ("big", 300.0)):
        a = soft.copy()
        a[0, 0, 0] = value
        np.save(d / f"{name}.npy", a)
    np.save(d / "f255.npy", soft * 255)
    np.save(d / "float2d.npy", labels.astype(np.float32))
    many = np.zeros(labels.shape, np.uint16)  # 300 labels, 16-bit: a label map, not a picture
    for i in range(300):
        y, x = 20 + (i // 20) * 12, 10 + (i % 20) * 12
        many[y:y + 8, x:x + 8] = i + 1
    Image.fromarray(many).save(d / "many16.png")
    outside = labels.copy()
    outside[:5, :5] = 4  # alpha is 0 in the image's corner
    Image.fromarray(outside).save(d / "outside.png")
    free = np.argwhere(labels == 0)  # one pixel of background nearest the centre: lost at 112 px
    y, x = free[np.abs(free - np.array(labels.shape) // 2).sum(1).argmin()]
    speck = np.zeros_like(masks[:1])
    speck[0, y, x] = True
    np.save(d / "speck.npy", np.concatenate([masks, speck]))
    Image.fromarray(labels * 60).save(d / "labels.jpg", quality=90)
    Image.fromarray(np.ones(labels.shape, np.uint8)).save(d / "whole.png")  # the whole picture, one label
    for name, edit in (("broken", lambda t: "model: [\n  target: x\n"),
                       ("incomplete", lambda t: re.sub(r"\n    axes_dim:\n    - \d+", "", t)),
                       ("mismatch", lambda t: re.sub(r"\n    depth: \d+", "\n    depth: 3", t, count=1))):
        m = d / f"model_{name}"
        shutil.copytree(tiny_model, m)
        (m / "config.yaml").write_text(edit((m / "config.yaml").read_text()))
        assert (m / "config.yaml").read_text() != (tiny_model / "config.yaml").read_text()
    (d / "afile").write_text("not a folder")
    (d / "outdir").mkdir()                    # an existing folder given as --out, named like a mesh or not
    (d / "outdir.glb").mkdir()
    np.save(d / "empty.npy", np.concatenate([masks, np.zeros_like(masks[:1])]))
    np.save(d / "overlap.npy", np.concatenate([masks, masks[:1]]))
    (d / "truncated.png").write_bytes((EXAMPLE / "image.png").read_bytes()[:300])
    f["model"] = tiny_model
    return f


@dataclasses.dataclass
class Case:
    """One command line: ``args(inputs, out_dir)``, its exit code, words its one error line must hold
    (and must not), whether the model may load first, and the files it may leave in ``out_dir``."""

    name: str
    args: Callable[[dict, Path], list]
    code: int = 2
    words: tuple = ()
    absent: tuple = ()
    loads_model: bool = False
    writes: tuple = ()


def _gen(f, o, *masks, image=None, out="scene.glb", model=None, extra=()):
    mask_args = [x for m in masks for x in ("--masks", m)]
    return ["generate", image or f["image"], *mask_args, "--out", o / out, "--model", model or f["model"], *FAST, *extra]


def _insp(f, o, *masks, image=None, model=None, extra=()):
    mask_args = [x for m in masks for x in ("--masks", m)]
    return ["inspect", image or f["image"], *mask_args, "--out", o / "overlay.png", "--model", model or f["model"], *extra]


D = lambda f, name: f["dir"] / name  # noqa: E731

CASES = [
    # 1. a mask taken as the picture (`--masks a b c` takes b as IMAGE), with and without the picture last
    Case("mask as picture", lambda f, o: ["generate", "--masks", D(f, "obj_1.png"), D(f, "obj_2.png"), D(f, "obj_3.png"),
                                          "--out", o / "out.glb", "--model", f["model"]],
         words=("obj_2.png", "is a mask, not the input picture", "put the picture first: PICTURE --masks")),
    Case("picture last", lambda f, o: ["generate", "--masks", D(f, "obj_1.png"), D(f, "obj_2.png"), D(f, "obj_3.png"),
                                       f["image"], "--out", o / "out.glb", "--model", f["model"]],
         words=("obj_2.png", "is a mask, not the input picture", "image.png --masks"), absent=("overlap",)),
    Case("picture is a mask too", lambda f, o: _gen(f, o, D(f, "labels.png"), f["image"]),
         words=("given as the picture and as a mask",)),
    # 2. config.yaml: not YAML, or incomplete
    Case("broken config.yaml (generate)", lambda f, o: _gen(f, o, D(f, "labels.png"), model=D(f, "model_broken")),
         words=("model_broken/config.yaml", "not valid YAML", "line 3", "restore the model's config.yaml")),
    Case("broken config.yaml (inspect)", lambda f, o: _insp(f, o, D(f, "labels.png"), model=D(f, "model_broken")),
         words=("model_broken/config.yaml", "not valid YAML")),
    Case("incomplete config.yaml", lambda f, o: _gen(f, o, D(f, "labels.png"), model=D(f, "model_incomplete")),
         words=("model_incomplete/config.yaml", "does not match axes_dim [64]"), absent=("positional dim",)),
    # 3. NaN / inf / out-of-range values in an .npy
    Case("NaN in .npy", lambda f, o: _gen(f, o, D(f, "nan.npy")), words=("nan.npy", "NaN/inf", "replace them with 0")),
    Case("inf in .npy", lambda f, o: _gen(f, o, D(f, "inf.npy")), words=("inf.npy", "NaN/inf")),
    Case("negative .npy", lambda f, o: _gen(f, o, D(f, "neg.npy")), words=("neg.npy", "negative values")),
    Case("float .npy above 255", lambda f, o: _gen(f, o, D(f, "big.npy")), words=("big.npy", "[0, 1] or [0, 255]")),
    Case("float (H, W) .npy", lambda f, o: _gen(f, o, D(f, "float2d.npy")), words=("float2d.npy", "integer label map")),
    # 4. diagnoses
    Case("uint16 label map, 300 labels", lambda f, o: _gen(f, o, D(f, "many16.png")),
         words=("many16.png", "300 labels but the condition-token grid holds only 64 tokens"), absent=("soft",)),
    Case("instance outside the foreground", lambda f, o: _gen(f, o, D(f, "outside.png")),
         words=("outside.png", "instance 3 (label_4)", "outside the picture's foreground"), absent=("too small",)),
    Case("instance too small", lambda f, o: _insp(f, o, D(f, "speck.npy"), image=f["rgb"]),
         words=("speck.npy", "instance 3 (speck_3)", "too small", "crop the picture closer"), absent=("[3]",)),
    Case("JPEG label map", lambda f, o: _gen(f, o, D(f, "labels.jpg")),
         words=("labels.jpg", "JPEG", "lossy", "save the label map as PNG"), absent=("too small",)),
    # 5. / 7. the model argument
    Case("inspect, missing model", lambda f, o: _insp(f, o, D(f, "labels.png"), model=D(f, "no_model_here")),
         words=("--model", "no_model_here", "no such folder or file")),
    Case("generate, missing model", lambda f, o: _gen(f, o, D(f, "labels.png"), model=D(f, "no_model_here")),
         words=("no_model_here", "no such folder or file"), absent=("HFValidationError", "Repo id")),
    Case("config.yaml does not match the weights", lambda f, o: _gen(f, o, D(f, "labels.png"), model=D(f, "model_mismatch")),
         words=("could not build the model from", "model_mismatch", "does not match the weights"), loads_model=True),
    Case("model folder without config.yaml", lambda f, o: _gen(f, o, D(f, "labels.png"), model=f["dir"]),
         words=("the folder lacks config.yaml",)),
    # 6. output paths, before any work
    Case("--out in /proc", lambda f, o: _gen(f, o, D(f, "labels.png"), out="/proc/x.glb"),
         words=("x.glb", "cannot write in /proc"), absent=(".tmp",)),
    Case("--out under a file", lambda f, o: _gen(f, o, D(f, "labels.png"), out=D(f, "afile") / "x.glb"),
         words=("afile is a file, not a folder",)),
    Case("--report in /proc", lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--report", "/proc/rep")),
         words=("/proc/rep", "cannot write in /proc")),
    Case("--out with an unknown format", lambda f, o: _gen(f, o, D(f, "labels.png"), out="scene.fbx"),
         words=("unknown mesh format '.fbx'",)),
    # issue 38: a folder given as --out gets one message, whatever its name ("unknown mesh format ''" before)
    Case("--out is a folder", lambda f, o: _gen(f, o, D(f, "labels.png"), out=D(f, "outdir")),
         words=("outdir: is a folder; pass a file name", "outdir/scene.glb"), absent=("unknown mesh format",)),
    Case("--out is a folder named like a mesh", lambda f, o: _gen(f, o, D(f, "labels.png"), out=D(f, "outdir.glb")),
         words=("outdir.glb: is a folder; pass a file name",)),
    # 7. numbers
    Case("--seed too large", lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--seed", "99999999999999999999")),
         words=("--seed 99999999999999999999", "2^64 - 1"), absent=("Overflow",)),
    Case("--threads 0", lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--threads", "0")),
         words=("--threads 0", "at least 1")),
    Case("--device unknown", lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--device", "gpu0")),
         words=("--device 'gpu0'", "use cpu, cuda or cuda:N")),
    Case("--steps 0", lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--steps", "0")), words=("--steps 0", "at least 1")),
    # issue 38: what cannot fit in memory is refused before anything is allocated (was: 23.7 GB and counting)
    Case("--octree-resolution beyond memory",
         lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--octree-resolution", "10000", "--steps", "5")),
         words=("--octree-resolution 10000", "10001^3-point grid", "TiB of memory", "available here; use at most")),
    Case("--steps beyond memory", lambda f, o: _gen(f, o, D(f, "labels.png"), extra=("--steps", str(10**12))),
         words=(f"--steps {10**12}", "PiB of memory", "available here; use at most")),
    # already right before issue 15; kept here so the table covers them
    Case("mask size differs", lambda f, o: _gen(f, o, D(f, "small.npy")), words=("small.npy", "differs from image")),
    Case("missing mask file", lambda f, o: _gen(f, o, D(f, "nothere.png")), words=("nothere.png", "file not found")),
    Case("empty instance", lambda f, o: _gen(f, o, D(f, "empty.npy")), words=("empty.npy", "instance 3 (empty_3) is empty")),
    Case("overlapping masks", lambda f, o: _gen(f, o, D(f, "overlap.npy")),
         words=("overlap.npy", "instance masks overlap: 0&3", "--overlap first|last")),
    Case("unreadable picture", lambda f, o: _gen(f, o, D(f, "labels.png"), image=D(f, "truncated.png")),
         words=("truncated.png", "cannot read the image")),
    # 10. notes: an RGB picture uses the masks' union; a union that is the whole picture is said too
    Case("RGB picture, masks cover everything", lambda f, o: _insp(f, o, D(f, "whole.png"), image=f["rgb"]), code=0,
         words=("has no alpha channel: the union of the masks is used as the foreground",
                "the masks cover the whole of"), writes=("overlay.png",)),
    # 8. float masks in [0, 255] are accepted (as the API accepts them and the docs say)
    Case("float .npy in [0, 255]", lambda f, o: _insp(f, o, D(f, "f255.npy")), code=0, writes=("overlay.png",)),
]


@pytest.fixture(scope="module")
def small_npy(inputs):
    np.save(inputs["dir"] / "small.npy", inputs["masks"][:, :-3])


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def run_case(case: Case, f: dict, out_dir: Path, monkeypatch) -> str:
    import timi_torch

    loaded = []
    real = timi_torch.TIMIPipeline.from_pretrained.__func__
    monkeypatch.setattr(timi_torch.TIMIPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(1) or real(cls, *a, **k)))
    before = _tree(out_dir)
    inputs_before = _tree(f["dir"])
    result = CliRunner().invoke(app, [str(a) for a in case.args(f, out_dir)])
    text = result.output
    assert result.exit_code == case.code, (case.name, text)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == (0 if case.code == 0 else 1), (case.name, text)
    line = errors[0] if errors else text
    for w in case.words:
        assert w in line, (case.name, w, line)
    for w in case.absent:
        assert w not in line, (case.name, w, line)
    assert "Traceback" not in text, (case.name, text)
    assert _tree(out_dir) - before == set(case.writes), (case.name, "left behind", _tree(out_dir) - before)
    assert _tree(f["dir"]) == inputs_before, (case.name, "wrote among the inputs")
    if case.code == 2 and not case.loads_model:
        assert not loaded, (case.name, "the model was loaded before the check")
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_table(case, inputs, small_npy, tmp_path, monkeypatch):
    if "/proc" in str(case.args(inputs, tmp_path)) and not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    run_case(case, inputs, tmp_path, monkeypatch)


# ------------------------------------------------------------------------- during a run


def test_report_failure_exits_1_and_leaves_nothing(inputs, tmp_path, monkeypatch):
    import timi.report

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(timi.report, "write_summary", disk_full)
    args = _gen(inputs, tmp_path, inputs["dir"] / "labels.png", extra=("--report", tmp_path / "rep" / "deep"))
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert [ln for ln in result.output.splitlines() if ln.startswith("error:")] == ["error: [Errno 28] No space left on device"]
    assert _tree(tmp_path) == set(), _tree(tmp_path)


def test_failed_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    import os

    from timi.io import WriteError, write_bytes

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(WriteError, match=r"new/deeper/x\.glb: cannot move the finished file into place"):
        write_bytes(tmp_path / "new" / "deeper" / "x.glb", b"data")
    assert _tree(tmp_path) == set()


def test_ctrl_c_exits_130_with_a_word_and_leaves_nothing(inputs, tmp_path, monkeypatch):
    import timi_torch

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(timi_torch.TIMIPipeline, "__call__", interrupted)
    result = CliRunner().invoke(app, [str(a) for a in _gen(inputs, tmp_path, inputs["dir"] / "labels.png")])
    assert result.exit_code == 130, result.output
    assert "interrupted (Ctrl-C)" in result.output and "no output was written" in result.output
    assert _tree(tmp_path) == set()


def test_success_report_times_itself_and_threads_apply(inputs, tmp_path, monkeypatch):
    """summary.json's timings include the report stage; --threads sets torch's threads for the
    run (and the previous number is restored after it)."""
    import json

    import torch
    import timi_torch

    seen = []
    real_call = timi_torch.TIMIPipeline.__call__

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return real_call(self, *a, **k)

    monkeypatch.setattr(timi_torch.TIMIPipeline, "__call__", spy)
    before = torch.get_num_threads()
    args = _gen(inputs, tmp_path, inputs["dir"] / "labels.png", extra=("--report", tmp_path / "rep", "--threads", "1"))
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert seen == [1] and torch.get_num_threads() == before
    timings = json.loads((tmp_path / "rep" / "summary.json").read_text())["timings_s"]
    assert {"inputs", "load model", "denoise", "mesh", "report"} <= set(timings) and timings["report"] > 0


def test_default_threads_by_model_size(inputs, tmp_path, monkeypatch):
    import os

    from timi.generate import SMALL_MODEL_BYTES, choose_threads
    from timi.testbed import default_model_path

    assert choose_threads(str(default_model_path())) == 1
    big = tmp_path / "acme" / "Big-3D" / "hunyuan3d-dit-v2-0"  # an id's local copy, as hy3dgen resolves it
    big.mkdir(parents=True)
    (big / "config.yaml").write_text("model: {}\n")
    with open(big / "model.fp16.safetensors", "wb") as fh:
        fh.truncate(SMALL_MODEL_BYTES)  # sparse: no disk used
    monkeypatch.setenv("HY3DGEN_MODELS", str(tmp_path))
    assert choose_threads(str(big)) == choose_threads("acme/Big-3D") == len(os.sched_getaffinity(0))
    (big / "model.fp16.safetensors").write_bytes(b"small")
    assert choose_threads("acme/Big-3D") == 1


# ------------------------------------------------------------------------------- the API


def test_api_refuses_what_the_cli_refuses(inputs, tmp_path):
    """GenerateOptions / generate(): the same errors as the command line, before the model loads."""
    from timi.generate import GenerateOptions, generate
    from timi.masks_io import MaskInputError

    opts = dict(image=inputs["image"], out=tmp_path / "s.glb", model=str(inputs["model"]), progress=False)
    with pytest.raises(MaskInputError, match="NaN/inf"):
        generate(GenerateOptions(masks=[inputs["dir"] / "nan.npy"], **opts), log=lambda m: None)
    with pytest.raises(ValueError, match="2\\^64 - 1"):
        generate(GenerateOptions(masks=[inputs["dir"] / "labels.png"], seed=2**64, **opts), log=lambda m: None)
    assert _tree(tmp_path) == set()


def test_from_pretrained_without_a_path_is_the_shipped_model(inputs):
    """The README's snippet: TIMIPipeline.from_pretrained() loads the shipped model; sampling
    refuses zero steps and NaN masks like the command line."""
    import torch
    from timi_torch import TIMIPipeline

    from timi.testbed import default_model_path

    pipe = TIMIPipeline.from_pretrained(device="cpu")
    assert sum(p.numel() for p in pipe.base.model.parameters()) > 0
    assert str(default_model_path()).endswith("hunyuan3d-dit-v2-0")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        pipe(str(inputs["image"]), inputs["masks"], num_inference_steps=0, output_type="latent", enable_pbar=False)
    nan = inputs["masks"].astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        pipe(str(inputs["image"]), nan, num_inference_steps=1, output_type="latent", enable_pbar=False)
    latents = pipe(str(inputs["image"]), inputs["masks"].astype(np.float32) * 255, num_inference_steps=1,
                   generator=torch.manual_seed(0), output_type="latent", enable_pbar=False).latents
    assert torch.isfinite(latents).all()


# ------------------------------------------------------------------ drawn mask arrays


KINDS = ["good", "labels", "nan", "inf", "negative", "float above 255", "shape", "ndim", "empty", "too many labels",
         "float label map", "overlap"]


@st.composite
def mask_arrays(draw, masks: np.ndarray, kind: str):
    """(array, expected message word or None for accepted, expected masks when accepted)."""
    dtype = np.dtype(draw(st.sampled_from([np.bool_, np.uint8, np.int32, np.uint16, np.float32, np.float64])))
    if kind in ("nan", "inf", "float above 255", "float label map"):
        dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    if kind == "negative" and dtype.kind in "bu":
        dtype = np.dtype(np.int32)
    top = 1 if dtype.kind == "b" else draw(st.sampled_from([1, 255] + ([65535] if dtype.itemsize >= 2 and dtype.kind in "iu" else [])))
    if dtype.kind == "b":
        a = masks.copy()
    else:  # values above half range inside the instance, below it outside, and the top value once
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        lo, hi = (rng.uniform(0, 0.49, masks.shape), rng.uniform(0.51, 1, masks.shape)) if dtype.kind == "f" else \
            (np.zeros(masks.shape), np.ones(masks.shape))
        a = np.where(masks, hi, lo) * top
        a[masks.nonzero()[0][0], masks.nonzero()[1][0], masks.nonzero()[2][0]] = top
        a = a.astype(dtype)
    K, H, W = masks.shape
    y, x = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
    if kind == "good":
        return a, None, masks
    if kind == "labels":
        values = draw(st.lists(st.integers(1, 60000 if dtype.kind == "u" and dtype.itemsize >= 2 else 120),
                               min_size=K, max_size=K, unique=True))
        ldtype = np.uint16 if max(values) > 255 else draw(st.sampled_from([np.uint8, np.int32, np.int64]))
        lab = np.zeros((H, W), ldtype)
        for k, v in enumerate(values):
            lab[masks[k]] = v
        return lab, None, masks[np.argsort(values)]
    if kind in ("nan", "inf"):
        a[0, y, x] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        return a, "NaN/inf", None
    if kind == "negative":
        a[0, y, x] = -draw(st.integers(1, 100))
        return a, "negative values", None
    if kind == "float above 255":
        a[0, y, x] = draw(st.floats(256, 1e30))
        return a, "[0, 1] or [0, 255]", None
    if kind == "shape":
        dy, dx = draw(st.integers(0, 3)), draw(st.integers(1, 3))
        return a[:, dy:, dx:], "differs from image", None
    if kind == "ndim":
        return (a[None] if draw(st.booleans()) else a[0, 0]), "shape", None
    if kind == "empty":
        a[draw(st.integers(0, K - 1))] = 0
        return a, "is empty", None
    if kind == "too many labels":
        n = draw(st.integers(65, 400))
        lab = np.zeros((H, W), np.int32)
        lab.flat[:n] = np.arange(1, n + 1)
        return lab, f"{n} labels but the condition-token grid holds only 64 tokens", None
    if kind == "float label map":
        return masks.argmax(0).astype(dtype) + masks.any(0), "integer label map", None
    b = a.copy()  # overlap: instance 1 also claims a pixel of instance 0
    b[1][masks[0]] = a[0][masks[0]]
    return b, "--overlap first|last", None


@pytest.fixture(scope="module")
def geometry(tiny_model):
    from timi.pipelines import geometry_pipeline

    return geometry_pipeline(tiny_model)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_drawn_mask_arrays_cli_and_api_agree(kind, data, inputs, geometry, tmp_path_factory):
    """Hypothesis-drawn (K, H, W) / (H, W) arrays of every dtype, with NaN/inf, out-of-range values,
    wrong shapes, empty instances and label counts: ``timi inspect`` on the ``.npy`` and
    ``condition_token_masks`` on the array accept and refuse the same, with the same words."""
    import timi_torch

    array, word, expected = data.draw(mask_arrays(inputs["masks"], kind))
    d = tmp_path_factory.mktemp("drawn")
    np.save(d / "m.npy", array)
    result = CliRunner().invoke(app, [str(a) for a in ["inspect", inputs["image"], "--masks", d / "m.npy", "--out",
                                                       d / "o.png", "--model", inputs["model"]]])
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    try:
        api = timi_torch.condition_token_masks(str(inputs["image"]), array, geometry)
        api_error = None
    except ValueError as e:
        api, api_error = None, str(e)
    if word is None:
        assert result.exit_code == 0 and not errors, result.output
        assert (d / "o.png").exists() and api_error is None, api_error
        ref = timi_torch.condition_token_masks(str(inputs["image"]), expected, geometry)
        assert np.array_equal(api.tokens.numpy(), ref.tokens.numpy())
    else:
        assert result.exit_code == 2 and len(errors) == 1, result.output
        assert word in errors[0] and "m.npy" in errors[0], (word, errors)
        assert api_error is not None and "\n" not in api_error
        assert word.replace("image", "the image") in api_error or word in api_error, (word, api_error)
        assert sorted(p.name for p in d.iterdir()) == ["m.npy"]


# -------------------------------------------------------------------------- the docs' table


def _accepted_inputs_table() -> list[list[str]]:
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text.split("## What inputs are accepted", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")][2:]  # skip the header and its rule
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip("|"))] for r in rows]


def test_docs_table_quotes_only_checked_messages():
    """Every message the table in docs/usage.md quotes ("...") is one the cases above assert, so the
    table cannot drift from what the command says; every input kind of the table is exercised."""
    rows = _accepted_inputs_table()
    assert len(rows) >= 6 and all(len(r) == 3 for r in rows), rows
    checked = " | ".join(w for c in CASES for w in c.words)
    quoted = [q for r in rows for q in re.findall(r'"([^"]+)"', r[-1])]
    assert len(quoted) >= 10
    for q in quoted:
        assert q in checked, f"docs/usage.md quotes {q!r}, which no test case checks"


# ------------------------------------------------------------- usage errors: one line, exit 2


@pytest.mark.parametrize("args, words", [
    (["generate", "--bogus"], ["No such option: --bogus", "timi generate --help"]),
    (["eval", "some_dir", "--align", "foo"], ["--align", "'foo'", "icp", "timi eval --help"]),
    (["testbed", "train", "--out", "r", "--preset", "nope"], ["--preset", "'nope'", "v3p", "timi testbed train --help"]),
    (["testbed", "scenes", "--out", "d", "--n", "0"], ["--n", "timi testbed scenes --help"]),
    (["bench", "overhead", "--threads", "x"], ["--threads", "timi bench overhead --help"]),
    (["nosuchcommand"], ["No such command", "timi --help"]),
])
def test_usage_errors_anywhere_print_one_error_line(args, words, tmp_path, monkeypatch):
    """An unknown option, command or refused value in any sub-command: exactly one ``error:`` line
    that names what was wrong and the command's --help, exit 2, no box drawn and nothing written."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args, prog_name="timi")
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert not any(ch in result.output for ch in "╭│╰"), result.output
    assert list(tmp_path.iterdir()) == []


def test_timi_without_arguments_still_prints_its_help():
    result = CliRunner().invoke(app, [], prog_name="timi")
    assert "Usage: timi" in result.output and "generate" in result.output and not result.output.startswith("error")


@pytest.mark.parametrize("setting, words", [
    ("smoothing=positions", ["smoothing=positions", "do not", "smoothing=decoder", "smoothing=tokens"]),
    ("smoothing=grid", ["smoothing='grid'", "tokens", "positions"]),
])
def test_eval_refuses_a_smoothing_the_model_cannot_run_before_generating(setting, words, tiny_model, tmp_path):
    """Eq.5 over token positions needs latents that carry positions (the testbed's); hy3dgen's tiny
    model's do not. `timi eval` says so in one line before anything is generated or written."""
    from timi.testbed import example_scene_path

    data = tmp_path / "data"
    shutil.copytree(example_scene_path(), data / "example")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(data), "--model", str(tiny_model), "--set", setting,
                                      "--out", str(out), "--quiet"], prog_name="timi")
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert not out.exists()

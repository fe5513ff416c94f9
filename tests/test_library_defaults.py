"""The library is as fast as the command line (issue 38): ``TIMIPipeline`` takes ``timi generate``'s
defaults from one place (``timi_core.defaults``: steps, CFG, octree, coarse-to-fine decoding,
threads), and the README's Python snippet runs verbatim from any folder."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timi_core import defaults
from torch_helpers import fast_base, fast_dir, fast_root  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _option_default(fn, name):
    value = inspect.signature(fn).parameters[name].default
    return getattr(value, "default", value)  # typer.Option(...) -> its default


def test_call_defaults_are_the_command_lines():
    from timi.generate import GenerateOptions
    from timi.generate_cli import generate_command
    from timi_jax import TIMIPipelineJAX
    from timi_torch import TIMIPipeline

    opts = GenerateOptions(image=None, masks=[], out=Path("x.glb"))
    want = {"num_inference_steps": (defaults.NUM_INFERENCE_STEPS, "steps"),
            "guidance_scale": (defaults.GUIDANCE_SCALE, "guidance_scale"),
            "octree_resolution": (defaults.OCTREE_RESOLUTION, "octree_resolution")}
    for call_name, (value, cli_name) in want.items():
        for call in (TIMIPipeline.__call__, TIMIPipelineJAX.__call__):
            assert inspect.signature(call).parameters[call_name].default == value, (call, call_name)
        assert getattr(opts, cli_name) == value == _option_default(generate_command, cli_name)
    assert not opts.dense_decoding and defaults.DECODING == "coarse-to-fine"
    assert _option_default(TIMIPipeline.from_pretrained, "decoding") == defaults.DECODING


def test_from_pretrained_decodes_and_threads_as_the_command_line():
    """The shipped model: coarse-to-fine decoding and one thread, as ``timi generate`` chooses them;
    a call runs on that thread count and gives the caller's back."""
    from timi.assets import example
    from timi.generate import choose_threads
    from timi.testbed import default_model_path
    from timi_torch import TIMIPipeline
    from timi_torch.decoding import CoarseToFineVolumeDecoder

    pipe = TIMIPipeline.from_pretrained(device="cpu")
    assert isinstance(pipe.base.vae.volume_decoder, CoarseToFineVolumeDecoder)
    assert pipe.num_threads == choose_threads(str(default_model_path())) == 1
    dense = TIMIPipeline.from_pretrained(device="cpu", decoding="dense", num_threads=2)
    assert not isinstance(dense.base.vae.volume_decoder, CoarseToFineVolumeDecoder) and dense.num_threads == 2

    seen, before = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe(example() / "image.png", example() / "masks.png", num_inference_steps=1, output_type="latent",
             enable_pbar=False, callback=lambda *a: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_default_threads_rule():
    assert defaults.default_threads(3_600_000) == 1
    assert defaults.default_threads(defaults.SMALL_MODEL_BYTES) == defaults.default_threads(None) == defaults.usable_cores()


def test_example_is_found_from_any_folder(tmp_path, monkeypatch):
    from timi.assets import example

    monkeypatch.chdir(tmp_path)
    assert example().is_absolute() and (example() / "image.png").is_file() and (example() / "masks.png").is_file()


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no Python snippet"
    return blocks[0]


@pytest.mark.xdist_group("heavy")
@pytest.mark.slow
def test_readme_snippet_runs_verbatim_from_another_folder(tmp_path):
    """The snippet, as a new user pastes it, from a folder that is not the repository (it used a
    relative path), with the library's defaults (coarse-to-fine at octree 384, 1 thread: ~25 s here)."""
    code = _readme_snippet() + "\nprint('faces', len(mesh.faces))\n"
    assert "timi/assets" not in code
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user runs it
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split("faces")[-1]) > 1000


# ------------------------------------------------------------------ what fits in memory (issue 38, item 2)


def test_memory_check_names_the_largest_value_that_fits(monkeypatch):
    from timi_torch import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10 * 2**30)
    memory.check_memory(384, 50)
    with pytest.raises(memory.MemoryEstimateError) as e:
        memory.check_memory(2000, 50)
    most = int(re.search(r"use at most (\d+)", str(e.value)).group(1))
    memory.check_memory(most, 50)                       # the value it names fits ...
    with pytest.raises(memory.MemoryEstimateError):
        memory.check_memory(most + 1, 50)               # ... and is the largest that does
    with pytest.raises(memory.MemoryEstimateError, match=r"^num_inference_steps=10000000: .* use at most \d+"):
        memory.check_memory(None, 10**7)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: None)  # unknown: not refused
    memory.check_memory(2000, 50)


def test_library_refuses_a_grid_that_cannot_fit_before_sampling(fast_base):
    """``octree_resolution=10000`` needs tens of TiB: refused before the first step (no callback)."""
    from timi.assets import example
    from timi_torch import TIMIPipeline
    from timi_torch.memory import MemoryEstimateError

    steps = []
    with pytest.raises(MemoryEstimateError, match=r"^octree_resolution=10000: .*TiB of memory"):
        TIMIPipeline(fast_base)(example() / "image.png", example() / "masks.png", num_inference_steps=2,
                                octree_resolution=10000, callback=lambda *a: steps.append(a), enable_pbar=False)
    assert steps == []

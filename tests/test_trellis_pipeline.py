"""TRELLIS folders through the application: ``TrellisPipeline`` and ``timi generate --model <TRELLIS folder>``.

The folders are written by our own code in upstream's layout (``pipeline.json``, ``ckpts/*.json`` +
``.safetensors`` with upstream's key names) plus the hy3dgen conditioner they were trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from timi_core import TIMIConfig
from timi_torch.trellis.pipeline import TrellisPipeline
from timi_torch.trellis.testing import write_tiny_trellis_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "timi" / "assets" / "example"


@pytest.fixture(scope="module", params=["conv", "depth_to_space"])
def folder(request, tmp_path_factory):
    return write_tiny_trellis_dir(tmp_path_factory.mktemp(f"trellis_{request.param}"), decoder=request.param)


def test_pipeline_samples_with_and_without_timi(folder):
    pipe = TrellisPipeline.from_pretrained(folder)
    image, masks = str(EXAMPLE / "image.png"), str(EXAMPLE / "masks.png")
    plain = pipe(image, masks, generator=torch.manual_seed(0), enable_pbar=False, config=TIMIConfig(isg=False))
    again = pipe(image, masks, generator=torch.manual_seed(0), enable_pbar=False, config=TIMIConfig(isg=False))
    guided = pipe(image, masks, generator=torch.manual_seed(0), enable_pbar=False, num_inference_steps=4,
                  config=TIMIConfig(guided_steps=2))
    assert torch.equal(plain.latents, again.latents)                          # deterministic seeds
    assert plain.latents.shape == (1, 8, 8, 8, 8) and plain.diagnostics == []
    assert [d.step for d in guided.diagnostics] == [0, 1] and not torch.equal(plain.latents, guided.latents)
    assert plain.meshes[0] is not None and len(plain.meshes[0].faces) > 0


def test_guidance_scale_is_hy3dgens_w(folder):
    """TRELLIS's (1 + s) c - s u equals hy3dgen's u + w (c - u) with s = w - 1."""
    pipe = TrellisPipeline.from_pretrained(folder)
    assert pipe._settings(7, 5.0).cfg_strength == 4.0 and pipe._settings(7, 5.0).steps == 7
    assert pipe._settings(None, None) == pipe.settings


@pytest.mark.parametrize("timi_flag", [[], ["--no-timi"]])
def test_timi_generate_runs_a_trellis_folder(folder, tmp_path, timi_flag):
    from timi.cli import app

    out = tmp_path / "scene.glb"
    result = CliRunner().invoke(app, ["generate", str(EXAMPLE / "image.png"), "--masks", str(EXAMPLE / "masks.png"),
                                      "--model", str(folder), "--out", str(out), "--steps", "4", "--split-instances", *timi_flag])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.stat().st_size > 0
    assert ("guided steps" in result.output) == (not timi_flag)


def test_a_trellis_folder_without_its_conditioner_is_refused_in_one_line(folder, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "conditioner.json").unlink()
    with pytest.raises(FileNotFoundError, match="guide"):
        TrellisPipeline.from_pretrained(bare)
    spec = json.loads((bare / "pipeline.json").read_text())
    assert spec["args"]["models"]["sparse_structure_flow_model"] == "ckpts/ss_flow"


def test_bench_overhead_runs_trellis_stage_one_and_states_its_floor(tmp_path):
    from timi.bench.trellis import trellis_overhead

    r = trellis_overhead("trellis-testbed-size", steps=3, repeats=1, warmup=0, guided_layers=2)
    # 3 steps, rescale 3: times 1, 6/7, 0.6 start the steps, all inside the CFG interval [0.5, 1] -> 6
    # forwards; noise levels 0, 1/7 < 0.3 <= 0.4 -> 2 guided, through 2 of the 4 blocks
    assert (r["plain_forwards"], r["guided_steps"], r["guided_layers"]) == (6, 2, 2)
    assert r["floor"] == pytest.approx(1 + 2 * 3 * (2 / 4) / 6)
    assert r["plain_s"] > 0 and r["timi_s"] > 0


def test_shuffled_gradient_control_moves_whole_voxels_on_a_grid():
    from timi.testbed.controls import ShuffledGradient

    g = torch.randn(2, 3, 4, 4, 4)
    out = ShuffledGradient(seed=1)(g, step=0)
    a, b = g.flatten(2).transpose(1, 2), out.flatten(2).transpose(1, 2)          # (B, voxels, C)
    for i in range(2):                                                           # same voxel vectors, moved
        assert sorted(map(tuple, a[i].tolist())) == sorted(map(tuple, b[i].tolist()))
    assert not torch.equal(g, out)


def test_recorder_sees_the_guided_blocks_cross_attention(folder):
    from timi.report import AttentionRecorder

    pipe = TrellisPipeline.from_pretrained(folder)
    cm = pipe.condition_masks(str(EXAMPLE / "image.png"), str(EXAMPLE / "masks.png"))
    recorder = AttentionRecorder(cm.tokens, layers=2, steps=2)
    out = pipe(str(EXAMPLE / "image.png"), cm, num_inference_steps=3, generator=torch.manual_seed(0),
               enable_pbar=False, recorder=recorder)
    assert sorted((r.step, r.layer) for r in out.recordings) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert out.recordings[0].probability.shape == (4 ** 3, cm.num_instances)     # one row per voxel token


def test_jax_backend_gives_the_torch_backends_latents(folder):
    pytest.importorskip("jax")
    from timi.pipelines import load_pipeline

    image, masks = str(EXAMPLE / "image.png"), str(EXAMPLE / "masks.png")
    config = TIMIConfig(guided_steps=2)
    runs = {b: load_pipeline(str(folder), backend=b, device="cpu", config=config) for b in ("torch", "jax")}
    outs = {b: p(image, masks, num_inference_steps=3, generator=torch.manual_seed(0), enable_pbar=False,
                 output_type="latent") for b, p in runs.items()}
    torch.testing.assert_close(outs["jax"].latents, outs["torch"].latents, rtol=0, atol=1e-4)
    assert [d.step for d in outs["jax"].diagnostics] == [d.step for d in outs["torch"].diagnostics] == [0, 1]
    assert outs["jax"].diagnostics[0].loss == pytest.approx(outs["torch"].diagnostics[0].loss, rel=1e-4)


def test_the_default_form_on_trellis_is_the_papers(folder, tmp_path):
    """The rule of issue 36 kept the paper's form as TRELLIS's default; token models keep TIMIConfig()."""
    from timi.pipelines import family_preset

    assert family_preset(str(folder)) == "paper" and family_preset(str(folder), "paper") == "paper"
    assert family_preset(None) == "default"
    assert TrellisPipeline.from_pretrained(folder).config == TIMIConfig.paper()

"""TRELLIS stage 1's modules (``timi_torch.trellis``) against numbers from upstream's own code.

``tests/fixtures/trellis_upstream.npz`` was made by ``tools/trellis_fixture.py`` from microsoft/TRELLIS
(commit in the file and in ``docs/trellis.md``): upstream's state-dict keys and shapes (two small flow
configurations covering every released option, a small decoder, and the released image-large flow and
16l8 decoder built on the meta device), the seed of the weights (every parameter perturbed, so
upstream's zero-initialised adaLN and output layers hide nothing), inputs and upstream's outputs.
Here (torch 2.14.1, CPU, float32) they come out bit-identical; 2e-5 allows another build's reduction
order, while a wrong head layout moves them by far more (``test_a_wrong_layout_is_caught``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from timi_torch.hunyuan21.testing import seeded_state_dict
from timi_torch.trellis import (FLOW_PRESETS, SparseStructureDecoder, SparseStructureFlowModel, load_model,
                                load_stage1, occupancy_mesh, save_model, write_pipeline_json)
from trellis_helpers import fixture_shapes as _shapes
from trellis_helpers import upstream, upstream_flow  # noqa: F401  (upstream: a fixture)

ATOL = 2e-5


def _ours(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _flow(upstream, name):
    model = upstream_flow(upstream, name)
    assert list(_ours(model).items()) == list(_shapes(upstream, name).items())   # same keys, order and shapes
    return model


@pytest.mark.parametrize("name", ["a", "b"])
def test_flow_velocities_match_upstream(upstream, name):
    model = _flow(upstream, name)
    x, cond = torch.from_numpy(upstream[f"{name}/x"]), torch.from_numpy(upstream[f"{name}/cond"])
    with torch.no_grad():
        for i, t in enumerate(upstream[f"{name}/t"]):
            v = model(x, torch.full((x.shape[0],), 1000 * float(t)), cond)
            np.testing.assert_allclose(v.numpy(), upstream[f"{name}/v"][i], rtol=0, atol=ATOL)


def test_a_wrong_layout_is_caught(upstream):
    """Swapping k and v of the cross-attention (to_kv's halves) must fail the tolerance."""
    model = _flow(upstream, "a")
    w = model.blocks[0].cross_attn.to_kv.weight.data
    half = w.shape[0] // 2
    w.copy_(torch.cat([w[half:], w[:half]]))
    x, cond = torch.from_numpy(upstream["a/x"]), torch.from_numpy(upstream["a/cond"])
    with torch.no_grad():
        v = model(x, torch.full((x.shape[0],), 370.0), cond)
    assert np.abs(v.numpy() - upstream["a/v"][1]).max() > 100 * ATOL


def test_decoder_logits_match_upstream(upstream):
    decoder = SparseStructureDecoder(**json.loads(str(upstream["decoder/config"]))).eval()
    shapes = _shapes(upstream, "decoder")
    assert list(_ours(decoder).items()) == list(shapes.items())
    decoder.load_state_dict(seeded_state_dict(shapes, int(upstream["decoder/seed"])), strict=True)
    with torch.no_grad():
        logits = decoder(torch.from_numpy(upstream["decoder/z"]))
    np.testing.assert_allclose(logits.numpy(), upstream["decoder/logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["flow_image_large", "decoder_16l8"])
def test_released_configurations_have_upstreams_keys_and_shapes(upstream, name):
    cfg = json.loads(str(upstream[f"released/{name}/config"]))
    with torch.device("meta"):
        module = (SparseStructureFlowModel if name.startswith("flow") else SparseStructureDecoder)(**cfg)
    assert list(_ours(module).items()) == list(_shapes(upstream, f"released/{name}").items())
    if name.startswith("flow"):
        assert module.config == FLOW_PRESETS["image-large"]
        assert sum(p.numel() for p in module.parameters()) == pytest.approx(555.5e6, rel=1e-3)


def test_save_and_load_round_trip_in_upstreams_layout(tmp_path, upstream):
    model = _flow(upstream, "b")
    stem = save_model(model, tmp_path / "ckpts" / "ss_flow")
    assert json.loads((tmp_path / "ckpts" / "ss_flow.json").read_text())["name"] == "SparseStructureFlowModel"
    loaded = load_model(stem)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_load_errors_name_the_file(tmp_path, upstream):
    with pytest.raises(FileNotFoundError, match="ss_missing.json"):
        load_model(tmp_path / "ss_missing")
    stem = save_model(_flow(upstream, "a"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m.json").read_text())
    cfg["args"]["num_blocks"] += 1
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit SparseStructureFlowModel"):
        load_model(stem)
    (tmp_path / "m.json").write_text(json.dumps({"name": "SLatFlowModel", "args": {}}))
    with pytest.raises(ValueError, match="stage 1 only"):
        load_model(stem)


def test_pipeline_folder_gives_stage_one_and_its_sampler_settings(tmp_path, upstream):
    save_model(_flow(upstream, "a"), tmp_path / "ckpts" / "flow")
    decoder = SparseStructureDecoder(**json.loads(str(upstream["decoder/config"])))
    save_model(decoder, tmp_path / "ckpts" / "dec")
    from timi_torch.trellis import SamplerSettings

    write_pipeline_json(tmp_path, "ckpts/flow", "ckpts/dec", SamplerSettings(steps=25, cfg_strength=5.0))
    flow, dec, settings = load_stage1(tmp_path)
    assert isinstance(flow, SparseStructureFlowModel) and isinstance(dec, SparseStructureDecoder)
    assert (settings.steps, settings.cfg_strength, settings.cfg_interval) == (25, 5.0, (0.5, 1.0))


def test_occupancy_mesh_is_closed_outward_and_in_the_unit_cube():
    n = 16
    c = (torch.arange(n) + 0.5) / n - 0.5
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    logits = 0.3 - torch.sqrt((x - 0.1) ** 2 + y ** 2 + z ** 2)           # a ball of radius 0.3 at (0.1, 0, 0)
    mesh = occupancy_mesh(logits)
    assert mesh.is_watertight and mesh.volume > 0                          # faces point outward
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.3 ** 3, rel=0.1)
    assert mesh.centroid == pytest.approx([0.1, 0, 0], abs=0.02)
    assert occupancy_mesh(-torch.ones(4, 4, 4)) is None


def test_an_fp16_checkpoint_runs_in_float32_after_convert(tmp_path, upstream):
    cfg = {**json.loads(str(upstream["a/config"])), "use_fp16": True}
    model = SparseStructureFlowModel(**cfg).eval()
    assert model.blocks[0].mlp.mlp[0].weight.dtype == torch.float16 and model.input_layer.weight.dtype == torch.float32
    loaded = load_model(save_model(model, tmp_path / "fp16")).convert_to_fp32()
    x, cond = torch.from_numpy(upstream["a/x"]), torch.from_numpy(upstream["a/cond"])
    with torch.no_grad():
        v = loaded(x, torch.full((x.shape[0],), 370.0), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()

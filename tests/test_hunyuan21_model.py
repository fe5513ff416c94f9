"""Hunyuan3D 2.1's DiT (``timi_torch.hunyuan21``) against numbers from upstream's own code.

``tests/fixtures/hunyuan21_upstream.npz`` was made by ``tools/hunyuan21_fixture.py`` from
Tencent-Hunyuan/Hunyuan3D-2.1 (commit in the file and in ``docs/hunyuan21.md``): upstream's
state-dict keys and shapes, the seed of the weights, inputs, upstream's velocities and one sampling
trajectory of upstream's pipeline. Tolerance: float32 on CPU. Here (torch 2.14.1, one thread) the
velocities come out bit-identical (max difference 0.0), as both run the same operations; the two
implementations may still order some reductions differently on other builds or thread counts (MoE
accumulation: upstream scatter-adds, we index-add; SDPA kernel choice), which moves outputs of
order 1 by a few float32 ulps (~1e-6). 2e-5 absolute allows that, while any wrong weight, head
layout, skip or routing moves them by far more (``test_wrong_weights_are_caught``: > 2e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from timi_torch.hunyuan21 import HunYuanDiTPlain
from timi_torch.hunyuan21.testing import seeded_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "hunyuan21_upstream.npz"
ATOL = 2e-5


@pytest.fixture(scope="module")
def upstream():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _model(upstream, name):
    cfg = json.loads(str(upstream[f"{name}/config"]))
    shapes = dict((k, tuple(v)) for k, v in json.loads(str(upstream[f"{name}/shapes"])))
    model = HunYuanDiTPlain(**cfg).eval()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes                           # identical keys and shapes: checkpoints load strictly
    model.load_state_dict(seeded_state_dict(shapes, int(upstream[f"{name}/seed"])), strict=True)
    return model


@pytest.mark.parametrize("name", ["a", "b"])
def test_velocity_matches_upstream(upstream, name):
    """Config "a": the released options (qk RMSNorm, no qkv bias, U-Net skips, top-2 MoE); "b": qkv
    bias, LayerNorm qk-norm, sin-cos positions, attention pooling, top-1 MoE."""
    model = _model(upstream, name)
    x, cond = torch.from_numpy(upstream[f"{name}/x"]), torch.from_numpy(upstream[f"{name}/cond"])
    with torch.no_grad():
        for t, expected in zip(upstream[f"{name}/t"], upstream[f"{name}/v"]):
            v = model(x, torch.full((x.shape[0],), float(t)), {"main": cond})
            np.testing.assert_allclose(v.numpy(), expected, rtol=0, atol=ATOL)
            assert np.abs(expected).max() > 0.1            # the comparison is not of near-zeros


def test_wrong_weights_are_caught(upstream):
    """The tolerance is meaningful: one permuted head in block 0's cross-attention fails it."""
    model = _model(upstream, "a")
    w = model.blocks[0].attn2.to_q.weight
    with torch.no_grad():
        w.copy_(torch.roll(w, 16, dims=0))
        v = model(torch.from_numpy(upstream["a/x"]), torch.zeros(2), {"main": torch.from_numpy(upstream["a/cond"])})
    assert np.abs(v.numpy() - upstream["a/v"][0]).max() > 100 * ATOL


def test_model_is_differentiable_through_moe(upstream):
    """Unlike upstream's inference path (``moe_infer`` runs under no_grad), the MoE blocks pass gradients."""
    model = _model(upstream, "a")
    x = torch.from_numpy(upstream["a/x"]).requires_grad_(True)
    model(x, torch.zeros(2), {"main": torch.from_numpy(upstream["a/cond"])}).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_released_size():
    """The released 2.1 config (preset "2.1") builds the 3.05B-parameter DiT, on the meta device."""
    from timi_torch.hunyuan21 import PRESETS

    with torch.device("meta"):
        model = HunYuanDiTPlain(config=PRESETS["2.1"])
    assert sum(p.numel() for p in model.parameters()) == 3_050_758_720
    assert [b.use_moe for b in model.blocks] == [False] * 15 + [True] * 6
    assert [b.skip_linear is not None for b in model.blocks] == [False] * 11 + [True] * 10


def test_unsupported_options_are_refused():
    with pytest.raises(NotImplementedError, match="decoupled"):
        HunYuanDiTPlain(with_decoupled_ca=True, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        HunYuanDiTPlain(hidden_size=60, num_heads=8)

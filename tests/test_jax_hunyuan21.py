"""The Flax Hunyuan3D 2.1 DiT (``timi_jax.hunyuan21``) against upstream's numbers and the torch port.

Tolerance: ``max|jax - ref| / max|ref|`` below 1e-5 in float32 (XLA's matmuls and softmax sum in
another order than torch's; measured 6e-7 to 8e-7 against upstream's fixture), while one head of
block 0's cross-attention query rolled by 16 rows moves the output by 0.68 (measured).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from timi_jax.hunyuan21 import PRESETS, HunYuanDiTPlain, from_checkpoint, from_torch  # noqa: E402
from timi_torch.hunyuan21 import HunYuanDiTPlain as TorchDiT  # noqa: E402
from timi_torch.hunyuan21.testing import seeded_state_dict, write_tiny_model_dir  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hunyuan21_upstream.npz"
TOL = 1e-5


def rel_err(out, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def test_matches_upstream_fixture():
    """Config "a" (the released options): upstream's velocities at three timesteps."""
    with np.load(FIXTURE) as f:
        up = {k: f[k] for k in f.files}
    cfg = json.loads(str(up["a/config"]))
    shapes = dict((k, tuple(v)) for k, v in json.loads(str(up["a/shapes"])))
    state = seeded_state_dict(shapes, int(up["a/seed"]))
    model = from_torch(state, **cfg)
    for t, expected in zip(up["a/t"], up["a/v"]):
        v = model(up["a/x"], jnp.full((up["a/x"].shape[0],), t), {"main": up["a/cond"]})
        assert rel_err(v, expected) < TOL


def test_matches_torch_port_with_positions():
    """The torch port with sin-cos positions, qkv bias and LayerNorm qk-norm (no pooling), random weights."""
    cfg = PRESETS["2.1-tiny"].__class__(**{**PRESETS["2.1-tiny"].__dict__, "use_pos_emb": True, "qkv_bias": True,
                                           "qk_norm_type": "layer", "moe_top_k": 1})
    torch.manual_seed(0)
    ref = TorchDiT(config=cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():       # norm scales off 1, biases off 0: the copy is checked
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model = from_torch(ref)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, cfg.input_size, cfg.in_channels, generator=g), torch.randn(2, 9, cfg.context_dim, generator=g)
    t = torch.tensor([0.1, 0.8])
    with torch.no_grad():
        expected = ref(x, t, {"main": c}).numpy()
    assert rel_err(model(x.numpy(), t.numpy(), c.numpy()), expected) < TOL


def test_loads_a_2_1_folder(tmp_path):
    d = write_tiny_model_dir(tmp_path / "hunyuan3d-dit-v2-1", image_size=56)
    model = from_checkpoint(d)
    assert isinstance(model, HunYuanDiTPlain) and model.config.depth == PRESETS["2.1-tiny"].depth


def test_pooling_is_refused():
    with pytest.raises(NotImplementedError, match="pooling"):
        HunYuanDiTPlain(PRESETS["2.1-tiny"].__class__(**{**PRESETS["2.1-tiny"].__dict__, "use_attention_pooling": True}))

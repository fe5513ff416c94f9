"""timi_jax.bench: ahead-of-time compile timed apart from runs, guided vs plain."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
from timi_jax.testing import random_model  # noqa: E402

from timi_core import TIMIConfig  # noqa: E402
from timi_jax.bench import compare_guided_plain  # noqa: E402


def test_compare_guided_plain_reports_compile_and_run_times():
    cfg = dict(in_channels=4, context_in_dim=6, hidden_size=8, mlp_ratio=2.0, num_heads=2,
               depth=2, depth_single_blocks=1, axes_dim=[4])
    model = random_model(seed=0, **cfg)
    rng = np.random.default_rng(1)
    noise = jnp.asarray(rng.standard_normal((1, 6, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((1, 5, 6)), jnp.float32)
    tokens = jnp.asarray([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]], jnp.float32)
    result = compare_guided_plain(model, noise, cond, None, tokens, num_inference_steps=3,
                                  config=TIMIConfig(guided_layers=1, guided_steps=2), repeats=2)
    for key in ("plain", "guided"):
        r = result[key]
        assert r["compile_s"] > 0 and len(r["runs_s"]) == 2 and r["run_s"] > 0
        assert r["steps"] == 3 and r["batch"] == 1 and r["per_step_s"] == r["run_s"] / 3
    assert math.isfinite(result["overhead"]) and result["overhead"] > 0
    with pytest.raises(ValueError, match="repeats"):
        compare_guided_plain(model, noise, cond, None, tokens, repeats=0)

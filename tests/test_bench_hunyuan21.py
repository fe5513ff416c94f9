"""``timi bench overhead --model 2.1-tiny``: Hunyuan3D 2.1's DiT in the overhead benchmark, and its FLOP model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from timi.bench.config import BenchConfig, hunyuan21_config
from timi.bench.floor import forward_flops21
from timi.cli import app


@pytest.fixture(autouse=True)
def _restore_threads():
    import os

    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    yield
    torch.set_num_threads(threads)
    os.sched_setaffinity(0, cpus)


def test_flop_model_counts_what_torch_runs():
    """forward_flops21 equals PyTorch's FLOP counter on the tiny 2.1 DiT (SDPA decomposed into its
    matmuls so that the counter sees them; MoE experts counted on their routed tokens); the guidance
    pass's count is a floor of what even the explicit path runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from timi.bench.torch_backend import build_dit
    from timi_torch.guidance import guided_probabilities

    cfg = hunyuan21_config("2.1-tiny")
    model = build_dit(cfg)
    x, c = torch.randn(1, cfg.num_latents, cfg.latent_channels), torch.randn(1, cfg.num_cond_tokens, cfg.context_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as full:
        model(x, torch.zeros(1), {"main": c})
    assert full.get_total_flops() == forward_flops21(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as guide:
        guided_probabilities(model, x, torch.zeros(1), c, torch.zeros(1, 2, cfg.num_cond_tokens), 4, "explicit")
    assert forward_flops21(cfg, 4) <= guide.get_total_flops() <= 1.1 * forward_flops21(cfg, 4)


def test_overhead_smoke(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "overhead", "--model", "2.1-tiny", "--steps", "3", "--guided-steps", "1",
                                   "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert BenchConfig(**r["config"]).architecture == "2.1-tiny"
    assert r["ratio"] > 0 and 1 < r["floor"] < 2 and r["floor_as_implemented"] is None   # one noisy repeat: no bound on the ratio
    assert r["max_abs_latent_diff_timi_vs_plain"] > 0


def test_refused_combinations():
    res = CliRunner().invoke(app, ["bench", "overhead", "--model", "2.1-tiny", "--backend", "jax"])
    assert res.exit_code == 2 and "torch backend only" in res.output

"""Smoke tests of ``timi bench`` (tiny configs, one repeat) and a FLOP-count check of the floor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from timi.bench.config import BenchConfig, tiny_config
from timi.bench.floor import forward_flops, overhead_floor
from timi.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_threads():
    """The smoke runs use ``--threads 1`` (one core: fast on a busy CI machine); give other tests
    the defaults back."""
    import os

    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    yield
    torch.set_num_threads(threads)
    os.sched_setaffinity(0, cpus)


def test_threads_1_binds_the_process_to_one_cpu(tmp_path):
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable CPUs")
    r = _run(tmp_path, "overhead", "--tiny", "--repeats", "1")
    assert r["machine"]["usable_cpus"] == 1 and r["machine"]["torch_threads"] == 1


def _run(tmp_path, *args, threads=1):
    out = tmp_path / "result.json"
    res = runner.invoke(app, ["bench", *args, "--threads", str(threads), "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(out.read_text())


def _positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_common(r, backend):
    for key in ("plain_s", "timi_s", "ratio", "backend", "config", "machine"):
        assert key in r, key
    assert r["backend"] == backend
    assert r["machine"]["cpu"] and r["machine"]["torch"] == torch.__version__
    BenchConfig(**r["config"])  # the recorded config is a valid one


def test_overhead_torch_smoke(tmp_path):
    r = _run(tmp_path, "overhead", "--tiny", "--repeats", "1", "--warmup", "0")
    _check_common(r, "torch")
    for key in ("plain_s", "timi_s", "ratio", "floor", "floor_input_grad", "guide_s_per_guided_step",
                "ratio_from_guide_time"):
        assert _positive_finite(r[key]), (key, r[key])
    assert r["ratio"] == pytest.approx(r["timi_s"] / r["plain_s"])
    assert r["max_abs_latent_diff_timi_vs_plain"] > 0  # the guidance did change the sample


def test_scaling_smoke(tmp_path):
    r = _run(tmp_path, "scaling", "--tiny", "--ks", "1,2", "--ls", "16,32", "--repeats", "1", "--warmup", "0")
    _check_common(r, "torch")
    assert [(row["sweep"], row["K"], row["L"]) for row in r["rows"]] == [
        ("K", 1, 32), ("K", 2, 32), ("L", 2, 16), ("L", 2, 32)]
    assert all(_positive_finite(row[k]) for row in r["rows"]
               for k in ("plain_step_s", "guided_step_s", "step_ratio", "ratio", "floor"))


def test_guidance_pass_smoke(tmp_path):
    r = _run(tmp_path, "guidance-pass", "--tiny")
    _check_common(r, "torch")
    for key in ("fused_s", "explicit_s", "time_ratio", "memory_ratio", "ratio"):
        assert _positive_finite(r[key]), (key, r[key])
    assert r["fused_peak_mib"] >= 0 and r["explicit_peak_mib"] > 0
    assert r["loss_rel_diff_fused_vs_explicit"] < 1e-4  # both modes compute the same Eq.4


def test_backends_smoke(tmp_path):
    pytest.importorskip("timi_jax")
    # default threads: a single-threaded XLA client would stay so for the rest of the session
    r = _run(tmp_path, "backends", "--tiny", "--repeats", "1", threads=0)
    _check_common(r, "torch+jax")
    for key in ("torch_s", "jax_s", "ratio", "jax_first_call_s"):
        assert _positive_finite(r[key]), (key, r[key])
    assert r["max_abs_latent_diff_jax_vs_torch"] < 1e-3  # same weights and inputs, same sampler


def test_overhead_and_scaling_jax_smoke(tmp_path):
    pytest.importorskip("timi_jax")
    r = _run(tmp_path, "overhead", "--tiny", "--backend", "jax", "--repeats", "1", "--warmup", "0", threads=0)
    _check_common(r, "jax")
    for key in ("ratio", "guide_s_per_guided_step", "plain_step_s", "ratio_from_step_times"):
        assert _positive_finite(r[key]), (key, r[key])
    assert set(r["compile_s"]) == {"plain", "timi"} and min(r["compile_s"].values()) > 0
    assert r["max_abs_latent_diff_timi_vs_plain"] > 0
    s = _run(tmp_path, "scaling", "--tiny", "--backend", "jax", "--ks", "2", "--ls", "16", "--repeats", "1",
             "--warmup", "0", threads=0)
    assert [(row["sweep"], row["K"], row["L"]) for row in s["rows"]] == [("K", 2, 32), ("L", 2, 16)]
    assert all(_positive_finite(row["ratio"]) for row in s["rows"])


def test_bad_backend_is_named(tmp_path):
    res = runner.invoke(app, ["bench", "overhead", "--tiny", "--backend", "tf"])
    assert res.exit_code != 0 and "torch or jax" in res.output


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config().replace(num_latents=48, num_cond_tokens=26,
                                                                        hidden_size=64, num_heads=4)])
def test_forward_flops_match_torch_flop_counter(cfg):
    """The floor's FLOP model equals torch's own count of the hy3dgen forward's matmuls (SDPA on its
    math backend, so that the attention's bmm's are counted too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from timi.bench.torch_backend import build_dit

    model = build_dit(cfg)
    x = torch.randn(1, cfg.num_latents, cfg.latent_channels)
    c = torch.randn(1, cfg.num_cond_tokens, cfg.context_dim)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, torch.rand(1), {"main": c})
    assert forward_flops(cfg) == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_floor_of_the_paper_schedule():
    """Issue 7: l=4 of 48 equal-cost blocks, one of two CFG branches, 15 of 50 steps, backward = 2x
    forward -> about 4% extra (slightly less: the embeddings and final layer are not guided)."""
    f = overhead_floor(BenchConfig(hidden_size=1024, num_heads=16, num_latents=3072, num_cond_tokens=1370,
                                   steps=50, guided_steps=15))
    assert 1.035 < f["floor"] < 4 / 48 * 0.5 * 0.3 * 3 + 1 + 1e-3
    assert 1 < f["floor_input_grad"] < f["floor"]
    assert 1 < f["floor_as_implemented"] < f["floor"]  # the last block stops at P


def test_guidance_distilled_overhead_runs_one_branch_and_doubles_the_relative_floor(tmp_path):
    """A guidance-distilled DiT (fast / turbo): plain sampling has one forward per step, not the CFG
    pair, so the same guidance pass is twice the relative extra cost."""
    paper = BenchConfig(hidden_size=1024, num_heads=16, num_latents=3072, num_cond_tokens=1370, steps=50,
                        guided_steps=15)
    cfg_floor, distilled = overhead_floor(paper), overhead_floor(paper.replace(guidance_embed=True))
    assert distilled["branches"] == 1 and cfg_floor["branches"] == 2
    for key in ("floor", "floor_input_grad", "floor_as_implemented"):
        assert distilled[key] - 1 == pytest.approx(2 * (cfg_floor[key] - 1))
    r = _run(tmp_path, "overhead", "--tiny", "--guidance-distilled", "--repeats", "1", "--warmup", "0")
    _check_common(r, "torch")
    assert r["config"]["guidance_embed"] is True and r["max_abs_latent_diff_timi_vs_plain"] > 0
    assert r["floor"] == pytest.approx(overhead_floor(BenchConfig(**r["config"]))["floor"])


def test_report_renders_results(tmp_path):
    r = _run(tmp_path, "overhead", "--tiny", "--repeats", "1", "--warmup", "0")
    res = runner.invoke(app, ["bench", "report", str(tmp_path / "result.json")])
    assert res.exit_code == 0, res.output
    assert f"{r['ratio']:.3f}" in res.output and r["machine"]["cpu"] in res.output


@pytest.mark.xdist_group("heavy")
def test_bench_mesh_tiny_compares_decodings_on_the_same_latent(tmp_path):
    r = _run(tmp_path, "mesh", "--tiny")
    rows = {(row["resolution"], row["decoding"]): row for row in r["rows"]}
    assert set(rows) == {(64, "dense"), (64, "coarse-to-fine"), (128, "dense"), (128, "coarse-to-fine")}
    assert rows[(64, "coarse-to-fine")]["queries"] == 65 ** 3          # below 128: dense
    dense, fast = rows[(128, "dense")], rows[(128, "coarse-to-fine")]
    assert dense["queries"] == 129 ** 3 and 0 < fast["queries"] < dense["queries"]
    assert fast["identical"] and fast["iou"] == 1.0 and fast["chamfer"] == 0.0   # the shipped model: same mesh
    assert all(_positive_finite(row["seconds"]) for row in r["rows"])


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_bench_gpu_tiny_runs_every_part_and_writes_json_and_markdown(tmp_path):
    res = runner.invoke(app, ["bench", "gpu", "--tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert all(part["ok"] for part in r["parts"].values()), {k: v.get("error") for k, v in r["parts"].items()}
    assert _positive_finite(r["parts"]["overhead"]["ratio"]) and _positive_finite(r["parts"]["backends"]["jax_s"])
    table = (tmp_path / "gpu.md").read_text()
    assert "54.2" in table and "59.2" in table and "coarse-to-fine" in table

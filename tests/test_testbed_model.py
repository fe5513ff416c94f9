"""Testbed model: flow-matching convention vs hy3dgen's scheduler, training smoke/resume, shipped model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timi.testbed.model import SIZES
from timi.testbed.train import TrainConfig, Trainer, flow_matching_pair, ot_coupling

TINY = SIZES["tiny"]


def test_flow_matching_pair_matches_hy3dgen_scheduler():
    """Integrating the training target with hy3dgen's own Euler scheduler and sigmas goes noise -> data."""
    from hy3dgen.shapegen.schedulers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(sigmas=np.linspace(0, 1, 7))  # what Hunyuan3DDiTFlowMatchingPipeline does
    x = x0.clone()
    for t in sched.timesteps:
        sigma = (t / sched.config.num_train_timesteps).expand(2)  # the t the pipeline hands the model
        xt, v = flow_matching_pair(x1, x0, sigma)
        torch.testing.assert_close(x, xt)
        x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(x, x1)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from timi.testbed.data import build_cache

    return build_cache(tmp_path_factory.mktemp("cache") / "c.npz", 4, seed=1, image_size=TINY.image_size,
                       num_latents=TINY.num_latents, n_encoder=256, n_multi=2, progress=False)


def _cfg(**kw):
    base = dict(seed=3, n_train=4, n_multi=2, vae_steps=2, vae_gap_steps=1, vae_batch=2, n_surface=256, n_query=64, dit_steps=2,
                dit_batch=2, warmup=1, save_every=1, threads=1)
    return TrainConfig(**{**base, **kw})


def test_cache_holds_assets_for_the_dit_and_scenes_for_the_vae(tmp_path, tiny_cache):
    from timi.testbed.data import farthest_point_indices

    with np.load(tiny_cache) as f:
        assert f["num_instances"].tolist()[:4] == [1, 1, 1, 1] and min(f["num_instances"][4:]) >= 2
        pts = f["surface"][0, :256]
        np.testing.assert_array_equal(f["fps"][0], farthest_point_indices(pts, TINY.num_latents))
    t = Trainer(tmp_path / "pool", tiny_cache, _cfg(), TINY, progress=False)
    assert t.dit_pool.tolist() == [0, 1, 2, 3]  # the DiT never sees a multi-instance scene


def test_farthest_point_indices_match_the_torch_sampler():
    from timi.testbed.data import farthest_point_indices
    from timi.testbed.model import farthest_point_sample

    pts = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    ref = farthest_point_sample(torch.from_numpy(pts)[None], 40)[0].numpy()
    np.testing.assert_array_equal(farthest_point_indices(pts, 40), ref)
    # the defining property: each new point is the farthest from those already chosen
    idx = farthest_point_indices(pts, 10)
    for i in range(1, 10):
        d = ((pts[:, None] - pts[idx[:i]][None]) ** 2).sum(-1).min(1)
        assert d[idx[i]] == pytest.approx(d.max())


def test_training_smoke_reproducible_and_resumable(tmp_path, tiny_cache):
    a = Trainer(tmp_path / "a", tiny_cache, _cfg(), TINY, progress=False)
    summary = a.run()
    assert np.isfinite(summary["vae_final_bce"]) and np.isfinite(summary["dit_final_mse"])
    assert (tmp_path / "a" / "loss_curve.png").stat().st_size > 0
    b = Trainer(tmp_path / "b", tiny_cache, _cfg(), TINY, progress=False)
    b.run()
    assert a.state["vae_loss"] == b.state["vae_loss"] and a.state["dit_loss"] == b.state["dit_loss"]
    # resume: a fresh Trainer on run "a" continues from its checkpoint and takes only the new steps
    c = Trainer(tmp_path / "a", tiny_cache, _cfg(dit_steps=3), TINY, progress=False)
    assert c.state["vae_step"] == 2 and c.state["vae_gap_step"] == 1 and c.state["dit_step"] == 2
    c.run()
    assert len(c.state["vae_loss"]) == 2 and len(c.state["vae_gap_loss"]) == 1 and len(c.state["dit_loss"]) == 3
    assert c.state["dit_loss"][:2] == a.state["dit_loss"]
    # more VAE steps after the DiT has trained would change its latents under it: refused
    with pytest.raises(RuntimeError, match="VAE changed after the DiT"):
        Trainer(tmp_path / "a", tiny_cache, _cfg(vae_gap_steps=2, dit_steps=3), TINY, progress=False).run()


def test_export_loads_in_hy3dgen(tmp_path, tiny_cache):
    from timi.testbed.export import export_model_dir, load_pipeline
    t = Trainer(tmp_path / "run", tiny_cache, _cfg(vae_steps=1, dit_steps=1), TINY, progress=False)
    t.run()
    d = export_model_dir(t.export_state(), TINY.replace(scale_factor=t.state["scale_factor"]), tmp_path / "model")
    pipe = load_pipeline(d)  # hy3dgen's from_single_file, strict state-dict loading
    for name, module in (("model", t.dit_ema), ("vae", t.vae), ("conditioner", t.cond_ema)):
        for key, value in module.state_dict().items():
            torch.testing.assert_close(getattr(pipe, name).state_dict()[key], value.half().float())
    assert pipe.vae.scale_factor == pytest.approx(t.state["scale_factor"])
    live = t.export_state(ema=False)["model"]  # `timi testbed export --live`: the live DiT, not its EMA
    assert all(torch.equal(live[k], v) for k, v in t.dit.state_dict().items())
    assert any(not torch.equal(live[k], v) for k, v in t.dit_ema.state_dict().items())
    # a new run seeded from the exported directory starts from its weights and trains the DiT only
    u = Trainer(tmp_path / "resumed", tiny_cache, _cfg(vae_steps=1, dit_steps=2), TINY, progress=False)
    u.init_from(d)
    assert u.state["vae_step"] == 1 and u.state["vae_gap_step"] == 1
    for key, value in t.encoder.state_dict().items():
        torch.testing.assert_close(u.encoder.state_dict()[key], value.half().float())
    u.run()
    assert len(u.state["vae_loss"]) == 0 and len(u.state["dit_loss"]) == 2
    # the VAE ceiling reads the exported directory (hy3dgen's decoder + the shipped encoder)
    from timi.testbed.quality import vae_ceiling
    from timi.testbed.scenes import generate_scene, write_scene

    write_scene(generate_scene(seed=0, split="val", index=0, num_instances=2, resolution=64), tmp_path / "data")
    res = vae_ceiling(d, tmp_path / "data", octree_resolution=24, points_per_object=500, progress=False)
    assert res["n"] == 1 and len(res["rows"]) == 1 and res["rows"][0]["k"] == 2
    counts = res["part_counts"]  # bridged / right / fragmented: right exactly when SSR (Eq.10) is 1
    assert sum(counts.values()) == 1 and (counts["right"] == 1) == (res["rows"][0]["ssr"] == 1.0)
    _check_condition_use(d, tmp_path / "data", tmp_path / "blind")


def test_decoder_stage_trains_the_decoder_only_and_keeps_the_dit_usable(tmp_path, tiny_cache):
    """Stage 1c (``--vae-decoder-steps``) after ``--init-from``: the decoder changes; the encoder, and
    so the latents, the DiT and the latents' scale (the exported ``scale_factor``) stay as exported."""
    from timi.testbed.export import export_model_dir, testbed_extra

    t = Trainer(tmp_path / "run", tiny_cache, _cfg(vae_steps=1, dit_steps=1), TINY, progress=False)
    t.run()
    d = export_model_dir(t.export_state(), TINY.replace(scale_factor=t.state["scale_factor"]), tmp_path / "model",
                         extra={"summary": {"dit_final_mse": 1.5}})
    cfg = _cfg(vae_steps=1, vae_decoder_steps=2, dit_steps=0)
    u = Trainer(tmp_path / "decoder", tiny_cache, cfg, TINY, progress=False)
    u.init_from(d)
    before = {name: {k: v.clone() for k, v in getattr(u, name).state_dict().items()}
              for name in ("encoder", "vae", "dit_ema", "cond_ema")}
    u.run()
    assert len(u.state["vae_decoder_loss"]) == 2 and not u.state["vae_loss"] and not u.state["dit_loss"]
    assert u.state["scale_factor"] == pytest.approx(testbed_extra(d)["sizes"]["scale_factor"])
    for name in ("encoder", "dit_ema", "cond_ema"):
        assert all(torch.equal(getattr(u, name).state_dict()[k], v) for k, v in before[name].items()), name
    assert any(not torch.equal(u.vae.state_dict()[k], v) for k, v in before["vae"].items())
    assert u.state["parent"]["model_dir"] == str(d) and u.state["parent"]["summary"]["dit_final_mse"] == 1.5
    # reproducible from the seed: a second run from the same directory gives the same two losses
    w = Trainer(tmp_path / "decoder2", tiny_cache, cfg, TINY, progress=False)
    w.init_from(d)
    w.run()
    assert w.state["vae_decoder_loss"] == u.state["vae_decoder_loss"]
    # with latent noise the decoder sees other latents (another loss), and the encoder still stays put
    n = Trainer(tmp_path / "noisy", tiny_cache, replace(cfg, decoder_latent_noise=1.0), TINY, progress=False)
    n.init_from(d)
    n.run()
    assert n.state["vae_decoder_loss"] != u.state["vae_decoder_loss"]
    assert all(torch.equal(n.encoder.state_dict()[k], v) for k, v in before["encoder"].items())


def _check_condition_use(model_dir, data_dir, blind_dir):
    """A DiT that sees the image uses it (loss differs with zeros); one whose ``cond_in`` is zeroed cannot
    see it, so its loss with the image equals its loss with hy3dgen's zero embedding exactly."""
    import shutil

    import safetensors.torch

    from timi.testbed.condition_use import condition_use

    seeing = condition_use(model_dir, data_dir, progress=False)
    assert [r["t"] for r in seeing["by_t"]] == [0.05, 0.2, 0.5, 0.8]
    assert any(r["difference"] != 0 for r in seeing["by_t"])
    shutil.copytree(model_dir, blind_dir)
    weights = safetensors.torch.load_file(str(blind_dir / "model.fp16.safetensors"))
    weights["model.cond_in.weight"].zero_()
    safetensors.torch.save_file(weights, str(blind_dir / "model.fp16.safetensors"), metadata={"format": "pt"})
    blind = condition_use(blind_dir, data_dir, progress=False)
    assert all(r["difference"] == 0.0 and r["low"] == r["high"] == 0.0 for r in blind["by_t"])


def test_shipped_model_generates_a_mesh_in_the_unit_box():
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from PIL import Image

    from timi.testbed import default_model_path
    from timi.testbed.scenes import generate_scene

    path = default_model_path()
    assert sum(f.stat().st_size for f in path.iterdir()) < 30e6
    pipe = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(str(path.parent), subfolder=path.name,
                                                            device="cpu", dtype=torch.float32)
    scene = generate_scene(seed=0, split="test", index=0)
    mesh = pipe(image=Image.fromarray(scene.image), num_inference_steps=10, octree_resolution=48,
                generator=torch.Generator().manual_seed(0), enable_pbar=False)[0]
    assert mesh is not None and len(mesh.faces) > 100
    assert (np.abs(mesh.vertices) <= 1.01 + 1e-6).all()


def test_shipped_vae_reconstructs_the_first_single_asset_test_scene(tmp_path):
    """The VAE ceiling floor of issue 12 (FS-S >= 0.9, one part) on test scene 1000, the first of the
    single-asset test set (docs/results.md), through hy3dgen's decoder and marching cubes at 96."""
    from timi.testbed import default_model_path
    from timi.testbed.quality import vae_ceiling
    from timi.testbed.scenes import generate_scene, write_scene

    write_scene(generate_scene(seed=0, split="test", index=1000, num_instances=1), tmp_path)
    res = vae_ceiling(default_model_path(), tmp_path, octree_resolution=96, points_per_object=4096, progress=False)
    row = res["rows"][0]
    assert row["fs_s"] >= 0.9 and row["n_pred"] == 1, row


@pytest.mark.xdist_group("heavy")
def test_shipped_model_follows_the_first_single_asset_test_scene(tmp_path):
    """A seeded generation of test scene 1000 (the first single asset of the test set; docs/results.md,
    "Testbed v5") with the shipped model, scored as `timi eval` scores it. Measured FS-S 0.712 in one
    part (v5; v4 0.716); the earlier models, which did not use their image, scored 0.534 (v2) and 0.666
    (v3p). The floor asserted is 0.65, not issue 12's 0.8, which the model does not reach
    (docs/testbed.md), and one connected part (issue 12's other single-asset floor, which v5 meets)."""
    import csv

    from typer.testing import CliRunner

    from timi.cli import app
    from timi.testbed.scenes import generate_scene, write_scene

    write_scene(generate_scene(seed=0, split="test", index=1000, num_instances=1), tmp_path / "data")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "data"), "--no-timi", "--seed", "0",
                                      "--octree-resolution", "96", "--device", "cpu", "--icp-points", "4096",
                                      "--out", str(tmp_path / "eval"), "--quiet"])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(open(tmp_path / "eval" / "per_scene.csv")))
    assert row["status"] == "ok" and float(row["fs_s"]) >= 0.65 and int(row["n_pred"]) == 1, row


def test_fixed_conditioner_is_frozen_and_exports_to_hy3dgen(tmp_path, tiny_cache):
    """The ``fixed`` conditioner (v3): no layers, its weights do not move in training, hy3dgen's loader
    rebuilds exactly its tokens, and its tokens tell image positions apart (distinct per patch)."""
    from timi.testbed.export import export_model_dir, load_pipeline

    sizes = TINY.replace(conditioner="fixed", cond_layers=0)
    t = Trainer(tmp_path / "run", tiny_cache, _cfg(vae_steps=1, dit_steps=2), sizes, progress=False)
    before = {k: v.clone() for k, v in t.cond.state_dict().items()}
    t.run()
    for key, value in t.cond.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert len(t.state["condition_use"]) == 2  # logged at each save (save_every=1)
    d = export_model_dir(t.export_state(), sizes.replace(scale_factor=t.state["scale_factor"]), tmp_path / "m")
    pipe = load_pipeline(d)
    image = torch.ones(1, 3, sizes.image_size, sizes.image_size)  # blank (white) image
    ours, theirs = t.cond(image=image)["main"], pipe.conditioner(image=image)["main"]
    torch.testing.assert_close(theirs, ours, rtol=2e-3, atol=2e-3)  # fp16 weights
    patches = torch.nn.functional.normalize(ours[0, 1:], dim=-1)
    cos = patches @ patches.T
    assert (cos - torch.eye(len(cos))).max() < 0.999  # every patch token differs from every other
    # the oracle control: condition tokens = a CLS slot + one token per latent, a linear image of x_1
    o = Trainer(tmp_path / "oracle", tiny_cache, _cfg(vae_steps=1, dit_steps=1, condition="oracle"), sizes,
                progress=False)
    o.run()
    idx = torch.tensor([0, 1])
    tokens = o.condition_tokens(idx)
    assert tokens.shape == (2, 1 + sizes.num_latents, sizes.cond_width) and (tokens[:, 0] == 0).all()
    x1 = o.latents[idx] * o.state["scale_factor"]
    assert torch.linalg.matrix_rank(tokens[0, 1:], rtol=1e-4) == torch.linalg.matrix_rank(x1[0], rtol=1e-4) <= 8
    with pytest.raises(ValueError, match="unknown condition"):
        Trainer(tmp_path / "bad", tiny_cache, _cfg(vae_steps=1, dit_steps=1, condition="text"), sizes,
                progress=False).run()
    with pytest.raises(ValueError, match="no transformer layers"):
        from timi.testbed.model import build_parts
        build_parts(TINY.replace(conditioner="fixed"))


def test_latent_positions_are_the_farthest_point_samples():
    """With ``latent_positions`` the first three channels of each latent token are exactly its FPS
    point (times the gain) with no posterior noise; the other channels are the encoder's."""
    from timi.testbed.model import PointEncoder, build_parts

    sizes = TINY.replace(latent_positions=2.0)
    enc = PointEncoder(build_parts(sizes)["vae"], sizes)
    pts = torch.rand(2, 300, 3) * 1.8 - 0.9
    fps = torch.stack([torch.randperm(300)[: sizes.num_latents] for _ in range(2)])
    mean, logvar = enc(pts, fps)
    expect = torch.gather(pts, 1, fps[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(mean[..., :3], 2.0 * expect, rtol=0, atol=0)
    assert (logvar[..., :3] == -20.0).all() and mean.shape[-1] == sizes.latent_channels
    plain = PointEncoder(build_parts(TINY)["vae"], TINY)
    plain.load_state_dict(enc.state_dict())
    assert not torch.equal(plain(pts, fps)[0][..., :3], mean[..., :3])


def test_the_pipeline_reads_token_positions_only_from_models_whose_latents_carry_them(tmp_path):
    """``timi.pipelines.token_positions`` (for Eq.5 over positions): the shipped model (v3p sizes,
    latent positions) gets the position channels; a hy3dgen model without them gets None."""
    from timi.pipelines import token_positions
    from timi.testbed import default_model_path
    from timi_torch import write_tiny_model_dir

    reader = token_positions(default_model_path())
    x = torch.randn(2, 7, 8)
    assert reader is not None and torch.equal(reader(x), x[..., :3])
    assert token_positions(write_tiny_model_dir(tmp_path / "tiny", image_size=112)) is None


def test_decoder_attention_positions_keep_the_shipped_models_token_neighbourhoods():
    """Against the reference the testbed has: its latents carry each token's exact position. The
    positions read from the VAE decoder's attention (what Eq.5 over positions uses on a hy3dgen
    model without them) keep the layout of the tokens: pairwise distances correlate with the exact
    ones (measured 0.92 on this latent with v5's decoder, 0.94 with v4's) and each token's 8 nearest
    neighbours mostly agree (measured 0.63, 0.68 with v4's; chance 8/255)."""
    from timi.pipelines import load_pipeline
    from timi.testbed.scenes import generate_scene
    from timi_core import TIMIConfig
    from timi_torch.positions import DecoderAttentionPositions

    scene = generate_scene(seed=0, split="test", index=0, num_instances=2)   # data/tb2/test_multi's first
    masks = np.stack([scene.labels == k for k in range(1, scene.num_instances + 1)])
    pipe = load_pipeline(None, device="cpu", dtype="float32")
    x1 = pipe(scene.image, masks, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
              output_type="latent", enable_pbar=False, config=TIMIConfig(isg=False)).latents.float()
    exact = x1[0, :, :3]
    read = DecoderAttentionPositions(pipe.base.vae)(x1)[0]
    de, dr = torch.cdist(exact, exact), torch.cdist(read, read)
    corr = float(np.corrcoef(de.flatten().numpy(), dr.flatten().numpy())[0, 1])
    ne, nr = (d.topk(9, largest=False).indices[:, 1:] for d in (de, dr))
    agree = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in zip(ne, nr)]))
    assert corr > 0.85 and agree > 0.5, (corr, agree)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_ot_coupling_is_the_optimal_permutation(n, channels, seed):
    """Each sample's tokens are a permutation of its own, and no permutation pairs them with the noise
    at a lower summed squared distance (brute force over all n! orders)."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    x1, x0 = torch.randn(2, n, channels, generator=g), torch.randn(2, n, channels, generator=g)
    y = ot_coupling(x1, x0)
    for b in range(2):
        assert torch.equal(torch.sort(y[b], 0).values, torch.sort(x1[b], 0).values)
        best = min(float(((x1[b, list(p)] - x0[b]) ** 2).sum()) for p in itertools.permutations(range(n)))
        assert float(((y[b] - x0[b]) ** 2).sum()) == pytest.approx(best, rel=1e-5, abs=1e-6)


def test_ot_training_is_reproducible_and_changes_the_targets(tmp_path, tiny_cache):
    """``coupling="ot"`` trains (finite losses), gives the same losses from the same seed, and not the
    losses of the independent coupling (the option reaches the DiT's targets)."""
    runs = {name: Trainer(tmp_path / name, tiny_cache, _cfg(coupling=c), TINY, progress=False)
            for name, c in (("a", "ot"), ("b", "ot"), ("c", "independent"))}
    for trainer in runs.values():
        trainer.run()
    a, b, c = (runs[k].state["dit_loss"] for k in "abc")
    assert all(np.isfinite(a)) and a == b and a != c

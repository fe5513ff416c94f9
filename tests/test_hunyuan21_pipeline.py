"""TIMI on Hunyuan3D 2.1 (cross-attention DiT) through ``timi_torch.TIMIPipeline`` and the app's door.

* guidance off reproduces upstream's sampling trajectory (``tests/fixtures/hunyuan21_upstream.npz``,
  made by upstream's ``Hunyuan3DDiTFlowMatchingPipeline``, see ``test_hunyuan21_model.py``);
* Eq.2 on 2.1's cross-attention: the captured P equals ``mean_h softmax(q_z k_c^T / sqrt(d)) M^T``
  recomputed from the block's weights (time token excluded), fused == explicit, loss and gradient;
* a tiny 2.1-format folder (config.yaml + model.fp16.ckpt with hy3dshape targets) loads through
  the same path a real one does (folder, ``$HY3DGEN_MODELS`` id ``tencent/Hunyuan3D-2.1``,
  ``timi generate --model``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import timi_core
from timi_core import TIMIConfig
from timi_torch import TIMIPipeline
from timi_torch.guidance import guidable_layers, guided_probabilities, separation_loss_and_grad
from timi_torch.hunyuan21 import HunYuanDiTPlain

from hunyuan21_helpers import base21, condition_masks, fixture_base, tiny21, upstream  # noqa: F401  (fixtures)
from torch_helpers import scene


def test_guidance_off_reproduces_upstream_trajectory(upstream):
    """TIMIPipeline with TIMI off = upstream's ``Hunyuan3DDiTFlowMatchingPipeline`` (CFG 5, 5 steps)
    on the same DiT weights and noise, every step (float32; measured bit-identical here)."""
    settings = json.loads(str(upstream["trajectory/settings"]))
    pipe = TIMIPipeline(fixture_base(upstream), TIMIConfig(isg=False))
    steps = []
    out = pipe("ignored", condition_masks(upstream["trajectory/cond"].shape[1]),
               num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
               latents=torch.from_numpy(upstream["trajectory/noise"]), output_type="latent", enable_pbar=False,
               callback=lambda i, t, o: steps.append(o.prev_sample.clone()))
    expected = upstream["trajectory/latents"]
    assert len(steps) == len(expected) and out.diagnostics == []
    for ours, theirs in zip(steps, expected):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=2e-5)
    assert np.abs(expected[-1] - upstream["trajectory/noise"]).max() > 0.5     # the trajectory moved


def test_guided_run_moves_away_from_upstream(upstream):
    """With TIMI on (2 guided steps) the same run differs from upstream's plain trajectory and
    reports one diagnostic per guided step with a finite, positive L_sep."""
    pipe = TIMIPipeline(fixture_base(upstream), TIMIConfig(guided_steps=2))
    out = pipe("ignored", condition_masks(upstream["trajectory/cond"].shape[1]), num_inference_steps=5,
               latents=torch.from_numpy(upstream["trajectory/noise"]), output_type="latent", enable_pbar=False)
    assert [d.step for d in out.diagnostics] == [0, 1]
    assert all(np.isfinite(d.loss[0]) and d.loss[0] > 0 for d in out.diagnostics)
    assert np.abs(out.latents.numpy() - upstream["trajectory/latents"][-1]).max() > 1e-4


def _inputs(base, batch=2, seed=0):
    img, masks = scene(alpha=True)
    cm = TIMIPipeline(base).condition_masks(img, masks)
    cond = base.conditioner(base.prepare_image([cm.image] * batch)["image"])["main"]
    z = torch.randn((batch, *base.vae.latent_shape), generator=torch.Generator().manual_seed(seed))
    return z, torch.full((batch,), 0.3), cond, cm.tokens[None].repeat(batch, 1, 1)


def _block0_probability(model, z, t, cond, tokens):
    """Eq.2 on block 0's cross-attention, recomputed from its weights (no capture involved)."""
    seen = {}
    hook = model.blocks[0].attn2.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], y=args[1]))
    try:
        with torch.no_grad():
            model(z, t, {"main": cond})
    finally:
        hook.remove()
    attn, H = model.blocks[0].attn2, model.config.num_heads
    x, y = seen["x"][:, 1:], seen["y"]                            # latent queries: after the time token
    q = attn.q_norm(attn.to_q(x).unflatten(-1, (H, -1)))           # (B, L, H, D)
    kv = torch.cat([attn.to_k(y), attn.to_v(y)], -1).unflatten(-1, (H, 2, -1))
    k = attn.k_norm(kv[..., 0, :])                                 # head-interleaved split, as upstream
    A = torch.einsum("blhd,bmhd->bhlm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1).mean(1)   # A_zc (B, L, M)
    return A @ tokens.transpose(1, 2)


@pytest.mark.parametrize("mode", ["fused", "explicit"])
def test_P_is_eq2_on_cross_attention(base21, mode):
    z, t, cond, tokens = _inputs(base21)
    Ps = guided_probabilities(base21.model, z, t, cond, tokens, 2, mode)
    assert len(Ps) == 2 and Ps[0].shape == (2, z.shape[1], tokens.shape[1])
    torch.testing.assert_close(Ps[0], _block0_probability(base21.model, z, t, cond, tokens), rtol=1e-5, atol=1e-6)


def test_fused_and_explicit_agree_on_loss_and_gradient(base21):
    z, t, cond, tokens = _inputs(base21)
    cfg = TIMIConfig()
    n = min(cfg.guided_layers, guidable_layers(base21.model))
    (lf, gf), (le, ge) = (separation_loss_and_grad(base21.model, z, t, cond, tokens, cfg, n, m)
                          for m in ("fused", "explicit"))
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-8)
    assert gf.abs().max() > 0
    expected = torch.stack([timi_core.instance_separation_loss(P, cfg.eps) for P in
                            guided_probabilities(base21.model, z, t, cond, tokens, n, "explicit")]).mean(0)
    torch.testing.assert_close(lf, expected, rtol=1e-5, atol=1e-7)


def test_fused_pass_leaves_outputs_of_earlier_layers_unchanged(base21):
    """In the fused path the guided blocks' cross-attention output comes from the same SDPA call as
    P: the forward up to the last guided layer is the model's own (checked at layer 3's input)."""
    z, t, cond, tokens = _inputs(base21, batch=1)
    seen = []
    hook = base21.model.blocks[3].attn2.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            base21.model(z, t, {"main": cond})
            guided_probabilities(base21.model, z, t, cond, tokens, 4, "fused")
    finally:
        hook.remove()
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-6)


def test_tiny_checkpoint_loads_like_a_real_one(tiny21, tmp_path, monkeypatch):
    """config.yaml with hy3dshape targets + model.fp16.ckpt ({model, vae (with encoder weights),
    conditioner}) -> TIMIPipeline: from the folder and as ``tencent/Hunyuan3D-2.1`` under
    $HY3DGEN_MODELS; the DiT loads strictly (a missing key fails)."""
    from timi_torch.hunyuan21.params import read_checkpoint

    ckpt = read_checkpoint(tiny21 / "model.fp16.ckpt")
    assert set(ckpt) == {"model", "vae", "conditioner"} and any(k.startswith("encoder.") for k in ckpt["vae"])
    pipe = TIMIPipeline.from_pretrained(tiny21, device="cpu", dtype=torch.float32)
    assert pipe.family == "2.1" and isinstance(pipe.base.model, HunYuanDiTPlain)
    for key, value in ckpt["model"].items():
        torch.testing.assert_close(pipe.base.model.state_dict()[key], value.float())
    root = tmp_path / "models"
    (root / "tencent" / "Hunyuan3D-2.1").mkdir(parents=True)
    (root / "tencent" / "Hunyuan3D-2.1" / "hunyuan3d-dit-v2-1").symlink_to(tiny21)
    monkeypatch.setenv("HY3DGEN_MODELS", str(root))
    assert TIMIPipeline.from_pretrained("tencent/Hunyuan3D-2.1", device="cpu").family == "2.1"
    broken = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if not k.startswith("blocks.0.attn2.to_q")})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_bytes((tiny21 / "config.yaml").read_bytes())
    torch.save(broken, bad / "model.fp16.ckpt")
    from timi_torch import ModelLoadError

    with pytest.raises(ModelLoadError, match="to_q"):
        TIMIPipeline.from_pretrained(bad, device="cpu")


def test_end_to_end_with_recorder(base21):
    """Image + masks -> guided sampling -> mesh on the tiny 2.1 model; the recorder hook sees the
    first cross-attention layers."""
    from timi.report import AttentionRecorder

    img, masks = scene(alpha=True)
    pipe = TIMIPipeline(base21, TIMIConfig(guided_steps=2))
    cm = pipe.condition_masks(img, masks)
    rec = AttentionRecorder(cm.tokens, layers=2, steps=2)
    out = pipe(img, cm, num_inference_steps=3, generator=torch.manual_seed(0), octree_resolution=16,
               enable_pbar=False, recorder=rec)
    assert len(out.meshes) == 1 and len(out.meshes[0].faces) > 0
    assert [(r.step, r.layer) for r in out.recordings] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert out.recordings[0].probability.shape == (base21.vae.latent_shape[0], 2)
    assert len(out.diagnostics) == 2


def test_generate_command_on_a_2_1_folder(tiny21, tmp_path):
    """``timi generate --model <2.1 folder>``: the app's door loads it and writes a mesh."""
    from PIL import Image
    from typer.testing import CliRunner

    from timi.cli import app

    img, masks = scene(alpha=True)
    Image.fromarray(img).save(tmp_path / "image.png")
    np.save(tmp_path / "masks.npy", masks)
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "image.png"), "--masks", str(tmp_path / "masks.npy"),
                                      "--out", str(tmp_path / "scene.glb"), "--model", str(tiny21), "--steps", "2",
                                      "--guided-steps", "1", "--octree-resolution", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scene.glb").stat().st_size > 0

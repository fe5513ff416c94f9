"""timi_jax's compiled sampler against hy3dgen's pipeline and the PyTorch adapter (tiny model).

The tiny model is written in hy3dgen's on-disk format and loaded by hy3dgen's own loader
(``torch_helpers.fast_base``: 112 px conditioner, 65 condition tokens); its DiT weights go to JAX
with ``timi_jax.from_torch``; the noise, condition tokens and mask tokens are the torch pipeline's.
Tolerances (float32): guidance-off latents vs hy3dgen's pipeline, and guided latents vs
``timi_torch.TIMIPipeline``, within 1e-5 of the latents' scale; P, L_sep and dL_sep/dz vs the torch
adapter within 1e-5 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flax import nnx  # noqa: E402

import timi_jax  # noqa: E402
from timi_core import TIMIConfig  # noqa: E402
from timi_jax.sampler import _sample_program, flow_matching_schedule  # noqa: E402
from torch_helpers import fast_base, fast_dir, fast_root, scene  # noqa: E402, F401  (fixtures)

STEPS = 5
GUIDED = TIMIConfig(guided_layers=2, guided_steps=3)


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = ref.detach().double().numpy() if hasattr(ref, "detach") else np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def setup(fast_base):
    """The torch pipeline's noise, [cond; uncond] tokens and mask tokens for the test scene."""
    from timi_torch import TIMIPipeline

    img, masks = scene(alpha=True)
    cm = TIMIPipeline(fast_base).condition_masks(img, masks)
    with torch.no_grad():
        inputs = fast_base.prepare_image([cm.image])
        image = inputs.pop("image")
        cond = fast_base.encode_cond(image=image, additional_cond_inputs=inputs,
                                     do_classifier_free_guidance=True, dual_guidance=False)["main"]
    noise = fast_base.prepare_latents(1, torch.float32, "cpu", torch.Generator().manual_seed(3))
    return dict(img=img, masks=masks, cond=cond[:1], uncond=cond[1:], tokens=cm.tokens[None],
                noise=noise, jax_model=timi_jax.from_torch(fast_base.model),
                jax_model_torch=fast_base.model)


probabilities = nnx.jit(lambda m, *a: m.instance_probabilities(*a, num_layers=2))
head_probabilities = nnx.jit(lambda m, *a: m.instance_probabilities(*a, num_layers=2, per_head=True))


def jx(t):
    return jnp.asarray(t.detach().numpy())


def test_schedule_is_hy3dgen_schedulers():
    from hy3dgen.shapegen.schedulers import FlowMatchEulerDiscreteScheduler

    for n, shift in [(1, 1.0), (5, 1.0), (50, 1.0), (7, 3.0)]:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sched.set_timesteps(sigmas=np.linspace(0, 1, n), device="cpu")
        timesteps, sigmas = flow_matching_schedule(n, shift=shift)
        np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
        np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
        assert sigmas[-1] == 1.0 and (n == 1 or sigmas[-2] == 1.0)  # last step: dt = 0 (n > 1)


def test_guidance_off_matches_hy3dgen_pipeline(fast_base, setup):
    from PIL import Image

    with torch.no_grad():
        expected = fast_base(Image.fromarray(setup["img"]), num_inference_steps=STEPS,
                             generator=torch.Generator().manual_seed(3), output_type="latent",
                             enable_pbar=False)
    out = timi_jax.sample(setup["jax_model"], jx(setup["noise"]), jx(setup["cond"]),
                          jx(setup["uncond"]), num_inference_steps=STEPS, guidance_scale=5.0,
                          config=None)
    assert out.latents.shape == expected.shape and out.latents.dtype == jnp.float32
    assert rel_err(out.latents, expected) < 1e-5
    assert not np.any(np.asarray(out.losses))  # no guided step


def test_probabilities_loss_and_gradient_match_torch_adapter(fast_base, setup):
    from timi_torch.guidance import guided_probabilities, separation_loss_and_grad

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, *setup["noise"].shape[1:], generator=g)
    t = torch.tensor([0.25, 0.75])
    cond = torch.cat([setup["cond"], setup["cond"].flip(1)])  # two different scenes
    tokens = torch.cat([setup["tokens"], setup["tokens"].flip(-1)])
    jm = setup["jax_model"]
    for mode in ("fused", "explicit"):
        with torch.no_grad():
            ref_p = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, mode)
        got_p = probabilities(jm, jx(z), jx(t), jx(cond), jx(tokens))
        for a, b in zip(got_p, ref_p):
            assert a.shape == b.shape and rel_err(a, b) < 1e-5
        with torch.no_grad():
            ref_h = guided_probabilities(fast_base.model, z, t, cond, tokens, 2, mode, per_head=True)
        for a, b in zip(head_probabilities(jm, jx(z), jx(t), jx(cond), jx(tokens)), ref_h):
            assert a.ndim == 4 and a.shape == b.shape and rel_err(a, b) < 1e-5
    for cfg in (GUIDED, GUIDED.replace(detach_weights=True), GUIDED.replace(per_head=True)):
        ref_loss, ref_grad = separation_loss_and_grad(fast_base.model, z, t, cond, tokens, cfg, 2)
        loss, grad = timi_jax.separation_loss_and_grad(jm, jx(z), jx(t), jx(cond), jx(tokens), cfg)
        assert loss.shape == (2,) and grad.dtype == jnp.float32
        assert rel_err(loss, ref_loss) < 1e-5
        assert rel_err(grad, ref_grad) < 1e-4 and rel_err(grad[1], ref_grad[1]) < 1e-4


@pytest.mark.parametrize("config", [GUIDED, GUIDED.replace(gm=False, sr=False, beta=0.5),
                                    GUIDED.replace(normalize_instances=True), GUIDED.replace(per_head=True)],
                         ids=["paper-sgu", "no-gm-no-sr", "P-over-instances", "P-per-head"])
def test_guided_run_matches_timi_torch_pipeline(fast_base, setup, config):
    from timi_torch import TIMIPipeline

    pipe = TIMIPipeline(fast_base, config)
    torch_out = pipe(setup["img"], setup["masks"], num_inference_steps=STEPS, output_type="latent",
                     latents=setup["noise"].clone(), enable_pbar=False)
    expected = torch_out.latents
    out = timi_jax.sample(setup["jax_model"], jx(setup["noise"]), jx(setup["cond"]),
                          jx(setup["uncond"]), jx(setup["tokens"]), num_inference_steps=STEPS,
                          guidance_scale=5.0, config=config)
    assert rel_err(out.latents, expected) < 1e-5
    losses = np.asarray(out.losses)
    ref_losses = np.array([d.loss for d in torch_out.diagnostics])
    assert losses.shape == (STEPS, 1) and not losses[config.guided_steps:].any()
    np.testing.assert_allclose(losses[: config.guided_steps], ref_losses, rtol=1e-5)
    for name, field in (("scales", "scale"), ("max_updates", "max_update")):
        ref = np.array([getattr(d, field) for d in torch_out.diagnostics])
        got = np.asarray(getattr(out, name))
        assert not got[config.guided_steps:].any()
        np.testing.assert_allclose(got[: config.guided_steps], ref, rtol=1e-4, err_msg=name)
    plain = timi_jax.sample(setup["jax_model"], jx(setup["noise"]), jx(setup["cond"]),
                            jx(setup["uncond"]), num_inference_steps=STEPS, config=None)
    assert rel_err(out.latents, plain.latents) > 1e-4  # the guidance did move the latents


def test_compiled_once_for_new_inputs(setup):
    """New noise (seeds) reuse the program compiled for the same shapes/config (no retracing)."""
    jm = setup["jax_model"]
    args = (jx(setup["cond"]), jx(setup["uncond"]), jx(setup["tokens"]))
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, config=GUIDED)
    timi_jax.sample(jm, jx(setup["noise"]), *args, **kw)
    before = _sample_program._cache_size()
    outs = [timi_jax.sample(jm, jax.random.normal(jax.random.key(s), setup["noise"].shape), *args,
                            **kw).latents for s in range(2)]
    assert _sample_program._cache_size() == before
    assert not np.allclose(outs[0], outs[1])


def test_bad_inputs(setup):
    jm = setup["jax_model"]
    noise, cond = jx(setup["noise"]), jx(setup["cond"])
    with pytest.raises(ValueError, match="mask_tokens"):
        timi_jax.sample(jm, noise, cond, num_inference_steps=2)
    with pytest.raises(ValueError, match="mask_tokens"):
        timi_jax.sample(jm, noise, cond, mask_tokens=jnp.ones((2, 7)), config=GUIDED)
    with pytest.raises(ValueError, match="same batch"):
        timi_jax.sample(jm, noise, jnp.concatenate([cond, cond]), config=None)
    with pytest.warns(UserWarning, match="guided_layers=9 exceeds"):
        with pytest.raises(ValueError, match="mask_tokens"):
            timi_jax.sample(jm, noise, cond, mask_tokens=jnp.ones((1, 2, 3)),
                            config=TIMIConfig(guided_layers=9))


def test_bfloat16_guided_run_within_bound_of_float32(fast_dir, setup):
    """bf16 model, float32 guidance and float32 master latent: within 3e-2 of the float32 run and
    no further from it than hy3dgen-bf16 + timi_torch is from float32 (x2 margin); the guided
    updates are float32 moves, not rounded to bf16's spacing, and agree with timi_torch's."""
    from timi_torch import TIMIPipeline
    from torch_helpers import load_base

    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, config=GUIDED)
    args = (jx(setup["noise"]), jx(setup["cond"]), jx(setup["uncond"]), jx(setup["tokens"]))
    f32 = timi_jax.sample(setup["jax_model"], *args, **kw)
    bf16_model = timi_jax.from_torch(setup["jax_model_torch"], dtype=jnp.bfloat16)
    bf16 = timi_jax.sample(bf16_model, *args, **kw)
    assert bf16.latents.dtype == jnp.bfloat16 and bf16.losses.dtype == jnp.float32
    torch_pipe = TIMIPipeline(load_base(fast_dir, dtype=torch.bfloat16), GUIDED)
    torch_bf16_out = torch_pipe(setup["img"], setup["masks"], num_inference_steps=STEPS,
                                output_type="latent", latents=setup["noise"].clone(), enable_pbar=False)
    torch_bf16 = torch_bf16_out.latents
    assert torch_bf16.dtype == torch.bfloat16
    ref = np.asarray(f32.latents)
    err = rel_err(np.asarray(bf16.latents.astype(jnp.float32)), ref)
    torch_err = rel_err(torch_bf16.float().numpy(), ref)
    assert err < 3e-2 and err < 2 * torch_err, (err, torch_err)
    np.testing.assert_allclose(bf16.losses[: GUIDED.guided_steps], f32.losses[: GUIDED.guided_steps],
                               rtol=2e-3)
    # First guided step (momentum from 0, GM): the latent moves by (1 - beta) * (alpha * std(z)
    # - lambda * eps), about 0.01 std(z), below bf16's spacing; rounded to bf16 it would be a
    # multiple of the spacing. torch (bf16 + float32 master latent) moves by the same amount.
    z0 = np.asarray(jnp.asarray(jx(setup["noise"]), jnp.bfloat16).astype(jnp.float32), np.float64)
    lam = np.asarray(bf16.scales[0], np.float64)
    expected = (1 - GUIDED.beta) * (GUIDED.alpha * z0.reshape(len(z0), -1).std(1) - lam * GUIDED.eps)
    np.testing.assert_allclose(np.asarray(bf16.max_updates[0], np.float64), expected, rtol=1e-4)
    np.testing.assert_allclose(torch_bf16_out.diagnostics[0].max_update, expected, rtol=1e-4)
    assert rel_err(np.asarray(bf16.latents.astype(jnp.float32)), torch_bf16.float()) < 3e-2


def test_front_door_pipeline_matches_timi_torch(fast_base, setup):
    """TIMIPipelineJAX: hy3dgen's preprocessing, conditioner, noise and VAE; the DiT loop in JAX."""
    import trimesh
    from timi_torch import TIMIPipeline

    kw = dict(num_inference_steps=STEPS, output_type="latent", enable_pbar=False)
    torch_pipe = TIMIPipeline(fast_base, GUIDED)
    torch_out = torch_pipe(setup["img"], setup["masks"], generator=torch.Generator().manual_seed(4), **kw)
    expected = torch_out.latents
    pipe = timi_jax.TIMIPipelineJAX(fast_base, GUIDED)
    out = pipe(setup["img"], setup["masks"], generator=torch.Generator().manual_seed(4), **kw)
    got = out.latents
    assert type(out) is type(torch_out) and out.meshes is None and out.recordings is None  # the same output
    assert got.dtype == torch.float32 and rel_err(got.numpy(), expected) < 1e-5
    assert len(out.diagnostics) == GUIDED.guided_steps
    assert [d.step for d in out.diagnostics] == [d.step for d in torch_out.diagnostics]
    for field in ("loss", "scale", "max_update"):
        np.testing.assert_allclose([getattr(d, field) for d in out.diagnostics],
                                   [getattr(d, field) for d in torch_out.diagnostics], rtol=1e-4, atol=1e-6)
    # the config of a call, or of a copy, as on the torch pipeline
    plain = timi_jax.TIMIPipelineJAX(fast_base, GUIDED.replace(isg=False))
    by_call = plain(setup["img"], setup["masks"], generator=torch.Generator().manual_seed(4), config=GUIDED, **kw)
    assert torch.equal(by_call.latents, got) and plain.config == GUIDED.replace(isg=False)
    assert torch.equal(plain.with_config(GUIDED)(setup["img"], setup["masks"],
                                                 generator=torch.Generator().manual_seed(4), **kw).latents, got)
    meshes = pipe(setup["img"], setup["masks"], num_inference_steps=STEPS, output_type="trimesh",
                  generator=torch.Generator().manual_seed(4), octree_resolution=24,
                  num_chunks=20000).meshes
    assert len(meshes) == 1 and isinstance(meshes[0], trimesh.Trimesh) and len(meshes[0].faces)


def test_guidance_distilled_model_follows_hy3dgens_loop():
    """guidance_embed=True: no CFG, guidance=w into the model (hy3dgen's pipeline branch), here
    against hy3dgen's own scheduler driven step by step; guided sampling runs on it too."""
    from hy3dgen.shapegen.models.denoisers.hunyuan3ddit import Hunyuan3DDiT
    from hy3dgen.shapegen.schedulers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tm = Hunyuan3DDiT(in_channels=4, context_in_dim=6, hidden_size=12, mlp_ratio=2.0, num_heads=3,
                      depth=2, depth_single_blocks=1, axes_dim=[4], guidance_embed=True).eval()
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(2, 9, 4, generator=g), torch.randn(2, 5, 6, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(sigmas=np.linspace(0, 1, 4), device="cpu")
    latents, w = noise.clone(), torch.full((2,), 4.5)
    with torch.no_grad():
        for t in sched.timesteps:
            v = tm(latents, t.expand(2) / 1000, {"main": cond}, guidance=w)
            latents = sched.step(v, t, latents).prev_sample
    jm = timi_jax.from_torch(tm)
    out = timi_jax.sample(jm, jx(noise), jx(cond), num_inference_steps=4, guidance_scale=4.5,
                          config=None)
    assert rel_err(out.latents, latents) < 1e-5
    tokens = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], jnp.float32)
    guided = timi_jax.sample(jm, jx(noise), jx(cond), mask_tokens=tokens, num_inference_steps=4,
                             guidance_scale=4.5, config=TIMIConfig(guided_layers=2, guided_steps=2))
    assert np.all(np.asarray(guided.losses[:2]) > 0) and np.isfinite(guided.latents).all()


def test_samples_of_a_batch_stay_independent(setup):
    """A batch of two scenes (different noise, condition, masks) equals the two runs alone."""
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, config=GUIDED)
    noise = [jx(setup["noise"]), jax.random.normal(jax.random.key(7), setup["noise"].shape)]
    cond = [jx(setup["cond"]), jx(setup["cond"].flip(1))]
    tokens = [jx(setup["tokens"]), jx(setup["tokens"].flip(-1))]
    uncond = jx(setup["uncond"])
    both = timi_jax.sample(setup["jax_model"], jnp.concatenate(noise), jnp.concatenate(cond),
                           jnp.concatenate([uncond, uncond]), jnp.concatenate(tokens), **kw)
    for b in range(2):
        alone = timi_jax.sample(setup["jax_model"], noise[b], cond[b], uncond, tokens[b], **kw)
        assert rel_err(both.latents[b], alone.latents[0]) < 1e-6
        np.testing.assert_allclose(both.losses[:, b], alone.losses[:, 0], rtol=1e-6)

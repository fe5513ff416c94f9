"""The JAX TIMI sampler on Hunyuan3D 2.1 (``timi_jax.sample`` / ``TIMIPipelineJAX`` / ``timi generate
--backend jax``) against upstream's stored trajectory and the torch backend.

Tolerances (float32; ``max|jax - ref| / max|ref|``): the Flax DiT's velocities equal upstream's and
the torch port's within 1e-6 (``test_jax_hunyuan21.py``: XLA sums matmuls and softmaxes in another
order), and a 5-step Euler run adds up at most a few such errors, so 1e-5 bounds latents and P (the
same bound as the 2.0 sampler's parity, ``test_jax_sampler.py``); ``L_sep`` within 1e-5 relative,
lambda and the largest update within 1e-4 relative (lambda divides by the gradient's norm: Eq.6),
dL_sep/dz within 1e-4 relative (as on 2.0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flax import nnx  # noqa: E402

import timi_jax  # noqa: E402
from timi_core import TIMIConfig  # noqa: E402
from timi_jax.hunyuan21 import HunYuanDiTPlain  # noqa: E402
from timi_jax.pipeline import jax_dit, scheduler_schedule  # noqa: E402
from timi_torch import TIMIPipeline  # noqa: E402

from hunyuan21_helpers import base21, condition_masks, fixture_base, tiny21, upstream  # noqa: E402, F401  (fixtures)
from torch_helpers import scene  # noqa: E402

TOL = 1e-5
STEPS = 5


def rel_err(out, ref) -> float:
    ref = ref.detach().double().numpy() if hasattr(ref, "detach") else np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def jx(t):
    return jnp.asarray(t.detach().numpy())


def test_guidance_off_reproduces_upstream_trajectory(upstream):
    """``TIMIPipelineJAX`` with TIMI off = upstream's ``Hunyuan3DDiTFlowMatchingPipeline`` (CFG 5,
    5 steps) on the same weights and noise: the front door's final latents, and the latents after
    each earlier step (the same JAX sampler cut after k steps of the same schedule; the last step
    has dt = 0, so steps 4 and 5 end alike). Measured: 6.4e-7 to 8.0e-7."""
    settings = json.loads(str(upstream["trajectory/settings"]))
    base = fixture_base(upstream)
    pipe = timi_jax.TIMIPipelineJAX(base, TIMIConfig(isg=False))
    assert isinstance(pipe.model, HunYuanDiTPlain)
    noise, expected = upstream["trajectory/noise"], upstream["trajectory/latents"]
    out = pipe("ignored", condition_masks(upstream["trajectory/cond"].shape[1]), num_inference_steps=settings["steps"],
               guidance_scale=settings["guidance_scale"], latents=torch.from_numpy(noise), output_type="latent")
    assert out.diagnostics == [] and len(expected) == settings["steps"]
    assert rel_err(out.latents.numpy(), expected[-1]) < TOL
    timesteps, sigmas = scheduler_schedule(base, settings["steps"])
    cond = upstream["trajectory/cond"]
    assert np.array_equal(expected[-1], expected[-2])
    for k in range(1, settings["steps"] - 1):
        part = timi_jax.sample(pipe.model, noise, cond, None, num_inference_steps=k, config=None,
                               guidance_scale=settings["guidance_scale"], schedule=(timesteps[:k], sigmas[:k + 1]))
        assert rel_err(part.latents, expected[k - 1]) < TOL, k
    assert np.abs(expected[-1] - noise).max() > 0.5     # the trajectory moved


@pytest.fixture(scope="module")
def inputs(base21):
    """Two scenes' latents, times, condition tokens and masks from the tiny 2.1 model's own front end."""
    img, masks = scene(alpha=True)
    cm = TIMIPipeline(base21).condition_masks(img, masks)
    cond = base21.conditioner(base21.prepare_image([cm.image])["image"])["main"]
    z = torch.randn((2, *base21.vae.latent_shape), generator=torch.Generator().manual_seed(5))
    cond = torch.cat([cond, cond.flip(1)]).detach()                       # two different scenes
    tokens = torch.stack([cm.tokens, cm.tokens.flip(-1)])
    return dict(img=img, masks=masks, z=z, t=torch.tensor([0.25, 0.75]), cond=cond, tokens=tokens,
                model=jax_dit(base21.model))


def test_probabilities_loss_and_gradient_match_torch(base21, inputs):
    """Eq.2 on the cross-attention of the first 4 blocks (block 3 takes a U-Net skip), time token
    excluded: P (head-averaged and per head), L_sep and dL_sep/dz equal the torch backend's."""
    from timi_torch.guidance import guided_probabilities, separation_loss_and_grad

    model, args = inputs["model"], [inputs[k] for k in ("z", "t", "cond", "tokens")]
    for per_head in (False, True):
        with torch.no_grad():
            ref = guided_probabilities(base21.model, *args, 4, "fused", per_head=per_head)
        got = nnx.jit(lambda m, *a: m.instance_probabilities(*a, num_layers=4, per_head=per_head))(
            model, *map(jx, args))
        assert len(got) == 4
        for a, b in zip(got, ref):
            assert a.shape == b.shape and rel_err(a, b) < TOL
    for cfg in (TIMIConfig(), TIMIConfig(detach_weights=True), TIMIConfig(per_head=True)):
        ref_loss, ref_grad = separation_loss_and_grad(base21.model, *args, cfg, 4)
        loss, grad = timi_jax.separation_loss_and_grad(model, *map(jx, args), cfg)
        assert rel_err(loss, ref_loss) < TOL
        assert rel_err(grad, ref_grad) < 1e-4 and rel_err(grad[1], ref_grad[1]) < 1e-4


@pytest.mark.parametrize("config", [TIMIConfig(guided_steps=3), TIMIConfig(guided_steps=3, guided_layers=2, per_head=True)],
                         ids=["paper", "2-layers-per-head"])
def test_guided_run_matches_torch_pipeline(base21, inputs, config):
    """The same tiny 2.1 model, seed and masks through ``TIMIPipeline`` and ``TIMIPipelineJAX``:
    the latents, and per guided step L_sep, lambda and the largest update. Measured: latents
    5.5e-7 / 6.6e-7, L_sep 1.5e-7, lambda 1.2e-6 relative, largest update equal."""
    kw = dict(num_inference_steps=STEPS, output_type="latent", enable_pbar=False)
    ref = TIMIPipeline(base21, config)(inputs["img"], inputs["masks"], generator=torch.Generator().manual_seed(4), **kw)
    pipe = timi_jax.TIMIPipelineJAX(base21, config)
    out = pipe(inputs["img"], inputs["masks"], generator=torch.Generator().manual_seed(4), **kw)
    assert rel_err(out.latents.numpy(), ref.latents) < TOL
    assert [d.step for d in out.diagnostics] == [d.step for d in ref.diagnostics] == [0, 1, 2]
    np.testing.assert_allclose([d.loss for d in out.diagnostics], [d.loss for d in ref.diagnostics], rtol=1e-5)
    for field in ("scale", "max_update"):
        np.testing.assert_allclose([getattr(d, field) for d in out.diagnostics],
                                   [getattr(d, field) for d in ref.diagnostics], rtol=1e-4, err_msg=field)
    plain = pipe(inputs["img"], inputs["masks"], generator=torch.Generator().manual_seed(4),
                 config=config.replace(isg=False), **kw)
    assert plain.diagnostics == [] and rel_err(out.latents.numpy(), plain.latents) > 1e-3   # the guidance moved it


@pytest.mark.parametrize("flags", [[], ["--no-timi"]], ids=["timi", "no-timi"])
def test_generate_backend_jax_on_a_2_1_folder(tiny21, tmp_path, flags):
    """``timi generate --backend jax --model <2.1 folder>`` writes a mesh, with and without TIMI."""
    from PIL import Image
    from typer.testing import CliRunner

    from timi.cli import app

    img, masks = scene(alpha=True)
    Image.fromarray(img).save(tmp_path / "image.png")
    np.save(tmp_path / "masks.npy", masks)
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "image.png"), "--masks", str(tmp_path / "masks.npy"),
                                      "--out", str(tmp_path / "scene.glb"), "--model", str(tiny21), "--steps", "2",
                                      "--guided-steps", "1", "--octree-resolution", "16", "--device", "cpu",
                                      "--backend", "jax", *flags])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scene.glb").stat().st_size > 0

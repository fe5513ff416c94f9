"""TRELLIS stage 1 in JAX (``timi_jax.trellis``) against upstream's numbers and the torch port.

``tests/fixtures/trellis_upstream.npz`` (made from upstream's code, see ``tests/test_trellis_model.py``)
holds two small flow configurations with every weight perturbed (seeds), their velocities, and a
5-step guidance-off trajectory of upstream's sampler (CFG 3 inside (0.5, 1), rescale_t 3).

Tolerances (float32, absolute, on outputs of size ~3): XLA sums matmuls, softmaxes and LayerNorms in
another order than torch, which moves a velocity by a few float32 ulps of its size (measured: at most
4.3e-6 against upstream, configs "a" and "b"), and a 5-step Euler run adds up a few such errors
(measured 3.4e-6): ``ATOL = 1e-5``, while one block's k and v swapped moves the velocity by more than
0.1 (``test_a_permuted_weight_breaks_parity``). With TIMI on, the guided steps also go through
``dL/dz`` and Eq.6's ``lambda = alpha std(z) / max|g|``, which carries the gradient's relative error
(1e-6 level here) into the update's size, but the update is ``<= alpha std(z)`` (0.01-0.02 here), so
it adds ~1e-8 absolute: the guided latents keep ``ATOL`` (measured 3.6e-6), the first guided update
matches to 1e-6 (measured 1.2e-7), ``L_sep`` and ``lambda`` to 1e-5 relative.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flax import nnx  # noqa: E402

from timi_core import TIMIConfig  # noqa: E402
from timi_jax.sampler import guided_step, separation_loss_and_grad  # noqa: E402
from timi_jax.trellis import SamplerSettings, SparseStructureFlowModel, from_checkpoint, from_torch, sample  # noqa: E402
from timi_jax.trellis.sampler import GRID_AXES  # noqa: E402
from timi_torch.guidance import guided_update  # noqa: E402
from timi_torch.trellis import sample as torch_sample  # noqa: E402
from timi_torch.trellis import save_model  # noqa: E402

from trellis_helpers import fixture_state as _state  # noqa: E402
from trellis_helpers import upstream  # noqa: E402,F401  (a fixture)
from trellis_helpers import upstream_flow as _torch_flow  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def flows(upstream):
    """Config "a" (the released options, 3 blocks): the torch port and the JAX model from it."""
    model = _torch_flow(upstream, "a")
    return model, from_torch(model)


_forward = nnx.jit(lambda model, *args: model(*args))


def _velocities(model, upstream, name):
    """The three fixture timesteps in one batch (one compile): (3, B, C, R, R, R)."""
    x, cond, t = upstream[f"{name}/x"], upstream[f"{name}/cond"], upstream[f"{name}/t"]
    n, b = len(t), x.shape[0]
    ts = np.repeat(1000 * t.astype(np.float32), b)
    v = _forward(model, np.tile(x, (n, 1, 1, 1, 1)), ts, np.tile(cond, (n, 1, 1)))
    return np.asarray(v).reshape(n, *x.shape)


@pytest.mark.parametrize("name", ["a", "b"])
def test_velocities_match_upstream_and_the_torch_port(upstream, name):
    """The fixture's state dict through ``from_torch`` (keywords) equals upstream's velocities, and
    the torch port (the same perturbed weights) through ``from_torch(module)`` equals the port."""
    model = from_torch(_state(upstream, name), **json.loads(str(upstream[f"{name}/config"])))
    np.testing.assert_allclose(_velocities(model, upstream, name), upstream[f"{name}/v"], rtol=0, atol=ATOL)
    ref = _torch_flow(upstream, name)
    x, cond, t = (torch.from_numpy(upstream[f"{name}/{k}"]) for k in ("x", "cond", "t"))
    with torch.no_grad():
        expected = np.stack([ref(x, torch.full((x.shape[0],), 1000 * float(s)), cond).numpy() for s in t])
    np.testing.assert_allclose(_velocities(from_torch(ref), upstream, name), expected, rtol=0, atol=ATOL)


def test_a_permuted_weight_breaks_parity(upstream):
    """k and v of block 0's cross-attention swapped (to_kv's halves): far outside the tolerance."""
    state = _state(upstream, "a")
    w = state["blocks.0.cross_attn.to_kv.weight"]
    state["blocks.0.cross_attn.to_kv.weight"] = torch.cat([w[w.shape[0] // 2:], w[:w.shape[0] // 2]])
    model = from_torch(state, **json.loads(str(upstream["a/config"])))
    assert np.abs(_velocities(model, upstream, "a") - upstream["a/v"]).max() > 1e4 * ATOL


def test_loading_names_what_does_not_fit(upstream, tmp_path):
    cfg = json.loads(str(upstream["a/config"]))
    state = _state(upstream, "a")
    with pytest.raises(KeyError, match="blocks.3.norm2.weight.*num_blocks"):
        from_torch({**state, "blocks.3.norm2.weight": torch.ones(48)}, **cfg)
    with pytest.raises(KeyError, match="lacks 1 parameter"):
        from_torch({k: v for k, v in state.items() if k != "out_layer.bias"}, **cfg)
    with pytest.raises(ValueError, match="input_layer.weight"):
        from_torch(state, **{**cfg, "in_channels": 4, "out_channels": 4})
    stem = save_model(_torch_flow(upstream, "b"), tmp_path / "ckpts" / "ss_flow")       # upstream's layout
    model = from_checkpoint(stem)
    assert isinstance(model, SparseStructureFlowModel) and model.config.share_mod
    np.testing.assert_allclose(_velocities(model, upstream, "b"), upstream["b/v"], rtol=0, atol=ATOL)


def _settings(upstream) -> SamplerSettings:
    s = json.loads(str(upstream["trajectory/settings"]))
    return SamplerSettings(steps=s["steps"], cfg_strength=s["cfg_strength"], cfg_interval=tuple(s["cfg_interval"]),
                           rescale_t=s["rescale_t"], sigma_min=s["sigma_min"])


def _tokens(num_cond: int) -> np.ndarray:
    tokens = np.zeros((1, 2, num_cond), np.float32)
    tokens[0, 0, 1:num_cond // 2] = 1
    tokens[0, 1, num_cond // 2:] = 1
    return tokens


@pytest.mark.parametrize("config", [None, TIMIConfig(isg=False)], ids=["none", "isg-off"])
def test_guidance_off_reproduces_upstreams_trajectory(upstream, flows, config):
    """Every step's latent of upstream's sampler (CFG in the first steps only: two compiled runs)."""
    noise, cond = upstream["trajectory/noise"], upstream["trajectory/cond"]
    out = sample(flows[1], noise, cond, np.zeros_like(cond), tokens=_tokens(cond.shape[1]), config=config,
                 settings=_settings(upstream), keep_trajectory=True)
    np.testing.assert_allclose(np.asarray(out.trajectory), upstream["trajectory/latents"], rtol=0, atol=ATOL)
    assert out.num_guided == 0 and not np.any(np.asarray(out.losses))
    assert np.abs(upstream["trajectory/latents"][-1] - noise).max() > 1                 # the trajectory moved


def test_guided_run_matches_the_torch_sampler(upstream, flows):
    """TIMI on 2 of 5 steps, 2 of 3 blocks: final latents, per-step L_sep, lambda and largest update
    equal the torch sampler's; the guidance moved the result far more than the tolerance."""
    torch_model, model = flows
    noise, cond, tokens = upstream["trajectory/noise"], upstream["trajectory/cond"], _tokens(7)
    config, settings = TIMIConfig(guided_layers=2, guided_steps=2), _settings(upstream)
    ref = torch_sample(torch_model, torch.from_numpy(noise), torch.from_numpy(cond),
                       torch.zeros(cond.shape), tokens=torch.from_numpy(tokens), config=config, settings=settings,
                       enable_pbar=False)
    out = sample(model, noise, cond, np.zeros_like(cond), tokens=tokens, config=config, settings=settings,
                 keep_trajectory=True)
    np.testing.assert_allclose(np.asarray(out.latents), ref.latents.numpy(), rtol=0, atol=ATOL)
    assert out.num_guided == len(ref.diagnostics) == 2
    for field, name in (("losses", "loss"), ("scales", "scale"), ("max_updates", "max_update")):
        np.testing.assert_allclose(np.asarray(getattr(out, field))[:2, 0], [getattr(d, name)[0] for d in ref.diagnostics],
                                   rtol=1e-5, err_msg=field)
    assert not np.any(np.asarray(out.losses)[2:])
    assert np.abs(np.asarray(out.latents) - upstream["trajectory/latents"][-1]).max() > 1e3 * ATOL


def test_first_guided_step_and_gradient_match_torch(upstream, flows):
    """One ISG + SGU update at t = 1 (Eq.5 over D, H, W of the grid, ``per_head``): the update and
    dL/dz equal ``timi_torch.guidance``'s; a block after the guided one does not change dL/dz."""
    torch_model, model = flows
    noise, cond, tokens = upstream["trajectory/noise"], upstream["trajectory/cond"], _tokens(7)
    config = TIMIConfig(guided_layers=2, per_head=True)
    ts = np.full((1,), 1000.0, np.float32)
    z_ref, _, diag = guided_update(torch_model, torch.from_numpy(noise), torch.from_numpy(ts), torch.from_numpy(cond),
                                   torch.from_numpy(tokens), None, config, 2)
    step = nnx.jit(lambda m, *a: guided_step(m, *a, config, 2, GRID_AXES))
    z, m, (loss, scale, *_) = step(model, noise, jnp.zeros(noise.shape), ts, cond, tokens)
    update, update_ref = np.asarray(z) - noise, z_ref.numpy() - noise
    np.testing.assert_allclose(update, update_ref, rtol=0, atol=1e-6)
    assert np.abs(update_ref).max() > 1e-3
    np.testing.assert_allclose(-np.asarray(m), update, rtol=0, atol=1e-6)                   # z_new = z - m
    np.testing.assert_allclose([float(loss[0]), float(scale[0])], [diag.loss[0], diag.scale[0]], rtol=1e-5)

    grad = separation_loss_and_grad(model, noise, ts, cond, tokens, config, 2)[1]
    later = nnx.clone(model)
    later.blocks[2].cross_attn.to_q.kernel[...] *= 3.0                               # after the guided blocks
    later.out_layer.kernel[...] *= 3.0
    assert np.array_equal(np.asarray(separation_loss_and_grad(later, noise, ts, cond, tokens, config, 2)[1]),
                          np.asarray(grad))
    later.blocks[1].cross_attn.to_q.kernel[...] *= 3.0                               # a guided block
    assert not np.allclose(np.asarray(separation_loss_and_grad(later, noise, ts, cond, tokens, config, 2)[1]),
                           np.asarray(grad))


def test_guidance_needs_the_masks(upstream, flows):
    with pytest.raises(ValueError, match="condition-token masks"):
        sample(flows[1], upstream["trajectory/noise"], upstream["trajectory/cond"], config=TIMIConfig(guided_steps=1),
               settings=_settings(upstream))

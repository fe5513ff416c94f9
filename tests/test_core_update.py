"""Properties of Eqs.5-7 (smoothing, adaptive scale, momentum, SGU) on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given
from hypothesis import strategies as st

import timi_core as tc

sigmas = st.floats(0.3, 4.0)
seeds = st.integers(0, 2**31 - 1)


@given(n=st.integers(1, 40), c=st.integers(1, 4), sigma=sigmas, seed=seeds)
def test_smoothing_matches_scipy_on_the_token_axis(backend, n, c, sigma, seed):
    g = np.random.default_rng(seed).normal(size=(2, n, c))
    expected = ndi.gaussian_filter(g, sigma, axes=(1,), mode="reflect", truncate=4.0)
    backend.assert_close(tc.gaussian_smooth(backend.asarray(g), sigma, axes=(1,)), expected, atol=max(backend.atol, 1e-6))


@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)), sigma=sigmas, seed=seeds)
def test_3d_smoothing_matches_scipy_and_three_1d_passes(backend, shape, sigma, seed):
    g = np.random.default_rng(seed).normal(size=(1, 2, *shape))
    expected = ndi.gaussian_filter(g, sigma, axes=(2, 3, 4), mode="reflect", truncate=4.0)
    three = backend.asarray(g)
    for ax in (2, 3, 4):
        three = tc.gaussian_smooth(three, sigma, axes=(ax,))
    backend.assert_close(tc.gaussian_smooth(backend.asarray(g), sigma, axes=(2, 3, 4)), expected, atol=max(backend.atol, 1e-6))
    backend.assert_close(three, expected, atol=max(backend.atol, 1e-6))


@given(n=st.integers(1, 30), sigma=sigmas, a=st.floats(-3, 3), b=st.floats(-3, 3), seed=seeds)
def test_smoothing_is_linear_and_keeps_constants(backend, n, sigma, a, b, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(2, 1, n, 3))
    lhs = tc.gaussian_smooth(backend.asarray(a * x + b * y), sigma, axes=(1,))
    rhs = a * backend.to_numpy(tc.gaussian_smooth(backend.asarray(x), sigma, axes=(1,))) + b * backend.to_numpy(
        tc.gaussian_smooth(backend.asarray(y), sigma, axes=(1,)))
    backend.assert_close(lhs, rhs, atol=max(backend.atol, 1e-5))
    const = np.full((1, n, 3), 2.5)
    backend.assert_close(tc.gaussian_smooth(backend.asarray(const), sigma, axes=(1,)), const, atol=max(backend.atol, 1e-5))


def test_sigma_zero_is_identity_and_negative_sigma_is_an_error(backend):
    g = np.random.default_rng(0).normal(size=(2, 5, 3))
    backend.assert_close(tc.gaussian_smooth(backend.asarray(g), 0.0, axes=(1,)), g)
    with pytest.raises(ValueError, match="sigma"):
        tc.gaussian_smooth(backend.asarray(g), -1.0, axes=(1,))
    with pytest.raises(ValueError, match="sigma"):
        tc.TIMIConfig(sigma=-1.0)


@given(n=st.integers(14, 40), sigma=st.floats(0.3, 2.5), m=st.sampled_from([1, 3, 5, 7]), k=st.integers(-7, 3),
       shift=st.integers(-40, 40), seed=seeds)
def test_point_smoothing_on_a_line_matches_scipy_away_from_the_ends(backend, n, sigma, m, k, shift, seed):
    """Tokens on a regular line, given in random order: Eq.5 over positions equals SciPy's 1-D Gaussian
    filter along the line (sigma in grid cells, whatever the spacing) wherever the kernel stays inside.

    Spacing ``m * 2**k`` and offset ``shift / 8`` make every position exact in float32 too, so the test
    compares the math, not the rounding of the inputs (a float32 position near 4 with spacing 0.01 is
    off by 2e-5 of a cell, which moves the result by ~3e-5)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(1, n, 3))
    perm = rng.permutation(n)
    line = shift / 8 + m * 2.0**k * np.arange(n, dtype=np.float64)
    pos = np.stack([line, np.full(n, 0.25), np.full(n, -1.0)], axis=-1)[None]
    assert np.array_equal(pos.astype(np.float32), pos)
    got = backend.to_numpy(tc.gaussian_smooth_points(backend.asarray(g[:, perm]), backend.asarray(pos[:, perm]), sigma))
    got = got[:, np.argsort(perm)]
    expected = ndi.gaussian_filter1d(g, sigma, axis=1, mode="reflect", truncate=4.0)
    r = int(4.0 * sigma + 0.5)
    np.testing.assert_allclose(got[:, r:n - r], expected[:, r:n - r], atol=max(5 * backend.atol, 1e-6))


def test_point_smoothing_on_a_3d_grid_matches_scipy_inside(backend):
    """On a 13x13x13 grid of tokens the spatial Eq.5 is the paper's 3-D convolution, away from the border.
    SciPy cuts its kernel to a cube and this one to a ball; at 6 sigma both cut weights below 1e-8."""
    rng = np.random.default_rng(0)
    n, sigma, truncate = 13, 0.8, 6.0
    grid = rng.normal(size=(1, 2, n, n, n))
    pos = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), axis=-1).reshape(1, -1, 3) * 0.25
    tokens = grid.reshape(1, 2, -1).transpose(0, 2, 1)
    got = backend.to_numpy(tc.gaussian_smooth_points(backend.asarray(tokens), backend.asarray(pos), sigma, truncate))
    got = got.transpose(0, 2, 1).reshape(grid.shape)
    expected = ndi.gaussian_filter(grid, sigma, axes=(2, 3, 4), mode="reflect", truncate=truncate)
    r = int(truncate * sigma + 0.5)
    inside = (slice(None), slice(None)) + (slice(r, n - r),) * 3
    np.testing.assert_allclose(got[inside], expected[inside], atol=max(backend.atol, 1e-5))


@given(n=st.integers(2, 30), c=st.integers(1, 4), sigma=st.floats(0.3, 4.0), k=st.integers(-6, 6), seed=seeds)
def test_point_smoothing_follows_the_tokens_not_their_order_or_units(backend, n, c, sigma, k, seed):
    """Permuting the tokens permutes the result; scaling and shifting the positions changes nothing;
    a constant gradient stays constant (the kernel is normalised). Positions on a 2**-10 lattice,
    scaled by 2**k and shifted by 0.5, stay exact in float32, so only the math is compared."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(2, n, c))
    pos = rng.integers(-1024, 1025, size=(2, n, 3)) / 1024.0
    moved_pos = 2.0**k * pos + 0.5
    assert np.array_equal(moved_pos.astype(np.float32), moved_pos)
    perm = rng.permutation(n)
    ref = backend.to_numpy(tc.gaussian_smooth_points(backend.asarray(g), backend.asarray(pos), sigma))
    permuted = tc.gaussian_smooth_points(backend.asarray(g[:, perm]), backend.asarray(pos[:, perm]), sigma)
    moved = tc.gaussian_smooth_points(backend.asarray(g), backend.asarray(moved_pos), sigma)
    tol = max(backend.atol, 1e-5)
    backend.assert_close(permuted, ref[:, perm], atol=tol)
    backend.assert_close(moved, ref, atol=tol)
    const = np.full((2, n, c), -1.5)
    backend.assert_close(tc.gaussian_smooth_points(backend.asarray(const), backend.asarray(pos), sigma), const, atol=tol)


def test_point_smoothing_checks_its_inputs_and_sgu_needs_positions_for_it(backend):
    g = backend.asarray(np.random.default_rng(0).normal(size=(1, 5, 2)))
    pos = backend.asarray(np.random.default_rng(1).normal(size=(1, 5, 3)))
    backend.assert_close(tc.gaussian_smooth_points(g, pos, 0.0), backend.to_numpy(g))
    with pytest.raises(ValueError, match="same B and L"):
        tc.gaussian_smooth_points(g, pos[:, :4, :], 1.5)
    cfg = tc.TIMIConfig(smoothing="positions")
    with pytest.raises(ValueError, match="needs the tokens' positions"):
        tc.sgu_update(g, g, None, cfg, axes=(1,))
    z_new, m = tc.sgu_update(g, g, None, cfg, axes=(1,), positions=pos)
    assert z_new.shape == g.shape
    with pytest.raises(ValueError, match="smoothing"):
        tc.TIMIConfig(smoothing="grid")


@given(shape=st.tuples(st.integers(1, 3), st.integers(2, 12), st.integers(1, 5)), alpha=st.floats(0.01, 1.0), seed=seeds)
def test_gm_step_peak_is_alpha_times_latent_std(backend, shape, alpha, seed):
    rng = np.random.default_rng(seed)
    z, g = rng.normal(size=(2, *shape))
    lam = backend.to_numpy(tc.adaptive_scale(backend.asarray(g), backend.asarray(z), alpha=alpha, eps=0.0))
    dz = lam * g
    peaks = np.abs(dz).reshape(shape[0], -1).max(axis=1)
    std = z.reshape(shape[0], -1).std(axis=1)
    # std(z) in the backend's precision: a few ulps of |z| (rounding, the mean), relative to std(z) itself,
    # which for a couple of nearly equal entries is tiny (float32: two entries 5e-4 apart give 2e-5)
    rtol = 1e-5 + 8 * np.finfo(lam.dtype).eps * np.abs(z).reshape(shape[0], -1).max(axis=1) / std
    assert np.all(np.abs(peaks - alpha * std) <= rtol * alpha * std), (peaks, alpha * std, rtol)


@given(steps=st.integers(1, 8), beta=st.floats(0.0, 0.99), seed=seeds)
def test_momentum_is_an_exponential_moving_average(backend, steps, beta, seed):
    dzs = np.random.default_rng(seed).normal(size=(steps, 2, 4))
    m = backend.asarray(np.zeros((2, 4)))
    for dz in dzs:
        m = tc.momentum(m, backend.asarray(dz), beta)
    weights = (1 - beta) * beta ** np.arange(steps - 1, -1, -1)
    backend.assert_close(m, np.tensordot(weights, dzs, axes=1), atol=max(backend.atol, 1e-5))


def test_sgu_update_composes_eqs_5_to_7(backend):
    rng = np.random.default_rng(4)
    z, g, m0 = rng.normal(size=(3, 2, 16, 4))
    cfg = tc.TIMIConfig.paper()
    z_new, m_new = tc.sgu_update(backend.asarray(z), backend.asarray(g), backend.asarray(m0), cfg, axes=(1,))
    g_reg = ndi.gaussian_filter(g, cfg.sigma, axes=(1,), mode="reflect")
    lam = cfg.alpha * z.std(axis=(1, 2), keepdims=True) / (np.abs(g_reg).max(axis=(1, 2), keepdims=True) + cfg.eps)
    m = cfg.beta * m0 + (1 - cfg.beta) * lam * g_reg
    backend.assert_close(m_new, m, atol=max(backend.atol, 1e-6))
    backend.assert_close(z_new, z - m, atol=max(backend.atol, 1e-6))
    step = tc.sgu_step(backend.asarray(z), backend.asarray(g), backend.asarray(m0), cfg, axes=(1,))
    backend.assert_close(step.scale, lam.reshape(2), rtol=max(backend.rtol, 1e-5))  # Eq.6's lambda, per sample
    backend.assert_close(step.momentum, m, atol=max(backend.atol, 1e-6))
    for off in (dict(gm=False), dict(sgu=False)):  # no Eq.6: the step size is alpha
        backend.assert_close(tc.sgu_step(backend.asarray(z), backend.asarray(g), None, tc.TIMIConfig(**off),
                                         axes=(1,)).scale, np.full(2, cfg.alpha), rtol=1e-6)


@pytest.mark.parametrize(
    "switches, expected_dz",
    [
        (dict(sgu=False), lambda z, g, c: c.alpha * g),
        (dict(sr=False), None),
        (dict(gm=False), None),
    ],
)
def test_ablation_switches(switches, expected_dz):
    rng = np.random.default_rng(5)
    z, g = rng.normal(size=(2, 1, 12, 3))
    cfg = tc.TIMIConfig.paper(**switches)  # the paper's switches (Tables 2, 5) over its literal form
    z_new, m = tc.sgu_update(z, g, None, cfg, axes=(1,))
    np.testing.assert_allclose(z_new, z - m)
    if expected_dz is not None:
        np.testing.assert_allclose(m, expected_dz(z, g, cfg))
    elif not cfg.sr:  # no smoothing: dz proportional to the raw gradient
        ratio = m / g
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-10)
    else:  # GM off: dz = alpha * smoothed gradient, then momentum from zero
        g_reg = ndi.gaussian_filter(g, cfg.sigma, axes=(1,), mode="reflect")
        np.testing.assert_allclose(m, (1 - cfg.beta) * cfg.alpha * g_reg)


def test_nonfinite_gradient_sample_gets_no_new_update(backend):
    rng = np.random.default_rng(6)
    z, g, m0 = rng.normal(size=(3, 2, 8, 2))
    g[0, 3, 1] = np.nan
    cfg = tc.TIMIConfig.paper()
    z_new, m = tc.sgu_update(backend.asarray(z), backend.asarray(g), backend.asarray(m0), cfg, axes=(1,))
    m = backend.to_numpy(m)
    assert np.isfinite(m).all() and np.isfinite(backend.to_numpy(z_new)).all()
    np.testing.assert_allclose(m[0], cfg.beta * m0[0], rtol=1e-5)  # only the decayed momentum
    _, m_ok = tc.sgu_update(z[1:], g[1:], m0[1:], cfg, axes=(1,))
    np.testing.assert_allclose(m[1], m_ok[0], rtol=1e-5, atol=1e-7)  # other samples unaffected


def test_one_sgu_step_lowers_the_separation_loss_on_a_smooth_toy_problem():
    """Toy ISG: latent tokens attend to fixed condition keys; a small SGU step lowers L_sep."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    L, M, C, K = 32, 16, 8, 2
    keys = torch.randn(M, C, generator=gen, dtype=torch.float64)
    masks = torch.zeros(K, M, dtype=torch.float64)
    masks[0, : M // 2] = 1
    masks[1, M // 2:] = 1
    z = torch.randn(1, L, C, generator=gen, dtype=torch.float64)

    def loss(z):
        A = torch.softmax(z @ keys.T, dim=-1)
        return tc.instance_separation_loss(tc.instance_probability(A, masks)).sum()

    zr = z.clone().requires_grad_(True)
    before = loss(zr)
    (grad,) = torch.autograd.grad(before, zr)
    z_new, _ = tc.sgu_update(z, grad, None, tc.TIMIConfig(alpha=0.05), axes=(1,))
    assert loss(z_new).item() < before.item()


def test_jax_sgu_update_runs_under_jit_and_grad():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(7)
    z, g = (jnp.asarray(a, dtype=jnp.float32) for a in rng.normal(size=(2, 2, 10, 3)))
    cfg = tc.TIMIConfig.paper()
    step = jax.jit(lambda z, g, m: tc.sgu_update(z, g, m, cfg, axes=(1,)))
    z_new, m = step(z, g, jnp.zeros_like(z))
    z_ref, m_ref = tc.sgu_update(np.asarray(z, np.float64), np.asarray(g, np.float64), None, cfg, axes=(1,))
    np.testing.assert_allclose(np.asarray(m), m_ref, rtol=1e-4, atol=1e-6)
    # differentiable end to end: d/dg of sum(smoothed g) is the column sums of the smoothing operator
    d = jax.grad(lambda g: tc.gaussian_smooth(g, 1.5, (1,)).sum())(g)
    ones = np.ones((1, 10, 1))
    col = ndi.correlate1d(np.eye(10), tc.gaussian_kernel1d(1.5), axis=0, mode="reflect").sum(axis=0)
    np.testing.assert_allclose(np.asarray(d)[0, :, 0], col * ones[0, :, 0], rtol=1e-5)


def test_config_defaults_and_validation():
    cfg = tc.TIMIConfig.paper()
    assert (cfg.alpha, cfg.sigma, cfg.beta, cfg.eps, cfg.guided_layers, cfg.guided_steps) == (0.1, 1.5, 0.9, 1e-6, 4, None)
    assert cfg.guided_fraction == tc.PAPER_GUIDED_FRACTION == 0.3
    paper = np.linspace(0, 1, 50).astype(np.float32)          # hy3dgen's 50-step schedule (float32)
    assert cfg.guidance_active(14, paper) and not cfg.guidance_active(15, paper)
    assert not cfg.replace(isg=False).guidance_active(0, paper)
    for bad in (dict(alpha=-0.1), dict(beta=1.0), dict(guided_layers=2.5), dict(eps=float("nan")), dict(gm="yes"),
                dict(guided_steps=-1), dict(guided_steps=2.0), dict(guided_fraction=1.5), dict(guided_fraction=None)):
        with pytest.raises(ValueError, match="TIMIConfig"):
            tc.TIMIConfig(**bad)


def test_jax_and_torch_differentiate_sgu_update_alike():
    """d(sum z_new)/dz through Eqs.5-7 (std(z) in Eq.6 depends on z): JAX and PyTorch autodiff agree."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    z, g, w = rng.normal(size=(3, 2, 10, 3))
    cfg = tc.TIMIConfig.paper()
    f32 = jax.numpy.float32

    def objective_j(z):
        return (tc.sgu_update(z, jax.numpy.asarray(g, f32), None, cfg, axes=(1,))[0] * w).sum()

    d_j = jax.jit(jax.grad(objective_j))(jax.numpy.asarray(z, f32))
    z_t = torch.tensor(z, requires_grad=True)
    (tc.sgu_update(z_t, torch.tensor(g), None, cfg, axes=(1,))[0] * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(np.asarray(d_j), z_t.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(z_t.grad.numpy(), w)  # the update really depends on z through std(z)


@pytest.mark.parametrize("steps, expected", [(50, 15), (30, 9), (10, 3), (8, 3), (5, 2), (2, 1), (1, 1), (100, 30)])
def test_guided_window_is_the_first_30_percent_of_the_trajectory(steps, expected):
    """Default window: the steps starting below sigma 0.3 (15 of 50 on the paper's schedule), in float32
    and float64 alike; at 30 steps the first 9; a step starting exactly at 0.3 is not guided."""
    cfg = tc.TIMIConfig.paper()
    for dtype in (np.float32, np.float64):
        sigmas = np.linspace(0, 1, steps).astype(dtype)
        n = cfg.num_guided_steps(sigmas)
        assert n == expected
        assert all(s < 0.3 for s in sigmas[:n]) and all(s >= 0.3 - 1e-6 for s in sigmas[n:])
    assert cfg.num_guided_steps(np.linspace(0, 1, 11)) == 3           # sigma_3 = 0.3 exactly: not guided


def test_guided_window_explicit_count_fraction_and_off():
    sigmas = np.linspace(0, 1, 8)
    assert tc.TIMIConfig(guided_steps=4).num_guided_steps(sigmas) == 4
    assert tc.TIMIConfig(guided_steps=20).num_guided_steps(sigmas) == 8      # at most the schedule
    assert tc.TIMIConfig(guided_fraction=0.5).num_guided_steps(sigmas) == 4  # 0, 1/7, 2/7, 3/7 < 0.5
    assert tc.TIMIConfig(guided_fraction=1.0).num_guided_steps(sigmas) == 7  # all but the last (sigma 1)
    for off in (tc.TIMIConfig(guided_steps=0), tc.TIMIConfig(guided_fraction=0.0), tc.TIMIConfig(isg=False),
                tc.TIMIConfig(guided_layers=0)):
        assert not off.enabled and off.num_guided_steps(sigmas) == 0

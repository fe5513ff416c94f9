"""The token-common part of the update (issue 27): ``token_common``, ``common_share``,
``select_common`` and ``TIMIConfig.common`` inside SGU, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given
from hypothesis import strategies as st

import timi_core as tc

seeds = st.integers(0, 2**31 - 1)
shapes = st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 5))


@given(shape=shapes, seed=seeds)
def test_common_part_and_rest_split_the_gradient_orthogonally(backend, shape, seed):
    g = np.random.default_rng(seed).normal(size=shape)
    common = backend.to_numpy(tc.select_common(backend.asarray(g), "only", (1,)))
    rest = backend.to_numpy(tc.select_common(backend.asarray(g), "remove", (1,)))
    np.testing.assert_allclose(common + rest, g, atol=max(backend.atol, 1e-6))
    np.testing.assert_allclose(common, np.broadcast_to(g.mean(axis=1, keepdims=True), g.shape), atol=1e-5)
    np.testing.assert_allclose(rest.mean(axis=1), 0.0, atol=1e-5)               # no shared shift is left
    np.testing.assert_allclose((common * rest).sum(axis=(1, 2)), 0.0, atol=1e-4)  # orthogonal per sample
    share = backend.to_numpy(tc.common_share(backend.asarray(g), (1,)))
    rest_share = np.linalg.norm(rest.reshape(shape[0], -1), axis=1) / np.linalg.norm(g.reshape(shape[0], -1), axis=1)
    np.testing.assert_allclose(share ** 2 + rest_share ** 2, 1.0, rtol=1e-4)      # Pythagoras
    assert np.all((share >= 0) & (share <= 1 + 1e-6))
    backend.assert_close(tc.select_common(backend.asarray(g), "keep", (1,)), g)


@given(n=st.integers(1, 20), c=st.integers(1, 4), seed=seeds)
def test_share_is_one_for_a_shift_and_zero_for_a_zero_gradient(backend, n, c, seed):
    shift = np.random.default_rng(seed).normal(size=(1, 1, c))
    same = np.broadcast_to(shift, (1, n, c)).copy()
    backend.assert_close(tc.common_share(backend.asarray(same), (1,)), np.ones(1), rtol=max(backend.rtol, 1e-5))
    backend.assert_close(tc.common_share(backend.asarray(np.zeros((2, n, c))), (1,)), np.zeros(2))


@given(n=st.integers(13, 48), sigma=st.floats(0.3, 3.0), seed=seeds)
def test_eq5_on_tokens_keeps_the_common_part_so_a_token_shuffle_cannot_change_it(n, sigma, seed):
    """SciPy's reflect boundary keeps each channel's sum, so after Eq.5 along the tokens the common
    part is the raw gradient's, whatever the token order: the common-part-only variant and its
    shuffled control are one update (docs/results.md, issue 27)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(2, n, 3))
    radius = int(4.0 * sigma + 0.5)
    if radius > n:
        return
    perm = rng.permutation(n)
    smoothed = tc.gaussian_smooth(g, sigma, (1,))
    shuffled = tc.gaussian_smooth(g[:, perm], sigma, (1,))
    np.testing.assert_allclose(tc.token_common(smoothed, (1,)), tc.token_common(g, (1,)), atol=1e-12)
    np.testing.assert_allclose(tc.token_common(shuffled, (1,)), tc.token_common(smoothed, (1,)), atol=1e-12)
    np.testing.assert_allclose(ndi.gaussian_filter1d(g, sigma, axis=1, mode="reflect").sum(axis=1), g.sum(axis=1),
                               atol=1e-10)


@pytest.mark.parametrize("common", ["remove", "only"])
def test_sgu_selects_after_eq5_and_before_eq6(backend, common):
    rng = np.random.default_rng(7)
    z, g, m0 = rng.normal(size=(3, 2, 16, 4)) + np.array([0.0, 0.7, 0.0])[:, None, None, None]
    cfg = tc.TIMIConfig(common=common)
    step = tc.sgu_step(backend.asarray(z), backend.asarray(g), backend.asarray(m0), cfg, axes=(1,))
    g_reg = ndi.gaussian_filter(g, cfg.sigma, axes=(1,), mode="reflect")
    mean = g_reg.mean(axis=1, keepdims=True)
    g_sel = g_reg - mean if common == "remove" else np.broadcast_to(mean, g_reg.shape)
    lam = cfg.alpha * z.std(axis=(1, 2), keepdims=True) / (np.abs(g_sel).max(axis=(1, 2), keepdims=True) + cfg.eps)
    m = cfg.beta * m0 + (1 - cfg.beta) * lam * g_sel
    backend.assert_close(step.momentum, m, atol=max(backend.atol, 1e-6))
    backend.assert_close(step.latent, z - m, atol=max(backend.atol, 1e-6))
    backend.assert_close(step.smoothed, g_reg, atol=max(backend.atol, 1e-6))
    raw = tc.sgu_step(backend.asarray(z), backend.asarray(g), None, cfg.replace(sgu=False), axes=(1,))
    backend.assert_close(raw.momentum, cfg.alpha * tc.select_common(g, common, (1,)), atol=max(backend.atol, 1e-6))


def test_the_paper_preset_is_the_literal_form_and_unknown_values_are_one_line():
    paper = tc.TIMIConfig.paper()
    assert (paper.alpha, paper.sigma, paper.beta, paper.guided_layers, paper.smoothing, paper.common) == (
        0.1, 1.5, 0.9, 4, "tokens", "keep")
    assert tc.TIMIConfig.preset("paper") == paper and tc.TIMIConfig.preset("default") == tc.TIMIConfig()
    assert tc.TIMIConfig.paper(alpha=0.2).alpha == 0.2
    with pytest.raises(ValueError, match="unknown TIMI preset 'nope'"):
        tc.TIMIConfig.preset("nope")
    with pytest.raises(ValueError, match="TIMIConfig.common='half' is invalid"):
        tc.TIMIConfig(common="half")

"""Properties of Eqs.2-4 (instance probability, spatial weights, separation loss) on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import timi_core as tc

dims = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 7), st.integers(1, 4))  # B, L, M, K


def _attn_and_masks(seed, B, L, M, K):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, L, M + L))  # joint softmax over [cond; latent] keys
    A = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    masks = rng.uniform(size=(K, M))
    return A[..., :M], masks


@given(dims=dims, seed=st.integers(0, 2**31 - 1))
def test_instance_probability_is_the_dense_sum(backend, dims, seed):
    attn, masks = _attn_and_masks(seed, *dims)
    B, L, M, K = dims
    expected = np.zeros((B, L, K))
    for b in range(B):
        for v in range(L):
            for k in range(K):
                expected[b, v, k] = sum(attn[b, v, m] * masks[k, m] for m in range(M))
    P = tc.instance_probability(backend.asarray(attn), backend.asarray(masks))
    backend.assert_close(P, expected)


@given(dims=dims, seed=st.integers(0, 2**31 - 1))
def test_spatial_weights_columns_sum_to_one_without_eps(backend, dims, seed):
    attn, masks = _attn_and_masks(seed, *dims)
    P = tc.instance_probability(backend.asarray(attn), backend.asarray(masks))
    W = tc.spatial_weights(P, eps=0.0)
    sums = backend.to_numpy(W).sum(axis=-2)
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


@given(dims=dims, seed=st.integers(0, 2**31 - 1))
def test_loss_is_entropy_minus_log_mass(backend, dims, seed):
    """eps = 0: L_sep = sum_k [H(W[:, k]) - log S_k] with S_k = sum_v P[v, k] (W = P / S)."""
    attn, masks = _attn_and_masks(seed, *dims)
    P_np = np.einsum("blm,km->blk", attn, masks)
    S = P_np.sum(axis=1, keepdims=True)
    W_np = P_np / S
    expected = (-(W_np * np.log(W_np)).sum(axis=1) - np.log(S[:, 0, :])).sum(axis=-1)
    P = tc.instance_probability(backend.asarray(attn), backend.asarray(masks))
    loss = tc.instance_separation_loss(P, eps=0.0)
    assert loss.shape == (dims[0],)
    backend.assert_close(loss, expected, rtol=max(backend.rtol, 1e-9), atol=max(backend.atol, 1e-5))


def test_loss_is_per_sample(backend):
    attn, masks = _attn_and_masks(3, 3, 6, 5, 2)
    P = tc.instance_probability(backend.asarray(attn), backend.asarray(masks))
    whole = backend.to_numpy(tc.instance_separation_loss(P))
    for b in range(3):
        one = tc.instance_probability(backend.asarray(attn[b:b + 1]), backend.asarray(masks))
        np.testing.assert_allclose(backend.to_numpy(tc.instance_separation_loss(one))[0], whole[b], rtol=1e-5)


def test_mismatched_condition_tokens_is_a_clear_error(backend):
    attn, masks = _attn_and_masks(0, 1, 4, 5, 2)
    with pytest.raises(ValueError, match="M=5 condition tokens but masks have M=4"):
        tc.instance_probability(backend.asarray(attn), backend.asarray(masks[:, :4]))


def test_zero_instances_is_a_clear_error(backend):
    attn, _ = _attn_and_masks(0, 1, 4, 5, 2)
    with pytest.raises(ValueError, match="K = 0"):
        tc.instance_probability(backend.asarray(attn), backend.asarray(np.zeros((0, 5))))


def test_detached_weights_give_the_constant_weight_gradient():
    """With W constant, dL/dP = -W / (P + eps); with W live the gradient differs."""
    torch = pytest.importorskip("torch")
    attn, masks = _attn_and_masks(1, 2, 7, 5, 3)
    P = torch.tensor(np.einsum("blm,km->blk", attn, masks), requires_grad=True)
    eps = 1e-6
    tc.instance_separation_loss(P, eps, detach_weights=True).sum().backward()
    W = (P / (P.sum(-2, keepdim=True) + eps)).detach()
    np.testing.assert_allclose(P.grad.numpy(), (-W / (P.detach() + eps)).numpy(), rtol=1e-10)
    P2 = P.detach().clone().requires_grad_(True)
    tc.instance_separation_loss(P2, eps, detach_weights=False).sum().backward()
    assert not np.allclose(P2.grad.numpy(), P.grad.numpy())


def test_jax_grad_of_loss_matches_torch():
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    attn, masks = _attn_and_masks(2, 2, 6, 4, 3)
    masks_j = jax.numpy.asarray(masks, dtype=jax.numpy.float32)

    def loss_j(a):
        return tc.instance_separation_loss(tc.instance_probability(a, masks_j)).sum()

    g_j = jax.jit(jax.grad(loss_j))(jax.numpy.asarray(attn, dtype=jax.numpy.float32))
    a_t = torch.tensor(attn, requires_grad=True)
    tc.instance_separation_loss(tc.instance_probability(a_t, torch.tensor(masks))).sum().backward()
    np.testing.assert_allclose(np.asarray(g_j), a_t.grad.numpy(), rtol=2e-4, atol=1e-4)


@given(dims=dims, seed=st.integers(0, 2**31 - 1))
def test_instance_normalised_loss_ignores_each_tokens_instance_mass(backend, dims, seed):
    """With P normalised over the instances, scaling a latent token's whole row of P (its total
    attention to the instances) leaves L_sep unchanged: only the choice among instances counts."""
    attn, masks = _attn_and_masks(seed, *dims)
    P = np.einsum("blm,km->blk", attn, masks)
    scale = np.random.default_rng(seed + 1).uniform(0.2, 5.0, size=P.shape[:-1] + (1,))
    a = tc.instance_separation_loss(backend.asarray(P), eps=1e-12, normalize_instances=True)
    b = tc.instance_separation_loss(backend.asarray(P * scale), eps=1e-12, normalize_instances=True)
    backend.assert_close(a, b, rtol=1e-4, atol=1e-6)
    rows = tc.normalize_over_instances(backend.asarray(P), eps=0.0)
    sums = backend.to_numpy(rows).sum(-1)
    np.testing.assert_allclose(sums[P.sum(-1) > 1e-9], 1.0, rtol=1e-5)

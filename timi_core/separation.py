"""Instance-aware Separation Guidance (ISG, Sec. 4.1): Eqs. 2-4."""

from __future__ import annotations

from ._backend import array_namespace, as_float, stop_gradient

__all__ = [
    "instance_probability",
    "spatial_weights",
    "separation_loss",
    "instance_separation_loss",
]


def instance_probability(attn_zc, masks):
    """Eq.2: instance probability map ``P[..., v, k] = sum_m A_zc[..., v, m] * M[k, m]``.

    Parameters
    ----------
    attn_zc : array (..., L, M)
        3D-to-image block of the joint attention (rows: latent tokens, columns: condition tokens).
    masks : array (K, M)
        Instance masks pooled onto the condition tokens (see :func:`timi_core.pool_masks`).

    Returns
    -------
    P : array (..., L, K), same backend and floating dtype as ``attn_zc``.
    """
    xp = array_namespace(attn_zc, masks)
    if attn_zc.ndim < 2:
        raise ValueError(f"instance_probability: attn_zc must have shape (..., L, M), got {attn_zc.shape}.")
    if masks.ndim != 2:
        raise ValueError(f"instance_probability: masks must have shape (K, M), got {masks.shape}.")
    if masks.shape[0] == 0:
        raise ValueError("instance_probability: got K = 0 instance masks; pass at least one mask.")
    if masks.shape[1] != attn_zc.shape[-1]:
        raise ValueError(
            f"instance_probability: attn_zc has M={attn_zc.shape[-1]} condition tokens but masks have "
            f"M={masks.shape[1]}; pool the masks onto the same condition tokens (pool_masks with the "
            "conditioner's patch grid and prefix tokens)."
        )
    attn_zc = as_float(attn_zc, xp)
    masks = xp.astype(masks, attn_zc.dtype)
    return xp.matmul(attn_zc, xp.matrix_transpose(masks))


def spatial_weights(P, eps=1e-6):
    """Eq.3: ``W[v, k] = P[v, k] / (sum_v' P[v', k] + eps)``, normalising over the token axis (-2)."""
    xp = array_namespace(P)
    return P / (xp.sum(P, axis=-2, keepdims=True) + eps)


def separation_loss(P, W, eps=1e-6):
    """Eq.4: ``L_sep = -sum_k sum_v W[v, k] log(P[v, k] + eps)``, reduced over (L, K) -> shape (...)."""
    xp = array_namespace(P, W)
    if P.shape != W.shape:
        raise ValueError(f"separation_loss: P {P.shape} and W {W.shape} must have the same shape.")
    return -xp.sum(W * xp.log(P + eps), axis=(-2, -1))


def normalize_over_instances(P, eps=1e-6):
    """``P[v, k] / (sum_k' P[v, k'] + eps)``: each latent token's attention as a distribution over
    the instances (a variant, not the paper's Eq.2; see ``TIMIConfig.normalize_instances``)."""
    xp = array_namespace(P)
    return P / (xp.sum(P, axis=-1, keepdims=True) + eps)


def instance_separation_loss(P, eps=1e-6, detach_weights=False, normalize_instances=False):
    """Eqs.3-4 from ``P`` in one call: ``separation_loss(P, spatial_weights(P))``.

    With ``detach_weights=True`` the Eq.3 weights are a constant for automatic differentiation
    (``torch.Tensor.detach`` / ``jax.lax.stop_gradient``); by default they take part in the
    gradient, as the equations are written. With ``normalize_instances=True`` ``P`` is first
    normalised over the instances (:func:`normalize_over_instances`), so the loss cannot be lowered
    by raising how much a token attends to the instances overall, only by choosing one of them.
    """
    if normalize_instances:
        P = normalize_over_instances(P, eps)
    W = spatial_weights(P, eps)
    if detach_weights:
        W = stop_gradient(W)
    return separation_loss(P, W, eps)

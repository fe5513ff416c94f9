"""Spatial-stabilized Geometry-adaptive Update (SGU, Sec. 4.2): Eqs. 5-7."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import array_namespace, device
from .config import TIMIConfig
from .smoothing import gaussian_smooth, gaussian_smooth_points

__all__ = ["SGUStep", "adaptive_scale", "common_share", "momentum", "select_common", "sgu_step", "sgu_update",
           "smooth_gradient", "token_common"]


def _sample_axes(x) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"expected a batched array (B, ...) with at least 2 axes, got shape {x.shape}.")
    return tuple(range(1, x.ndim))


def adaptive_scale(g, z, alpha=0.1, eps=1e-6):
    """Eq.6: ``lambda = alpha * std(z) / (max|g| + eps)`` per sample (leading axis = batch).

    ``std`` is the population standard deviation of each sample's latent. Returns shape
    ``(B, 1, ..., 1)`` so that ``lambda * g`` broadcasts; then ``max |lambda * g| <= alpha * std(z)``.
    """
    xp = array_namespace(g, z)
    axes = _sample_axes(z)
    if g.shape != z.shape:
        raise ValueError(f"adaptive_scale: gradient {g.shape} and latent {z.shape} differ in shape.")
    std = xp.std(z, axis=axes, keepdims=True)
    peak = xp.max(xp.abs(g), axis=axes, keepdims=True)
    return alpha * std / (peak + eps)


def momentum(m_prev, dz, beta=0.9):
    """Eq.7, first line: ``m_t = beta * m_{t-1} + (1 - beta) * dz_t`` (an exponential moving average)."""
    return beta * m_prev + (1.0 - beta) * dz


def _zero_nonfinite_samples(g, xp):
    """A sample whose gradient holds any NaN/inf contributes no new update (its gradient -> 0)."""
    ok = xp.all(xp.isfinite(g), axis=_sample_axes(g), keepdims=True)
    return xp.where(ok, g, xp.zeros_like(g))


def smooth_gradient(grad, config: TIMIConfig, axes, positions=None):
    """Eq.5 as ``config`` says: ``grad`` unchanged without SR; else :func:`gaussian_smooth` along
    ``axes`` (``smoothing="tokens"``) or :func:`gaussian_smooth_points` over ``positions`` (B, L, D)
    (``smoothing="positions"`` or ``"decoder"``, which then require them)."""
    if not config.sr:
        return grad
    if config.smoothing != "tokens":
        if positions is None:
            raise ValueError(f"TIMIConfig.smoothing={config.smoothing!r} needs the tokens' positions; this "
                             "pipeline passed none (use smoothing='tokens' for a model whose latents carry no positions).")
        return gaussian_smooth_points(grad, positions, config.sigma)
    return gaussian_smooth(grad, config.sigma, axes)


def token_common(g, axes):
    """The part of ``g`` shared by every token: its mean over ``axes`` (the latent's token or
    spatial axes), broadcast back to ``g``'s shape. ``g - token_common(g, axes)`` is the
    token-specific rest; the two are orthogonal per sample and channel."""
    xp = array_namespace(g)
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return xp.broadcast_to(xp.mean(g, axis=axes, keepdims=True), g.shape)


def common_share(g, axes, eps: float = 0.0):
    """Per sample (B,), the share of ``g``'s norm that is common to all tokens:
    ``|token_common(g)| / |g|`` (0 for a zero ``g``). 1 means every token gets the same update,
    0 that the update moves tokens only relative to each other. Since the common part and the rest
    are orthogonal, ``share**2`` is the common part's share of the energy ``|g|**2``."""
    xp = array_namespace(g)
    batch_axes = _sample_axes(g)
    c = token_common(g, axes)
    num = xp.sqrt(xp.sum(c * c, axis=batch_axes))
    den = xp.sqrt(xp.sum(g * g, axis=batch_axes))
    return xp.where(den > eps, num / xp.where(den > eps, den, xp.ones_like(den)), xp.zeros_like(den))


def select_common(g, common: str, axes):
    """``TIMIConfig.common`` on a gradient: ``"keep"`` returns ``g``, ``"remove"`` the
    token-specific rest ``g - token_common(g)``, ``"only"`` the common part ``token_common(g)``."""
    if common == "keep":
        return g
    c = token_common(g, axes)
    if common == "remove":
        return g - c
    if common == "only":
        return c
    raise ValueError(f"common={common!r}: use 'keep', 'remove' or 'only'.")


class SGUStep(NamedTuple):
    """One SGU update (:func:`sgu_step`): the new latent, the new momentum (the update that was
    subtracted), per sample (B,) the step size applied to the gradient (Eq.6's ``lambda``, or
    ``alpha`` where GM or SGU is off), and ``smoothed``: Eq.5's output ``g_reg`` (the gradient
    itself without SR or SGU), before ``TIMIConfig.common`` selects from it."""

    latent: Any
    momentum: Any
    scale: Any
    smoothed: Any = None


def sgu_update(z, grad, m_prev, config: TIMIConfig, axes, positions=None):
    """Eqs.5-7: one guided latent update ``(z, dL/dz, m_{t-1}) -> (z - m_t, m_t)``.

    * ``config.common`` (after Eq.5, before Eq.6): :func:`select_common` over ``axes`` (keep,
      remove or keep only the token-common part of the gradient).
    * SR (Eq.5, ``config.sr``): :func:`smooth_gradient`: ``gaussian_smooth(grad, config.sigma,
      axes)``; ``axes`` are the latent's spatial axes, e.g. ``(1,)`` for hy3dgen's (B, L, C) token
      latents or ``(2, 3, 4)`` for a (B, C, D, H, W) grid; with ``config.smoothing="positions"``
      a Gaussian over the tokens' ``positions`` (B, L, D) instead.
    * GM (Eq.6, ``config.gm``): ``dz = lambda * g`` with :func:`adaptive_scale`; off: ``alpha * g``.
    * Momentum (Eq.7): ``m = beta * m_prev + (1 - beta) * dz``; ``m_prev=None`` means zeros.
    * ``config.sgu`` off: the raw step ``dz = alpha * grad`` (no SR, GM or momentum).

    The returned ``m_new`` is always the update that was subtracted: ``z_new == z - m_new``.
    A sample whose gradient is not finite gets no new update (only the decayed momentum).
    :func:`sgu_step` returns the same with the step size.
    """
    step = sgu_step(z, grad, m_prev, config, axes, positions)
    return step.latent, step.momentum


def sgu_step(z, grad, m_prev, config: TIMIConfig, axes, positions=None) -> SGUStep:
    """:func:`sgu_update` (Eqs.5-7), also returning the per-sample step size (:class:`SGUStep`)."""
    xp = array_namespace(z, grad)
    if grad.shape != z.shape:
        raise ValueError(f"sgu_update: gradient {grad.shape} and latent {z.shape} differ in shape.")
    g = _zero_nonfinite_samples(grad, xp)
    batch = (z.shape[0],)
    fixed = xp.full(batch, config.alpha, dtype=z.dtype, device=device(z))
    if not config.sgu:
        dz = config.alpha * select_common(g, config.common, axes)
        return SGUStep(z - dz, dz, fixed, g)
    smoothed = smooth_gradient(g, config, axes, positions)
    g = select_common(smoothed, config.common, axes)
    if config.gm:
        lam = adaptive_scale(g, z, config.alpha, config.eps)
        dz, scale = lam * g, xp.reshape(lam, batch)
    else:
        dz, scale = config.alpha * g, fixed
    m = momentum(xp.zeros_like(dz) if m_prev is None else m_prev, dz, config.beta)
    return SGUStep(z - m, m, scale, smoothed)

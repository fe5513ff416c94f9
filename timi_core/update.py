"""Spatial-stabilized Geometry-adaptive Update (SGU, Sec. 4.2): Eqs. 5-7."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import array_namespace, device
from .config import TIMIConfig
from .smoothing import gaussian_smooth, gaussian_smooth_points

__all__ = ["SGUStep", "adaptive_scale", "momentum", "sgu_step", "sgu_update", "smooth_gradient"]


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


class SGUStep(NamedTuple):
    """One SGU update (:func:`sgu_step`): the new latent, the new momentum (the update that was
    subtracted) and, per sample (B,), the step size applied to the gradient: Eq.6's ``lambda``, or
    ``alpha`` where GM (or SGU) is off."""

    latent: Any
    momentum: Any
    scale: Any


def sgu_update(z, grad, m_prev, config: TIMIConfig, axes, positions=None):
    """Eqs.5-7: one guided latent update ``(z, dL/dz, m_{t-1}) -> (z - m_t, m_t)``.

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
        dz = config.alpha * g
        return SGUStep(z - dz, dz, fixed)
    g = smooth_gradient(g, config, axes, positions)
    if config.gm:
        lam = adaptive_scale(g, z, config.alpha, config.eps)
        dz, scale = lam * g, xp.reshape(lam, batch)
    else:
        dz, scale = config.alpha * g, fixed
    m = momentum(xp.zeros_like(dz) if m_prev is None else m_prev, dz, config.beta)
    return SGUStep(z - m, m, scale)

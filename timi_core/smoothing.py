"""Spatial-stabilized Regularization (SR, Sec. 4.2): Eq.5, a separable Gaussian filter."""

from __future__ import annotations

import math

import numpy as np

from ._backend import array_namespace, device

__all__ = ["gaussian_kernel1d", "gaussian_smooth"]

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian taps of radius ``int(truncate * sigma + 0.5)`` (SciPy's kernel)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / sigma) ** 2)
    return phi / phi.sum()


def _reflect_indices(n: int, radius: int) -> np.ndarray:
    """Indices of ``range(-radius, n + radius)`` folded into [0, n) with SciPy's 'reflect' rule
    (half-sample symmetric: ``d c b a | a b c d | d c b a``), repeated for radius > n."""
    i = np.arange(-radius, n + radius) % (2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def gaussian_smooth(g, sigma, axes):
    """Eq.5: ``g_reg = K_sigma * g``, a Gaussian of standard deviation ``sigma`` along ``axes``.

    Equal to ``scipy.ndimage.gaussian_filter(g, sigma, axes=axes, mode='reflect', truncate=4.0)``:
    one 1-D pass per axis (the isotropic 3-D kernel of the paper is separable). Pure array-API
    code (gather + weighted sum), so it is differentiable and traceable under ``jax.jit``.
    ``sigma == 0`` returns ``g`` unchanged, as SciPy does.
    """
    xp = array_namespace(g)
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"gaussian_smooth: sigma={sigma!r} must be a finite number >= 0.")
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    norm_axes = []
    for a in axes:
        if not -g.ndim <= a < g.ndim:
            raise ValueError(f"gaussian_smooth: axis {a} is out of range for an array of shape {g.shape}.")
        norm_axes.append(a % g.ndim)
    if len(set(norm_axes)) != len(norm_axes):
        raise ValueError(f"gaussian_smooth: repeated axes {axes}.")
    if sigma <= 1e-15 or not norm_axes:
        return g
    taps = gaussian_kernel1d(sigma)
    radius = (taps.size - 1) // 2
    dev = device(g)
    for axis in norm_axes:
        n = g.shape[axis]
        idx = xp.asarray(_reflect_indices(n, radius), dtype=xp.int32, device=dev)
        padded = xp.take(g, idx, axis=axis)
        out = None
        for j, w in enumerate(taps):
            sl = [slice(None)] * g.ndim
            sl[axis] = slice(j, j + n)
            term = padded[tuple(sl)] * float(w)
            out = term if out is None else out + term
        g = out
    return g

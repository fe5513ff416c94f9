"""Spatial-stabilized Regularization (SR, Sec. 4.2): Eq.5, a Gaussian filter of dL/dz.

Two forms: :func:`gaussian_smooth` filters along array axes (the paper's 3-D convolution over a
``C x D x H x W`` grid; on hy3dgen's (B, L, C) token latents it can only run along the token axis,
whose neighbours are unrelated tokens), and :func:`gaussian_smooth_points` filters over the tokens'
positions in space (neighbours by distance, not by index), for token latents whose positions are
known (``TIMIConfig.smoothing="positions"``).
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import array_namespace, device, stop_gradient

__all__ = ["gaussian_kernel1d", "gaussian_smooth", "gaussian_smooth_points", "nearest_neighbour_spacing"]

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


def _squared_distances(positions, xp):
    """(B, L, L) squared distances between the points of each sample."""
    diff = positions[:, :, None, :] - positions[:, None, :, :]
    return xp.sum(diff * diff, axis=-1)


def _median_nearest(d2, xp):
    """(B,) median over points of the distance to the nearest other point, from (B, L, L) ``d2``."""
    b, n = d2.shape[0], d2.shape[1]
    if n < 2:
        return xp.zeros((b,), dtype=d2.dtype, device=device(d2))
    eye = xp.eye(n, dtype=xp.bool, device=device(d2))
    d2 = xp.where(eye[None, :, :], xp.asarray(float("inf"), dtype=d2.dtype, device=device(d2)), d2)
    nearest = xp.sort(xp.sqrt(xp.min(d2, axis=-1)), axis=-1)
    lo, hi = (n - 1) // 2, n // 2
    return 0.5 * (nearest[:, lo] + nearest[:, hi])


def nearest_neighbour_spacing(positions):
    """Per sample, the median over points of the distance to the nearest other point: (B,) from
    (B, L, D) ``positions``. On a regular grid it is the grid spacing. 0 where all points coincide
    or a sample has a single point."""
    xp = array_namespace(positions)
    return _median_nearest(_squared_distances(positions, xp), xp)


def gaussian_smooth_points(g, positions, sigma, truncate: float = TRUNCATE):
    """Eq.5 over token positions: ``g_reg[v] = sum_u K(|p_u - p_v|) g[u] / sum_u K(|p_u - p_v|)``.

    ``g``: (B, L, C); ``positions``: (B, L, D), each token's place in space (D = 3 for a shape).
    ``K`` is a Gaussian of standard deviation ``sigma * h``, cut off beyond ``(r + 0.5) * h`` with
    ``r = int(truncate * sigma + 0.5)`` (SciPy's radius, plus half a cell so that rounding never drops
    a grid neighbour at distance ``r``), where ``h`` is each sample's :func:`nearest_neighbour_spacing`.
    So ``sigma`` counts grid cells, as in the paper's Eq.5 on a latent grid: on tokens that sit on
    a regular grid the result equals ``scipy.ndimage.gaussian_filter`` along it away from its
    borders (where the kernel is renormalised instead of reflected), and it does not change when
    the positions are scaled, shifted or the tokens permuted. ``sigma == 0`` returns ``g``.
    The positions are constants (no gradient flows into them).
    """
    xp = array_namespace(g, positions)
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"gaussian_smooth_points: sigma={sigma!r} must be a finite number >= 0.")
    if g.ndim != 3 or positions.ndim != 3 or positions.shape[:2] != g.shape[:2]:
        raise ValueError(f"gaussian_smooth_points: expected g (B, L, C) and positions (B, L, D) with the same B "
                         f"and L, got {tuple(g.shape)} and {tuple(positions.shape)}.")
    if sigma <= 1e-15:
        return g
    d2 = _squared_distances(xp.astype(stop_gradient(positions), g.dtype), xp)
    h = _median_nearest(d2, xp)                            # the samples' nearest_neighbour_spacing
    h = xp.where(h > 0, h, xp.ones_like(h))[:, None, None]
    d2 = d2 / (h * h)                                      # squared distance in units of h
    cut = int(truncate * sigma + 0.5) + 0.5    # half a cell past SciPy's radius: rounding never drops a neighbour
    w = xp.exp(-0.5 * d2 / (sigma * sigma))
    w = xp.where(d2 <= cut * cut, w, xp.zeros_like(w))
    return xp.matmul(w, g) / xp.sum(w, axis=-1, keepdims=True)

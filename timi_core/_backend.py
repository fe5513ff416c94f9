"""Small helpers over the array API: namespace lookup, gradient stop, float casting.

``timi_core`` never imports a framework. Where an operation is outside the array API standard
(stopping a gradient), the array's own framework is reached through the array itself or through
``sys.modules`` (already imported, since the caller holds one of its arrays).
"""

from __future__ import annotations

import sys

from array_api_compat import (
    array_namespace,
    device,
    is_jax_array,
    is_torch_array,
)

__all__ = ["array_namespace", "device", "stop_gradient", "as_float"]


def stop_gradient(x):
    """Return ``x`` treated as a constant by automatic differentiation (identity on values)."""
    if is_torch_array(x):
        return x.detach()
    if is_jax_array(x):
        return sys.modules["jax"].lax.stop_gradient(x)
    return x  # NumPy and array-api-strict have no autodiff


def as_float(x, xp=None):
    """Cast integer/bool arrays to the backend's default real floating dtype; floats pass through."""
    xp = array_namespace(x) if xp is None else xp
    if xp.isdtype(x.dtype, "real floating"):
        return x
    return xp.astype(x, xp.float32)

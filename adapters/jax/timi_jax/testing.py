"""Test helpers: a Flax Hunyuan3DDiT with random weights, without building it twice."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .modeling import Hunyuan3DDiT

__all__ = ["random_model"]


def random_model(seed: int = 0, scale: float = 0.3, **hy3dgen_kwargs) -> Hunyuan3DDiT:
    """``Hunyuan3DDiT(**hy3dgen_kwargs)`` whose every parameter is ``scale * N(0, 1)`` (float32),
    drawn from ``numpy.random.default_rng(seed)`` in the model's flat-state order."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Hunyuan3DDiT(**hy3dgen_kwargs)))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, nnx.from_flat_state({
        path: jnp.asarray(scale * rng.standard_normal(v.get_value().shape), jnp.float32)
        for path, v in nnx.to_flat_state(state)}))

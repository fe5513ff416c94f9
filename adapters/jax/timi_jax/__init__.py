"""TIMI for JAX: a Flax Hunyuan3D-DiT that loads hy3dgen weights, with a jitted TIMI sampler."""

from .modeling import Hunyuan3DDiT
from .params import from_checkpoint, from_torch

__all__ = ["Hunyuan3DDiT", "from_torch", "from_checkpoint"]

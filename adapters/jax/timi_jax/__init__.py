"""TIMI for JAX: a Flax Hunyuan3D-DiT that loads hy3dgen weights, with a jitted TIMI sampler.

Public surface: :class:`Hunyuan3DDiT` (hy3dgen's constructor), :func:`from_torch` /
:func:`from_checkpoint` (hy3dgen weights), :func:`sample` (hy3dgen's flow-matching Euler + CFG
schedule with TIMI guidance, one compiled program, optional data-parallel ``mesh``),
:func:`separation_loss_and_grad` (``L_sep`` and ``dL_sep/dz``), :func:`data_parallel_mesh`, and
:class:`TIMIPipelineJAX` (hy3dgen's torch preprocessing/conditioner/VAE around the JAX loop).
"""

from timi_core import TIMIConfig

from .modeling import Hunyuan3DDiT
from .params import from_checkpoint, from_torch
from .pipeline import TIMIPipelineJAX
from .sampler import (SampleOutput, data_parallel_mesh, flow_matching_schedule, sample,
                      separation_loss_and_grad)

__all__ = ["Hunyuan3DDiT", "from_torch", "from_checkpoint", "sample", "SampleOutput",
           "separation_loss_and_grad", "flow_matching_schedule", "data_parallel_mesh",
           "TIMIPipelineJAX", "TIMIConfig"]

"""TIMI for JAX: a Flax Hunyuan3D-DiT that loads hy3dgen weights, with a jitted TIMI sampler.

Laid out as jax-ml/bonsai lays out a model: :mod:`timi_jax.modeling` (the network,
:class:`Hunyuan3DDiT`, and its frozen :class:`ModelConfig` with named :data:`PRESETS` ``"v2.0"``,
``"mini"`` and ``"testbed"``), :mod:`timi_jax.params` (the torch -> Flax key table and loading:
:func:`from_torch`, :func:`from_checkpoint`), :mod:`timi_jax.sampler` (:func:`sample`: hy3dgen's
flow-matching Euler + CFG schedule, or turbo's consistency schedule
(:func:`consistency_schedule`), with TIMI guidance, one compiled program, optional
data-parallel ``mesh``; :func:`separation_loss_and_grad`; :func:`data_parallel_mesh`) and
:mod:`timi_jax.pipeline` (:class:`TIMIPipelineJAX`: hy3dgen's torch preprocessing, conditioner and
VAE around the JAX loop, returning a :class:`TIMIPipelineOutput` like ``timi_torch.TIMIPipeline``).
"""

from timi_core import StepDiagnostics, TIMIConfig, TIMIPipelineOutput

from .modeling import PRESETS, Hunyuan3DDiT, ModelConfig
from .params import from_checkpoint, from_torch
from .pipeline import TIMIPipelineJAX
from .sampler import (SampleOutput, consistency_schedule, data_parallel_mesh, flow_matching_schedule, sample,
                      separation_loss_and_grad)

__all__ = ["Hunyuan3DDiT", "ModelConfig", "PRESETS", "from_torch", "from_checkpoint", "sample", "SampleOutput",
           "separation_loss_and_grad", "flow_matching_schedule", "consistency_schedule", "data_parallel_mesh",
           "TIMIPipelineJAX", "TIMIPipelineOutput", "StepDiagnostics", "TIMIConfig"]

"""Hunyuan3D 2.1's DiT in Flax NNX: :mod:`.modeling` (the network, :class:`HunYuanDiTPlain`) and
:mod:`.params` (the torch -> Flax key table, :func:`from_torch`, :func:`from_checkpoint`). TIMI
sampling on it is :func:`timi_jax.sample` / :class:`timi_jax.TIMIPipelineJAX`, as on 2.0: the model
supplies the guidance pass (:meth:`HunYuanDiTPlain.instance_probabilities`; ``docs/hunyuan21.md``)."""

from .modeling import PRESETS, DiT21Config, HunYuanDiTPlain
from .params import from_checkpoint, from_torch

__all__ = ["HunYuanDiTPlain", "DiT21Config", "PRESETS", "from_torch", "from_checkpoint"]

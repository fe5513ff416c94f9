"""Hunyuan3D 2.1's DiT in Flax NNX: :mod:`.modeling` (the network, :class:`HunYuanDiTPlain`) and
:mod:`.params` (the torch -> Flax key table, :func:`from_torch`, :func:`from_checkpoint`). The
network only: TIMI sampling on 2.1 runs on the torch backend (``docs/hunyuan21.md``)."""

from .modeling import PRESETS, DiT21Config, HunYuanDiTPlain
from .params import from_checkpoint, from_torch

__all__ = ["HunYuanDiTPlain", "DiT21Config", "PRESETS", "from_torch", "from_checkpoint"]

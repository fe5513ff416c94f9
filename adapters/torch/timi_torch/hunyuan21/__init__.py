"""Hunyuan3D 2.1 (``hunyuan3d-dit-v2-1``): its cross-attention DiT in PyTorch and its model folders.

* :mod:`.modeling`: :class:`HunYuanDiTPlain` (upstream's keywords, forward and state-dict keys),
  :class:`DiT21Config` and :data:`PRESETS` (``"2.1"``, ``"2.1-tiny"``);
* :mod:`.params`: reading 2.1 checkpoints, building hy3dgen's pipeline around the DiT
  (:func:`build_pipeline`);
* :mod:`.testing`: tiny 2.1-format model folders (:func:`write_tiny_model_dir`).

TIMI runs on it through ``timi_torch.TIMIPipeline`` (Eq.2 on the first cross-attention layers);
see ``docs/hunyuan21.md``.
"""

from .modeling import PRESETS, DiT21Config, HunYuanDiTPlain
from .params import FAMILY, SUBFOLDER, build_pipeline, is_hunyuan21, read_checkpoint

__all__ = ["HunYuanDiTPlain", "DiT21Config", "PRESETS", "build_pipeline", "is_hunyuan21", "read_checkpoint",
           "FAMILY", "SUBFOLDER"]

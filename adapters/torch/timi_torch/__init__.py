"""TIMI for PyTorch: guidance inside hy3dgen's Hunyuan3D-DiT flow-matching pipeline.

Public surface: :class:`TIMIPipeline` (sampling), :func:`condition_token_masks` (instance masks ->
condition-token masks, Eq.2's ``M``) and :func:`write_tiny_model_dir` (tiny test models).
"""

from timi_core import TIMIConfig

from .masks import ConditionMasks, condition_token_masks
from .pipeline import ModelLoadError, StepDiagnostics, TIMIPipeline
from .testing import write_tiny_model_dir

__all__ = ["TIMIPipeline", "TIMIConfig", "StepDiagnostics", "ModelLoadError", "condition_token_masks", "ConditionMasks",
           "write_tiny_model_dir"]

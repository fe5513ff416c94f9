"""TIMI for PyTorch: guidance inside hy3dgen's Hunyuan3D-DiT flow-matching pipeline.

Public surface: :class:`TIMIPipeline` (sampling; a call returns a :class:`TIMIPipelineOutput`),
:func:`condition_token_masks` (instance masks -> condition-token masks, Eq.2's ``M``),
:mod:`timi_torch.frontend` (the image -> condition -> ... -> mesh stages every backend shares) and
:func:`write_tiny_model_dir` (tiny test models).
"""

from timi_core import StepDiagnostics, TIMIConfig, TIMIPipelineOutput

from .frontend import PreparedInputs, export_meshes, prepare_inputs
from .masks import ConditionMasks, condition_token_masks
from .pipeline import ModelLoadError, TIMIPipeline
from .testing import write_tiny_model_dir

__all__ = ["TIMIPipeline", "TIMIPipelineOutput", "TIMIConfig", "StepDiagnostics", "ModelLoadError",
           "condition_token_masks", "ConditionMasks", "PreparedInputs", "prepare_inputs", "export_meshes",
           "write_tiny_model_dir"]

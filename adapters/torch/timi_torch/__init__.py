"""TIMI for PyTorch: guidance inside hy3dgen's Hunyuan3D-DiT flow-matching pipeline.

Public surface: :class:`TIMIPipeline` (sampling; a call returns a :class:`TIMIPipelineOutput`),
:func:`condition_token_masks` (instance masks -> condition-token masks, Eq.2's ``M``; a
:class:`MultiViewConditionMasks` for ``{view: image}`` input to Hunyuan3D-2mv),
:mod:`timi_torch.frontend` (the image -> condition -> ... -> mesh stages every backend shares) and
:func:`write_tiny_model_dir` / :func:`write_tiny_vae_dir` (tiny test models of every variant of the
Hunyuan3D-2 family, ``timi_torch.testing.VARIANTS``).
"""

from timi_core import StepDiagnostics, TIMIConfig, TIMIPipelineOutput

from .frontend import PreparedInputs, export_meshes, prepare_inputs
from .masks import ConditionMasks, MultiViewConditionMasks, condition_token_masks
from .pipeline import ModelLoadError, TIMIPipeline
from .testing import write_tiny_model_dir, write_tiny_vae_dir

__all__ = ["TIMIPipeline", "TIMIPipelineOutput", "TIMIConfig", "StepDiagnostics", "ModelLoadError",
           "condition_token_masks", "ConditionMasks", "MultiViewConditionMasks", "PreparedInputs", "prepare_inputs",
           "export_meshes", "write_tiny_model_dir", "write_tiny_vae_dir"]

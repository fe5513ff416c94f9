"""TRELLIS stage 1 (microsoft/TRELLIS): the sparse-structure flow transformer TIMI guides on its grid latent.

* :mod:`.modeling`: :class:`SparseStructureFlowModel`, :class:`SparseStructureDecoder` (upstream's
  keywords, forward and state-dict keys), :class:`FlowConfig` / :class:`DecoderConfig` and presets;
* :mod:`.sampler`: upstream's stage-1 Euler flow sampler (:func:`sample`) with TIMI on the grid
  latent (Eq.5 a 3-D Gaussian over D, H, W);
* :mod:`.params`: upstream's checkpoint layout (``<stem>.json`` + ``<stem>.safetensors``,
  ``pipeline.json``): :func:`load_model`, :func:`save_model`, :func:`load_stage1`;
* :mod:`.upstream`: :func:`guide`, TIMI inside an installed upstream ``TrellisImageTo3DPipeline``;
  :func:`condition_token_masks` (masks in upstream's crop, on the 37 x 37 DINOv2 patch grid);
* :mod:`.decoding`: occupancy and a mesh from the decoder's logits.

See ``docs/trellis.md``.
"""

from .decoding import occupancy_mesh
from .modeling import (DECODER_PRESETS, FLOW_PRESETS, DecoderConfig, FlowConfig, SparseStructureDecoder,
                       SparseStructureFlowModel)
from .params import load_model, load_stage1, save_model, write_pipeline_json
from .upstream import as_rgba_input, condition_token_masks, guide
from .sampler import SamplerSettings, StageOneOutput, flow_times, sample

__all__ = ["SparseStructureFlowModel", "SparseStructureDecoder", "FlowConfig", "DecoderConfig", "FLOW_PRESETS",
           "DECODER_PRESETS", "SamplerSettings", "StageOneOutput", "flow_times", "sample", "load_model", "save_model",
           "load_stage1", "write_pipeline_json", "guide", "condition_token_masks", "as_rgba_input", "occupancy_mesh"]

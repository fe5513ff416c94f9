"""TRELLIS stage 1 (microsoft/TRELLIS): the sparse-structure flow transformer TIMI guides on its grid latent.

* :mod:`.modeling`: :class:`SparseStructureFlowModel`, :class:`SparseStructureDecoder` (upstream's
  keywords, forward and state-dict keys), :class:`FlowConfig` / :class:`DecoderConfig` and presets.

See ``docs/trellis.md``.
"""

from .modeling import (DECODER_PRESETS, FLOW_PRESETS, DecoderConfig, FlowConfig, SparseStructureDecoder,
                       SparseStructureFlowModel)

__all__ = ["SparseStructureFlowModel", "SparseStructureDecoder", "FlowConfig", "DecoderConfig", "FLOW_PRESETS",
           "DECODER_PRESETS"]

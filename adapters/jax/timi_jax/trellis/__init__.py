"""TRELLIS stage 1 in Flax NNX: :mod:`.modeling` (the flow transformer,
:class:`SparseStructureFlowModel`, upstream's keywords via :class:`FlowConfig`), :mod:`.params` (the
torch -> Flax key table, :func:`from_torch`, :func:`from_checkpoint`) and :mod:`.sampler`
(:func:`sample`: upstream's Euler flow sampler with CFG interval and TIMI on the grid latent, one
compiled program). The occupancy decoder and stage 2 stay in PyTorch (``timi_torch.trellis``);
see ``docs/jax.md``."""

from .modeling import FLOW_PRESETS, FlowConfig, SparseStructureFlowModel
from .params import from_checkpoint, from_torch
from .pipeline import TrellisPipelineJAX
from .sampler import SamplerSettings, flow_times, sample

__all__ = ["SparseStructureFlowModel", "FlowConfig", "FLOW_PRESETS", "from_torch", "from_checkpoint", "sample",
           "SamplerSettings", "flow_times", "TrellisPipelineJAX"]

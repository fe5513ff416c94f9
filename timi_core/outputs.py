"""What a TIMI pipeline call returns, the same on every backend (in the manner of diffusers'
``...PipelineOutput``). Plain dataclasses: no framework is imported here."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

__all__ = ["StepDiagnostics", "TIMIPipelineOutput"]


@dataclasses.dataclass(frozen=True)
class StepDiagnostics:
    """What one guided step did, per sample of the batch (lists of length B).

    ``loss``: L_sep (Eq.4, mean over the guided layers) before the update; ``scale``: the step
    size lambda (Eq.6 with GM, else alpha); ``max_update``: max |z_new - z| of the step (Eq.7),
    what the float32 latent actually moved (guided runs carry the latent in float32).

    The decomposition of the update (:func:`timi_core.common_share`): the share of the norm that
    is common to all tokens (the per-channel mean over the tokens) in ``common_gradient`` (the raw
    ``dL/dz``), ``common_smoothed`` (after Eq.5) and ``common_update`` (the applied step
    ``z_new - z``, Eq.7); ``None`` where a backend does not record them.
    """

    step: int
    timestep: float
    loss: list[float]
    scale: list[float]
    max_update: list[float]
    common_gradient: Optional[list[float]] = None
    common_smoothed: Optional[list[float]] = None
    common_update: Optional[list[float]] = None


@dataclasses.dataclass(frozen=True)
class TIMIPipelineOutput:
    """One pipeline call's results.

    ``meshes``: one mesh per image (``trimesh.Trimesh`` for ``output_type="trimesh"``, hy3dgen's
    raw outputs for ``"mesh"``), ``None`` for ``output_type="latent"``; ``latents``: the final
    (B, L, C) latents in the model's dtype (a torch tensor, as hy3dgen returns them);
    ``diagnostics``: one :class:`StepDiagnostics` per guided step; ``recordings``: what a
    recorder passed to the call observed (e.g. ``timi.report.AttentionRecorder``'s per layer and
    step instance maps), ``None`` when none was passed.
    """

    meshes: Optional[list]
    latents: Any
    diagnostics: list[StepDiagnostics]
    recordings: Optional[list] = None

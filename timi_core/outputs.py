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
    """

    step: int
    timestep: float
    loss: list[float]
    scale: list[float]
    max_update: list[float]


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

"""A control for the direction of TIMI's update (issue 12): the gradient's token rows shuffled.

``ShuffledGradient`` is a ``TIMIPipeline`` gradient hook: at every guided step it permutes the
token axis of ``dL_sep/dz`` with a seeded random permutation, then SGU (Eqs.5-7) runs unchanged.
The update keeps everything but its link to the tokens: the same rows (so the same norms, peak,
common shift and, through Eq.6, the same step size), given to random tokens. If TIMI's effect on a
model equals the shuffled control's, it comes from perturbing the trajectory, not from the
instance-aware direction of Eq.4.

``timi testbed control DATA`` evaluates base, TIMI and the control on the same scenes and seed, with
``timi eval``'s generator, metric settings and cache (so base and TIMI come from an earlier
``timi eval`` with the same options in the same ``--out``).
"""

from __future__ import annotations

import copy

import torch

from timi.evaluation.generators import TIMITorchGenerator

CONTROL_LABEL = "TIMI, gradient rows shuffled (control)"


class ShuffledGradient:
    """``gradient_hook(grad, step)``: ``grad[:, perm]`` with a fresh seeded permutation per step."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        perm = torch.randperm(grad.shape[1], generator=self.generator).to(grad.device)
        return grad[:, perm]


class ShuffledGradientGenerator(TIMITorchGenerator):
    """``timi eval``'s torch generator with :class:`ShuffledGradient` (seeded by the sampling seed)."""

    @property
    def identity(self) -> dict:
        return {**super().identity, "control": "shuffled-gradient-rows"}

    def pipeline_for(self, seed: int):
        """A shallow copy of the shared pipeline whose gradient hook is seeded by the sampling seed."""
        pipe = copy.copy(self.pipeline())
        pipe.gradient_hook = ShuffledGradient(seed)
        return pipe

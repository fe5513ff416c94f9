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


def control_label(name: str) -> str:
    """The table row of variant ``name``'s shuffled-gradient control."""
    return f"{name} (control)"


def parse_variants(specs) -> dict:
    """``["NAME=FIELD=VALUE[,FIELD=VALUE]", ...]`` -> ``{NAME: TIMIConfig}``, each over the paper's
    form (:meth:`TIMIConfig.paper`); ``"paper="`` is the paper's form itself. Raises ``ValueError``
    naming the bad spec."""
    from timi.evaluation.cli import config_from_settings
    from timi_core import TIMIConfig

    variants = {}
    for spec in specs:
        name, sep, fields = spec.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--variant {spec!r}: use NAME=FIELD=VALUE[,FIELD=VALUE] (e.g. 'common removed="
                             "common=remove'; 'paper=' for the paper's form).")
        try:
            variants[name.strip()] = config_from_settings([f for f in fields.split(",") if f.strip()],
                                                          TIMIConfig.paper())
        except ValueError as e:
            raise ValueError(f"--variant {spec!r}: {e}") from None
    return variants


def variant_control_markdown(summaries) -> str:
    """Paired tables, each variant - its control: ordinary and matched-size scores."""
    from timi.evaluation.paired import LEVEL, paired_table

    by_label = {s.run.label: s for s in summaries}
    pairs = [(by_label[s.run.label], by_label[control_label(s.run.label)]) for s in summaries
             if s.run.group == "variants" and control_label(s.run.label) in by_label]
    return "\n\n".join(paired_table([v], c, f"{v.run.label} - its control{where} (paired, {LEVEL:.0%} bootstrap "
                                      "interval)", against="control", size=size)
                         for v, c in pairs for size, where in (("own", ""), ("matched", ", at matched size")))


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

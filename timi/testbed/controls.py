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


#: The rule that chooses the default (docs/results.md, written before the variants were scored):
#: area / base (geometric mean) at least this, FS-S - base at least this, then the largest
#: matched-size SSR gain over the variant's own control, > 0, with matched-size SSR - base > 0.
RULE_MIN_AREA_RATIO = 0.95
RULE_MIN_FS_S_CHANGE = -0.01


def default_rule(summaries) -> tuple[list[dict], str | None]:
    """Apply the rule above to ``timi testbed variants`` summaries: one row per variant (area ratio,
    FS-S - base, matched SSR - base, matched SSR - control, whether it keeps the shapes and whether
    it qualifies) and the chosen variant's label (``None``: no variant qualifies, the paper's form stays)."""
    from timi.evaluation.paired import paired_differences
    from timi.evaluation.report import geometric_mean_interval, size_ratios

    by_label = {s.run.label: s for s in summaries}
    base = next(s for s in summaries if not s.run.config.enabled)
    rows = []
    for s in summaries:
        if s.run.group != "variants":
            continue
        area = geometric_mean_interval(size_ratios(s, "area").values())[0]
        fs_s = {d.metric: d for d in paired_differences(s, base)}["fs_s"].mean
        ssr_base = {d.metric: d for d in paired_differences(s, base, "matched")}["ssr"].mean
        control = by_label.get(control_label(s.run.label))
        ssr_control = ({d.metric: d for d in paired_differences(s, control, "matched")}["ssr"].mean
                       if control is not None else float("nan"))
        keeps = area >= RULE_MIN_AREA_RATIO and fs_s >= RULE_MIN_FS_S_CHANGE
        rows.append(dict(variant=s.run.label, area=area, fs_s=fs_s, ssr_matched_base=ssr_base,
                         ssr_matched_control=ssr_control, keeps_shapes=keeps,
                         qualifies=bool(keeps and ssr_control > 0 and ssr_base > 0)))
    chosen = max((r for r in rows if r["qualifies"]), key=lambda r: r["ssr_matched_control"], default=None)
    return rows, None if chosen is None else chosen["variant"]


def default_rule_markdown(summaries) -> str:
    """The rule's table and its verdict (docs/results.md, issue 27)."""
    rows, chosen = default_rule(summaries)
    if not rows:
        return ""
    lines = ["## The rule that chooses the default\n",
             f"Keeps the shapes: area / base >= {RULE_MIN_AREA_RATIO} and FS-S - base >= {RULE_MIN_FS_S_CHANGE}; "
             "qualifies: also SSR at matched size above its control's and above the base's (means over the pairs).\n",
             "| variant | area / base | FS-S - base | SSR - base, matched | SSR - control, matched | keeps the shapes | qualifies |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['area']:.3f} | {r['fs_s']:+.4f} | {r['ssr_matched_base']:+.4f} | "
                     f"{r['ssr_matched_control']:+.4f} | {'yes' if r['keeps_shapes'] else 'no'} | "
                     f"{'yes' if r['qualifies'] else 'no'} |")
    lines.append("\n" + (f"Chosen: **{chosen}** (the largest matched-size SSR gain over its control among those that "
                         "qualify)." if chosen else "No variant qualifies on these scenes."))
    lines.append("The rule chooses the default on the validation split (where no variant qualifies there, the "
                 "paper's form stays the default); on other scenes its table checks that choice.")
    return "\n".join(lines) + "\n"


class ShuffledGradient:
    """``gradient_hook(grad, step)``: ``grad[:, perm]`` with a fresh seeded permutation per step (token
    latents (B, L, C)); on a grid latent (B, C, D, H, W, TRELLIS) the voxels are permuted, each
    voxel's channel vector moving whole, the grid's analogue of a token row."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        if grad.ndim == 5:
            flat = grad.flatten(2)
            perm = torch.randperm(flat.shape[2], generator=self.generator).to(grad.device)
            return flat[:, :, perm].reshape(grad.shape)
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

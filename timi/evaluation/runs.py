"""What to evaluate: the TIMI configurations of Table 1 and the ablations of Tables 2-7.

A *run* is a labelled :class:`timi_core.TIMIConfig`. ``--ablation NAME`` adds the rows of one of
the paper's ablation tables; ``--sweep FIELD=v1,v2`` varies one ``TIMIConfig`` field (one field
per flag, the others at their base value; several flags are swept one after the other, not as a
grid).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from timi_core import TIMIConfig

BASELINE_LABEL = "base model (no TIMI)"
TIMI_LABEL = "TIMI"


@dataclass(frozen=True)
class Run:
    """One evaluated configuration: ``label`` (a table row), ``config``, and the swept value if any."""

    label: str
    config: TIMIConfig
    group: str = "main"
    param: str | None = None
    value: float | int | bool | None = None
    generator: object = field(default=None, compare=False, hash=False, repr=False)
    """This row's own generator (e.g. another method's predictions); ``None``: the evaluator's."""


#: Paper table -> (group name, rows as (label, TIMIConfig changes)).
ABLATIONS: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "components": ("Table 2: ISG / SGU", [
        ("w/o ISG, w/o SGU", {"isg": False, "sgu": False}),
        ("w/ ISG, w/o SGU", {"sgu": False}),
        ("w/ ISG, w/ SGU", {}),
    ]),
    "layers": ("Table 3: guided layers l", [(f"l={v}", {"guided_layers": v}) for v in (1, 2, 3, 4, 5, 8)]),
    "steps": ("Table 4: guided steps t", [(f"t={v}", {"guided_steps": v}) for v in (5, 10, 15, 20, 25)]),
    # The paper's Table 5 row "w/o GM, w/o SR" equals Table 2's "w/ ISG, w/o SGU" number for number:
    # one configuration (sgu=False, the raw step alpha * dL/dz).
    "sgu-parts": ("Table 5: GM / SR", [
        ("w/o GM, w/o SR", {"sgu": False}),
        ("w/ GM, w/o SR", {"sr": False}),
        ("w/ GM, w/ SR", {}),
    ]),
    "alpha": ("Table 6: alpha", [(f"alpha={v}", {"alpha": v}) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]),
    "sigma": ("Table 7: sigma", [(f"sigma={v}", {"sigma": v}) for v in (0.5, 1.0, 1.5, 2.0, 2.5)]),
}
ALIASES = {"table2": "components", "table3": "layers", "table4": "steps", "table5": "sgu-parts",
           "table6": "alpha", "table7": "sigma", "isg-sgu": "components", "gm-sr": "sgu-parts",
           "l": "layers", "t": "steps"}
SWEEPABLE = tuple(f.name for f in dataclasses.fields(TIMIConfig))
#: Each field's annotation (``guided_steps: Optional[int]`` defaults to None: still an integer sweep).
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TIMIConfig)}


def ablation_runs(name: str, base: TIMIConfig = TIMIConfig()) -> list[Run]:
    """Rows of the ablation ``name`` (see :data:`ABLATIONS`; ``table2`` .. ``table7`` also work)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ABLATIONS:
        names = sorted(set(ABLATIONS) | set(ALIASES))
        raise ValueError(f"unknown ablation {name!r}; use one of {', '.join(names)}.")
    group, rows = ABLATIONS[key]
    runs = []
    for label, changes in rows:
        numeric = key in ("layers", "steps", "alpha", "sigma")
        param, value = next(iter(changes.items())) if numeric else (None, None)
        runs.append(Run(label, base.replace(**changes), group=group, param=param, value=value))
    return runs


def _parse_value(field_name: str, text: str, default):
    text = text.strip()
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "on", "yes"):
            return True
        if text.lower() in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"--sweep {field_name}: {text!r} is not a boolean (use true/false).")
    if isinstance(default, str):
        return text
    integer = isinstance(default, int) or (default is None and "int" in str(_FIELD_TYPES.get(field_name, "")))
    try:
        return int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"--sweep {field_name}: {text!r} is not {kind}.") from None


def sweep_runs(spec: str, base: TIMIConfig = TIMIConfig()) -> list[Run]:
    """``"alpha=0.1,0.2"`` -> one run per value of that ``TIMIConfig`` field (validated)."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values.strip():
        raise ValueError(f"--sweep {spec!r}: use FIELD=v1,v2,... (e.g. alpha=0.1,0.2).")
    if name not in SWEEPABLE:
        raise ValueError(f"--sweep {spec!r}: {name!r} is not a TIMIConfig field; use one of {', '.join(SWEEPABLE)}.")
    default = getattr(base, name)
    runs = []
    for text in values.split(","):
        value = _parse_value(name, text, default)
        runs.append(Run(f"{name}={value}", base.replace(**{name: value}), group=f"sweep: {name}",
                        param=name, value=value))
    return runs


def plan_runs(*, no_timi: bool = False, with_baseline: bool = False, ablations: list[str] = (),
              sweeps: list[str] = (), base: TIMIConfig = TIMIConfig()) -> list[Run]:
    """The runs of one ``timi eval`` call. Without ablations or sweeps: TIMI (or only the baseline
    with ``no_timi``), plus the baseline row with ``with_baseline``."""
    baseline = Run(BASELINE_LABEL, base.replace(isg=False), group="main")
    runs: list[Run] = []
    if no_timi:
        runs.append(baseline)
    elif with_baseline:
        runs.append(baseline)
    if not no_timi and not ablations and not sweeps:
        runs.append(Run(TIMI_LABEL, base, group="main"))
    for name in ablations:
        runs += ablation_runs(name, base)
    for spec in sweeps:
        runs += sweep_runs(spec, base)
    unique: dict[str, Run] = {}
    for run in runs:  # e.g. --ablation alpha --sweep alpha=0.1: the same row twice
        if run.label in unique and unique[run.label].config != run.config:
            run = dataclasses.replace(run, label=f"{run.label} ({run.group})")
        unique.setdefault(run.label, run)
    return list(unique.values())

"""Paired comparison of each run with the base model: mean difference and its bootstrap interval.

Every (scene, sampling seed) that scored in both runs is one pair; the difference ``run - base`` of
each metric is averaged over the pairs, and its 90 % interval is the percentile bootstrap of that
mean (:func:`scipy.stats.bootstrap`, 10,000 resamples of the pairs, fixed random state). An interval
that contains 0 is reported as no difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from timi.metrics import METRIC_LABELS, METRIC_NAMES

from .runner import RunSummary

LEVEL = 0.9
RESAMPLES = 10_000
#: +1: larger is better, -1: smaller is better (to say which way a significant change goes)
DIRECTION = {"lcd": -1, "cd_s": -1, "fs_s": 1, "ssr": 1, "cd_o": -1, "fs_o": 1}


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    mean: float
    low: float
    high: float
    n_pairs: int

    @property
    def verdict(self) -> str:
        if not self.low > 0 and not self.high < 0:
            return "no difference"
        better = (self.low > 0) == (DIRECTION[self.metric] > 0)
        return "better" if better else "worse"


def bootstrap_mean_interval(diffs: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(diffs)`` (``diffs``: one paired difference per pair)."""
    from scipy.stats import bootstrap

    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2 or np.all(diffs == diffs[0]):
        return float(diffs.mean()), float(diffs.mean())
    res = bootstrap((diffs,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def scores_at(summary: RunSummary, size: str = "own") -> dict:
    """``{scene id: SceneScores}`` of one run's scored pairs, at its own size (``"own"``) or at the
    base model's (``"matched"``: the matched-size scores; an unguided run is at the base size already,
    so its own scores; pairs without matched scores are left out)."""
    if size not in ("own", "matched"):
        raise ValueError(f"size={size!r}: use 'own' or 'matched'.")
    ok = [r for r in summary.results if r.status == "ok"]
    if size == "own" or not summary.run.config.enabled:
        return {r.scene_id: r.scores for r in ok}
    return {r.scene_id: r.matched for r in ok if r.matched is not None}


def paired_differences(run: RunSummary, base: RunSummary, size: str = "own") -> list[PairedDifference]:
    """``run - base`` per metric over the (scene, seed) pairs that scored in both; with
    ``size="matched"`` both at the base model's size (:func:`scores_at`)."""
    a, b = scores_at(base, size), scores_at(run, size)
    common = sorted(set(a) & set(b))
    out = []
    for m in METRIC_NAMES:
        d = np.array([getattr(b[s], m) - getattr(a[s], m) for s in common], dtype=np.float64)
        d = d[np.isfinite(d)]
        if d.size == 0:
            out.append(PairedDifference(m, float("nan"), float("nan"), float("nan"), 0))
            continue
        low, high = bootstrap_mean_interval(d)
        out.append(PairedDifference(m, float(d.mean()), low, high, int(d.size)))
    return out


def paired_table(runs: list[RunSummary], base: RunSummary, title: str, against: str = "base",
                 size: str = "own") -> str:
    """Markdown: each of ``runs`` against ``base`` (named ``against`` in the header) per metric, as
    ``mean [low, high]`` with the verdict; ``size="matched"``: at the base model's size."""
    head = [f"Run - {against}", *(METRIC_LABELS[m] for m in METRIC_NAMES), "Pairs"]
    lines = [f"## {title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in runs:
        diffs = paired_differences(s, base, size)
        cells = [f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" + ("" if d.verdict == "no difference" else
                                                                    f" **{d.verdict}**") for d in diffs]
        lines.append("| " + " | ".join([s.run.label, *cells, str(max(d.n_pairs for d in diffs))]) + " |")
    return "\n".join(lines)


def paired_markdown(summaries: list[RunSummary]) -> str:
    """One table: each run against the first unguided run (the base model), as ``mean [low, high]``."""
    base = next((s for s in summaries if not s.run.config.isg), None)
    others = [s for s in summaries if s is not base and s.run.config.isg]
    if base is None or not others:
        return ""
    table = paired_table(others, base, f"Paired differences vs {base.run.label} (mean, {LEVEL:.0%} bootstrap interval)")
    return table + ("\n\nPairs: (scene, sampling seed) that scored in both runs. **better** / **worse**: the interval "
                    "excludes 0; otherwise no difference.\n")

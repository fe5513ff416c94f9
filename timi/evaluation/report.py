"""Tables (Markdown + CSV, the layout of the paper's Table 1) and plots of metric vs swept parameter."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from timi.io import write_bytes, write_text
from timi.metrics import METRIC_LABELS, METRIC_NAMES, PART_COUNT_CLASSES, part_count_class

from .runner import RunSummary

#: Decimals per column, as printed in the paper's tables.
DECIMALS = {"lcd": 3, "cd_s": 4, "fs_s": 3, "ssr": 3, "cd_o": 4, "fs_o": 3}


def _fmt(value: float, decimals: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{decimals}f}"


#: What the time columns measure (issue 38): the paper's "Time" is the generation alone.
TIME_NOTE = ("Time: the generation per scene (the paper's \"Time\"), split into sampling (the denoising loop, "
             "TIMI's guidance included) and mesh (volume decoding and surface extraction) where the generator "
             "reports them. Scoring: what timi eval adds per scene (the metrics, and for guided runs the scene "
             "decoded again and scored at the base model's size); not part of the Time.")


def _stages(s: RunSummary) -> str:
    if not s.stage_seconds:
        return "n/a"
    return " + ".join(_fmt(s.stage_seconds[k], 1) for k in ("sampling", "mesh") if k in s.stage_seconds)


def markdown_table(summaries: list[RunSummary], title: str | None = None) -> str:
    """Table-1-style Markdown: one table per group (main, each ablation / sweep), failures listed below."""
    out = [f"# {title}\n"] if title else []
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.run.group, []).append(s)
    header = ["Run", *(METRIC_LABELS[m] for m in METRIC_NAMES), "Time ↓ (s/scene)", "Sampling + mesh (s)",
              "Scoring (s/scene)", "Scenes"]
    for group, rows in groups.items():
        out.append(f"## {group}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for s in rows:
            cells = [s.run.label, *(_fmt(s.means[m], DECIMALS[m]) for m in METRIC_NAMES),
                     _fmt(s.seconds, 1), _stages(s), _fmt(s.scoring_seconds, 1), f"{s.n_ok}/{s.n_scenes}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(TIME_NOTE + "\n")
    failures = [r for s in summaries for r in s.results if r.status != "ok"]
    if failures:
        out.append("## Skipped scenes\n")
        out.append("| Run | Scene | Status | Reason |")
        out.append("|---|---|---|---|")
        for r in failures:
            reason = (r.error or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| {r.run} | {r.scene_id} | {r.status} | {reason} |")
        out.append("")
    out.append("Means over the scenes that scored (column Scenes: scored/total). Metric conventions: "
               "docs/metrics.md.\n")
    return "\n".join(out)


def part_counts(summary: RunSummary, size: str = "own") -> dict[str, int]:
    """How many scored (scene, seed) pairs came out with fewer separate parts than instances (some
    fused), as many, or more (fragments): SSR (Eq.10) is below 1 either way, this tells which.
    ``size="matched"``: the meshes at the base model's size."""
    from .paired import scores_at

    counts = dict.fromkeys(PART_COUNT_CLASSES, 0)
    for scores in scores_at(summary, size).values():
        counts[part_count_class(scores.n_pred, scores.n_gt)] += 1
    return counts


def part_count_markdown(summaries: list[RunSummary]) -> str:
    """One row per run: shares of pairs with fewer / the right number of / more parts than instances."""
    lines = ["## Separate parts vs instances\n", "| Run | fewer (fused) | right count | more (fragments) | Pairs |",
             "|---|---|---|---|---|"]
    rows = [(s.run.label, part_counts(s)) for s in summaries]
    rows += [(f"{s.run.label}, at matched size", part_counts(s, "matched")) for s in summaries if s.run.config.enabled]
    for label, c in rows:
        n = sum(c.values())
        if n:
            lines.append(f"| {label} | " + " | ".join(f"{100 * c[k] / n:.0f} %" for k in ("fewer", "right", "more"))
                         + f" | {n} |")
    return "\n".join(lines) + "\n" if len(lines) > 3 else ""


def size_ratios(summary: RunSummary, key: str) -> dict[str, float]:
    """``{scene id: run's key / base's key}`` (``key`` = ``area`` or ``volume``) where both are > 0."""
    out = {}
    for r in summary.results:
        z = r.sizes if r.status == "ok" else None
        if z and z.get(key, 0) > 0 and z.get(f"base_{key}", 0) > 0:
            out[r.scene_id] = z[key] / z[f"base_{key}"]
    return out


def geometric_mean_interval(ratios) -> tuple[float, float, float]:
    """Geometric mean of positive ``ratios`` and its bootstrap interval (of the mean log); NaNs if none."""
    from .paired import bootstrap_mean_interval

    logs = np.log(np.asarray(list(ratios), dtype=float))
    if logs.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = bootstrap_mean_interval(logs)
    return math.exp(logs.mean()), math.exp(lo), math.exp(hi)


def _geometric(ratios) -> str:
    mean, lo, hi = geometric_mean_interval(ratios)
    return "n/a" if math.isnan(mean) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _difference(d) -> str:
    if d.n_pairs == 0 or math.isnan(d.mean):
        return "n/a"
    verdict = "" if d.verdict == "no difference" else f" **{d.verdict}**"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]{verdict}"


def size_markdown(summaries: list[RunSummary]) -> str:
    """Does a run separate instances or shrink them? Per run: surface area and volume over the base
    model's (geometric mean over the pairs, 90 % bootstrap interval on the log ratios), area over the
    ground truth's, and SSR / FS-O / CD-O against the base at the run's own size and **at matched
    size** (decoded again at the base model's surface area, :mod:`timi.evaluation.sizes`)."""
    from .paired import LEVEL, paired_differences, scores_at

    base = next((s for s in summaries if not s.run.config.enabled and s.run.generator is None), None)
    if base is None or not any(r.sizes for s in summaries for r in s.results):
        return ""
    head = ["Run", "area / base", "volume / base", "area / ground truth", "SSR - base", "**SSR - base, matched size**",
            "FS-O - base, matched", "CD-O - base, matched", "FS-S - base, matched", "matched pairs (area reached)"]
    lines = [f"## Size, and the scores at the base model's size ({LEVEL:.0%} intervals)\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        if s.run.generator is not None and not any(r.sizes for r in s.results):
            continue
        to_gt = [r.sizes["area"] / r.sizes["gt_area"] for r in s.results
                 if r.status == "ok" and r.sizes and r.sizes.get("gt_area", 0) > 0]
        gt = f"{math.exp(np.mean(np.log(to_gt))):.3f}" if to_gt else "n/a"
        if s is base:
            lines.append(f"| {s.run.label} | 1 | 1 | {gt} | 0 | 0 | 0 | 0 | 0 | |")
            continue
        own = {d.metric: d for d in paired_differences(s, base)}
        matched = {d.metric: d for d in paired_differences(s, base, "matched")}
        reached = sum(1 for r in s.results if r.status == "ok" and r.sizes and (r.sizes.get("matched") or {}).get("reached"))
        n_matched = len(scores_at(s, "matched")) if s.run.config.enabled else 0
        lines.append("| " + " | ".join([s.run.label, _geometric(size_ratios(s, "area").values()),
                                         _geometric(size_ratios(s, "volume").values()), gt, _difference(own["ssr"]),
                                         _difference(matched["ssr"]), _difference(matched["fs_o"]),
                                         _difference(matched["cd_o"]), _difference(matched["fs_s"]),
                                         f"{n_matched} ({reached})"]) + " |")
    lines.append("\nMatched size: each guided run's final latents decoded again at the iso level whose surface area "
                 "equals the base model's on the same scene and seed, then scored; a run that only shrinks every "
                 "shape gets no matched-size gain. Ratios: geometric means over the pairs.\n")
    return "\n".join(lines) + "\n"


#: summary.csv's columns after ``scenes``: the time split (seconds per scene; ``nan`` where not reported).
SPLIT_TIMES = ("sampling_seconds", "mesh_seconds", "scoring_seconds")


def summary_csv(summaries: list[RunSummary]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "run", "param", "value", *METRIC_NAMES, "seconds_per_scene", "scenes_ok", "scenes",
                *SPLIT_TIMES])
    for s in summaries:
        split = [s.stage_seconds.get("sampling", float("nan")), s.stage_seconds.get("mesh", float("nan")),
                 s.scoring_seconds]
        w.writerow([s.run.group, s.run.label, s.run.param or "", "" if s.run.value is None else s.run.value,
                    *(f"{s.means[m]:.6g}" for m in METRIC_NAMES), f"{s.seconds:.4g}", s.n_ok, s.n_scenes,
                    *(f"{v:.4g}" for v in split)])
    return buf.getvalue()


def per_scene_csv(summaries: list[RunSummary]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "scene", "status", *METRIC_NAMES, "n_pred", "n_gt", "seconds", "error", "area", "volume",
                "base_area", "gt_area", "matched_level", *(f"matched_{m}" for m in METRIC_NAMES), "matched_n_pred"])
    for s in summaries:
        for r in s.results:
            vals = [f"{getattr(r.scores, m):.6g}" for m in METRIC_NAMES] if r.scores else [""] * len(METRIC_NAMES)
            counts = [r.scores.n_pred, r.scores.n_gt] if r.scores else ["", ""]
            z = r.sizes or {}
            sizes = [f"{z[k]:.6g}" if k in z else "" for k in ("area", "volume", "base_area", "gt_area")]
            m, ms = z.get("matched") or {}, r.matched
            matched = [f"{m['level']:.6g}" if "level" in m else "",
                       *([f"{getattr(ms, k):.6g}" for k in METRIC_NAMES] + [ms.n_pred] if ms else [""] * (len(METRIC_NAMES) + 1))]
            w.writerow([r.run, r.scene_id, r.status, *vals, *counts,
                        "" if r.seconds is None else f"{r.seconds:.4g}", r.error or "", *sizes, *matched])
    return buf.getvalue()


def plot_sweeps(summaries: list[RunSummary], out_dir: Path, baseline: RunSummary | None = None) -> list[Path]:
    """One PNG per swept parameter, a panel per metric (matplotlib, Agg): a dose-response plot.

    With the baseline (no TIMI) evaluated, each panel shows the paired difference ``run - base`` over
    the (scene, seed) pairs with its 90 % bootstrap interval (:mod:`timi.evaluation.paired`) against
    the parameter's value, and 0 (no difference) as a dashed line; an interval clear of 0 is filled.
    Without it, the metric's mean per value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .paired import DIRECTION, paired_differences

    by_param: dict[str, list[RunSummary]] = {}
    for s in summaries:
        if s.run.param is not None and not isinstance(s.run.value, (bool, str)):  # numeric sweeps only
            by_param.setdefault(s.run.param, []).append(s)
    written = []
    for param, rows in by_param.items():
        rows = sorted(rows, key=lambda s: s.run.value)
        xs = [s.run.value for s in rows]
        diffs = [dict((d.metric, d) for d in paired_differences(s, baseline)) for s in rows] if baseline else None
        fig, axes = plt.subplots(2, 3, figsize=(11, 6), constrained_layout=True)
        for ax, metric in zip(axes.flat, METRIC_NAMES):
            arrow = "↑" if DIRECTION[metric] > 0 else "↓"
            if diffs is None:
                ax.plot(xs, [s.means[metric] for s in rows], "o-", color="tab:blue", label="TIMI")
                ax.set_title(METRIC_LABELS[metric])
            else:
                d = [row[metric] for row in diffs]
                mean = [x.mean for x in d]
                err = [[x.mean - x.low for x in d], [x.high - x.mean for x in d]]
                ax.errorbar(xs, mean, yerr=err, fmt="-", color="tab:blue", capsize=3, label="TIMI - base, 90 %")
                for x, di in zip(xs, d):
                    clear = di.verdict != "no difference"
                    ax.plot([x], [di.mean], "o", color="tab:blue", mfc="tab:blue" if clear else "white")
                ax.axhline(0.0, ls="--", color="tab:gray", label="no difference")
                ax.set_title(f"{METRIC_LABELS[metric]}: run - base ({arrow} better)")
            ax.set_xlabel(param)
            if min(xs) > 0 and max(xs) / min(xs) >= 10:  # e.g. alpha 0.03 ... 1.0
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        n = max(s.n_ok for s in rows)
        what = "paired difference from the base model" if diffs is not None else "means"
        fig.suptitle(f"Metrics vs {param}: {what} ({n} scene-seed pairs; filled: interval excludes 0)"
                     if diffs is not None else f"Metrics vs {param} ({n} scenes)")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        written.append(write_bytes(Path(out_dir) / f"sweep_{param}.png", buf.getvalue()))
    return written


def plot_groups(summaries: list[RunSummary], out_dir: Path) -> list[Path]:
    """One PNG of bars per group of non-numeric rows with at least two rows (e.g. Tables 2 and 5,
    or the main table's methods): the six metrics side by side."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        if s.run.param is None:
            groups.setdefault(s.run.group, []).append(s)
    written = []
    for group, rows in groups.items():
        if len(rows) < 2:
            continue
        fig, axes = plt.subplots(2, 3, figsize=(11, 6), constrained_layout=True)
        labels = [s.run.label for s in rows]
        colors = [f"C{i}" for i in range(len(rows))]
        for ax, metric in zip(axes.flat, METRIC_NAMES):
            ax.bar(range(len(rows)), [s.means[metric] for s in rows], color=colors)
            ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
            ax.set_title(METRIC_LABELS[metric])
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{group} ({max(s.n_ok for s in rows)} scenes)")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        slug = re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_") or "group"
        written.append(write_bytes(Path(out_dir) / f"group_{slug}.png", buf.getvalue()))
    return written


def write_report(summaries: list[RunSummary], out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """results.md (with the paired differences vs the base model), results.csv, per_scene.csv, plots/."""
    from .paired import paired_markdown

    out = Path(out_dir)
    paths = {
        "markdown": write_text(out / "results.md", markdown_table(summaries, title) + "\n" + paired_markdown(summaries)
                               + "\n" + size_markdown(summaries) + "\n" + part_count_markdown(summaries)),
        "csv": write_text(out / "results.csv", summary_csv(summaries)),
        "per_scene": write_text(out / "per_scene.csv", per_scene_csv(summaries)),
    }
    baseline = next((s for s in summaries if not s.run.config.isg), None)
    plots = plot_sweeps(summaries, out / "plots", baseline) + plot_groups(summaries, out / "plots")
    for i, p in enumerate(plots):
        paths[f"plot{i}"] = p
    return paths

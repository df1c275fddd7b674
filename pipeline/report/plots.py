"""Report figures (matplotlib, Agg backend), each written as PNG and SVG.

    series = series_from_rows(points, "segmentation.mIoU")           # one Series per (model, caption source)
    fits = {s.label: fit_curve(s.x, s.y) for s in series}
    plot_scaling(series, fits, "report/plots/segmentation_mIoU", ylabel="mIoU", baseline=0.41)
    plot_curves({"web": (steps, losses)}, "report/plots/pretrain_loss", ylabel="contrastive loss")

Colours follow the caption source (the same source has the same colour in every figure), line styles the
model size. Scaling plots show every observation (faint), the mean per subset size (marker), the fitted
curve with its confidence band (shaded), and the random-init baseline (grey dotted line) when given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report.fit import Fit

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
LINESTYLES = ("-", "--", "-.", ":")
FORMATS = ("png", "svg")


@dataclass
class Series:
    label: str
    model: str
    source: str
    x: np.ndarray
    y: np.ndarray


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour_for(source: str, sources: Sequence[str]) -> str:
    ordered = sorted(set(sources))
    return PALETTE[ordered.index(source) % len(PALETTE)] if source in ordered else "#444444"


def series_from_rows(rows: Sequence[dict[str, Any]], metric: str, x_key: str = "subset_size") -> list[Series]:
    """Complete pretraining rows with a finite ``metric`` and ``x_key``, grouped by (model, caption source)."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("kind") != "pretrain" or row.get("status") != "complete":
            continue
        x, y = row.get(x_key), row.get(metric)
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or x <= 0:
            continue
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        groups.setdefault((str(row.get("model", "")), str(row.get("caption_source", ""))), []).append(
            (float(x), float(y))
        )
    models = sorted({m for m, _ in groups})
    out = []
    for (model, source), pts in sorted(groups.items()):
        pts.sort()
        label = source if len(models) == 1 else f"{model} / {source}"
        out.append(Series(label, model, source, np.array([p[0] for p in pts]), np.array([p[1] for p in pts])))
    return out


def save(fig: Any, stem: str | Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` (atomically) and close the figure."""
    from pipeline import io

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        path = stem.with_name(f"{stem.name}.{ext}")
        with io.atomic_write(str(path), "wb") as f:
            fig.savefig(f, format=ext, dpi=120, bbox_inches="tight")
        paths.append(path)
    _pyplot().close(fig)
    return paths


def plot_scaling(
    series: Sequence[Series],
    fits: dict[str, Fit | None],
    stem: str | Path,
    ylabel: str,
    title: str = "",
    xlabel: str = "pretraining samples (subset size)",
    baseline: float | None = None,
    baseline_label: str = "random init",
    higher_is_better: bool | None = None,
) -> list[Path]:
    """Metric against subset size (log x) per series, with fits, confidence bands and a baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sources = [s.source for s in series]
    models = sorted({s.model for s in series})
    all_x = np.concatenate([s.x for s in series]) if series else np.array([1.0, 10.0])
    lo, hi = float(all_x.min()), float(all_x.max())
    grid = np.logspace(math.log10(lo) - 0.1, math.log10(hi) + 0.1, 100) if hi > lo else np.array([lo])
    for s in series:
        colour = colour_for(s.source, sources)
        style = LINESTYLES[models.index(s.model) % len(LINESTYLES)]
        ax.scatter(s.x, s.y, color=colour, alpha=0.35, s=14, linewidths=0)
        xs = np.unique(s.x)
        means = np.array([s.y[s.x == v].mean() for v in xs])
        fit = fits.get(s.label)
        ax.plot(xs, means, marker="o", linestyle="none" if fit else style, color=colour, label=s.label)
        if fit is not None:
            ax.plot(grid, fit.predict(grid), linestyle=style, color=colour, alpha=0.9)
            band_lo, band_hi = fit.band(grid)
            if np.all(np.isfinite(band_lo)):
                ax.fill_between(grid, band_lo, band_hi, color=colour, alpha=0.15, linewidth=0)
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="#777777", linestyle=":", label=baseline_label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    arrow = (
        ""
        if higher_is_better is None
        else (" (higher is better)" if higher_is_better else " (lower is better)")
    )
    ax.set_ylabel(ylabel + arrow)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    if series or baseline is not None:
        ax.legend(fontsize=8)
    return save(fig, stem)


def plot_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    stem: str | Path,
    ylabel: str,
    xlabel: str = "step",
    title: str = "",
    sources: dict[str, str] | None = None,
) -> list[Path]:
    """Lines of y against x per label (e.g. pretraining loss curves); ``sources`` maps label -> caption
    source, for colours that match the scaling plots (varying alpha separates runs of one source)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sources = sources or {}
    names = sorted(set(sources.values()))
    seen: dict[str, int] = {}
    for label, (xs, ys) in curves.items():
        source = sources.get(label, "")
        k = seen.get(source, 0)
        seen[source] = k + 1
        colour = colour_for(source, names) if source else None
        ax.plot(xs, ys, label=label, color=colour, alpha=max(0.35, 1.0 - 0.2 * k), linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.25)
    if curves:
        ax.legend(fontsize=7, ncol=2)
    return save(fig, stem)


def plot_bars(
    values: dict[str, float], stem: str | Path, ylabel: str, title: str = "", log: bool = False
) -> list[Path]:
    """One bar per label (e.g. training FLOPs per run)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(values) + 2), 3.6))
    labels = list(values)
    ax.bar(range(len(labels)), [values[k] for k in labels], color=PALETTE[0])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.25)
    return save(fig, stem)


def plot_alpha(trials: Sequence[dict[str, Any]], stem: str | Path) -> list[Path]:
    """Heavy-tail alpha per encoder block, one panel per stage: each trial's alpha before fine-tuning (dashed)
    and after (solid), frozen blocks marked with a black x."""
    plt = _pyplot()
    stages = sorted({str(t["stage"]) for t in trials})
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False, sharey=True)
    for ax, stage in zip(axes[0], stages):
        mine = [t for t in trials if str(t["stage"]) == stage]
        for k, t in enumerate(mine):
            colour = PALETTE[k % len(PALETTE)]
            label = f"{t['point']} (q={t['quantile']:g})"
            blocks = list(range(1, len(t["before"]) + 1))
            ax.plot(blocks, t["before"], "--", color=colour, alpha=0.7, linewidth=1.0)
            if t["after"]:
                ax.plot(blocks, t["after"], "-", color=colour, label=label, linewidth=1.2)
            frozen = [b for b in t["frozen"] if b < len(t["before"])]
            if frozen:
                ax.scatter(
                    [b + 1 for b in frozen], [t["before"][b] for b in frozen], marker="x", color="black"
                )
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("block")
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("alpha (dashed: before, solid: after; x: frozen)")
    return save(fig, stem)


__all__ = [
    "Series",
    "colour_for",
    "plot_alpha",
    "plot_bars",
    "plot_curves",
    "plot_scaling",
    "save",
    "series_from_rows",
]

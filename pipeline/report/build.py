"""Assemble the scaling report from run directories: tables, fits, comparisons, plots, FLOPs, attention, HTML.

    report = build_report(cfg, points, launches)     # cfg: ScalingConfig (paths resolved)
    report["html"]                                    # <root>/report/index.html

Everything comes from the runs' ``summary.json`` / ``config.toml`` / ``metrics.jsonl`` / ``alpha.json`` (via
:mod:`pipeline.report.collect`), so the report can be rebuilt at any time, from any subset of finished runs.
Written into ``<root>/report/``: ``index.html`` (self-contained, relative image links), ``report.md``,
``report.json`` (all numbers), ``points.{csv,md,parquet}`` (one row per grid point),
``finetune.{csv,md,parquet}`` (every fine-tuning trial), ``fits.csv``, ``comparison.csv``,
``attention.json`` (distances per head, CKA per layer) and ``plots/*.png|svg`` (among them
``attention_maps.png``, ``cka_per_layer``, ``alpha_per_layer``).

Comparisons: for every metric, model and subset size, each caption source against the reference source:
the difference of means (oriented so that positive = better) with a Welch t-interval over seeds, and the
*data multiplier* from the fitted curves: how many times more samples the reference source needs to reach
the other source's fitted value at that size (> 1 = the other source is more data-efficient; only given
where the reference curve improves with data).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import io
from pipeline.config import to_toml
from pipeline.report import collect as col
from pipeline.report import html as H
from pipeline.report.fit import Fit, data_multiplier, fit_curve, mean_difference
from pipeline.report.flops import (
    REFERENCE_GFLOPS,
    SEED_RECIPE,
    cached_count,
    check_reference,
    gpu_hours,
    recipe_projection,
)
from pipeline.report.plots import (
    plot_alpha,
    plot_bars,
    plot_curves,
    plot_scaling,
    series_from_rows,
)

LOWER_IS_BETTER = {
    "rmse",
    "abs_rel",
    "sq_rel",
    "rmse_log",
    "log10",
    "silog",
    "loss",
    "final_loss",
    "first_loss",
}
PERCENT_METRICS = {"mIoU", "mAcc", "aAcc"}


def higher_is_better(metric: str, primaries: dict[str, tuple[str, bool]]) -> bool:
    stage, _, name = metric.rpartition(".")
    if stage in primaries and primaries[stage][0] == name:
        return primaries[stage][1]
    return name not in LOWER_IS_BETTER


def default_metrics(points: Sequence[dict[str, Any]], primaries: dict[str, tuple[str, bool]]) -> list[str]:
    metrics = [f"{stage}.{metric}" for stage, (metric, _) in sorted(primaries.items())]
    if any(isinstance(r.get("zs_top1"), float) for r in points):
        metrics.append("zs_top1")
    return metrics


def improves(fit: Fit, higher: bool) -> bool:
    """Whether the fitted curve gets better with more data, significantly: the slope's interval lies on the
    improving side of zero (no interval, e.g. from two points, is no evidence)."""
    lo, hi = fit.ci["b"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    if fit.kind == "powerlaw_gap" or not higher:
        return hi < 0
    return lo > 0


def _ceiling(cfg: Any, metric: str, ys: np.ndarray) -> float:
    if metric in cfg.report.ceilings:
        return float(cfg.report.ceilings[metric])
    return 100.0 if metric.rpartition(".")[2] in PERCENT_METRICS or (len(ys) and ys.max() > 1) else 1.0


def fit_series(cfg: Any, metric: str, series: list[Any]) -> tuple[dict[str, Fit | None], list[str]]:
    fits: dict[str, Fit | None] = {}
    notes = []
    for s in series:
        if len(np.unique(s.x)) < 2:
            fits[s.label] = None
            notes.append(f"{metric} / {s.label}: one subset size only, no curve fitted")
            continue
        kind = cfg.report.fit
        ceiling = _ceiling(cfg, metric, s.y) if kind == "powerlaw_gap" else None
        try:
            fits[s.label] = fit_curve(s.x, s.y, kind, cfg.report.level, ceiling)
        except ValueError as e:
            fits[s.label] = fit_curve(s.x, s.y, "loglinear", cfg.report.level)
            notes.append(f"{metric} / {s.label}: {kind} not possible ({e}); fitted loglinear instead")
    return fits, notes


def compare(
    cfg: Any, metric: str, higher: bool, series: list[Any], fits: dict[str, Fit | None]
) -> list[dict]:
    """Each source against the reference source, per model and subset size (positive gain = better)."""
    reference = cfg.grid.reference
    sign = 1.0 if higher else -1.0
    rows = []
    by_key = {(s.model, s.source): s for s in series}
    for (model, source), s in sorted(by_key.items()):
        ref = by_key.get((model, reference))
        if source == reference or ref is None:
            continue
        ref_fit, fit = fits.get(ref.label), fits.get(s.label)
        lo_x, hi_x = float(ref.x.min()), float(ref.x.max())
        ref_gain = sign * (ref.y[ref.x == hi_x].mean() - ref.y[ref.x == lo_x].mean())
        ref_improves = ref_gain > 1e-9 * max(1.0, float(np.abs(ref.y).max()))  # measured, not just fitted
        for x in sorted(set(s.x) & set(ref.x)):
            d = mean_difference(ref.y[ref.x == x], s.y[s.x == x], cfg.report.level)
            lo, hi = (
                sorted((sign * d["lo"], sign * d["hi"])) if math.isfinite(d["lo"]) else (math.nan, math.nan)
            )
            mult = math.nan
            if ref_fit is not None and fit is not None and ref_improves and improves(ref_fit, higher):
                mult = data_multiplier(ref_fit, fit, float(x))
            rows.append(
                {
                    "metric": metric,
                    "model": model,
                    "source": source,
                    "reference": reference,
                    "subset_size": float(x),
                    "reference_mean": float(ref.y[ref.x == x].mean()),
                    "source_mean": float(s.y[s.x == x].mean()),
                    "gain": sign * d["diff"],
                    "gain_lo": lo,
                    "gain_hi": hi,
                    "n_reference": d["n_a"],
                    "n_source": d["n_b"],
                    "data_multiplier": mult,
                }
            )
    return rows


def no_curves_reason(table: Sequence[dict[str, Any]]) -> str:
    """Why there can be no scaling curve at all ("" when finished points have subset sizes to plot against)."""
    done = [r for r in table if r.get("kind") == "pretrain" and r.get("status") == "complete"]
    if not done:
        return "No pretraining point has finished yet, so there is nothing to plot."
    sized = [r for r in done if isinstance(r.get("subset_size"), (int, float)) and r["subset_size"] > 0]
    if not sized:
        return (
            f"No scaling curves: the {len(done)} finished pretraining run(s) have no subset size, so there is "
            "no data axis to plot against (one run, or a grid without subsets). Their metrics are in the "
            "results table."
        )
    return ""


def verdict_lines(comparisons: list[dict[str, Any]], level: float) -> list[dict[str, Any]]:
    """One line per (metric, model, source): at how many sizes the source beats the reference."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in comparisons:
        groups.setdefault((row["metric"], row["model"], row["source"], row["reference"]), []).append(row)
    out = []
    for (metric, model, source, reference), rows in groups.items():
        better = sum(r["gain"] > 0 for r in rows)
        sure_better = sum(math.isfinite(r["gain_lo"]) and r["gain_lo"] > 0 for r in rows)
        sure_worse = sum(math.isfinite(r["gain_hi"]) and r["gain_hi"] < 0 for r in rows)
        mults = [r["data_multiplier"] for r in rows if math.isfinite(r["data_multiplier"])]
        if better == len(rows):
            kind = "good"
        elif better == 0:
            kind = "bad"
        else:
            kind = "mixed"
        text = (
            f"{metric} ({model}): {source} beats {reference} at {better} of {len(rows)} subset sizes "
            f"(interval at {level:.0%} above zero at {sure_better}, below zero at {sure_worse}); "
            f"mean gain {np.mean([r['gain'] for r in rows]):+.4g}"
        )
        if mults:
            low, high = f"{min(mults):.3g}", f"{max(mults):.3g}"
            text += f"; data multiplier {low}x" if low == high else f"; data multiplier {low}-{high}x"
        out.append(
            {
                "metric": metric,
                "model": model,
                "source": source,
                "reference": reference,
                "text": text,
                "kind": kind,
                "better": better,
                "sizes": len(rows),
                "sure_better": sure_better,
                "sure_worse": sure_worse,
            }
        )
    return out


# ------------------------------------------------------------------------------------------ attention


def _image_files(folder: str, limit: int) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    return files[:limit]


def _checkpoint_tower(checkpoint: str, model: str) -> tuple[Any, Any]:
    """(image tower, eval preprocessing) of any checkpoint ``backbone.checkpoint`` takes."""
    import open_clip

    from pipeline.model.backbone import BackboneConfig, build_visual

    visual = build_visual(BackboneConfig(model=model, checkpoint=checkpoint)).eval()
    size = visual.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    return visual, open_clip.image_transform(size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"))


def attention_analysis(cfg: Any, points: Sequence[dict[str, Any]], plots_dir: Path) -> dict[str, Any]:
    """Per image tower (selected points, ``attention.checkpoints`` such as a teacher and its FD student, random
    init): mean attention distance per layer and head, the average attention map per layer, and linear CKA
    per block against ``attention.cka_reference``; plots and arrays."""
    acfg = cfg.attention
    if not acfg.enabled:
        return {"skipped": "attention.enabled = false"}
    if not acfg.images or not Path(acfg.images).is_dir():
        return {"skipped": f"attention.images: no image folder ({acfg.images or 'not set'})"}
    files = _image_files(acfg.images, acfg.num_images)
    if not files:
        return {"skipped": f"attention.images: no images in {acfg.images}"}
    import torch
    from PIL import Image

    from pipeline.analysis.cka import layer_cka
    from pipeline.model.clip import ModelConfig, build_clip
    from pipeline.report.attention import (
        attention_statistics,
        plot_attention_distance,
        plot_attention_maps,
        uniform_distance,
    )
    from pipeline.train.export import load_export

    done = [
        p for p in points if p.get("kind") == "pretrain" and p.get("status") == "complete" and p.get("export")
    ]
    if acfg.which == "largest":
        chosen: dict[tuple[str, str], dict[str, Any]] = {}
        for p in sorted(done, key=lambda r: (-(r.get("subset_size") or 0), r.get("seed", 0))):
            chosen.setdefault((p["model"], p["caption_source"]), p)
        done = list(chosen.values())
    info: dict[str, Any] = {"images": len(files), "folder": acfg.images, "runs": {}}
    tensors: dict[str, torch.Tensor] = {}
    towers: dict[str, tuple[Any, str]] = {}  # label -> (visual, key of its image tensor)

    def images_for(key: str, preprocess: Any) -> str:
        if key not in tensors:
            tensors[key] = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
        return key

    for p in sorted(done, key=lambda r: (r["model"], r["caption_source"], r.get("subset_size") or 0)):
        model, preprocess = load_export(p["export"])
        label = p["caption_source"] if acfg.which == "largest" else p["point"]
        if len({q["model"] for q in done}) > 1:
            label = f"{p['model']} / {label}"
        towers[label] = (model.visual, images_for(p["model"], preprocess))
        info["runs"][label] = {
            "point": p["point"],
            "export": p["export"],
            "subset_size": p.get("subset_size"),
        }
    for label, checkpoint in acfg.checkpoints.items():
        try:
            visual, preprocess = _checkpoint_tower(checkpoint, acfg.model)
        except (OSError, ValueError, RuntimeError) as e:
            info.setdefault("errors", {})[label] = f"{type(e).__name__}: {e}"
            continue
        size = visual.image_size
        towers[label] = (visual, images_for(f"checkpoint:{size}", preprocess))
        info["runs"][label] = {"checkpoint": checkpoint}
    if acfg.random_init:
        models = sorted({p["model"] for p in done})
        for model_name in models:
            model, _, _ = build_clip(ModelConfig(name=model_name, seed=0))
            label = "random init" if len(models) == 1 else f"{model_name} / random init"
            towers[label] = (model.visual, model_name)
    if not towers:
        return {
            **info,
            "skipped": "no finished pretraining run with an export (or attention.checkpoints) to analyse",
        }
    results: dict[str, np.ndarray] = {}
    maps: dict[str, np.ndarray] = {}
    for label, (visual, key) in towers.items():
        results[label], maps[label] = attention_statistics(visual, tensors[key])
        patch = visual.conv1.kernel_size[0]
        grid = (tensors[key].shape[-2] // patch, tensors[key].shape[-1] // patch)
        info["uniform_px"] = uniform_distance(grid, patch)
    stem = plots_dir / "attention_distance"
    title = "mean attention distance (CLS excluded)"
    for suffix in (".png", ".svg"):
        plot_attention_distance(
            results, stem.with_suffix(suffix), title=title, side_by_side=acfg.side_by_side
        )
    info["distance_px"] = {k: v.tolist() for k, v in results.items()}
    info["per_layer_mean_px"] = {k: v.mean(1).tolist() for k, v in results.items()}
    info["per_head_px"] = info["distance_px"]
    info["plot"] = str(stem.with_suffix(".png"))
    if acfg.maps:
        info["maps_plot"] = str(
            plot_attention_maps(
                maps, plots_dir / "attention_maps.png", title="average attention map per layer"
            )
        )
    reference = acfg.cka_reference or next(iter(acfg.checkpoints), "")
    if reference and reference in towers:
        ref_visual, ref_key = towers[reference]
        cka: dict[str, list[float]] = {}
        for label, (visual, key) in towers.items():
            if label == reference:
                continue
            if tensors[key].shape != tensors[ref_key].shape:
                info.setdefault("cka_skipped", {})[label] = "a different input size than the reference"
                continue
            try:
                cka[label] = layer_cka(ref_visual, visual, tensors[ref_key])
            except ValueError as e:
                info.setdefault("cka_skipped", {})[label] = str(e)
        info["cka_reference"] = reference
        info["cka"] = cka
        if cka:
            info["cka_plot"] = str(
                plot_curves(
                    {k: (list(range(1, len(v) + 1)), v) for k, v in cka.items()},
                    plots_dir / "cka_per_layer",
                    ylabel=f"linear CKA with {reference}",
                    xlabel="layer",
                    title="CKA per layer (patch tokens)",
                )[0]
            )
    elif reference:
        info["cka_skipped"] = {reference: "attention.cka_reference: no tower with that label"}
    return info


# ------------------------------------------------------------------------------------------------ alpha


def alpha_analysis(runs: dict[str, list[dict[str, Any]]], plots_dir: Path) -> dict[str, Any]:
    """Heavy-tail alpha per encoder block before and after fine-tuning (each complete trial's ``alpha.json``),
    with its frozen blocks; one plot panel per stage."""
    from pipeline.finetune.trainer import ALPHA_FILE

    trials = []
    for r in runs["finetune"]:
        data = col.read_json(Path(r["run_dir"]) / ALPHA_FILE) if r["status"] == "complete" else None
        if not data or "before" not in data:
            continue
        trials.append(
            {
                "point": r.get("point"),
                "stage": r.get("stage"),
                "run_dir": r["run_dir"],
                "quantile": data.get("quantile"),
                "frozen": data.get("frozen", []),
                "before": [b["alpha"] for b in data["before"]],
                "after": [b["alpha"] for b in data.get("after", [])],
            }
        )
    if not trials:
        return {"skipped": "no complete fine-tuning trial wrote alpha.json"}
    plot = plot_alpha(trials, plots_dir / "alpha_per_layer")[0]
    return {"trials": trials, "plot": str(plot)}


# ----------------------------------------------------------------------------------------------- FLOPs


def finetune_flops_rows(finetune: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step training FLOPs of every complete fine-tuning trial, marked full / frozen / sparse: frozen
    blocks (heavy-tail freezing) cost backward C, a pruned subnetwork of density d forward dC and backward
    (1 + d)C; ``vs full`` is the step's cost over the dense, fully trained model's 3C."""
    rows = []
    for r in finetune:
        per_step, full = r.get("flops.per_step"), r.get("flops.full_per_step")
        if not per_step:
            continue
        density = r.get("flops.density")
        frozen = r.get("frozen_blocks") or 0
        kinds = []
        if frozen:
            kinds.append(f"frozen {frozen} block(s) (alpha q={r.get('alpha_quantile') or 0:g})")
        if str(r.get("stage", "")).endswith(col.FROZEN_SUFFIX):
            kinds.append("frozen encoder")
        if density is not None and density < 1 - 1e-9:
            kinds.append(f"sparse (density {density:.3g})")
        rows.append(
            {
                "point": r.get("point"),
                "stage": r.get("stage"),
                "kind": ", ".join(kinds) or "full",
                "forward/step": r.get("flops.forward_per_step"),
                "backward/step": r.get("flops.backward_per_step"),
                "FLOPs/step": per_step,
                "vs full": per_step / full if full else None,
                "train FLOPs": r.get("train_flops"),
                "primary": r.get("primary_value"),
            }
        )
    return sorted(rows, key=lambda row: (str(row["stage"]), str(row["point"]), row["kind"]))


def flops_section_data(cfg: Any, runs: dict[str, list[dict[str, Any]]], cache: Path) -> dict[str, Any]:
    pretrain = [r for r in runs["pretrain"] if r["status"] == "complete"]
    finetune = [r for r in runs["finetune"] if r["status"] == "complete"]
    per_point: dict[str, float] = {}
    for r in finetune:
        per_point[r["point"]] = per_point.get(r["point"], 0.0) + (r.get("train_flops") or 0.0)
    rows = []
    for r in pretrain:
        rows.append(
            {
                "point": r["point"],
                "GFLOPs/sample (3C)": (r.get("flops_per_sample") or 0) / 1e9,
                "samples seen": r.get("samples_seen"),
                "pretrain FLOPs": r.get("train_flops"),
                "pretrain FLOPs (hardware)": r.get("train_flops_hw"),
                "fine-tune FLOPs (all trials)": per_point.get(r["point"]),
                "samples/s (measured)": r.get("samples_per_s"),
                "wall s": r.get("wall_s"),
            }
        )
    if col.RANDOM_INIT in per_point:
        rows.append({"point": col.RANDOM_INIT, "fine-tune FLOPs (all trials)": per_point[col.RANDOM_INIT]})
    out_ft = finetune_flops_rows(finetune)
    total_pre = sum(r.get("train_flops") or 0.0 for r in pretrain)
    total_pre_hw = sum(r.get("train_flops_hw") or 0.0 for r in pretrain)
    total_ft = sum(per_point.values())
    out: dict[str, Any] = {
        "rows": rows,
        "total_pretrain_flops": total_pre,
        "total_pretrain_flops_hw": total_pre_hw,
        "total_finetune_flops": total_ft,
        "total_flops": total_pre + total_ft,
        "device": cfg.cost.device if not cfg.cost.peak_flops else "custom",
        "peak_flops": cfg.cost.peak,
        "mfu": cfg.cost.mfu,
        "device_hours": gpu_hours(total_pre + total_ft, cfg.cost),
        "finetune_rows": out_ft,
    }
    ref = cfg.report.reference_model
    if ref:
        try:
            spec = REFERENCE_GFLOPS.get(ref, {})
            one = cached_count(cache, ref, spec.get("image_size", 0), spec.get("context_length", 0), 1)
            if ref in REFERENCE_GFLOPS:
                out["reference_check"] = check_reference(ref, one)
            recipe = dict(
                SEED_RECIPE, model=ref, image_size=one["image_size"], context_length=one["context_length"]
            )
            out["recipe"] = recipe_projection(one, recipe, cfg.cost)
        except Exception as e:  # a report must not die on an optional figure
            out["reference_error"] = f"{type(e).__name__}: {e}"
    return out


# --------------------------------------------------------------------------------------------- report


def _loss_curves(
    runs: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, tuple[list, list]], dict[str, str]]:
    curves, sources = {}, {}
    for r in runs["pretrain"]:
        rows = [json.loads(line) for line in _lines(Path(r["run_dir"]) / "metrics.jsonl")]
        pts = [(row["step"], row["loss"]) for row in rows if isinstance(row.get("loss"), (int, float))]
        if pts:
            curves[r["point"]] = ([p[0] for p in pts], [p[1] for p in pts])
            sources[r["point"]] = r["caption_source"]
    return curves, sources


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def missing_items(
    points: Sequence[Any],
    launches: Sequence[Any],
    runs: dict[str, list[dict[str, Any]]],
    finetune_info: dict[str, Any] | None,
) -> list[str]:
    """Planned pretraining points without a finished run, and fine-tuning trials that did not complete."""
    items = []
    by_name = {launch.point: launch for launch in launches}
    done = {r["point"] for r in runs["pretrain"] if r["status"] == "complete"}
    for p in points:
        if p.name in done:
            continue
        launch = by_name.get(p.name)
        why = (
            f"{launch.status}" + (f" (exit code {launch.returncode})" if launch and launch.returncode else "")
            if launch
            else "not run"
        )
        if launch is not None and launch.detail and launch.status != "skipped":
            last = [line for line in launch.detail.splitlines() if line.strip()][-1:] or [""]
            why += f": {last[0][:300]}"
        elif launch is not None and launch.detail:
            why += f" ({launch.detail})"
        items.append(f"pretraining point {p.name}: {why}")
    for row in (finetune_info or {}).get("rows", []):
        if row.get("status") != "complete":
            err = (row.get("error") or "").strip().splitlines()[-1:] or [""]
            items.append(
                f"fine-tuning trial {row['trial']}: {row.get('status')}"
                + (f": {err[0][:300]}" if err[0] else "")
            )
    return items


def build_report(
    cfg: Any,
    points: Sequence[Any] = (),
    launches: Sequence[Any] = (),
    finetune_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Collect, fit, compare, plot and write the report; returns everything as a dict (also report.json).

    ``extra`` may carry ``sections`` (a list of :class:`pipeline.report.html.Section` put first), ``meta``
    (shown under the title) and ``markdown`` (prepended to report.md); ``hook(report)`` may return more of
    these, computed from the finished numbers (e.g. a verdict), before the HTML and Markdown are written.
    """
    started = time.time()
    extra = extra or {}
    out_dir = Path(cfg.report_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    runs = col.collect([cfg.pretrain_dir, cfg.finetune_dir, *cfg.collect])
    table = col.points_table(runs)
    primaries = col.primary_metrics(runs["finetune"])
    metrics = list(cfg.report.metrics) or default_metrics(table, primaries)
    notes: list[str] = []

    files: dict[str, Any] = {}
    first = ["point", "kind", "status", "model", "caption_source", "subset", "subset_size", "seed"]
    files["points"] = col.write_table(table, str(out_dir / "points"), first)
    ft_first = [
        "point",
        "stage",
        "status",
        "primary_metric",
        "primary_value",
        "lr",
        "drop_path_rate",
        "run_dir",
    ]
    files["finetune"] = col.write_table(runs["finetune"], str(out_dir / "finetune"), ft_first)

    figures: list[dict[str, Any]] = []
    fit_rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    curves_note = no_curves_reason(table)
    if curves_note:
        notes.append(curves_note)
    for metric in metrics:
        higher = higher_is_better(metric, primaries)
        series = series_from_rows(table, metric)
        if not series:
            if not curves_note:
                notes.append(f"metric {metric}: no finished point with a subset size has it")
            continue
        fits, fit_notes = fit_series(cfg, metric, series)
        notes.extend(fit_notes)
        baseline_rows = [
            r for r in table if r.get("point") == col.RANDOM_INIT and isinstance(r.get(metric), float)
        ]
        baseline = baseline_rows[0][metric] if baseline_rows else None
        stem = plots_dir / f"scaling_{col_safe(metric)}"
        plot_scaling(
            series,
            fits,
            stem,
            ylabel=metric,
            title=f"{metric} against pretraining data",
            baseline=baseline,
            higher_is_better=higher,
        )
        figures.append(
            {
                "metric": metric,
                "png": str(stem) + ".png",
                "svg": str(stem) + ".svg",
                "higher": higher,
                "baseline": baseline,
            }
        )
        for s in series:
            fit = fits.get(s.label)
            row = {
                "metric": metric,
                "series": s.label,
                "model": s.model,
                "source": s.source,
                "points": len(s.x),
            }
            if fit is not None:
                d = fit.to_dict()
                row.update(
                    kind=d["kind"],
                    formula=d["formula"],
                    a=d["a"],
                    b=d["b"],
                    b_lo=d["b_ci"][0],
                    b_hi=d["b_ci"][1],
                    r2=d["r2"],
                    dof=d["dof"],
                )
            fit_rows.append(row)
        comparisons.extend(compare(cfg, metric, higher, series, fits))
    verdicts = verdict_lines(comparisons, cfg.report.level)
    if fit_rows:
        col.write_table(fit_rows, str(out_dir / "fits"))
    if comparisons:
        col.write_table(comparisons, str(out_dir / "comparison"))

    curves, sources = _loss_curves(runs)
    loss_plot = None
    if curves:
        loss_plot = plot_curves(
            curves,
            plots_dir / "pretrain_loss",
            ylabel="contrastive loss",
            sources=sources,
            title="pretraining loss",
        )[0]
    flops = flops_section_data(cfg, runs, out_dir / "flops_cache.json")
    flops_plot = None
    bars = {
        r["point"]: r["pretrain FLOPs"] + (r.get("fine-tune FLOPs (all trials)") or 0.0)
        for r in flops["rows"]
        if r.get("pretrain FLOPs")
    }
    if bars:
        spread = max(bars.values()) / max(min(bars.values()), 1.0)
        flops_plot = plot_bars(
            bars, plots_dir / "train_flops", ylabel="training FLOPs (pretrain + fine-tune)", log=spread > 100
        )[0]
    attention = attention_analysis(cfg, table, plots_dir)
    if "skipped" in attention:
        notes.append(f"attention distance: {attention['skipped']}")
    for label, error in (attention.get("errors") or {}).items():
        notes.append(f"attention.checkpoints[{label!r}] not analysed: {error}")
    alpha = alpha_analysis(runs, plots_dir)
    missing = missing_items(points, launches, runs, finetune_info)

    report = {
        "name": cfg.name,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": to_toml(cfg),
        "planned_points": [p.labels() for p in points],
        "launches": [vars(launch) for launch in launches],
        "points": table,
        "metrics": metrics,
        "fits": fit_rows,
        "comparisons": comparisons,
        "verdicts": verdicts,
        "flops": flops,
        "attention": {k: v for k, v in attention.items() if k not in ("distance_px", "per_head_px")},
        "alpha": alpha,
        "missing": missing,
        "notes": notes,
        "figures": figures,
        "curves_note": curves_note
        or ("" if figures else "No metric has a finished point at any subset size yet."),
        "files": files,
        "build_seconds": None,
    }
    io.write_json(str(out_dir / "attention.json"), attention)
    if hook is not None:
        more = hook(report)
        extra = {**extra, **more, "meta": {**extra.get("meta", {}), **more.get("meta", {})}}
        report.update({k: v for k, v in more.items() if k not in ("sections", "meta", "markdown")})
    report["build_seconds"] = round(time.time() - started, 2)
    io.write_json(str(out_dir / "report.json"), _jsonable(report))
    report["html"] = str(write_html(cfg, report, out_dir, loss_plot, flops_plot, extra))
    report["markdown"] = str(write_markdown(cfg, report, out_dir, loss_plot, extra))
    return report


def col_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- HTML


RESULT_FIRST = ["point", "model", "caption_source", "subset", "subset_size", "seed", "status"]


def result_columns(table: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    cols = [c for c in RESULT_FIRST if any(c in r for r in table)]
    extra = ["final_loss", "zs_top1", "i2t_r1", "t2i_r1"]
    cols += [c for c in extra if c not in metrics and any(c in r for r in table)]
    cols += [m for m in metrics if any(m in r for r in table)]
    stages = sorted({m.rpartition(".")[0] for m in metrics if "." in m})
    cols += [f"{s}.trials" for s in stages if any(f"{s}.trials" in r for r in table)]
    return cols


def _flops_fmt(col_name: str, value: Any) -> str:
    if isinstance(value, float) and "FLOPs" in col_name and "GFLOPs" not in col_name:
        return f"{value:.3e}"
    return col.fmt(value)


def write_html(
    cfg: Any,
    report: dict[str, Any],
    out_dir: Path,
    loss_plot: Path | None,
    flops_plot: Path | None,
    extra: dict[str, Any],
) -> Path:
    rel = lambda p: H.relative(p, out_dir)  # noqa: E731
    table = report["points"]
    sections: list[H.Section] = list(extra.get("sections", []))

    # summary
    planned = report["planned_points"]
    done = [r for r in table if r.get("kind") == "pretrain" and r.get("status") == "complete"]
    summary = H.paragraph(
        f"{len(done)} of {len(planned) or len(done)} planned pretraining points finished; "
        f"{sum(1 for r in table if r.get('kind') == 'baseline')} baseline row(s). Reference caption source: "
        f"{cfg.grid.reference}. Curves: {cfg.report.fit} fits with {cfg.report.level:.0%} confidence bands."
    )
    for v in report["verdicts"]:
        summary += f'<div class="verdict {v["kind"]}">{H.esc(v["text"])}</div>'
    if not report["verdicts"]:
        summary += H.paragraph(
            "No comparison yet: it needs at least two caption sources with finished points."
        )
    sections.append(H.Section("Summary", summary))

    # grid status
    status_rows = []
    by_point = {r["point"]: r for r in table}
    stages = list(cfg.finetune.stages)
    for p in planned:
        row = dict(p)
        r = by_point.get(p["name"], {})
        row["pretraining"] = r.get("status", "not run")
        for s in stages:
            row[s] = "done" if f"{s}.trials" in r else "-"
        status_rows.append(row)
    if status_rows:
        cols = ["name", "model", "caption_source", "subset", "subset_size", "seed", "pretraining", *stages]
        sections.append(
            H.Section(
                "Grid", H.table_html(status_rows, cols, text_columns=cols[:4] + ["pretraining", *stages])
            )
        )

    # results
    cols = result_columns(table, report["metrics"])
    body = H.table_html(table, cols, text_columns=["point", "model", "caption_source", "subset", "status"])
    body += H.paragraph(
        "Per stage, the best fine-tuning trial of each point by the stage's primary metric "
        "(<stage>.trials = trials compared). Full tables: "
    )
    body += " ".join(
        f'<a href="{rel(report["files"][k]["csv"])}">{k}.csv</a>' for k in ("points", "finetune")
    )
    sections.append(H.Section("Results", body))

    # scaling curves
    figs = "".join(
        H.figure_html(
            rel(f["png"]),
            f"{f['metric']} ({'higher' if f['higher'] else 'lower'} is better)"
            + (f"; grey dotted: random init = {f['baseline']:.4g}" if f["baseline"] is not None else ""),
            svg=rel(f["svg"]),
        )
        for f in report["figures"]
    )
    fit_cols = ["metric", "series", "points", "formula", "b", "b_lo", "b_hi", "r2", "dof"]
    body = figs or H.paragraph(report["curves_note"])
    if report["fits"]:
        body += "<h3>Fits</h3>" + H.table_html(
            report["fits"], fit_cols, text_columns=["metric", "series", "formula"]
        )
        body += H.paragraph(
            f"b_lo / b_hi: {cfg.report.level:.0%} t-interval of the slope (NaN: too few points)."
        )
    sections.append(H.Section("Scaling curves", body))

    if report["comparisons"]:
        cmp_cols = [
            "metric",
            "model",
            "source",
            "reference",
            "subset_size",
            "reference_mean",
            "source_mean",
            "gain",
            "gain_lo",
            "gain_hi",
            "n_source",
            "data_multiplier",
        ]
        body = H.paragraph(
            "gain = source minus reference, signed so that positive is better; interval: Welch t "
            "over seeds (empty with one seed); data multiplier: samples the reference needs to match "
            "the source's fitted value, over the subset size (> 1: source more data-efficient)."
        )
        body += H.table_html(
            report["comparisons"], cmp_cols, text_columns=["metric", "model", "source", "reference"]
        )
        sections.append(H.Section("Caption source comparison", body))

    if loss_plot is not None:
        sections.append(
            H.Section(
                "Pretraining",
                H.figure_html(
                    rel(loss_plot),
                    "pretraining contrastive loss per point",
                    svg=rel(Path(loss_plot).with_suffix(".svg")),
                ),
            )
        )

    sections.append(H.Section("FLOPs and cost", flops_html(cfg, report["flops"], rel, flops_plot)))
    sections.append(H.Section("Attention distance", attention_html(report["attention"], rel)))
    att = report["attention"]
    if att.get("maps_plot") or att.get("cka"):
        sections.append(H.Section("Attention maps and CKA", maps_cka_html(att, rel)))
    sections.append(H.Section("Heavy-tail alpha", alpha_html(report["alpha"], rel)))
    missing = report["missing"]
    body = (
        H.bullet_list(missing, css="missing")
        if missing
        else H.paragraph("Nothing: every planned point and fine-tuning trial finished.")
    )
    if report["notes"]:
        body += "<h3>Notes</h3>" + H.bullet_list(report["notes"])
    sections.append(H.Section("What is missing", body))
    sections.append(H.Section("Config", f"<pre>{H.esc(report['config'])}</pre>"))
    meta = {"generated": report["generated"], "root": cfg.root, **extra.get("meta", {})}
    title = cfg.report.title or f"Scaling report: {cfg.name}"
    return H.write_page(out_dir / "index.html", title, sections, meta)


def flops_html(cfg: Any, flops: dict[str, Any], rel: Any, plot: Path | None) -> str:
    cols = [
        "point",
        "GFLOPs/sample (3C)",
        "samples seen",
        "pretrain FLOPs",
        "pretrain FLOPs (hardware)",
        "fine-tune FLOPs (all trials)",
        "samples/s (measured)",
        "wall s",
    ]
    body = H.paragraph(
        "Model FLOPs count forward C and backward 2C for trained modules (C for frozen modules that gradients "
        "flow through, 0 where none flows); hardware FLOPs add gradient caching's no-grad embedding pass and "
        "activation checkpointing. Fine-tuning FLOPs are counted by each stage over all of its trials."
    )
    body += H.table_html(flops["rows"], cols, formatter=_flops_fmt, text_columns=["point"])
    body += H.paragraph(
        f"Total: {flops['total_flops']:.3e} FLOPs ({flops['total_pretrain_flops']:.3e} pretraining, "
        f"{flops['total_finetune_flops']:.3e} fine-tuning) = {flops['device_hours']:.3g} device-hours on "
        f"{flops['device']} ({flops['peak_flops']:.3g} FLOP/s peak) at {flops['mfu']:.0%} MFU."
    )
    if plot is not None:
        body += H.figure_html(rel(plot), "training FLOPs per point", svg=rel(Path(plot).with_suffix(".svg")))
    if flops.get("finetune_rows"):
        body += "<h3>Fine-tuning steps: full, frozen and sparse</h3>"
        body += H.paragraph(
            "Per step of each trial: frozen blocks (heavy-tail freezing, or a frozen encoder) cost forward C and "
            "backward C (activation gradients only); a pruned subnetwork of density d costs forward dC and "
            "backward (1 + d)C (pipeline/train/flops.py). vs full: the step's FLOPs over the same model trained "
            "dense and whole (3C)."
        )
        ft_cols = [
            "point",
            "stage",
            "kind",
            "forward/step",
            "backward/step",
            "FLOPs/step",
            "vs full",
            "primary",
        ]
        body += H.table_html(
            flops["finetune_rows"], ft_cols, formatter=_flops_fmt, text_columns=["point", "stage", "kind"]
        )
    check = flops.get("reference_check")
    if check:
        rows = [
            {
                "part": part,
                "counted GFLOPs": check[f"{part}_gflops_counted"],
                "published GFLOPs": check[f"{part}_gflops_published"],
                "relative error": check[f"{part}_rel_error"],
            }
            for part in ("image", "text", "total")
        ]
        body += f"<h3>Check: {H.esc(check['model'])} forward FLOPs against the published figure</h3>"
        body += H.table_html(
            rows, ["part", "counted GFLOPs", "published GFLOPs", "relative error"], text_columns=["part"]
        )
        body += H.paragraph(f"Published: {check['source']}.")
    recipe = flops.get("recipe")
    if recipe:
        body += "<h3>Projection: the seed recipe</h3>"
        text = (
            f"{recipe['model']} at {recipe['image_size']} px, {recipe['num_texts']} captions per sample, "
            f"{recipe['global_batch']:,} x {recipe['steps']:,} steps = {recipe['samples']:.3e} samples x "
            f"{recipe['train_gflops_per_sample']:.4g} GFLOPs = {recipe['model_flops']:.3e} FLOPs: "
            f"{recipe['device_hours_at_mfu']:,.0f} device-hours on {recipe['device']} at {recipe['mfu']:.0%} MFU"
        )
        if "device_hours_at_throughput" in recipe:
            text += f", {recipe['device_hours_at_throughput']:,.0f} at the measured throughput"
        if "cost_at_mfu" in recipe:
            text += f", cost {recipe['cost_at_mfu']:,.0f}"
        body += H.paragraph(text + ".")
    if "reference_error" in flops:
        body += H.paragraph(f"Reference count failed: {flops['reference_error']}")
    return body


def maps_cka_html(att: dict[str, Any], rel: Any) -> str:
    body = ""
    if att.get("maps_plot"):
        body += H.paragraph(
            "Average attention map per layer (rows: towers, columns: layers): patch-to-patch weights, CLS "
            "excluded and each query renormalised, averaged over heads and images. A bright diagonal is local "
            "attention; vertical bars are every query attending to the same few keys (FD-CLIP's diagnostic)."
        )
        body += H.figure_html(rel(att["maps_plot"]), "average attention map per layer")
    if att.get("cka"):
        ref = att["cka_reference"]
        body += H.paragraph(
            f"Linear CKA (Kornblith et al. 2019) of each block's patch tokens with the same block of {ref} on "
            "the same images (1 = the same representation up to rotation and scale)."
        )
        body += H.figure_html(rel(att["cka_plot"]), f"CKA per layer against {ref}")
        layers = max(len(v) for v in att["cka"].values())
        rows = [
            {"tower": k, **{f"layer {i + 1}": v[i] for i in range(len(v))}} for k, v in att["cka"].items()
        ]
        body += H.table_html(
            rows, ["tower", *[f"layer {i + 1}" for i in range(layers)]], text_columns=["tower"]
        )
    for label, why in (att.get("cka_skipped") or {}).items():
        body += H.paragraph(f"CKA skipped for {label}: {why}.")
    return body


def alpha_html(alpha: dict[str, Any], rel: Any) -> str:
    if "skipped" in alpha:
        return H.paragraph(f"Skipped: {alpha['skipped']}.")
    body = H.paragraph(
        "Heavy-tail metric alpha of each image-encoder block (mean over its weight matrices of the power-law "
        "exponent fitted to the eigenvalues of W^T W: Hill MLE, xmin by KS distance; pipeline/analysis/"
        "heavytail.py) before fine-tuning (dashed) and after (solid). With optim.freeze.alpha_below_quantile = q "
        "the floor(q L) blocks of smallest alpha were frozen (x)."
    )
    body += H.figure_html(
        rel(alpha["plot"]), "alpha per layer", svg=rel(Path(alpha["plot"]).with_suffix(".svg"))
    )
    layers = max(len(t["before"]) for t in alpha["trials"])
    rows = []
    for t in alpha["trials"]:
        row = {
            "point": t["point"],
            "stage": t["stage"],
            "q": t["quantile"],
            "frozen": ", ".join(map(str, t["frozen"])),
        }
        for i in range(layers):
            before = t["before"][i] if i < len(t["before"]) else None
            after = t["after"][i] if i < len(t["after"]) else None
            row[f"block {i}"] = (
                f"{before:.3g} -> {after:.3g}"
                if before is not None and after is not None
                else col.fmt(before)
            )
        rows.append(row)
    cols = ["point", "stage", "q", "frozen", *[f"block {i}" for i in range(layers)]]
    return body + H.table_html(rows, cols, text_columns=[c for c in cols if c != "q"])


def attention_html(att: dict[str, Any], rel: Any) -> str:
    if "skipped" in att:
        return H.paragraph(f"Skipped: {att['skipped']}.")
    body = H.paragraph(
        f"Attention-weighted mean distance (pixels) between a query patch and the patches it attends to, per head "
        f"(dots) and averaged per layer (lines), over {att['images']} images from {att['folder']}; the CLS token "
        f"is excluded. Uniform attention would give {att.get('uniform_px', float('nan')):.3g} px."
    )
    svg = Path(att["plot"]).with_suffix(".svg")
    body += H.figure_html(rel(att["plot"]), "mean attention distance per layer", svg=rel(svg))
    per_layer = att.get("per_layer_mean_px", {})
    if per_layer:
        layers = max(len(v) for v in per_layer.values())
        rows = [{"tower": k, **{f"layer {i + 1}": v[i] for i in range(len(v))}} for k, v in per_layer.items()]
        body += H.table_html(
            rows, ["tower", *[f"layer {i + 1}" for i in range(layers)]], text_columns=["tower"]
        )
    return body


# ------------------------------------------------------------------------------------------ Markdown


def write_markdown(
    cfg: Any, report: dict[str, Any], out_dir: Path, loss_plot: Path | None, extra: dict[str, Any]
) -> Path:
    rel = lambda p: H.relative(p, out_dir)  # noqa: E731
    lines = [
        f"# {cfg.report.title or 'Scaling report: ' + cfg.name}",
        "",
        f"Generated {report['generated']}.",
        "",
    ]
    if extra.get("markdown"):
        lines += [extra["markdown"], ""]
    lines += ["## Summary", ""] + [f"- {v['text']}" for v in report["verdicts"]] + [""]
    table = report["points"]
    lines += ["## Results", "", col.markdown_table(table, result_columns(table, report["metrics"]))]
    for f in report["figures"]:
        lines += [f"![{f['metric']}]({rel(f['png'])})", ""]
    if not report["figures"]:
        lines += [report["curves_note"], ""]
    if report["comparisons"]:
        cols = [
            "metric",
            "source",
            "reference",
            "subset_size",
            "reference_mean",
            "source_mean",
            "gain",
            "gain_lo",
            "gain_hi",
            "data_multiplier",
        ]
        lines += ["## Comparison", "", col.markdown_table(report["comparisons"], cols)]
    if report["fits"]:
        lines += [
            "## Fits",
            "",
            col.markdown_table(
                report["fits"], ["metric", "series", "points", "formula", "b_lo", "b_hi", "r2"]
            ),
        ]
    if loss_plot is not None:
        lines += [f"![pretraining loss]({rel(loss_plot)})", ""]
    fl = report["flops"]
    lines += [
        "## FLOPs",
        "",
        f"Total {fl['total_flops']:.3e} FLOPs = {fl['device_hours']:.3g} device-hours on "
        f"{fl['device']} at {fl['mfu']:.0%} MFU.",
        "",
    ]
    if fl.get("reference_check"):
        c = fl["reference_check"]
        lines += [
            f"{c['model']}: counted {c['total_gflops_counted']:.4g} GFLOPs per image-text pair, published "
            f"{c['total_gflops_published']:.4g} (relative error {c['total_rel_error']:.1e}).",
            "",
        ]
    if fl.get("finetune_rows"):
        cols = ["point", "stage", "kind", "FLOPs/step", "vs full", "primary"]
        lines += [col.markdown_table(fl["finetune_rows"], cols), ""]
    att = report["attention"]
    if "plot" in att:
        lines += ["## Attention distance", "", f"![attention distance]({rel(att['plot'])})", ""]
    if att.get("maps_plot"):
        lines += [f"![attention maps]({rel(att['maps_plot'])})", ""]
    if att.get("cka_plot"):
        lines += [
            "## CKA per layer",
            "",
            f"![CKA against {att['cka_reference']}]({rel(att['cka_plot'])})",
            "",
        ]
    if "plot" in report["alpha"]:
        lines += ["## Heavy-tail alpha", "", f"![alpha per layer]({rel(report['alpha']['plot'])})", ""]
    if report["missing"] or report["notes"]:
        lines += ["## Missing", ""] + [f"- {m}" for m in report["missing"] + report["notes"]] + [""]
    path = out_dir / "report.md"
    io.write_text(str(path), "\n".join(lines) + "\n")
    return path


__all__ = ["build_report", "compare", "default_metrics", "higher_is_better", "verdict_lines"]

"""Collect run directories (pretraining and fine-tuning) into tables, from their ``summary.json`` and
``config.toml`` only (never from logs).

    runs = collect(["runs/scaling"])                 # {"pretrain": [...rows], "finetune": [...rows]}
    points = points_table(runs)                      # one row per pretraining run (+ random-init / external)
    write_table(points, "runs/scaling/report/points")   # points.csv, points.md, points.parquet

A run directory is any folder holding ``config.toml`` or ``summary.json`` (``checkpoints/``, ``export/``,
``logs/`` and ``tensorboard/`` are not searched). Its kind comes from its config: a pretraining config has
``global_batch`` and ``loss``; a fine-tuning config has ``backbone``. A run without ``summary.json`` is
``incomplete`` (running, failed or preempted). A pretraining run may carry ``point.json`` (written by
``jobs.scaling_report`` before launching it) naming its grid point; otherwise the point is inferred:
caption source from the loss weights (``web``: w_syn = 0, ``syn``: w_real = 0, ``web+syn``: both), subset
from ``data.subset_uids`` (its size = the uid file's line count), model from ``model.name``.

A fine-tuning run with a frozen image encoder (``optim.backbone_lr_mult = 0``) counts as stage
``<stage>-frozen`` (a probe of the pretrained features, kept apart from full fine-tuning). A fine-tuning run
is joined to the pretraining run whose directory holds its ``backbone.checkpoint`` (an
export such as ``<run>/export/ema``); an empty checkpoint is the ``random init`` baseline; any other
checkpoint is an external point named by its path. Per point and stage, the table keeps the best complete
trial by the stage's primary metric (a sweep's trials are alternatives, not repeats).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.report.flops import finetune_flops, pretrain_flops

POINT_FILE = "point.json"
"""Grid-point labels of a pretraining run (name, model, caption_source, subset, subset_size, seed)."""
SKIP_DIRS = {"checkpoints", "export", "logs", "tensorboard", "__pycache__"}
RANDOM_INIT = "random init"
PRETRAIN_EVAL_METRICS = ("zs_top1", "zs_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


# ------------------------------------------------------------------------------------------- reading


def find_run_dirs(roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every folder under ``roots`` (inclusive) holding a ``config.toml`` or ``summary.json``, sorted."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            if "config.toml" in filenames or "summary.json" in filenames:
                found.add(Path(dirpath))
    return sorted(found)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def get(d: Any, dotted: str, default: Any = None) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``, or ``default`` when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def classify(config: dict[str, Any], summary: dict[str, Any] | None) -> str:
    if "global_batch" in config and "loss" in config:
        return "pretrain"
    if "backbone" in config or (summary or {}).get("stage"):
        return "finetune"
    return "unknown"


def caption_source(config: dict[str, Any]) -> str:
    w_real = float(get(config, "loss.w_real", 1.0))
    w_syn = float(get(config, "loss.w_syn", 1.0))
    if w_syn == 0:
        return "web"
    if w_real == 0:
        return "syn"
    return "web+syn" if w_real == w_syn else f"web x{w_real:g} + syn x{w_syn:g}"


_LINE_COUNTS: dict[str, int | None] = {}


def count_lines(url: str) -> int | None:
    """Non-blank, non-comment lines of a uid list file (cached), None when unreadable."""
    if url not in _LINE_COUNTS:
        try:
            fs, path = io.filesystem(url)
            with fs.open(path, "r", encoding="utf-8") as f:
                _LINE_COUNTS[url] = sum(1 for line in f if line.strip() and not line.startswith("#"))
        except (OSError, ValueError):
            _LINE_COUNTS[url] = None
    return _LINE_COUNTS[url]


def _metrics_wall_s(path: Path) -> float | None:
    """Seconds between the first and last row of metrics.jsonl (training time, roughly)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    times = []
    for line in (lines[0], lines[-1]) if lines else ():
        try:
            times.append(float(json.loads(line)["time"]))
        except (ValueError, KeyError, TypeError):
            return None
    return times[-1] - times[0] if len(times) == 2 else None


def pretrain_row(path: Path, config: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    point = read_json(path / POINT_FILE) or {}
    subset_uids = get(config, "data.subset_uids") or ""
    subset = point.get("subset") or (Path(subset_uids).stem if subset_uids else "all")
    subset_size = point.get("subset_size")
    if subset_size is None and subset_uids:
        subset_size = count_lines(subset_uids)
    row: dict[str, Any] = {
        "kind": "pretrain",
        "run_dir": str(path),
        "status": "complete" if summary is not None else "incomplete",
        "point": point.get("name") or path.name,
        "model": point.get("model") or get(config, "model.name", ""),
        "caption_source": point.get("caption_source") or caption_source(config),
        "subset": subset,
        "subset_size": subset_size,
        "seed": point.get("seed", get(config, "data.seed", 0)),
        "steps": (summary or {}).get("step", get(config, "steps")),
        "global_batch": (summary or {}).get("global_batch", get(config, "global_batch")),
        "w_real": get(config, "loss.w_real"),
        "w_syn": get(config, "loss.w_syn"),
    }
    if summary is None:
        return row
    flops = pretrain_flops(summary, config)
    row.update(
        samples_seen=flops["samples"],
        first_loss=summary.get("first_loss"),
        final_loss=summary.get("final_loss"),
        params=summary.get("params"),
        flops_per_sample=flops["flops_per_sample"],
        train_flops=flops["model_flops"],
        train_flops_hw=flops["hardware_flops"],
        samples_per_s=summary.get("samples_per_s"),
        wall_s=_metrics_wall_s(path / "metrics.jsonl"),
        world_size=summary.get("world_size"),
    )
    evals = summary.get("eval") or {}
    weights = "ema" if any(k.startswith("eval/ema/") for k in evals) else "final"
    row["eval_weights"] = weights
    for key, value in sorted(evals.items()):
        prefix = f"eval/{weights}/"
        if key.startswith(prefix) and isinstance(value, (int, float)):
            row[key[len(prefix) :]] = float(value)
    exports = summary.get("exports") or {}
    row["export"] = exports.get("ema") or exports.get("final") or ""
    return row


FROZEN_SUFFIX = "-frozen"
"""Appended to the stage of a trial whose image encoder was frozen (optim.backbone_lr_mult = 0): a probe of
the pretrained features, compared separately from full fine-tuning."""


def finetune_row(path: Path, config: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    summary = summary or {}
    stage = summary.get("stage") or ""
    if stage and get(config, "optim.backbone_lr_mult", 1.0) == 0:
        stage += FROZEN_SUFFIX
    row: dict[str, Any] = {
        "kind": "finetune",
        "run_dir": str(path),
        "status": "complete" if summary.get("status") == "complete" else "incomplete",
        "stage": stage,
        "primary_metric": summary.get("primary_metric") or "",
        "primary_value": summary.get("primary_value"),
        "higher_is_better": bool(summary.get("higher_is_better", True)),
        "steps": summary.get("steps", get(config, "train.steps")),
        "lr": get(config, "optim.lr"),
        "drop_path_rate": get(config, "backbone.drop_path_rate"),
        "ft_seed": get(config, "train.seed"),
        "backbone_checkpoint": get(config, "backbone.checkpoint", "") or "",
        "backbone_lr_mult": get(config, "optim.backbone_lr_mult"),
    }
    row["alpha_quantile"] = get(config, "optim.freeze.alpha_below_quantile", 0.0)
    if summary:
        flops = finetune_flops(summary)
        row["train_flops"] = flops["model_flops"]
        for key in ("forward_per_step", "backward_per_step", "per_step", "full_per_step", "density"):
            row[f"flops.{key}"] = flops[key]
        frozen = summary.get("frozen_blocks")
        row["frozen_blocks"] = len(frozen) if isinstance(frozen, list) else None
        row["wall_s"] = summary.get("wall_s_last_session")
        for key, value in sorted((summary.get("metrics") or {}).items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"metric.{key}"] = float(value)
    return row


def collect(roots: Iterable[str | os.PathLike[str]]) -> dict[str, list[dict[str, Any]]]:
    """Read every run under ``roots``: ``{"pretrain": rows, "finetune": rows, "unknown": rows}``."""
    out: dict[str, list[dict[str, Any]]] = {"pretrain": [], "finetune": [], "unknown": []}
    for path in find_run_dirs(roots):
        config = read_toml(path / "config.toml")
        summary = read_json(path / "summary.json")
        kind = classify(config, summary)
        if kind == "pretrain":
            out["pretrain"].append(pretrain_row(path, config, summary))
        elif kind == "finetune":
            out["finetune"].append(finetune_row(path, config, summary))
        else:
            out["unknown"].append({"kind": "unknown", "run_dir": str(path)})
    join_finetune(out["pretrain"], out["finetune"])
    return out


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def join_finetune(pretrain: Sequence[dict[str, Any]], finetune: Sequence[dict[str, Any]]) -> None:
    """Set ``pretrain_run`` / ``point`` on each fine-tuning row from its backbone checkpoint (in place)."""
    runs = [(_resolved(r["run_dir"]), r) for r in pretrain]
    for row in finetune:
        ckpt = row["backbone_checkpoint"]
        row["pretrain_run"], row["point"] = "", RANDOM_INIT
        if not ckpt:
            continue
        target = _resolved(ckpt)
        match = [r for p, r in runs if target == p or p in target.parents]
        if match:
            row["pretrain_run"], row["point"] = match[0]["run_dir"], match[0]["point"]
        else:
            row["pretrain_run"], row["point"] = None, f"external: {ckpt}"


# --------------------------------------------------------------------------------------------- points


def best_trials(finetune: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Best complete trial per (point, stage) by its primary metric, with ``trials`` = how many competed."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in finetune:
        if row["status"] == "complete" and row["primary_value"] is not None:
            groups.setdefault((row["point"], row["stage"]), []).append(row)
    best = {}
    for key, members in groups.items():
        sign = 1.0 if members[0]["higher_is_better"] else -1.0
        members = sorted(members, key=lambda r: r["run_dir"])
        choice = dict(max(members, key=lambda r: sign * float(r["primary_value"])))
        choice["trials"] = len(members)
        best[key] = choice
    return best


def stages_of(finetune: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({r["stage"] for r in finetune if r["stage"]})


def _point_order(r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        str(r.get("model")),
        str(r.get("caption_source")),
        r.get("subset_size") or 0,
        str(r.get("subset")),
        r.get("seed") or 0,
        r["run_dir"],
    )


def points_table(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per pretraining run (plus the random-init baseline and external checkpoints that were
    fine-tuned), with each stage's best trial: ``<stage>.<metric>``, ``<stage>.trials``, ``<stage>.lr``,
    ``<stage>.train_flops``, and the sum of training FLOPs (pretraining + best trials)."""
    best = best_trials(runs["finetune"])
    rows = [dict(r) for r in sorted(runs["pretrain"], key=_point_order)]
    extra_points = sorted({p for p, _ in best if p not in {r["point"] for r in rows}})
    for point in extra_points:
        rows.append(
            {
                "kind": "baseline" if point == RANDOM_INIT else "external",
                "point": point,
                "status": "complete",
                "caption_source": point,
                "model": "",
                "subset": "",
                "subset_size": None,
            }
        )
    for row in rows:
        total = row.get("train_flops") or 0.0
        for stage in stages_of(runs["finetune"]):
            trial = best.get((row["point"], stage))
            if trial is None:
                continue
            for key, value in trial.items():
                if key.startswith("metric."):
                    row[f"{stage}.{key[len('metric.') :]}"] = value
            row[f"{stage}.trials"] = trial["trials"]
            row[f"{stage}.lr"] = trial.get("lr")
            row[f"{stage}.train_flops"] = trial.get("train_flops")
            row[f"{stage}.run_dir"] = trial["run_dir"]
            total += trial.get("train_flops") or 0.0
        row["total_train_flops"] = total or None
    return rows


def primary_metrics(finetune: Sequence[dict[str, Any]]) -> dict[str, tuple[str, bool]]:
    """stage -> (primary metric, higher is better), from the runs themselves."""
    out: dict[str, tuple[str, bool]] = {}
    for row in finetune:
        if row["stage"] and row["primary_metric"]:
            out.setdefault(row["stage"], (row["primary_metric"], row["higher_is_better"]))
    return out


# -------------------------------------------------------------------------------------------- writing


def columns_of(rows: Sequence[dict[str, Any]], first: Sequence[str] = ()) -> list[str]:
    seen = [c for c in first if any(c in r for r in rows)]
    for row in rows:
        for key in row:
            if key not in seen:
                seen.append(key)
    return seen


def _column_values(rows: Sequence[dict[str, Any]], col: str) -> list[Any]:
    values = [r.get(col) for r in rows]
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return values
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
    return [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values]


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], prefix: str, first: Sequence[str] = ()) -> dict[str, str]:
    """``<prefix>.csv``, ``<prefix>.md`` and ``<prefix>.parquet`` (one type per column), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = columns_of(rows, first)
    table = {c: _column_values(rows, c) for c in columns}
    text = _io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for i in range(len(rows)):
        writer.writerow(["" if table[c][i] is None else table[c][i] for c in columns])
    io.write_text(f"{prefix}.csv", text.getvalue())
    io.write_text(f"{prefix}.md", markdown_table(rows, columns))
    buffer = _io.BytesIO()
    pq.write_table(pa.table(table) if columns else pa.table({}), buffer)
    with io.atomic_write(f"{prefix}.parquet", "wb") as f:
        f.write(buffer.getvalue())
    return {"csv": f"{prefix}.csv", "md": f"{prefix}.md", "parquet": f"{prefix}.parquet"}


__all__ = [
    "POINT_FILE",
    "RANDOM_INIT",
    "best_trials",
    "caption_source",
    "classify",
    "collect",
    "find_run_dirs",
    "fmt",
    "join_finetune",
    "markdown_table",
    "points_table",
    "primary_metrics",
    "write_table",
]

"""The pretrain -> fine-tune -> report DAG: every selected stage's sweep for each pretrained checkpoint, then
the report, skipping what is done.

    python -m jobs.pipeline --config jobs/configs/pipeline/debug.toml \
        --runs=[runs/web-1k,runs/web-4k] --storage=$PWD/runs/pipelines
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.pipeline \
        --config jobs/configs/pipeline/debug.toml --storage=/shared/pipelines --points.web_1k=/shared/runs/web-1k

Inputs are finished pretraining run directories (their ``export/<final|ema>/visual.pt``, written by
``jobs.pretrain``) or checkpoint files, one per data-scale point. Steps:

1. resolve the points; a run whose export is missing (pretraining not finished) is listed and skipped;
2. one fine-tune sweep over (point x stage x search space) from ``sweep_config``, run by
   ``pipeline.orchestrate.run_sweep`` (as ``jobs.finetune_sweep`` runs it) with ``runner`` (ray or local):
   trials that finished before are not rerun, an interrupted sweep is restored;
3. the report: the job named by ``report.module`` when set and importable, else a built-in table
   (``report.md`` / ``report.csv``: the best metric per stage and point, with the pretraining facts); rerun
   only when the sweep results changed.

``jobs.scaling_report`` is the grid study that also launches the pretraining runs (its fine-tuning goes
through the same ``run_sweep``); this DAG starts from runs or checkpoints you already have.

Everything lands in ``<storage>/<name>/`` (``sweep/`` holds the sweep, ``pipeline.json`` the DAG's state).
Exit code 0 when every point was found and every trial is complete, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import io
from pipeline.cli import job_main, parse_config
from pipeline.config import ConfigError, load_config
from pipeline.finetune.sweep import IN_RAY_JOB_ENV, SweepConfig, resolve_paths
from pipeline.orchestrate import run_sweep


@dataclass(frozen=True)
class PipelineReportConfig:
    module: str = ""
    """Report job run after the sweeps (its ``main(argv)`` is called with ``args``), e.g. ``jobs.scaling_report``;
    "" (or a module that is not importable) writes the built-in table (report.md / report.csv) instead."""
    args: tuple[str, ...] = ()
    """Arguments for that job; ``{root}``, ``{sweep_dir}``, ``{report_dir}`` and ``{points_json}`` are filled in."""


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "pipeline"
    """Name of this DAG run: everything goes to ``<storage>/<name>/``."""
    storage: str = "runs/pipelines"
    """Root folder (absolute under ``ray job submit``) or ``s3://bucket/prefix``."""
    runs: tuple[str, ...] = ()
    """Pretraining run directories (labels = their folder names)."""
    points: dict[str, Any] = field(default_factory=dict)
    """label -> pretraining run directory, export folder or checkpoint file (added to ``runs``)."""
    export: Literal["final", "ema"] = "final"
    """Which exported weights of a pretraining run to fine-tune."""
    sweep_config: str = "jobs/configs/sweep/debug.toml"
    """The sweep (stages, base configs, search space, resources) run for every point."""
    sweep_overrides: tuple[str, ...] = ()
    """Dotted overrides for that sweep config, e.g. ``["sweep.all.lr=[1e-3]", "stages=['depth']"]``."""
    report: PipelineReportConfig = field(default_factory=PipelineReportConfig)
    """The report step."""
    runner: Literal["ray", "local"] = "ray"
    """How the sweep's trials run (pipeline.orchestrate.run_sweep): ray = a Ray Tune experiment (retries,
    restore, ``resources.workers_per_trial`` workers per trial); local = one after another in this process."""

    def __post_init__(self) -> None:
        labels = [os.path.basename(os.path.normpath(r)) for r in self.runs] + list(self.points)
        if len(set(labels)) != len(labels):
            raise ValueError(f"runs / points: two points share a label in {labels}; name them in points")

    @property
    def root(self) -> str:
        return io.join(self.storage, self.name)


@dataclass(frozen=True)
class Point:
    label: str
    source: str
    checkpoint: str
    """"" when the source has no usable weights yet."""
    pretrain_summary: dict[str, Any]


def resolve_point(label: str, source: str, export: str) -> Point:
    """The checkpoint of a pretraining run directory / export folder / checkpoint file ("" if missing)."""
    if io.is_local(source) and not os.path.isabs(source):
        source = os.path.abspath(source)
    candidates = [io.join(source, "export", export, "visual.pt"), io.join(source, "visual.pt")]
    checkpoint = next((c for c in candidates if io.exists(c)), "")
    fs, path = io.filesystem(source)
    if not checkpoint and fs.isfile(path):
        checkpoint = source
    summary_url = io.join(source, "summary.json")
    summary = io.read_json(summary_url) if not fs.isfile(path) and io.exists(summary_url) else {}
    return Point(label, source, checkpoint, summary)


def resolve_points(cfg: PipelineConfig) -> list[Point]:
    sources = {os.path.basename(os.path.normpath(r)): r for r in cfg.runs} | dict(cfg.points)
    return [resolve_point(label, str(src), cfg.export) for label, src in sources.items()]


def sweep_config(cfg: PipelineConfig, points: Sequence[Point]) -> SweepConfig:
    """The sweep template with this DAG's storage and one checkpoint per found point."""
    overrides = ["--" + o.removeprefix("--") for o in cfg.sweep_overrides]
    sweep = load_config(SweepConfig, cfg.sweep_config, [*overrides, "--name=sweep", f"--storage={cfg.root}"])
    found = {p.label: p.checkpoint for p in points if p.checkpoint}
    return resolve_paths(dataclasses.replace(sweep, checkpoint="", checkpoints=found))


def _samples_seen(summary: dict[str, Any]) -> float | None:
    step, batch = summary.get("step"), summary.get("global_batch")
    return float(step * batch) if isinstance(step, int) and isinstance(batch, int) else None


def builtin_report(root: str, points: Sequence[Point], rows: Sequence[dict[str, Any]]) -> str:
    """report.md / report.csv: best metric per (stage, point), points ordered by pretraining samples seen."""
    info = {p.label: p for p in points}
    order = sorted(info, key=lambda k: (_samples_seen(info[k].pretrain_summary) or 0.0, k))
    stages = sorted({r["stage"] for r in rows})
    best = {(r["point"], r["stage"]): r for r in rows if r.get("best")}
    header = ["point", "samples_seen", "pretrain_steps"]
    for stage in stages:
        metric = next(
            (r["primary_metric"] for r in rows if r["stage"] == stage and r["primary_metric"]), "metric"
        )
        header += [f"{stage}.{metric}", f"{stage}.best_trial"]
    table = []
    for label in order:
        summary = info[label].pretrain_summary
        line: list[Any] = [label, _samples_seen(summary), summary.get("step")]
        for stage in stages:
            row = best.get((label, stage))
            line += [row["primary_value"] if row else None, row["trial"] if row else ""]
        table.append(line)
    csv_text = (
        ",".join(header)
        + "\n"
        + "".join(",".join("" if v is None else str(v) for v in line) + "\n" for line in table)
    )
    io.write_text(io.join(root, "report.csv"), csv_text)
    md = [
        "# Fine-tuning transfer per pretrained checkpoint",
        "",
        "Built-in table (the report job `jobs.scaling_report` was not available): the best trial of each "
        "stage's sweep per pretrained point, points ordered by pretraining samples seen.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for line in table:
        md.append(
            "| "
            + " | ".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in line)
            + " |"
        )
    missing = [p for p in points if not p.checkpoint]
    if missing:
        md += [
            "",
            "Missing (no exported weights yet): " + ", ".join(f"{p.label} ({p.source})" for p in missing),
        ]
    io.write_text(io.join(root, "report.md"), "\n".join(md) + "\n")
    return io.join(root, "report.md")


def run_report(
    cfg: PipelineConfig, points: Sequence[Point], sweep_dir: str, rows: Sequence[dict[str, Any]]
) -> str:
    """The report step: the configured report job if importable, else the built-in table. Returns what ran."""
    report_dir = io.join(cfg.root, "report")
    points_json = io.join(cfg.root, "points.json")
    io.write_json(points_json, {p.label: dataclasses.asdict(p) for p in points})
    if cfg.report.module and importlib.util.find_spec(cfg.report.module) is not None:
        module = importlib.import_module(cfg.report.module)
        fill = {
            "root": cfg.root,
            "sweep_dir": sweep_dir,
            "report_dir": report_dir,
            "points_json": points_json,
        }
        argv = [a.format(**fill) for a in cfg.report.args]
        code = int(module.main(argv) or 0)
        if code != 0:
            raise RuntimeError(f"report: {cfg.report.module} exited with code {code}")
        return f"{cfg.report.module} -> {report_dir}"
    return f"built-in table -> {builtin_report(cfg.root, points, rows)}"


def _digest(url: str) -> str:
    fs, path = io.filesystem(url)
    return hashlib.sha1(fs.cat_file(path)).hexdigest() if fs.exists(path) else ""


def run(cfg: PipelineConfig) -> int:
    state_url = io.join(cfg.root, "pipeline.json")
    state = io.read_json(state_url) if io.exists(state_url) else {}
    if not cfg.runs and not cfg.points:
        raise ConfigError("runs / points: give at least one pretraining run or checkpoint")
    points = resolve_points(cfg)
    for p in points:
        print(
            f"[pipeline] point {p.label}: " + (p.checkpoint or f"MISSING (no export in {p.source})"),
            flush=True,
        )
    found = [p for p in points if p.checkpoint]
    if not found:
        print("[pipeline] no point has pretrained weights yet; nothing to fine-tune", file=sys.stderr)
        return 1
    sweep = sweep_config(cfg, points)
    result = run_sweep(sweep, runner=cfg.runner)
    rows, complete = result.rows, result.complete
    results_hash = _digest(io.join(sweep.sweep_dir, "results.csv"))
    if state.get("report", {}).get("results_hash") == results_hash and state["report"].get("ran"):
        print(f"[pipeline] report: up to date ({state['report']['ran']})", flush=True)
    else:
        ran = run_report(cfg, points, sweep.sweep_dir, rows)
        state["report"] = {"ran": ran, "results_hash": results_hash, "time": round(time.time(), 3)}
        print(f"[pipeline] report: {ran}", flush=True)
    state["points"] = {p.label: p.checkpoint for p in points}
    state["sweep"] = {
        "dir": sweep.sweep_dir,
        "trials": len(rows),
        "complete": sum(r["status"] == "complete" for r in rows),
    }
    io.write_json(state_url, state)
    return 0 if complete and len(found) == len(points) else 1


@job_main("python -m jobs.pipeline")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(
        PipelineConfig,
        argv,
        prog="python -m jobs.pipeline",
        description=__doc__.split("\n")[0],
        job="pipeline",
    )
    if io.is_local(cfg.storage) and not os.path.isabs(cfg.storage):
        if os.environ.get(IN_RAY_JOB_ENV):
            raise ConfigError(
                f"storage: {cfg.storage!r} is relative; under `ray job submit` give an absolute "
                "path on shared storage or an s3:// URL"
            )
        cfg = dataclasses.replace(cfg, storage=os.path.abspath(cfg.storage))
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

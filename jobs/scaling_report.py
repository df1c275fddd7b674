"""Data-scaling study: pretrain a grid of (model size x caption source x subset size x seed), fine-tune every
finished point, and write a report with fitted curves, comparisons, FLOPs and attention distances.

    python -m jobs.scaling_report --config jobs/configs/scaling_report/debug.toml --pretrain.shards=<shards>
    python -m jobs.scaling_report --config jobs/configs/scaling_report/vit_b16.toml --dry-run      # points + commands
    python -m jobs.scaling_report --config jobs/configs/scaling_report/vit_b16.toml --report-only  # no launches
    python -m jobs.scaling_report --report-only --no-grid --root=<dag root> --points-json=<dag root>/points.json

The last form reports on runs made elsewhere (e.g. by ``jobs.pipeline``, whose ``report.module`` may name
this job): no grid is planned, the report covers every run directory found under ``--collect`` folders, the
pretraining runs named in the points file and ``<root>``.

Re-running is safe: a point whose run directory has summary.json is not launched again (an interrupted one
resumes from its checkpoint), finished fine-tuning trials are not rerun, and the report is rebuilt from every
run's summary.json. Output: <root>/report/index.html (open it in a browser), report.md, report.json,
points.{csv,md,parquet}, finetune.{csv,md,parquet}, plots/. Exit code 0 when every planned point and trial
finished, 1 when the report lists missing ones. See docs/reports.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from pipeline import io
from pipeline.cli import job_main, parse_config
from pipeline.orchestrate import pretrain_command, run_finetuning, run_pretraining
from pipeline.report.scaling import ScalingConfig, plan_points, point_done, resolve_paths


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="list the grid points, their state and commands"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="launch nothing; rebuild the report from the runs"
    )
    parser.add_argument(
        "--no-grid", action="store_true", help="plan no grid: report on whatever runs are found"
    )
    parser.add_argument("--points-json", default="", help="jobs.pipeline's points.json: collect its runs too")


@job_main("python -m jobs.scaling_report")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        ScalingConfig,
        argv,
        prog="python -m jobs.scaling_report",
        description=__doc__.split("\n\n")[0],
        job="scaling_report",
        extra_args=_extra_args,
    )
    if args.points_json:
        points_file = io.read_json(args.points_json)
        sources = [p.get("source", "") for p in points_file.values() if isinstance(p, dict)]
        cfg = dataclasses.replace(
            cfg, collect=(*cfg.collect, *[s for s in sources if s and os.path.isdir(s)])
        )
    if args.no_grid:
        cfg = dataclasses.replace(cfg, collect=(*cfg.collect, cfg.root))
    cfg = resolve_paths(cfg)
    points = [] if args.no_grid else plan_points(cfg)
    if args.dry_run:
        for point in points:
            state = "complete" if point_done(point) else "pending"
            print(f"{state:9} {point.name}  (subset size {point.subset_size})")
            print(f"          {' '.join(pretrain_command(cfg, point))}")
        return 0
    launches = [] if args.report_only else run_pretraining(cfg, points)
    if args.report_only:
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, run=False))
    finetune = None if args.no_grid else run_finetuning(cfg, points)
    from pipeline.report.build import build_report

    report = build_report(cfg, points, launches, finetune)
    for line in report["verdicts"]:
        print(f"[scaling] {line['text']}")
    print(f"[scaling] report: {report['html']} ({len(report['missing'])} missing item(s))")
    for item in report["missing"]:
        print(f"[scaling] missing: {item}")
    return 0 if not report["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())

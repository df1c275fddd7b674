"""Ray Tune sweeps over fine-tuning stages; each trial is a Ray Train TorchTrainer.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.finetune_sweep --config jobs/configs/sweep/debug.toml \
        --storage=/shared/sweeps --sweep.segmentation.lr=[5e-4,2e-4]
    python -m jobs.finetune_sweep --config jobs/configs/sweep/debug.toml --dry-run    # list the trials
    python -m jobs.finetune_sweep --config jobs/configs/sweep/debug.toml --results-only

Without ``ray job submit`` it connects to ``RAY_ADDRESS`` or starts a local Ray; ``--runner=local`` runs the
trials in this process without Ray (one process per trial). The sweep is run by
``pipeline.orchestrate.run_sweep``, as in ``jobs.pipeline`` and ``jobs.scaling_report``. Running the same
command again restores the sweep: finished trials are not rerun, interrupted ones resume from their checkpoints.
Results: ``<storage>/<name>/results.{parquet,csv,md}`` and ``best.json``. Exit code 0 when every trial is
complete, 1 otherwise. Keys and search-space syntax: ``--help`` and docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.cli import job_main, parse_config
from pipeline.finetune.sweep import SweepConfig, best_markdown, expand_trials, resolve_paths, trial_done
from pipeline.orchestrate import RUNNERS, run_sweep


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="list the trials (and which are done) and exit"
    )
    parser.add_argument("--results-only", action="store_true", help="rewrite the results table; run nothing")
    parser.add_argument(
        "--runner",
        choices=sorted(RUNNERS),
        default="ray",
        help="ray: a Ray Tune experiment (default); local: trials one after another in this process, no Ray",
    )


@job_main("python -m jobs.finetune_sweep")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        SweepConfig,
        argv,
        prog="python -m jobs.finetune_sweep",
        description=__doc__.split("\n")[0],
        job="sweep",
        extra_args=_extra_args,
    )
    cfg = resolve_paths(cfg)
    if args.dry_run:
        for trial in expand_trials(cfg):
            state = "complete" if trial_done(trial) else "pending"
            print(f"{state:9} {trial.name}  ->  {trial.storage_dir}")
        return 0
    result = run_sweep(cfg, runner=args.runner, run=not args.results_only)
    print(best_markdown(result.rows), flush=True)
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())

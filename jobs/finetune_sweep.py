"""Ray Tune sweeps over fine-tuning stages; each trial is a Ray Train TorchTrainer.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.finetune_sweep --config jobs/configs/sweep/debug.toml \
        --storage=/shared/sweeps --sweep.segmentation.lr=[5e-4,2e-4]
    python -m jobs.finetune_sweep --config jobs/configs/sweep/debug.toml --dry-run    # list the trials
    python -m jobs.finetune_sweep --config jobs/configs/sweep/debug.toml --results-only

Without ``ray job submit`` it connects to ``RAY_ADDRESS`` or starts a local Ray. Running the same command
again restores the sweep: finished trials are not rerun, interrupted ones resume from their checkpoints.
Results: ``<storage>/<name>/results.{parquet,csv,md}`` and ``best.json``. Exit code 0 when every trial is
complete, 1 otherwise. Keys and search-space syntax: ``--help`` and docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.cli import job_main, parse_config
from pipeline.finetune.sweep import (
    SweepConfig,
    best_markdown,
    expand_trials,
    resolve_paths,
    trial_done,
    write_plan,
    write_results,
)


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="list the trials (and which are done) and exit"
    )
    parser.add_argument("--results-only", action="store_true", help="rewrite the results table; run nothing")


def run(cfg: SweepConfig, results_only: bool = False) -> list[dict]:
    """Run the sweep (resolved paths) and write its results table; returns the table's rows."""
    trials = expand_trials(cfg)
    write_plan(cfg, trials)
    pending = [t for t in trials if trial_done(t) is None]
    print(f"[sweep] {cfg.name}: {len(trials)} trials, {len(trials) - len(pending)} already complete; "
          f"results in {cfg.sweep_dir}", flush=True)  # fmt: skip
    errors: dict[str, str] = {}
    if pending and not results_only:
        # Ray's log deduplication drops "words with digits" and then folds lines that look alike across
        # workers, i.e. every trial's progress line but the first; keep them all (read when Ray is imported).
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        from pipeline import ray_backend  # the one module that imports Ray

        errors = ray_backend.run_tune_sweep(cfg, trials)
    return write_results(cfg, trials, errors)


@job_main("python -m jobs.finetune_sweep")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        SweepConfig, argv, prog="python -m jobs.finetune_sweep", description=__doc__.split("\n")[0],
        job="sweep", extra_args=_extra_args,
    )  # fmt: skip
    cfg = resolve_paths(cfg)
    if args.dry_run:
        for trial in expand_trials(cfg):
            state = "complete" if trial_done(trial) else "pending"
            print(f"{state:9} {trial.name}  ->  {trial.storage_dir}")
        return 0
    rows = run(cfg, results_only=args.results_only)
    print(best_markdown(rows), flush=True)
    return 0 if all(r["status"] == "complete" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

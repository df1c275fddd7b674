"""Image-text pairs (DataComp parquet + images / img2dataset output / a folder) -> WebDataset shards.

    python -m data_prep.shard --source.parquet='["meta/*.parquet"]' --output.path=shards/ \\
        --syn.paths='["syn/*.jsonl"]' --image.size=256 --subsets.fractions='[0.01, 0.1]'
    python -m data_prep.shard --config my.toml --executor ray          # Ray tasks on RAY_ADDRESS / local
    sbatch --array=0-63 --wrap "python -m data_prep.shard --config my.toml"   # a range of shards per task
    sbatch --array=0-63 --wrap "python -m data_prep.shard --config my.toml --stage plan-partition"  # then
    # plan-dedupe, plan-gather, plan, shard, merge-partition, merge-dedupe, merge (each --dependency=afterok)

Task index / count default to SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT. Every input row ends in a shard
or in failures.parquet; re-running the same command resumes. See docs/data-prep.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pipeline.cli import add_array_task_args, job_main, parse_config
from pipeline.data.prep.executors import task_from_env
from pipeline.data.prep.job import STAGES, ShardJobConfig, ShardJobError, run


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="all",
        help="plan, shard, merge, or all (default); merge runs when every shard is done. plan-partition, "
        "plan-dedupe, plan-gather (then plan), merge-partition, merge-dedupe (then merge): one step's share of "
        "this array task, for SLURM arrays chained with --dependency=afterok",
    )
    parser.add_argument(
        "--executor", choices=("local", "ray"), default=None, help="shortcut for --executor.kind=..."
    )
    add_array_task_args(parser)


@job_main("python -m data_prep.shard", user_errors=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(
        ShardJobConfig,
        argv,
        prog="python -m data_prep.shard",
        job="shard",
        description=__doc__.split("\n\n")[0],
        extra_args=_extra_args,
    )
    if args.executor:
        cfg = dataclasses.replace(cfg, executor=dataclasses.replace(cfg.executor, kind=args.executor))
    try:
        task_index, num_tasks = task_from_env(args.task_index, args.num_tasks)
        run(cfg, stage=args.stage, task_index=task_index, num_tasks=num_tasks)
    except ShardJobError as e:
        print(f"python -m data_prep.shard: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthetic captions (DataCompDR-style ``syn.json``) for WebDataset shards with CoCa or a local HF model.

    python -m data_prep.caption --config caption.toml --dry-run          # print the work plan
    python -m data_prep.caption --input.shards=shards/ --output.path=syn/ \\
        --captioner.arch=coca_ViT-L-14 --captioner.checkpoint=coca.pt --captioner.precision=bf16
    python -m data_prep.caption --config caption.toml --executor ray     # Ray Data actor pool (1 GPU / actor)
    sbatch --array=0-63 --gres=gpu:1 --wrap "python -m data_prep.caption --config caption.toml"  # shard ranges

Task index / count default to SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT. Re-running the same command
resumes: done shards are skipped, a half-done shard continues from its partial-progress file.
See docs/captioning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pipeline.caption.job import CaptionJobConfig, make_plan, run_job
from pipeline.cli import add_array_task_args, job_main, parse_config

PROG = "python -m data_prep.caption"


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the work plan and exit")
    parser.add_argument(
        "--executor", choices=("local", "ray"), default=None, help="shortcut for --execution.kind=..."
    )
    add_array_task_args(parser)


@job_main(PROG, user_errors=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(
        CaptionJobConfig,
        argv,
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        job="caption",
        extra_args=_extra_args,
    )
    ex = cfg.execution
    if args.executor:
        ex = dataclasses.replace(ex, kind=args.executor)
    if args.task_index is not None:
        ex = dataclasses.replace(ex, task_index=args.task_index)
    if args.num_tasks is not None:
        ex = dataclasses.replace(ex, num_tasks=args.num_tasks)
    cfg = dataclasses.replace(cfg, execution=ex)
    if args.dry_run:
        print(make_plan(cfg).describe(cfg))
        return 0
    summary = run_job(cfg)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

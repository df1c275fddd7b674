"""FD-CLIP feature distillation: train a fresh image tower on a pretrained CLIP's whitened output tokens.

    python -m jobs.distill --preset debug --run_dir=runs/distill               # synthetic world, debug CLIP
    python -m jobs.distill --preset fdclip --teacher.checkpoint=runs/pretrain/export/final \\
        --data.loader.shards='data/shards/{00000..00099}.tar' --run_dir=runs/distill/vit_b16
    python -m jobs.distill --help                                              # every config key

Writes config.toml, metrics.jsonl, flops.json, checkpoints/, summary.json and export/ (a full CLIP: the
teacher's text tower, the student's image tower) into ``--run_dir``; fine-tune it with
``python -m jobs.finetune --stage ... --backbone.checkpoint=<run_dir>/export``. Running the same command again
resumes from the newest checkpoint; SIGUSR1 / SIGTERM checkpoint and exit with code 124. Data-parallel on N
processes with any launcher that sets the ranks (``pipeline.dist``); ``train.batch_size`` is the global batch:

    torchrun --nproc_per_node 8 -m jobs.distill --preset fdclip --teacher.checkpoint=... --run_dir=...

See docs/distill.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch.distributed as dist

from pipeline.cli import job_main, parse_config
from pipeline.dist import PreemptionFlag, close_distributed, init_distributed, world_info_from_env
from pipeline.distill.trainer import DistillConfig, run_distill
from pipeline.train.state import Preempted


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run_dir", default="runs/distill", help="run directory (resumes from its checkpoints)"
    )


@job_main("python -m jobs.distill")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        DistillConfig,
        argv,
        prog="python -m jobs.distill",
        description=(__doc__ or "").strip().splitlines()[0],
        job="distill",
        extra_args=_extra_args,
    )
    owns_group = not dist.is_initialized()
    world = init_distributed(world_info_from_env())
    try:
        summary = run_distill(cfg, args.run_dir, preemption=PreemptionFlag())
    except Preempted as e:
        if world.is_main:
            print(f"{e}; run the same command again to resume", file=sys.stderr)
        return PreemptionFlag.EXIT_CODE
    if owns_group:  # after an error the process exits instead: a barrier could wait on a dead rank
        close_distributed()
    if not world.is_main:
        return 0
    keys = ("status", "steps", "student_position", "exports")
    print(json.dumps({k: summary.get(k) for k in keys} | {"flops_total": summary["flops"]["total"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

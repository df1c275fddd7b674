"""Fine-tune a pretrained image tower on one downstream task and evaluate it.

    python -m jobs.finetune --stage segmentation --preset synthetic \
        --backbone.checkpoint=runs/pretrain/export/open_clip.pt --run_dir=runs/ft/seg
    python -m jobs.finetune --stage depth --preset nyuv2 --data.root=/data/nyu --run_dir=runs/ft/nyu
    python -m jobs.finetune --stage classification --help          # every config key of that stage

Stages: classification, detection, segmentation, depth, region, denseclip (see docs/finetune.md). Each
writes config.toml, metrics.jsonl, checkpoints/ and summary.json into ``--run_dir``; running the same
command again resumes from the newest checkpoint. SIGUSR1 / SIGTERM checkpoint and exit with code 124.
Data-parallel on N processes with any launcher that sets the ranks (``pipeline.dist``):

    torchrun --nproc_per_node 4 -m jobs.finetune --stage detection --preset coco_vitdet ...
    srun --ntasks 8 python -m jobs.finetune --stage segmentation --preset ade20k_upernet ...

``train.batch_size`` is the global batch (each rank trains on ``batch_size / N``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from pipeline.cli import job_main, parse_config
from pipeline.dist import PreemptionFlag, close_distributed, init_distributed, world_info_from_env
from pipeline.finetune.stages import STAGES, load_stage, run_stage
from pipeline.train.state import Preempted


@job_main("python -m jobs.finetune")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(prog="python -m jobs.finetune", add_help=False)
    pre.add_argument("--stage", choices=sorted(STAGES))
    known, _ = pre.parse_known_args(argv)
    if known.stage is None:
        pre.print_usage()
        print(f"--stage is required: one of {', '.join(STAGES)} (add --help after it for that stage's keys)")
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    stage = load_stage(known.stage)

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--stage", choices=sorted(STAGES), required=True, help="which fine-tuning stage")
        parser.add_argument("--run_dir", default=f"runs/finetune/{known.stage}", help="run directory")

    cfg, args = parse_config(
        stage.STAGE_CONFIG,
        argv,
        prog=f"python -m jobs.finetune --stage {known.stage}",
        description=(stage.__doc__ or "").strip().splitlines()[0],
        job=f"finetune/{known.stage}",
        extra_args=extra,
    )
    owns_group = not dist.is_initialized()
    world = init_distributed(world_info_from_env())
    try:
        summary = run_stage(known.stage, cfg, args.run_dir, world=world, preemption=PreemptionFlag())
    except Preempted as e:
        if world.is_main:
            print(f"{e}; run the same command again to resume", file=sys.stderr)
        return PreemptionFlag.EXIT_CODE
    else:
        if owns_group:  # after an error the process exits instead: a barrier could wait on a dead rank
            close_distributed()
    if not world.is_main:
        return 0
    keys = ("stage", "status", "steps", "primary_metric", "primary_value", "train_flops")
    print(json.dumps({k: summary.get(k) for k in keys} | {"metrics": summary.get("metrics")}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

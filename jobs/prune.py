"""Subnetwork search: iterative magnitude pruning of the image encoder with a distillation loss only.

    python -m jobs.prune --preset debug --run_dir=runs/prune
    python -m jobs.prune --preset vit_b16 --backbone.checkpoint=runs/pretrain/export/final \
        --data.source=imagefolder --data.root=/data/imagenet --run_dir=runs/prune/b16
    python -m jobs.finetune --stage segmentation --backbone.checkpoint=runs/pretrain/export/final \
        --optim.masks=runs/prune/b16/masks.pt                      # fine-tune the subnetwork

Writes config.toml, metrics.jsonl, rounds/<r>/masks.pt, masks.pt + masks.json (sha256, densities) and
summary.json into ``--run_dir`` (see pipeline/finetune/prune.py and docs/finetune.md); running the same
command again resumes after the last finished round. Exit code 124 when ``train.stop_after_round`` stopped it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipeline.cli import job_main, parse_config
from pipeline.finetune.prune import PruneJobConfig, run_prune
from pipeline.train.state import Preempted

PREEMPTED_EXIT = 124


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run_dir", default="runs/prune", help="run directory")


@job_main("python -m jobs.prune")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        PruneJobConfig,
        argv,
        prog="python -m jobs.prune",
        description=__doc__.split("\n")[0],
        job="prune",
        extra_args=_extra_args,
    )
    try:
        summary = run_prune(cfg, args.run_dir)
    except Preempted as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return PREEMPTED_EXIT
    keys = ("status", "density", "masks", "masks_sha256", "per_round")
    print(json.dumps({k: summary.get(k) for k in keys}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

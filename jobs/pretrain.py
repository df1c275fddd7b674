"""CLIP pretraining with DeepSpeed ZeRO: ``python -m jobs.pretrain --preset <name> [--config FILE] [--a.b=c]``.

The same command runs under every launcher (ranks come from the environment, see ``pipeline.dist``):

    python -m jobs.pretrain --preset debug --data.shards=data/shards
    torchrun --nproc_per_node 8 -m jobs.pretrain --preset vit_b16
    deepspeed --num_gpus 8 jobs/pretrain.py --preset vit_b16      # passes --local_rank=N
    srun python -m jobs.pretrain --preset vit_b16                 # SLURM_PROCID etc.

Presets: ``--preset debug`` / ``--preset vit_b16`` (jobs/configs/pretrain/<name>.toml). ``--print-config``
prints the resolved config; ``--print-ds-config`` the DeepSpeed config it builds. Exit code 0 when done,
124 when a SIGUSR1 / SIGTERM made it checkpoint and stop (slurm/ scripts requeue on 124), 2 with a one-line
error for a bad config value or a shard spec that names no shard (``data.shards`` / ``data.syn_shards``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file (the deepspeed launcher does that): make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import job_main, parse_config  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.train.trainer import TrainConfig  # noqa: E402


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    parser.add_argument("--print-ds-config", action="store_true", help="print the DeepSpeed config and exit")


@job_main("python -m jobs.pretrain")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        TrainConfig,
        argv,
        prog="python -m jobs.pretrain",
        description=__doc__.split("\n")[0],
        job="pretrain",
        extra_args=_extra_args,
    )
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from pipeline.dist import close_distributed, world_info_from_env

    if args.print_ds_config:
        from pipeline.train.engine import deepspeed_config

        world = world_info_from_env().world_size
        split = cfg.batch_split(world)
        ds = deepspeed_config(cfg.engine, cfg.optim, split.max_micro_batch, split.accumulation, world)
        print(json.dumps(ds, indent=2, sort_keys=True))
        return 0
    from pipeline.data.loader import ShardSpecError, resolve_shards

    try:  # before any model is built: a missing shards folder is one line, not five empty epochs
        resolve_shards(cfg.data)
    except ShardSpecError as e:
        raise ConfigError(f"data.{e}") from None
    from pipeline.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        code = trainer.train()
    finally:
        trainer.close()
    close_distributed()  # ZeRO-3 can abort at exit without a final barrier + destroy
    return code


if __name__ == "__main__":
    sys.exit(main())

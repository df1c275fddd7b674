"""Train the small CoCa captioner on the synthetic world's precise captions (DataCompDR's recipe in miniature).

    python -m data_prep.train_coca --out=runs/coca_world.pt --steps=400
    python -m data_prep.train_coca --out=runs/coca_world.pt --loop-dir=runs/loop   # then caption the noisy
                                                                                    # split and report
Checkpoints go to ``<run-dir>/checkpoints/`` (``--checkpoint_interval``; default run dir: ``--out`` without its
suffix); rerunning the same command resumes from ``checkpoints/latest``. Exit code 124: checkpointed after a
preemption signal (SIGTERM / SIGUSR1) or ``--stop_after_step``, rerun to resume. The checkpoint loads with ``python -m data_prep.caption --captioner.checkpoint=runs/coca_world.pt``.
See docs/captioning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pipeline.caption.train_coca import TrainCocaConfig, train_coca
from pipeline.cli import job_main, parse_config
from pipeline.dist import PreemptionFlag
from pipeline.train.state import Preempted

PROG = "python -m data_prep.train_coca"


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="", help="checkpoint file to write")
    parser.add_argument(
        "--run-dir",
        default="",
        help="run directory (config, metrics.jsonl, checkpoints/ to resume from); default: --out without suffix",
    )
    parser.add_argument(
        "--loop-dir", default="", help="also run the whole loop here: train, caption the noisy split, report"
    )


@job_main(PROG, user_errors=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(
        TrainCocaConfig,
        argv,
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        job="train_coca",
        extra_args=_extra_args,
    )
    if args.loop_dir:
        from pipeline.caption.loop import LoopConfig, close_the_loop

        report = close_the_loop(dataclasses.replace(LoopConfig(), train=cfg), args.loop_dir)
        print(json.dumps({k: report[k] for k in ("generated", "noisy")}, sort_keys=True))
        return 0
    if not args.out:
        raise ValueError("--out: name the checkpoint file to write")
    preemption = PreemptionFlag()
    try:
        summary = train_coca(cfg, args.out, run_dir=args.run_dir or None, preemption=preemption)
    except Preempted as stopped:
        print(f"{stopped}; rerun the same command to resume", file=sys.stderr)
        return PreemptionFlag.EXIT_CODE
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

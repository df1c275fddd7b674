"""Transfer benchmark: a CLIP checkpoint pretrained by our trainer vs random initialisation, at equal steps,
on semantic segmentation and depth of the synthetic world.

    # with a checkpoint you already have (an export folder of jobs.pretrain, or any open_clip checkpoint):
    python -m benchmarks.bench_transfer --checkpoint runs/pretrain/export/final --steps 300
    # or let the benchmark pretrain the debug model first (writes shards, runs jobs.pretrain):
    python -m benchmarks.bench_transfer --pretrain_steps 1500 --steps 300 --out runs/bench_transfer

For every stage and seed both runs share everything (architecture, head, data, order of batches,
augmentation, schedule) except the image encoder's starting weights. Each run is a normal fine-tuning
run directory under ``--out`` (finished runs are reused, so an interrupted benchmark continues). Prints a
markdown table and writes ``--json_out``. A benchmark, not a test: the margin depends on how long and on
what the checkpoint was pretrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import synth_export
from pipeline.data import synthworld as sw
from pipeline.finetune.common import FinetuneTrainConfig
from pipeline.finetune.datasets import DataConfig
from pipeline.finetune.stages import load_stage

ROOT = Path(__file__).resolve().parents[1]


def write_pretraining_shards(out: Path, world: sw.WorldConfig, num_shards: int, per_shard: int) -> str:
    """WebDataset shards of world split ``train`` (schema.py layout; noisy web caption + 3 synthetic ones)."""
    synth_export.write_pretraining_shards(out, world, num_shards * per_shard, per_shard)
    return synth_export.shard_pattern(out, num_shards)


WORLDS = {"default": sw.WorldConfig, "shape_necessary": sw.shape_necessary_config}


def pretrain(
    out: Path, world: sw.WorldConfig, steps: int, num_samples: int, extra: list[str], weights: str
) -> Path:
    """Pretrain the debug CLIP with jobs.pretrain (one process) and return its export folder (``weights``:
    ``ema``, the recipe's evaluation weights, or ``final``, the raw ones)."""
    export = out / "pretrain" / "export" / weights
    if (export / "export.json").is_file():
        return export
    per_shard = 512
    shards = write_pretraining_shards(out / "shards", world, max(1, num_samples // per_shard), per_shard)
    if world.group_size > 1:  # hard-negative groups stay together in a batch
        extra = [f"--data.group_size={world.group_size}", *extra]
    args = [
        sys.executable,
        "-m",
        "jobs.pretrain",
        "--preset=debug",
        f"--steps={steps}",
        f"--data.shards={shards}",
        f"--run_dir={out / 'pretrain'}",
        "--log.progress=false",
        "--checkpoint.interval=100",
        "--engine.zero_stage=0",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(args, cwd=ROOT, env=env, check=True)
    return export


def stage_config(
    stage: str, checkpoint: str, args: argparse.Namespace, seed: int, backbone_lr_mult: float
) -> Any:
    cfg = load_stage(stage).STAGE_CONFIG()
    world = WORLDS[args.world](seed=0, image_size=64)
    return dataclasses.replace(
        cfg,
        backbone=dataclasses.replace(cfg.backbone, checkpoint=checkpoint, seed=seed),
        optim=dataclasses.replace(cfg.optim, backbone_lr_mult=backbone_lr_mult),
        data=DataConfig(num_train=args.num_train, num_val=args.num_val, world=world),
        train=FinetuneTrainConfig(
            steps=args.steps, batch_size=args.batch_size, eval_batch_size=32, log_every=25, seed=seed
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_transfer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", default="", help="pretrained checkpoint (export folder or file)")
    parser.add_argument(
        "--pretrain_steps", type=int, default=0, help="pretrain the debug model first (steps)"
    )
    parser.add_argument("--pretrain_samples", type=int, default=8192, help="pretraining pool size (scenes)")
    parser.add_argument(
        "--pretrain_arg", action="append", default=[], help="extra jobs.pretrain override (repeat)"
    )
    parser.add_argument("--weights", default="ema", choices=("ema", "final"), help="which pretraining export")
    parser.add_argument(
        "--world",
        default="default",
        choices=sorted(WORLDS),
        help="synthetic world (pretraining and fine-tuning)",
    )
    parser.add_argument("--stages", default="segmentation,depth")
    parser.add_argument(
        "--backbone_lr_mult", default="1", help="comma-separated: 1 = full fine-tuning, 0 = frozen encoder"
    )
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_train", type=int, default=512)
    parser.add_argument("--num_val", type=int, default=128)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (one run pair each)")
    parser.add_argument("--out", default="runs/bench_transfer")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args(argv)
    out = Path(args.out)
    checkpoint = args.checkpoint
    if not checkpoint:
        if args.pretrain_steps <= 0:
            parser.error("give --checkpoint (a pretrained export) or --pretrain_steps N")
        started = time.time()
        world = WORLDS[args.world](seed=0, image_size=64)
        checkpoint = str(
            pretrain(out, world, args.pretrain_steps, args.pretrain_samples, args.pretrain_arg, args.weights)
        )
        print(f"pretrained in {time.time() - started:.0f} s -> {checkpoint}", flush=True)
    rows = []
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        module = load_stage(stage)
        for mult, seed in [
            (float(m), int(s)) for m in args.backbone_lr_mult.split(",") for s in args.seeds.split(",")
        ]:
            mode = "full" if mult > 0 else "frozen"
            result: dict[str, Any] = {"stage": stage, "mode": mode, "seed": seed}
            for init, ckpt in (("pretrained", checkpoint), ("random", "")):
                started = time.time()
                name = f"{init}-seed{seed}" + ("" if mult == 1 else f"-lrmult{mult:g}")
                summary = module.run_stage(stage_config(stage, ckpt, args, seed, mult), out / stage / name)
                result[init] = summary["metrics"]
                result["metric"] = summary["primary_metric"]
                result["higher_is_better"] = summary["higher_is_better"]
                result[f"{init}_s"] = round(time.time() - started, 1)
                print(
                    f"{stage} ({mode}) seed {seed} {init}: {summary['primary_metric']} = "
                    f"{summary['primary_value']:.4f} ({result[f'{init}_s']:.0f} s)",
                    flush=True,
                )
            rows.append(result)
    report = {
        "checkpoint": checkpoint,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_train": args.num_train,
        "num_val": args.num_val,
        "world": args.world,
        "rows": rows,
    }
    print(
        "\n| stage | encoder | seed | metric | pretrained | random | pretrained better |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        for name in ("mIoU", "mAcc", "rmse", "abs_rel", "d1"):
            if name in r["pretrained"]:
                p, q = r["pretrained"][name], r["random"][name]
                better = (p > q) if name in ("mIoU", "mAcc", "d1") else (p < q)
                print(
                    f"| {r['stage']} | {r['mode']} | {r['seed']} | {name} | {p:.4f} | {q:.4f} | "
                    f"{'yes' if better else 'no'} |"
                )
    print("\n| stage | encoder | metric | seeds | pretrained (mean) | random (mean) | pretrained better in |")
    print("|---|---|---|---|---|---|---|")
    report["means"] = []
    for stage, mode in dict.fromkeys((r["stage"], r["mode"]) for r in rows):
        group = [r for r in rows if r["stage"] == stage and r["mode"] == mode]
        metric, higher = group[0]["metric"], group[0]["higher_is_better"]
        p = float(np.mean([r["pretrained"][metric] for r in group]))
        q = float(np.mean([r["random"][metric] for r in group]))
        won = sum((r["pretrained"][metric] > r["random"][metric]) == higher for r in group)
        report["means"].append(
            {
                "stage": stage,
                "mode": mode,
                "metric": metric,
                "pretrained": p,
                "random": q,
                "wins": won,
                "seeds": len(group),
            }
        )
        print(f"| {stage} | {mode} | {metric} | {len(group)} | {p:.4f} | {q:.4f} | {won} of {len(group)} |")
    wins = [(r["pretrained"][r["metric"]] > r["random"][r["metric"]]) == r["higher_is_better"] for r in rows]
    print(f"\nprimary metric better with the pretrained checkpoint in {sum(wins)} of {len(wins)} run pairs")
    report["primary_wins"] = int(np.sum(wins))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Samples/s of our trainer against open_clip's own training entry point, side by side in one run.

    python -m benchmarks.bench_trainer                        # 2 processes, debug CLIP, global batch 64, CPU
    python -m benchmarks.bench_trainer --procs 1 --steps 40 --precision bf16

Both trainers get the same synthetic-world shards, the same model (``debug``: tiny CLIP at 64 px), the same
global batch split over the same number of processes (torchrun, gloo), one loader worker per process, the
same exact contrastive loss (open_clip: ``--local-loss --gather-with-grad``; ours: the web-caption term only,
``loss.w_syn = 0``, so both embed one caption per image). Runs alternate (ours, open_clip, ours, ...) to
spread machine noise; samples/s is the global batch over the mean step time of each log interval (open_clip's
``Batch (t)``, our ``step_time_s``), the first intervals skipped as warm-up, median over intervals and runs.
On a shared machine wall-clock rates swing with the load, so it also reports samples per *marginal*
CPU-second: each trainer also runs ``--short-steps`` steps, and the difference in user + sys time of all its
processes (loader workers included) between the long and the short run, over the extra samples, is the
steady-state CPU cost per sample with start-up and final save cancelled out.

open_clip specifics handled here (see docs/benchmarks.md): its DDP wrapper passes the CPU device as
``device_ids`` (a wrapper drops it), and with webdataset 1.0.2 its loader raises ``KeyError: 'fname'`` when
a shard ends, so each shard is made larger than what one epoch plus the shuffle buffer reads from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_SHUFFLE_READAHEAD = 5000
"""open_clip's sample shuffle buffer (``_SAMPLE_SHUFFLE_SIZE``): samples it reads ahead of the batch."""


def write_shards(out: Path, num_shards: int, per_shard: int) -> str:
    """Synthetic-world shards of our schema (jpg q90, txt, 2 syn captions, json); reused when already there."""
    from pipeline.data import synthworld as sw
    from pipeline.data.synth_export import shard_pattern, write_pretraining_shards

    pattern = shard_pattern(out, num_shards)
    marker = out / f"done-{num_shards}x{per_shard}"
    if marker.exists():
        return pattern
    world = sw.WorldConfig(image_size=64)
    write_pretraining_shards(out, world, num_shards * per_shard, per_shard, "train", num_syn=2, quality=90)
    (out / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": per_shard for s in range(num_shards)}))
    marker.write_text("")
    return pattern


def _torchrun(procs: int, port: int, module_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={procs}",
        f"--master_port={port}",
        *module_args,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_ours(args: argparse.Namespace, shards: str, out: Path, port: int) -> list[float]:
    micro = args.batch // args.procs
    cmd = _torchrun(
        args.procs,
        port,
        [
            "-m",
            "jobs.pretrain",
            "--preset=debug",
            f"--run_dir={out}",
            f"--data.shards={shards}",
            f"--steps={args.steps}",
            f"--global_batch={args.batch}",
            f"--data.micro_batch={micro}",
            f"--data.num_workers={args.workers}",
            "--loss.w_syn=0",
            f"--engine.zero_stage={args.zero_stage}",
            f"--engine.precision={args.precision}",
            f"--log.interval={args.log_every}",
            "--log.progress=false",
            "--checkpoint.interval=0",
            "--export=false",
            "--ema.enabled=false",
            "--optim.warmup_steps=10",
        ],
    )
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=not args.verbose)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [args.batch / r["step_time_s"] for r in rows if "step_time_s" in r]


def run_open_clip(args: argparse.Namespace, shards: str, out: Path, port: int) -> list[float]:
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    cmd = _torchrun(
        args.procs,
        port,
        [
            "-m",
            "benchmarks.bench_trainer",
            "--open-clip-worker",
            "--",
            "--train-data",
            shards,
            "--dataset-type",
            "webdataset",
            "--train-num-samples",
            str(args.steps * args.batch),
            "--batch-size",
            str(args.batch // args.procs),
            "--epochs",
            "1",
            "--workers",
            str(args.workers),
            "--model",
            "debug",
            "--lr",
            "1e-3",
            "--wd",
            "0.2",
            "--beta1",
            "0.9",
            "--beta2",
            "0.95",
            "--warmup",
            "10",
            "--precision",
            precision,
            "--device",
            "cpu",
            "--local-loss",
            "--gather-with-grad",
            "--log-every-n-steps",
            str(args.log_every),
            "--logs",
            str(out),
            "--name",
            "oc",
            "--seed",
            "0",
            "--save-frequency",
            "0",
            "--report-to",
            "",
            "--grad-clip-norm",
            "1.0",
        ],
    )
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=not args.verbose)
    text = (out / "oc" / "out.log").read_text()
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    return [args.batch / t for t in times if t > 0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def open_clip_worker(argv: Sequence[str]) -> None:
    """Inside torchrun: register our debug config, make DDP accept the CPU device, run open_clip_train."""
    import torch

    import pipeline.model.clip  # noqa: F401  (registers the debug architecture with open_clip)

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):  # open_clip passes device_ids=[cpu device]; DDP wants None on CPU
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    from open_clip_train.main import main as open_clip_main

    open_clip_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--open-clip-worker":
        open_clip_worker(argv[2:] if len(argv) > 1 and argv[1] == "--" else argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_trainer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--procs", type=int, default=2, help="processes (ranks) per trainer")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument(
        "--short-steps", type=int, default=20, help="steps of the short run (CPU-time baseline)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="long + short run pairs per trainer (alternating)"
    )
    parser.add_argument("--workers", type=int, default=1, help="loader workers per process")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--zero-stage",
        type=int,
        default=None,
        help="our ZeRO stage (default: 0 = plain data parallel, as DDP, for fp32; 1 for bf16, whose fp32 "
        "gradient accumulation needs a ZeRO optimizer)",
    )
    parser.add_argument("--log-every", type=int, default=5, help="steps per log interval")
    parser.add_argument("--skip", type=int, default=2, help="warm-up log intervals left out")
    parser.add_argument("--out", default="runs/bench_trainer", help="work folder (shards are reused)")
    parser.add_argument("--verbose", action="store_true", help="show the trainers' output")
    args = parser.parse_args(argv)
    if args.zero_stage is None:
        args.zero_stage = 1 if args.precision == "bf16" else 0
    if args.batch % args.procs:
        parser.error("--batch must be a multiple of --procs")
    if not 0 < args.short_steps < args.steps:
        parser.error("--short-steps must be between 0 and --steps")
    out = Path(args.out).resolve()
    per_slot = args.steps * args.batch // args.procs + OPEN_CLIP_SHUFFLE_READAHEAD + 1000
    shards = write_shards(out / "shards", num_shards=args.procs * max(1, args.workers), per_shard=per_slot)
    names = ("ours", "open_clip")
    runners = {"ours": run_ours, "open_clip": run_open_clip}
    wall: dict[str, list[float]] = {n: [] for n in names}  # per repeat: median samples/s of the long run
    cpu: dict[str, list[float]] = {n: [] for n in names}  # per repeat: samples per marginal CPU-second
    port = 29500 + os.getpid() % 1000
    short = argparse.Namespace(**{**vars(args), "steps": args.short_steps})
    for r in range(args.repeats):
        used: dict[str, dict[str, float]] = {n: {} for n in names}
        for length, run_args in (("long", args), ("short", short)):
            for name in names:
                run_dir = out / f"{name}-{length}-{r}-{int(time.time())}"
                start, before = time.perf_counter(), _children_cpu()
                port += 1
                rates = runners[name](run_args, shards, run_dir, port)
                used[name][length] = _children_cpu() - before
                if length == "long":
                    wall[name].append(statistics.median(rates[args.skip :]))
                print(
                    f"{name} {length} run {r}: {statistics.median(rates[args.skip :]):.1f} samples/s, "
                    f"{used[name][length]:.0f} CPU-s ({time.perf_counter() - start:.0f} s wall)",
                    flush=True,
                )
        for name in names:
            extra = (args.steps - args.short_steps) * args.batch
            cpu[name].append(extra / (used[name]["long"] - used[name]["short"]))
    ours, theirs = statistics.median(wall["ours"]), statistics.median(wall["open_clip"])
    ours_cpu, theirs_cpu = statistics.median(cpu["ours"]), statistics.median(cpu["open_clip"])
    pair_ratios = [a / b for a, b in zip(wall["ours"], wall["open_clip"])]
    summary = {
        "procs": args.procs,
        "global_batch": args.batch,
        "steps": args.steps,
        "short_steps": args.short_steps,
        "precision": args.precision,
        "zero_stage": args.zero_stage,
        "workers": args.workers,
        "ours_samples_per_s": [round(x, 1) for x in wall["ours"]],
        "open_clip_samples_per_s": [round(x, 1) for x in wall["open_clip"]],
        "wall_ratio_per_repeat": [round(x, 3) for x in pair_ratios],
        "ours_samples_per_marginal_cpu_s": [round(x, 1) for x in cpu["ours"]],
        "open_clip_samples_per_marginal_cpu_s": [round(x, 1) for x in cpu["open_clip"]],
        "cpu_ratio": round(ours_cpu / theirs_cpu, 3),
    }
    print(
        f"\n| trainer | samples/s (median of runs) | per process | samples per marginal CPU-s |\n|---|---|---|---|\n"
        f"| ours (DeepSpeed ZeRO-{args.zero_stage}, {args.precision}) | {ours:.1f} | {ours / args.procs:.1f} | {ours_cpu:.1f} |\n"
        f"| open_clip_train.main (DDP, {args.precision}) | {theirs:.1f} | {theirs / args.procs:.1f} | {theirs_cpu:.1f} |\n"
        f"\nours / open_clip: samples/s per repeat {[round(x, 3) for x in pair_ratios]} "
        f"(median {statistics.median(pair_ratios):.3f}); per marginal CPU-s {ours_cpu / theirs_cpu:.3f}"
    )
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

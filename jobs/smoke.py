"""A tiny distributed job for checking a cluster before spending GPU hours on it.

    python -m jobs.smoke --run_dir=runs/smoke --steps=20
    python -m jobs.submit --target slurm --job smoke --config my_smoke.toml --launch.slurm.nodes=2

It behaves like the trainer where the cluster is concerned, and nothing else: reads rank and world from the
environment (pipeline.dist), all-reduces over gloo (or NCCL on GPUs) every step, writes metrics.jsonl and a
checkpoint per step, resumes from `checkpoints/latest`, and on SIGUSR1/SIGTERM finishes the step, saves and
exits with 124 ("requeue me"). Each rank records what it saw in `ranks/rank<N>.json`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import io
from pipeline.cli import job_main, parse_config

PROG = "python -m jobs.smoke"


@dataclass(frozen=True)
class SmokeConfig:
    run_dir: str = "runs/smoke"
    """Where metrics, checkpoints and per-rank reports go."""
    steps: int = 20
    """Total steps (a resumed run continues to this many)."""
    step_seconds: float = 0.2
    """Sleep per step, standing in for compute."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.step_seconds < 0:
            raise ValueError(f"step_seconds must be >= 0, got {self.step_seconds}")


def _latest_step(checkpoints: Path) -> int:
    latest = checkpoints / "latest"
    if not latest.exists():
        return 0
    step = int(latest.read_text().strip())
    state = json.loads((checkpoints / str(step) / "state.json").read_text())
    return int(state["step"])


def _save(checkpoints: Path, step: int, value: float) -> None:
    io.write_json(str(checkpoints / str(step) / "state.json"), {"step": step, "value": value})
    io.write_text(str(checkpoints / "latest"), f"{step}\n")


def run(cfg: SmokeConfig) -> int:
    import torch
    import torch.distributed as dist

    from pipeline.dist import PreemptionFlag, close_distributed, init_distributed
    from pipeline.run_dir import RunDir

    preempt = PreemptionFlag()
    info = init_distributed()
    run_dir = RunDir(cfg.run_dir, rank=info.rank)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    start = _latest_step(run_dir.checkpoints)
    run_dir.truncate_metrics_after(start)
    report = {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "world_size": info.world_size,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "restart": restart,
        "start_step": start,
        "code": str(Path(__file__).resolve()),
        "env": {
            k: v for k, v in os.environ.items() if k.startswith(("OMP_", "NCCL_", "TORCH_NCCL_", "MASTER_"))
        },
    }
    io.write_json(str(run_dir.path / "ranks" / f"rank{info.rank}-restart{restart}.json"), report)
    exit_code = 0
    for step in range(start + 1, cfg.steps + 1):
        time.sleep(cfg.step_seconds)
        t = torch.tensor([float(info.rank + 1)])
        if dist.is_initialized():
            dist.all_reduce(t)
        expected = info.world_size * (info.world_size + 1) / 2
        if t.item() != expected:
            raise RuntimeError(f"all-reduce gave {t.item()}, expected {expected}")
        value = 1.0 / step  # a stand-in loss: strictly decreasing, so a repeated step shows
        run_dir.log({"loss": value, "world_size": info.world_size, "restart": restart}, step=step)
        if info.rank == 0:
            _save(run_dir.checkpoints, step, value)
        if preempt.any_rank_set():
            print(
                f"[rank {info.rank}] {preempt.signal_name or 'peer signal'}: saved step {step}, exiting "
                f"{PreemptionFlag.EXIT_CODE}",
                flush=True,
            )
            exit_code = PreemptionFlag.EXIT_CODE
            break
    else:
        run_dir.write_summary({"steps": cfg.steps, "world_size": info.world_size, "restarts": restart})
    close_distributed()
    return exit_code


@job_main(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(SmokeConfig, argv, prog=PROG, description=__doc__)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

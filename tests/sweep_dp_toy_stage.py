"""A data-parallel toy stage (``DATA_PARALLEL = True``) for testing Ray sweeps whose trials have several
workers: every rank joins a real all-reduce over the trial's process group (the gloo group Ray Train's
``TorchTrainer`` forms), rank 0 then trains the single-process toy stage (tests/sweep_toy_stage.py) and
records the group it ran in, and every rank returns the summary after a barrier.

Sweep it with ``stages = ["sweep_dp_toy_stage"]`` and ``resources.workers_per_trial = 2`` (tests/ on the
workers' PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sweep_toy_stage import ToyConfig
from sweep_toy_stage import run_stage as run_single_process_stage

DATA_PARALLEL = True
STAGE_CONFIG = ToyConfig


def run_stage(cfg: ToyConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sweep_dp_toy_stage runs inside an initialised process group")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)  # 1 + 2 + ... + world_size on every rank
    ranks: list[dict[str, Any]] = [{} for _ in range(world_size)]
    me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "all_reduce": value.item()}
    dist.all_gather_object(ranks, me)
    summary: dict[str, Any] = {}
    if rank == 0:
        summary = run_single_process_stage(cfg, run_dir, preemption)
        group = {"world_size": world_size, "backend": str(dist.get_backend()), "ranks": ranks}
        (Path(run_dir) / "group.json").write_text(json.dumps(group, sort_keys=True))
    dist.barrier()
    return summary or json.loads((Path(run_dir) / "summary.json").read_text())

"""The one module that turns the launcher's environment into ranks (torchrun, deepspeed, srun, PyTorchJob).

``world_info_from_env()`` reads torchrun/deepspeed variables (RANK, LOCAL_RANK, WORLD_SIZE), then SLURM's
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS), then MPI's; ``init_distributed`` picks gloo on CPU and nccl on
CUDA. Rank-0 helpers and preemption handling live here too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def world_info_from_env() -> WorldInfo:
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE") or 1
    rank = _env_int("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE") or 1
    return WorldInfo(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world)


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.CalledProcessError):
        return nodelist.split(",")[0]


def device_for(info: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(info: WorldInfo | None = None) -> WorldInfo:
    """Initialise torch.distributed when world_size > 1 (env:// rendezvous; SLURM fills MASTER_ADDR/PORT)."""
    info = info or world_info_from_env()
    if info.world_size <= 1 or dist.is_initialized():
        return info
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr() if "SLURM_PROCID" in os.environ else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ["MASTER_PORT"] = str(20000 + job % 20000)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device_for(info))
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args: object, **kwargs: object) -> None:
    if world_info_from_env().rank == 0:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


class PreemptionFlag:
    """Set by SIGUSR1 / SIGTERM; the training loop checks it after each step, saves, and exits."""

    EXIT_CODE = 124
    """Exit code meaning "checkpointed after a preemption signal, requeue me" (slurm/ scripts read it)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def any_rank_set(self) -> bool:
        """True on every rank when any rank got the signal (one all-reduce)."""
        flag = self.is_set()
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1.0 if flag else 0.0])
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
        return flag

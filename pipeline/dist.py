"""The one module that turns the launcher's environment into ranks (torchrun, deepspeed, srun, PyTorchJob).

``world_info_from_env()`` reads torchrun/deepspeed variables (RANK, LOCAL_RANK, WORLD_SIZE), then SLURM's
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS), then MPI's; ``init_distributed`` picks gloo on CPU and nccl on
CUDA. Rank-0 helpers, preemption handling (``PreemptionFlag``) and tying a worker's life to its launcher's
(``exit_with_launcher``) live here too.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
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


def resolve_device(name: str) -> torch.device:
    """A config's ``device``: ``"auto"`` (CUDA when available, else CPU) or any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(info: WorldInfo | None = None) -> WorldInfo:
    """Initialise torch.distributed when world_size > 1 (env:// rendezvous; SLURM fills MASTER_ADDR/PORT).

    Under torchrun the process is first tied to its launcher (:func:`exit_with_launcher`)."""
    exit_with_launcher()
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


PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal this process gets when the thread that created it exits."""


def launched_by_torchrun() -> bool:
    """True in a worker started by torchrun / torch elastic (its agent exports TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_with_launcher(force: bool = False) -> bool:
    """Make this process die with its launcher: SIGKILL on the parent's death (Linux ``PR_SET_PDEATHSIG``).

    torchrun starts each worker in a session of its own, so a SIGKILL to the launcher (or its process group)
    leaves the workers running, holding memory and blocked in a collective where they ignore SIGTERM. The
    worker's parent is the torchrun agent: when it dies, the kernel now kills the worker. Applied under
    torchrun (or with ``force``) only: a job started from a shell must survive that shell. If the parent is
    already gone (we were reparented before getting here) the process exits at once. Returns True when set.
    """
    if not (force or launched_by_torchrun()) or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1 or os.getppid() != parent:  # the launcher died before the prctl took effect
        os._exit(128 + signal.SIGKILL)
    return True


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args: object, **kwargs: object) -> None:
    if world_info_from_env().rank == 0:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


class PreemptionFlag:
    """Set by SIGUSR1 / SIGTERM; the training loop checks it after each step, saves, and exits.

    Python runs signal handlers in the main thread between bytecodes, so a main thread blocked in a collective
    (a peer died; gloo / NCCL wait up to their timeout) never sees the signal. A watcher thread reads every
    signal from ``signal.set_wakeup_fd`` (written by the C-level handler, blocked or not) and exits the
    process hard (``os._exit(128 + SIGTERM)``) on a second SIGTERM, or when the main thread's handler has not
    run ``unresponsive_exit_s`` seconds after a SIGTERM. SIGUSR1 (checkpoint and requeue) never exits hard.
    """

    EXIT_CODE = 124
    """Exit code meaning "checkpointed after a preemption signal, requeue me" (slurm/ scripts read it)."""

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM),
        unresponsive_exit_s: float = 30.0,
    ) -> None:
        self._event = threading.Event()
        self._handled = threading.Event()  # set by the main thread's handler for a SIGTERM
        self.signal_name: str | None = None
        self.unresponsive_exit_s = unresponsive_exit_s
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handler)
            if signal.SIGTERM in signals:
                self._watch_sigterm()

    def _handler(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            self._handled.set()
        self._event.set()

    def _watch_sigterm(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        os.register_at_fork(after_in_child=_drop_wakeup_fd)  # a forked loader worker's SIGTERM is not ours
        threading.Thread(target=self._watch, args=(read_fd,), name="sigterm-watch", daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        count, deadline = 0, None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([read_fd], [], [], timeout)
            if readable:
                for signum in os.read(read_fd, 64):
                    if signum == signal.SIGTERM:
                        count += 1
                        if count >= 2:
                            _hard_exit("a second SIGTERM")
                        deadline = time.monotonic() + self.unresponsive_exit_s
            elif deadline is not None:
                if not self._handled.is_set():
                    _hard_exit(
                        f"SIGTERM not handled within {self.unresponsive_exit_s:g} s (blocked in a collective?)"
                    )
                deadline = None

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


def _drop_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from a thread other than the main one: nothing was inherited to drop
        pass


def _hard_exit(why: str) -> None:
    print(f"[rank {world_info_from_env().rank}] exiting hard: {why}", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)

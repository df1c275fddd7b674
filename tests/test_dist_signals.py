"""Workers never outlive their launcher, and SIGTERM works while a worker is blocked in a collective.

    .venv/bin/pytest tests/test_dist_signals.py -q        # ~20 s on a 2-core CPU

Both tests start two real ranks (gloo) of a small script that joins the process group through
``pipeline.dist.init_distributed`` (the trainer's path), installs :class:`pipeline.dist.PreemptionFlag`,
and then blocks: rank 0 in an all-reduce that rank 1 never joins, rank 1 in a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ports import free_port
from trainer_fixtures import ROOT, pretrain_env, wait_for

WORKER = r"""
import os, sys, time
import torch
import torch.distributed as dist
from pipeline.dist import PreemptionFlag, init_distributed

flag = PreemptionFlag(unresponsive_exit_s=float(os.environ.get("UNRESPONSIVE_S", "30")))
info = init_distributed()
open(os.path.join(sys.argv[1], f"rank{info.rank}.pid"), "w").write(str(os.getpid()))
if info.rank == 0:
    dist.all_reduce(torch.ones(1))  # blocks: rank 1 never joins
else:
    while True:
        time.sleep(1)
"""


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids(folder: Path, world_size: int) -> list[int] | None:
    files = [folder / f"rank{r}.pid" for r in range(world_size)]
    texts = [f.read_text() if f.exists() else "" for f in files]
    return [int(t) for t in texts] if all(texts) else None


def test_torchrun_workers_exit_when_the_launcher_is_sigkilled(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = pretrain_env(0, 1, 0)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(script),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: pids(tmp_path, 2) is not None, 120, "both workers to start")
        workers = pids(tmp_path, 2)
        time.sleep(1.0)  # rank 0 is now blocked in the all-reduce
        assert all(alive(pid) for pid in workers)
        launcher.kill()  # SIGKILL: torchrun cannot forward anything
        launcher.wait(10)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if alive(pid)]
        assert not survivors, f"workers {survivors} outlived their SIGKILLed torchrun launcher"
    finally:
        for pid in pids(tmp_path, 2) or []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_sigterm_ends_a_rank_blocked_in_a_collective_and_a_second_sigterm_ends_any_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**pretrain_env(rank, 2, port), "UNRESPONSIVE_S": "2"}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        )
    try:
        wait_for(lambda: pids(tmp_path, 2) is not None, 120, "both ranks to start")
        time.sleep(1.0)
        # Rank 0 is blocked in gloo: its Python handler cannot run, the watcher exits it after 2 s.
        start = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(15) == 128 + signal.SIGTERM
        assert 1.5 <= time.monotonic() - start < 10
        assert "not handled within 2 s" in procs[0].stderr.read().decode()
        # Rank 1 handles the first SIGTERM (it only sets the preemption flag); the second ends it at once.
        procs[1].send_signal(signal.SIGTERM)
        time.sleep(3.0)
        assert procs[1].poll() is None
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(5) == 128 + signal.SIGTERM
        assert "a second SIGTERM" in procs[1].stderr.read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

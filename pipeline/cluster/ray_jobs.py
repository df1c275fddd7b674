"""``ray job submit`` command lines (the ray CLI is run as a program: Ray itself is not imported here).

    ray job submit --address http://HEAD:8265 --working-dir <submission folder> \
        --runtime-env-json '{"env_vars": {...}}' -- python -m jobs.finetune_sweep --config job.toml

The submission folder (code snapshot + job.toml) is uploaded as the working directory, so the driver runs
exactly the submitted code with the resolved config, on any Ray cluster: a local `ray start --head`, Ray on
SLURM (slurm/ray_cluster.sbatch), or a KubeRay cluster.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from pipeline.cluster.config import LaunchConfig

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def ray_executable(launch: LaunchConfig, python: str) -> str:
    if launch.ray.ray:
        return launch.ray.ray
    beside = Path(python).with_name("ray")
    return str(beside) if os.path.isabs(python) and beside.exists() else "ray"


def address(launch: LaunchConfig) -> str:
    return launch.ray.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def submit_command(
    launch: LaunchConfig,
    *,
    working_dir: Path,
    module: str,
    config: str,
    python: str,
    submission_id: str = "",
    workdir: Path | None = None,
    upload: bool = True,
) -> list[str]:
    """The full `ray job submit` argv; the driver is `python -m <module> --config <config>`.

    With ``upload`` (``ray.upload`` when set) ``working_dir`` (the submission folder) is uploaded and the
    driver runs in it; otherwise it runs from ``workdir`` with the snapshot first on PYTHONPATH (shared
    filesystems).
    """
    r = launch.ray
    env = launch.env.variables(cpus_per_task=max(1, int(r.entrypoint_num_cpus) or 1))
    cmd = [ray_executable(launch, python), "job", "submit", f"--address={address(launch)}"]
    if submission_id:
        cmd.append(f"--submission-id={submission_id}")
    if upload if r.upload is None else r.upload:
        cmd.append(f"--working-dir={working_dir}")
        driver = ["python", "-m", module, "--config", config]
    else:
        env.update(PYTHONPATH=str(working_dir), PYTHONSAFEPATH="1")
        where = shlex.quote(str(workdir or Path.cwd()))
        driver = [
            "bash",
            "-c",
            f"cd {where} && exec python -m {module} --config {shlex.quote(str(working_dir / config))}",
        ]
    cmd.append(f"--runtime-env-json={json.dumps({'env_vars': env}, sort_keys=True)}")
    if r.entrypoint_num_cpus:
        cmd.append(f"--entrypoint-num-cpus={r.entrypoint_num_cpus}")
    if r.entrypoint_num_gpus:
        cmd.append(f"--entrypoint-num-gpus={r.entrypoint_num_gpus}")
    if r.no_wait:
        cmd.append("--no-wait")
    return [*cmd, "--", *driver]

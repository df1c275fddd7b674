"""The SLURM scripts on a real single-node SLURM cluster (started by tests/slurm_cluster.py).

Every job is submitted the way a user would (jobs.submit: code snapshot + resolved config, rendered sbatch):
a distributed smoke job (ranks, rendezvous, signal -> checkpoint -> requeue -> resume), the shard job as a
2-task array over the synthetic world, and DeepSpeed pretraining as 2 srun tasks that are preempted with
`scancel --batch --signal=USR1`, requeue themselves and finish from their checkpoint, step for step equal
to an uninterrupted run. Skipped only where the SLURM binaries are absent (ci/install-system.sh installs them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from ports import free_port
from slurm_cluster import SlurmCluster, find_binary, missing_binaries, slurm_cluster

from jobs.registry import JOBS
from pipeline.cluster.config import LaunchConfig
from pipeline.cluster.submit import Plan, SubmitRequest, make_plan, submit
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster():
    # 4 CPUs on a 2-core machine: the preempted and the reference pretraining runs may overlap.
    with slurm_cluster(cpus=4) as c:
        yield c


def submit_job(
    cluster: SlurmCluster,
    job: str,
    workdir: Path,
    *,
    config: str | None = None,
    overrides: tuple[str, ...] = (),
    launch: tuple[str, ...] = (),
) -> tuple[Plan, str]:
    launch_cfg = load_config(LaunchConfig, None, list(launch), base=LaunchConfig())
    plan = make_plan(SubmitRequest("slurm", job, config, overrides, launch_cfg, workdir=str(workdir)), JOBS)
    record = submit(plan, env=cluster.env)
    return plan, record["job_id"]


def wait_for_metrics(path: Path, rows: int, cluster: SlurmCluster, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= rows):
        states = cluster.jobs(job_id)
        if states and all(s.done for s in states):
            raise AssertionError(f"job {job_id} ended before logging {rows} steps: {states}")
        if time.monotonic() > deadline:
            tail = "\n".join(slurm_log(path.parent).splitlines()[-20:])
            raise TimeoutError(f"no {rows} metric rows in {path} after {timeout} s; job log:\n{tail}")
        time.sleep(0.3)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def slurm_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out")))


def preempt_and_finish(
    cluster: SlurmCluster, job_id: str, run_dir: Path, after_rows: int, timeout: float = 240
) -> list:
    """Send the preemption signal once `after_rows` steps are logged; wait for the requeued job to finish."""
    wait_for_metrics(run_dir / "metrics.jsonl", after_rows, cluster, job_id, timeout)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    return cluster.wait(job_id, timeout, on_poll=cluster.release_requeued)


# --- the smoke job: ranks, environment, snapshot, requeue -----------------------------------------------------
def test_distributed_job_gets_ranks_from_srun_runs_from_its_snapshot_and_requeues_after_usr1(
    cluster, tmp_path
):
    run_dir = tmp_path / "smoke"
    plan, job_id = submit_job(
        cluster,
        "smoke",
        tmp_path,
        overrides=("--steps=8", "--step_seconds=0.2"),
        launch=(f"--run_dir={run_dir}", "--slurm.tasks_per_node=2", "--env.nccl.NCCL_DEBUG=INFO"),
    )
    states = preempt_and_finish(cluster, job_id, run_dir, after_rows=2)
    log = slurm_log(run_dir)
    assert [(s.state, s.exit_code, s.restarts) for s in states] == [("COMPLETED", "0:0", 1)], log
    assert "received SIGUSR1: forwarding it to the training step" in log
    assert "requeueing" in log

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # each step once: none repeated, none lost
    assert [r["restart"] for r in rows] != [0] * 8  # the tail ran after the requeue
    reports = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    assert sorted((r["restart"], r["rank"]) for r in reports) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first_resumed = min(r["step"] for r in rows if r["restart"] == 1)
    for r in reports:
        assert r["world_size"] == 2
        assert r["start_step"] == (0 if r["restart"] == 0 else first_resumed - 1)
        assert Path(r["code"]).is_relative_to(plan.record_dir), (
            "the job must run the snapshot, not the checkout"
        )
        assert r["env"]["OMP_NUM_THREADS"] == "1" and r["env"]["NCCL_DEBUG"] == "INFO"
        assert r["env"]["MASTER_ADDR"] == "localhost"
        assert r["env"]["MASTER_PORT"] == str(20000 + int(job_id) % 20000)


# --- data prep: the shard job as a 2-task array ----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from data_prep.synthworld import main as synthworld

    out = tmp_path_factory.mktemp("world")
    assert synthworld(["--preset=debug", f"--out={out}", "--layouts=datacomp", "--num_samples=128"]) == 0
    return out / "datacomp"


def shard_config(world: Path, path: Path) -> Path:
    path.write_text(
        "[source]\n"
        f"parquet = ['{world}/metadata/*.parquet']\n"
        "[syn]\n"
        f"paths = ['{world}/syn/syn_captions.jsonl']\n"
        "[image]\n"
        "size = 64\n"
        "[output]\n"
        "path = 'shards'\n"  # relative: to the submission's working directory, as on a laptop
        "samples_per_shard = 32\n"
        "[executor]\n"
        "processes = 1\n"
        "progress = false\n"
    )
    return path


@pytest.fixture(scope="module")
def array_shards(cluster, world, tmp_path_factory) -> tuple[Path, Plan, list]:
    workdir = tmp_path_factory.mktemp("shard-array")
    config = shard_config(world, workdir / "shard.toml")
    plan, job_id = submit_job(
        cluster,
        "shard",
        workdir,
        config=str(config),
        launch=("--slurm.array_tasks=2", f"--run_dir={workdir / 'run'}"),
    )
    states = cluster.wait(job_id, timeout=180)
    return workdir / "shards", plan, states


def test_shard_job_runs_as_a_two_task_array_over_the_synthetic_world(array_shards, world, tmp_path):
    from data_prep.shard import main as shard

    shards, plan, states = array_shards
    log = slurm_log(plan.run_dir)
    assert sorted((s.array_task_id, s.state, s.exit_code) for s in states) == [
        ("0", "COMPLETED", "0:0"),
        ("1", "COMPLETED", "0:0"),
    ], log
    for task in (0, 1):
        assert f"array task {task}/2" in log
    written = [int(n) for n in re.findall(r"shards written / skipped \(this run\)\s+(\d+) / \d+", log)]
    assert sorted(written) == [2, 2], log  # 4 shards, each task wrote its own half

    totals = json.loads((shards / "manifest.json").read_text())["totals"]
    assert totals["input"] == 128 and totals["kept"] + totals["failed"] == 128

    # The same job in one local process writes byte-identical shards and manifest.
    local = tmp_path / "local"
    config = shard_config(world, tmp_path / "local.toml")
    assert shard(["--config", str(config), f"--output.path={local}"]) == 0
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert tars == sorted(p.name for p in local.glob("*.tar")) and len(tars) == 4
    for name in [*tars, "manifest.json", "sizes.json"]:
        assert (shards / name).read_bytes() == (local / name).read_bytes(), name


# --- pretraining: 2 DeepSpeed tasks over srun, preempted, requeued, resumed ---------------------------------
PRETRAIN_OVERRIDES = (
    "--steps=30",
    "--global_batch=16",
    "--data.micro_batch=8",
    "--data.num_workers=0",
    "--log.interval=1",
    "--log.progress=false",
    "--checkpoint.interval=0",
    "--export=false",
    "--optim.warmup_steps=2",
)


def prebuild_deepspeed_ops() -> None:
    """Build DeepSpeed's CPU shared-memory op here, not inside the SLURM tasks.

    DeepSpeed compiles it on first use under a lock file in TORCH_EXTENSIONS_DIR (which the jobs inherit);
    a task cancelled mid-build would leave that lock behind and every later DeepSpeed start would wait on it.
    """
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


@pytest.mark.slow
def test_pretraining_checkpoints_requeues_and_continues_its_loss_curve_after_preemption(
    cluster, array_shards, tmp_path
):
    prebuild_deepspeed_ops()
    shards = array_shards[0]
    launch = ("--slurm.tasks_per_node=2", "--slurm.cpus_per_task=1")
    overrides = (f"--data.shards={shards}", *PRETRAIN_OVERRIDES)
    config = str(REPO / "jobs" / "configs" / "pretrain" / "debug.toml")

    def submit_run(name: str) -> tuple[Plan, str]:
        run_launch = (*launch, f"--run_dir={tmp_path / name}")
        return submit_job(
            cluster, "pretrain", tmp_path, config=config, overrides=overrides, launch=run_launch
        )

    preempted, job_id = submit_run("preempted")
    reference, ref_id = submit_run("reference")
    assert preempted.run_dir == tmp_path / "preempted"
    assert f'run_dir = "{tmp_path / "preempted"}"' in preempted.job_config

    states = preempt_and_finish(cluster, job_id, preempted.run_dir, after_rows=3)
    ref_states = cluster.wait(ref_id, timeout=240)
    log = slurm_log(preempted.run_dir)
    assert [(s.state, s.exit_code, s.restarts) for s in states] == [("COMPLETED", "0:0", 1)], log
    assert [(s.state, s.exit_code, s.restarts) for s in ref_states] == [("COMPLETED", "0:0", 0)]
    assert "received SIGUSR1" in log and "requeueing" in log

    rank0 = (preempted.run_dir / "logs" / "rank0.log").read_text()
    stopped = int(re.search(r"preemption signal \(SIGUSR1\) at step (\d+)", rank0).group(1))
    assert 3 <= stopped < 30
    assert re.search(rf"resumed from .*checkpoints/{stopped}\b", rank0), rank0

    rows, ref_rows = metrics(preempted.run_dir), metrics(reference.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))  # no step repeated, none skipped
    assert [r["step"] for r in ref_rows] == list(range(1, 31))
    for r, ref in zip(rows, ref_rows):  # the loss curve continues where it stopped, as if never interrupted
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), (r["step"], stopped)
    assert rows[-1]["loss"] < rows[0]["loss"]


# --- a Ray cluster on the allocation, then ray job submit --------------------------------------------------
def test_ray_cluster_job_starts_ray_on_its_allocation_and_runs_the_driver_from_the_snapshot(
    cluster, tmp_path
):
    """Relative paths in the driver's config mean what they mean where jobs.submit ran (shared filesystem)."""
    driver_run = tmp_path / "driver"
    ports = [free_port() for _ in range(4)]  # this machine may run other Ray clusters: no default ports
    plan, job_id = submit_job(
        cluster,
        "sweep",
        tmp_path,
        overrides=("--steps=3", "--step_seconds=0", "--run_dir=driver"),
        launch=(
            "--module=jobs.smoke",
            f"--run_dir={tmp_path / 'ray'}",
            "--slurm.cpus_per_task=2",
            f"--ray.head_port={ports[0]}",
            f"--ray.dashboard_port={ports[1]}",
            f"--ray.start_args=['--ray-client-server-port={ports[2]}', "
            f"'--dashboard-agent-listen-port={ports[3]}']",
        ),
    )
    states = cluster.wait(job_id, timeout=300)
    log = slurm_log(plan.run_dir)
    assert [(s.state, s.exit_code) for s in states] == [("COMPLETED", "0:0")], log
    assert "all 1 node(s) joined: submitting the driver" in log
    assert "driver exited with status 0" in log
    assert [r["step"] for r in metrics(driver_run)] == [1, 2, 3]
    report = json.loads(next((driver_run / "ranks").glob("*.json")).read_text())
    assert Path(report["code"]).is_relative_to(plan.record_dir)  # the snapshot, in place, not the checkout


# --- the fixture itself ---------------------------------------------------------------------------------------
def test_cluster_teardown_cancels_its_jobs_and_stops_only_its_own_daemons(tmp_path):
    if missing_binaries():
        pytest.skip(
            f"SLURM binaries not installed ({', '.join(missing_binaries())}): run ci/install-system.sh"
        )
    # A bystander daemon of the same kind, as another user's service on this machine would be.
    key = tmp_path / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    bystander = subprocess.Popen(
        [
            find_binary("munged"),
            "--foreground",
            "--force",
            f"--socket={tmp_path}/sock",
            f"--key-file={key}",
            f"--pid-file={tmp_path}/pid",
            f"--log-file={tmp_path}/log",
            f"--seed-file={tmp_path}/seed",
        ]
    )
    try:
        with slurm_cluster(cpus=2) as own:
            daemons = dict(own._procs)
            pidfile = tmp_path / "job.pid"
            job_id = own.sbatch(_wrap_script(tmp_path, pidfile))
            deadline = time.monotonic() + 60
            while not (pidfile.exists() and pidfile.read_text().strip()):
                assert time.monotonic() < deadline, own.jobs(job_id)
                time.sleep(0.2)
            job_pid = int(pidfile.read_text())
        assert all(p.poll() is not None for p in daemons.values())  # ours: stopped
        assert not Path(f"/proc/{job_pid}").exists()  # its job: cancelled
        assert bystander.poll() is None  # not ours: untouched
    finally:
        bystander.terminate()
        bystander.wait(timeout=10)


def _wrap_script(tmp_path: Path, pidfile: Path) -> Path:
    script = tmp_path / "sleep.sbatch"
    script.write_text(
        f"#!/bin/bash\n#SBATCH --output={tmp_path}/sleep.out\necho $$ > {pidfile}\nexec sleep 300\n"
    )
    return script

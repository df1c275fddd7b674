"""Fine-tune sweeps as `ray job submit` jobs on a real local Ray cluster (tests/ray_cluster.py).

One sweep (segmentation + depth on the synthetic world, two peak learning rates each, two trials at a time)
is submitted with the ray CLI. The first trial's Ray Train worker SIGKILLs itself mid-run (the sweep's
``failure.fault_injection`` test knob) and must be retried from its checkpoint; once that trial has finished
the job is stopped with `ray job stop`, and the same command submitted again must restore the sweep, finish
it, and not rerun what had finished.

    .venv/bin/pytest tests/test_sweep_ray.py -q        # ~2-3 min on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray_cluster import RayCluster, local_ray_cluster  # tests/ is on sys.path under pytest

from pipeline.finetune.sweep import read_results

ROOT = Path(__file__).resolve().parents[1]
FAULTY = "segmentation-lr=0.001"
"""The first trial: its worker kills itself once, after step 3 (it checkpoints every 2 steps)."""
JOB_ENV = {
    # Worker start-up is slow on a loaded 2-core CI machine; Ray Train's default limit is 60 s.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}
CLUSTER_ENV = {
    **JOB_ENV,
    # A loopback-only test cluster: without this, a ~/.ray/auth_token left by any local `ray.init()` turns on
    # token auth for `ray start`, and the fixture's unauthenticated dashboard probe never sees it come up.
    "RAY_AUTH_MODE": "disabled",
}


@dataclass
class SweepRun:
    sweep_dir: Path
    attempts_at_stop: dict[str, int]
    complete_at_stop: set[str]
    first_status: str
    second_status: str
    logs: str


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _submit(cluster: RayCluster, submission_id: str, storage: Path) -> None:
    out = _ray(
        "job",
        "submit",
        f"--address={cluster.dashboard_url}",
        "--working-dir=.",
        f"--submission-id={submission_id}",
        "--no-wait",
        f"--runtime-env-json={json.dumps({'env_vars': JOB_ENV})}",
        "--",
        "python",
        "-m",
        "jobs.finetune_sweep",
        "--config",
        "jobs/configs/sweep/debug.toml",
        f"--storage={storage}",
        f"--failure.fault_injection={FAULTY}@3",
        "--resources.max_concurrent=2",
        "--resources.cpus_per_worker=0.5",
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _status(client: object, submission_id: str) -> str:
    return str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]  # type: ignore[attr-defined]


def _wait(client: object, submission_id: str, until: float, done: object = None) -> str:
    """Poll until the job ends (or ``done()`` is true); returns the job status."""
    while time.time() < until:
        status = _status(client, submission_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or (done is not None and done()):  # type: ignore[operator]
            return status
        time.sleep(1)
    raise TimeoutError(f"job {submission_id} still {_status(client, submission_id)}")


def _trials(sweep_dir: Path) -> dict[str, Path]:
    root = sweep_dir / "trials"
    return {p.name: p for p in root.iterdir()} if root.exists() else {}


def _complete(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("status") == "complete"


def _attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    from ray.job_submission import JobSubmissionClient

    storage = tmp_path_factory.mktemp("sweeps")
    sweep_dir = storage / "debug"
    old = {k: os.environ.get(k) for k in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)  # the head (and so every worker it starts) and the ray CLI inherit these
    try:
        with local_ray_cluster(num_cpus=2) as cluster:
            client = JobSubmissionClient(cluster.dashboard_url)
            started = time.time()
            _submit(cluster, "sweep-first", storage)

            def faulty_done() -> bool:
                return any(_complete(p) for n, p in _trials(sweep_dir).items() if n.startswith(FAULTY))

            first = _wait(client, "sweep-first", time.time() + 300, done=faulty_done)
            if first not in ("SUCCEEDED", "FAILED"):
                stop = _ray("job", "stop", f"--address={cluster.dashboard_url}", "sweep-first")
                assert stop.returncode == 0, stop.stdout + stop.stderr
                first = _wait(client, "sweep-first", time.time() + 120)
            complete = {name for name, p in _trials(sweep_dir).items() if _complete(p)}
            attempts = {name: len(_attempts(p)) for name, p in _trials(sweep_dir).items()}
            stopped = time.time()
            _submit(cluster, "sweep-second", storage)
            second = _wait(client, "sweep-second", time.time() + 400)
            print(
                f"sweep test timings: first job until stopped {stopped - started:.0f} s, "
                f"second job {time.time() - stopped:.0f} s"
            )
            logs = _ray("job", "logs", f"--address={cluster.dashboard_url}", "sweep-second").stdout
            logs = _ray("job", "logs", f"--address={cluster.dashboard_url}", "sweep-first").stdout + logs
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return SweepRun(sweep_dir, attempts, complete, first, second, logs)


@pytest.mark.slow
def test_stopped_sweep_job_is_restored_and_completes_with_a_results_table(sweep_run: SweepRun) -> None:
    assert sweep_run.first_status == "STOPPED", sweep_run.logs[-3000:]
    assert 1 <= len(sweep_run.complete_at_stop) < 4
    assert sweep_run.second_status == "SUCCEEDED", sweep_run.logs[-3000:]
    rows = read_results(str(sweep_run.sweep_dir))
    assert sorted((r["stage"], r["param.optim.lr"]) for r in rows) == [
        ("depth", 3e-4),
        ("depth", 1e-3),
        ("segmentation", 3e-4),
        ("segmentation", 1e-3),
    ]
    assert all(r["status"] == "complete" for r in rows)
    for stage, metric, better in (("segmentation", "mIoU", max), ("depth", "rmse", min)):
        members = [r for r in rows if r["stage"] == stage]
        assert {r["primary_metric"] for r in members} == {metric}
        (best,) = [r for r in members if r["best"]]
        assert best["primary_value"] == better(r["primary_value"] for r in members)
    markdown = (sweep_run.sweep_dir / "results.md").read_text()
    assert all(r["trial"] in markdown for r in rows) and "Best per stage" in markdown
    assert (sweep_run.sweep_dir / "results.csv").read_text().count("\n") == 5


@pytest.mark.slow
def test_restored_sweep_does_not_rerun_trials_finished_before_the_stop(sweep_run: SweepRun) -> None:
    trials = _trials(sweep_run.sweep_dir)
    assert any(name.startswith(FAULTY) for name in sweep_run.complete_at_stop)
    for name in sweep_run.complete_at_stop:
        assert len(_attempts(trials[name])) == sweep_run.attempts_at_stop[name], name
    unfinished = set(trials) - sweep_run.complete_at_stop
    assert all(_complete(trials[name]) for name in unfinished)
    assert "restoring the Tune experiment" in sweep_run.logs


@pytest.mark.slow
def test_killed_trial_worker_is_retried_and_resumes_from_its_checkpoint(sweep_run: SweepRun) -> None:
    (faulty,) = [p for name, p in _trials(sweep_run.sweep_dir).items() if name.startswith(FAULTY)]
    attempts = _attempts(faulty)
    assert (faulty / ".fault_injected").exists()
    assert len(attempts) == 2 and attempts[1]["start_step"] == 2, attempts
    assert attempts[0]["pid"] != attempts[1]["pid"]
    assert _complete(faulty)
    rows = [json.loads(x) for x in (faulty / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]  # steps after the checkpoint logged once


@pytest.mark.slow
def test_job_logs_show_each_trials_progress(sweep_run: SweepRun) -> None:
    for name in _trials(sweep_run.sweep_dir):
        assert f"[trial {name}] step 2/6" in sweep_run.logs, name
        assert (
            f"[trial {name}] done" in sweep_run.logs or f"[sweep] {name}: already complete" in sweep_run.logs
        )
    assert "fault injection: killing this worker" in sweep_run.logs

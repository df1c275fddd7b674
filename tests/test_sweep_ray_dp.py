"""A Ray sweep whose trials have two workers each, on a real local Ray cluster (tests/ray_cluster.py).

``python -m jobs.finetune_sweep`` runs two trials of a data-parallel stage with ``resources.workers_per_trial
= 2``: each trial is a Ray Train ``TorchTrainer`` of two workers inside a Tune trial; the workers must form one
gloo process group per trial and all-reduce across it, rank 0 must record the attempt (world size 2), and
the sweep's results table must list both trials as complete.

    .venv/bin/pytest tests/test_sweep_ray_dp.py -q        # a few minutes on a loaded 2-core CPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray_cluster import local_ray_cluster  # tests/ is on sys.path under pytest

from pipeline.finetune.sweep import read_results

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {
    # Worker start-up is slow on a loaded 2-core CI machine; Ray Train's default limit is 60 s.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
    "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster (see tests/test_sweep_ray.py)
}


def _sweep(address: str, storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env |= RAY_ENV | {"RAY_ADDRESS": address, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    command = [sys.executable, "-m", "jobs.finetune_sweep", f"--storage={storage}", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sweep_trials_with_two_workers_each_form_a_gloo_group_and_all_reduce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)  # the head, and so every Ray worker it starts, inherits these
    storage = tmp_path / "sweeps"
    with local_ray_cluster(num_cpus=2) as cluster:
        sweep = ["--name=dp", "--stages=['sweep_dp_toy_stage']", "--sweep.all.lr=[1e-3,2e-3]"]
        resources = ["--resources.workers_per_trial=2", "--resources.cpus_per_worker=0.45"]
        run = _sweep(cluster.address, storage, *sweep, *resources, "--resources.max_concurrent=2")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert out.count("starting Ray Train with 2 worker(s)") == 2, out[-4000:]
    rows = read_results(str(storage / "dp"))
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows), rows
    for row in rows:
        run_dir = Path(row["run_dir"])
        group = json.loads((run_dir / "group.json").read_text())
        assert group["world_size"] == 2 and group["backend"] == "gloo"
        assert [r["all_reduce"] for r in group["ranks"]] == [3.0, 3.0]  # rank 1 + rank 2 on both ranks
        assert len({r["pid"] for r in group["ranks"]}) == 2  # two worker processes
        attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
        assert [a["world_size"] for a in attempts] == [2]  # recorded once, by rank 0

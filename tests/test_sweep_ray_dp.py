"""Ray sweeps whose trials have two workers each, on a real local Ray cluster (tests/ray_cluster.py).

``python -m jobs.finetune_sweep`` with ``resources.workers_per_trial = 2``: each trial is a Ray Train
``TorchTrainer`` of two workers inside a Tune trial. (1) Two trials of a toy data-parallel stage: the workers
must form one gloo process group per trial and all-reduce across it, rank 0 must record the attempt (world
size 2), and the results table must list both trials as complete. (2) A segmentation trial on 2 workers
(``pipeline.finetune.stages.run_stage``, DDP over the trial's group) must give the loss curve and mIoU of the
same trial run in one process by the local runner.

    .venv/bin/pytest tests/test_sweep_ray_dp.py -q        # ~2.5 min on a loaded 2-core CPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster import local_ray_cluster  # tests/ is on sys.path under pytest

from pipeline.config import load_config
from pipeline.finetune import sweep as sw
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


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    old = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # the head, and so every Ray worker it starts, inherits these
    try:
        with local_ray_cluster(num_cpus=2) as cluster:
            yield cluster.address
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


TWO_WORKERS = ["--resources.workers_per_trial=2", "--resources.cpus_per_worker=0.45"]


@pytest.mark.slow
def test_sweep_trials_with_two_workers_each_form_a_gloo_group_and_all_reduce(
    tmp_path: Path, cluster_address: str
) -> None:
    storage = tmp_path / "sweeps"
    sweep = ["--name=dp", "--stages=['sweep_dp_toy_stage']", "--sweep.all.lr=[1e-3,2e-3]"]
    run = _sweep(cluster_address, storage, *sweep, *TWO_WORKERS, "--resources.max_concurrent=2")
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


SEGMENTATION = [
    "--name=seg",
    "--stages=['segmentation']",
    "--sweep.all.lr=[1e-3]",
    "--base.all.train.steps=4",
    "--base.all.train.batch_size=4",
    "--base.all.train.log_every=1",
    "--base.all.train.checkpoint_every=2",
    "--base.all.data.num_train=16",
    "--base.all.data.num_val=8",
    "--base.all.backbone.drop_path_rate=0.0",  # no per-rank randomness: 1 and 2 workers must agree
    "--base.all.head.dropout=0.0",
]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_a_two_worker_segmentation_trial_trains_data_parallel_like_one_process(
    tmp_path: Path, cluster_address: str
) -> None:
    run = _sweep(cluster_address, tmp_path / "ray", *SEGMENTATION, *TWO_WORKERS)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    (row,) = read_results(str(tmp_path / "ray" / "seg"))
    assert row["status"] == "complete", row
    ray_dir = Path(row["run_dir"])
    summary = json.loads((ray_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    attempts = [json.loads(x) for x in (ray_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["world_size"] for a in attempts] == [2]
    # the same trial in one process (the local runner): the same global batch gives the same loss curve
    cfg = load_config(sw.SweepConfig, None, [f"--storage={tmp_path / 'local'}", *SEGMENTATION])
    from pipeline.orchestrate import run_sweep

    local = run_sweep(cfg, runner="local", echo=lambda *a, **k: None)
    (one,) = local.rows
    assert one["trial"] == row["trial"] and one["status"] == "complete"
    assert _losses(ray_dir) == pytest.approx(_losses(Path(one["run_dir"])), rel=1e-4, abs=1e-5)
    assert row["primary_value"] == pytest.approx(one["primary_value"], rel=1e-3, abs=1e-3)

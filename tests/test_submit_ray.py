"""`python -m jobs.submit --target ray` against a real local Ray cluster (tests/ray_cluster.py).

The upload mode (the submission folder as Ray working dir) runs in tests/test_slurm.py through Ray on SLURM;
this checks the in-place mode for clusters sharing the filesystem: relative paths in the job's config keep
the meaning they have where jobs.submit ran, and the driver imports the snapshot, not the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ray_cluster import local_ray_cluster

from jobs.submit import main


@pytest.mark.slow
def test_ray_job_runs_the_snapshot_in_place_with_relative_paths_from_the_submit_directory(
    tmp_path, monkeypatch
):
    with local_ray_cluster(num_cpus=1) as ray:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("RAY_ADDRESS", ray.dashboard_url)
        monkeypatch.setenv("PATH", ray.env()["PATH"])
        code = main(
            [
                "--target",
                "ray",
                "--job",
                "sweep",
                "--launch.module=jobs.smoke",
                "--steps=2",
                "--step_seconds=0",
                "--run_dir=out",
                "--launch.ray.upload=false",
                f"--launch.run_dir={tmp_path / 'record'}",
            ]
        )
        assert code == 0
        status = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "list", f"--address={ray.dashboard_url}"],
            capture_output=True,
            text=True,
            env=ray.env(),
        )
    assert "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    report = json.loads(next((tmp_path / "out" / "ranks").glob("*.json")).read_text())
    assert report["code"].startswith(str(tmp_path / "record" / "submit"))  # the snapshot ran

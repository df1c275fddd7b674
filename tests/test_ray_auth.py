"""Ray's token authentication, as slurm/ray_cluster.sbatch turns it on (RAY_AUTH_MODE=token, the token in a
mode-600 file named by RAY_AUTH_TOKEN_PATH), on a real local Ray 2.60 head (tests/ray_cluster.py): the
dashboard / job API refuses requests without the token, `ray job submit` works with it, and the driver the
job runs reaches the cluster with the token it inherits.

    .venv/bin/pytest tests/test_ray_auth.py -q
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ray_cluster import local_ray_cluster, ray_executable

DRIVER = "import ray; ray.init(); print('driver sees', int(ray.cluster_resources()['CPU']), 'CPUs')"


def _status(url: str, token: str = "") -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_ray_cluster_with_token_auth_refuses_clients_without_the_token_and_runs_jobs_with_it() -> None:
    with local_ray_cluster(num_cpus=1, token_auth=True) as ray:
        token = Path(ray.token_path).read_text()
        jobs = f"{ray.dashboard_url}/api/jobs/"
        assert _status(jobs) == 401 and _status(jobs, "0" * 64) in (401, 403)
        assert _status(jobs, token) == 200

        submit = [ray_executable(), "job", "submit", "--", "python", "-c", DRIVER]
        refused = subprocess.run(
            submit, env=ray.env(with_token=False), capture_output=True, text=True, timeout=120
        )
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
        done = subprocess.run(submit, env=ray.env(), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "driver sees 1 CPUs" in done.stdout

"""A real local Ray cluster for tests: ``ray start --head`` on free loopback ports with its own temp dir.

Only the cluster this fixture started is stopped (``ray stop`` would stop every Ray on the machine, so we
kill the process group of our own head instead).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ports import free_port


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # for `ray job submit --address ...`
    temp_dir: str

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RAY_ADDRESS"] = self.dashboard_url
        return env


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextmanager
def local_ray_cluster(num_cpus: int = 2, object_store_bytes: int = 300_000_000) -> Iterator[RayCluster]:
    # Ray's socket paths must stay short: use a short temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    # The client server's port stays above Ray's worker port range (10002-19999), starting at a spread offset.
    start = 20000 + free_port() % 10000
    gcs_port, dash_port, client_port = free_port(), free_port(), free_port(start, 30000)
    cmd = [
        ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={gcs_port}",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={client_port}",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_bytes}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    # Jobs submitted to this cluster run `python` from the head's PATH: make it this venv's.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
    )
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited early: {Path(temp_dir, 'ray-start.log').read_text()[-2000:]}"
                )
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("ray dashboard did not come up in 90 s") from None
                time.sleep(1)
        yield RayCluster(address=f"127.0.0.1:{gcs_port}", dashboard_url=dashboard, temp_dir=temp_dir)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=8)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Ray daemons started by our head live in the same session; sweep any left in our temp dir.
        subprocess.run(["pkill", "-f", temp_dir], check=False)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

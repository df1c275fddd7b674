"""A real local Ray cluster for tests: ``ray start --head`` on free loopback ports with its own temp dir.

Only the cluster this fixture started is stopped (``ray stop`` would stop every Ray on the machine, so we
kill the process group of our own head instead).
"""

from __future__ import annotations

import os
import secrets
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
    token_path: str = ""  # with token authentication: the file holding the cluster's token

    def env(self, with_token: bool = True) -> dict[str, str]:
        """Environment for a client of this cluster (RAY_ADDRESS; the token's mode and file when it has one)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
        env["RAY_ADDRESS"] = self.dashboard_url
        if self.token_path:
            env["RAY_AUTH_MODE"] = "token"
            if with_token:
                env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextmanager
def local_ray_cluster(
    num_cpus: int = 2, object_store_bytes: int = 300_000_000, token_auth: bool = False
) -> Iterator[RayCluster]:
    """``token_auth``: start it as slurm/ray_cluster.sbatch does (RAY_AUTH_MODE=token, a random token in a
    mode-600 file named by RAY_AUTH_TOKEN_PATH); otherwise without authentication."""
    # Ray's socket paths must stay short: use a short temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    token_path = ""
    auth = {"RAY_AUTH_MODE": "disabled"}
    if token_auth:
        token_path = os.path.join(temp_dir, "auth_token")
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env.update(auth, RAY_USAGE_STATS_ENABLED="0", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
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
                request = urllib.request.Request(f"{dashboard}/api/version")
                if token_path:
                    request.add_header("Authorization", f"Bearer {Path(token_path).read_text()}")
                urllib.request.urlopen(request, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("ray dashboard did not come up in 90 s") from None
                time.sleep(1)
        yield RayCluster(f"127.0.0.1:{gcs_port}", dashboard, temp_dir, token_path)
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

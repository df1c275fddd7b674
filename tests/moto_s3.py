"""A real S3 endpoint for tests: moto_server on a free loopback port, credentials and endpoint in env.

with moto_s3(log_dir) as endpoint:   # S3_ENDPOINT_URL and dummy AWS_* set while inside
    ...
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port


@contextlib.contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """Start moto_server (log in ``log_dir/moto.log``), set the env ``pipeline.io`` reads; yield the endpoint."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    log = open(log_dir / "moto.log", "w")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": endpoint,
        }
        for k, v in env.items():
            mp.setenv(k, v)
        yield endpoint
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=10)
        log.close()

"""Shared pieces of the shard-job tests: output bytes, and killing the plan stage inside an index step.

from shard_helpers import tar_bytes, kill_and_rerun_during_index, index_files
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tar_bytes(out: Path) -> dict[str, bytes]:
    """{tar name: bytes} of the tars directly in ``out``."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def index_files(root: Path, index: str) -> dict[str, bytes]:
    """{relative path: bytes} of every file of the plan's ``index`` folder (``syn_index``, ``i2d_index``)."""
    d = root / "_plan" / index
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def kill_and_rerun_during_index(shard_args: list[str], out: Path, index: str, records: int = 5) -> None:
    """Run ``data_prep.shard --stage=plan`` (``shard_args`` end with ``--stage=plan``), SIGKILL it once the
    ``index`` step has written ``records`` record files but not its ``index.json``, then rerun the whole job
    (``--stage=all``), which must succeed."""
    assert shard_args[-1] == "--stage=plan"
    cmd = [sys.executable, "-m", "data_prep.shard", *shard_args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index_dir = out / "_plan" / index
    deadline = time.time() + 120
    while (
        len(list(index_dir.glob("records/*.json"))) < records
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.005)
    assert proc.poll() is None, "the plan stage finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (index_dir / "index.json").exists()
    assert subprocess.run([*cmd[:-1], "--stage=all"], cwd=REPO, capture_output=True).returncode == 0


def run_img2dataset(parquet: Path | str, output: Path | str, **flags: object) -> None:
    """Run the plain ``img2dataset`` command (its own env, :mod:`pipeline.tools`) on a parquet of ``uid``, ``url``,
    ``text``, one process, 64 px, no wandb; ``flags`` add or override ``--name=value`` options."""
    from pipeline.tools import img2dataset_executable

    options: dict[str, object] = {
        "url_list": parquet,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "text",
        "save_additional_columns": "['uid']",
        "output_folder": output,
        "processes_count": 1,
        "thread_count": 4,
        "image_size": 64,
        "enable_wandb": False,
        **flags,
    }
    cmd = [str(img2dataset_executable()), *(f"--{k}={v}" for k, v in options.items())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

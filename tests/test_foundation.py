"""Run directory, environment-to-rank mapping, atomic writes and the ``clipp`` umbrella command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from pipeline import io
from pipeline.dist import world_info_from_env
from pipeline.main import main as clipp_main
from pipeline.run_dir import RunDir


@dataclass(frozen=True)
class Tiny:
    steps: int = 3


def test_run_directory_records_config_metrics_and_summary(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config(Tiny(steps=7))
    for step in range(1, 5):
        run.log({"loss": 1.0 / step}, step=step)
    run.truncate_metrics_after(2)
    run.write_summary({"final_loss": 0.5})
    assert "steps = 7" in run.config_path.read_text()
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert json.loads(run.summary_path.read_text()) == {"final_loss": 0.5}
    assert (run.path / "logs").is_dir()


def test_only_rank_zero_writes_shared_run_files(tmp_path):
    run = RunDir(tmp_path / "run", rank=1)
    run.log({"loss": 1.0}, step=1)
    run.write_summary({"x": 1})
    assert not run.metrics_path.exists() and not run.summary_path.exists()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4)),
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8"}, (5, 2, 8)),
        (
            {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
            (1, 1, 2),
        ),
        ({}, (0, 0, 1)),
    ],
)
def test_world_info_is_read_from_torchrun_slurm_or_mpi_variables(monkeypatch, env, expected):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI_")) or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = world_info_from_env()
    assert (info.rank, info.local_rank, info.world_size) == expected


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(str(target), {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(str(target), "w") as f:
            f.write('{"v": 2, "partial": ')
            raise RuntimeError("killed mid-write")
    assert io.read_json(str(target)) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_clipp_help_lists_the_jobs(capsys):
    assert clipp_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: clipp" in out


def test_clipp_rejects_an_unknown_job(capsys):
    assert clipp_main(["no-such-job"]) == 2
    assert "unknown job" in capsys.readouterr().err


def test_clipp_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "clipp")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: clipp")

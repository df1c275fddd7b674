"""Run directory, environment-to-rank mapping, atomic writes, the job registry and the ``clipp`` command."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.clipp import main as clipp_main
from jobs.registry import JOBS, markdown_table
from jobs.submit import main as submit_main
from pipeline import io
from pipeline.dist import world_info_from_env
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


def _listed_jobs(help_text: str, heading: str) -> dict[str, str]:
    """job name -> module from a help text's job listing (`  name  doc   (python -m module)` lines)."""
    section = help_text.split(heading, 1)[1].split("\n\n", 1)[0]
    rows = [re.fullmatch(r"  (\S+)\s+.*\(python -m (\S+)\)", line) for line in section.splitlines()[1:]]
    assert all(rows), section
    return {m.group(1): m.group(2) for m in rows}


def test_clipp_and_submit_list_their_jobs_from_the_one_registry(capsys):
    assert clipp_main(["--help"]) == 0
    clipp = _listed_jobs(capsys.readouterr().out, "jobs:")
    with pytest.raises(SystemExit) as e:
        submit_main(["--help"])
    assert e.value.code == 0
    submit = _listed_jobs(capsys.readouterr().out, "jobs (jobs/registry.py):")
    assert clipp == {name: spec.module for name, spec in JOBS.items()}  # every job is importable here
    assert submit == {name: spec.module for name, spec in JOBS.items() if spec.submittable}
    assert set(submit) == {"shard", "caption", "pretrain", "sweep", "smoke"}
    assert submit.items() <= clipp.items()  # one name per job, whichever command it is run by


def test_every_job_entry_point_has_a_main_and_the_library_has_none():
    for spec in JOBS.values():
        assert callable(importlib.import_module(spec.module).main), spec.module
    library = Path(__file__).resolve().parents[1] / "pipeline"
    mains = [str(p) for p in library.rglob("*.py") if re.search(r"^def main\(", p.read_text(), re.M)]
    assert mains == [], "entry points belong in jobs/ or data_prep/, not in the library"


def test_readme_jobs_table_is_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = "<!-- jobs table: python -m jobs.registry -->\n", "<!-- end jobs table -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == markdown_table(), "README's jobs table is stale: paste `python -m jobs.registry` into it"


def test_cluster_docs_name_every_submittable_job_with_its_module():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cluster-jobs.md").read_text()
    for name, spec in JOBS.items():
        if spec.submittable:
            assert f"| `{name}` | `{spec.module}` |" in docs, name


def test_clipp_rejects_an_unknown_job(capsys):
    assert clipp_main(["no-such-job"]) == 2
    assert "unknown job" in capsys.readouterr().err


def test_clipp_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "clipp")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: clipp")

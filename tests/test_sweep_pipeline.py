"""The pretrain -> fine-tune -> report DAG (jobs/pipeline.py) without Ray: points from pretraining run
directories and checkpoint files, missing exports listed, finished sweeps not rerun (Ray is never started
when every trial is complete), the report job hook and the built-in table.

    .venv/bin/pytest tests/test_sweep_pipeline.py -q
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from jobs import pipeline as dag
from pipeline import io
from pipeline.finetune import sweep as sw

TOY = "sweep_toy_stage"  # tests/sweep_toy_stage.py


def _pretrain_run(root: Path, name: str, step: int, exported: bool = True) -> Path:
    run = root / name
    (run / "export" / "final").mkdir(parents=True)
    if exported:
        (run / "export" / "final" / "visual.pt").write_bytes(b"weights")
        io.write_json(str(run / "summary.json"), {"step": step, "global_batch": 64})
    return run


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    sweep_toml = tmp_path / "sweep.toml"
    sweep_toml.write_text(
        f'stages = ["{TOY}"]\n[base.all.train]\nstep_seconds = 0.0\n[sweep.all]\nlr = [1e-3, 2e-3]\n'
    )
    return [f"--storage={tmp_path / 'out'}", "--name=dag", f"--sweep_config={sweep_toml}", *extra]


def _finish_all_trials(tmp_path: Path, argv: list[str]) -> list[sw.Trial]:
    """Run the DAG's trials directly (as Ray Train workers would), so the DAG itself finds them done."""
    cfg, _ = dag.parse_config(dag.PipelineConfig, argv, prog="t", description="t")
    trials = sw.expand_trials(dag.sweep_config(cfg, dag.resolve_points(cfg)))
    for trial in trials:
        sw.run_trial(trial, out=lambda _: None)
    return trials


def test_points_come_from_exports_checkpoint_files_and_missing_ones_are_listed(tmp_path: Path) -> None:
    big = _pretrain_run(tmp_path, "web-4k", step=64)
    unfinished = _pretrain_run(tmp_path, "web-8k", step=0, exported=False)
    ckpt = tmp_path / "other.pt"
    ckpt.write_bytes(b"w")
    cfg, _ = dag.parse_config(
        dag.PipelineConfig,
        _argv(tmp_path, f"--runs=['{big}','{unfinished}']", f"--points.other={ckpt}"),
        prog="t",
        description="t",
    )
    points = {p.label: p for p in dag.resolve_points(cfg)}
    assert points["web-4k"].checkpoint == str(big / "export" / "final" / "visual.pt")
    assert points["web-4k"].pretrain_summary["step"] == 64
    assert points["web-8k"].checkpoint == ""
    assert points["other"].checkpoint == str(ckpt)
    sweep = dag.sweep_config(cfg, list(points.values()))
    assert sweep.checkpoints == {"web-4k": points["web-4k"].checkpoint, "other": str(ckpt)}


def test_finished_dag_skips_the_sweep_and_writes_the_builtin_report_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    small, big = _pretrain_run(tmp_path, "web-1k", step=16), _pretrain_run(tmp_path, "web-4k", step=64)
    argv = _argv(tmp_path, f"--runs=['{big}','{small}']", "--report.module=no_such_report_module")
    trials = _finish_all_trials(tmp_path, argv)
    monkeypatch.setitem(sys.modules, "pipeline.ray_backend", None)  # importing Ray now fails loudly
    assert dag.main(argv) == 0
    out = capsys.readouterr().out
    assert "report: built-in table" in out and "4 trials, 4 already complete" in out
    root = tmp_path / "out" / "dag"
    csv_lines = (root / "report.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["web-1k", "web-4k"]  # by samples seen
    assert csv_lines[0].startswith("point,samples_seen,pretrain_steps,sweep_toy_stage.score,")
    assert csv_lines[1].split(",")[1] == str(16.0 * 64)
    assert "web-4k" in (root / "report.md").read_text()
    assert all(len(sw.read_attempts(t)) == 1 for t in trials)
    (root / "report.md").unlink()
    assert dag.main(argv) == 0
    assert "report: up to date" in capsys.readouterr().out
    assert not (root / "report.md").exists()  # results unchanged: the report step was skipped


def test_report_step_calls_the_report_job_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _pretrain_run(tmp_path, "web-1k", step=16)
    calls: list[list[str]] = []
    fake = types.ModuleType("fake_scaling_report")
    fake.__spec__ = importlib.machinery.ModuleSpec("fake_scaling_report", None)
    fake.main = lambda argv: calls.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_scaling_report", fake)
    argv = _argv(
        tmp_path,
        f"--runs=['{run}']",
        "--report.module=fake_scaling_report",
        "--report.args=['--sweeps={sweep_dir}','--out={report_dir}']",
    )
    _finish_all_trials(tmp_path, argv)
    assert dag.main(argv) == 0
    root = tmp_path / "out" / "dag"
    assert calls == [[f"--sweeps={root / 'sweep'}", f"--out={root / 'report'}"]]
    assert not (root / "report.md").exists()
    assert json.loads((root / "points.json").read_text())["web-1k"]["checkpoint"].endswith("visual.pt")


def test_dag_with_no_exported_weights_exits_nonzero(tmp_path: Path) -> None:
    run = _pretrain_run(tmp_path, "web-1k", step=0, exported=False)
    assert dag.main(_argv(tmp_path, f"--runs=['{run}']")) == 1


def test_dag_with_the_local_runner_fine_tunes_every_point_without_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _pretrain_run(tmp_path, "web-1k", step=16)
    argv = _argv(tmp_path, f"--runs=['{run}']", "--runner=local", "--report.module=no_such_report_module")
    monkeypatch.setitem(sys.modules, "pipeline.ray_backend", None)  # importing Ray now fails loudly
    assert dag.main(argv) == 0
    assert "2 trials, 0 already complete" in capsys.readouterr().out
    rows = sw.read_results(str(tmp_path / "out" / "dag" / "sweep"))
    assert [r["status"] for r in rows] == ["complete", "complete"]
    assert (tmp_path / "out" / "dag" / "report.md").is_file()

"""The sweep machinery without Ray (pipeline/finetune/sweep.py): search-space expansion, trial names, one
trial's run (idempotent, attempts recorded, fault knob), results table, S3 storage. Uses the toy stage in
tests/sweep_toy_stage.py (any importable module with the stage contract can be swept), so it runs in seconds.

    .venv/bin/pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from moto_s3 import moto_s3

from pipeline import io
from pipeline.config import ConfigError, load_config
from pipeline.finetune import sweep as sw

TOY = "sweep_toy_stage"  # tests/sweep_toy_stage.py (tests/ is on sys.path under pytest)


def _cfg(tmp_path: Path, *overrides: str, config: str | None = None) -> sw.SweepConfig:
    base = [f"--stages=['{TOY}']", f"--storage={tmp_path / 'sweeps'}", "--base.all.train.step_seconds=0"]
    return load_config(sw.SweepConfig, config, [*base, *overrides])


def test_grid_expands_every_combination_with_stable_readable_names(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "--sweep.all.lr=[1e-3,2e-4]", "--sweep.all.drop_path_rate=[0.0,0.1,0.2]")
    trials = sw.expand_trials(cfg)
    assert len(trials) == 6
    assert {(t.params["optim.lr"], t.params["backbone.drop_path_rate"]) for t in trials} == {
        (lr, dp) for lr in (1e-3, 2e-4) for dp in (0.0, 0.1, 0.2)
    }
    assert [t.name for t in trials] == [t.name for t in sw.expand_trials(cfg)]
    assert trials[0].name.startswith("sweep_toy_stage-drop_path_rate=0-lr=0.001-")
    for t in trials:  # the shorthands landed in the resolved stage config
        assert f"lr = {t.params['optim.lr']!r}" in t.config_toml
        assert f"drop_path_rate = {t.params['backbone.drop_path_rate']!r}" in t.config_toml


def test_changing_the_base_config_changes_the_trial_identity(tmp_path: Path) -> None:
    short = sw.expand_trials(_cfg(tmp_path, "--sweep.all.lr=[1e-3]", "--base.all.train.steps=4"))
    long = sw.expand_trials(_cfg(tmp_path, "--sweep.all.lr=[1e-3]", "--base.all.train.steps=8"))
    assert short[0].name != long[0].name  # a finished short run must not stand in for the long one
    assert short[0].name.rsplit("-", 1)[0] == long[0].name.rsplit("-", 1)[0]


def test_command_line_lists_sweep_the_same_trials_as_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(
        f'stages = ["{TOY}"]\n[sweep.all]\nlr = [5e-4, 2e-4]\n[sweep.all.backbone]\ndrop_path_rate = 0.1\n'
    )
    from_file = sw.expand_trials(_cfg(tmp_path, config=str(path)))
    from_cli = sw.expand_trials(
        _cfg(tmp_path, "--sweep.all.lr=[5e-4,2e-4]", "--sweep.all.backbone.drop_path_rate=0.1")
    )
    assert [t.name for t in from_file] == [t.name for t in from_cli]
    assert [t.params["optim.lr"] for t in from_cli] == [5e-4, 2e-4]


def test_stage_table_overrides_the_all_table(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "--sweep.all.lr=[1e-3,2e-3]", f"--sweep.{TOY}.lr=[7e-4]")
    assert [t.params["optim.lr"] for t in sw.expand_trials(cfg)] == [7e-4]


def test_random_search_is_reproducible_from_its_seed_and_stays_in_bounds(tmp_path: Path) -> None:
    space = [
        "--search.kind=random",
        "--search.num_samples=5",
        "--sweep.all.lr={'loguniform': [1e-5, 1e-2]}",
        "--sweep.all.drop_path_rate=[0.0,0.3]",
    ]
    first = sw.expand_trials(_cfg(tmp_path, *space))
    again = sw.expand_trials(_cfg(tmp_path, *space))
    other = sw.expand_trials(_cfg(tmp_path, *space, "--search.seed=1"))
    lrs = [t.params["optim.lr"] for t in first]
    assert lrs == [t.params["optim.lr"] for t in again]
    assert lrs != [t.params["optim.lr"] for t in other]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 5
    assert {t.params["backbone.drop_path_rate"] for t in first} <= {0.0, 0.3}


def test_grid_repeats_use_successive_seeds(tmp_path: Path) -> None:
    trials = sw.expand_trials(_cfg(tmp_path, "--sweep.all.lr=[1e-3]", "--search.num_samples=3"))
    assert [t.params.get("train.seed", 0) for t in trials] == [0, 1, 2]
    assert len({t.name for t in trials}) == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--sweep.all.lr={'loguniform': [1e-5, 1e-2]}", 'search.kind = "random"'),
        ("--sweep.all.optim.lrr=[1e-3]", "optim.lrr"),
        ("--sweep.all.lr=[]", "empty list"),
    ],
)
def test_bad_search_spaces_are_rejected_naming_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        sw.expand_trials(_cfg(tmp_path, override))


def test_unknown_stage_and_stray_tables_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown stage 'segmentaton'"):
        load_config(sw.SweepConfig, overrides=["--stages=['segmentaton']"])
    with pytest.raises(ConfigError, match="sweep.depth: not one of stages"):
        load_config(sw.SweepConfig, overrides=["--stages=['segmentation']", "--sweep.depth.lr=[1e-3]"])


def test_several_workers_per_trial_need_a_data_parallel_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="workers_per_trial"):
        sw.expand_trials(_cfg(tmp_path, "--resources.workers_per_trial=2"))


def test_checkpoints_repeat_the_sweep_once_per_pretrained_point(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "--sweep.all.lr=[1e-3,2e-3]",
        "--checkpoints.small=/ckpt/a.pt",
        "--checkpoints.large=/ckpt/b.pt",
    )
    trials = sw.expand_trials(cfg)
    assert [(t.point, t.checkpoint) for t in trials] == [("small", "/ckpt/a.pt")] * 2 + [
        ("large", "/ckpt/b.pt")
    ] * 2
    assert all(t.name.startswith(f"{t.point}-sweep_toy_stage-lr=") for t in trials)
    assert all(f'checkpoint = "{t.checkpoint}"' in t.config_toml for t in trials)


def test_relative_storage_is_refused_inside_a_ray_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(sw.SweepConfig, overrides=["--storage=runs/sweeps"])
    assert sw.resolve_paths(cfg, cwd=str(tmp_path)).storage == str(tmp_path / "runs/sweeps")
    monkeypatch.setenv(sw.IN_RAY_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match="storage"):
        sw.resolve_paths(cfg, cwd=str(tmp_path))


def test_finished_trial_is_not_run_again_and_each_start_is_recorded(tmp_path: Path) -> None:
    (trial,) = sw.expand_trials(_cfg(tmp_path, "--sweep.all.lr=[1e-3]"))
    lines: list[str] = []
    first = sw.run_trial(trial, out=lines.append)
    assert first["status"] == "complete" and first["primary_value"] == pytest.approx(1.0)
    again = sw.run_trial(trial, out=lines.append)
    assert again == first
    assert len(sw.read_attempts(trial)) == 1
    assert any("already complete" in line for line in lines)
    assert any(line.startswith(f"[trial {trial.name}] step 6/6") for line in lines)


def _run_in_child(trial: dict) -> None:
    sw.run_trial(trial)


def test_fault_knob_kills_the_worker_once_and_the_rerun_resumes(tmp_path: Path) -> None:
    (trial,) = sw.expand_trials(_cfg(tmp_path, "--sweep.all.lr=[1e-3]", "--failure.fault_injection=toy@3"))
    assert trial.fault_step == 3
    ctx = multiprocessing.get_context("spawn")
    codes = []
    for _ in range(2):
        child = ctx.Process(target=_run_in_child, args=(trial.to_dict(),))
        child.start()
        child.join(120)
        codes.append(child.exitcode)
    assert codes == [-9, 0]
    attempts = sw.read_attempts(trial)
    assert [a["start_step"] for a in attempts] == [0, 2]  # killed before step 3 was checkpointed
    assert sw.trial_done(trial) is not None


def _fake_summary(trial: sw.Trial, value: float, higher: bool) -> None:
    Path(trial.run_dir).mkdir(parents=True, exist_ok=True)
    summary = {
        "status": "complete",
        "primary_metric": "m",
        "primary_value": value,
        "higher_is_better": higher,
        "metrics": {"m": value, "extra": 1.0},
        "steps": 3,
    }
    io.write_json(str(Path(trial.run_dir) / "summary.json"), summary)


@pytest.mark.parametrize("higher", [True, False])
def test_results_table_marks_the_best_trial_by_the_metric_direction(tmp_path: Path, higher: bool) -> None:
    cfg = _cfg(tmp_path, "--sweep.all.lr=[1e-3,2e-3,3e-3]")
    trials = sw.expand_trials(cfg)
    for trial, value in zip(trials[:2], (0.2, 0.7)):
        _fake_summary(trial, value, higher)
    rows = sw.write_results(cfg, trials, errors={trials[2].name: "RuntimeError: boom"})
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["primary_value"] == (0.7 if higher else 0.2)
    assert [r["status"] for r in rows] == ["complete", "complete", "failed"]
    table = pq.read_table(os.path.join(cfg.sweep_dir, "results.parquet")).to_pylist()
    assert [r["trial"] for r in table] == [t.name for t in trials]
    assert table[0]["param.optim.lr"] == 1e-3 and table[0]["metric.extra"] == 1.0
    assert math.isnan(table[2]["primary_value"] or math.nan)
    csv_lines = Path(cfg.sweep_dir, "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("trial,stage,point")
    md = Path(cfg.sweep_dir, "results.md").read_text()
    assert f"`{best[0]['trial']}` |" in md.split("## Best per stage")[1].split("##")[0]
    assert "boom" in md
    assert json.loads(Path(cfg.sweep_dir, "best.json").read_text())[TOY]["trial"] == best[0]["trial"]


# ----------------------------------------------------------------------------------------------- S3


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[str]:
    """moto_server on a free loopback port; S3 endpoint and dummy credentials in env, a bucket made."""
    with moto_s3(tmp_path):
        fs, _ = io.filesystem("s3://sweeps")
        fs.mkdir("sweeps")
        yield "s3://sweeps"


def test_sweep_on_s3_trains_in_scratch_and_keeps_its_record_in_the_bucket(tmp_path: Path, s3: str) -> None:
    cfg = _cfg(
        tmp_path, f"--storage={s3}/prefix", f"--scratch_dir={tmp_path / 'scratch'}", "--sweep.all.lr=[1e-3]"
    )
    (trial,) = sw.expand_trials(cfg)
    assert trial.storage_dir.startswith("s3://sweeps/prefix/sweep/trials/")
    assert trial.run_dir.startswith(str(tmp_path / "scratch"))
    sw.run_trial(trial, out=lambda _: None)
    assert sw.trial_done(trial)["status"] == "complete"
    assert len(sw.read_attempts(trial)) == 1
    assert io.exists(io.join(trial.storage_dir, "metrics.jsonl"))
    assert not io.exists(io.join(trial.storage_dir, "checkpoints", "latest"))
    rows = sw.write_results(cfg, [trial])
    assert sw.read_results(cfg.sweep_dir)[0]["trial"] == rows[0]["trial"] == trial.name


def test_printed_config_reloads_to_the_same_trials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.finetune_sweep import main

    argv = [
        f"--stages=['{TOY}']",
        f"--storage={tmp_path}",
        "--sweep.all.lr=[5e-4,2e-4]",
        "--checkpoints.a=/x.pt",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print-config"])
    assert exit_info.value.code == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    again = sw.expand_trials(load_config(sw.SweepConfig, str(printed)))
    assert [t.name for t in again] == [
        t.name for t in sw.expand_trials(load_config(sw.SweepConfig, None, argv))
    ]


def test_dry_run_lists_each_trial_and_whether_it_is_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.finetune_sweep import main

    argv = [
        f"--stages=['{TOY}']",
        f"--storage={tmp_path}",
        "--sweep.all.lr=[1e-3,2e-3]",
        "--base.all.train.step_seconds=0",
    ]
    first, _ = sw.expand_trials(load_config(sw.SweepConfig, None, argv))
    sw.run_trial(first, out=lambda _: None)
    assert main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["complete", "pending"]
    assert first.name in lines[0]


def test_every_registered_stage_takes_the_lr_and_drop_path_shorthands(tmp_path: Path) -> None:
    from pipeline.finetune.stages import STAGES

    cfg = load_config(
        sw.SweepConfig,
        None,
        [
            f"--stages={list(STAGES)!r}",
            f"--storage={tmp_path}",
            "--sweep.all.lr=[3e-4]",
            "--sweep.all.drop_path_rate=[0.15]",
        ],
    )
    trials = sw.expand_trials(cfg)
    assert [t.stage for t in trials] == list(STAGES)
    for t in trials:
        assert "lr = 0.0003" in t.config_toml and "drop_path_rate = 0.15" in t.config_toml, t.stage


# ------------------------------------------------------------------------------- the one sweep runner


def test_sweep_job_with_the_local_runner_runs_every_trial_without_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from jobs.finetune_sweep import main

    monkeypatch.setitem(sys.modules, "pipeline.ray_backend", None)  # importing Ray now fails loudly
    argv = [f"--stages=['{TOY}']", f"--storage={tmp_path}", "--sweep.all.lr=[1e-3,2e-3]"]
    argv += ["--base.all.train.step_seconds=0", "--runner=local"]
    assert main(argv) == 0
    assert "2 trials, 0 already complete" in capsys.readouterr().out
    rows = sw.read_results(str(tmp_path / "sweep"))
    assert [r["status"] for r in rows] == ["complete", "complete"]
    assert sum(r["best"] for r in rows) == 1
    assert main(argv) == 0
    assert "2 trials, 2 already complete" in capsys.readouterr().out
    trials = sw.expand_trials(load_config(sw.SweepConfig, None, argv[:-1]))
    assert all(len(sw.read_attempts(t)) == 1 for t in trials)


def test_a_failing_trial_does_not_stop_the_others_and_is_listed_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import orchestrate

    cfg = _cfg(tmp_path, "--sweep.all.lr=[1e-3,2e-3]")
    real = sw.run_trial

    def flaky(trial: sw.Trial, **kwargs: object) -> dict:
        if trial.params["optim.lr"] == 1e-3:
            raise RuntimeError("boom")
        return real(trial, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sw, "run_trial", flaky)
    result = orchestrate.run_sweep(cfg, runner="local", echo=lambda *a, **k: None)
    assert not result.complete and list(result.errors) == [sw.expand_trials(cfg)[0].name]
    assert sorted(r["status"] for r in result.rows) == ["complete", "failed"]
    assert "boom" in next(r["error"] for r in result.rows if r["status"] == "failed")
    with pytest.raises(ConfigError, match="unknown runner"):
        orchestrate.run_sweep(cfg, runner="slurm", echo=lambda *a, **k: None)


def test_results_only_runs_nothing_and_still_writes_the_table(tmp_path: Path) -> None:
    from pipeline import orchestrate

    cfg = _cfg(tmp_path, "--sweep.all.lr=[1e-3]")
    result = orchestrate.run_sweep(cfg, runner="no runner is built", run=False, echo=lambda *a, **k: None)
    assert [r["status"] for r in result.rows] == ["pending"] and result.done_before == 0
    assert (Path(cfg.sweep_dir) / "results.csv").is_file()


def _module_imports(path: Path, top_level_only: bool) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_sweep_job_dag_and_scaling_report_share_one_runner_and_report_only_reads() -> None:
    root = Path(__file__).resolve().parents[1]
    for caller in ("jobs/finetune_sweep.py", "jobs/pipeline.py"):
        assert "pipeline.orchestrate.run_sweep" in _module_imports(root / caller, top_level_only=True), caller
    scaling_job = _module_imports(root / "jobs/scaling_report.py", top_level_only=True)
    assert "pipeline.orchestrate.run_finetuning" in scaling_job
    assert "run_sweep(" in (root / "pipeline/orchestrate.py").read_text().split("def run_finetuning")[1]
    launching = {
        "subprocess",
        "multiprocessing",
        "concurrent.futures",
        "pipeline.ray_backend",
        "pipeline.orchestrate",
    }
    for path in sorted((root / "pipeline" / "report").glob("*.py")):
        imports = _module_imports(path, top_level_only=True)
        assert not {i for i in imports if i.split(".")[0] in ("ray",) or i in launching}, path.name
        assert "run_trial(" not in path.read_text() and "Popen(" not in path.read_text(), path.name
    for folder in ("pipeline", "jobs", "data_prep"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name != "ray_backend.py":
                ray = {i for i in _module_imports(path, top_level_only=False) if i.split(".")[0] == "ray"}
                assert not ray, f"{path} imports {ray}: Ray belongs in pipeline/ray_backend.py"

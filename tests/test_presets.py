"""Shipped presets (jobs/configs/<job>/<preset>.toml) hold only keys that exist and differ from the code
defaults, and every job's --help lists its presets."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PRESET_ROOT, ConfigError, _build, _type_hints, preset_names
from pipeline.finetune.stages import STAGES

# preset folder (= job name) -> (config class, the job's module, its argv before --help)
JOBS: dict[str, tuple[str, str, list[str]]] = {
    "pretrain": ("pipeline.train.trainer:TrainConfig", "jobs.pretrain", []),
    "sweep": ("pipeline.finetune.sweep:SweepConfig", "jobs.finetune_sweep", []),
    "pipeline": ("jobs.pipeline:PipelineConfig", "jobs.pipeline", []),
    "scaling_report": ("pipeline.report.scaling:ScalingConfig", "jobs.scaling_report", []),
    "reproduce": ("pipeline.report.toy:ReproduceConfig", "jobs.reproduce", []),
    "quickstart": ("jobs.quickstart:QuickstartConfig", "jobs.quickstart", []),
    "synthworld": ("pipeline.data.synth_export:ExportConfig", "data_prep.synthworld", []),
    "shard": ("pipeline.data.prep.job:ShardJobConfig", "data_prep.shard", []),
    "caption": ("pipeline.caption.job:CaptionJobConfig", "data_prep.caption", []),
    "train_coca": ("pipeline.caption.train_coca:TrainCocaConfig", "data_prep.train_coca", []),
    "distill": ("pipeline.distill.trainer:DistillConfig", "jobs.distill", []),
    "prune": ("pipeline.finetune.prune:PruneJobConfig", "jobs.prune", []),
} | {
    f"finetune/{stage}": (f"{module}:STAGE_CONFIG", "jobs.finetune", ["--stage", stage])
    for stage, module in STAGES.items()
}

PRESET_FILES = sorted(PRESET_ROOT.rglob("*.toml"))


def _config_class(job: str) -> type:
    module, name = JOBS[job][0].split(":")
    return getattr(importlib.import_module(module), name)


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def _leaves(cls: type, data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Dotted paths of the values a TOML table sets (a dict-typed field is one value)."""
    hints = _type_hints(cls)
    out = []
    for key, value in data.items():
        nested = _dataclass_in(hints.get(key))
        if nested is not None and isinstance(value, dict):
            out += _leaves(nested, value, prefix + (key,))
        else:
            out.append(prefix + (key,))
    return out


def _without(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node = out
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return out


def test_every_preset_folder_is_a_known_job():
    folders = {str(p.parent.relative_to(PRESET_ROOT)) for p in PRESET_FILES}
    assert PRESET_FILES and folders <= set(JOBS), f"add these jobs to JOBS: {sorted(folders - set(JOBS))}"
    assert not list(PRESET_ROOT.glob("*.toml")), "presets live in jobs/configs/<job>/<preset>.toml"


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: str(p.relative_to(PRESET_ROOT)))
def test_shipped_preset_names_only_existing_keys_that_differ_from_the_defaults(path: Path):
    job = str(path.parent.relative_to(PRESET_ROOT))
    cls = _config_class(job)
    data = tomllib.loads(path.read_text())
    full = _build(cls, data, "", str(path))  # raises ConfigError naming an unknown key or a bad value
    redundant = []
    for leaf in _leaves(cls, data):
        try:
            if _build(cls, _without(data, leaf), "", str(path)) == full:
                redundant.append(".".join(leaf))
        except ConfigError:
            pass  # without it the config is invalid: it is needed
    assert not redundant, f"{path} sets these keys to their code defaults, remove them: {redundant}"


def test_preset_test_catches_a_default_valued_key_and_an_unknown_key(tmp_path):
    from pipeline.finetune.depth import DepthConfig

    data = {"optim": {"lr": DepthConfig().optim.lr}, "train": {"steps": 3}}
    full = _build(DepthConfig, data, "", "t")
    assert _build(DepthConfig, _without(data, ("optim", "lr")), "", "t") == full
    assert _build(DepthConfig, _without(data, ("train", "steps")), "", "t") != full
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        _build(DepthConfig, {"optim": {"learning_rate": 1.0}}, "", "t")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help_lists_its_presets_and_every_key(job: str, capsys):
    module, argv = JOBS[job][1], JOBS[job][2]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"presets (--preset NAME: jobs/configs/{job}/NAME.toml" in out
    for name in preset_names(job):
        assert f"\n  {name} " in out or f"\n  {name}\n" in out
    from pipeline.config import field_help

    for key, _, _ in field_help(_config_class(job)):
        assert f"--{key} " in out

"""The config system: defaults < preset < TOML < dotted overrides, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.cli import parse_config
from pipeline.config import ConfigError, load_config, to_toml


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 2000


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""
    image_size: int = 224
    precision: Literal["fp32", "bf16"] = "bf16"
    subset: str | None = None

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    steps: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tags: tuple[str, ...] = ()


def test_toml_file_overrides_defaults_and_cli_overrides_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 5\n[optim]\nlr = 3e-4\n[data]\nshards = "a/{0..3}.tar"\n')
    cfg = load_config(RunConfig, path, ["--optim.lr=1e-5", "data.image_size=64", "--tags=[a, b]"])
    assert cfg.steps == 5
    assert cfg.optim.lr == 1e-5
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.shards == "a/{0..3}.tar"
    assert cfg.data.image_size == 64
    assert cfg.tags == ("a", "b")


def test_unknown_key_in_file_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    assert "optim.learning_rate" in str(e.value) and str(path) in str(e.value)


def test_badly_typed_override_names_the_key():
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        load_config(RunConfig, None, ["--optim.warmup_steps=lots"])
    with pytest.raises(ConfigError, match="data.precision"):
        load_config(RunConfig, None, ["--data.precision=fp8"])


def test_post_init_validation_error_is_reported_as_config_error():
    with pytest.raises(ConfigError, match="image_size"):
        load_config(RunConfig, None, ["--data.image_size=0"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(RunConfig, None, ["--optim.lr=2e-4", "--data.subset=uids.txt", "--tags=[x]"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(RunConfig, path) == cfg


def test_optional_field_accepts_none_and_a_value():
    assert load_config(RunConfig, None, ["--data.subset=none"]).data.subset is None
    assert load_config(RunConfig, None, ["--data.subset=s.txt"]).data.subset == "s.txt"


@pytest.fixture
def preset_root(tmp_path, monkeypatch):
    """A jobs/configs/ of our own with one job, ``toy``, and its preset ``small``."""
    import pipeline.cli
    import pipeline.config

    root = tmp_path / "jobs" / "configs"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "small.toml").write_text(
        "# A small run.\nsteps = 3\n[optim]\nlr = 5.0\nwarmup_steps = 7\n"
    )
    monkeypatch.setattr(pipeline.config, "PRESET_ROOT", root)
    monkeypatch.setattr(pipeline.cli, "PRESET_ROOT", root)
    return root


def test_layers_are_defaults_then_preset_then_file_then_overrides(preset_root, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("steps = 4\n[optim]\nwarmup_steps = 9\n")
    cfg, _ = parse_config(
        RunConfig,
        ["--preset", "small", "--config", str(path), "--optim.warmup_steps=11"],
        prog="t",
        description="",
        job="toy",
    )
    assert cfg.steps == 4 and cfg.optim.lr == 5.0 and cfg.optim.warmup_steps == 11
    assert cfg.optim.betas == (0.9, 0.95) and cfg.name == "run"
    assert load_config(RunConfig, job="toy", preset="small") == RunConfig(
        steps=3, optim=OptimConfig(lr=5.0, warmup_steps=7)
    )


def test_unknown_preset_and_bad_preset_key_name_the_file(preset_root, capsys):
    with pytest.raises(ConfigError, match="no preset 'big'.*small"):
        load_config(RunConfig, job="toy", preset="big")
    (preset_root / "toy" / "bad.toml").write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*bad\.toml"):
        load_config(RunConfig, job="toy", preset="bad")
    with pytest.raises(SystemExit) as e:
        parse_config(RunConfig, ["--preset", "big"], prog="t", description="", job="toy")
    assert e.value.code == 2 and "small" in capsys.readouterr().err


def test_help_lists_the_presets_with_their_first_comment_line(preset_root, capsys):
    with pytest.raises(SystemExit):
        parse_config(RunConfig, ["--help"], prog="t", description="", job="toy")
    out = capsys.readouterr().out
    assert "presets (--preset NAME: jobs/configs/toy/NAME.toml" in out
    assert "small  A small run." in out


def test_nested_table_keeps_the_defaults_a_default_factory_set():
    @dataclass(frozen=True)
    class Stage:
        optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.5, warmup_steps=3))

    assert load_config(Stage, None, ["--optim.lr=0.25"]).optim == OptimConfig(lr=0.25, warmup_steps=3)


def test_cli_help_lists_every_key_with_its_doc(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(RunConfig, ["--help"], prog="t", description="test job")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("--optim.lr", "--optim.betas", "--data.precision", "--tags", "Peak learning rate"):
        assert key in out


def test_cli_bad_value_exits_2_with_one_line_naming_the_key(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(RunConfig, ["--steps=ten"], prog="t", description="")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps" in err[0]

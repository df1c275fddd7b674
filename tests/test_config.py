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


def test_preset_is_the_base_that_file_and_overrides_change(tmp_path):
    presets = {"small": lambda: RunConfig(steps=3, optim=OptimConfig(lr=5.0))}
    cfg, _ = parse_config(
        RunConfig, ["--preset", "small", "--steps=4"], prog="t", description="", presets=presets
    )
    assert cfg.steps == 4 and cfg.optim.lr == 5.0


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

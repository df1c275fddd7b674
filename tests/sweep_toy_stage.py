"""A toy fine-tuning stage with the real stage contract (``STAGE_CONFIG``, ``run_stage``) for
testing the sweep machinery in seconds: no torch, a "loss" that depends on lr, a checkpoint per step.

Sweep it with ``stages = ["sweep_toy_stage"]`` when tests/ is on sys.path (any importable module with the
stage contract is accepted wherever a stage name is).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.run_dir import RunDir


@dataclass(frozen=True)
class ToyOptim:
    lr: float = 1e-3
    """Peak learning rate; the toy metric is best at lr = 1e-3."""


@dataclass(frozen=True)
class ToyBackbone:
    drop_path_rate: float = 0.0
    """Lowers the toy metric a little."""
    checkpoint: str = ""
    """Recorded in the summary."""


@dataclass(frozen=True)
class ToyTrain:
    steps: int = 6
    """Steps."""
    log_every: int = 2
    """Metrics every this many steps."""
    step_seconds: float = 0.05
    """Sleep per step (so a test can act mid-run)."""
    seed: int = 0
    """Seed."""


@dataclass(frozen=True)
class ToyConfig:
    optim: ToyOptim = field(default_factory=ToyOptim)
    backbone: ToyBackbone = field(default_factory=ToyBackbone)
    train: ToyTrain = field(default_factory=ToyTrain)


STAGE_CONFIG = ToyConfig


def run_stage(cfg: ToyConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    rd = RunDir(run_dir)
    done = rd.read_summary()
    if done is not None and done.get("status") == "complete":
        return done
    rd.write_config(cfg)
    latest = rd.checkpoints / "latest"
    step = int(latest.read_text()) if latest.exists() else 0
    while step < cfg.train.steps:
        time.sleep(cfg.train.step_seconds)
        step += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rd.log({"loss": 1.0 / step}, step)
        stopping = preemption is not None and preemption.is_set()
        io.write_text(str(latest), f"{step}\n")
        if stopping:
            raise RuntimeError("preempted")
    score = 1.0 - abs(cfg.optim.lr - 1e-3) * 100 - cfg.backbone.drop_path_rate
    summary = {
        "stage": "toy",
        "status": "complete",
        "steps": step,
        "primary_metric": "score",
        "primary_value": score,
        "higher_is_better": True,
        "metrics": {"score": score, "loss": 1.0 / step},
        "train_flops": 10 * step,
        "backbone_checkpoint": cfg.backbone.checkpoint,
    }
    rd.write_summary(summary)
    (rd.path / "toy.json").write_text(json.dumps({"seed": cfg.train.seed}))
    return summary

"""The CoCa trainer resumes exactly: a run stopped after k steps and rerun ends with the same weights and loss
curve as an uninterrupted run (batches are a pure function of the step; TrainState carries model, optimizer
and RNG through ``checkpoint.save_state`` / ``load_state``).

    .venv/bin/pytest tests/test_train_coca.py -q
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.caption.train_coca import TrainCocaConfig, train_coca
from pipeline.train import checkpoint
from pipeline.train.state import Preempted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# test_caption_loop's model (the defaults: 64-wide, 2-layer towers) on a few scenes: 4 batches per epoch, so
# the 6 steps cross an epoch boundary after the resume
TINY = TrainCocaConfig(num_scenes=32, batch_size=8, steps=6, warmup_steps=2, log_interval=1, threads=1)


def _curve(run_dir: Path) -> list[tuple[int, float, float, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["caption_loss"], r["clip_loss"], r["lr"]) for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_coca_run_stopped_after_k_steps_and_resumed_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    quiet = dict(log=lambda s: None)
    whole = train_coca(dataclasses.replace(TINY, checkpoint_interval=2), str(tmp_path / "a.pt"), **quiet)
    assert whole["steps"] == 6 and len(whole["history"]) == 6
    assert checkpoint.saved_steps(tmp_path / "a" / "checkpoints") == [4, 6]  # every 2 steps, keep 2
    assert checkpoint.latest_step(tmp_path / "a" / "checkpoints") == 6

    with pytest.raises(Preempted):
        train_coca(dataclasses.replace(TINY, stop_after_step=3), str(tmp_path / "b.pt"), **quiet)
    assert checkpoint.latest_step(tmp_path / "b" / "checkpoints") == 3
    assert not (tmp_path / "b.pt").exists()
    logs: list[str] = []
    resumed = train_coca(TINY, str(tmp_path / "b.pt"), log=logs.append)
    assert any("resumed" in line and "at step 3" in line for line in logs)
    assert sum("train_coca: step" in line for line in logs) == 3  # only steps 4..6 ran again

    assert _curve(tmp_path / "b") == _curve(tmp_path / "a")  # exact: same process, same op order
    assert resumed["history"] == whole["history"]
    a, b = _weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_coca_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path: Path) -> None:
    with pytest.raises(Preempted):
        train_coca(dataclasses.replace(TINY, stop_after_step=1), str(tmp_path / "c.pt"), log=lambda s: None)
    with pytest.raises(ValueError, match="lr"):
        train_coca(dataclasses.replace(TINY, lr=1e-3), str(tmp_path / "c.pt"), log=lambda s: None)

"""Checkpoint files are hashed at save time and verified before anything loads them on resume.

    .venv/bin/pytest tests/test_checkpoint_integrity.py -q        # ~5 s

A stand-in engine writes DeepSpeed-named files (DeepSpeed itself loads them with full pickle); the real
DeepSpeed save / verify / load round trip runs in tests/test_trainer_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint
from pipeline.train.checkpoint import MANIFEST, CheckpointConfig


class FakeEngine:
    """Writes and reads files named as DeepSpeed 0.19.8 names them; records whether it loaded."""

    def __init__(self) -> None:
        self.loaded = False

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"module": {"w": torch.arange(4.0)}, **client_state}, folder / "mp_rank_00_model_states.pt"
        )
        torch.save({"state": torch.ones(3)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def load(self, directory: str, tag: str) -> dict:
        self.loaded = True
        return torch.load(Path(directory) / tag / "mp_rank_00_model_states.pt", weights_only=True)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    checkpoint.save(tmp_path, 3, FakeEngine(), {"step": 3}, {"world_size": 1}, CheckpointConfig())
    return tmp_path


def test_save_writes_the_sha256_of_every_checkpoint_file(saved):
    folder = saved / "3"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == [
        "meta.json",
        "mp_rank_00_model_states.pt",
        "rank0.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    for name, digest in manifest["files"].items():
        assert checkpoint.file_sha256(folder / name) == digest
    engine = FakeEngine()
    state, meta = checkpoint.load(saved, 3, engine)
    assert engine.loaded and state == {"step": 3} and meta["step"] == 3


@pytest.mark.parametrize(
    "name", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt", "rank0.pt"]
)
def test_resume_refuses_a_checkpoint_file_with_one_changed_byte_naming_it(saved, name):
    path = saved / "3" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    engine = FakeEngine()
    with pytest.raises(ValueError, match=f"{path} does not match its sha256") as err:
        checkpoint.load(saved, 3, engine)
    assert not engine.loaded and str(err.value).count(".pt") == 1  # only the changed file is named


def test_resume_refuses_a_file_not_in_the_list_and_a_missing_list(saved):
    extra = saved / "3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({}, extra)
    with pytest.raises(ValueError, match=f"{extra} is not listed in"):
        checkpoint.load(saved, 3, FakeEngine())
    extra.unlink()
    (saved / "3" / "rank0.pt").unlink()
    with pytest.raises(ValueError, match="rank0.pt is listed in .* but missing"):
        checkpoint.load(saved, 3, FakeEngine())
    (saved / "3" / MANIFEST).unlink()
    with pytest.raises(ValueError, match=f"{saved / '3' / MANIFEST} is missing"):
        checkpoint.load(saved, 3, FakeEngine())

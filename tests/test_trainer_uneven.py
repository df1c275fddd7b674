"""An exact global batch on a world size that does not divide it: 64 samples on 3 ranks.

    .venv/bin/pytest tests/test_trainer_uneven.py -q        # the job test (2 runs) is marked slow (~1-2 min)

The loss-side exactness (padding + mask give the full-batch gradient) is tested in test_loss.py and
test_gradcache.py; here: the sample queue that cuts each rank's loader batches into its share of a step
(no sample dropped or repeated, exact resume mid-batch), and ``jobs.pretrain`` on 3 gloo processes.
"""

from __future__ import annotations

import math

import pytest
import torch
from trainer_fixtures import make_world_data, run_pretrain

from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.batching import SampleQueue
from pipeline.train.gradcache import BatchSplit
from pipeline.train.trainer import TrainConfig


class _ListLoader:
    """A loader over fixed batches whose state is the index of the next batch (like Loader.state_dict)."""

    def __init__(self, batches: list[dict], start: dict | None = None) -> None:
        self.batches, self.pos = batches, (start or {"pos": 0})["pos"]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]


def _batches(num: int, size: int) -> list[dict]:
    ids = torch.arange(num * size)
    return [
        {
            "image": ids[k * size : (k + 1) * size],
            "uid": [f"u{int(i)}" for i in ids[k * size : (k + 1) * size]],
        }
        for k in range(num)
    ]


def _queue(batches: list[dict], state: dict | None = None) -> SampleQueue:
    loader = _ListLoader(batches, state["data"] if state else None)
    queue = SampleQueue(loader, skip=state["data_skip"] if state else 0)
    queue.start(iter(loader))
    return queue


def test_sample_queue_takes_every_sample_once_in_order_and_resumes_mid_batch_exactly() -> None:
    split = BatchSplit(64, 3, micro_batch=32)
    batches = _batches(12, 32)  # rank 0's loader: batches of data.micro_batch = 32
    queue, taken = _queue(batches), []
    for step in range(6):
        state = queue.state_dict()
        resumed = _queue(batches, state)  # a restart from the checkpoint written before this step
        for size in split.micro_sizes(split.counts(step)[0]):
            got = queue.take(size)
            assert torch.equal(resumed.take(size)["image"], got["image"]) and len(got["uid"]) == size
            taken.append(got["image"])
    assert torch.equal(torch.cat(taken), torch.arange(sum(split.counts(s)[0] for s in range(6))))
    assert state["data_skip"] == 107 % 32 and state["data"] == {
        "pos": 3
    }  # before step 5: 22+21+21+22+21 used


def test_any_global_batch_splits_over_any_world_size_and_bad_accumulations_name_the_field() -> None:
    cfg = TrainConfig(**{**_debug(), "global_batch": 64})
    assert [cfg.accumulation_for(w) for w in (1, 2, 3, 24)] == [2, 1, 1, 1]
    assert cfg.batch_split(3).counts(0) == [22, 21, 21]
    with pytest.raises(ValueError, match="global_batch"):
        cfg.batch_split(65)
    with pytest.raises(ValueError, match="accumulation_steps"):
        TrainConfig(**{**_debug(), "global_batch": 64, "accumulation_steps": 65})


def _debug() -> dict:
    from pipeline.data.loader import LoaderConfig
    from pipeline.model.clip import ModelConfig

    return dict(
        model=ModelConfig(name="debug"), data=LoaderConfig(micro_batch=32, image_size=64, context_length=32)
    )


@pytest.mark.slow
def test_pretrain_job_runs_a_64_batch_on_3_ranks_and_resumes_mid_loader_batch_exactly(tmp_path) -> None:
    world = make_world_data(tmp_path / "world", num_shards=3, per_shard=64, num_val=16)
    run_dir = tmp_path / "run"
    args = [
        "--preset=debug",
        "--global_batch=64",
        "--steps=3",
        "--log.interval=1",
        "--log.progress=false",
        "--checkpoint.interval=2",
        "--checkpoint.keep_last=5",
        "--data.num_workers=0",
        "--eval.interval=0",
        "--export=false",
        f"--data.shards={world.shards}",
        f"--run_dir={run_dir}",
    ]
    assert run_pretrain(args, world_size=3, log_dir=tmp_path / "logs") == [0, 0, 0]
    run = RunDir(run_dir)
    rows = [r for r in run.read_metrics() if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    summary = run.read_summary()
    assert (summary["world_size"], summary["global_batch"], summary["accumulation_steps"]) == (3, 64, 1)
    # rank 0 took 22 + 21 + 21 = 64 samples: exactly two loader batches of 32, none dropped, none read ahead
    assert summary["loader"]["counts"]["samples"] == 64
    after_two = [checkpoint.read_rank_state(run.checkpoints, 2, rank) for rank in range(3)]
    used = [22 + 21, 21 + 22, 21 + 21]  # the extra sample rotates over the ranks
    assert [s["data_skip"] for s in after_two] == [u % 32 for u in used]
    assert [s["data"]["batches"] for s in after_two] == [u // 32 for u in used]
    # A second run resumes from checkpoint 2 (every rank mid-way through a loader batch): same step-3 loss.
    resumed = RunDir(tmp_path / "resumed")
    more = [f"--run_dir={resumed.path}", f"--checkpoint.resume={run.checkpoints / '2'}"]
    assert run_pretrain(args + more, world_size=3, log_dir=tmp_path / "logs-resumed") == [0, 0, 0]
    again = [r for r in resumed.read_metrics() if "loss" in r]
    assert [r["step"] for r in again] == [3]
    assert again[0]["loss"] == pytest.approx(rows[2]["loss"], abs=1e-6)

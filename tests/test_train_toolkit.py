"""The training toolkit every loop shares (pipeline/train: optim, checkpoint, state, flops; SyncBatchNorm;
the fine-tuning data splits): small CPU checks, no process group needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.finetune.common import StepBatchSampler, eval_batches, rank_slice
from pipeline.model.heads import SyncBatchNorm, convert_sync_batchnorm
from pipeline.train import checkpoint
from pipeline.train.ema import EMA, EMAConfig
from pipeline.train.optim import (
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    layered_param_groups,
    lr_at,
    lr_factor,
    set_lr,
)
from pipeline.train.state import TrainState


def test_pretraining_lr_at_is_the_cosine_case_of_the_shared_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=5)
    shape = ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=1e-2)
    for step in (0, 4, 5, 50, 99):
        assert lr_at(step, cfg, 100) == pytest.approx(1e-3 * lr_factor(step, 100, shape))


def test_layered_groups_scale_lr_by_depth_and_multiplier_and_leave_out_a_zero_multiplier():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    groups = layered_param_groups(
        model,
        0.1,
        layer_of=lambda name: int(name.split(".")[0]),
        num_layers=2,
        layer_decay=0.5,
        lr_mult=lambda name: 0.0 if name.startswith("1.") else 1.0,
    )
    scales = {(g["layer_id"], g["weight_decay"]): g["lr_scale"] for g in groups}
    assert scales == {(0, 0.1): 0.125, (0, 0.0): 0.125, (2, 0.0): 0.5}  # layer 1 has multiplier 0: no group
    opt = build_optimizer(groups, OptimConfig(lr=1.0, min_lr=0.0))
    set_lr(opt, 2.0)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.25, 0.25, 1.0]


def test_sync_batchnorm_is_batchnorm_on_one_process_and_converts_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6)
    )
    plain = nn.Sequential(*[m for m in model])
    x = torch.randn(5, 3, 8, 8)
    expected = plain(x)
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[4], SyncBatchNorm)
    assert set(converted.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(converted(x), expected)


def test_rank_slices_rebuild_the_global_batch_and_eval_shards_cover_every_index_once():
    batch = StepBatchSampler(10, 6, seed=1, start_step=0, end_step=3).batch(2)
    assert rank_slice(batch, 0, 2) + rank_slice(batch, 1, 2) == batch
    assert sum((rank_slice(batch, r, 3) for r in range(3)), []) == batch
    with pytest.raises(ValueError, match="batch_size"):
        rank_slice(batch, 0, 4)
    shards = [[k for b in eval_batches(11, 2, r, 3) for k, _ in b] for r in range(3)]
    assert sum(shards, []) == list(range(11))
    assert [k for b in eval_batches(11, 2) for k, _ in b] == list(range(11))


def test_train_state_round_trips_through_a_verified_checkpoint_with_retention(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build_optimizer(layered_param_groups(model, 0.1), OptimConfig(lr=0.1, min_lr=0.0))
    state = TrainState(model, opt, EMA(model, EMAConfig(decay=0.5)))
    for step in range(1, 5):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        state.step = step
        state.ema.update(step)
        state.extra["flops"] = {"per_step": 7}
        checkpoint.save_state(tmp_path, step, state.state_dict(), keep_last=2)
    assert checkpoint.saved_steps(tmp_path) == [3, 4] and checkpoint.latest_step(tmp_path) == 4
    path = checkpoint.latest_state_file(tmp_path)
    fresh = nn.Linear(3, 2)
    fresh_opt = build_optimizer(layered_param_groups(fresh, 0.1), OptimConfig(lr=0.1, min_lr=0.0))
    restored = TrainState(fresh, fresh_opt, EMA(fresh, EMAConfig(decay=0.5)))
    restored.load_state_dict(checkpoint.load_state(path))
    assert restored.step == 4 and restored.extra == {"flops": {"per_step": 7}}
    torch.testing.assert_close(fresh.weight, model.weight)
    torch.testing.assert_close(restored.ema.shadow, state.ema.shadow)
    assert restored.optimizer.state_dict()["state"][0]["step"] == 4
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.load_state(path)

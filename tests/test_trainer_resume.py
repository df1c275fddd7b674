"""Preemption and exact resume, two processes, real DeepSpeed (ZeRO-2, fp32, a data-loader worker per rank).

    .venv/bin/pytest tests/test_trainer_resume.py -q        # ~2-3 min on a 2-core CPU

One run goes through a SIGUSR1 (it must checkpoint and exit 124 within one step), a restart, a SIGKILL of
both ranks after a periodic checkpoint, and a second restart; its loss curve from every resume point on and
its final and EMA weights must equal those of an uninterrupted run with the same config. Patch dropout (0.5)
is on, so every step draws from the torch RNG and a resume that lost or shifted the RNG stream would show in
the losses; the final checkpoints' per-rank RNG states (python, numpy, torch) must equal too, which needs
every generator seeded from the run seed. Each resume verifies the DeepSpeed files against sha256.json.
"""

from __future__ import annotations

import signal

import pytest
import torch
from trainer_fixtures import Ranks, make_world_data, run_pretrain, wait_for

from pipeline.run_dir import RunDir
from pipeline.train.checkpoint import latest_step, read_rank_state, saved_steps

pytestmark = pytest.mark.slow

STEPS = 12


def args_for(shards: str, run_dir) -> list[str]:
    return [
        "--preset=debug",
        "--global_batch=32",
        "--data.micro_batch=8",
        f"--steps={STEPS}",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=3",
        "--ema.decay=0.8",
        "--log.interval=1",
        "--log.progress=false",
        "--checkpoint.interval=4",
        "--checkpoint.keep_last=2",
        "--data.num_workers=1",
        "--engine.zero_stage=2",
        "--engine.precision=fp32",
        "--model.patch_dropout=0.5",
        f"--data.shards={shards}",
        f"--run_dir={run_dir}",
    ]


def logged_steps(run: RunDir) -> list[int]:
    return [row["step"] for row in run.read_metrics() if "loss" in row]


def weights(run: RunDir, kind: str) -> dict[str, torch.Tensor]:
    return torch.load(run.path / "export" / kind / "open_clip_pytorch_model.bin", weights_only=True)


def same(a, b) -> bool:
    """Equal RNG states: tensors elementwise, tuples / lists itemwise, anything else with ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_preempted_and_killed_run_resumes_to_the_uninterrupted_loss_curve_and_weights(tmp_path):
    data = make_world_data(tmp_path / "world", num_shards=4, per_shard=32, num_val=8)
    reference = RunDir(tmp_path / "reference")
    assert run_pretrain(args_for(data.shards, reference.path), 2, tmp_path / "logs-ref") == [0, 0]

    run = RunDir(tmp_path / "run")
    args = args_for(data.shards, run.path)

    # 1. SIGUSR1 to both ranks mid-run: finish the step, checkpoint, exit 124.
    ranks = Ranks(args, 2, tmp_path / "logs-1")
    wait_for(lambda: len(logged_steps(run)) >= 2, 300, "step 2")
    signalled_after = max(logged_steps(run))
    ranks.signal(signal.SIGUSR1)
    assert ranks.wait(120) == [124, 124], ranks.output()
    preempted_at = latest_step(run.checkpoints)
    assert preempted_at is not None and signalled_after <= preempted_at <= signalled_after + 1
    assert max(logged_steps(run)) == preempted_at  # no step after the checkpoint

    # 2. Restart: it resumes from the preemption checkpoint; SIGKILL both ranks once step 8 is saved.
    ranks = Ranks(args, 2, tmp_path / "logs-2")
    wait_for(lambda: (latest_step(run.checkpoints) or 0) >= 8, 300, "checkpoint 8")
    ranks.signal(signal.SIGKILL)
    ranks.wait(60)
    killed_at = latest_step(run.checkpoints)
    assert killed_at == 8 and killed_at < STEPS
    assert max(saved_steps(run.checkpoints)) >= 8 and len(saved_steps(run.checkpoints)) <= 3

    # 3. Restart again: it resumes from step 8 and finishes.
    assert run_pretrain(args, 2, tmp_path / "logs-3") == [0, 0]
    assert logged_steps(run) == list(range(1, STEPS + 1))  # each step logged once, in order
    expected = {row["step"]: row["loss"] for row in reference.read_metrics() if "loss" in row}
    got = {row["step"]: row["loss"] for row in run.read_metrics() if "loss" in row}
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got, expected)
    for kind in ("final", "ema"):
        ref, new = weights(reference, kind), weights(run, kind)
        for name in ref:
            torch.testing.assert_close(new[name], ref[name], rtol=0, atol=1e-6, msg=f"{kind} {name}")
    for rank in (0, 1):  # the random streams continue as if never interrupted, and equal across runs
        ref_rng, new_rng = (read_rank_state(r.checkpoints, STEPS, rank)["rng"] for r in (reference, run))
        assert new_rng.keys() == ref_rng.keys() and all(same(new_rng[k], ref_rng[k]) for k in ref_rng), rank
    resumed = [
        line
        for line in (tmp_path / "logs-3" / "rank0.out").read_text().splitlines()
        if "resumed from" in line
    ]
    assert resumed and resumed[0].rstrip().endswith(f"/{killed_at}")

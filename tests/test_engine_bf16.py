"""bf16 DeepSpeed engines build on CPU with fp32 gradient accumulation and reduction (ZeRO 1, 2 and 3).

    .venv/bin/pytest tests/test_engine_bf16.py -q        # ~30 s on a 2-core CPU

One subprocess (so DeepSpeed's one-rank process group stays out of the test process) builds the debug CLIP
behind :class:`pipeline.train.engine.Engine` at each stage in bf16, runs one optimizer step over two
micro-batches, and reports the gradient-accumulation dtype DeepSpeed's optimizer actually holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ports import free_port
from trainer_fixtures import ROOT, pretrain_env

SCRIPT = r"""
import json, torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from pipeline.model.clip import ModelConfig, build_clip
from pipeline.train.engine import Engine, EngineConfig, init_distributed
from pipeline.train.optim import OptimConfig

init_distributed()
out = {}
for stage in (1, 2, 3):
    model, _, tokenizer = build_clip(ModelConfig(name="debug"))
    engine = Engine(model, EngineConfig(zero_stage=stage, precision="bf16"), OptimConfig(), 10, 4, 2)
    opt = engine.engine.optimizer
    dtype = opt.grad_acc_dtype if isinstance(opt, BF16_Optimizer) else opt.gradient_accumulation_dtype
    text = tokenizer(["a red circle"] * 4)
    for _ in range(2):
        o = engine(image=torch.randn(4, 3, 64, 64), text=text)
        engine.backward((o["image_features"].float() * o["text_features"].float()).sum())
        stepped = engine.micro_step()
    weights = engine.full_state_dict()
    out[stage] = {"optimizer": type(opt).__name__, "grad_accum": str(dtype), "stepped": stepped,
                  "steps": engine.global_steps, "grad_norm": engine.grad_norm(),
                  "weights_fp32": all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point()),
                  "comm": str(engine.engine.communication_data_type)}
print("RESULT " + json.dumps(out))
"""


def test_bf16_engines_accumulate_and_reduce_gradients_in_fp32_at_zero_1_2_3():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=pretrain_env(0, 1, free_port()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["1"]["optimizer"] == "BF16_Optimizer"  # DeepSpeed's ZeRO-1 path for fp32 accumulation
    for stage in ("1", "2", "3"):
        got = result[stage]
        assert got["grad_accum"] == "torch.float32" and got["comm"] == "torch.float32", (stage, got)
        assert got["stepped"] and got["steps"] == 1 and got["grad_norm"] > 0 and got["weights_fp32"], (
            stage,
            got,
        )


# ------------------------------------------------------------------ bf16 gradient-cached step vs fp32 naive
BF16_U = 2.0**-8
"""Unit roundoff of bf16 (8 significant bits)."""
BF16_BOUND = 16 * BF16_U
"""Relative (norm-wise) error allowed for a bf16 step's gradient against the exact full-batch gradient.

Each bf16 matmul / layer output is rounded to 8 bits (relative 2^-8); the tiny CLIP's gradient runs through
~16 such roundings in series (2 towers x 2 blocks x attention + MLP, forward and backward), so the gradient
is off by a few u in norm. 16 u (6%) leaves room for that and for the bf16 rounding of the weights themselves
(the fp32 reference uses the unrounded masters), while a real defect fails by far: a gradient scaled by
1/accumulation (DeepSpeed's default division) is 75% off, accumulating in bf16 drops whole micro-batch
partial sums, and a missing cross-rank gradient (gather without grad) changes every feature's gradient."""


def _bf16_cached_step_worker(rank: int, world_size: int, store: str, out_dir: str, device: str) -> None:
    import os
    from functools import partial
    from pathlib import Path

    import deepspeed  # this test drives a real engine; the library imports DeepSpeed in pipeline/train/engine.py
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from test_gradcache import GLOBAL_BATCH, W_REAL, W_SYN, _global_batch, _tiny_clip
    from torch import nn

    from pipeline.train.engine import EngineConfig, deepspeed_config
    from pipeline.train.gradcache import cached_contrastive_step, engine_backward
    from pipeline.train.loss import LossConfig, contrastive_loss
    from pipeline.train.optim import OptimConfig

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = _tiny_clip()
        model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))  # DeepSpeed: no 0-dim params
        accumulation, local = 4, GLOBAL_BATCH // world_size
        config = deepspeed_config(
            EngineConfig(zero_stage=1, precision="bf16"),
            OptimConfig(),
            local // accumulation,
            accumulation,
            world_size,
        )
        config["gradient_clipping"] = 0.0
        engine, *_ = deepspeed.initialize(
            model=model.to(device), optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
        )
        params = list(engine.module.parameters())
        before = [safe_get_full_fp32_param(p).detach().float().cpu().clone() for p in params]

        def embed(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
            images, texts, syn = (t.to(device) for t in batch)
            image, text, logit_scale = engine(images.to(torch.bfloat16), texts)
            syn_text = engine(None, syn)[1]
            feats = {"image": image, "text": text, "syn_text": syn_text}
            return {**{k: v.float() for k, v in feats.items()}, "logit_scale": logit_scale.float()}

        shard = [t[rank * local : (rank + 1) * local] for t in _global_batch()]
        micro = [tuple(t.chunk(accumulation)[k] for t in shard) for k in range(accumulation)]
        cfg = LossConfig(tile_size=3, impl="tiled", w_real=W_REAL, w_syn=W_SYN)
        loss_fn = partial(contrastive_loss, cfg=cfg)
        cached_contrastive_step(embed, micro, loss_fn, backward=engine_backward(engine))
        after = [safe_get_full_fp32_param(p).detach().float().cpu() for p in params]
        if rank == 0:
            step = torch.cat([(b - a).reshape(-1) for a, b in zip(after, before)])  # SGD lr 1: the gradient
            result = {"step": step, "steps": engine.global_steps, "dtype": str(params[0].dtype)}
            torch.save(result, Path(out_dir) / "bf16.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _assert_bf16_step_matches_the_fp32_naive_gradient(out_dir) -> float:
    import torch
    from test_gradcache import _naive_reference

    got = torch.load(out_dir / "bf16.pt", weights_only=True)
    assert got["steps"] == 1 and got["dtype"] == "torch.bfloat16"
    exact, fp32 = _naive_reference(torch.float64)[0], _naive_reference(torch.float32)[0]
    err = float((got["step"].double() - exact).norm() / exact.norm())
    fp32_err = float((fp32.double() - exact).norm() / exact.norm())
    assert err <= BF16_BOUND, f"bf16 gradient-cached step: relative error {err:.3g} > bound {BF16_BOUND:.3g}"
    assert fp32_err < err / 10  # the reference's own fp32 error is negligible next to bf16's
    print(
        f"bf16 gradient-cached step: relative error {err:.3g} (bound {BF16_BOUND:.3g}, fp32 {fp32_err:.2g})"
    )
    return err


def test_bf16_zero1_gradient_cached_step_on_two_ranks_is_the_fp32_naive_gradient_within_the_bf16_bound(
    tmp_path,
):
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "store"), str(tmp_path), "cpu")
    mp.spawn(_bf16_cached_step_worker, args=args, nprocs=2, join=True)
    _assert_bf16_step_matches_the_fp32_naive_gradient(tmp_path)


@pytest.mark.gpu
def test_gpu_bf16_zero1_gradient_cached_step_is_the_fp32_naive_gradient_within_the_bf16_bound(tmp_path):
    import torch
    import torch.multiprocessing as mp

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    mp.spawn(_bf16_cached_step_worker, args=(1, str(tmp_path / "store"), str(tmp_path), "cuda"), nprocs=1)
    _assert_bf16_step_matches_the_fp32_naive_gradient(tmp_path)

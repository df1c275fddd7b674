"""GPU-only checks (``@pytest.mark.gpu``; skipped without CUDA): what CPU CI cannot run.

    bash benchmarks/gpu_check.sh                     # these tests, then the GPU benchmarks, one table
    .venv/bin/pytest -m gpu tests/ -q                # the tests alone

The bf16 gradient-cached step against the fp32 naive full-batch gradient is in test_engine_bf16.py (its CPU
twin runs in CI); here: the fused AdamW kernel, the preemption flag's all-reduce over NCCL, and the cached
caption decoder against open_clip's ``generate`` on the GPU.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fused_adamw_steps_the_debug_clip_like_the_foreach_kernel() -> None:
    from pipeline.model.clip import ModelConfig, build_clip
    from pipeline.train.optim import OptimConfig, build_optimizer, param_groups

    cfg = OptimConfig(lr=1e-3, weight_decay=0.2)
    models = [build_clip(ModelConfig(name="debug"))[0].cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(param_groups(models[0], cfg.weight_decay), cfg)
    assert fused.defaults.get("fused"), "on CUDA build_optimizer must pick the fused kernel"
    plain = torch.optim.AdamW(
        param_groups(models[1], cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _preemption_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    from pipeline.dist import PreemptionFlag

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        flag = PreemptionFlag()
        before = flag.any_rank_set()
        if rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 0 is signalled
        dist.barrier()
        after = flag.any_rank_set()
        Path(out_dir, f"rank{rank}").write_text(f"{before} {after}")
    finally:
        dist.destroy_process_group()


def test_preemption_flag_on_one_rank_reaches_every_rank_over_nccl(tmp_path: Path) -> None:
    """With one GPU this runs one rank (NCCL refuses two ranks on one device): the flag, not the reduce."""
    world_size = min(2, torch.cuda.device_count())
    mp.spawn(_preemption_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size)
    for rank in range(world_size):
        assert (tmp_path / f"rank{rank}").read_text() == "False True"


def test_cached_caption_decoder_equals_open_clip_generate_on_the_gpu() -> None:
    from pipeline.caption.captioners import COCA_DEBUG_CFG, build_coca
    from pipeline.caption.decode import EOS_TOKEN_ID, SOT_TOKEN_ID, CocaDecoder, DecodeConfig
    from pipeline.caption.openclip_compat import enable_open_clip_generate

    model = build_coca(COCA_DEBUG_CFG, seed=0)
    with torch.no_grad():
        model.text_decoder.text_projection[:, EOS_TOKEN_ID] *= 8.0  # captions end at different lengths
    model = model.cuda().eval()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    enable_open_clip_generate()
    ref = model.generate(images, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=3)
    ref_tokens = []
    for row in ref.tolist():
        assert row[0] == SOT_TOKEN_ID
        seq = []
        for tok in row[1:]:
            if tok in (EOS_TOKEN_ID, 0):
                break
            seq.append(tok)
        ref_tokens.append(seq)
    ours = CocaDecoder(model).generate(images, DecodeConfig(strategy="greedy", max_len=12, min_len=3))
    assert [caps[0] for caps in ours] == ref_tokens

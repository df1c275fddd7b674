"""Acceptance test of the exact large-batch loss: gradient caching + gathered tiled loss == naive full batch.

One optimizer step's parameter gradient through ``cached_contrastive_step`` (micro-batches, ranks, tiled loss,
real + synthetic captions) must equal the gradient of the naive full-batch loss on one process.

    .venv/bin/pytest tests/test_gradcache.py -q
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from numerics import U32, assert_as_accurate_as_fp32
from open_clip.model import CLIP
from torch import nn

from pipeline.train.gradcache import BatchSplit, cached_contrastive_step
from pipeline.train.loss import LossConfig, contrastive_loss, naive_clip_loss

GLOBAL_BATCH = 16
W_REAL, W_SYN = 1.0, 0.5


def _tiny_clip(dtype: torch.dtype = torch.float32) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
    )
    return model.to(dtype).train()


def _global_batch(
    dtype: torch.dtype = torch.float32, size: int = GLOBAL_BATCH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, 32, 32, generator=g)
    texts = torch.randint(1, 1000, (size, 16), generator=g)
    syn = torch.randint(1, 1000, (size, 16), generator=g)
    return images.to(dtype), texts, syn


def _embed(model: CLIP, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    images, texts, syn = batch
    return {
        "image": model.encode_image(images, normalize=True),
        "text": model.encode_text(texts, normalize=True),
        "syn_text": model.encode_text(syn, normalize=True),
        "logit_scale": model.logit_scale.exp(),
    }


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _naive_reference(
    dtype: torch.dtype = torch.float32, size: int = GLOBAL_BATCH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient (all parameters), logit-scale gradient and loss of the naive loss over the whole batch.

    In float64 it is the reference; in fp32 its distance to that reference measures fp32 rounding on this CPU.
    """
    model = _tiny_clip(dtype)
    out = _embed(model, _global_batch(dtype, size))
    s = out["logit_scale"]
    loss = W_REAL * naive_clip_loss(out["image"], out["text"], s) + W_SYN * naive_clip_loss(
        out["image"], out["syn_text"], s
    )
    loss.backward()
    return _flat_grad(model), model.logit_scale.grad.clone(), loss.detach()


def _assert_matches_naive_full_batch(
    grad: torch.Tensor, scale_grad: torch.Tensor, loss: torch.Tensor, size: int = GLOBAL_BATCH
) -> None:
    ref, fp32 = _naive_reference(torch.float64, size), _naive_reference(torch.float32, size)
    assert ref[0].norm() > 0 and ref[1].abs() > 0  # the comparison is not vacuous
    for name, got, baseline, exact in zip(
        ["grad", "scale_grad", "loss"], (grad, scale_grad, loss), fp32, ref
    ):
        assert_as_accurate_as_fp32(name, got, baseline, exact)


def _cached_step(model: CLIP, rank: int, world_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    local = GLOBAL_BATCH // world_size
    shard = [t[rank * local : (rank + 1) * local] for t in _global_batch()]
    micro = [tuple(t.chunk(accumulation)[k] for t in shard) for k in range(accumulation)]
    cfg = LossConfig(tile_size=3, impl="tiled", w_real=W_REAL, w_syn=W_SYN)  # tiles not dividing the batch
    return cached_contrastive_step(partial(_embed, model), micro, partial(contrastive_loss, cfg=cfg))


@pytest.mark.parametrize("accumulation", [1, 4])
def test_one_process_cached_step_gradient_equals_naive_full_batch_gradient(accumulation: int) -> None:
    model = _tiny_clip()
    out = _cached_step(model, rank=0, world_size=1, accumulation=accumulation)
    _assert_matches_naive_full_batch(_flat_grad(model), model.logit_scale.grad, out["loss"])
    assert float(out["reembed_max_abs_diff"]) == 0.0


def test_a_gradient_off_by_one_part_in_ten_thousand_fails_the_naive_full_batch_check() -> None:
    model = _tiny_clip()
    out = _cached_step(model, rank=0, world_size=1, accumulation=2)
    with pytest.raises(AssertionError, match="grad: error"):
        _assert_matches_naive_full_batch(_flat_grad(model) * (1 + 1e-4), model.logit_scale.grad, out["loss"])


def _two_rank_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        for accumulation in (1, 4):
            model = _tiny_clip()
            out = _cached_step(model, rank, world_size, accumulation)
            grad = _flat_grad(model)
            dist.all_reduce(grad)  # what DDP / DeepSpeed do with the gradients: average over ranks
            scale_grad = model.logit_scale.grad.clone()
            dist.all_reduce(scale_grad)
            loss = out["loss"].clone()
            dist.all_reduce(loss)
            if rank == 0:
                result = {
                    "grad": grad / world_size,
                    "scale_grad": scale_grad / world_size,
                    "loss": loss / world_size,
                }
                torch.save(result, Path(out_dir) / f"accum{accumulation}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_cached_step_averaged_gradient_equals_naive_full_batch_gradient(tmp_path: Path) -> None:
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for accumulation in (1, 4):
        got = torch.load(tmp_path / f"accum{accumulation}.pt", weights_only=True)
        _assert_matches_naive_full_batch(got["grad"], got["scale_grad"], got["loss"])


UNEVEN_BATCH = 64
"""Over 3 ranks: 22 + 21 + 21 samples, in micro-batches of at most 8 (3 per rank: 8 + 7 + 7, 7 + 7 + 7)."""


def _uneven_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        split = BatchSplit(UNEVEN_BATCH, world_size, micro_batch=8)
        for step in (1,):  # at step 1 the extra sample sits on rank 1
            counts = split.counts(step)
            start = sum(counts[:rank])
            shard = [t[start : start + counts[rank]] for t in _global_batch(size=UNEVEN_BATCH)]
            bounds = [0]
            for size in split.micro_sizes(counts[rank]):
                bounds.append(bounds[-1] + size)
            micro = [tuple(t[a:b] for t in shard) for a, b in zip(bounds, bounds[1:])]
            model = _tiny_clip()
            cfg = LossConfig(tile_size=5, impl="tiled", w_real=W_REAL, w_syn=W_SYN)
            loss_fn = partial(contrastive_loss, cfg=cfg, counts=split.loss_counts(step))
            out = cached_contrastive_step(partial(_embed, model), micro, loss_fn)
            grad, scale_grad, loss = _flat_grad(model), model.logit_scale.grad.clone(), out["loss"].clone()
            for t in (grad, scale_grad, loss):
                dist.all_reduce(t)
            if rank == 0:
                result = {"grad": grad / world_size, "scale_grad": scale_grad / world_size}
                result.update(loss=loss / world_size, counts=torch.tensor(counts))
                torch.save(result, Path(out_dir) / f"step{step}.pt")
    finally:
        dist.destroy_process_group()


def test_three_ranks_with_uneven_shares_of_a_64_batch_give_the_naive_full_batch_gradient(
    tmp_path: Path,
) -> None:
    mp.spawn(_uneven_worker, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True)
    for step, counts in [(1, [21, 22, 21])]:
        got = torch.load(tmp_path / f"step{step}.pt", weights_only=True)
        assert got["counts"].tolist() == counts
        _assert_matches_naive_full_batch(got["grad"], got["scale_grad"], got["loss"], size=UNEVEN_BATCH)


def test_batch_split_covers_65536_on_24_and_96_ranks_within_the_micro_batch() -> None:
    for world_size, accumulation, largest in [(24, 11, 249), (96, 3, 228), (8, 32, 256), (256, 1, 256)]:
        split = BatchSplit(65_536, world_size, micro_batch=256)
        assert (split.accumulation, split.max_micro_batch) == (accumulation, largest)
        for step in range(3):
            counts = split.counts(step)
            assert sum(counts) == 65_536 and max(counts) - min(counts) <= 1
            sizes = [split.micro_sizes(c) for c in counts]
            assert all(len(s) == accumulation and 1 <= min(s) and max(s) <= largest for s in sizes)
    rotated = [BatchSplit(64, 3, 8).counts(step) for step in range(3)]
    assert [sum(col) for col in zip(*rotated)] == [64, 64, 64]  # every rank reads at the same rate
    with pytest.raises(ValueError, match="global_batch"):
        BatchSplit(2, 3, 8)
    with pytest.raises(ValueError, match="accumulation_steps"):
        BatchSplit(64, 1, 8, accumulation=2)


class _DropoutTowers(nn.Module):
    """Two small MLP towers with dropout: the re-embedding must redraw the very same masks."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 8))
        self.text = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 8))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.to(dtype)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, t = batch
        return {
            "image": F.normalize(self.image(x), dim=1),
            "text": F.normalize(self.text(t), dim=1),
            "logit_scale": self.logit_scale.exp(),
        }


def test_cached_step_replays_dropout_masks_and_leaves_the_rng_where_one_pass_would() -> None:
    g = torch.Generator().manual_seed(2)
    micro = [(torch.randn(5, 12, generator=g), torch.randn(5, 10, generator=g)) for _ in range(3)]
    loss_fn = partial(contrastive_loss, cfg=LossConfig(tile_size=4, impl="tiled"))

    one_pass = {}
    for dtype in (torch.float64, torch.float32):  # dropout draws the same masks in both dtypes
        ref_model = _DropoutTowers(dtype).train()
        torch.manual_seed(123)
        outs = [ref_model(tuple(x.to(dtype) for x in mb)) for mb in micro]  # masks drawn in the same order
        feats = {k: torch.cat([o[k] for o in outs]) for k in ("image", "text")}
        loss_fn(feats, outs[0]["logit_scale"])[0].backward()
        one_pass[dtype] = _flat_grad(ref_model)
    ref_next = torch.rand(3)

    model = _DropoutTowers().train()
    torch.manual_seed(123)
    out = cached_contrastive_step(model, micro, loss_fn)
    assert float(out["reembed_max_abs_diff"]) == 0.0
    assert_as_accurate_as_fp32("grad", _flat_grad(model), one_pass[torch.float32], one_pass[torch.float64])
    assert torch.equal(torch.rand(3), ref_next)


def test_backward_scale_argument_multiplies_every_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    micro = [(torch.randn(4, 12, generator=g), torch.randn(4, 10, generator=g)) for _ in range(2)]
    loss_fn = partial(contrastive_loss, cfg=LossConfig())
    model_a, model_b = _DropoutTowers().eval(), _DropoutTowers().eval()
    cached_contrastive_step(model_a, micro, loss_fn)
    calls: list[float] = []

    def divided_backward(
        t: torch.Tensor,
    ) -> None:  # like DeepSpeed's engine.backward with 2 accumulation steps
        calls.append(float(t.detach()))
        (t / 2).backward()

    cached_contrastive_step(model_b, micro, loss_fn, backward=divided_backward, scale=2.0)
    assert len(calls) == 2
    assert torch.equal(_flat_grad(model_b), _flat_grad(model_a))  # x 2 then / 2 is exact in floating point


def test_cached_step_rejects_an_embed_output_without_logit_scale() -> None:
    with pytest.raises(ValueError, match="logit_scale"):
        cached_contrastive_step(lambda mb: {"image": mb, "text": mb}, [torch.randn(2, 4)], contrastive_loss)


def _deepspeed_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    import os

    import deepspeed  # only this test drives a real engine; the library imports DeepSpeed in one module

    from pipeline.train.gradcache import engine_backward

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = _tiny_clip()
        # DeepSpeed 0.19.8 cannot broadcast a 0-dim parameter (view as uint8): give logit_scale shape [1].
        model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
        before = [p.detach().clone() for p in model.parameters()]
        accumulation, local = 4, GLOBAL_BATCH // world_size
        config = {
            "train_micro_batch_size_per_gpu": local // accumulation,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
        )

        def embed(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
            images, texts, syn = batch  # through the engine's forward: ZeRO-3 gathers parameters in its hooks
            image, text, logit_scale = engine(images, texts)
            return {
                "image": image,
                "text": text,
                "syn_text": engine(None, syn)[1],
                "logit_scale": logit_scale,
            }

        shard = [t[rank * local : (rank + 1) * local] for t in _global_batch()]
        micro = [tuple(t.chunk(accumulation)[k] for t in shard) for k in range(accumulation)]
        cfg = LossConfig(tile_size=3, impl="tiled", w_real=W_REAL, w_syn=W_SYN)
        cached_contrastive_step(
            embed, micro, partial(contrastive_loss, cfg=cfg), backward=engine_backward(engine)
        )
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            after = [p.detach().clone() for p in engine.module.parameters()]
        if rank == 0:
            step = torch.cat([(b - a).reshape(-1) for a, b in zip(after, before)])  # SGD lr 1: -gradient
            torch.save({"step": step, "global_steps": engine.global_steps}, Path(out_dir) / "deepspeed.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_zero3_step_with_engine_backward_applies_the_naive_full_batch_gradient(
    tmp_path: Path,
) -> None:
    pytest.importorskip("deepspeed")
    mp.spawn(_deepspeed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "deepspeed.pt", weights_only=True)
    (ref_grad, _, _), (fp32_grad, _, _) = _naive_reference(torch.float64), _naive_reference(torch.float32)
    assert got["global_steps"] == 1  # one optimizer step for the 4 micro-batches
    # The step is read back as (p - g) - p in fp32, which rounds each element by up to u * |p| once more.
    params = torch.cat([p.detach().reshape(-1) for p in _tiny_clip().parameters()])
    assert_as_accurate_as_fp32("step", got["step"], fp32_grad, ref_grad, floor=2 * U32 * float(params.norm()))

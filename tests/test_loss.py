"""Tests of the tiled (Inf-CL) contrastive loss against the naive full-batch CLIP loss.

.venv/bin/pytest tests/test_loss.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from numerics import assert_within_fp32_bound, clip_reference

from pipeline.train.loss import LossConfig, clip_loss, contrastive_loss, naive_clip_loss

REPO = Path(__file__).resolve().parents[1]


def _features(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    # Captions correlated with their images, but weakly: the loss ranges from ~0.04 (batch 2, where each
    # loss term is ~4.4 and fp32 rounding of the terms dominates the difference) to ~log(N).
    txt = F.normalize(img + 8.0 * torch.randn(n, dim, generator=g), dim=1)
    return img, txt


def _loss_and_grads(fn, img, txt, scale) -> dict[str, torch.Tensor]:
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = fn(img, txt, s)
    return dict(
        zip(["loss", "d_img", "d_txt", "d_scale"], (loss.detach(), *torch.autograd.grad(loss, [img, txt, s])))
    )


def _tiled(tile: int):
    return lambda i, t, s: clip_loss(i, t, s, LossConfig(tile_size=tile, impl="tiled"))


@pytest.mark.parametrize(
    ("batch", "tile"), [(1, 4), (2, 1), (7, 3), (64, 16), (100, 33), (257, 64), (40, 4096)]
)
def test_tiled_and_naive_losses_and_gradients_lie_within_fp32_error_of_a_float64_reference(
    batch: int, tile: int
) -> None:
    img, txt = _features(batch, 16, seed=batch)
    ref = clip_reference(img, txt, 10.0)
    for impl, fn in [("naive", naive_clip_loss), ("tiled", _tiled(tile))]:
        for name, value in _loss_and_grads(fn, img, txt, 10.0).items():
            assert_within_fp32_bound(f"{impl} {name}", value, ref[name])
    if batch > 1:  # the comparison is not vacuous
        assert ref["loss"][0] > 0 and ref["d_img"][0].norm() > 0 and ref["d_scale"][0].abs() > 0


@pytest.mark.parametrize("batch", [2, 64, 257])
def test_the_fp32_bound_catches_a_one_in_ten_thousand_change_of_the_logit_scale(batch: int) -> None:
    img, txt = _features(batch, 16, seed=batch)
    ref = clip_reference(img, txt, 10.0)
    wrong = _loss_and_grads(lambda i, t, s: _tiled(16)(i, t, s * (1 + 1e-4)), img, txt, 10.0)
    with pytest.raises(AssertionError, match="fp32 bound"):
        for name, value in wrong.items():
            assert_within_fp32_bound(name, value, ref[name])


def test_tiled_loss_is_on_average_as_accurate_as_the_naive_loss_at_small_losses() -> None:
    # At a small loss each term is lse - positive with both large: the tiled loss must cancel them as
    # F.cross_entropy does (positives from the same products, max-shifted sums). Computing the positive as a
    # separate dot product made its mean error ~10x the naive one's. Means over 200 batches are round-off
    # averages, stable across CPUs where single errors are not.
    g = torch.Generator().manual_seed(0)
    errors = {"naive": 0.0, "tiled": 0.0}
    for _ in range(200):
        img = F.normalize(torch.randn(2, 16, generator=g), dim=1)
        txt = F.normalize(img + 0.5 * torch.randn(2, 16, generator=g), dim=1)
        exact = float(clip_reference(img, txt, 10.0)["loss"][0])
        errors["naive"] += abs(float(naive_clip_loss(img, txt, torch.tensor(10.0))) - exact)
        errors["tiled"] += abs(float(_tiled(1)(img, txt, torch.tensor(10.0))) - exact)
    assert errors["tiled"] <= 3 * errors["naive"], errors


def test_tiled_loss_stays_finite_when_some_similarities_are_far_below_the_tile_maximum() -> None:
    # At scale 100 one text anti-aligned with every image sits ~200 logits below the largest one: a
    # single shared exp offset per tile would underflow to log(0).
    img, txt = _features(48, 8, seed=3)
    txt[5] = -F.normalize(img.mean(0), dim=0)
    ref = clip_reference(img, txt, 100.0)
    for name, value in _loss_and_grads(_tiled(8), img, txt, 100.0).items():
        assert torch.isfinite(value).all()
        assert_within_fp32_bound(name, value, ref[name])


def test_contrastive_loss_weights_real_and_synthetic_caption_terms() -> None:
    img, txt = _features(30, 8, seed=1)
    _, syn = _features(30, 8, seed=2)
    cfg = LossConfig(tile_size=7, impl="tiled", w_real=0.7, w_syn=0.3)
    loss, terms = contrastive_loss({"image": img, "text": txt, "syn_text": syn}, 10.0, cfg)
    (real, real_bound), (synth, synth_bound) = (clip_reference(img, t, 10.0)["loss"] for t in (txt, syn))
    assert_within_fp32_bound("loss", loss, (0.7 * real + 0.3 * synth, 0.7 * real_bound + 0.3 * synth_bound))
    assert_within_fp32_bound("loss_real", terms["loss_real"], (real, real_bound))
    assert_within_fp32_bound("loss_syn", terms["loss_syn"], (synth, synth_bound))
    loss_real_only, terms_real_only = contrastive_loss({"image": img, "text": txt}, 10.0, cfg)
    assert set(terms_real_only) == {"loss_real"}
    assert_within_fp32_bound("real only", loss_real_only, (0.7 * real, 0.7 * real_bound))


def test_auto_impl_uses_the_naive_path_for_a_batch_within_one_tile() -> None:
    img, txt = _features(20, 8, seed=4)
    auto = clip_loss(img, txt, 5.0, LossConfig(tile_size=32))
    assert torch.equal(auto, naive_clip_loss(img, txt, torch.tensor(5.0)))  # the same ops, bit for bit
    tiled = clip_loss(img, txt, 5.0, LossConfig(tile_size=32, impl="tiled"))
    assert_within_fp32_bound("tiled", tiled, clip_reference(img, txt, 5.0)["loss"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tile_size": 0}, "tile_size"),
        ({"w_real": -1.0}, "w_real"),
        ({"w_real": 0.0, "w_syn": 0.0}, "w_real"),
        ({"impl": "fast"}, "impl"),
    ],
)
def test_loss_config_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)


def _distributed_worker(
    rank: int, world_size: int, store: str, out_dir: str, counts: list[int] | None = None
) -> None:
    from pipeline.train import loss as loss_module

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        img, txt = _features(24, 8, seed=7)  # the global batch; this rank owns rows start..start+n
        sizes = counts or [img.shape[0] // world_size] * world_size
        start, n = sum(sizes[:rank]), sizes[rank]
        results = {}
        variants = [("tiled", "reduce_scatter"), ("tiled", "all_reduce"), ("naive", "reduce_scatter")]
        for impl, gather_backward in variants:
            loss_module.GATHER_BACKWARD = gather_backward
            cfg = LossConfig(tile_size=5, impl=impl)
            i_loc = img[start : start + n].clone().requires_grad_()
            t_loc = txt[start : start + n].clone().requires_grad_()
            s = torch.tensor(15.0, requires_grad=True)
            loss = clip_loss(i_loc, t_loc, s, cfg, counts=counts)
            loss.backward()
            parts = [loss.detach().reshape(1), s.grad.reshape(1)]
            stats = torch.cat(parts)
            dist.all_reduce(stats)  # mean over ranks = what DDP's gradient averaging yields
            rows = max(sizes)  # all_gather needs equal sizes: pad, then cut each rank's rows back out
            grads_i = [torch.empty(rows, img.shape[1]) for _ in range(world_size)]
            grads_t = [torch.empty(rows, img.shape[1]) for _ in range(world_size)]
            dist.all_gather(grads_i, F.pad(i_loc.grad, (0, 0, 0, rows - n)))
            dist.all_gather(grads_t, F.pad(t_loc.grad, (0, 0, 0, rows - n)))
            d_img = torch.cat([g[:c] for g, c in zip(grads_i, sizes)])
            d_txt = torch.cat([g[:c] for g, c in zip(grads_t, sizes)])
            results[f"{impl}/{gather_backward}"] = {
                "loss": float(stats[0] / world_size),
                "d_scale": float(stats[1] / world_size),
                "d_img": (d_img / world_size).tolist(),
                "d_txt": (d_txt / world_size).tolist(),
            }
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _assert_ranks_reproduce_the_full_batch(results: dict) -> None:
    img, txt = _features(24, 8, seed=7)
    ref = clip_reference(img, txt, 15.0)
    assert len(results) == 3
    for variant, got in results.items():
        for key, value in ref.items():
            assert_within_fp32_bound(f"{variant} {key}", torch.tensor(got[key]), value)


def test_two_rank_local_loss_averages_to_the_full_batch_loss_and_gradient(tmp_path: Path) -> None:
    """Both backward branches of the feature gather (reduce-scatter, as on NCCL; all-reduce) run on gloo."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    _assert_ranks_reproduce_the_full_batch(json.loads((tmp_path / "result.json").read_text()))


def test_three_ranks_holding_9_8_and_7_pairs_pad_mask_and_give_the_full_batch_loss_and_gradient(
    tmp_path: Path,
) -> None:
    args = (3, str(tmp_path / "store"), str(tmp_path), [9, 8, 7])
    mp.spawn(_distributed_worker, args=args, nprocs=3, join=True)
    _assert_ranks_reproduce_the_full_batch(json.loads((tmp_path / "result.json").read_text()))


def test_counts_must_name_this_ranks_pairs() -> None:
    img, txt = _features(4, 8, seed=1)
    with pytest.raises(ValueError, match="counts"):
        clip_loss(img, txt, 10.0, LossConfig(), counts=[5])


MEMORY_SCRIPT = """
import resource, sys, torch
import torch.nn.functional as F
from pipeline.train.loss import LossConfig, clip_loss
torch.set_num_threads(2)
n, dim, tile = int(sys.argv[1]), 16, 1024
img = F.normalize(torch.randn(n, dim), dim=1).requires_grad_()
txt = F.normalize(torch.randn(n, dim), dim=1).requires_grad_()
scale = torch.tensor(30.0, requires_grad=True)
cfg = LossConfig(tile_size=tile, impl="tiled")
small = [x[:64].detach().clone().requires_grad_() for x in (img, txt)]
clip_loss(*small, scale, cfg).backward()  # warm-up: loads the kernels, sets up the thread pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clip_loss(img, txt, scale, cfg).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, bool(torch.isfinite(img.grad).all()))
"""


def test_tiled_loss_memory_stays_far_below_the_full_similarity_matrix() -> None:
    n = 8192
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(n)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    growth, finite = proc.stdout.split()
    full_logits = n * n * 4  # one fp32 N x N matrix (256 MiB); the naive loss needs several (~750 MiB here)
    assert finite == "True"
    assert int(growth) < full_logits / 4, f"peak RSS grew by {int(growth) / 2**20:.0f} MiB"


def test_one_element_logit_scale_parameter_gives_a_scalar_loss_and_a_gradient_of_its_shape() -> None:
    img, txt = _features(10, 8, seed=5)
    scale = torch.tensor([12.0], requires_grad=True)  # open_clip's nonscalar_logit_scale form
    loss, _ = contrastive_loss({"image": img, "text": txt}, scale, LossConfig(tile_size=4, impl="tiled"))
    loss.backward()
    assert loss.shape == () and scale.grad.shape == (1,)
    assert_within_fp32_bound("d_scale", scale.grad, clip_reference(img, txt, 12.0)["d_scale"])


def test_bfloat16_features_under_autocast_give_the_fp32_loss_and_bfloat16_gradients() -> None:
    img, txt = _features(50, 16, seed=6)
    img16, txt16 = img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(img16, txt16, 50.0, LossConfig(tile_size=16, impl="tiled"))
    loss.backward()
    assert loss.dtype == torch.float32 and img16.grad.dtype == torch.bfloat16
    # The loss itself is fp32 on the bf16 inputs' exact values, so the fp32 bound holds for it.
    assert_within_fp32_bound("loss", loss, clip_reference(img16.float(), txt16.float(), 50.0)["loss"])

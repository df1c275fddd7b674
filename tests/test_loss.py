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

from pipeline.train.loss import LossConfig, clip_loss, contrastive_loss, naive_clip_loss

REPO = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against the reference b (absolute when b is zero)."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.norm() > 0 else float((a - b).norm())


def _features(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = F.normalize(img + 8.0 * torch.randn(n, dim, generator=g), dim=1)  # loss O(1): no cancellation
    return img, txt


def _loss_and_grads(fn, img, txt, scale):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = fn(img, txt, s)
    return (loss.detach(), *torch.autograd.grad(loss, [img, txt, s]))


@pytest.mark.parametrize(
    ("batch", "tile"), [(1, 4), (2, 1), (7, 3), (64, 16), (100, 33), (257, 64), (40, 4096)]
)
def test_tiled_loss_matches_naive_loss_and_gradients(batch: int, tile: int) -> None:
    img, txt = _features(batch, 16, seed=batch)
    ref = _loss_and_grads(naive_clip_loss, img, txt, 10.0)
    cfg = LossConfig(tile_size=tile, impl="tiled")
    got = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, cfg), img, txt, 10.0)
    for name, a, b in zip(["loss", "d_img", "d_txt", "d_scale"], got, ref):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    if batch > 1:
        assert ref[0] > 0 and ref[1].norm() > 0 and ref[3].abs() > 0  # the comparison is not vacuous


def test_tiled_loss_stays_finite_when_some_similarities_are_far_below_the_tile_maximum() -> None:
    # At scale 100 one text anti-aligned with every image sits ~200 logits below the largest one: a
    # single shared exp offset per tile would underflow to log(0). Compare with a float64 reference.
    img, txt = _features(48, 8, seed=3)
    txt[5] = -F.normalize(img.mean(0), dim=0)
    ref = _loss_and_grads(naive_clip_loss, img.double(), txt.double(), 100.0)
    got = _loss_and_grads(
        lambda i, t, s: clip_loss(i, t, s, LossConfig(tile_size=8, impl="tiled")), img, txt, 100.0
    )
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert _rel(a.double(), b) < 1e-5


def test_contrastive_loss_weights_real_and_synthetic_caption_terms() -> None:
    img, txt = _features(30, 8, seed=1)
    _, syn = _features(30, 8, seed=2)
    cfg = LossConfig(tile_size=7, impl="tiled", w_real=0.7, w_syn=0.3)
    loss, terms = contrastive_loss({"image": img, "text": txt, "syn_text": syn}, 10.0, cfg)
    real, synth = naive_clip_loss(img, txt, 10.0), naive_clip_loss(img, syn, 10.0)
    assert _rel(loss, 0.7 * real + 0.3 * synth) < 1e-5
    assert _rel(terms["loss_real"], real) < 1e-5 and _rel(terms["loss_syn"], synth) < 1e-5
    loss_real_only, terms_real_only = contrastive_loss({"image": img, "text": txt}, 10.0, cfg)
    assert set(terms_real_only) == {"loss_real"} and _rel(loss_real_only, 0.7 * real) < 1e-5


def test_auto_impl_uses_the_naive_path_for_a_batch_within_one_tile_with_the_same_value() -> None:
    img, txt = _features(20, 8, seed=4)
    auto = clip_loss(img, txt, 5.0, LossConfig(tile_size=32))
    tiled = clip_loss(img, txt, 5.0, LossConfig(tile_size=32, impl="tiled"))
    assert _rel(auto, tiled) < 1e-6


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


def _distributed_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        img, txt = _features(24, 8, seed=7)  # the global batch; this rank owns rows rank*n..(rank+1)*n
        n = img.shape[0] // world_size
        results = {}
        for impl in ("tiled", "naive"):
            cfg = LossConfig(tile_size=5, impl=impl)
            i_loc = img[rank * n : (rank + 1) * n].clone().requires_grad_()
            t_loc = txt[rank * n : (rank + 1) * n].clone().requires_grad_()
            s = torch.tensor(15.0, requires_grad=True)
            loss = clip_loss(i_loc, t_loc, s, cfg)
            loss.backward()
            parts = [loss.detach().reshape(1), s.grad.reshape(1)]
            stats = torch.cat(parts)
            dist.all_reduce(stats)  # mean over ranks = what DDP's gradient averaging yields
            grads_i = [torch.empty_like(i_loc) for _ in range(world_size)]
            grads_t = [torch.empty_like(t_loc) for _ in range(world_size)]
            dist.all_gather(grads_i, i_loc.grad)
            dist.all_gather(grads_t, t_loc.grad)
            results[impl] = {
                "loss": float(stats[0] / world_size),
                "d_scale": float(stats[1] / world_size),
                "d_img": (torch.cat(grads_i) / world_size).tolist(),
                "d_txt": (torch.cat(grads_t) / world_size).tolist(),
            }
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_rank_local_loss_averages_to_the_full_batch_loss_and_gradient(tmp_path: Path) -> None:
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = json.loads((tmp_path / "result.json").read_text())
    img, txt = _features(24, 8, seed=7)
    ref = dict(zip(["loss", "d_img", "d_txt", "d_scale"], _loss_and_grads(naive_clip_loss, img, txt, 15.0)))
    for impl, got in results.items():
        for key, value in ref.items():
            assert _rel(torch.tensor(got[key]), value) < 1e-5, (impl, key)


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
    ref = _loss_and_grads(naive_clip_loss, img, txt, 12.0)
    assert loss.shape == () and scale.grad.shape == (1,)
    assert _rel(scale.grad.reshape(()), ref[3]) < 1e-5


def test_bfloat16_features_under_autocast_give_the_fp32_loss_and_bfloat16_gradients() -> None:
    img, txt = _features(50, 16, seed=6)
    img16, txt16 = img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(img16, txt16, 50.0, LossConfig(tile_size=16, impl="tiled"))
    loss.backward()
    ref = naive_clip_loss(img16.detach().double(), txt16.detach().double(), 50.0)  # same inputs, float64
    assert loss.dtype == torch.float32 and img16.grad.dtype == torch.bfloat16
    assert _rel(loss.double(), ref) < 1e-5

"""TGKD / VGKD losses (known answers, float64-reference gradients) and the teacher's per-image cache."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.finetune.distill_losses import TeacherCache, masked_crop_embeddings, tgkd_loss, vgkd_loss
from pipeline.model.backbone import BackboneConfig, build_backbone
from tests.numerics import assert_as_accurate_as_fp32

# Three regions in 2-d, deliberately not unit length (the losses normalise every embedding first):
# student V -> (1,0), (0,1), (0,-1); teacher R -> (1,0), (0,1), (-1,0); text T -> (1,0), (0,1), (1,0)
# (regions 1 and 3 share a category).
V = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, -0.5]])
R = torch.tensor([[1.0, 0.0], [0.0, 4.0], [-2.0, 0.0]])
T = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
S2 = math.sqrt(2.0)


def test_tgkd_equals_the_hand_computed_value_on_three_regions():
    # ||V_i - R_j||: row 1: 0, s2, 2; row 2: s2, 0, s2; row 3: s2, 2, s2
    # ||T_i - T_j||: row 1: 0, s2, 0; row 2: s2, 0, s2; row 3: 0, s2, 0
    # |difference| summed per row: 2; 0; s2 + (2 - s2) + s2 = 2 + s2.  Total 4 + s2, over N = 3.
    assert abs(tgkd_loss(V, R, T).item() - (4 + S2) / 3) < 1e-6


def test_vgkd_equals_the_hand_computed_value_on_three_regions():
    # ||V_i - V_j||: (1,2) s2, (1,3) s2, (2,3) 2;  ||T_i - T_j||: (1,2) s2, (1,3) 0, (2,3) s2
    # |difference|: 0, s2, 2 - s2 -> 2 per unordered pair set, both orders -> 4, over N = 3.
    assert abs(vgkd_loss(V, T).item() - 4 / 3) < 1e-6


def test_the_losses_are_per_image_means_over_the_batch():
    # Image 0: the three regions above; image 1: two regions whose student and teacher embeddings all point
    # the same way, with different categories at distance s2. Every vision distance of image 1 is 0, so
    # TGKD = (|0 - 0| + |0 - s2| + |0 - s2| + |0 - 0|) / 2 = s2 and VGKD = (|0 - s2| + |0 - s2|) / 2 = s2.
    v2 = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    r2 = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    t2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([0, 0, 0, 1, 1])
    v, r, t = torch.cat([V, v2]), torch.cat([R, r2]), torch.cat([T, t2])
    assert abs(tgkd_loss(v, r, t, image).item() - ((4 + S2) / 3 + S2) / 2) < 1e-6
    assert abs(vgkd_loss(v, t, image).item() - (4 / 3 + S2) / 2) < 1e-6


def _naive(v: torch.Tensor, r: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """The formulas term by term, in whatever dtype the inputs have (the reference and the fp32 baseline)."""
    n = len(v)
    vu = [x / x.norm() for x in v]
    ru = [x / x.norm() for x in r] if r is not None else vu
    tu = [x / x.norm() for x in t]
    total = v.new_zeros(())
    for i in range(n):
        for j in range(n):
            if r is None and i == j:
                continue
            total = total + ((vu[i] - ru[j]).norm() - (tu[i] - tu[j]).norm()).abs()
    return total / n


IMPLEMENTATIONS = {
    "tgkd": (lambda v, r, t: tgkd_loss(v, r, t), lambda v, r, t: _naive(v, r, t)),
    "vgkd": (lambda v, r, t: vgkd_loss(v, t), lambda v, r, t: _naive(v, None, t)),
}


def _value_and_grad(impl, v, r, t):  # noqa: ANN001, ANN202
    v = v.detach().clone().requires_grad_(True)
    loss = impl(v, r.to(v.dtype), t.to(v.dtype))
    loss.backward()
    return loss.detach(), v.grad


@pytest.mark.parametrize("name", ["tgkd", "vgkd"])
def test_loss_and_gradient_match_a_float64_reference_within_the_fp32_error_of_the_plain_formula(name):
    fn, naive = IMPLEMENTATIONS[name]
    g = torch.Generator().manual_seed(0)
    v, r, t = (torch.randn(6, 16, generator=g) for _ in range(3))
    ref_loss, ref_grad = _value_and_grad(naive, v.double(), r, t)
    base_loss, base_grad = _value_and_grad(naive, v, r, t)
    got_loss, got_grad = _value_and_grad(fn, v, r, t)
    assert_as_accurate_as_fp32(f"{name} loss", got_loss, base_loss, ref_loss)
    assert_as_accurate_as_fp32(f"{name} grad", got_grad, base_grad, ref_grad)
    # and the analytic gradient agrees with finite differences in float64
    assert torch.autograd.gradcheck(
        lambda x: fn(x, r.double(), t.double()), (v.double().requires_grad_(True),)
    )


def test_a_student_equal_to_its_teacher_gets_a_finite_gradient():
    v = R.clone().requires_grad_(True)  # ||V_i - R_i|| = 0 exactly: the region stage's first step
    tgkd_loss(v, R, T).backward()
    assert torch.isfinite(v.grad).all()


def test_the_teacher_cache_returns_the_per_image_computation_and_keys_each_view_of_an_image(tmp_path):
    teacher = build_backbone(BackboneConfig(model="debug")).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    masks = (torch.rand(3, 64, 64, generator=g) > 0.5).float()
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 60.0, 40.0], [4.0, 10.0, 50.0, 60.0]])
    kind = torch.tensor([0, 1, 2])
    image = torch.tensor([0, 0, 1])
    indices = torch.tensor([7, 9])
    cache = TeacherCache(teacher, directory=str(tmp_path / "cache"))
    first = cache.embed(images, indices, image, boxes, masks, kind)
    assert (cache.hits, cache.misses) == (0, 2)
    again = cache.embed(images, indices, image, boxes, masks, kind)
    assert (cache.hits, cache.misses) == (2, 2) and torch.equal(first, again)
    for i in (0, 1):  # one image at a time, uncached: the same bits
        rows = image == i
        direct = masked_crop_embeddings(
            teacher,
            images[i : i + 1],
            torch.zeros(int(rows.sum()), dtype=torch.long),
            boxes[rows],
            masks[rows],
            kind[rows],
        )
        assert torch.equal(first[rows], direct)
    # a new process (empty memory) reads the entries back from disk
    disk = TeacherCache(teacher, directory=str(tmp_path / "cache"))
    assert torch.equal(disk.embed(images, indices, image, boxes, masks, kind), first) and disk.misses == 0
    # a flipped view of image 0 is its own entry
    flipped = images.clone()
    flipped[0] = images[0].flip(-1)
    disk.embed(flipped, indices, image, boxes, masks, kind)
    assert disk.misses == 1

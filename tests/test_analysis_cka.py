"""CKA: known answers (itself, a rotation of itself, independent features) and per-layer CKA of real ViTs."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch

from pipeline.analysis.cka import expected_linear_cka_independent, layer_cka, linear_cka, rbf_cka

U64 = 2.0**-53


def features(n: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rotation(p: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(features(p, p, seed))[0]


def test_linear_cka_of_a_representation_with_itself_and_with_a_rotation_of_itself_is_one():
    n, p = 300, 16
    x = features(n, p, 0)
    # Worst-case first-order bound: the rotation and the matmuls perturb X by a relative (n + p + 2) u in
    # Frobenius norm, and CKA moves by at most 4 kappa(X)^2 times a relative perturbation of X.
    s = torch.linalg.svdvals(x - x.mean(0))
    bound = 4 * float(s[0] / s[-1]) ** 2 * (n + p + 2) * U64
    assert abs(linear_cka(x, x) - 1) <= bound
    assert abs(linear_cka(x, x @ rotation(p, 1)) - 1) <= bound
    assert abs(linear_cka(x, 3.0 * x @ rotation(p, 2) + 5.0) - 1) <= bound  # isotropic scale and shift too
    y = x.clone()
    y[:, 0] *= 3.0  # an anisotropic stretch is not an orthogonal transform: CKA drops below 1
    assert linear_cka(x, y) < 1 - 100 * bound


def test_rbf_cka_of_a_representation_with_itself_and_with_a_rotation_of_itself_is_one():
    n, p = 200, 8
    x = features(n, p, 3)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=n * n * U64)
    # Squared distances after a rotation differ by at most ~ 4 (p + 2) u max|x|^2 each (computed as
    # |a|^2 + |b|^2 - 2 a.b); divided by 2 sigma^2 that bounds every Gram entry's change, and CKA's change
    # by 4 n times that (Frobenius norms over n^2 entries of a kernel whose centred norm is >= 1 here).
    sq = float(x.pow(2).sum(1).max())
    d2 = torch.pdist(x).pow(2)
    sigma2 = (0.8**2) * float(d2.median())
    bound = 4 * n * 4 * (p + 2) * U64 * sq / (2 * sigma2)
    assert abs(rbf_cka(x, x @ rotation(p, 4)) - 1) <= bound


def test_linear_cka_of_independent_random_features_is_near_its_expected_value_not_one():
    n, p, q = 1000, 16, 16
    expected = expected_linear_cka_independent(n, p, q)  # sqrt(pq / ((m+p+1)(m+q+1))), ~0.016 here
    # ||Y^T X||_F^2 is ~ m times a chi-square with pq degrees of freedom: relative sd sqrt(2 / pq) = 0.088; six
    # of those bound the draw (the denominators concentrate far more).
    tol = 6 * math.sqrt(2 / (p * q))
    for seed in range(3):
        got = linear_cka(features(n, p, 10 + seed), features(n, q, 20 + seed))
        assert expected * (1 - tol) <= got <= expected * (1 + tol)


def test_cka_refuses_features_of_different_inputs():
    with pytest.raises(ValueError, match="samples"):
        linear_cka(features(10, 3, 0), features(11, 3, 1))


def _tiny_visual(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=32, head_width=16, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
    ).visual


def test_per_layer_cka_of_a_tower_with_itself_is_one_and_with_another_tower_less():
    images = torch.randn(6, 3, 32, 32)
    a, b = _tiny_visual(0), _tiny_visual(1)
    same = layer_cka(a, a, images)
    assert len(same) == 2 and all(abs(v - 1) < 1e-9 for v in same)
    other = layer_cka(a, b, images)
    assert all(0 <= v < 0.999 for v in other)

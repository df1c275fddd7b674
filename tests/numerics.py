"""Float64 references and fp32 error bounds for the contrastive-loss tests.

A test that compares an fp32 computation with another fp32 computation under a fixed relative bound passes on
one CPU and fails on another (the last bits of fp32 matmuls differ between Intel and AMD kernels, and a small
loss is the difference of two large, nearly equal terms). These helpers instead compare an fp32 result with
the exact result computed in float64 *from the same fp32 inputs*, under a bound derived from fp32 rounding.

The CLIP loss of N normalised pairs in dimension D at scale s, with z = s * I @ T.T, row / column softmaxes
P / Q and G = dL/dz = (P + Q - 2 Id) / (2N):

    L = 1/(2N) sum_i (lse_row_i + lse_col_i - 2 z_ii)    dL/dI = s G @ T    dL/dT = s G.T @ I    dL/ds = sum G * z/s

Forward error analysis with u = 2^-24 (fp32 unit roundoff):
- each logit is a length-D dot product times s: |dz| <= (D + 2) u s (|a| = |b| = 1);
- a log-sum-exp moves by at most max |dz| plus its own rounding, (log2 N + 4) u |lse|; a softmax entry moves
  by at most 2 max |dz| relatively plus (log2 N + 4) u;
- a sum or matmul over N terms adds N u of the sum of absolute values.
So every quantity q = sum_k c_k x_k gets the bound ``err(q) <= (2 (D + 2) s + log2 N + N + 8) u * |q|_abs``,
where ``|q|_abs`` is the same expression with every term replaced by its absolute value (no cancellation).
It is a worst-case bound (observed errors are 10-1000x smaller), independent of the CPU, and still tight
enough that a relative change of 1e-4 in the logit scale breaks it (``test_loss.py`` shows that).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

U32 = 2.0**-24
"""Unit roundoff of fp32."""


def clip_reference(img: Tensor, txt: Tensor, scale: float) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (value, bound)} for loss, d_img, d_txt, d_scale: float64 values and fp32 error bounds."""
    i, t = img.detach().double(), txt.detach().double()
    n, dim = i.shape
    cos = i @ t.T
    z = scale * cos
    eye = torch.eye(n, dtype=torch.float64)
    lse_r, lse_c = torch.logsumexp(z, 1), torch.logsumexp(z, 0)
    p, q = torch.softmax(z, 1), torch.softmax(z, 0)
    g, g_abs = (p + q - 2 * eye) / (2 * n), (p + q + 2 * eye) / (2 * n)
    loss = (lse_r.sum() + lse_c.sum() - 2 * z.diagonal().sum()) / (2 * n)
    loss_abs = (lse_r.abs().sum() + lse_c.abs().sum() + 2 * z.diagonal().abs().sum()) / (2 * n)
    values = {
        "loss": (loss, loss_abs),
        "d_img": (scale * g @ t, scale * g_abs @ t.abs()),
        "d_txt": (scale * g.T @ i, scale * g_abs.T @ i.abs()),
        "d_scale": ((g * cos).sum(), (g_abs * cos.abs()).sum()),
    }
    factor = (2 * (dim + 2) * scale + math.log2(max(n, 2)) + n + 8) * U32
    return {name: (value, factor * magnitude) for name, (value, magnitude) in values.items()}


def assert_within_fp32_bound(name: str, got: Tensor, ref: tuple[Tensor, Tensor]) -> None:
    """Every element of ``got`` lies within its fp32 bound of the float64 reference."""
    value, bound = ref
    err = (got.detach().double().reshape(value.shape) - value).abs()
    worst = float((err / bound.clamp_min(1e-300)).max())
    assert worst <= 1.0, f"{name}: error {float(err.max()):.3g} is {worst:.2f}x its fp32 bound"


def assert_as_accurate_as_fp32(
    name: str, got: Tensor, baseline: Tensor, ref: Tensor, factor: float = 4.0, floor: float = 0.0
) -> None:
    """``got`` is no further from the float64 ``ref`` than ``factor`` x the fp32 ``baseline``'s own error.

    For results of deep computations (a model's gradient) no closed-form bound is practical; the fp32 error
    of the plain computation (the baseline: the same model and loss, naively, in fp32) measures what fp32
    rounding does on *this* CPU, so the bound moves with the machine while still catching a defect that is
    large next to rounding. Norm-wise over all elements, plus 16 u of the reference's norm and ``floor``
    (an extra rounding step the candidate takes and the baseline does not).
    """
    ref = ref.detach().double()
    err = float((got.detach().double().reshape(ref.shape) - ref).norm())
    base = float((baseline.detach().double().reshape(ref.shape) - ref).norm())
    bound = factor * base + 16 * U32 * float(ref.norm()) + floor
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (fp32 baseline error {base:.3g})"

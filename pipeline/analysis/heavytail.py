"""Heavy-tailed self-regularisation metric alpha of weight matrices, per matrix and per transformer block.

    fit = fit_power_law(eigenvalues(w))             # PowerLawFit(alpha, xmin, num_tail, ks, sigma)
    alphas = block_alphas(backbone)                  # {block index: mean alpha of its weight matrices}
    frozen = lowest_alpha_blocks(alphas, 0.5)        # the half of the blocks with the smallest alpha

The empirical spectral density (ESD) of a weight matrix ``W`` (m x n) is the distribution of the eigenvalues
``lambda_i`` of ``W^T W`` (the squared singular values, computed by a float64 SVD). Its tail is fitted by a
power law ``p(lambda) ~ lambda^-alpha`` for ``lambda >= xmin`` with the estimator WeightWatcher uses (through
the ``powerlaw`` package), i.e. Clauset, Shalizi & Newman (2009), "Power-law distributions in empirical data":

- for a given ``xmin`` the maximum-likelihood (continuous Hill) estimate over the ``n`` tail eigenvalues is
  ``alpha = 1 + n / sum_i log(lambda_i / xmin)``, with standard error ``sigma = (alpha - 1) / sqrt(n)``;
- ``xmin`` is the candidate (every eigenvalue that leaves at least ``min_tail`` eigenvalues in the tail) that
  minimises the Kolmogorov-Smirnov distance between the tail's empirical CDF and the fitted one,
  ``1 - (lambda / xmin)^(1 - alpha)``.

``fit_power_law(..., xmin=x)`` fixes the cut instead (a fixed-fraction tail: ``tail_fraction``). The
eigenvalues are not normalised by the matrix size: alpha is scale-invariant.

A *block* (one ViT residual block, ``transformer.resblocks.<i>``) gets the mean alpha of its weight matrices:
the query, key and value projections (the three row blocks of ``attn.in_proj_weight``, each a linear map of
its own), ``attn.out_proj.weight``, ``mlp.c_fc.weight`` and ``mlp.c_proj.weight``. The layer-freezing rule of
"Transferable and principled efficiency for open-vocabulary segmentation" freezes the blocks whose alpha is
below a quantile of the blocks' alphas (small alpha = heavier tail = a better-trained layer, kept as is).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    """Power-law exponent of the ESD tail, p(lambda) ~ lambda^-alpha."""
    xmin: float
    """Smallest eigenvalue of the fitted tail."""
    num_tail: int
    """Eigenvalues in the tail (>= xmin)."""
    ks: float
    """Kolmogorov-Smirnov distance between the tail and the fitted power law."""
    sigma: float
    """Standard error of alpha, (alpha - 1) / sqrt(num_tail)."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def eigenvalues(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues of ``W^T W`` (squared singular values of ``W``, float64 SVD), ascending."""
    w = weight.detach().cpu().double().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight: expected a matrix, got shape {tuple(w.shape)}")
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    return np.sort(s**2)


def _alpha(tail_logs_sum: np.ndarray, n: np.ndarray, log_xmin: np.ndarray) -> np.ndarray:
    denom = tail_logs_sum - n * log_xmin
    with np.errstate(divide="ignore"):
        return np.where(denom > 0, 1.0 + n / np.where(denom > 0, denom, 1.0), np.inf)


def fit_power_law(
    evals: np.ndarray, xmin: float | None = None, min_tail: int = 10, tail_fraction: float = 0.0
) -> PowerLawFit:
    """Clauset et al. power-law fit of the largest eigenvalues (see the module docstring).

    ``xmin``: fix the cut (None = choose it by the KS distance); ``tail_fraction`` > 0: fix the tail to that
    fraction of the largest eigenvalues instead; ``min_tail``: the smallest tail the KS search considers."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > x.max() * 1e-12] if len(x) and x.max() > 0 else x[:0]  # exact zeros (rank deficiency)
    if len(x) < 2:
        raise ValueError(f"evals: need at least 2 positive eigenvalues, got {len(x)}")
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[i] = sum(logs[i:])
    n_all = len(x) - np.arange(len(x))
    if tail_fraction > 0:
        xmin = float(x[len(x) - max(2, math.ceil(tail_fraction * len(x)))])
    if xmin is not None:
        i = int(np.searchsorted(x, xmin, side="left"))
        if len(x) - i < 2:
            raise ValueError(f"xmin: {xmin} leaves fewer than 2 eigenvalues in the tail")
        candidates = np.array([i])
    else:
        last = max(1, len(x) - max(2, min_tail) + 1)
        candidates = np.arange(last)
        # ties: the first index of each distinct value
        candidates = candidates[np.r_[True, x[candidates[1:]] > x[candidates[1:] - 1]]]
    alphas = _alpha(suffix[candidates], n_all[candidates], logs[candidates])
    best, best_ks = int(candidates[0]), math.inf
    for i, a in zip(candidates, alphas):
        if not math.isfinite(a):
            continue
        tail = x[i:]
        m = len(tail)
        fitted = 1.0 - (tail / x[i]) ** (1.0 - a)
        upper = np.arange(1, m + 1) / m
        ks = float(max(np.max(upper - fitted), np.max(fitted - (upper - 1.0 / m))))
        if ks < best_ks:
            best, best_ks = int(i), ks
    alpha = float(_alpha(suffix[best], n_all[best], logs[best]))
    n = int(n_all[best])
    return PowerLawFit(
        alpha=alpha, xmin=float(x[best]), num_tail=n, ks=best_ks, sigma=(alpha - 1) / math.sqrt(n)
    )


# ------------------------------------------------------------------------------------------ blocks


def block_matrices(block: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices of an open_clip residual block (q, k, v split out of ``in_proj_weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in block.named_parameters():
        if p.ndim != 2 or not name.endswith("weight"):
            continue
        if name.endswith("in_proj_weight") and p.shape[0] % 3 == 0 and p.shape[0] == 3 * p.shape[1]:
            for part, w in zip("qkv", p.chunk(3, dim=0)):
                out[f"{name}.{part}"] = w
        else:
            out[name] = p
    return out


def _resblocks(module: nn.Module) -> list[nn.Module]:
    visual = getattr(module, "visual", module)
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise ValueError("model: expected an open_clip VisionTransformer (or a ViTBackbone around one)")
    return list(transformer.resblocks)


def _alpha_or_none(w: torch.Tensor, min_tail: int) -> float | None:
    try:
        return fit_power_law(eigenvalues(w), min_tail=min_tail).alpha
    except ValueError:  # a (nearly) all-zero matrix has no spectrum to fit
        return None


def layer_alphas(module: nn.Module, min_tail: int = 10) -> list[dict[str, Any]]:
    """Per block of a ViT (``ViTBackbone`` or open_clip ``VisionTransformer``): ``{"block": i, "alpha": mean,
    "matrices": {name: alpha}}`` (None for a matrix without a spectrum to fit, e.g. all zeros)."""
    rows = []
    for i, block in enumerate(_resblocks(module)):
        mats = {name: _alpha_or_none(w, min_tail) for name, w in block_matrices(block).items()}
        finite = [a for a in mats.values() if a is not None and math.isfinite(a)]
        rows.append({"block": i, "alpha": float(np.mean(finite)) if finite else None, "matrices": mats})
    return rows


def lowest_alpha_blocks(alphas: list[float | None], quantile: float) -> list[int]:
    """Indices of the ``floor(quantile * L)`` blocks with the smallest alpha (ties: the shallower block; None
    ranks last), i.e. the blocks below the ``quantile``-quantile of the ``L`` alphas; sorted."""
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile: must be in [0, 1], got {quantile}")
    k = math.floor(quantile * len(alphas) + 1e-9)
    order = sorted(range(len(alphas)), key=lambda i: (math.inf if alphas[i] is None else alphas[i], i))
    return sorted(order[:k])


__all__ = [
    "PowerLawFit",
    "block_matrices",
    "eigenvalues",
    "fit_power_law",
    "layer_alphas",
    "lowest_alpha_blocks",
]

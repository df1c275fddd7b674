"""Centered kernel alignment (CKA) between two representations of the same inputs, and per ViT layer.

    sim = linear_cka(x, y)                       # x: [n, p], y: [n, q] features of the same n inputs
    sim = rbf_cka(x, y, sigma_frac=0.8)          # Gaussian kernel, bandwidth = 0.8 x median distance
    per_layer = layer_cka(visual_a, visual_b, images)   # [L] linear CKA of block i of a with block i of b

Kornblith et al. (2019), "Similarity of neural network representations revisited". With centred Gram
matrices ``K = H X X^T H`` and ``L = H Y Y^T H`` (``H = I - 11^T / n``),
``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``HSIC(K, L) = tr(K L)``. For linear kernels this is
``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` (feature-space form, O(n p q): used here, so many
token samples are cheap). It is 1 for identical representations and invariant to orthogonal transforms and
isotropic scaling of either one, so a block compared with itself after a rotation still scores 1.

Per layer: the output tokens of each residual block of an open_clip ``VisionTransformer`` (patch tokens only,
the CLS token dropped), every (image, patch) pair one sample, so the comparison is of the dense features the
transfer stages use. Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _centred(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().double()
    if t.ndim != 2:
        raise ValueError(f"features: expected [samples, features], got shape {tuple(t.shape)}")
    return t - t.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of ``x`` [n, p] and ``y`` [n, q] (float64)."""
    xc, yc = _centred(x), _centred(y)
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"features: {xc.shape[0]} and {yc.shape[0]} samples; CKA needs the same inputs")
    cross = (yc.T @ xc).pow(2).sum()
    norm = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    return float(cross / norm) if norm > 0 else 0.0


def _rbf_gram(x: torch.Tensor, sigma_frac: float) -> torch.Tensor:
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0).fill_diagonal_(0)
    pairs = d2[torch.triu_indices(len(x), len(x), 1).unbind()]  # off-diagonal pairs only
    median = pairs.median() if len(pairs) and pairs.median() > 0 else torch.tensor(1.0, dtype=x.dtype)
    return torch.exp(-d2 / (2 * sigma_frac**2 * median))


def rbf_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, sigma_frac: float = 0.8) -> float:
    """CKA with Gaussian kernels of bandwidth ``sigma_frac`` x the median pairwise distance (Kornblith et al.);
    O(n^2) memory, so for up to a few thousand samples."""
    xc, yc = _centred(x), _centred(y)
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"features: {xc.shape[0]} and {yc.shape[0]} samples; CKA needs the same inputs")
    n = xc.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ _rbf_gram(xc, sigma_frac) @ h, h @ _rbf_gram(yc, sigma_frac) @ h
    norm = k.norm() * l_.norm()
    return float((k * l_).sum() / norm) if norm > 0 else 0.0


def expected_linear_cka_independent(n: int, p: int, q: int) -> float:
    """Linear CKA of two independent isotropic Gaussian feature sets (n samples, p and q features), to first
    order: with m = n - 1 degrees of freedom after centring, E||Y^T X||_F^2 = m p q and, for a Wishart
    matrix S = X^T X, E||S||_F^2 = m p (m + p + 1), so CKA ~ sqrt(p q / ((m + p + 1) (m + q + 1)))."""
    m = n - 1
    return float(np.sqrt(p * q / ((m + p + 1) * (m + q + 1))))


@torch.no_grad()
def block_tokens(
    visual: nn.Module, images: torch.Tensor, batch_size: int = 32, max_samples: int = 4096
) -> list[torch.Tensor]:
    """Per residual block of an open_clip ``VisionTransformer``: its output patch tokens for ``images`` as
    one [samples, width] float64 tensor (CLS and other prefix tokens dropped). With more than
    ``max_samples`` image x patch pairs, the same evenly spaced patches are kept in every image."""
    blocks = list(visual.transformer.resblocks)
    num_prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    current: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            current[i] = out

        return hook

    handles = [b.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    was_training = visual.training
    visual.eval()
    try:
        for start in range(0, len(images), batch_size):
            current.clear()
            visual(images[start : start + batch_size])
            for i in range(len(blocks)):
                x = current[i]
                if not getattr(visual.transformer, "batch_first", True):
                    x = x.transpose(0, 1)
                patches = x[:, num_prefix:]
                keep = max(1, max_samples // len(images))
                if patches.shape[1] > keep:
                    idx = torch.linspace(0, patches.shape[1] - 1, keep).round().long().to(patches.device)
                    patches = patches[:, idx]
                outputs[i].append(patches.reshape(-1, x.shape[-1]).double().cpu())
    finally:
        for h in handles:
            h.remove()
        visual.train(was_training)
    return [torch.cat(o) for o in outputs]


def layer_cka(
    visual_a: nn.Module, visual_b: nn.Module, images: torch.Tensor, max_samples: int = 4096
) -> list[float]:
    """Linear CKA of block ``i`` of ``visual_a`` with block ``i`` of ``visual_b`` on the same images, per block
    (the towers need the same depth and patch grid)."""
    a, b = (
        block_tokens(visual_a, images, max_samples=max_samples),
        block_tokens(visual_b, images, max_samples=max_samples),
    )
    if len(a) != len(b):
        raise ValueError(f"models: {len(a)} and {len(b)} blocks; per-layer CKA needs the same depth")
    return [linear_cka(x, y) for x, y in zip(a, b)]


__all__ = [
    "block_tokens",
    "expected_linear_cka_independent",
    "layer_cka",
    "linear_cka",
    "rbf_cka",
]

"""Average attention distance per head and layer of a ViT image tower (the paper's Figure 3 analysis).

For every layer and head: the attention-weighted mean distance, in pixels, between a query patch and the
patches it attends to, averaged over query patches and images. The CLS token is excluded as query and key
(its weights are dropped and the rest renormalised). Small distances mean local attention, large ones global.

    dist = average_attention_distance(model.visual, images)      # [layers, heads] numpy array, pixels
    plot_attention_distance({"ours": dist}, "attention.png")
    dist, maps = attention_statistics(visual, images)              # both in one pass; maps: [layers, N, N]
    plot_attention_maps({"teacher": maps_t, "FD student": maps_s}, "maps.png")   # FD-CLIP's Figure

Weights are recomputed from each block's own projections (so an FD-CLIP student's relative position bias is
included); the average attention map per layer (FD-CLIP) averages the renormalised patch-to-patch weights
over heads and images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _grid_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Pairwise distance in pixels between the centres of the ``grid`` patches: [N, N]."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() * patch_size
    return torch.cdist(pos, pos)


def distance_from_weights(
    attn: torch.Tensor, grid: tuple[int, int], patch_size: int, num_prefix: int = 1
) -> torch.Tensor:
    """Mean attention distance per head from attention weights ``attn`` [B, H, N, N] -> [H] (pixels).

    ``num_prefix`` leading tokens (CLS, registers) are dropped as queries and keys; the remaining weights
    of each query are renormalised to sum to one.
    """
    a = attn[:, :, num_prefix:, num_prefix:].double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    d = _grid_distances(grid, patch_size).to(a.device)
    if a.shape[-1] != d.shape[0]:
        raise ValueError(f"attention has {a.shape[-1]} patch tokens but the grid {grid} has {d.shape[0]}")
    per_query = (a * d).sum(-1)  # [B, H, N]
    return per_query.mean(dim=(0, 2))


def _attention_weights(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-head attention weights [B, H, N, N] of an open_clip ResidualAttentionBlock for its input ``x``
    [B, N, D], computed from the block's own projections (softmax(q k^T / sqrt(d) + bias)); the relative
    position bias of a :class:`pipeline.model.backbone.BiasedSelfAttention` (an FD-CLIP student) is added."""
    attn = block.attn
    if not getattr(attn, "batch_first", False):
        raise ValueError("expected a batch-first attention block")
    q_x = block.ln_1(x)
    b, n, c = q_x.shape
    heads = attn.num_heads
    qkv = torch.nn.functional.linear(q_x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, _ = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // heads)
    if hasattr(attn, "position_bias"):
        side = math.isqrt(n - 1)
        scores = scores + attn.position_bias()((side, side), with_cls=True).to(scores.dtype)
    return scores.softmax(-1)


@torch.no_grad()
def attention_statistics(
    visual: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``images`` through an open_clip ``VisionTransformer``: the mean attention distance
    [layers, heads] in pixels, and the average attention map per layer [layers, N, N] over the N patch
    tokens (prefix tokens dropped and each query's weights renormalised, then averaged over heads and images:
    a bright diagonal = local attention, vertical bars = every query attending to the same keys)."""
    blocks = list(visual.transformer.resblocks)
    patch = visual.conv1.kernel_size[0]
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    num_prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
    captured: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[i] = args[0]

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    sums = torch.zeros(len(blocks), blocks[0].attn.num_heads, dtype=torch.float64)
    n = grid[0] * grid[1]
    maps = torch.zeros(len(blocks), n, n, dtype=torch.float64)
    count = 0
    was_training = visual.training
    visual.eval()
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            captured.clear()
            visual(batch)
            for i, block in enumerate(blocks):
                x = captured[i]
                if not visual.transformer.batch_first:
                    x = x.transpose(0, 1)
                w = _attention_weights(block, x)
                sums[i] += distance_from_weights(w, grid, patch, num_prefix).cpu() * len(batch)
                a = w[:, :, num_prefix:, num_prefix:].double()
                a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
                maps[i] += a.sum(dim=(0, 1)).cpu() / a.shape[1]
            count += len(batch)
    finally:
        for h in handles:
            h.remove()
        visual.train(was_training)
    return (sums / max(count, 1)).numpy(), (maps / max(count, 1)).numpy()


@torch.no_grad()
def average_attention_distance(visual: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """[layers, heads] mean attention distance in pixels of an open_clip ``VisionTransformer``."""
    return attention_statistics(visual, images, batch_size)[0]


@torch.no_grad()
def average_attention_maps(visual: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """[layers, N, N] average attention map per layer over patch tokens (see :func:`attention_statistics`)."""
    return attention_statistics(visual, images, batch_size)[1]


def plot_attention_maps(results: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """A grid of small images: one row per model, one column per layer, each the [N, N] average attention
    map (query rows, key columns, patches in raster order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    layers = max(v.shape[0] for v in results.values())
    fig, axes = plt.subplots(
        len(names), layers, figsize=(1.3 * layers + 0.6, 1.3 * len(names) + 0.4), squeeze=False
    )
    for r, name in enumerate(names):
        for c in range(layers):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < results[name].shape[0]:
                ax.imshow(results[name][c], cmap="viridis", interpolation="nearest")
            if r == 0:
                ax.set_title(f"layer {c + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_attention_distance(
    results: dict[str, np.ndarray], path: str | Path, title: str = "", side_by_side: bool = False
) -> Path:
    """Scatter of every head's distance per layer (one colour per model), with per-layer means as lines; with
    ``side_by_side`` one panel per model on a shared y axis (e.g. a teacher beside its FD student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(results) if side_by_side else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(6 if panels == 1 else 3.2 * panels, 4), sharey=True, squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ((name, dist), colour) in enumerate(zip(results.items(), colours * (1 + len(results)))):
        ax = axes[0][k if side_by_side else 0]
        layers = np.arange(1, dist.shape[0] + 1)
        for h in range(dist.shape[1]):
            ax.scatter(layers, dist[:, h], s=10, color=colour, alpha=0.5)
        ax.plot(layers, dist.mean(1), color=colour, label=name)
        ax.set_xlabel("layer")
        if side_by_side:
            ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("mean attention distance (px)")
    if title:
        fig.suptitle(title, fontsize=10)
    if not side_by_side:
        axes[0][0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def uniform_distance(grid: tuple[int, int], patch_size: int) -> float:
    """Expected distance under uniform attention over the grid (a reference line for plots)."""
    return float(_grid_distances(grid, patch_size).mean())


__all__ = [
    "attention_statistics",
    "average_attention_distance",
    "average_attention_maps",
    "plot_attention_maps",
    "distance_from_weights",
    "plot_attention_distance",
    "uniform_distance",
]

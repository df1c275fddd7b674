"""Average attention distance per head and layer of a ViT image tower (the paper's Figure 3 analysis).

For every layer and head: the attention-weighted mean distance, in pixels, between a query patch and the
patches it attends to, averaged over query patches and images. The CLS token is excluded as query and key
(its weights are dropped and the rest renormalised). Small distances mean local attention, large ones global.

    dist = average_attention_distance(model.visual, images)      # [layers, heads] numpy array, pixels
    plot_attention_distance({"ours": dist}, "attention.png")
"""

from __future__ import annotations

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
    """Per-head attention weights of an open_clip ResidualAttentionBlock for its input ``x`` [B, N, D]."""
    attn: nn.MultiheadAttention = block.attn
    q_x = block.ln_1(x)
    if not attn.batch_first:
        raise ValueError("expected a batch-first attention block")
    _, w = attn(q_x, q_x, q_x, need_weights=True, average_attn_weights=False)
    return w  # [B, H, N, N]


@torch.no_grad()
def average_attention_distance(visual: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """[layers, heads] mean attention distance in pixels of an open_clip ``VisionTransformer``."""
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
            count += len(batch)
    finally:
        for h in handles:
            h.remove()
        visual.train(was_training)
    return (sums / max(count, 1)).numpy()


def plot_attention_distance(results: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Scatter of every head's distance per layer (one colour per model), with per-layer means as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, dist), colour in zip(results.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        layers = np.arange(1, dist.shape[0] + 1)
        for h in range(dist.shape[1]):
            ax.scatter(layers, dist[:, h], s=10, color=colour, alpha=0.5)
        ax.plot(layers, dist.mean(1), color=colour, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (px)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def uniform_distance(grid: tuple[int, int], patch_size: int) -> float:
    """Expected distance under uniform attention over the grid (a reference line for plots)."""
    return float(_grid_distances(grid, patch_size).mean())


__all__ = [
    "average_attention_distance",
    "distance_from_weights",
    "plot_attention_distance",
    "uniform_distance",
]

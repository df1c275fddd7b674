"""The exact large-batch CLIP contrastive loss: gathered features, tiled log-sum-exp, real + synthetic captions.

Every sample's negatives are the whole *global* batch (all ranks, and with :mod:`pipeline.train.gradcache`
all accumulation steps). The full-batch loss this module reproduces exactly is the symmetric InfoNCE of CLIP:

    logits = logit_scale * I @ T.T                      # N x N over the global batch (features L2-normalised)
    loss   = (CE(logits, arange(N)) + CE(logits.T, arange(N))) / 2        # ``naive_clip_loss``

**Tiled (Inf-CL, arXiv 2410.17243).** ``clip_loss`` never materialises the N x N matrix: it walks it in
``tile_size`` x ``tile_size`` tiles (one matmul each), keeping a running maximum and sum of exponentials per
row (image -> text) and per column (text -> image), and reading the positive logits off the same tile
products, so ``lse - positive`` cancels as exactly as in ``F.cross_entropy``. Its backward recomputes each tile
from the saved row/column log-sum-exps, so memory is O(N x D + tile^2) instead of O(N^2) (65,536^2 fp32 logits
alone are 17 GB).

**Distributed (local-loss formulation).** Rank r holds n local pairs at global offset r*n. It gathers the texts
of all ranks *with gradient* and computes only its own row block ``I_local @ T_all.T`` (n x N). The image ->
text log-sum-exps of its rows are complete locally; the text -> image (column) log-sum-exps are combined
across ranks with two all-reduces of N floats (max, then sum of exps). Rank r's loss is

    loss_r = W / (2N) * sum_{i local} (lse_row_i - z_ii + lse_col_i - z_ii),    z_ii = scale * I_i.T_i

so ``mean_r loss_r`` equals the full-batch loss, and because each backward adds its row block's share of every
column's gradient (the all-gather's backward sums them back to their owner rank), *averaging parameter
gradients over ranks* - what DDP and DeepSpeed do - gives exactly the gradient of the full-batch loss, for the
features and for ``logit_scale``. Each rank does one n x N matmul forward and three in backward (open_clip's
local loss does two and four).

**Uneven ranks (padding + mask).** When the global batch does not split evenly (65,536 over 24 ranks), rank r
holds ``counts[r]`` pairs and ``counts`` (the same list on every rank) is passed in. The all-gather needs
equal sizes, so each rank pads its features with zero rows to ``P = max(counts)``; a padded row or column
gets a logit of -1e30 (exp underflows to exactly 0, with no ``-inf - -inf`` NaN) in every log-sum-exp, its
own terms are left out of the sum, and the sum is divided by the true ``N = sum(counts)``, so loss and
gradient are exactly those of the N real pairs (the padded rows get zero gradient). Padding exists only
inside the loss: the towers never see a padded sample.

**Real and synthetic captions (DataCompDR).** ``contrastive_loss`` returns
``w_real * CLIP(image, text) + w_syn * CLIP(image, syn_text)``. Missing synthetic captions: the *caller*
(the trainer / loader) puts the sample's web caption in ``syn_text`` for samples that have no synthetic
caption, so every row keeps a positive and the batch stays rectangular across ranks; when the batch has no
``syn_text`` key at all only the real term is used. ``logit_scale`` is the multiplicative scale
(``exp`` of the model's learnable log-temperature; the model / trainer clamps it to 100 as CLIP does).

    cfg = LossConfig(tile_size=4096)
    loss, terms = contrastive_loss({"image": img, "text": txt, "syn_text": syn}, out["logit_scale"], cfg)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossConfig:
    tile_size: int = 4096
    """Rows / columns per tile of the similarity matrix (peak extra memory ~ 3 x tile^2 fp32 values)."""
    w_real: float = 1.0
    """Weight of CLIP(image, web caption)."""
    w_syn: float = 1.0
    """Weight of CLIP(image, synthetic caption); used when the batch carries ``syn_text`` features."""
    gather_with_grad: bool = True
    """All-gather features with gradient (exact). False drops the gradient reaching other ranks' features
    (cheaper backward, not the full-batch gradient; for comparisons only)."""
    impl: Literal["auto", "tiled", "naive"] = "auto"
    """``tiled``: Inf-CL tiles, memory linear in the batch. ``naive``: full logits (open_clip-style local
    loss when distributed). ``auto``: naive on one process when the batch fits in one tile, else tiled."""

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"tile_size: must be >= 1, got {self.tile_size}")
        if self.w_real < 0 or self.w_syn < 0:
            raise ValueError(f"w_real / w_syn: weights must be >= 0, got {self.w_real}, {self.w_syn}")
        if self.w_real == 0 and self.w_syn == 0:
            raise ValueError("w_real / w_syn: at least one loss weight must be > 0")
        if self.impl not in ("auto", "tiled", "naive"):
            raise ValueError(f"impl: must be auto, tiled or naive, got {self.impl!r}")


def world() -> tuple[int, int]:
    """(world_size, rank) of the default process group; (1, 0) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather (rank order along dim 0) whose backward sums each slice's gradient onto its owner rank.

    The backward is a reduce-scatter (``dist.reduce_scatter_single``: NCCL, and gloo in torch 2.14 as well),
    which moves 1/world of an all-reduce's data; :func:`gather_backward` holds both branches.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return gather_backward(grad)


GATHER_BACKWARD: Literal["reduce_scatter", "all_reduce"] = "reduce_scatter"
"""How :class:`_GatherWithGrad` sums gradients back: ``reduce_scatter`` (what NCCL runs on GPUs; torch 2.14's
gloo has it too, so CPU tests run the same branch) or ``all_reduce`` + slice (for backends without it)."""


def gather_backward(grad: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of every rank's ``grad`` (N x D), sliced to this rank's rows: the backward of the all-gather."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    grad = grad.contiguous()
    if GATHER_BACKWARD == "reduce_scatter":
        out = torch.empty_like(grad.chunk(world_size)[rank])
        dist.reduce_scatter_single(out, grad, group=group)
        return out
    dist.all_reduce(grad, group=group)
    return grad.chunk(world_size)[rank].clone()


def gather_features(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n x D, the same n on every rank) from all ranks in rank order, *with* gradient.

    The backward sums every rank's gradient for a slice back onto the rank that owns it (reduce-scatter on
    NCCL, all-reduce + slice on gloo). Identity when not distributed.
    """
    world_size, _ = world()
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_features_no_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_features` but only the local slice keeps its gradient (open_clip's default)."""
    world_size, rank = world()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def naive_clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor | float) -> Tensor:
    """The reference full-batch loss on one process: ``(CE(logits) + CE(logits.T)) / 2``, N x N logits."""
    logits = logit_scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


MASKED_LOGIT = -1e30
"""The logit of a padded row / column: finite (no ``-inf - -inf`` NaN), and its exp is exactly 0 in fp32."""


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended up to ``rows`` (differentiable; the padded rows get no gradient)."""
    return x if x.shape[0] == rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))


def _mask_bias(counts: list[int], rows: int, device: torch.device) -> Tensor:
    """(len(counts) * rows,) fp32: 0 for the first counts[r] rows of rank r's block, MASKED_LOGIT after."""
    index = torch.arange(rows, device=device)
    valid = torch.cat([index < c for c in counts])
    return torch.where(valid, 0.0, MASKED_LOGIT).to(torch.float32)


def _naive_local_loss(
    img: Tensor, txt: Tensor, logit_scale: Tensor, cfg: LossConfig, counts: list[int] | None = None
) -> Tensor:
    """open_clip's local loss (full n x N logits per direction), scaled like the tiled loss."""
    world_size, rank = world()
    n = img.shape[0]
    rows = max(counts) if counts else n
    gather = gather_features if cfg.gather_with_grad else gather_features_no_grad
    img_all, txt_all = gather(_pad_rows(img, rows)), gather(_pad_rows(txt, rows))
    total = sum(counts) if counts else img_all.shape[0]
    bias = _mask_bias(counts, rows, img.device) if counts else 0.0
    labels = torch.arange(n, device=img.device) + rank * rows
    loss_i = F.cross_entropy(logit_scale * img @ txt_all.T + bias, labels, reduction="sum")
    loss_t = F.cross_entropy(logit_scale * txt @ img_all.T + bias, labels, reduction="sum")
    return (loss_i + loss_t) * (world_size / (2 * total))


class _TiledCrossEntropy(torch.autograd.Function):
    """Per-row and per-column cross-entropy terms of ``scale * a @ b.T``, tile by tile (see the module docstring).

    a: n x D local rows, b: N x D all columns (rows offset..offset+n of the global matrix are ``a``'s; their
    positives sit on the global diagonal). Returns ``row_ce`` (n,): ``lse_j(z_ij) - z_ii`` over all N columns,
    and ``col_ce`` (n,): ``lse_i(z_ij) - z_jj`` for the columns offset..offset+n over all rows of *all ranks*;
    both fp32.

    Accuracy: each log-sum-exp is kept as a running maximum ``m`` and sum ``S = sum exp(z - m)`` (rescaled when
    the maximum grows, as flash attention does), and the term is returned as ``(m - z_ii) + log S`` with
    ``z_ii`` read off the same tile product that produced ``m``. When the positive is the largest logit (a
    small loss), ``m - z_ii`` is exactly 0 and ``log S`` is small and accurate: the same cancellation as
    ``F.cross_entropy``'s ``log_softmax``. Computing ``lse`` and the positive separately would leave an error
    of ``u * |lse|`` on a loss that can be 100x smaller than ``lse``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, a: Tensor, b: Tensor, scale: Tensor, offset: int, tile: int, col_bias: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        n, total = a.shape[0], b.shape[0]
        s = scale.detach().to(torch.float32)
        # Padded rows / columns (uneven ranks): each log-sum-exp leaves out the padded entries along it.
        # Rows use the column mask, columns the row mask (the local rows are columns offset..offset+n).
        row_bias = None if col_bias is None else col_bias[offset : offset + n]
        f32 = {"dtype": torch.float32, "device": a.device}
        row_max, row_sum = torch.empty((n,), **f32), torch.empty((n,), **f32)
        col_max, col_sum = torch.full((total,), -math.inf, **f32), torch.zeros((total,), **f32)
        positives = torch.empty((n,), **f32)
        for i0 in range(0, n, tile):
            a_t = a[i0 : i0 + tile]
            tile_max, tile_sum = [], []
            for j0 in range(0, total, tile):
                z = (a_t @ b[j0 : j0 + tile].T).to(torch.float32).mul_(s)
                d, start, length = _diagonal(offset + i0 - j0, *z.shape)
                if length:  # the positives come from the same products as the maxima
                    positives[i0 + start : i0 + start + length] = torch.diagonal(z, d)
                z_row = z if col_bias is None else z + col_bias[None, j0 : j0 + tile]
                z_col = z if row_bias is None else z + row_bias[i0 : i0 + tile, None]
                m = z_row.amax(dim=1)
                tile_max.append(m)
                tile_sum.append(torch.exp(z_row - m[:, None]).sum(dim=1))
                _merge(col_max[j0 : j0 + tile], col_sum[j0 : j0 + tile], *_max_and_sum(z_col, dim=0))
            maxima, sums = torch.stack(tile_max, dim=1), torch.stack(tile_sum, dim=1)
            m = maxima.amax(dim=1)
            row_max[i0 : i0 + tile] = m
            row_sum[i0 : i0 + tile] = (sums * torch.exp(maxima - m[:, None])).sum(dim=1)
        world_size, _ = world()
        if world_size > 1:  # combine the column sums of every rank's row block
            global_max = col_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
            col_sum.mul_(torch.exp(col_max - global_max))
            dist.all_reduce(col_sum, op=dist.ReduceOp.SUM)
            col_max = global_max
        local = slice(offset, offset + n)
        row_ce = (row_max - positives) + torch.log(row_sum)
        col_ce = (col_max[local] - positives) + torch.log(col_sum[local])
        row_lse, col_lse = row_max + torch.log(row_sum), col_max + torch.log(col_sum)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse, col_bias)
        ctx.offset, ctx.tile = offset, tile
        return row_ce, col_ce

    @staticmethod
    def backward(ctx, g_row: Tensor, g_col_local: Tensor):  # type: ignore[override]
        a, b, scale, row_lse, col_lse, col_bias = ctx.saved_tensors
        tile, offset = ctx.tile, ctx.offset
        n, total = a.shape[0], b.shape[0]
        row_bias = None if col_bias is None else col_bias[offset : offset + n]
        s = scale.detach().to(torch.float32)
        g_row, g_col_local = g_row.to(torch.float32), g_col_local.to(torch.float32)
        world_size, _ = world()
        if (
            world_size > 1
        ):  # every rank's row block touches every column: it needs all columns' upstream grads
            parts = [torch.empty_like(g_col_local) for _ in range(world_size)]
            dist.all_gather(parts, g_col_local.contiguous())
            g_col = torch.cat(parts)
        else:
            g_col = g_col_local
        g_pos = -(g_row + g_col_local)  # both terms subtract the positive z_ii
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device) if need_a else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        grad_s = torch.zeros((), dtype=torch.float32, device=a.device)
        for i0 in range(0, n, tile):
            a_t = a[i0 : i0 + tile]
            r_lse, r_g = row_lse[i0 : i0 + tile, None], g_row[i0 : i0 + tile, None]
            for j0 in range(0, total, tile):
                b_t = b[j0 : j0 + tile]
                z = (a_t @ b_t.T).to(torch.float32).mul_(s)
                # d(sum g_row*row_ce + sum g_col*col_ce)/d z = softmax_row*g_row + softmax_col*g_col + g_pos on
                # the diagonal
                z_row = z if col_bias is None else z + col_bias[None, j0 : j0 + tile]
                if row_bias is not None:
                    z = z.add_(row_bias[i0 : i0 + tile, None])
                p = torch.sub(z_row, r_lse).exp_().mul_(r_g)
                p.add_(z.sub_(col_lse[None, j0 : j0 + tile]).exp_().mul_(g_col[None, j0 : j0 + tile]))
                d, start, length = _diagonal(offset + i0 - j0, *p.shape)
                if length:
                    torch.diagonal(p, d).add_(g_pos[i0 + start : i0 + start + length])
                p = p.to(a.dtype)
                pb = p @ b_t  # (tile, D); dz/ds = a_t @ b_t.T so sum(p * a_t @ b_t.T) = sum(a_t * pb)
                if need_a:
                    grad_a[i0 : i0 + tile] += pb
                if need_b:
                    grad_b[j0 : j0 + tile] += p.T @ a_t
                if need_s:
                    grad_s += (a_t.to(torch.float32) * pb).sum()
        if need_a:
            grad_a = grad_a.mul_(s).to(a.dtype)
        if need_b:
            grad_b = grad_b.mul_(s).to(b.dtype)
        grad_s = grad_s.to(scale.dtype).reshape(scale.shape) if need_s else None
        return grad_a, grad_b, grad_s, None, None, None


def _max_and_sum(z: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(max, sum of exp(z - max)) along ``dim``."""
    m = z.amax(dim=dim, keepdim=True)
    return m.squeeze(dim), torch.exp(z - m).sum(dim=dim)


def _merge(run_max: Tensor, run_sum: Tensor, new_max: Tensor, new_sum: Tensor) -> None:
    """Fold (new_max, new_sum) into the running (max, sum of exp(z - max)), in place."""
    m = torch.maximum(run_max, new_max)
    run_sum.mul_(torch.exp(run_max - m)).add_(new_sum * torch.exp(new_max - m))
    run_max.copy_(m)


def _diagonal(d: int, rows: int, cols: int) -> tuple[int, int, int]:
    """Where the global diagonal crosses a ``rows x cols`` tile whose entry (i, i + d) lies on it.

    Returns (d, first row, number of entries): ``torch.diagonal(tile, d)`` holds them, for rows
    ``first .. first + number``; the number is 0 when the tile misses the diagonal.
    """
    start = max(0, -d)
    return d, start, max(0, min(rows, cols - d) - start)


def tiled_cross_entropy(
    a: Tensor, b: Tensor, logit_scale: Tensor, offset: int, tile_size: int, col_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(row_ce, col_ce) of ``logit_scale * a @ b.T``; see :class:`_TiledCrossEntropy`.

    ``col_bias`` (N,): 0 for real columns, :data:`MASKED_LOGIT` for padded ones (the rows ``a`` are columns
    ``offset .. offset + n`` and share their mask); the terms of padded rows are then meaningless: drop them.
    """
    return _TiledCrossEntropy.apply(a, b, logit_scale, offset, tile_size, col_bias)


def clip_loss(
    img_local: Tensor,
    txt_local: Tensor,
    logit_scale: Tensor | float,
    cfg: LossConfig,
    counts: list[int] | None = None,
) -> Tensor:
    """This rank's share of the full-batch CLIP loss (see the module docstring for the exact contract).

    On one process it *is* the full-batch loss; with W ranks, ``mean_r loss_r`` is the full-batch loss and
    averaging parameter gradients over ranks gives its exact gradient (``logit_scale`` included).
    ``counts``: pairs on each rank when they differ (the same list on every rank; ``None``: all equal).
    """
    if img_local.shape != txt_local.shape:
        raise ValueError(
            f"image / text features differ in shape: {tuple(img_local.shape)} vs {tuple(txt_local.shape)}"
        )
    world_size, rank = world()
    if counts is not None:
        counts = [int(c) for c in counts]
        if len(counts) != world_size or counts[rank] != img_local.shape[0] or min(counts) < 1:
            raise ValueError(
                f"counts: {counts} must hold one count >= 1 per rank ({world_size}) and this rank's "
                f"{img_local.shape[0]} pairs at index {rank}"
            )
        if len(set(counts)) == 1:
            counts = None  # even: no padding
    # The loss runs in fp32 outside autocast (its cost is small next to the towers'; logits at scale 100 in
    # bf16 would lose ~0.4 nats); gradients flow back to the features in their own dtype.
    with torch.autocast(device_type=img_local.device.type, enabled=False):
        # a 0-dim scale (open_clip models may keep it as a 1-element parameter)
        scale = torch.as_tensor(logit_scale, device=img_local.device).to(torch.float32).reshape(())
        return _clip_loss_fp32(img_local.to(torch.float32), txt_local.to(torch.float32), scale, cfg, counts)


def _clip_loss_fp32(
    img_local: Tensor, txt_local: Tensor, scale: Tensor, cfg: LossConfig, counts: list[int] | None
) -> Tensor:
    world_size, rank = world()
    n = img_local.shape[0]
    if cfg.impl == "naive" or (cfg.impl == "auto" and world_size == 1 and n <= cfg.tile_size):
        if world_size == 1:
            return naive_clip_loss(img_local, txt_local, scale)
        return _naive_local_loss(img_local, txt_local, scale, cfg, counts)
    rows = max(counts) if counts else n
    gather = gather_features if cfg.gather_with_grad else gather_features_no_grad
    txt_all = gather(_pad_rows(txt_local, rows))
    total = sum(counts) if counts else txt_all.shape[0]
    col_bias = _mask_bias(counts, rows, img_local.device) if counts else None
    row_ce, col_ce = tiled_cross_entropy(
        _pad_rows(img_local, rows), txt_all, scale, rank * rows, cfg.tile_size, col_bias
    )
    return (row_ce[:n].sum() + col_ce[:n].sum()) * (world_size / (2 * total))


def contrastive_loss(
    features: dict[str, Tensor],
    logit_scale: Tensor | float,
    cfg: LossConfig,
    counts: list[int] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``w_real * CLIP(image, text) + w_syn * CLIP(image, syn_text)`` and its terms (detached, for logging).

    ``features``: ``image`` and ``text`` (n x D, normalised), optionally ``syn_text`` (n x D: one synthetic
    caption per sample, the web caption where a sample has none). Terms: ``loss_real``, ``loss_syn``.
    With several ranks each value is this rank's share: average them over ranks to log the full-batch loss.
    ``counts``: the number of pairs on each rank when ranks hold different numbers (see the module docstring).
    """
    for key in ("image", "text"):
        if key not in features:
            raise ValueError(f"features: missing {key!r} (got {sorted(features)})")
    terms: dict[str, Tensor] = {}
    total: Tensor | None = None
    parts = [("loss_real", "text", cfg.w_real), ("loss_syn", "syn_text", cfg.w_syn)]
    for name, key, weight in parts:
        if weight == 0 or key not in features:
            continue
        term = clip_loss(features["image"], features[key], logit_scale, cfg, counts)
        terms[name] = term.detach()
        total = weight * term if total is None else total + weight * term
    if total is None:
        raise ValueError("w_real: is 0 and the batch has no syn_text features, so there is no loss term")
    return total, terms

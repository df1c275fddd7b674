"""Evaluators of the fine-tuning stages, each the standard formula of its benchmark.

- :func:`topk_accuracy` (ImageNet top-1 / top-5) and :func:`mean_class_topk_accuracy` (the DenseVLM /
  CLIPSelf region-classification protocol: per-class top-k accuracy averaged over the classes present).
- :class:`ConfusionMatrix`: semantic segmentation aAcc / mIoU / mAcc as mmsegmentation computes them (one
  confusion matrix over the whole split; classes absent from both prediction and ground truth are left out
  of the means; ``ignore_index`` pixels are skipped), in percent.
- :class:`DepthMetrics`: NYUv2 depth metrics as BTS / AdaBins / GLPDepth compute them (valid pixels inside
  ``[min_depth, max_depth]`` and the Eigen crop, predictions clipped to the range, per-image metrics averaged
  over images): delta < 1.25^k, AbsRel, SqRel, RMSE, RMSE(log), log10, SILog.
- :func:`coco_evaluate`: COCO box / mask mAP with pycocotools' ``COCOeval`` on in-memory ground truth.

Distributed evaluation: each rank evaluates a shard of the split and reduces before computing: confusion
matrices (:meth:`ConfusionMatrix.all_reduce`) and depth sums (:meth:`DepthMetrics.all_reduce`) are summed
with ``all_reduce``; logits are gathered (:func:`all_gather_objects`); COCO results are gathered to rank 0
(:func:`gather_objects_to_main`) for pycocotools and the metrics broadcast (:func:`broadcast_from_main`).
Each helper is the identity without an initialised process group of more than one rank.

Run the sanity tests with ``.venv/bin/pytest tests/test_metrics.py``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (through the GPU under NCCL) and return it."""
    if not _distributed():
        return tensor
    if dist.get_backend() == "nccl":
        on_device = tensor.cuda()
        dist.all_reduce(on_device)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` on one process)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if not _distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction (percent) of rows whose target is among the top-k logits, for each k (clipped to #classes)."""
    num_classes = logits.shape[1]
    out = {}
    for k in ks:
        top = logits.topk(min(k, num_classes), dim=1).indices
        out[k] = 100.0 * (top == targets[:, None]).any(dim=1).float().mean().item()
    return out


def mean_class_topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracy per ground-truth class, averaged over the classes that occur (percent)."""
    num_classes = logits.shape[1]
    out = {}
    classes = targets.unique()
    for k in ks:
        top = logits.topk(min(k, num_classes), dim=1).indices
        hit = (top == targets[:, None]).any(dim=1).float()
        per_class = [hit[targets == c].mean().item() for c in classes]
        out[k] = 100.0 * float(np.mean(per_class)) if per_class else float("nan")
    return out


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes matrix (rows = ground truth, columns = prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: integer label maps of the same shape (any batch layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        idx = target[keep] * self.num_classes + pred[keep].clamp(0, self.num_classes - 1)
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over the ranks (every rank then holds the split's matrix)."""
        all_reduce_sum_(self.matrix)
        return self

    def compute(self) -> dict[str, Any]:
        """``aAcc``, ``mIoU``, ``mAcc`` (percent) and per-class ``IoU`` / ``Acc`` lists (NaN = class absent)."""
        m = self.matrix.double()
        tp = m.diag()
        gt = m.sum(1)
        pred = m.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "aAcc": 100.0 * (tp.sum() / total).item() if total > 0 else float("nan"),
            "mIoU": 100.0 * float(np.nanmean(iou.numpy())) if (union > 0).any() else float("nan"),
            "mAcc": 100.0 * float(np.nanmean(acc.numpy())) if (gt > 0).any() else float("nan"),
            "IoU": [100.0 * v for v in iou.tolist()],
            "Acc": [100.0 * v for v in acc.tolist()],
        }


def eigen_crop_mask(height: int, width: int) -> np.ndarray:
    """The Eigen et al. NYUv2 evaluation crop (rows 45:471, cols 41:601 of 480 x 640), scaled to H x W."""
    mask = np.zeros((height, width), dtype=bool)
    y0, y1 = round(45 / 480 * height), round(471 / 480 * height)
    x0, x1 = round(41 / 640 * width), round(601 / 640 * width)
    mask[y0:y1, x0:x1] = True
    return mask


class DepthMetrics:
    """NYUv2 depth metrics, averaged over images."""

    NAMES = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eval_crop: str = "eigen") -> None:
        if eval_crop not in ("eigen", "none"):
            raise ValueError(f"eval_crop: expected 'eigen' or 'none', got {eval_crop!r}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.eval_crop = eval_crop
        self.sums = dict.fromkeys(self.NAMES, 0.0)
        self.count = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """``pred``, ``target``: B x H x W (or B x 1 x H x W) depths in metres; target <= 0 = no measurement."""
        pred = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred, dtype=np.float64)
        target = np.asarray(
            target.detach().cpu() if isinstance(target, torch.Tensor) else target, dtype=np.float64
        )
        if pred.ndim == 4:
            pred, target = pred[:, 0], target[:, 0]
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
        crop = eigen_crop_mask(*target.shape[1:]) if self.eval_crop == "eigen" else None
        for p, t in zip(pred, target):
            valid = (t > self.min_depth) & (t < self.max_depth)
            if crop is not None:
                valid &= crop
            if not valid.any():
                continue
            p = np.clip(p[valid], self.min_depth, self.max_depth)
            t = t[valid]
            for name, value in self.per_image(p, t).items():
                self.sums[name] += value
            self.count += 1

    @staticmethod
    def per_image(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
        ratio = np.maximum(t / p, p / t)
        err_log = np.log(p) - np.log(t)
        return {
            "d1": float((ratio < 1.25).mean()),
            "d2": float((ratio < 1.25**2).mean()),
            "d3": float((ratio < 1.25**3).mean()),
            "abs_rel": float(np.mean(np.abs(t - p) / t)),
            "sq_rel": float(np.mean((t - p) ** 2 / t)),
            "rmse": float(np.sqrt(np.mean((t - p) ** 2))),
            "rmse_log": float(np.sqrt(np.mean(err_log**2))),
            "log10": float(np.mean(np.abs(np.log10(p) - np.log10(t)))),
            "silog": float(np.sqrt(max(0.0, np.mean(err_log**2) - np.mean(err_log) ** 2)) * 100),
        }

    def all_reduce(self) -> DepthMetrics:
        """Sum the per-image sums and the image count over the ranks (float64)."""
        totals = torch.tensor([self.sums[n] for n in self.NAMES] + [self.count], dtype=torch.float64)
        all_reduce_sum_(totals)
        self.sums = {n: float(v) for n, v in zip(self.NAMES, totals[:-1].tolist())}
        self.count = int(round(float(totals[-1])))
        return self

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {name: float("nan") for name in self.NAMES}
        return {name: total / self.count for name, total in self.sums.items()}


COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary H x W mask as COCO RLE with ``counts`` as str (JSON-serialisable)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_evaluate(
    gt: dict[str, Any], detections: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox", "segm")
) -> dict[str, float]:
    """COCO mAP with pycocotools. ``gt`` is a COCO instances dict (images, annotations, categories);
    ``detections`` the standard result list (image_id, category_id, score, bbox [x, y, w, h] and/or
    segmentation RLE). Returns ``{"bbox_AP": ..., "bbox_AP50": ..., "segm_AP": ...}`` in [0, 1]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"info": {}, "licenses": [], **gt}
        coco_gt.createIndex()
        for iou_type in iou_types:
            if iou_type == "segm":  # as detectron2 does: the mask decides area and IoU, not the box
                dets = [
                    {k: v for k, v in d.items() if k != "bbox"} for d in detections if "segmentation" in d
                ]
            else:
                dets = [d for d in detections if "bbox" in d]
            if not dets:
                out.update({f"{iou_type}_{n}": 0.0 for n in COCO_STAT_NAMES})
                continue
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            # COCOeval reports -1 where a size range has no ground truth; keep it as NaN.
            for name, value in zip(COCO_STAT_NAMES, ev.stats[:6]):
                out[f"{iou_type}_{name}"] = float(value) if value >= 0 else float("nan")
    return out

"""Object detection + instance segmentation: torchvision Mask R-CNN on a ViTDet simple feature pyramid.

    summary = run_stage(DetectionConfig(), "runs/det")       # synthetic world, debug model
    python -m jobs.finetune --stage detection --preset coco_vitdet --data.root=/data/coco

The pyramid is built from the ViT's *last* map only (ViTDet, Li et al. 2022): strides 4, 8, 16, 32 px by
transposed convs / max-pooling, plus a max-pooled level for the RPN (:class:`SimpleFeaturePyramid`).
The encoder attends as ViTDet's does (``backbone.window_size`` = 14, ``backbone.global_blocks`` = four evenly
spaced blocks ending with the last, i.e. 2, 5, 8, 11 of ViT-B): most blocks attend within non-overlapping 14 x
14-patch windows, the global blocks across the whole image, with a relative position bias in every block
(the checkpoint's, interpolated, or a new zero-initialised one per block) and the absolute position embedding
interpolated to ``backbone.image_size`` (1024 px in the ``coco_vitdet`` preset); the class token is dropped.
A window never exceeds the patch grid, so at the debug size (64 px, an 8 x 8 grid) the window covers the
image; ``backbone.window_size = 0`` restores global attention everywhere (see ``pipeline.model.backbone``).
Any open_clip tower loads unchanged. Box and mask mAP come from pycocotools' ``COCOeval`` on the validation
split (ground truth built from the same samples, masks as RLE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from pipeline.finetune.common import (
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    ScheduleConfig,
    StageSpec,
    fit,
    seed_everything,
)
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.metrics import broadcast_from_main, coco_evaluate, gather_objects_to_main, mask_to_rle
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone
from pipeline.model.heads import SimpleFeaturePyramid, pyramid_scales


@dataclass(frozen=True)
class DetHeadConfig:
    fpn_channels: int = 32
    """Channels of the simple feature pyramid (ViTDet: 256)."""
    box_head_dim: int = 64
    """Width of the two-layer box head (ViTDet: 1024)."""
    mask_head_channels: int = 32
    """Width of the four-conv mask head (ViTDet: 256)."""
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    """Anchor side in pixels at each of the five levels (strides 4 .. 64); 1024 px COCO: 32 .. 512."""
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Anchor aspect ratios."""
    rpn_batch_size_per_image: int = 64
    """Anchors sampled per image for the RPN loss (torchvision default 256)."""
    box_batch_size_per_image: int = 64
    """RoIs sampled per image for the box / mask losses (default 512)."""
    detections_per_img: int = 20
    """Detections kept per image (COCO: 100)."""
    score_thresh: float = 0.0
    """Drop detections scoring below this before evaluation."""

    def __post_init__(self) -> None:
        if len(self.anchor_sizes) != 5:
            raise ValueError(
                f"anchor_sizes: need one size per pyramid level (5), got {len(self.anchor_sizes)}"
            )


@dataclass(frozen=True)
class DetectionConfig:
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(drop_path_rate=0.1, window_size=14)
    )
    """Image encoder (only the last block's map is used); ViTDet's windowed attention by default."""
    head: DetHeadConfig = field(default_factory=DetHeadConfig)
    """Pyramid, RPN and RoI heads."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples (synthetic world by default; ``source = "coco"`` for COCO json + images)."""
    optim: FinetuneOptimConfig = field(
        default_factory=lambda: FinetuneOptimConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.7)
    )
    """AdamW and layer-wise lr decay."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="step", warmup_steps=5))
    """Learning-rate schedule (ViTDet: step decay x0.1 at 89% and 96% of training)."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Steps, batch size, logging, checkpoints, seed."""


class ViTDetBackbone(nn.Module):
    """ViT + simple feature pyramid with torchvision's backbone protocol (``out_channels``, dict of maps)."""

    def __init__(self, vit: ViTBackbone, out_channels: int) -> None:
        super().__init__()
        self.vit = vit
        self.pyramid = SimpleFeaturePyramid(vit.width, out_channels, pyramid_scales(vit.patch_size))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pyramid(self.vit.forward_features(x)[-1])


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive / negative sampler, drawing image ``k``'s sample from its own generator
    seeded by ``seeds[k]`` (the sample's augmentation seed) when :attr:`seeds` is set: an image's RPN / RoI
    sample then does not depend on which other images share its batch or process, so data-parallel training
    on any number of processes draws what one process would."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, stream: int) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.stream = stream
        self.seeds: list[int] | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.seeds is None:
            return super().__call__(matched_idxs)
        if len(self.seeds) != len(matched_idxs):
            raise ValueError(f"SeededSampler: {len(self.seeds)} seeds for {len(matched_idxs)} images")
        pos_idx, neg_idx = [], []
        for matched, seed in zip(matched_idxs, self.seeds):
            gen = torch.Generator().manual_seed((2 * int(seed) + self.stream) % 2**63)
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            perm1 = torch.randperm(positive.numel(), generator=gen)[:num_pos].to(positive.device)
            perm2 = torch.randperm(negative.numel(), generator=gen)[:num_neg].to(negative.device)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


def _seeded_samplers(model: MaskRCNN) -> list[SeededSampler]:
    return [
        s for s in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler) if isinstance(s, SeededSampler)
    ]


def build_mask_rcnn(vit: ViTBackbone, head: DetHeadConfig, num_classes: int, image_size: int) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` thing classes (+ background) on square ``image_size`` inputs that are
    already normalised (the detector's own transform neither resizes nor renormalises them)."""
    backbone = ViTDetBackbone(vit, head.fpn_channels)
    c = head.fpn_channels
    anchors = AnchorGenerator(tuple((s,) for s in head.anchor_sizes), (tuple(head.aspect_ratios),) * 5)
    levels = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        rpn_batch_size_per_image=head.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(c * 7 * 7, head.box_head_dim),
        box_predictor=FastRCNNPredictor(head.box_head_dim, num_classes + 1),
        box_batch_size_per_image=head.box_batch_size_per_image,
        box_detections_per_img=head.detections_per_img,
        box_score_thresh=head.score_thresh,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(c, [head.mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(head.mask_head_channels, head.mask_head_channels, num_classes + 1),
    )
    rpn_sampler, roi_sampler = model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler
    model.rpn.fg_bg_sampler = SeededSampler(
        rpn_sampler.batch_size_per_image, rpn_sampler.positive_fraction, 0
    )
    model.roi_heads.fg_bg_sampler = SeededSampler(
        roi_sampler.batch_size_per_image, roi_sampler.positive_fraction, 1
    )
    return model


def _targets(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": b.float(), "labels": lab + 1, "masks": m.to(torch.uint8)}
        for b, lab, m in zip(batch["boxes"], batch["labels"], batch["masks"])
    ]


def detection_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    samplers = _seeded_samplers(model)
    for sampler in samplers:
        sampler.seeds = batch.get("seed")
    try:
        losses = model(list(batch["image"]), _targets(batch))
    finally:
        for sampler in samplers:
            sampler.seeds = None
    return sum(losses.values()), {k: round(v.item(), 6) for k, v in losses.items()}


def evaluate_detection(
    model: nn.Module, batches: Iterable[dict[str, Any]], class_names: list[str]
) -> dict[str, Any]:
    """COCO box and mask mAP of ``model`` on ``batches`` (ground truth built from the batches). Under a
    process group each rank passes its shard: images, annotations and detections are gathered to rank 0 in
    rank order (annotation ids renumbered as one process would), evaluated there, and broadcast."""
    images, annotations, detections = [], [], []
    for batch in batches:
        outputs = model(list(batch["image"]))
        for k, out in enumerate(outputs):
            image_id = int(batch["index"][k]) + 1
            h, w = batch["image"].shape[-2:]
            images.append({"id": image_id, "height": int(h), "width": int(w)})
            for box, label, mask in zip(batch["boxes"][k], batch["labels"][k], batch["masks"][k]):
                x0, y0, x1, y1 = (float(v) for v in box)
                m = mask.cpu().numpy().astype(bool)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(label) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(m.sum()),
                        "iscrowd": 0,
                        "segmentation": mask_to_rle(m),
                    }
                )
            masks = (out["masks"][:, 0] > 0.5).cpu().numpy()
            for box, label, score, mask in zip(
                out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(), masks
            ):
                x0, y0, x1, y1 = box
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "score": float(score),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": mask_to_rle(np.asarray(mask)),
                    }
                )
    gathered = gather_objects_to_main((images, annotations, detections))
    metrics = None
    if gathered is not None:
        images = [x for g in gathered for x in g[0]]
        annotations = [{**a, "id": i + 1} for i, a in enumerate(a for g in gathered for a in g[1])]
        detections = [d for g in gathered for d in g[2]]
        gt = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
        }
        metrics = coco_evaluate(gt, detections)
    return broadcast_from_main(metrics)


def run_stage(cfg: DetectionConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Fine-tune Mask R-CNN; returns (and writes) summary.json with ``bbox_AP`` / ``segm_AP`` (0-1)."""
    train_set, val_set = build_datasets(cfg.data, "detection")
    classes = train_set.vocab.things
    seed_everything(cfg.train.seed)
    vit = build_backbone(dataclasses.replace(cfg.backbone, out_indices=(-1,)))
    model = build_mask_rcnn(vit, cfg.head, len(classes), cfg.data.image_size)
    spec = StageSpec(
        name="detection",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=detection_loss,
        evaluate=lambda m, b: evaluate_detection(m, b, classes),
        primary_metric="bbox_AP",
        info={"classes": classes, "backbone_checkpoint": cfg.backbone.checkpoint},
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = DetectionConfig

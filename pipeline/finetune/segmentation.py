"""Semantic segmentation: UperNet or Semantic FPN on multi-level ViT features; mIoU / mAcc / aAcc.

    summary = run_stage(SegmentationConfig(), "runs/seg")        # synthetic world, debug model
    python -m jobs.finetune --stage segmentation --preset ade20k_upernet --data.root=/data/ade

Four block outputs of the image encoder (``backbone.out_indices``) go through BEiT's multi-scale neck
(strides p/4 .. 2p) into the decoder; logits are upsampled to the input and trained with per-pixel
cross-entropy (``ignore_index`` 255). Evaluation accumulates one confusion matrix over the split
(:class:`pipeline.finetune.metrics.ConfusionMatrix`, mmseg's definitions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.finetune.common import (
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    ScheduleConfig,
    StageSpec,
    fit,
    seed_everything,
)
from pipeline.finetune.datasets import IGNORE_INDEX, DataConfig, build_datasets, collate, upsample_logits
from pipeline.finetune.metrics import ConfusionMatrix
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone
from pipeline.model.heads import SemanticFPNHead, UperNetHead, ViTMultiScaleNeck, pyramid_scales


@dataclass(frozen=True)
class SegHeadConfig:
    kind: Literal["upernet", "semfpn"] = "upernet"
    """Decoder: UperNet (PPM + FPN fusion) or Semantic FPN (FPN + upsample-and-sum)."""
    channels: int = 32
    """Decoder width (512 for UperNet / 256 for Semantic FPN at ViT-B scale)."""
    dropout: float = 0.1
    """Dropout before the classifier."""

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels: must be >= 1, got {self.channels}")


@dataclass(frozen=True)
class SegmentationConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(drop_path_rate=0.1))
    """Image encoder (architecture, checkpoint, drop-path rate, feature blocks)."""
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    """Decoder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples (synthetic world by default; ``source = "ade20k"`` for ADE20K folders)."""
    optim: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(lr=1e-3, layer_decay=0.65))
    """AdamW and layer-wise lr decay."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="poly", warmup_steps=5))
    """Learning-rate schedule."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Steps, batch size, logging, checkpoints, seed."""


class SegmentationModel(nn.Module):
    def __init__(self, backbone: ViTBackbone, head: SegHeadConfig, num_classes: int) -> None:
        super().__init__()
        if len(backbone.out_indices) != 4:
            raise ValueError("backbone.out_indices: segmentation needs four feature blocks")
        self.backbone = backbone
        self.neck = ViTMultiScaleNeck(backbone.width, pyramid_scales(backbone.patch_size))
        if head.kind == "upernet":
            self.decoder: nn.Module = UperNetHead(
                [backbone.width] * 4, head.channels, num_classes, dropout=head.dropout
            )
        else:  # the neck's levels are 2x apart, as strides 4, 8, 16, 32 are
            self.decoder = SemanticFPNHead(
                [backbone.width] * 4, head.channels, num_classes, dropout=head.dropout
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.neck(self.backbone.forward_features(images)))
        return upsample_logits(logits, images.shape[-2:])


def seg_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch["image"])
    return F.cross_entropy(logits, batch["semantic"], ignore_index=IGNORE_INDEX), {}


def evaluate_segmentation(
    model: nn.Module, batches: Iterable[dict[str, Any]], num_classes: int
) -> dict[str, Any]:
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX)
    for batch in batches:
        cm.update(model(batch["image"]).argmax(1), batch["semantic"])
    return cm.all_reduce().compute()


def run_stage(cfg: SegmentationConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Fine-tune for semantic segmentation; returns (and writes) summary.json."""
    train_set, val_set = build_datasets(cfg.data, "segmentation")
    classes = train_set.vocab.semantic
    seed_everything(cfg.train.seed)
    model = SegmentationModel(build_backbone(cfg.backbone), cfg.head, len(classes))
    spec = StageSpec(
        name="segmentation",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=seg_loss,
        evaluate=lambda m, b: evaluate_segmentation(m, b, len(classes)),
        primary_metric="mIoU",
        info={"head": cfg.head.kind, "classes": classes, "backbone_checkpoint": cfg.backbone.checkpoint},
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = SegmentationConfig

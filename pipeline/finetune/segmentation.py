"""Semantic segmentation: UperNet or Semantic FPN on multi-level ViT features; mIoU / mAcc / aAcc.

    summary = run_stage(SegmentationConfig(), "runs/seg")        # synthetic world, debug model
    python -m jobs.finetune --stage segmentation --preset ade20k_upernet --data.root=/data/ade

Four block outputs of the image encoder (``backbone.out_indices``) go through BEiT's multi-scale neck
(strides p/4 .. 2p) into the decoder; logits are upsampled to the input and trained with per-pixel
cross-entropy (``ignore_index`` 255). Evaluation accumulates one confusion matrix over the split
(:class:`pipeline.finetune.metrics.ConfusionMatrix`, mmseg's definitions).

Optional text- / vision-guided distillation (``kd.kind = "tgkd" | "vgkd"``, OpenTrans;
:mod:`pipeline.finetune.distill_losses`): the regions of a training image are its semantic classes (the
``kd.max_regions`` largest with at least ``kd.min_region_pixels`` pixels, mask = the class's pixels).
V = the encoder's dense CLIP-space features (``ln_post`` + projection on every token, from the same forward
pass as the decoder's features) averaged over each mask; R = the frozen CLIP image tower on each region's
crop with the background blanked (cached per image, ``kd.cache``); T = the frozen CLIP text tower's
embedding of the class name (prompt-ensembled once at build time). The CLIP is ``kd.teacher_checkpoint``
(default ``backbone.checkpoint``; it must hold the text tower too). Loss = cross-entropy + ``kd.weight`` x KD.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.synthworld import zero_shot_prompts
from pipeline.finetune.common import (
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    ScheduleConfig,
    StageSpec,
    fit,
    seed_everything,
)
from pipeline.finetune.datasets import IGNORE_INDEX, DataConfig, build_datasets, collate, upsample_logits
from pipeline.finetune.distill_losses import KDConfig, TeacherCache, kd_loss
from pipeline.finetune.metrics import ConfusionMatrix
from pipeline.finetune.text import build_tokenizer, class_text_embeddings
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone, build_clip_model
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
class SegKDConfig(KDConfig):
    teacher_checkpoint: str = ""
    """The whole CLIP whose image tower is the teacher (R) and whose text tower embeds the class names (T);
    "" = ``backbone.checkpoint`` (then a whole-CLIP checkpoint, not an image tower alone)."""
    max_regions: int = 8
    """Per image, at most this many semantic classes (the largest) are distillation regions."""
    min_region_pixels: int = 16
    """Classes with fewer pixels in an image are not regions."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_regions < 1:
            raise ValueError(f"max_regions: must be >= 1, got {self.max_regions}")


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
    kd: SegKDConfig = field(default_factory=SegKDConfig)
    """Text- / vision-guided distillation towards a frozen CLIP (off by default)."""


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
        self.kd = SegKDConfig()  # off until attach_kd

    def attach_kd(self, cfg: SegKDConfig, teacher: ViTBackbone, class_text: torch.Tensor) -> None:
        """Add the frozen teacher image tower and the class-name text embeddings (one row per class)."""
        self.kd = cfg
        self.teacher = teacher.requires_grad_(False).eval()
        self.register_buffer("kd_text", class_text)
        self.cache = TeacherCache(self.teacher, cfg.cache, cfg.cache_dir)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()
        return self

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return upsample_logits(self.decoder(self.neck(features)), size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.backbone.forward_features(images), images.shape[-2:])


def semantic_regions(semantic: torch.Tensor, max_regions: int, min_pixels: int) -> dict[str, torch.Tensor]:
    """Per image, its ``max_regions`` largest semantic classes with ``>= min_pixels`` pixels (largest first,
    ties by class id): image index, class (``labels``), mask and the mask's bounding box (pixels)."""
    rows: dict[str, list[Any]] = {"image": [], "labels": [], "masks": [], "boxes": []}
    for i, sem in enumerate(semantic):
        classes, counts = torch.unique(sem[sem != IGNORE_INDEX], return_counts=True)
        order = sorted(zip(counts.tolist(), classes.tolist()), key=lambda t: (-t[0], t[1]))
        for _, c in [t for t in order if t[0] >= min_pixels][:max_regions]:
            mask = sem == c
            ys, xs = torch.nonzero(mask, as_tuple=True)
            rows["image"].append(i)
            rows["labels"].append(c)
            rows["masks"].append(mask.float())
            rows["boxes"].append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    device = semantic.device
    if not rows["image"]:
        h, w = semantic.shape[-2:]
        return {
            "image": torch.zeros(0, dtype=torch.long, device=device),
            "labels": torch.zeros(0, dtype=torch.long, device=device),
            "masks": torch.zeros(0, h, w, device=device),
            "boxes": torch.zeros(0, 4, device=device),
        }
    return {
        "image": torch.tensor(rows["image"], device=device),
        "labels": torch.tensor(rows["labels"], device=device),
        "masks": torch.stack(rows["masks"]),
        "boxes": torch.stack(rows["boxes"]),
    }


def mask_pool(dense: torch.Tensor, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """N x D: each region's mask-weighted mean of its image's dense features (masks area-resized to the grid)."""
    w = F.interpolate(masks[:, None].to(dense.dtype), size=dense.shape[-2:], mode="area")
    return (dense[image] * w).sum((2, 3)) / w.sum((2, 3)).clamp(min=1e-6)


def seg_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    kd = model.kd
    if kd.kind == "none":
        logits = model(batch["image"])
        return F.cross_entropy(logits, batch["semantic"], ignore_index=IGNORE_INDEX), {}
    images = batch["image"]
    out = model.backbone.forward_all(images)
    ce = F.cross_entropy(
        model.decode(out["features"], images.shape[-2:]), batch["semantic"], ignore_index=IGNORE_INDEX
    )
    regions = semantic_regions(batch["semantic"], kd.max_regions, kd.min_region_pixels)
    if len(regions["image"]) == 0:
        return ce + out["dense"].sum() * 0.0, {"ce_loss": round(ce.item(), 6)}
    student = mask_pool(out["dense"], regions["image"], regions["masks"])
    kind = torch.ones_like(regions["labels"])  # mask regions: blank the background of the teacher's crop
    teacher = model.cache.embed(
        images, batch.get("index"), regions["image"], regions["boxes"], regions["masks"], kind
    )
    distill = kd_loss(kd.kind, student, teacher, model.kd_text[regions["labels"]], regions["image"])
    report = {
        "ce_loss": round(ce.item(), 6),
        "kd_loss": round(distill.item(), 6),
        "kd_regions": len(regions["image"]),
    }
    return ce + kd.weight * distill, report


def build_segmentation_model(cfg: SegmentationConfig, classes: list[str]) -> SegmentationModel:
    """The encoder + neck + decoder, and with ``kd.kind`` the frozen CLIP teacher and class-name embeddings."""
    model = SegmentationModel(build_backbone(cfg.backbone), cfg.head, len(classes))
    if cfg.kd.kind != "none":
        clip_cfg = BackboneConfig(
            model=cfg.backbone.model, checkpoint=cfg.kd.teacher_checkpoint or cfg.backbone.checkpoint
        )
        try:
            clip = build_clip_model(clip_cfg)
        except ValueError as e:  # name the field that chose the checkpoint
            raise ValueError(f"kd.teacher_{e}" if str(e).startswith("checkpoint:") else f"kd: {e}") from None
        text = class_text_embeddings(
            clip, build_tokenizer(clip_cfg.model, clip), classes, zero_shot_prompts()
        )
        model.attach_kd(
            cfg.kd, build_backbone(BackboneConfig(model=clip_cfg.model), visual=clip.visual), text
        )
    return model


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
    model = build_segmentation_model(cfg, classes)
    spec = StageSpec(
        name="segmentation",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=seg_loss,
        evaluate=lambda m, b: evaluate_segmentation(m, b, len(classes)),
        primary_metric="mIoU",
        info={
            "head": cfg.head.kind,
            "classes": classes,
            "backbone_checkpoint": cfg.backbone.checkpoint,
            "kd": cfg.kd.kind,
        },
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = SegmentationConfig

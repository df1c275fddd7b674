"""Image classification: full fine-tuning (label smoothing, mixup / cutmix, EMA) or a linear probe; top-1 / top-5.

    summary = run_stage(ClassificationConfig(), "runs/cls")                       # synthetic world, debug model
    python -m jobs.finetune --stage classification --preset linear_probe --backbone.checkpoint=ckpt.pt
    python -m jobs.finetune --stage classification --preset imagenet_finetune --data.root=/data/imagenet

The CLIP projection is replaced by a linear layer on the pooled token (``ln_post`` of the class token).
``mode = "linear_probe"`` freezes the whole encoder (run in eval mode under ``no_grad``) and trains only that
layer, behind a non-affine BatchNorm as in MAE's probe; ``mode = "finetune"`` trains everything with
layer-wise lr decay and drop-path. Mixup / CutMix follow timm's ``Mixup`` (one lambda per batch from
Beta(alpha, alpha), the batch mixed with its reverse, CutMix lambda corrected to the pasted area; CutMix
is chosen with ``switch_prob`` when both are on) with smoothed soft targets. With ``ema_decay > 0`` an EMA
of the weights is evaluated too (``ema_top1`` ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
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
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.metrics import all_gather_objects, topk_accuracy
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone
from pipeline.model.heads import LinearHead


@dataclass(frozen=True)
class ClassifierConfig:
    mode: Literal["finetune", "linear_probe"] = "finetune"
    """Train everything, or only a linear layer on the frozen encoder."""
    label_smoothing: float = 0.1
    """Label smoothing of the (soft) targets."""
    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha); 0 disables mixup."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha); 0 disables CutMix."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when mixup or CutMix is on)."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of mixup when both are on."""
    ema_decay: float = 0.0
    """Decay of an EMA of the weights evaluated beside them (0 = no EMA)."""
    probe_norm: bool = True
    """Linear probe: a non-affine BatchNorm before the linear layer (MAE)."""

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha / cutmix_alpha: must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class ClassificationConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(drop_path_rate=0.1))
    """Image encoder."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """Fine-tune vs linear probe, label smoothing, mixup / CutMix, EMA."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples (synthetic world by default; ``source = "imagefolder"`` for ImageNet-style folders)."""
    optim: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(lr=1e-3, layer_decay=0.65))
    """AdamW and layer-wise lr decay."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine", warmup_steps=5))
    """Learning-rate schedule."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Steps, batch size, logging, checkpoints, seed."""


class ClassificationModel(nn.Module):
    def __init__(self, backbone: ViTBackbone, num_classes: int, linear_probe: bool, probe_norm: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.frozen = linear_probe
        if linear_probe:
            backbone.requires_grad_(False)
        self.head = LinearHead(backbone.width, num_classes, norm=linear_probe and probe_norm)

    def train(self, mode: bool = True) -> ClassificationModel:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.backbone.forward_pooled(images, project=False)
        else:
            features = self.backbone.forward_pooled(images, project=False)
        return self.head(features)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off
    )


def mix_batch(
    images: torch.Tensor, targets: torch.Tensor, cfg: ClassifierConfig
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """timm-style batch mixup / CutMix with the reversed batch; returns images, targets and the lambda used."""
    use_mixup, use_cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or torch.rand(()).item() >= cfg.mix_prob:
        return images, targets, 1.0
    cutmix = use_cutmix and (not use_mixup or torch.rand(()).item() < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if cutmix else cfg.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = images.flip(0)
    if cutmix:
        h, w = images.shape[-2:]
        cut = np.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + flipped * (1 - lam)
    return images, targets * lam + targets.flip(0) * (1 - lam), float(lam)


def run_stage(cfg: ClassificationConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Fine-tune (or linear-probe) for image classification; returns (and writes) summary.json."""
    train_set, val_set = build_datasets(cfg.data, "classification")
    classes = train_set.vocab.classes
    ccfg = cfg.classifier
    probe = ccfg.mode == "linear_probe"
    seed_everything(cfg.train.seed)
    backbone_cfg = cfg.backbone
    model = ClassificationModel(build_backbone(backbone_cfg), len(classes), probe, ccfg.probe_norm)

    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        targets = soft_targets(batch["label"], len(classes), ccfg.label_smoothing)
        images, targets, lam = mix_batch(batch["image"], targets, ccfg)
        loss = torch.sum(-targets * F.log_softmax(m(images), dim=-1), dim=-1).mean()
        return loss, {"mix_lambda": lam} if lam < 1 else {}

    def evaluate(m: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        logits, labels = [], []
        for batch in batches:
            logits.append(m(batch["image"]).float())
            labels.append(batch["label"])
        parts = [p for rank in all_gather_objects((logits, labels)) for p in zip(*rank)]  # in rank order
        acc = topk_accuracy(
            torch.cat([lg.cpu() for lg, _ in parts]), torch.cat([lb.cpu() for _, lb in parts]), (1, 5)
        )
        return {"top1": acc[1], "top5": acc[5]}

    spec = StageSpec(
        name="classification",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=loss_fn,
        evaluate=evaluate,
        primary_metric="top1",
        ema_decay=ccfg.ema_decay,
        info={"mode": ccfg.mode, "classes": classes, "backbone_checkpoint": backbone_cfg.checkpoint},
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = ClassificationConfig

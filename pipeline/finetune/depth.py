"""Monocular depth: a light transposed-conv head on the last ViT map; NYUv2 metrics (RMSE, AbsRel, delta<1.25).

    summary = run_stage(DepthConfig(), "runs/depth")        # synthetic world, debug model
    python -m jobs.finetune --stage depth --preset nyuv2 --data.root=/data/nyu

The head (:class:`pipeline.model.heads.SimpleDepthHead`) upsamples the last block's map with transposed
convs and predicts ``sigmoid * max_depth``; training minimises the scale-invariant log loss (SILog,
variance focus 0.85) over pixels with a valid depth in ``[min_depth, max_depth]``. Evaluation follows the
NYUv2 conventions (:class:`pipeline.finetune.metrics.DepthMetrics`): the same depth range, predictions
clipped to it, the Eigen crop (scaled to the input size), metrics per image averaged over images. For the
synthetic world ``max_depth = 0`` takes the world's far limit (sky / horizon pixels are excluded).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
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
from pipeline.finetune.metrics import DepthMetrics
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone
from pipeline.model.heads import SimpleDepthHead, silog_loss


@dataclass(frozen=True)
class DepthHeadConfig:
    channels: int = 32
    """Width of the transposed-conv layers."""
    num_deconv: int = 3
    """Number of 2x transposed-conv upsamplings."""
    min_depth: float = 1e-3
    """Smallest valid depth, metres (NYUv2: 1e-3)."""
    max_depth: float = 0.0
    """Largest valid depth and the head's output range, metres (NYUv2: 10); 0 = the data source's."""
    eval_crop: Literal["eigen", "none"] = "eigen"
    """Evaluation crop: Eigen et al.'s NYUv2 crop (scaled to the input) or the whole image."""
    variance_focus: float = 0.85
    """lambda of the SILog loss."""

    def __post_init__(self) -> None:
        if self.min_depth <= 0 or (self.max_depth and self.max_depth <= self.min_depth):
            raise ValueError("min_depth / max_depth: need 0 < min_depth < max_depth")


@dataclass(frozen=True)
class DepthConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(drop_path_rate=0.1))
    """Image encoder."""
    head: DepthHeadConfig = field(default_factory=DepthHeadConfig)
    """Depth head, loss and evaluation conventions."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples (synthetic world by default; ``source = "nyuv2"`` for NYUv2 folders)."""
    optim: FinetuneOptimConfig = field(
        default_factory=lambda: FinetuneOptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    )
    """AdamW and layer-wise lr decay."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="linear", warmup_steps=5))
    """Learning-rate schedule."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Steps, batch size, logging, checkpoints, seed."""


class DepthModel(nn.Module):
    def __init__(self, backbone: ViTBackbone, head: DepthHeadConfig, max_depth: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = SimpleDepthHead(backbone.width, head.channels, head.num_deconv, max_depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(images)[-1], images.shape[-2:])


def run_stage(cfg: DepthConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Fine-tune for depth estimation; returns (and writes) summary.json."""
    train_set, val_set = build_datasets(cfg.data, "depth")
    max_depth = cfg.head.max_depth or train_set.vocab.max_depth
    min_depth = cfg.head.min_depth
    seed_everything(cfg.train.seed)
    model = DepthModel(build_backbone(cfg.backbone), cfg.head, max_depth)

    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        target = batch["depth"]
        valid = (target > min_depth) & (target < max_depth)
        return silog_loss(m(batch["image"]), target, valid, cfg.head.variance_focus), {}

    def evaluate(m: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        metrics = DepthMetrics(min_depth, max_depth, cfg.head.eval_crop)
        for batch in batches:
            metrics.update(m(batch["image"]), batch["depth"])
        return metrics.all_reduce().compute()

    spec = StageSpec(
        name="depth",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=loss_fn,
        evaluate=evaluate,
        primary_metric="rmse",
        higher_is_better=False,
        info={
            "min_depth": min_depth,
            "max_depth": max_depth,
            "eval_crop": cfg.head.eval_crop,
            "backbone_checkpoint": cfg.backbone.checkpoint,
        },
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = DepthConfig

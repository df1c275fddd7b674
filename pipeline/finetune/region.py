"""Region-language alignment (DenseVLM / CLIPSelf family): dense features that classify regions by text.

    summary = run_stage(RegionConfig(), "runs/region")        # synthetic world, debug CLIP
    python -m jobs.finetune --stage region --preset coco_panoptic --data.root=/data/coco --backbone.checkpoint=...

The student is the image encoder's dense output in the CLIP space (``ln_post`` + projection on every patch
token). For each region of a training image - the box of each thing, the mask of each thing, the mask of
each stuff class - its student feature is pooled (RoIAlign + mean for boxes, mask-weighted mean for masks)
and trained towards:

* the frozen teacher's embedding of that region (the pretrained CLIP image tower run on the region's crop,
  background blanked for masks): ``1 - cos`` (CLIPSelf's self-distillation);
* the text embedding of the region's category, by cross-entropy over the category text embeddings of its own
  group - things against thing names, stuff against stuff names (DenseVLM's decoupled alignment).

Region denoising: the teacher classifies every region among its group's names; regions whose teacher
confidence is below ``confidence_threshold`` (default 0.3) are dropped from every loss; a confidence equal to
the threshold is kept (``confidence >= threshold``, compared in fp32). As in DenseVLM the category is the
teacher's retrieved one (``use_ground_truth_labels = false``); with labelled data it can be the annotation
instead (then the confidence is the teacher's probability of the annotated category).

Optional text- / vision-guided distillation (``kd.kind = "tgkd" | "vgkd"``, :mod:`pipeline.finetune.distill_losses`):
over the kept regions of each image, V = the student's region features, R = the teacher's crop embeddings,
T = the text embedding of each region's category (the same category the alignment loss uses). The teacher's
crop embeddings are cached per image (``kd.cache``, ``kd.cache_dir``; :class:`TeacherCache`) whatever the kind.

Evaluation (the DenseVLM / CLIPSelf tables): top-1 / top-5 mean (per-class) accuracy of classifying the
ground-truth boxes among the thing names, and thing masks and stuff masks among all names (things + stuff),
by cosine similarity of the pooled student features with the text embeddings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from pipeline.data.synthworld import zero_shot_prompts
from pipeline.finetune.common import (
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    ScheduleConfig,
    StageSpec,
    fit,
    seed_everything,
)
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.distill_losses import KDConfig, TeacherCache, kd_loss
from pipeline.finetune.metrics import all_gather_objects, mean_class_topk_accuracy
from pipeline.finetune.text import build_tokenizer, class_text_embeddings
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone, build_clip_model

BOX, THING_MASK, STUFF_MASK = 0, 1, 2


@dataclass(frozen=True)
class RegionLossConfig:
    confidence_threshold: float = 0.3
    """Drop regions whose teacher confidence is below this (region denoising; 0 keeps all)."""
    use_ground_truth_labels: bool = False
    """Align to the annotated category instead of the teacher's retrieved one."""
    distill_weight: float = 1.0
    """Weight of the region self-distillation loss (1 - cos to the teacher's crop embedding)."""
    align_weight: float = 1.0
    """Weight of the region-text cross-entropy."""
    logit_scale: float = 0.0
    """Inverse temperature of region-text logits; 0 = the CLIP checkpoint's learned logit scale."""
    teacher_checkpoint: str = ""
    """Weights of the frozen teacher; "" = backbone.checkpoint (the student's starting point)."""
    min_region_pixels: int = 16
    """Masks smaller than this (after resizing) are not regions."""
    max_regions_per_kind: int = 6
    """Per image and region kind (boxes, thing masks, stuff masks), at most this many training regions."""
    roi_size: int = 3
    """RoIAlign output side for pooling student box features."""

    def __post_init__(self) -> None:
        if not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold: must be in [0, 1], got {self.confidence_threshold}")
        if self.logit_scale < 0:
            raise ValueError(f"logit_scale: must be >= 0, got {self.logit_scale}")


@dataclass(frozen=True)
class RegionConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """Whole CLIP (image + text towers): the student starts from it, the text tower encodes category names."""
    region: RegionLossConfig = field(default_factory=RegionLossConfig)
    """Losses, teacher and region denoising."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples (synthetic world by default; ``source = "coco"`` reads COCO panoptic)."""
    optim: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(lr=1e-4, weight_decay=0.1))
    """AdamW (CLIPSelf: lr 1e-5 at batch 32 x 8, wd 0.1)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine", warmup_steps=5))
    """Learning-rate schedule."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Steps, batch size, logging, checkpoints, seed."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Text- / vision-guided distillation over the kept regions, and the teacher-embedding cache."""


class RegionModel(nn.Module):
    """Student encoder, frozen teacher encoder, fixed category text embeddings."""

    def __init__(
        self,
        student: ViTBackbone,
        teacher: ViTBackbone,
        thing_text: torch.Tensor,
        stuff_text: torch.Tensor,
        logit_scale: float,
        cfg: RegionLossConfig,
        kd: KDConfig | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False)
        self.register_buffer("thing_text", thing_text)
        self.register_buffer("stuff_text", stuff_text)
        self.logit_scale = logit_scale
        self.cfg = cfg
        self.kd = kd or KDConfig()
        self.cache = TeacherCache(self.teacher, self.kd.cache, self.kd.cache_dir)

    def train(self, mode: bool = True) -> RegionModel:
        super().train(mode)
        self.teacher.eval()
        return self

    def pool(self, dense: torch.Tensor, regions: dict[str, torch.Tensor]) -> torch.Tensor:
        """Student region features (N x D): RoIAlign-mean for boxes, mask-weighted mean for masks."""
        idx, boxes, masks, kind = regions["image"], regions["boxes"], regions["masks"], regions["kind"]
        out = dense.new_zeros(len(idx), dense.shape[1])
        is_box = kind == BOX
        if is_box.any():
            rois = torch.cat([idx[is_box, None].to(dense.dtype), boxes[is_box]], 1)
            pooled = roi_align(
                dense,
                rois,
                self.cfg.roi_size,
                spatial_scale=dense.shape[-1] / masks.shape[-1],
                sampling_ratio=2,
                aligned=True,
            )
            out[is_box] = pooled.mean((2, 3)).to(out.dtype)
        if (~is_box).any():
            w = F.interpolate(masks[~is_box, None].to(dense.dtype), size=dense.shape[-2:], mode="area")
            feats = (dense[idx[~is_box]] * w).sum((2, 3)) / w.sum((2, 3)).clamp(min=1e-6)
            out[~is_box] = feats.to(out.dtype)
        return out

    @torch.no_grad()
    def teacher_embed(
        self, images: torch.Tensor, regions: dict[str, torch.Tensor], indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher embeddings of region crops (mask regions with their background blanked to the mean),
        through the per-image cache (``indices``: the batch images' dataset indices, part of the key)."""
        return self.cache.embed(
            images, indices, regions["image"], regions["boxes"], regions["masks"], regions["kind"]
        )

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ text.T


def gather_regions(batch: dict[str, Any], min_pixels: int, max_per_kind: int = 0) -> dict[str, torch.Tensor]:
    """All regions of a batch as flat tensors: image index, kind, box (pixels), mask, label (within its group)."""
    device = batch["image"].device
    h, w = batch["image"].shape[-2:]
    rows: dict[str, list[Any]] = {"image": [], "kind": [], "boxes": [], "masks": [], "labels": []}

    def add(i: int, kind: int, box: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> None:
        rows["image"].append(i)
        rows["kind"].append(kind)
        rows["boxes"].append(box.float())
        rows["masks"].append(mask.float())
        rows["labels"].append(int(label))

    for i in range(len(batch["image"])):
        things = list(zip(batch["boxes"][i], batch["masks"][i], batch["labels"][i]))
        stuff = list(zip(batch["stuff_masks"][i], batch["stuff_labels"][i]))
        cap = max_per_kind or None
        things = [t for t in things if t[1].sum() >= min_pixels]
        for box, mask, label in things[:cap]:
            add(i, BOX, box, mask, label)
        for box, mask, label in things[:cap]:
            add(i, THING_MASK, box, mask, label)
        for mask, label in [s for s in stuff if s[0].sum() >= min_pixels][:cap]:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            add(i, STUFF_MASK, box, mask, label)
    if not rows["image"]:
        return {
            "image": torch.zeros(0, dtype=torch.long, device=device),
            "kind": torch.zeros(0, dtype=torch.long, device=device),
            "boxes": torch.zeros(0, 4, device=device),
            "masks": torch.zeros(0, h, w, device=device),
            "labels": torch.zeros(0, dtype=torch.long, device=device),
        }
    return {
        "image": torch.tensor(rows["image"], device=device),
        "kind": torch.tensor(rows["kind"], device=device),
        "boxes": torch.stack(rows["boxes"]),
        "masks": torch.stack(rows["masks"]),
        "labels": torch.tensor(rows["labels"], device=device),
    }


def kept_by_confidence(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Region denoising's rule: keep a region when its teacher confidence is ``>= threshold`` (a confidence
    equal to the threshold is kept; the comparison is in the confidence's dtype, fp32)."""
    return confidence >= threshold


@dataclass
class RegionTerms:
    """Everything :func:`region_loss` computes, per region (rows follow ``regions``)."""

    regions: dict[str, torch.Tensor]
    student: torch.Tensor
    """N x D pooled student features."""
    teacher: torch.Tensor
    """N x D teacher crop embeddings."""
    confidence: torch.Tensor
    """N teacher confidences (of the retrieved or the annotated category, within the region's group)."""
    target: torch.Tensor
    """N categories within the region's group (things or stuff)."""
    kept: torch.Tensor
    """N bools: the regions that reach the losses."""
    losses: dict[str, torch.Tensor]
    """``align``, ``distill`` and (with ``kd.kind``) ``kd``, unweighted; empty when no region is kept."""


def region_terms(model: RegionModel, batch: dict[str, Any]) -> tuple[torch.Tensor, RegionTerms | None]:
    """The student's dense map and the per-region terms of a training batch (None without regions)."""
    cfg = model.cfg
    regions = gather_regions(batch, cfg.min_region_pixels, cfg.max_regions_per_kind)
    dense = model.student.forward_dense(batch["image"])
    if len(regions["image"]) == 0:
        return dense, None
    student = model.pool(dense, regions)
    teacher = model.teacher_embed(batch["image"], regions, batch.get("index"))
    is_stuff = regions["kind"] == STUFF_MASK
    n = len(regions["image"])
    confidence = teacher.new_zeros(n, dtype=torch.float32)
    target = torch.zeros(n, dtype=torch.long, device=teacher.device)
    text_of = model.thing_text.new_zeros(n, model.thing_text.shape[1])
    ce_terms = []
    for group, text in ((~is_stuff, model.thing_text), (is_stuff, model.stuff_text)):
        if not group.any():
            continue
        probs = model.logits(teacher[group], text).float().softmax(-1)
        if cfg.use_ground_truth_labels:
            tgt = regions["labels"][group]
            conf = probs.gather(1, tgt[:, None])[:, 0]
        else:
            conf, tgt = probs.max(-1)
        confidence[group], target[group], text_of[group] = conf, tgt, text[tgt]
        keep = kept_by_confidence(conf, cfg.confidence_threshold)
        if keep.any():
            ce_terms.append(F.cross_entropy(model.logits(student[group][keep], text), tgt[keep]))
    kept = kept_by_confidence(confidence, cfg.confidence_threshold)
    losses: dict[str, torch.Tensor] = {}
    if ce_terms:
        losses["align"] = torch.stack(ce_terms).mean()
        losses["distill"] = (1 - F.cosine_similarity(student[kept], teacher[kept], dim=-1)).mean()
        if model.kd.kind != "none":
            losses["kd"] = kd_loss(
                model.kd.kind, student[kept], teacher[kept], text_of[kept], regions["image"][kept]
            )
    return dense, RegionTerms(regions, student, teacher, confidence, target, kept, losses)


def region_loss(model: RegionModel, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = model.cfg
    dense, terms = region_terms(model, batch)
    if terms is None:
        return dense.sum() * 0.0, {"regions": 0}
    total = len(terms.kept)
    if not terms.losses:
        return dense.sum() * 0.0, {"regions": total, "kept_fraction": 0.0}
    align, dist = terms.losses["align"], terms.losses["distill"]
    loss = cfg.align_weight * align + cfg.distill_weight * dist
    report = {
        "regions": total,
        "kept_fraction": round(int(terms.kept.sum()) / total, 4),
        "align_loss": round(align.item(), 6),
        "distill_loss": round(dist.item(), 6),
    }
    if "kd" in terms.losses:
        loss = loss + model.kd.weight * terms.losses["kd"]
        report["kd_loss"] = round(terms.losses["kd"].item(), 6)
    return loss, report


def evaluate_regions(model: RegionModel, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Top-1 / top-5 mean accuracy for boxes (thing names), thing masks and stuff masks (all names)."""
    num_things = model.thing_text.shape[0]
    all_text = torch.cat([model.thing_text, model.stuff_text])
    logits: dict[int, list[torch.Tensor]] = {BOX: [], THING_MASK: [], STUFF_MASK: []}
    targets: dict[int, list[torch.Tensor]] = {BOX: [], THING_MASK: [], STUFF_MASK: []}
    for batch in batches:
        regions = gather_regions(batch, min_pixels=1)
        if len(regions["image"]) == 0:
            continue
        feats = model.pool(model.student.forward_dense(batch["image"]), regions).float()
        for kind in (BOX, THING_MASK, STUFF_MASK):
            sel = regions["kind"] == kind
            if not sel.any():
                continue
            text = model.thing_text if kind == BOX else all_text
            logits[kind].append(F.normalize(feats[sel], dim=-1) @ text.float().T)
            targets[kind].append(regions["labels"][sel] + (num_things if kind == STUFF_MASK else 0))
    gathered = all_gather_objects(  # every rank's region logits, in rank order
        (
            {k: [t.cpu() for t in v] for k, v in logits.items()},
            {k: [t.cpu() for t in v] for k, v in targets.items()},
        )
    )
    logits = {k: [t for g in gathered for t in g[0][k]] for k in logits}
    targets = {k: [t for g in gathered for t in g[1][k]] for k in targets}
    out: dict[str, Any] = {}
    for kind, name in ((BOX, "box"), (THING_MASK, "thing_mask"), (STUFF_MASK, "stuff_mask")):
        if logits[kind]:
            acc = mean_class_topk_accuracy(torch.cat(logits[kind]), torch.cat(targets[kind]), (1, 5))
            out[f"{name}_top1"], out[f"{name}_top5"] = acc[1], acc[5]
        else:
            out[f"{name}_top1"] = out[f"{name}_top5"] = float("nan")
    top1 = [
        out[f"{n}_top1"] for n in ("box", "thing_mask", "stuff_mask") if out[f"{n}_top1"] == out[f"{n}_top1"]
    ]
    out["mean_top1"] = float(np.mean(top1)) if top1 else float("nan")
    return out


def build_region_model(cfg: RegionConfig, thing_names: list[str], stuff_names: list[str]) -> RegionModel:
    clip = build_clip_model(cfg.backbone)
    tokenizer = build_tokenizer(cfg.backbone.model, clip)
    templates = zero_shot_prompts()
    thing_text = class_text_embeddings(clip, tokenizer, thing_names, templates)
    stuff_text = class_text_embeddings(clip, tokenizer, stuff_names, templates)
    logit_scale = cfg.region.logit_scale or float(clip.logit_scale.detach().exp())
    student = build_backbone(cfg.backbone, visual=clip.visual)
    if cfg.region.teacher_checkpoint and cfg.region.teacher_checkpoint != cfg.backbone.checkpoint:
        teacher_cfg = BackboneConfig(
            model=cfg.backbone.model,
            checkpoint=cfg.region.teacher_checkpoint,
            image_size=cfg.backbone.image_size,
        )
        teacher = build_backbone(teacher_cfg)
    else:
        teacher = build_backbone(BackboneConfig(model=cfg.backbone.model), visual=copy.deepcopy(clip.visual))
    return RegionModel(student, teacher, thing_text, stuff_text, logit_scale, cfg.region, cfg.kd)


def run_stage(cfg: RegionConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Region-language alignment fine-tuning; returns (and writes) summary.json."""
    train_set, val_set = build_datasets(cfg.data, "region")
    vocab = train_set.vocab
    seed_everything(cfg.train.seed)
    model = build_region_model(cfg, vocab.things, vocab.stuff)
    spec = StageSpec(
        name="region",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=region_loss,
        evaluate=evaluate_regions,
        primary_metric="mean_top1",
        info={
            "things": vocab.things,
            "stuff": vocab.stuff,
            "backbone_checkpoint": cfg.backbone.checkpoint,
            "confidence_threshold": cfg.region.confidence_threshold,
            "kd": cfg.kd.kind,
        },
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = RegionConfig

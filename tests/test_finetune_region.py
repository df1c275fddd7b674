"""Region-language alignment stage (DenseVLM / CLIPSelf family) on the synthetic world."""

from __future__ import annotations

import dataclasses
import math

import torch

from pipeline.finetune.common import FinetuneTrainConfig, eval_batches
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.distill_losses import KDConfig
from pipeline.finetune.region import (
    BOX,
    STUFF_MASK,
    THING_MASK,
    RegionConfig,
    RegionLossConfig,
    build_region_model,
    gather_regions,
    kept_by_confidence,
    region_loss,
    region_terms,
    run_stage,
)
from pipeline.model.backbone import BackboneConfig


def config(checkpoint: str, **region) -> RegionConfig:
    return RegionConfig(
        backbone=BackboneConfig(checkpoint=checkpoint),
        region=RegionLossConfig(**region),
        data=DataConfig(num_train=8, num_val=6),
        train=FinetuneTrainConfig(steps=4, batch_size=4, eval_batch_size=6, log_every=1),
    )


def test_region_stage_reports_box_thing_and_stuff_accuracies_and_keeps_the_teacher_frozen(
    tmp_path, debug_checkpoint
):
    summary = run_stage(config(debug_checkpoint, confidence_threshold=0.0), tmp_path / "run")
    m = summary["metrics"]
    for name in ("box", "thing_mask", "stuff_mask"):
        assert 0 <= m[f"{name}_top1"] <= m[f"{name}_top5"] <= 100
    assert summary["primary_metric"] == "mean_top1"
    state = torch.load(summary["final_checkpoint"], weights_only=True)["model"]
    start = torch.load(debug_checkpoint, weights_only=True)
    assert torch.equal(state["teacher.visual.conv1.weight"], start["visual.conv1.weight"])
    assert not torch.equal(state["student.visual.conv1.weight"], start["visual.conv1.weight"])
    # the frozen teacher runs without gradients: the backward pass costs less than 2x the forward
    assert summary["flops"]["backward_per_step"] < 2 * summary["flops"]["forward_per_step"]


def test_regions_below_the_teacher_confidence_threshold_are_dropped(debug_checkpoint):
    cfg = config(debug_checkpoint)
    train, _ = build_datasets(cfg.data, "region")
    model = build_region_model(cfg, train.vocab.things, train.vocab.stuff).train()
    batch = collate([train[(i, None)] for i in range(4)])
    regions = gather_regions(batch, cfg.region.min_region_pixels)
    kinds = set(regions["kind"].tolist())
    assert kinds == {BOX, THING_MASK, STUFF_MASK}
    kept = {}
    for threshold in (0.0, 0.999):
        model.cfg = dataclasses.replace(cfg.region, confidence_threshold=threshold)
        _, report = region_loss(model, batch)
        kept[threshold] = report["kept_fraction"]
    assert kept[0.0] == 1.0
    assert kept[0.999] < 1.0
    # with ground-truth labels, the confidence is the teacher's probability of the annotated category
    model.cfg = dataclasses.replace(cfg.region, confidence_threshold=0.0, use_ground_truth_labels=True)
    loss, report = region_loss(model, batch)
    assert report["kept_fraction"] == 1.0 and torch.isfinite(loss)


def test_gathered_regions_follow_the_annotations():
    _, val = build_datasets(DataConfig(num_train=1, num_val=3), "region")
    batch = collate([val[k] for k in eval_batches(len(val), 3)[0]])
    regions = gather_regions(batch, min_pixels=1)
    num_things = sum(len(b) for b in batch["boxes"])
    num_stuff = sum(len(s) for s in batch["stuff_labels"])
    assert int((regions["kind"] == BOX).sum()) == num_things == int((regions["kind"] == THING_MASK).sum())
    assert int((regions["kind"] == STUFF_MASK).sum()) == num_stuff
    stuff = regions["kind"] == STUFF_MASK
    ys_inside = [
        (m.nonzero()[:, 0].min().item(), int(b[1]))
        for m, b in zip(regions["masks"][stuff], regions["boxes"][stuff])
    ]
    assert all(top == y0 for top, y0 in ys_inside)  # a stuff box is its mask's bounding box


def test_kept_by_confidence_keeps_a_confidence_equal_to_the_threshold():
    conf = torch.tensor([0.29, 0.3, 0.31])  # fp32, as the stage computes confidences
    assert kept_by_confidence(conf, 0.3).tolist() == [False, True, True]


def _designed_teacher(model, regions, confidences, classes=None, scale: float = 100.0):
    """Text embeddings = basis vectors (things e_0..e_7, stuff e_8..e_15) and, per region, a unit teacher
    embedding whose softmax over its group's names puts probability ``c`` on class ``k`` and equal mass on
    the other seven: t = x e_k + sqrt(1 - x^2) e_63 with exp(s x) / (exp(s x) + 7) = c. ``c = None`` gives
    t = e_63: all logits 0, a confidence of exactly 1/8. ``k`` = ``classes[r]`` or ``r % 8``."""
    dim = model.thing_text.shape[1]
    eye = torch.eye(dim)
    model.thing_text, model.stuff_text, model.logit_scale = eye[:8].clone(), eye[8:16].clone(), scale
    rows, picked = [], []
    for r, (kind, c) in enumerate(zip(regions["kind"].tolist(), confidences)):
        k = int(classes[r]) if classes is not None else r % 8
        offset = 8 if kind == STUFF_MASK else 0
        x = 0.0 if c is None else math.log(7 * c / (1 - c)) / scale
        rows.append(x * eye[offset + k] + math.sqrt(1 - x * x) * eye[dim - 1])
        picked.append(k)
    return torch.stack(rows), torch.tensor(picked)


def _losses_reached(model, batch, teacher):
    """Which regions each loss term depends on: rows of a leaf student tensor with a nonzero gradient."""
    regions = gather_regions(batch, model.cfg.min_region_pixels, model.cfg.max_regions_per_kind)
    student = torch.randn(len(regions["image"]), teacher.shape[1], generator=torch.Generator().manual_seed(0))
    student.requires_grad_(True)
    model.pool = lambda dense, regions: student
    model.teacher_embed = lambda images, regions, indices=None: teacher
    _, terms = region_terms(model, batch)
    reached = {}
    for name, loss in terms.losses.items():
        (grad,) = torch.autograd.grad(loss, student, retain_graph=True)
        reached[name] = grad.abs().sum(1) > 0
    return terms, reached


def test_the_default_threshold_drops_regions_below_0_3_and_keeps_those_above_from_every_loss(
    debug_checkpoint,
):
    cfg = dataclasses.replace(config(debug_checkpoint), kd=KDConfig(kind="tgkd"))
    assert cfg.region.confidence_threshold == 0.3  # the DenseVLM default
    train, _ = build_datasets(cfg.data, "region")
    model = build_region_model(cfg, train.vocab.things, train.vocab.stuff).train()
    batch = collate([train[(i, None)] for i in range(2)])
    regions = gather_regions(batch, cfg.region.min_region_pixels, cfg.region.max_regions_per_kind)
    designed = [(0.29, 0.31, 0.5, 0.2)[r % 4] for r in range(len(regions["image"]))]
    teacher, classes = _designed_teacher(model, regions, designed)
    terms, reached = _losses_reached(model, batch, teacher)
    want = torch.tensor([c > 0.3 for c in designed])
    assert 0 < int(want.sum()) < len(want)
    assert torch.allclose(terms.confidence, torch.tensor(designed), atol=1e-5)
    assert torch.equal(terms.kept, want)
    assert torch.equal(terms.target[want], classes[want])  # the teacher's retrieved category
    assert set(reached) == {"align", "distill", "kd"}
    for name, rows in reached.items():
        assert torch.equal(rows, want), name


def test_a_confidence_exactly_at_the_threshold_reaches_the_losses(debug_checkpoint):
    # 1/8 is exact in fp32, and so is a uniform softmax over 8 names. With the annotated category the
    # confidence is that category's probability, so it can fall below 1/8 (a maximum over 8 cannot).
    cfg = config(debug_checkpoint, confidence_threshold=0.125, use_ground_truth_labels=True)
    train, _ = build_datasets(cfg.data, "region")
    model = build_region_model(cfg, train.vocab.things, train.vocab.stuff).train()
    batch = collate([train[(i, None)] for i in range(2)])
    regions = gather_regions(batch, cfg.region.min_region_pixels, cfg.region.max_regions_per_kind)
    designed = [(None, 0.124, 0.6)[r % 3] for r in range(len(regions["image"]))]
    teacher, _ = _designed_teacher(model, regions, designed, classes=regions["labels"])
    terms, reached = _losses_reached(model, batch, teacher)
    uniform = torch.tensor([c is None for c in designed])
    assert (terms.confidence[uniform] == 0.125).all()
    want = torch.tensor([c != 0.124 for c in designed])
    assert torch.equal(terms.kept, want)
    for name, rows in reached.items():
        assert torch.equal(rows, want), name


def test_text_and_vision_guided_distillation_add_their_weighted_loss_and_reuse_cached_teacher_embeddings(
    debug_checkpoint,
):
    cfg = config(debug_checkpoint, confidence_threshold=0.0)
    train, _ = build_datasets(cfg.data, "region")
    batch = collate([train[(i, None)] for i in range(2)])
    model = build_region_model(cfg, train.vocab.things, train.vocab.stuff).train()
    plain, _ = region_loss(model, batch)
    assert model.cache.misses == 2 and model.cache.hits == 0
    for kind in ("tgkd", "vgkd"):
        model.kd = KDConfig(kind=kind, weight=0.5)
        loss, report = region_loss(model, batch)
        _, terms = region_terms(model, batch)
        assert report["kd_loss"] > 0
        assert torch.allclose(loss, plain + 0.5 * terms.losses["kd"])
    assert model.cache.misses == 2 and model.cache.hits == 8  # 4 more passes x 2 images

"""Region-language alignment stage (DenseVLM / CLIPSelf family) on the synthetic world."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.finetune.common import FinetuneTrainConfig, eval_batches
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.region import (
    BOX,
    STUFF_MASK,
    THING_MASK,
    RegionConfig,
    RegionLossConfig,
    build_region_model,
    gather_regions,
    region_loss,
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

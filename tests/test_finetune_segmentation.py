"""Semantic segmentation stage on the synthetic world, from a debug CLIP checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.finetune.common import FinetuneTrainConfig, eval_batches, latest_checkpoint
from pipeline.finetune.datasets import IGNORE_INDEX, DataConfig, build_datasets, collate
from pipeline.finetune.metrics import ConfusionMatrix
from pipeline.finetune.segmentation import (
    SegHeadConfig,
    SegKDConfig,
    SegmentationConfig,
    SegmentationModel,
    build_segmentation_model,
    run_stage,
    seg_loss,
    semantic_regions,
)
from pipeline.model.backbone import BackboneConfig, build_backbone
from pipeline.train.state import Preempted


def small_config(checkpoint: str, kind: str = "upernet", **train) -> SegmentationConfig:
    return SegmentationConfig(
        backbone=BackboneConfig(checkpoint=checkpoint, drop_path_rate=0.1),
        head=SegHeadConfig(kind=kind, channels=16),
        data=DataConfig(num_train=12, num_val=6),
        train=FinetuneTrainConfig(
            **{"steps": 6, "batch_size": 4, "eval_batch_size": 6, "log_every": 1, **train}
        ),
    )


@pytest.mark.slow
def test_upernet_stage_reports_the_confusion_matrix_miou_of_its_weights_and_resumes_exactly(
    tmp_path, debug_checkpoint
):
    cfg = small_config(debug_checkpoint)
    summary = run_stage(cfg, tmp_path / "run")
    assert summary["status"] == "complete" and summary["primary_metric"] == "mIoU"
    assert 0.0 <= summary["metrics"]["mIoU"] <= 100.0
    assert summary["flops"]["per_step"] > summary["flops"]["forward_per_step"] > 0
    assert summary["train_flops"] == summary["flops"]["per_step"] * 6
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["metrics"] == summary["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    # Re-evaluate the saved final weights independently: the same confusion-matrix numbers.
    _, val = build_datasets(cfg.data, "segmentation")
    model = SegmentationModel(build_backbone(cfg.backbone), cfg.head, len(val.vocab.semantic))
    model.load_state_dict(torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)["model"])
    model.eval()
    cm = ConfusionMatrix(len(val.vocab.semantic))
    with torch.no_grad():
        for keys in eval_batches(len(val), 6):
            batch = collate([val[k] for k in keys])
            cm.update(model(batch["image"]).argmax(1), batch["semantic"])
    assert cm.compute()["mIoU"] == pytest.approx(summary["metrics"]["mIoU"])

    # Killed after step 3 and restarted: the same loss curve and the same final metrics.
    with pytest.raises(Preempted):
        run_stage(small_config(debug_checkpoint, stop_after_step=3), tmp_path / "split")
    assert not (tmp_path / "split" / "summary.json").exists()
    resumed = run_stage(small_config(debug_checkpoint), tmp_path / "split")

    def losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    assert losses("split") == losses("run")
    assert resumed["metrics"] == pytest.approx(summary["metrics"])
    again = run_stage(small_config(debug_checkpoint), tmp_path / "split")  # finished: returns the summary
    assert again == resumed


def test_semantic_fpn_stage_lowers_its_training_loss(tmp_path, debug_checkpoint):
    cfg = small_config(debug_checkpoint, kind="semfpn", steps=8)
    cfg = SegmentationConfig(**{**cfg.__dict__, "data": DataConfig(num_train=4, num_val=4, hflip=False)})
    summary = run_stage(cfg, tmp_path / "run")
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert summary["head"] == "semfpn"
    assert min(losses[-3:]) < losses[0]


def test_a_zero_backbone_lr_freezes_the_encoder_so_it_gets_no_gradients_and_stays_unchanged(
    tmp_path, debug_checkpoint
):
    from pipeline.finetune.common import FinetuneOptimConfig

    cfg = small_config(debug_checkpoint, steps=3)
    cfg = SegmentationConfig(
        **{**cfg.__dict__, "optim": FinetuneOptimConfig(backbone_lr_mult=0.0, grad_clip_norm=1.0)}
    )
    summary = run_stage(cfg, tmp_path / "run")
    state = torch.load(latest_checkpoint(tmp_path / "run"), map_location="cpu", weights_only=True)["model"]
    start = build_backbone(cfg.backbone).state_dict()
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in start.items())
    encoder = sum(v.numel() for v in build_backbone(cfg.backbone).parameters())
    assert summary["trainable_params"] == summary["params"] - encoder > 0
    full = run_stage(small_config(debug_checkpoint, steps=3), tmp_path / "full")
    assert full["trainable_params"] == full["params"] > summary["trainable_params"]
    assert summary["flops"]["per_step"] < full["flops"]["per_step"]


def test_semantic_regions_are_the_largest_classes_of_each_image_with_their_masks_and_boxes():
    sem = torch.full((2, 8, 8), IGNORE_INDEX)
    sem[0, :, :4], sem[0, :, 4:], sem[0, 0, 0] = 3, 5, 7  # class 3: 31 px, 5: 32 px, 7: 1 px
    sem[1, 2:4, 1:6] = 2  # 10 px; the rest unlabelled
    regions = semantic_regions(sem, max_regions=8, min_pixels=2)
    assert regions["image"].tolist() == [0, 0, 1] and regions["labels"].tolist() == [5, 3, 2]
    for i, c, mask in zip(regions["image"], regions["labels"], regions["masks"]):
        assert torch.equal(mask.bool(), sem[i] == c)
    assert regions["boxes"][2].tolist() == [1, 2, 6, 4]
    assert semantic_regions(sem, max_regions=1, min_pixels=2)["labels"].tolist() == [5, 2]


def test_distillation_adds_its_weighted_loss_to_the_cross_entropy_and_reuses_cached_teacher_embeddings(
    debug_checkpoint,
):
    cfg = small_config(debug_checkpoint)
    cfg = dataclasses.replace(cfg, kd=SegKDConfig(kind="tgkd", weight=0.5))
    train, _ = build_datasets(cfg.data, "segmentation")
    model = build_segmentation_model(cfg, train.vocab.semantic).train()
    batch = collate([train[(i, None)] for i in range(2)])
    torch.manual_seed(0)
    loss, report = seg_loss(model, batch)
    assert report["kd_loss"] > 0 and report["kd_regions"] > 2
    assert loss.item() == pytest.approx(report["ce_loss"] + 0.5 * report["kd_loss"], rel=1e-5)
    assert model.cache.misses == 2
    torch.manual_seed(0)
    again, _ = seg_loss(model, batch)
    assert model.cache.hits == 2 and torch.equal(loss, again)
    loss.backward()
    assert (
        model.backbone.visual.conv1.weight.grad is not None and model.teacher.visual.conv1.weight.grad is None
    )


def test_a_segmentation_run_with_vision_guided_distillation_logs_it_and_keeps_the_teacher_frozen(
    tmp_path, debug_checkpoint
):
    cfg = dataclasses.replace(
        small_config(debug_checkpoint, steps=3),
        kd=SegKDConfig(kind="vgkd"),
        data=DataConfig(num_train=4, num_val=2),
    )
    summary = run_stage(cfg, tmp_path / "run")
    assert summary["kd"] == "vgkd"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd_loss"] >= 0 for r in rows if "loss" in r)
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)["model"]
    start = torch.load(debug_checkpoint, weights_only=True)
    assert torch.equal(state["teacher.visual.conv1.weight"], start["visual.conv1.weight"])
    assert not torch.equal(state["backbone.visual.conv1.weight"], start["visual.conv1.weight"])


def test_distillation_from_an_image_tower_alone_is_refused_naming_the_teacher_checkpoint(
    tmp_path, debug_checkpoint
):
    state = torch.load(debug_checkpoint, weights_only=True)  # keep the image tower alone
    torch.save(
        {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}, tmp_path / "v.pt"
    )
    cfg = dataclasses.replace(
        small_config(debug_checkpoint), kd=SegKDConfig(kind="tgkd", teacher_checkpoint=str(tmp_path / "v.pt"))
    )
    with pytest.raises(ValueError, match="kd.teacher_checkpoint"):
        build_segmentation_model(cfg, ["a", "b"])

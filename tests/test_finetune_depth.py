"""Depth stage on the synthetic world, from a debug CLIP checkpoint, with NYUv2 metrics."""

from __future__ import annotations

import pytest
import torch

from pipeline.finetune.common import FinetuneTrainConfig, eval_batches, latest_checkpoint
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.depth import DepthConfig, DepthHeadConfig, DepthModel, run_stage
from pipeline.finetune.metrics import DepthMetrics
from pipeline.model.backbone import BackboneConfig, build_backbone


def test_depth_stage_reports_nyuv2_metrics_of_its_final_weights(tmp_path, debug_checkpoint):
    cfg = DepthConfig(
        backbone=BackboneConfig(checkpoint=debug_checkpoint, drop_path_rate=0.1),
        head=DepthHeadConfig(channels=16),
        data=DataConfig(num_train=12, num_val=6),
        train=FinetuneTrainConfig(steps=8, batch_size=4, eval_batch_size=6, log_every=1),
    )
    summary = run_stage(cfg, tmp_path / "run")
    m = summary["metrics"]
    assert summary["primary_metric"] == "rmse" and summary["higher_is_better"] is False
    assert summary["max_depth"] == cfg.data.world.max_depth  # 0 in the head config = the source's range
    assert m["rmse"] > 0 and m["abs_rel"] > 0 and 0 <= m["d1"] <= m["d2"] <= m["d3"] <= 1
    _, val = build_datasets(cfg.data, "depth")
    model = DepthModel(build_backbone(cfg.backbone), cfg.head, summary["max_depth"])
    model.load_state_dict(torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)["model"])
    model.eval()
    metrics = DepthMetrics(cfg.head.min_depth, summary["max_depth"], "eigen")
    with torch.no_grad():
        for keys in eval_batches(len(val), 4):
            batch = collate([val[k] for k in keys])
            pred = model(batch["image"])
            assert pred.shape == batch["depth"].shape
            metrics.update(pred, batch["depth"])
    assert metrics.compute() == pytest.approx(m)

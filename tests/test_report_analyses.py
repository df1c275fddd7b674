"""The report's transfer analyses: attention distance / maps of two checkpoints side by side, CKA per layer,
heavy-tail alpha per layer before and after fine-tuning (frozen blocks marked), fine-tuning FLOPs rows."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
from report_fixtures import write_world_images

from pipeline.finetune.classification import ClassificationConfig, run_stage
from pipeline.finetune.common import FinetuneOptimConfig, FinetuneTrainConfig, FreezeConfig
from pipeline.finetune.datasets import DataConfig
from pipeline.model.backbone import BackboneConfig
from pipeline.report.scaling import ScalingConfig, resolve_paths


def test_report_shows_two_checkpoints_cka_alpha_and_frozen_flops(tmp_path, debug_checkpoint):
    from pipeline.report.build import build_report

    root = tmp_path / "study"
    torch.manual_seed(5)
    student = tmp_path / "student.pt"
    torch.save(open_clip.create_model("debug").state_dict(), student)
    ft = ClassificationConfig(
        backbone=BackboneConfig(drop_path_rate=0.0),
        data=DataConfig(num_train=8, num_val=4),
        optim=FinetuneOptimConfig(lr=1e-3, freeze=FreezeConfig(alpha_below_quantile=0.67)),
        train=FinetuneTrainConfig(steps=2, batch_size=4, eval_batch_size=4),
    )
    run_stage(ft, root / "finetune" / "cls-frozen")
    cfg = ScalingConfig(name="analyses", root=str(root))
    cfg = dataclasses.replace(
        cfg,
        attention=dataclasses.replace(
            cfg.attention,
            images=str(write_world_images(tmp_path / "images", 4)),
            num_images=4,
            checkpoints={"teacher": debug_checkpoint, "FD student": str(student), "copy": debug_checkpoint},
            side_by_side=True,
        ),
        report=dataclasses.replace(cfg.report, reference_model=""),
    )
    report = build_report(resolve_paths(cfg))

    att = report["attention"]
    assert list(att["per_layer_mean_px"]) == ["teacher", "FD student", "copy"]
    assert att["cka_reference"] == "teacher"  # the first checkpoint by default
    assert att["cka"]["copy"] == pytest.approx([1.0] * 3, abs=1e-9)  # the same weights
    assert all(0 < v < 0.999 for v in att["cka"]["FD student"])  # other weights, other features
    for key in ("plot", "maps_plot", "cka_plot"):
        assert open(att[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    alpha = report["alpha"]
    (trial,) = alpha["trials"]
    assert trial["stage"] == "classification" and trial["quantile"] == 0.67
    assert len(trial["frozen"]) == 2 and len(trial["before"]) == len(trial["after"]) == 3
    assert all(trial["after"][b] == trial["before"][b] for b in trial["frozen"])

    (row,) = report["flops"]["finetune_rows"]
    assert row["kind"].startswith("frozen 2 block(s)")
    assert 2 / 3 < row["vs full"] < 1  # frozen blocks save part of their backward, and only that

    html = (root / "report" / "index.html").read_text()
    for heading in (
        "Attention maps and CKA",
        "Heavy-tail alpha",
        "Fine-tuning steps: full, frozen and sparse",
    ):
        assert heading in html
    saved = json.loads((root / "report" / "report.json").read_text())
    assert saved["alpha"]["trials"][0]["frozen"] == trial["frozen"]

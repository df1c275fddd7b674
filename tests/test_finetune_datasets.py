"""Readers of the standard layouts (fed by the synthetic world's export) agree with the built-in source;
the fine-tuning job runs a stage end to end on them and resumes after a preemption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.finetune import main
from pipeline.data import synthworld as sw
from pipeline.data.synth_export import ExportConfig, export
from pipeline.finetune.datasets import (
    ADE20KSource,
    CocoSource,
    ImageFolderSource,
    NYUv2Source,
    SyntheticSource,
    TaskDataset,
)

WORLD = sw.WorldConfig()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("synexp")
    export(
        ExportConfig(
            out=str(out),
            num_samples=0,
            num_finetune=4,
            num_val=3,
            layouts="imagenet,coco,ade20k,nyuv2",
            world=WORLD,
        )
    )
    return out


def index_of(path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def test_imagefolder_labels_are_the_main_object_shape(exported):
    src = ImageFolderSource(str(exported / "imagenet"), "train")
    assert src.vocab.classes == list(sw.THING_CLASSES) and len(src) == 4
    for (path, label), i in zip(src.files, range(len(src))):
        assert src[i].label == label == sw.zero_shot_label(sw.make_scene(WORLD, index_of(path), "finetune"))


def test_coco_reader_matches_the_synthetic_source_things_and_stuff(exported):
    ref = SyntheticSource(WORLD, "finetune", 4)
    src = CocoSource(str(exported / "coco"), "train", with_stuff=True)
    assert src.vocab.things == list(sw.THING_CLASSES) and src.vocab.stuff == list(sw.STUFF_CLASSES)
    for i in range(len(src)):
        got, want = src[i], ref[i]
        assert np.array_equal(np.sort(got.labels), np.sort(want.labels))
        assert np.array_equal(np.sort(got.boxes, axis=0), np.sort(want.boxes, axis=0))
        assert got.masks.sum() == want.masks.sum()
        assert sorted(got.stuff_labels.tolist()) == sorted(want.stuff_labels.tolist())


def test_ade20k_reader_recovers_the_semantic_maps_and_class_names(exported):
    src = ADE20KSource(str(exported / "ade20k"), "val")
    assert src.vocab.semantic == list(sw.SEMANTIC_CLASSES)
    for i, (image_path, _) in enumerate(src.items):
        scene = sw.make_scene(WORLD, index_of(image_path), "val")
        assert np.array_equal(src[i].semantic, scene.semantic.astype(np.int64))


def test_nyuv2_reader_recovers_depth_to_the_millimetre(exported):
    src = NYUv2Source(str(exported / "nyuv2"), "val")
    for i, (image_path, _) in enumerate(src.items):
        scene = sw.make_scene(WORLD, index_of(image_path), "val")
        rec = src[i]
        assert np.array_equal(rec.image, scene.image)  # PNG: lossless
        assert np.abs(rec.depth - scene.depth).max() <= 0.0005 + 1e-6


def test_flip_and_resize_keep_boxes_on_their_masks():
    data = TaskDataset(SyntheticSource(WORLD, "val", 4), "detection", image_size=48)
    for seed in range(6):
        s = data[(seed % 4, seed)]
        assert s["image"].shape == (3, 48, 48)
        for box, mask in zip(s["boxes"], s["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (
                abs(xs.min().item() - box[0].item()) <= 1.5
                and abs(xs.max().item() + 1 - box[2].item()) <= 1.5
            )
            assert (
                abs(ys.min().item() - box[1].item()) <= 1.5
                and abs(ys.max().item() + 1 - box[3].item()) <= 1.5
            )


def test_finetune_job_runs_depth_on_nyuv2_folders_and_resumes_after_preemption(exported, tmp_path, capsys):
    args = [
        "--stage",
        "depth",
        f"--run_dir={tmp_path / 'run'}",
        "--data.source=nyuv2",
        f"--data.root={exported / 'nyuv2'}",
        "--data.num_train=0",
        "--data.num_val=0",
        "--train.steps=3",
        "--train.batch_size=2",
        "--head.channels=8",
        "--head.max_depth=10",
    ]
    assert main(args + ["--train.stop_after_step=2"]) == 124
    assert not (tmp_path / "run" / "summary.json").exists()
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert printed["steps"] == summary["steps"] == 3 and summary["max_depth"] == 10.0
    assert summary["metrics"]["rmse"] == printed["metrics"]["rmse"] > 0
    assert "[head]" in (tmp_path / "run" / "config.toml").read_text()


def test_every_stage_preset_loads():
    from pipeline.config import load_config, preset_names
    from pipeline.finetune.stages import STAGES, load_stage

    for stage in STAGES:
        module = load_stage(stage)
        names = preset_names(f"finetune/{stage}")
        assert "debug" in names and "synthetic" in names
        for name in names:
            cfg = load_config(module.STAGE_CONFIG, job=f"finetune/{stage}", preset=name)
            assert isinstance(cfg, module.STAGE_CONFIG)
        assert (
            load_config(module.STAGE_CONFIG, job=f"finetune/{stage}", preset="debug") == module.STAGE_CONFIG()
        )
        cfg = load_config(module.STAGE_CONFIG, job=f"finetune/{stage}", preset="synthetic")
        assert cfg.data.source == "synthetic" and cfg.backbone.model == "debug"

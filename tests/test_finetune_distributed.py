"""Data-parallel fine-tuning: 2 gloo processes (``python -m jobs.finetune`` under torchrun's environment
variables) train the same global batch as 1 process, with the same loss curve and the same metrics.

The loss-curve bound comes from the 1-process run's own fp32 sensitivity, as ``tests/numerics.py`` does for
gradients: a second 1-process run starts from the checkpoint with every weight moved by one fp32 rounding step
(relative 2^-24), and the 2-process curve must be no further from the 1-process curve than a few times that
run's distance (plus 16 u of the curve; a one-ulp move often leaves the logged fp32 losses unchanged, and then
the bound is that floor). A CPU's fp32 kernels set the scale (Intel and AMD differ); a defect is far outside
it (with BatchNorm left unsynchronised the segmentation curve moves by ~0.1 against a bound of ~5e-6). Evaluation is
split over the ranks and reduced: the 2-process run's final metrics equal a 1-process evaluation of the same
saved weights (pytest.approx).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune_detection import Oracle

from pipeline.config import to_toml
from pipeline.finetune.common import FinetuneTrainConfig, eval_batches, latest_checkpoint
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.finetune.detection import DetectionConfig, DetHeadConfig, build_mask_rcnn, evaluate_detection
from pipeline.finetune.metrics import ConfusionMatrix, DepthMetrics
from pipeline.finetune.segmentation import SegHeadConfig, SegmentationConfig, SegmentationModel
from pipeline.finetune.stages import run_stage
from pipeline.model.backbone import BackboneConfig, build_backbone
from tests.numerics import U32
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def seg_config(checkpoint: str) -> SegmentationConfig:
    """UperNet (BatchNorm in the head: SyncBatchNorm on 2 processes); no dropout / drop-path, whose per-rank
    draws would make the two runs differ by more than rounding."""
    return SegmentationConfig(
        backbone=BackboneConfig(checkpoint=checkpoint, drop_path_rate=0.0, image_size=32),
        head=SegHeadConfig(kind="upernet", channels=16, dropout=0.0),
        data=DataConfig(num_train=8, num_val=8, image_size=32),
        train=FinetuneTrainConfig(steps=STEPS, batch_size=4, eval_batch_size=4, log_every=1, device="cpu"),
    )


def det_config(checkpoint: str) -> DetectionConfig:
    """Mask R-CNN with per-image seeded RPN / RoI sampling; 4 RoIs per image (1 positive: the ground-truth
    box is always a proposal), so every image contributes the same number of terms to each loss mean."""
    return DetectionConfig(
        backbone=BackboneConfig(checkpoint=checkpoint, drop_path_rate=0.0),
        head=DetHeadConfig(
            fpn_channels=16,
            box_head_dim=32,
            mask_head_channels=8,
            rpn_batch_size_per_image=32,
            box_batch_size_per_image=4,
            detections_per_img=10,
        ),
        data=DataConfig(num_train=8, num_val=4),
        train=FinetuneTrainConfig(steps=STEPS, batch_size=2, eval_batch_size=2, log_every=1, device="cpu"),
    )


def start_two_processes(stage: str, cfg, run_dir: Path) -> list[subprocess.Popen]:
    """Start ``python -m jobs.finetune`` on 2 ranks (torchrun's variables, gloo), from ``cfg`` written as TOML
    (the 1-process references run meanwhile)."""
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text(to_toml(cfg))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "jobs.finetune",
            "--stage",
            stage,
            f"--config={config}",
            f"--run_dir={run_dir}",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    return procs


def wait_for(procs: list[subprocess.Popen], run_dir: Path) -> dict:
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def perturbed_checkpoint(checkpoint: str, out: Path) -> str:
    """Every float weight times (1 +- 2^-24): one fp32 rounding step, random sign."""
    state = torch.load(checkpoint, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if v.is_floating_point():
            sign = torch.randint(0, 2, v.shape, generator=gen).to(v.dtype) * 2 - 1
            state[k] = v * (1 + sign * U32)
    torch.save(state, out)
    return str(out)


def loss_curve(run_dir: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows if "loss" in r], dtype=np.float64)


def assert_same_curve(two: np.ndarray, one: np.ndarray, perturbed: np.ndarray, factor: float = 8.0) -> None:
    assert len(two) == len(one) == len(perturbed) == STEPS
    err = float(np.linalg.norm(two - one))
    base = float(np.linalg.norm(perturbed - one))
    bound = factor * base + 16 * U32 * float(np.linalg.norm(one))
    assert err <= bound, (
        f"2-process curve {two} vs 1-process {one}: {err:.3g} > bound {bound:.3g} ({base:.3g})"
    )


def test_segmentation_on_two_processes_matches_one_process_loss_curve_and_metrics(tmp_path, debug_checkpoint):
    cfg = seg_config(debug_checkpoint)
    procs = start_two_processes("segmentation", cfg, tmp_path / "two")
    one = run_stage("segmentation", cfg, tmp_path / "one")
    perturbed = run_stage(
        "segmentation",
        seg_config(perturbed_checkpoint(debug_checkpoint, tmp_path / "p.pt")),
        tmp_path / "perturbed",
    )
    two = wait_for(procs, tmp_path / "two")
    assert two["world_size"] == 2 and two["samples_seen"] == one["samples_seen"] == STEPS * 4
    assert_same_curve(
        loss_curve(tmp_path / "two"), loss_curve(tmp_path / "one"), loss_curve(tmp_path / "perturbed")
    )
    assert two["flops"] == one["flops"]
    for key in ("mIoU", "aAcc"):  # weights within fp32 of each other: the same metric up to a flipped pixel
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=0.5), key
        assert perturbed["metrics"][key] == pytest.approx(one["metrics"][key], abs=0.5), key

    # evaluation split over the 2 ranks and reduced == one process evaluating the same saved weights
    _, val = build_datasets(cfg.data, "segmentation")
    model = SegmentationModel(build_backbone(cfg.backbone), cfg.head, len(val.vocab.semantic))
    model.load_state_dict(torch.load(latest_checkpoint(tmp_path / "two"), weights_only=True)["model"])
    model.eval()
    cm = ConfusionMatrix(len(val.vocab.semantic))
    with torch.no_grad():
        for keys in eval_batches(len(val), cfg.train.eval_batch_size):
            batch = collate([val[k] for k in keys])
            cm.update(model(batch["image"]).argmax(1), batch["semantic"])
    single = cm.compute()
    for key in ("mIoU", "mAcc", "aAcc"):
        assert two["metrics"][key] == pytest.approx(single[key]), key


def test_detection_on_two_processes_matches_one_process_loss_curve_and_coco_map(tmp_path, debug_checkpoint):
    cfg = det_config(debug_checkpoint)
    procs = start_two_processes("detection", cfg, tmp_path / "two")
    one = run_stage("detection", cfg, tmp_path / "one")
    perturbed = run_stage(
        "detection",
        det_config(perturbed_checkpoint(debug_checkpoint, tmp_path / "p.pt")),
        tmp_path / "perturbed",
    )
    two = wait_for(procs, tmp_path / "two")
    assert_same_curve(
        loss_curve(tmp_path / "two"), loss_curve(tmp_path / "one"), loss_curve(tmp_path / "perturbed")
    )
    assert set(two["metrics"]) == set(one["metrics"])
    del perturbed

    # COCO evaluation gathered to rank 0 == one process evaluating the same saved weights
    _, val = build_datasets(cfg.data, "detection")
    classes = val.vocab.things
    vit = build_backbone(dataclasses.replace(cfg.backbone, out_indices=(-1,)))
    model = build_mask_rcnn(vit, cfg.head, len(classes), cfg.data.image_size)
    model.load_state_dict(torch.load(latest_checkpoint(tmp_path / "two"), weights_only=True)["model"])
    model.eval()
    with torch.no_grad():
        batches = [
            collate([val[k] for k in keys]) for keys in eval_batches(len(val), cfg.train.eval_batch_size)
        ]
        single = evaluate_detection(model, batches, classes)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
        assert two["metrics"][key] == pytest.approx(single[key]), key


def _evaluate_shard(rank: int, port: int, out: str) -> None:
    """Worker of the 2-rank evaluation test: rank ``rank``'s shard through each distributed evaluator."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        result = _evaluations(rank, 2)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _evaluations(rank: int, world_size: int) -> dict:
    """COCO mAP of an oracle missing every other object, a confusion matrix and depth metrics of fixed
    pseudo-random predictions, each on this rank's evaluation shard (reduced over the ranks)."""
    _, val = build_datasets(DataConfig(num_train=1, num_val=7), "detection")
    batches = [collate([val[k] for k in keys]) for keys in eval_batches(len(val), 2, rank, world_size)]
    coco = evaluate_detection(Oracle(batches, keep_every=2), batches, val.vocab.things)
    cm, depth = ConfusionMatrix(5), DepthMetrics(0.1, 10.0, "none")
    for batch in batches:
        for index in batch["index"].tolist():
            gen = torch.Generator().manual_seed(int(index))
            cm.update(torch.randint(0, 5, (8, 8), generator=gen), torch.randint(0, 6, (8, 8), generator=gen))
            depth.update(
                torch.rand(1, 8, 8, generator=gen) * 9 + 0.5, torch.rand(1, 8, 8, generator=gen) * 9 + 0.5
            )
    return {"coco": coco, "cm": cm.all_reduce().compute(), "depth": depth.all_reduce().compute()}


def test_evaluation_split_over_two_ranks_equals_one_rank_for_coco_confusion_matrix_and_depth(tmp_path):
    import torch.multiprocessing as mp

    single = _evaluations(0, 1)
    assert 0.0 < single["coco"]["bbox_AP"] < 1.0  # not a trivial 0 or 1
    out = tmp_path / "two.pt"
    mp.spawn(_evaluate_shard, args=(free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert two["coco"] == pytest.approx(single["coco"], nan_ok=True)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert two["cm"][key] == single["cm"][key]  # integer counts: exactly
    assert two["depth"] == pytest.approx(single["depth"], rel=1e-12)

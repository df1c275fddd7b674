"""Sanity of every fine-tuning evaluator on hand-built predictions with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.finetune.metrics import (
    ConfusionMatrix,
    DepthMetrics,
    coco_evaluate,
    eigen_crop_mask,
    mask_to_rle,
    mean_class_topk_accuracy,
    topk_accuracy,
)

# ------------------------------------------------------------------------------------ classification


def test_topk_accuracy_counts_targets_within_the_top_k_logits():
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4]])
    targets = torch.tensor([0, 2, 2])  # right; second choice; second choice
    acc = topk_accuracy(logits, targets, (1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(100.0)
    assert acc[5] == pytest.approx(100.0)  # k clipped to the number of classes


def test_mean_class_accuracy_weights_each_class_equally():
    logits = torch.eye(2)[[0, 0, 0, 0]]  # always predicts class 0
    targets = torch.tensor([0, 0, 0, 1])
    assert topk_accuracy(logits, targets, (1,))[1] == pytest.approx(75.0)
    assert mean_class_topk_accuracy(logits, targets, (1,))[1] == pytest.approx(50.0)


# -------------------------------------------------------------------------------------- segmentation


def test_perfect_segmentation_gives_miou_100():
    target = torch.randint(0, 4, (2, 8, 8))
    cm = ConfusionMatrix(4)
    cm.update(target.clone(), target)
    out = cm.compute()
    assert out["mIoU"] == pytest.approx(100.0)
    assert out["mAcc"] == pytest.approx(100.0)
    assert out["aAcc"] == pytest.approx(100.0)


def test_one_wrong_pixel_gives_the_known_iou_and_accuracy():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    out = cm.compute()
    # class 0: TP 1, FN 1 -> IoU 1/2, acc 1/2; class 1: TP 2, FP 1 -> IoU 2/3, acc 1.
    assert out["IoU"] == pytest.approx([50.0, 200 / 3])
    assert out["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)
    assert out["mAcc"] == pytest.approx(75.0)
    assert out["aAcc"] == pytest.approx(75.0)


def test_ignored_pixels_and_absent_classes_do_not_count():
    target = torch.tensor([[0, 0, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 2]])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, target)
    out = cm.compute()
    assert out["mIoU"] == pytest.approx(100.0)  # classes 1 and 2 appear nowhere once 255 is skipped
    assert math.isnan(out["IoU"][1]) and math.isnan(out["IoU"][2])


def test_confusion_matrix_accumulates_over_batches_like_one_big_batch():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 6, 6), generator=g)
    pred = torch.randint(0, 5, (4, 6, 6), generator=g)
    whole, parts = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, target)
    for i in range(4):
        parts.update(pred[i], target[i])
    assert torch.equal(whole.matrix, parts.matrix)


# --------------------------------------------------------------------------------------------- depth


def test_perfect_depth_gives_zero_error_and_full_delta():
    target = torch.rand(2, 1, 16, 16) * 5 + 0.5
    m = DepthMetrics(eval_crop="none")
    m.update(target.clone(), target)
    out = m.compute()
    assert out["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert out["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert out["d1"] == pytest.approx(1.0)


def test_depth_off_by_a_known_factor_gives_the_known_metrics():
    target = np.full((1, 8, 8), 2.0)
    m = DepthMetrics(eval_crop="none")
    m.update(target * 1.1, target)
    out = m.compute()
    assert out["abs_rel"] == pytest.approx(0.1)
    assert out["rmse"] == pytest.approx(0.2)
    assert out["d1"] == pytest.approx(1.0)  # 1.1 < 1.25
    m = DepthMetrics(eval_crop="none")
    m.update(target * 2.0, target)
    out = m.compute()
    assert out["d1"] == 0.0 and out["d2"] == 0.0 and out["d3"] == 0.0  # 2 > 1.25 ** 3
    assert out["abs_rel"] == pytest.approx(1.0)
    assert out["silog"] == pytest.approx(0.0, abs=1e-6)  # a global scale is invisible to SILog


def test_depth_metrics_use_the_range_the_crop_and_clip_predictions():
    target = np.full((1, 480, 640), 3.0)
    pred = target.copy()
    crop = eigen_crop_mask(480, 640)
    assert crop[45, 41] and not crop[44, 41] and not crop[45, 601] and crop[470, 600]
    pred[0][~crop] = 100.0  # outside the Eigen crop: ignored
    target[50:60, 50:60] = 20.0  # beyond max_depth: not a valid pixel
    m = DepthMetrics(max_depth=10.0, eval_crop="eigen")
    m.update(pred, target)
    assert m.compute()["rmse"] == pytest.approx(0.0)
    m = DepthMetrics(max_depth=10.0, eval_crop="none")
    m.update(np.full((1, 4, 4), 50.0), np.full((1, 4, 4), 5.0))
    assert m.compute()["rmse"] == pytest.approx(5.0)  # prediction clipped to 10 m


def test_depth_metrics_average_per_image():
    m = DepthMetrics(eval_crop="none")
    m.update(np.full((1, 4, 4), 1.0), np.full((1, 4, 4), 1.0))  # rmse 0
    m.update(np.full((1, 2, 2), 3.0), np.full((1, 2, 2), 1.0))  # rmse 2
    assert m.compute()["rmse"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- detection


def _gt(boxes: list[list[float]]) -> dict:
    anns = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        mask = np.zeros((32, 32), bool)
        mask[int(y0) : int(y1), int(x0) : int(x1)] = True
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_rle(mask),
            }
        )
    return {
        "images": [{"id": 1, "width": 32, "height": 32}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }


def _dets(gt: dict, keep: list[int]) -> list[dict]:
    return [
        {
            "image_id": 1,
            "category_id": 1,
            "score": 0.9,
            "bbox": gt["annotations"][k]["bbox"],
            "segmentation": gt["annotations"][k]["segmentation"],
        }
        for k in keep
    ]


def test_perfect_detections_give_map_1():
    gt = _gt([[2, 2, 12, 12], [16, 16, 30, 28]])
    out = coco_evaluate(gt, _dets(gt, [0, 1]))
    assert out["bbox_AP"] == pytest.approx(1.0)
    assert out["segm_AP"] == pytest.approx(1.0)


def test_missing_one_of_two_objects_gives_the_known_ap():
    gt = _gt([[2, 2, 12, 12], [16, 16, 30, 28]])
    out = coco_evaluate(gt, _dets(gt, [0]))
    # Precision 1 up to recall 0.5, then nothing: 51 of COCO's 101 recall points.
    assert out["bbox_AP"] == pytest.approx(51 / 101)
    assert out["segm_AP"] == pytest.approx(51 / 101)


def test_a_box_with_iou_062_counts_at_three_of_ten_thresholds():
    gt = _gt([[0, 0, 10, 10]])
    det = [{"image_id": 1, "category_id": 1, "score": 1.0, "bbox": [0, 0, 10, 6.2]}]  # IoU 62 / 100
    out = coco_evaluate(gt, det, iou_types=("bbox",))
    assert out["bbox_AP50"] == pytest.approx(1.0)
    assert out["bbox_AP75"] == pytest.approx(0.0)
    assert out["bbox_AP"] == pytest.approx(0.3)  # thresholds 0.50, 0.55, 0.60 of 0.50:0.95


def test_no_detections_give_map_0():
    assert coco_evaluate(_gt([[2, 2, 12, 12]]), [])["bbox_AP"] == 0.0

"""Subnetwork search (iterative magnitude pruning with distillation only) and masks held through fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.prune import main as prune_main
from pipeline.finetune.common import FinetuneOptimConfig, FinetuneTrainConfig, latest_checkpoint
from pipeline.finetune.datasets import DataConfig
from pipeline.finetune.prune import PruneConfig, PruneJobConfig, PruneTrainConfig, run_prune
from pipeline.finetune.segmentation import SegHeadConfig, SegmentationConfig, run_stage
from pipeline.model.backbone import BackboneConfig, build_backbone
from pipeline.model.sparsity import (
    apply_mask_file,
    apply_masks,
    flop_densities,
    full_masks,
    load_masks,
    magnitude_prune,
    prunable_parameters,
    save_masks,
)
from pipeline.train.flops import count_training_flops
from pipeline.train.state import Preempted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _numbered_backbone():
    """The debug encoder with prunable weights 1, 2, 3, ... in parameter order (signs alternate), so every
    magnitude is distinct and the global order is known."""
    backbone = build_backbone(BackboneConfig(model="debug"))
    start = 1
    with torch.no_grad():
        for p in prunable_parameters(backbone).values():
            values = torch.arange(start, start + p.numel(), dtype=torch.float32)
            signs = torch.where(values % 2 == 0, 1.0, -1.0)
            p.copy_((values * signs).view_as(p))
            start += p.numel()
    return backbone, start - 1


def test_global_magnitude_pruning_removes_the_smallest_share_of_the_weights_still_kept():
    backbone, total = _numbered_backbone()
    masks = magnitude_prune(backbone, full_masks(backbone), ratio=0.25, scope="global")
    kept = torch.cat([m.flatten() for m in masks.values()])
    k = round(0.25 * total)
    assert not kept[:k].any() and kept[k:].all()  # magnitudes 1..k go: the first k in parameter order
    again = magnitude_prune(backbone, masks, ratio=0.5, scope="global")  # half of what is left, not of all
    kept = torch.cat([m.flatten() for m in again.values()])
    k2 = k + round(0.5 * (total - k))
    assert not kept[:k2].any() and kept[k2:].all()


def test_layer_magnitude_pruning_removes_the_same_share_of_every_matrix():
    backbone, _ = _numbered_backbone()
    masks = magnitude_prune(backbone, full_masks(backbone), ratio=0.25, scope="layer")
    for name, p in prunable_parameters(backbone).items():
        flat = masks[name].flatten()
        k = round(0.25 * p.numel())
        assert not flat[:k].any() and flat[k:].all(), name


def test_a_masks_file_whose_bytes_do_not_match_its_sha256_is_refused(tmp_path):
    backbone = build_backbone(BackboneConfig(model="debug"))
    masks = magnitude_prune(backbone, full_masks(backbone), ratio=0.5)
    save_masks(masks, tmp_path / "masks.pt")
    loaded = load_masks(tmp_path / "masks.pt")
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    torch.save({k: ~v for k, v in masks.items()}, tmp_path / "masks.pt")
    with pytest.raises(ValueError, match="optim.masks"):
        apply_mask_file(backbone, str(tmp_path / "masks.pt"))


def test_masked_weights_stay_zero_through_adamw_steps_with_weight_decay_and_weight_loads():
    backbone = build_backbone(BackboneConfig(model="debug"))
    masks = magnitude_prune(backbone, full_masks(backbone), ratio=0.5)
    apply_masks(backbone, masks)
    params = prunable_parameters(backbone)
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        backbone.forward_dense(torch.randn(2, 3, 64, 64)).square().mean().backward()
        assert all((p.grad[~masks[k]] == 0).all() for k, p in params.items())
        opt.step()
    for k, p in params.items():
        assert (p[~masks[k]] == 0).all(), k
        assert not torch.equal(p[masks[k]], before[k][masks[k]]), k
    # weights written outside the optimizer (a checkpoint load) are masked again by the next forward
    backbone.load_state_dict({k: v + 1 for k, v in backbone.state_dict().items()})
    backbone.forward_dense(torch.randn(1, 3, 64, 64))
    assert all((p[~masks[k]] == 0).all() for k, p in params.items())
    assert backbone.sparsity.tokens == 65


def test_sparse_flops_of_the_encoder_drop_by_the_pruned_share_of_each_weight_matrix():
    # debug encoder: 3 blocks of width W = 64 on T = 65 tokens (64 px, patch 8), batch B = 2. Per block the
    # prunable matmuls cost in_proj 6TW^2, out_proj 2TW^2, c_fc 8TW^2, c_proj 8TW^2 forward FLOPs; at density
    # d a module costs dC forward and (1 + d)C backward, so each pruned share saves (1 - d)C in each pass.
    backbone = build_backbone(BackboneConfig(model="debug"))
    x = torch.randn(2, 3, 64, 64)
    dense = count_training_flops(backbone, lambda: backbone.forward_dense(x))
    masks = magnitude_prune(backbone, full_masks(backbone), 0.25, scope="layer")
    apply_masks(backbone, masks)
    sparse = count_training_flops(
        backbone, lambda: backbone.forward_dense(x), densities=flop_densities(backbone)
    )
    t, w, b = 65, 64, 2
    cost = {"attn.in_proj_weight": 6, "attn.out_proj.weight": 2, "mlp.c_fc.weight": 8, "mlp.c_proj.weight": 8}
    saved = sum(
        b * cost[name.split(".", 4)[-1]] * t * w * w * (1 - float(m.float().mean()))
        for name, m in masks.items()
    )
    assert abs(dense["forward_per_step"] - sparse["forward_per_step"] - saved) <= 1
    assert abs(dense["backward_per_step"] - sparse["backward_per_step"] - saved) <= 1


def _prune_config(**prune) -> PruneJobConfig:
    return PruneJobConfig(
        prune=PruneConfig(**{"ratio": 0.3, "rounds": 2, "steps_per_round": 2, **prune}),
        data=DataConfig(num_train=8, num_val=1),
        train=PruneTrainConfig(batch_size=4, log_every=1),
    )


def test_imp_reaches_the_density_of_its_rounds_and_writes_masks_with_their_sha256(tmp_path):
    code = prune_main(
        ["--preset", "debug", "--prune.rounds=2", "--prune.ratio=0.3", "--prune.steps_per_round=2"]
        + [
            "--data.num_train=8",
            "--train.batch_size=4",
            "--train.log_every=1",
            f"--run_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["per_round"]] == [1, 2]
    assert summary["per_round"][0]["density"] == pytest.approx(0.7, abs=1e-4)
    assert summary["density"] == pytest.approx(0.49, abs=1e-4) == summary["per_round"][1]["density"]
    manifest = json.loads((tmp_path / "run" / "masks.json").read_text())
    assert manifest["sha256"] == summary["masks_sha256"] and manifest["density"] == summary["density"]
    masks = load_masks(tmp_path / "run" / "masks.pt")
    assert set(masks) == set(prunable_parameters(build_backbone(BackboneConfig(model="debug"))))
    flops = summary["flops"]
    assert flops["sparse"]["forward_per_step"] < flops["dense"]["forward_per_step"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["step"]) for r in rows] == [(1, 1), (1, 2), (2, 3), (2, 4)]


def test_imp_stopped_after_a_round_resumes_to_the_same_masks(tmp_path):
    cfg = _prune_config(rewind="none", scope="layer")
    whole = run_prune(cfg, tmp_path / "whole")
    stopped = PruneJobConfig(**{**cfg.__dict__, "train": PruneTrainConfig(batch_size=4, stop_after_round=1)})
    with pytest.raises(Preempted):
        run_prune(stopped, tmp_path / "split")
    first = (tmp_path / "split" / "rounds" / "1" / "masks.pt").stat().st_mtime_ns
    resumed = run_prune(cfg, tmp_path / "split")
    assert (tmp_path / "split" / "rounds" / "1" / "masks.pt").stat().st_mtime_ns == first  # not redone
    assert resumed["masks_sha256"] == whole["masks_sha256"]
    assert resumed["per_round"] == whole["per_round"]
    weights = torch.load(
        tmp_path / "split" / "visual.pt", weights_only=True
    )  # rewind none: the trained subnetwork
    masks = load_masks(tmp_path / "split" / "masks.pt")
    for name, mask in masks.items():
        assert (weights[name.removeprefix("visual.")][~mask] == 0).all()


def test_a_stage_fine_tunes_a_masked_subnetwork_with_its_zeros_kept_and_counts_sparse_flops(
    tmp_path, debug_checkpoint
):
    backbone = build_backbone(BackboneConfig(checkpoint=debug_checkpoint))
    masks = magnitude_prune(backbone, full_masks(backbone), ratio=0.5)
    save_masks(masks, tmp_path / "masks.pt")
    cfg = SegmentationConfig(
        backbone=BackboneConfig(checkpoint=debug_checkpoint),
        head=SegHeadConfig(channels=16),
        data=DataConfig(num_train=4, num_val=2),
        optim=FinetuneOptimConfig(lr=1e-3, layer_decay=0.65, masks=str(tmp_path / "masks.pt")),
        train=FinetuneTrainConfig(steps=3, batch_size=2, eval_batch_size=2),
    )
    summary = run_stage(cfg, tmp_path / "run")
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)["model"]
    start = backbone.state_dict()
    for name, mask in masks.items():
        trained = state[f"backbone.{name}"]
        assert (trained[~mask] == 0).all(), name
        assert not torch.equal(trained[mask], start[name][mask]), name
    flops = summary["flops"]
    assert flops["forward_per_step"] < flops["dense_forward_per_step"]
    # every module is trained: backward (1 + d)C minus forward dC is C summed, the dense forward
    assert flops["backward_per_step"] - flops["forward_per_step"] == flops["dense_forward_per_step"]

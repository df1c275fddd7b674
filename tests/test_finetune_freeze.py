"""Heavy-tail layer freezing in the fine-tuning trainer, and the training-FLOPs rule for frozen and sparse layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.finetune.classification import ClassificationConfig, run_stage
from pipeline.finetune.common import FinetuneOptimConfig, FinetuneTrainConfig, FreezeConfig, latest_checkpoint
from pipeline.finetune.datasets import DataConfig
from pipeline.model.backbone import BackboneConfig, build_backbone
from pipeline.train.flops import LayerCost, count_training_flops, layer_step_flops, training_flops

X = torch.randn(8, 16)
C1, C2 = 2 * 8 * 16 * 32, 2 * 8 * 32 * 4  # linear layers: 2 * batch * in * out


def two_layers(first_frozen: bool, second_frozen: bool) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    m[0].requires_grad_(not first_frozen)
    m[1].requires_grad_(not second_frozen)
    return m


def test_flops_follow_forward_c_backward_2c_and_frozen_c():
    m = two_layers(False, False)
    out = count_training_flops(m, lambda: m(X).sum())
    assert out["forward_per_step"] == C1 + C2 and out["backward_per_step"] == 2 * (C1 + C2)
    m = two_layers(False, True)  # frozen layer that gradients flow through: backward C
    out = count_training_flops(m, lambda: m(X).sum())
    assert out["backward_per_step"] == 2 * C1 + C2
    m = two_layers(
        True, False
    )  # frozen layer with no gradient flowing (a linear probe's encoder): backward 0
    out = count_training_flops(m, lambda: m(X).sum())
    assert out["backward_per_step"] == 2 * C2


def test_flops_of_frozen_and_sparse_layers_equal_the_formulas_on_a_two_layer_model():
    d = 0.25
    # trained sparse layer (forward dC, backward (1 + d)C) under a frozen one that passes gradients (C, C)
    m = two_layers(False, True)
    out = count_training_flops(m, lambda: m(X).sum(), densities={m[0]: d})
    assert out["forward_per_step"] == d * C1 + C2
    assert out["backward_per_step"] == (1 + d) * C1 + C2
    assert out["dense_forward_per_step"] == C1 + C2 and out["frozen_forward_per_step"] == C2
    # frozen first layer: no gradient flows through it (backward 0); sparse trained second layer
    m = two_layers(True, False)
    out = count_training_flops(m, lambda: m(X).sum(), densities={m[1]: d})
    assert out["forward_per_step"] == C1 + d * C2 and out["backward_per_step"] == (1 + d) * C2
    assert out["no_grad_forward_per_step"] == C1
    # the formula function the counter uses, layer by layer
    step = training_flops([LayerCost("a", C1, density=d), LayerCost("b", C2, frozen=True)])
    assert [(r["forward"], r["backward"]) for r in step["layers"]] == [(d * C1, (1 + d) * C1), (C2, C2)]
    assert step["total"] == d * C1 + C2 + (1 + d) * C1 + C2
    assert layer_step_flops(10.0) == (10.0, 20.0)  # dense and trained: C, 2C
    assert layer_step_flops(10.0, frozen=True, grad_flows=False) == (10.0, 0.0)
    with pytest.raises(ValueError, match="density"):
        layer_step_flops(1.0, density=1.5)


def test_alpha_freezing_leaves_the_lowest_alpha_blocks_untouched_and_out_of_the_optimizer(tmp_path):
    cfg = ClassificationConfig(
        backbone=BackboneConfig(drop_path_rate=0.0),
        data=DataConfig(num_train=8, num_val=4),
        optim=FinetuneOptimConfig(lr=1e-3, freeze=FreezeConfig(alpha_below_quantile=0.67)),
        train=FinetuneTrainConfig(steps=2, batch_size=4, eval_batch_size=4),
    )
    summary = run_stage(cfg, tmp_path / "run")
    alpha = json.loads((tmp_path / "run" / "alpha.json").read_text())
    before = [r["alpha"] for r in alpha["before"]]
    assert len(before) == 3 and len(alpha["after"]) == 3
    frozen = sorted(range(3), key=lambda i: before[i])[:2]  # floor(0.67 * 3) = 2 blocks of smallest alpha
    assert alpha["frozen"] == summary["frozen_blocks"] == sorted(frozen)
    trained = ({0, 1, 2} - set(frozen)).pop()
    assert [alpha["after"][i]["alpha"] for i in frozen] == [before[i] for i in frozen]
    assert alpha["after"][trained]["alpha"] != before[trained]

    initial = build_backbone(cfg.backbone).state_dict()  # the same seeded initialisation
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    weights = state["model"]
    for i in range(3):
        key = f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"
        assert torch.equal(weights[f"backbone.{key}"], initial[key]) == (i in frozen)
    block = build_backbone(cfg.backbone).visual.transformer.resblocks[0]
    block_tensors, block_numel = len(list(block.parameters())), sum(p.numel() for p in block.parameters())
    assert summary["trainable_params"] == summary["params"] - 2 * block_numel
    in_optimizer = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert in_optimizer == len(weights) - 2 * block_tensors  # the model has no buffers
    # FLOPs: the frozen blocks' backward is C (activation gradients), the rest 2C
    flops = summary["flops"]
    assert flops["frozen_forward_per_step"] > 0
    assert (
        flops["backward_per_step"]
        == 2 * (flops["forward_per_step"] - flops["frozen_forward_per_step"])
        + (flops["frozen_forward_per_step"])
    )

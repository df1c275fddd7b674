"""DenseCLIP stage: CoOp context, frozen text tower, 0.1x image-encoder lr, gamma residual; mIoU."""

from __future__ import annotations

import pytest
import torch

from pipeline.finetune.common import FinetuneOptimConfig, FinetuneTrainConfig, build_optimizer
from pipeline.finetune.datasets import DataConfig
from pipeline.finetune.denseclip import (
    DenseCLIPConfig,
    DenseCLIPHeadConfig,
    DenseCLIPModel,
    prompt_tokens,
    run_stage,
)
from pipeline.finetune.text import TextTower, build_tokenizer, class_text_embeddings
from pipeline.model.backbone import BackboneConfig, build_backbone, build_clip_model


def test_denseclip_stage_trains_context_and_image_encoder_but_not_the_text_tower(tmp_path, debug_checkpoint):
    cfg = DenseCLIPConfig(
        backbone=BackboneConfig(checkpoint=debug_checkpoint),
        head=DenseCLIPHeadConfig(n_ctx=2, channels=16, context_width=16),
        data=DataConfig(num_train=8, num_val=4),
        train=FinetuneTrainConfig(steps=4, batch_size=4, eval_batch_size=4, log_every=1),
    )
    summary = run_stage(cfg, tmp_path / "run")
    assert 0 <= summary["metrics"]["mIoU"] <= 100 and summary["primary_metric"] == "mIoU"
    state = torch.load(summary["final_checkpoint"], weights_only=True)["model"]
    start = torch.load(debug_checkpoint, weights_only=True)
    assert torch.equal(state["text.token_embedding.weight"], start["token_embedding.weight"])
    assert not torch.equal(state["backbone.visual.conv1.weight"], start["visual.conv1.weight"])
    assert state["gamma"].abs().max() < 0.01  # starts at 1e-4 and moves by lr-sized steps


def test_image_encoder_learns_at_a_tenth_and_gamma_starts_at_1e_4(debug_checkpoint):
    bcfg = BackboneConfig(checkpoint=debug_checkpoint)
    clip = build_clip_model(bcfg)
    tokens = prompt_tokens(build_tokenizer("debug", clip), ["circle", "sky"], 3)
    model = DenseCLIPModel(
        build_backbone(bcfg, visual=clip.visual),
        TextTower(clip),
        tokens,
        DenseCLIPHeadConfig(n_ctx=3),
        num_classes=2,
    )
    assert torch.allclose(model.gamma, torch.full_like(model.gamma, 1e-4))
    opt = build_optimizer(model, FinetuneOptimConfig(lr=1.0, backbone_lr_mult=0.1))
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale[id(model.backbone.visual.conv1.weight)] == pytest.approx(0.1)
    assert scale[id(model.ctx)] == pytest.approx(1.0)
    assert id(model.text.token_embedding.weight) not in scale  # frozen text tower: not optimised


def test_text_tower_from_embeddings_matches_encode_text(debug_checkpoint):
    clip = build_clip_model(BackboneConfig(checkpoint=debug_checkpoint)).eval()
    tokenizer = build_tokenizer("debug", clip)
    tokens = tokenizer(["a photo of a circle.", "a photo of the sky."])
    tower = TextTower(clip)
    with torch.no_grad():
        ours = tower(tower.embed(tokens), tokens)
        ref = clip.encode_text(tokens)
    assert torch.allclose(ours, ref, atol=1e-5)
    emb = class_text_embeddings(clip, tokenizer, ["circle", "sky"], ["a photo of a {}."])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))

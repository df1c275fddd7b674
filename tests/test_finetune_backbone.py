"""The fine-tuning image encoder (loading, dense outputs, drop-path, layer ids) and the shared loop pieces."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.finetune.common import (
    FinetuneOptimConfig,
    ScheduleConfig,
    StepBatchSampler,
    lr_factor,
    param_groups,
)
from pipeline.model.backbone import BackboneConfig, build_backbone, build_clip_model, default_out_indices


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return open_clip.create_model("debug").eval()


def test_backbone_loads_full_clip_tower_only_and_safetensors_checkpoints_alike(tmp_path, clip_model):
    x = torch.randn(2, 3, 64, 64)
    expected = clip_model.visual(x)
    full = tmp_path / "full.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in clip_model.state_dict().items()}}, full)
    tower = tmp_path / "visual.pt"
    torch.save(clip_model.visual.state_dict(), tower)
    st = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in clip_model.visual.state_dict().items()}, str(st))
    for path in (full, tower, st):
        backbone = build_backbone(BackboneConfig(model="debug", checkpoint=str(path))).eval()
        assert torch.allclose(backbone.forward_pooled(x), expected, atol=1e-5), path.name


def test_random_init_differs_from_checkpoint_and_is_seeded(clip_model):
    a = build_backbone(BackboneConfig(seed=1)).eval()
    b = build_backbone(BackboneConfig(seed=1)).eval()
    c = build_backbone(BackboneConfig(seed=2)).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a.forward_pooled(x), b.forward_pooled(x))
    assert not torch.allclose(a.forward_pooled(x), c.forward_pooled(x))


def test_checkpoint_of_another_architecture_is_rejected_naming_the_field(tmp_path):
    other = open_clip.create_model("debug", force_image_size=64)
    state = {k: v for k, v in other.visual.state_dict().items() if "resblocks.2" not in k}
    path = tmp_path / "short.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="checkpoint"):
        build_backbone(BackboneConfig(checkpoint=str(path)))


def test_dense_outputs_have_the_grid_shape_and_match_the_pooled_path(clip_model, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(clip_model.state_dict(), path)
    backbone = build_backbone(BackboneConfig(checkpoint=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    out = backbone.forward_all(x)
    assert [tuple(f.shape) for f in out["features"]] == [(2, backbone.width, 8, 8)] * 4
    assert tuple(out["dense"].shape) == (2, backbone.embed_dim, 8, 8)
    assert torch.allclose(out["pooled"], clip_model.visual(x), atol=1e-5)
    # the last feature map is the last block's output, before ln_post
    last = backbone.forward_features(x)[-1]
    assert torch.allclose(last, out["features"][-1])


def test_position_embeddings_are_interpolated_for_another_resolution(clip_model, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(clip_model.state_dict(), path)
    backbone = build_backbone(BackboneConfig(checkpoint=str(path), image_size=96))
    assert backbone.visual.positional_embedding.shape[0] == 12 * 12 + 1
    assert tuple(backbone.forward_dense(torch.randn(1, 3, 96, 96)).shape[-2:]) == (12, 12)
    clip = build_clip_model(BackboneConfig(checkpoint=str(path), image_size=96))
    assert torch.equal(clip.token_embedding.weight, clip_model.token_embedding.weight)


def test_drop_path_is_random_in_training_and_off_in_eval():
    x = torch.randn(4, 3, 64, 64)
    plain = build_backbone(BackboneConfig(seed=0)).eval()
    dropped = build_backbone(BackboneConfig(seed=0, drop_path_rate=0.5))
    dropped.train()
    torch.manual_seed(0)
    a = dropped.forward_pooled(x)
    torch.manual_seed(1)
    b = dropped.forward_pooled(x)
    assert not torch.allclose(a, b)
    dropped.eval()
    assert torch.allclose(dropped.forward_pooled(x), plain.forward_pooled(x))
    assert set(dropped.state_dict()) == set(plain.state_dict())  # hooks, not new modules


def test_layer_ids_and_layer_wise_lr_decay():
    backbone = build_backbone(BackboneConfig())
    assert backbone.layer_id("visual.conv1.weight") == 0
    assert backbone.layer_id("visual.transformer.resblocks.1.mlp.c_fc.weight") == 2
    assert backbone.layer_id("visual.proj") == backbone.num_layers + 1
    model = nn.Module()
    model.backbone = backbone
    model.head = nn.Linear(4, 2)
    groups = param_groups(model, FinetuneOptimConfig(lr=1.0, layer_decay=0.5, backbone_lr_mult=0.1))
    by_id = {}
    for g in groups:
        by_id.setdefault(g["layer_id"], set()).add(round(g["lr_scale"], 12))
    L = backbone.num_layers
    head_scales = {g["lr_scale"] for g in groups if any(p is model.head.weight for p in g["params"])}
    assert head_scales == {1.0}
    assert by_id[0] == {round(0.5 ** (L + 1) * 0.1, 12)}
    assert by_id[L] == {round(0.5 * 0.1, 12)}
    no_decay = [g for g in groups if any(p is model.head.bias for p in g["params"])]
    assert no_decay[0]["weight_decay"] == 0.0
    assert default_out_indices(12) == (2, 5, 8, 11)


def test_schedules_warm_up_then_follow_their_shape():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(99, 100, cfg) == pytest.approx(0.1)
    poly = ScheduleConfig(name="poly", poly_power=2.0)
    assert lr_factor(50, 101, poly) == pytest.approx(0.25)
    step = ScheduleConfig(name="step", milestones=(5, 8), gamma=0.1)
    assert [round(lr_factor(s, 10, step), 6) for s in (4, 5, 8)] == [1.0, 0.1, 0.01]
    assert lr_factor(50, 100, ScheduleConfig(name="linear")) == pytest.approx(1 - 50 / 99)
    assert lr_factor(99, 100, ScheduleConfig(name="const")) == 1.0
    assert math.isclose(lr_factor(0, 10, ScheduleConfig(name="const", warmup_steps=4)), 0.25)


def test_batches_are_a_pure_function_of_seed_and_step():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, end_step=6))
    resumed = list(StepBatchSampler(10, 4, seed=3, start_step=4, end_step=6))
    assert resumed == full[4:]
    epoch0 = [i for batch in full for i, _ in batch][:10]
    assert sorted(epoch0) == list(range(10))


def test_a_pretraining_export_folder_loads_with_its_own_architecture(tmp_path, clip_model):
    from pipeline.model.clip import ModelConfig
    from pipeline.train.export import export_open_clip

    out = export_open_clip(
        clip_model.state_dict(), ModelConfig(name="debug"), {"size": 64}, tmp_path / "export"
    )
    x = torch.randn(1, 3, 64, 64)
    # the folder's open_clip_config.json decides the architecture, whatever backbone.model says
    backbone = build_backbone(BackboneConfig(model="ViT-B-16", checkpoint=str(out))).eval()
    assert torch.allclose(backbone.forward_pooled(x), clip_model.visual(x), atol=1e-5)
    clip = build_clip_model(BackboneConfig(model="ViT-B-16", checkpoint=str(out)))
    assert torch.equal(clip.text_projection, clip_model.text_projection)

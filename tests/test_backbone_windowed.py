"""ViT backbone: relative position bias (shared / per block, off by default) and ViTDet windowed attention."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from numerics import assert_as_accurate_as_fp32

from pipeline.model.backbone import (
    BackboneConfig,
    BiasedSelfAttention,
    RelativePositionBias,
    ViTBackbone,
    build_backbone,
    build_visual,
    install_rel_pos_bias,
    window_partition,
    window_unpartition,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def biased_tower(kind: str = "shared", seed: int = 0) -> torch.nn.Module:
    """The debug tower (8 x 8 patches) with a random (not zero) relative position bias."""
    visual = install_rel_pos_bias(build_visual(BackboneConfig(seed=seed)), kind, (8, 8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if "rel_pos_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return visual.eval()


def last_map(
    visual: torch.nn.Module, x: torch.Tensor, window: int, global_blocks: tuple[int, ...]
) -> torch.Tensor:
    return ViTBackbone(visual, (-1,), window_size=window, global_blocks=global_blocks)(x)[-1]


def test_windowed_attention_equals_global_when_the_window_covers_the_image():
    visual = biased_tower()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    every_block = (0, 1, 2)
    with torch.no_grad():
        reference = last_map(copy.deepcopy(visual).double(), x.double(), 8, every_block)
        global_fp32 = last_map(visual, x, 8, every_block)
        for window in (8, 14):  # the grid exactly, and a ViTDet-size window larger than the 8 x 8 grid
            windowed = last_map(visual, x, window, (2,))
            assert_as_accurate_as_fp32(f"window {window}", windowed, global_fp32, reference)


def test_windowed_attention_differs_from_global_when_the_window_does_not_cover_the_image():
    visual = biased_tower()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = last_map(copy.deepcopy(visual).double(), x.double(), 8, (0, 1, 2))
        global_fp32 = last_map(visual, x, 8, (0, 1, 2))
        for window in (4, 3):  # 2 x 2 windows; 3 x 3 windows over a grid padded from 8 to 9
            windowed = last_map(visual, x, window, (2,))
            with pytest.raises(AssertionError):
                assert_as_accurate_as_fp32(f"window {window}", windowed, global_fp32, reference)


def test_windowed_block_sees_only_its_window_and_never_the_padding():
    visual = biased_tower()
    backbone = ViTBackbone(visual, (0,), window_size=3, global_blocks=(2,))  # block 0 is windowed
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[..., :8, :8] += 1.0  # patch (0, 0): inside window (0, 0), which holds patches rows/cols 0-2
    with torch.no_grad():
        a, b = backbone(x)[0][0], backbone(changed)[0][0]
    moved = (a - b).abs().amax(0) > 0
    assert moved[:3, :3].all() and not moved[3:].any() and not moved[:, 3:].any()
    tokens = torch.arange(2 * 64 * 5, dtype=torch.float32).view(2, 64, 5)  # partition round trip with padding
    windows, n = window_partition(tokens, (8, 8), (3, 3))
    assert n == 9 and windows.shape == (18, 9, 5)
    assert torch.equal(window_unpartition(windows, (8, 8), (3, 3)), tokens)


def test_relative_position_bias_is_off_by_default_and_round_trips_through_a_checkpoint(tmp_path):
    plain = build_backbone(BackboneConfig())
    assert not any(isinstance(b.attn, BiasedSelfAttention) for b in plain.visual.transformer.resblocks)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for kind in ("shared", "block"):
        visual = biased_tower(kind)
        path = tmp_path / f"{kind}.pt"
        torch.save(visual.state_dict(), path)
        loaded = build_backbone(BackboneConfig(checkpoint=str(path)))
        with torch.no_grad():
            got, want = loaded.forward_dense(x), ViTBackbone(visual).forward_dense(x)
            assert torch.equal(got, want)
            # open_clip's own forward (CLIP.encode_image) adds the bias too: the pooled embedding agrees
            assert torch.allclose(loaded.visual(x), loaded.forward_pooled(x), atol=1e-6)
            assert not torch.allclose(plain.forward_dense(x), want, atol=1e-3)
    assert "rel_pos_bias.embedding" in biased_tower("shared").state_dict()
    assert "transformer.resblocks.2.attn.rel_pos_bias.embedding" in biased_tower("block").state_dict()


def test_relative_position_table_interpolates_keeping_the_zero_offset_and_the_corners():
    rpb = RelativePositionBias(2, (4, 4))
    with torch.no_grad():
        rpb.embedding.copy_(torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(4)))
    same = rpb((4, 4), with_cls=False)
    assert torch.equal(same[:, 5, 5], rpb.embedding[:, 3, 3])  # offset 0 is the centre of the table
    assert torch.equal(same[:, 15, 0], rpb.embedding[:, 6, 6])  # offset (+3, +3)
    bigger = rpb((7, 7), with_cls=True)
    assert bigger.shape == (2, 50, 50)
    assert torch.allclose(bigger[:, 1, 1], rpb.embedding[:, 3, 3])  # offset 0 after the class token
    assert torch.allclose(bigger[:, 49, 1], rpb.embedding[:, 6, 6])  # the largest offset stays the corner
    assert torch.equal(bigger[:, 0, 1:], rpb.cls_embedding[:, 0, None].expand(2, 49))


def test_windowed_detection_backbone_interpolates_positions_and_trains_at_a_larger_input():
    backbone = build_backbone(BackboneConfig(image_size=96, window_size=4, global_blocks=(-1,)))
    assert backbone.global_blocks == (2,)
    sizes = [b.attn.rel_pos_bias.embedding.shape[-2:] for b in backbone.visual.transformer.resblocks]
    assert sizes == [(7, 7), (7, 7), (23, 23)]  # zero-initialised: windows of 4, the global 12 x 12 grid
    maps = backbone.train()(torch.randn(2, 3, 96, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 12, 12)] * 4
    maps[-1].sum().backward()
    assert backbone.visual.transformer.resblocks[0].attn.rel_pos_bias.embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="window_size"):
        backbone.forward_pooled(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="global_blocks"):
        build_backbone(BackboneConfig(window_size=4, global_blocks=(5,)))


def test_detection_stage_defaults_to_vitdet_windows_and_trains(tmp_path, debug_checkpoint):
    from pipeline.finetune.common import FinetuneTrainConfig
    from pipeline.finetune.datasets import DataConfig
    from pipeline.finetune.detection import DetectionConfig, DetHeadConfig, run_stage

    default = DetectionConfig().backbone
    assert (default.window_size, default.global_blocks) == (
        14,
        (),
    )  # ViTDet: 14 x 14 windows, 4 global blocks
    cfg = DetectionConfig(
        backbone=dataclasses.replace(default, checkpoint=debug_checkpoint),
        head=DetHeadConfig(fpn_channels=8, box_head_dim=16, mask_head_channels=8, detections_per_img=5),
        data=DataConfig(num_train=4, num_val=2),
        train=FinetuneTrainConfig(steps=2, batch_size=2, eval_batch_size=2, log_every=1),
    )
    summary = run_stage(cfg, tmp_path / "det")
    assert summary["steps"] == 2 and 0.0 <= summary["metrics"]["bbox_AP"] <= 1.0
    assert summary["flops"]["backward_per_step"] == 2 * summary["flops"]["forward_per_step"]

"""Average attention distance: known answers on hand-built weights, and hooks that match torch's own weights."""

from __future__ import annotations

import numpy as np
import open_clip
import torch

from pipeline.model.backbone import install_rel_pos_bias
from pipeline.report.attention import (
    _attention_weights,
    _grid_distances,
    attention_statistics,
    average_attention_distance,
    distance_from_weights,
    plot_attention_distance,
    plot_attention_maps,
    uniform_distance,
)


def test_attention_to_self_only_has_zero_distance():
    n = 16
    attn = torch.zeros(2, 3, n + 1, n + 1)
    attn[:, :, torch.arange(n + 1), torch.arange(n + 1)] = 1.0
    assert torch.allclose(distance_from_weights(attn, (4, 4), 16), torch.zeros(3, dtype=torch.float64))


def test_uniform_attention_gives_the_mean_pairwise_patch_distance():
    grid, patch = (3, 3), 8
    attn = torch.full((1, 2, 10, 10), 1 / 10)
    expected = np.mean(
        [
            np.hypot(y1 - y2, x1 - x2) * patch
            for y1 in range(3)
            for x1 in range(3)
            for y2 in range(3)
            for x2 in range(3)
        ]
    )
    got = distance_from_weights(attn, grid, patch)
    assert np.allclose(got.numpy(), expected)
    assert np.isclose(uniform_distance(grid, patch), expected)


def test_attention_to_the_right_neighbour_is_one_patch_away_and_cls_weight_is_ignored():
    grid, patch = (1, 4), 16
    attn = torch.zeros(1, 1, 5, 5)
    for q in range(1, 5):
        attn[0, 0, q, 0] = 0.5  # CLS key: dropped, the rest renormalised
        attn[0, 0, q, min(q + 1, 4) if q < 4 else 3] = 0.5
    assert np.isclose(distance_from_weights(attn, grid, patch).item(), 16.0)


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=3, width=64, head_width=16, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
    )
    return model.visual


def test_distances_from_a_real_vit_are_per_layer_and_head_and_within_the_image():
    visual = _tiny_vit()
    images = torch.randn(5, 3, 32, 32)
    dist = average_attention_distance(visual, images, batch_size=2)
    assert dist.shape == (3, 4)
    max_dist = np.hypot(3, 3) * 8
    assert np.all(dist > 0) and np.all(dist <= max_dist)
    # Batching must not change the answer.
    assert np.allclose(dist, average_attention_distance(visual, images, batch_size=5))


def test_captured_weights_match_torch_multihead_attention_weights():
    visual = _tiny_vit()
    block = visual.transformer.resblocks[0]
    x = torch.randn(2, 17, 64)
    q = block.ln_1(x)
    _, ref = torch.nn.functional.multi_head_attention_forward(
        q.transpose(0, 1),
        q.transpose(0, 1),
        q.transpose(0, 1),
        64,
        4,
        block.attn.in_proj_weight,
        block.attn.in_proj_bias,
        None,
        None,
        False,
        0.0,
        block.attn.out_proj.weight,
        block.attn.out_proj.bias,
        need_weights=True,
        average_attn_weights=False,
    )
    from pipeline.report.attention import _attention_weights

    assert torch.allclose(_attention_weights(block, x), ref, atol=1e-6)


def test_plot_is_written_as_png(tmp_path):
    path = plot_attention_distance({"a": np.ones((3, 4)), "b": np.full((3, 4), 2.0)}, tmp_path / "d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_average_attention_maps_are_row_stochastic_and_give_back_the_mean_distance():
    visual = _tiny_vit()
    images = torch.randn(4, 3, 32, 32)
    dist, maps = attention_statistics(visual, images, batch_size=3)
    assert maps.shape == (3, 16, 16)
    assert np.allclose(maps.sum(-1), 1.0, atol=1e-12)
    # distance is linear in the weights: the head-mean distance is the map's distance-weighted row mean
    d = _grid_distances((4, 4), 8).numpy()
    assert np.allclose(dist.mean(1), (maps * d).sum(-1).mean(-1), rtol=1e-10)


def test_side_by_side_distance_plot_and_attention_map_grid_are_written_as_png(tmp_path):
    dist = {"teacher": np.ones((3, 4)), "FD student": np.full((3, 4), 2.0)}
    path = plot_attention_distance(dist, tmp_path / "d.png", side_by_side=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    maps = {"teacher": np.eye(16)[None].repeat(3, 0), "FD student": np.full((3, 16, 16), 1 / 16)}
    path = plot_attention_maps(maps, tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_of_a_block_with_a_relative_position_bias_reproduce_its_attention_output():
    visual = _tiny_vit()
    install_rel_pos_bias(visual, "shared", (4, 4))
    with torch.no_grad():
        for p in visual.rel_pos_bias.parameters():
            p.normal_()  # a non-zero bias, so leaving it out would show
    block = visual.transformer.resblocks[1]
    x = torch.randn(2, 17, 64)
    w = _attention_weights(block, x)
    q = block.ln_1(x)
    attn = block.attn
    v = torch.nn.functional.linear(q, attn.in_proj_weight, attn.in_proj_bias)[..., 128:]
    v = v.view(2, 17, 4, 16).transpose(1, 2)
    expected = attn.out_proj((w @ v).transpose(1, 2).reshape(2, 17, 64))
    assert torch.allclose(attn(q, q, q)[0], expected, atol=1e-5)

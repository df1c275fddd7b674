"""Attention weights of an FD-CLIP student (a tower with a relative position bias) include the bias."""

from __future__ import annotations

import open_clip
import torch

from pipeline.model.backbone import install_rel_pos_bias
from pipeline.report.attention import _attention_weights


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

"""A small, dedicated CoCa training entry: a captioner trained on the synthetic world's precise captions.

This is the first half of the DataCompDR recipe in miniature (see :mod:`pipeline.caption.loop`): train a CoCa
on clean captions, then caption the noisy web data with it. The model is an open_clip ``CoCa`` with a compact
vocabulary (only the BPE tokens that occur in the training captions, so the output layer is tiny and a few
hundred CPU steps suffice); the checkpoint carries its ``model_cfg`` and ``vocab_ids`` so
:class:`~pipeline.caption.captioners.CocaCaptioner` (and ``python -m data_prep.caption``) load it directly.

    ckpt = train_coca(TrainCocaConfig(steps=250), out="runs/coca_world.pt")
    # command line: python -m data_prep.train_coca --steps=250 --out=runs/coca_world.pt
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pipeline.caption.captioners import build_coca
from pipeline.caption.decode import EOS_TOKEN_ID, SOT_TOKEN_ID
from pipeline.data import synthworld as sw
from pipeline.train.optim import OptimConfig, build_optimizer, lr_at, param_groups, set_lr

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def loop_world() -> sw.WorldConfig:
    """Big single objects on plain backgrounds: shape is learnable in a couple of hundred CPU steps."""
    return sw.WorldConfig(
        num_shapes=4,
        num_colours=2,
        num_sizes=1,
        max_things=1,
        num_stuff_classes=2,
        min_radius=0.2,
        max_radius=0.3,
        noise_std=0.0,
        haze=0.0,
    )


@dataclass(frozen=True)
class TrainCocaConfig:
    """World, model size and optimisation of the small CoCa."""

    world: sw.WorldConfig = field(default_factory=loop_world)
    """The synthetic world the captions describe (default: one big object of 4 shapes x 2 colours, 64 px)."""
    num_scenes: int = 2000
    """Training scenes (world split ``train``), generated in memory."""
    caption: Literal["first_sentence", "full"] = "first_sentence"
    """Train on the precise caption's first sentence (objects + background) or the whole caption."""
    steps: int = 250
    """Optimiser steps."""
    batch_size: int = 64
    """Scenes per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    warmup_steps: int = 20
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    caption_loss_weight: float = 2.0
    """Weight of the captioning (next-token) loss, as in CoCa."""
    clip_loss_weight: float = 1.0
    """Weight of the contrastive loss."""
    width: int = 64
    """Width of every tower."""
    layers: int = 2
    """Layers of every tower."""
    heads: int = 4
    """Attention heads of every tower."""
    patch_size: int = 16
    """Vision patch size in pixels."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""

    def __post_init__(self) -> None:
        for name in ("num_scenes", "steps", "batch_size", "width", "layers", "heads", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"heads: must divide width={self.width}, got {self.heads}")
        if self.world.image_size % self.patch_size:
            raise ValueError(f"patch_size: must divide world.image_size={self.world.image_size}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


def training_caption(scene: sw.Scene, mode: str) -> str:
    text = scene.precise_caption
    if mode == "first_sentence":
        text = text.split(". ")[0].rstrip(".") + "."
    return text


def build_vocab(texts: Sequence[str]) -> list[int]:
    """Compact vocabulary: id 0 = padding (BPE 0), then every BPE id of ``texts``, then start, end."""
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()
    used: set[int] = set()
    for t in texts:
        used.update(tok.encode(t))
    used -= {0, SOT_TOKEN_ID, EOS_TOKEN_ID}
    return [0, *sorted(used), SOT_TOKEN_ID, EOS_TOKEN_ID]


def encode_texts(texts: Sequence[str], vocab_ids: Sequence[int], context_length: int) -> torch.Tensor:
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()
    to_compact = {bpe: i for i, bpe in enumerate(vocab_ids)}
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [SOT_TOKEN_ID, *tok.encode(t)][: context_length - 1] + [EOS_TOKEN_ID]
        out[i, : len(ids)] = torch.tensor([to_compact[x] for x in ids])
    return out


def coca_cfg_for(cfg: TrainCocaConfig, vocab_size: int, context_length: int) -> dict[str, Any]:
    w, n, h = cfg.width, cfg.layers, cfg.heads
    return {
        "embed_dim": w,
        "vision_cfg": {
            "image_size": cfg.world.image_size,
            "layers": n,
            "width": w,
            "head_width": w // h,
            "patch_size": cfg.patch_size,
            "attentional_pool": True,
            "attn_pooler_queries": 16,
            "attn_pooler_heads": h,
            "output_tokens": True,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": w,
            "heads": h,
            "layers": n,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": w,
            "heads": h,
            "layers": n,
            "attn_pooler_heads": h,
        },
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> normalised float NCHW (what open_clip's eval transform gives at native size)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train_coca(cfg: TrainCocaConfig, out: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and save ``{"state_dict", "model_cfg", "vocab_ids", "train"}`` to ``out``; returns a summary."""
    from open_clip.loss import CoCaLoss

    from pipeline import io

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    scenes = [sw.make_scene(cfg.world, i, "train") for i in range(cfg.num_scenes)]
    texts = [training_caption(s, cfg.caption) for s in scenes]
    vocab_ids = build_vocab(texts)
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()
    context_length = min(max(len(tok.encode(t)) for t in texts) + 2, 76)
    tokens = encode_texts(texts, vocab_ids, context_length)
    images = images_to_tensor([s.image for s in scenes])
    model_cfg = coca_cfg_for(cfg, len(vocab_ids), context_length)
    model = build_coca(model_cfg, cfg.seed).train()
    loss_fn = CoCaLoss(
        caption_loss_weight=cfg.caption_loss_weight, clip_loss_weight=cfg.clip_loss_weight, pad_id=0
    )
    optim = OptimConfig(  # the training toolkit's groups (no decay on norms, biases, embeddings) and schedule
        lr=cfg.lr,
        min_lr=0.0,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        beta1=0.9,
        beta2=0.98,
        eps=1e-8,
        grad_clip_norm=1.0,
    )
    opt = build_optimizer(param_groups(model, optim.weight_decay), optim)

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(cfg.num_scenes, generator=gen)
    pos = 0
    history = []
    for step in range(cfg.steps):
        if pos + cfg.batch_size > cfg.num_scenes:
            order, pos = torch.randperm(cfg.num_scenes, generator=gen), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        set_lr(opt, lr_at(step, optim, cfg.steps))
        out_dict = model(images[idx], tokens[idx])
        clip_loss, caption_loss = loss_fn(**out_dict)
        loss = clip_loss + caption_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip_norm)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "caption_loss": round(caption_loss.item(), 4),
                    "clip_loss": round(clip_loss.item(), 4),
                }
            )
            log(
                f"train_coca: step {step} loss {loss.item():.3f} (caption {caption_loss.item():.3f}, "
                f"clip {clip_loss.item():.3f})"
            )
    model.eval()
    summary = {
        "steps": cfg.steps,
        "seconds": round(time.time() - t0, 2),
        "history": history,
        "vocab_size": len(vocab_ids),
        "context_length": context_length,
    }
    state = {
        "state_dict": model.state_dict(),
        "model_cfg": model_cfg,
        "vocab_ids": vocab_ids,
        "train": summary,
    }
    with io.atomic_write(out, "wb") as f:
        torch.save(state, f)
    return summary

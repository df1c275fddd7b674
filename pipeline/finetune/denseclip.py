"""Language-guided semantic segmentation (DenseCLIP, Rao et al. 2022): pixel-text score maps; mIoU.

    summary = run_stage(DenseCLIPConfig(), "runs/denseclip")        # synthetic world, debug CLIP
    python -m jobs.finetune --stage denseclip --preset ade20k --data.root=/data/ade --backbone.checkpoint=...

* Text: each class prompt is ``[ctx_1 .. ctx_n] <class name>.`` with ``n_ctx`` learnable context vectors
  shared by all classes (CoOp), run through the *frozen* CLIP text tower.
* Context-aware prompting (DenseCLIP's post-model prompting): a small transformer decoder lets the class
  embeddings attend to the image's (projected) visual tokens; the result is added with a learnable
  per-channel residual coefficient ``gamma`` initialised at 1e-4.
* Score maps: cosine similarity of every patch embedding (``ln_post`` + projection of the patch tokens)
  with every class embedding, B x K x h x w. They are concatenated to the coarsest pyramid level of a
  Semantic FPN (or UperNet) decoder fed with four block outputs, and also trained directly as a
  segmentation (cross-entropy on score / tau, DenseCLIP's auxiliary loss).
* The image encoder learns at ``optim.backbone_lr_mult`` (0.1) times the head lr.

Evaluation: mIoU / mAcc / aAcc of the decoder's prediction from a confusion matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.finetune.common import (
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    ScheduleConfig,
    StageSpec,
    fit,
    seed_everything,
)
from pipeline.finetune.datasets import IGNORE_INDEX, DataConfig, build_datasets, collate, upsample_logits
from pipeline.finetune.segmentation import evaluate_segmentation
from pipeline.finetune.text import TextTower, build_tokenizer
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone, build_clip_model
from pipeline.model.heads import SemanticFPNHead, UperNetHead, ViTMultiScaleNeck, pyramid_scales


@dataclass(frozen=True)
class DenseCLIPHeadConfig:
    n_ctx: int = 4
    """Learnable context tokens before each class name (DenseCLIP: 8)."""
    decoder: Literal["semfpn", "upernet"] = "semfpn"
    """Segmentation decoder on the pyramid + score maps (DenseCLIP: Semantic FPN)."""
    channels: int = 32
    """Decoder width (DenseCLIP: 256)."""
    context_layers: int = 1
    """Layers of the context decoder (DenseCLIP: 3)."""
    context_width: int = 32
    """Width of the context decoder (DenseCLIP: 256)."""
    gamma_init: float = 1e-4
    """Initial value of the learnable residual coefficient of the context-aware text embeddings."""
    tau: float = 0.07
    """Temperature of the score maps in the auxiliary loss."""
    aux_weight: float = 1.0
    """Weight of the auxiliary segmentation loss on the score maps."""

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx: must be >= 1, got {self.n_ctx}")
        if self.tau <= 0:
            raise ValueError(f"tau: must be > 0, got {self.tau}")


@dataclass(frozen=True)
class DenseCLIPConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(drop_path_rate=0.1))
    """Whole CLIP: image encoder (fine-tuned) and text tower (frozen)."""
    head: DenseCLIPHeadConfig = field(default_factory=DenseCLIPHeadConfig)
    """Prompt context, context decoder, segmentation decoder, losses."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples (synthetic world by default; ``source = "ade20k"`` for ADE20K folders)."""
    optim: FinetuneOptimConfig = field(
        default_factory=lambda: FinetuneOptimConfig(lr=1e-3, weight_decay=1e-4, backbone_lr_mult=0.1)
    )
    """AdamW; the image encoder at ``backbone_lr_mult`` x lr (DenseCLIP: 0.1)."""
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(name="poly", warmup_steps=5, poly_power=0.9)
    )
    """Learning-rate schedule."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Steps, batch size, logging, checkpoints, seed."""


class ContextDecoder(nn.Module):
    """Text queries attend to visual tokens (pre-norm self-attention, cross-attention, MLP) -> D-dim update."""

    def __init__(self, dim: int, width: int, layers: int, heads: int = 4) -> None:
        super().__init__()
        heads = max(1, min(heads, width // 8))
        self.memory_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out_proj(x)


class DenseCLIPModel(nn.Module):
    def __init__(
        self,
        backbone: ViTBackbone,
        text: TextTower,
        tokens: torch.Tensor,
        head: DenseCLIPHeadConfig,
        num_classes: int,
    ) -> None:
        super().__init__()
        if len(backbone.out_indices) != 4:
            raise ValueError("backbone.out_indices: DenseCLIP's decoder needs four feature blocks")
        self.backbone = backbone
        self.text = text.requires_grad_(False)
        self.register_buffer("tokens", tokens)
        width = text.token_embedding.weight.shape[1]
        self.ctx = nn.Parameter(torch.randn(head.n_ctx, width) * 0.02)
        dim = backbone.embed_dim
        self.context_decoder = ContextDecoder(dim, head.context_width, head.context_layers)
        self.gamma = nn.Parameter(torch.full((dim,), head.gamma_init))
        self.neck = ViTMultiScaleNeck(backbone.width, pyramid_scales(backbone.patch_size))
        channels = [backbone.width] * 4
        if head.decoder == "semfpn":
            self.decoder: nn.Module = SemanticFPNHead(
                channels, head.channels, num_classes, extra_last_channels=num_classes
            )
        else:
            self.decoder = UperNetHead(channels, head.channels, num_classes, extra_last_channels=num_classes)
        self.n_ctx = head.n_ctx

    def train(self, mode: bool = True) -> DenseCLIPModel:
        super().train(mode)
        self.text.eval()
        return self

    def class_embeddings(self) -> torch.Tensor:
        """K x D text embeddings of the prompts with the learnable context (frozen tower, grads to ctx)."""
        emb = self.text.embed(self.tokens)
        ctx = self.ctx.to(emb.dtype).expand(emb.shape[0], -1, -1)
        emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)
        return self.text(emb, self.tokens)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.backbone.forward_all(images)
        dense, pooled = out["dense"], out["pooled"]
        b, d, h, w = dense.shape
        text = self.class_embeddings()[None].expand(b, -1, -1)
        visual = torch.cat([pooled[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
        text = text + self.gamma * self.context_decoder(text, visual)
        scores = torch.einsum("bdhw,bkd->bkhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))
        pyramid = self.neck(out["features"])
        last = pyramid[-1]
        pyramid[-1] = torch.cat(
            [last, F.interpolate(scores, last.shape[-2:], mode="bilinear", align_corners=False)], 1
        )
        logits = upsample_logits(self.decoder(pyramid), images.shape[-2:])
        return {"logits": logits, "scores": scores}


def prompt_tokens(tokenizer: Any, class_names: list[str], n_ctx: int) -> torch.Tensor:
    """Token ids of ``"X X .. X <name>."`` (n_ctx placeholders right after the start token)."""
    return tokenizer([" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in class_names])


def run_stage(cfg: DenseCLIPConfig, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """DenseCLIP fine-tuning for semantic segmentation; returns (and writes) summary.json."""
    train_set, val_set = build_datasets(cfg.data, "denseclip")
    classes = train_set.vocab.semantic
    seed_everything(cfg.train.seed)
    clip = build_clip_model(cfg.backbone)
    tokens = prompt_tokens(build_tokenizer(cfg.backbone.model, clip), classes, cfg.head.n_ctx)
    model = DenseCLIPModel(
        build_backbone(cfg.backbone, visual=clip.visual), TextTower(clip), tokens, cfg.head, len(classes)
    )
    tau, aux_weight = cfg.head.tau, cfg.head.aux_weight

    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = m(batch["image"])
        seg = F.cross_entropy(out["logits"], batch["semantic"], ignore_index=IGNORE_INDEX)
        aux = F.cross_entropy(
            upsample_logits(out["scores"] / tau, batch["image"].shape[-2:]),
            batch["semantic"],
            ignore_index=IGNORE_INDEX,
        )
        return seg + aux_weight * aux, {"seg_loss": round(seg.item(), 6), "aux_loss": round(aux.item(), 6)}

    class _Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner(images)["logits"]

    def evaluate(m: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        return evaluate_segmentation(_Logits(m), batches, len(classes))

    spec = StageSpec(
        name="denseclip",
        model=model,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        loss_fn=loss_fn,
        evaluate=evaluate,
        primary_metric="mIoU",
        info={
            "classes": classes,
            "decoder": cfg.head.decoder,
            "backbone_checkpoint": cfg.backbone.checkpoint,
        },
    )
    return fit(spec, cfg, run_dir, preemption)


STAGE_CONFIG = DenseCLIPConfig

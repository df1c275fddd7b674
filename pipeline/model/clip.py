"""CLIP models by open_clip architecture name, plus the tiny ``debug`` size used by tests and CI.

    model, preprocess, tokenizer = build_clip(ModelConfig(name="debug"))
    out = model(image=images, text=tokenizer(["a red circle"]))   # dict: image_features, text_features, logit_scale

Any ``open_clip.list_models()`` name works (``ViT-B-16`` is the default; MobileCLIP towers where open_clip has
them). Our own architectures live as open_clip config files in ``pipeline/model/model_configs/`` and are
registered with open_clip when this module is imported, so ``open_clip.create_model("debug")`` works too.
Weights are random unless ``pretrained`` names a local checkpoint file or an open_clip tag (a tag downloads
from the hub, so only use one where that is allowed); nothing here downloads anything by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "ViT-B-16"
    """open_clip architecture name (``open_clip.list_models()``) or one of ours: ``debug`` (tiny, 64 px)."""
    pretrained: str = ""
    """Weights to start from: a local open_clip checkpoint file or an open_clip pretrained tag; "" = random."""
    image_size: int = 0
    """Input resolution in pixels; 0 keeps the architecture's own."""
    context_length: int = 0
    """Text context length in tokens; 0 keeps the architecture's own."""
    grad_checkpointing: bool = False
    """Recompute transformer activations in backward (less memory, ~30% more compute)."""
    patch_dropout: float = 0.0
    """Fraction of image patch tokens dropped at random in training (FLIP, arXiv 2212.00794; open_clip's
    ``vision_cfg.patch_dropout``): 0.5 embeds half the tokens, roughly halving the image tower's cost. 0 = off;
    never applied in evaluation, and exports leave it out of the model config (fine-tuning sees all tokens).
    The masks draw from the torch RNG, which checkpoints save and restore, and gradient caching replays."""
    seed: int = 0
    """Seed of the random initialisation (the same on every rank, so replicas start equal)."""

    def __post_init__(self) -> None:
        if self.name not in open_clip.list_models():
            raise ValueError(f"name: unknown architecture {self.name!r}; see open_clip.list_models()")
        if self.image_size < 0:
            raise ValueError(f"image_size: must be >= 0, got {self.image_size}")
        if self.context_length < 0:
            raise ValueError(f"context_length: must be >= 0, got {self.context_length}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout: must be in [0, 1), got {self.patch_dropout}")


def open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` dict this config builds (image size / context length / patch dropout applied)."""
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:  # pragma: no cover - ModelConfig validated the name
        raise ValueError(f"name: unknown architecture {cfg.name!r}")
    if cfg.image_size:
        model_cfg["vision_cfg"]["image_size"] = cfg.image_size
    if cfg.context_length:
        model_cfg["text_cfg"]["context_length"] = cfg.context_length
    if cfg.patch_dropout:
        model_cfg["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    return model_cfg


def build_clip(cfg: ModelConfig) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """``(model, preprocess_cfg, tokenizer)``: an fp32 CPU open_clip model returning dicts, its image
    preprocessing parameters (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``) and tokenizer."""
    pretrained = cfg.pretrained or None
    if pretrained and not Path(pretrained).is_file() and "/" in pretrained:
        raise ValueError(f"pretrained: no checkpoint file at {pretrained!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(
            cfg.name,
            pretrained=pretrained,
            force_image_size=cfg.image_size or None,
            force_context_length=cfg.context_length or None,
            force_patch_dropout=cfg.patch_dropout or None,
            output_dict=True,
            # A 1-element logit scale: DeepSpeed's parameter broadcast cannot handle 0-dim tensors.
            # open_clip's checkpoint loader reshapes between the two forms.
            nonscalar_logit_scale=True,
        )
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    context_length = open_clip_config(cfg)["text_cfg"].get("context_length", 77)
    tokenizer = open_clip.get_tokenizer(cfg.name, context_length=context_length)
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    return model, preprocess, tokenizer


def describe(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the towers, for logs and summaries."""
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters()) if hasattr(model, "visual") else 0
    return {"params": total, "params_visual": visual, "params_text": total - visual}

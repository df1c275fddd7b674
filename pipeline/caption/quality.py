"""Optional caption-quality filter: score each caption against its image with a CLIP model, keep the best.

    scorer = build_scorer(QualityConfig(enabled=True, keep_top_k=5), captioner)
    scores = scorer.score(images, pixels, captions)          # cosine similarity per caption
    kept, kept_scores = filter_captions(captions, scores, cfg)

The scoring model is either the captioner's own CoCa (its contrastive towers, ``model = "captioner"``: no
second model, the captioner's pixels are reused) or any open_clip architecture with local / tagged weights.
Kept captions are ordered best first; the caption job stores their scores (``syn_clip_scores``) next to them
in ``syn.json`` and, for merged shards, in the sample's ``json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class QualityConfig:
    """CLIP-score filter over generated captions (off by default)."""

    enabled: bool = False
    """Score captions and filter them."""
    model: str = "captioner"
    """captioner: the CoCa captioner's own contrastive towers; else an open_clip architecture name."""
    checkpoint: str = ""
    """Local open_clip checkpoint file for ``model`` (when it is not the captioner)."""
    pretrained: str = ""
    """open_clip pretrained tag for ``model`` (downloads: only with network)."""
    keep_top_k: int = 0
    """Keep the best K captions of each image; 0 keeps every caption that passes min_score."""
    min_score: float = -1.0
    """Drop captions whose image-text cosine similarity is below this (-1 keeps all)."""
    min_keep: int = 1
    """Keep at least this many (the best) captions per image even when they all fall below min_score."""
    batch_size: int = 256
    """Captions per text-encoder batch."""

    def __post_init__(self) -> None:
        if self.keep_top_k < 0:
            raise ValueError(f"keep_top_k: must be >= 0, got {self.keep_top_k}")
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score: a cosine similarity in [-1, 1], got {self.min_score}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep: must be >= 0, got {self.min_keep}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


class ClipScorer:
    """Cosine similarity between images and captions under a CLIP-style model."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenize: Any,
        preprocess: Any | None,
        device: torch.device,
        batch_size: int = 256,
        name: str = "",
    ) -> None:
        self.model = model
        self.tokenize = tokenize
        self.preprocess = preprocess  # None: reuse the captioner's pixels
        self.device = device
        self.batch_size = batch_size
        self.name = name

    @property
    def shares_pixels(self) -> bool:
        return self.preprocess is None

    @torch.inference_mode()
    def score(
        self,
        pil_images: Sequence[Image.Image] | None,
        pixels: torch.Tensor | None,
        captions: Sequence[Sequence[str]],
    ) -> list[list[float]]:
        """``scores[i][j]``: cosine similarity of image i and its caption j."""
        if not captions:
            return []
        if self.preprocess is None:
            assert pixels is not None, "a scorer sharing the captioner's preprocessing needs its pixels"
            x = pixels
        else:
            assert pil_images is not None
            x = torch.stack([self.preprocess(im) for im in pil_images])
        dtype = next(self.model.parameters()).dtype
        img = F.normalize(self.model.encode_image(x.to(self.device, dtype)).float(), dim=-1)
        flat = [c for caps in captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], device=self.device)
        txt = []
        for start in range(0, len(flat), self.batch_size):
            ids = self.tokenize(flat[start : start + self.batch_size]).to(self.device)
            txt.append(F.normalize(self.model.encode_text(ids).float(), dim=-1))
        sims = (torch.cat(txt) * img[owner]).sum(-1).tolist() if flat else []
        out, k = [], 0
        for caps in captions:
            out.append([round(float(s), 6) for s in sims[k : k + len(caps)]])
            k += len(caps)
        return out


def filter_captions(
    captions: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], cfg: QualityConfig
) -> tuple[list[list[str]], list[list[float]]]:
    """Per image: captions (and scores) best first, those below ``min_score`` dropped (keeping at least
    ``min_keep``), at most ``keep_top_k`` of them."""
    kept_caps, kept_scores = [], []
    for caps, scs in zip(captions, scores):
        order = sorted(range(len(caps)), key=lambda j: -scs[j])
        chosen = [j for j in order if scs[j] >= cfg.min_score]
        if len(chosen) < cfg.min_keep:
            chosen = order[: cfg.min_keep]
        if cfg.keep_top_k:
            chosen = chosen[: cfg.keep_top_k]
        kept_caps.append([caps[j] for j in chosen])
        kept_scores.append([scs[j] for j in chosen])
    return kept_caps, kept_scores


def build_scorer(cfg: QualityConfig, captioner: Any) -> ClipScorer | None:
    """The scorer ``cfg`` asks for (None when the filter is off)."""
    if not cfg.enabled:
        return None
    if cfg.model == "captioner":
        if not hasattr(captioner, "tokenize") or not hasattr(captioner.model, "encode_text"):
            raise ValueError(
                "quality.model: 'captioner' needs a CoCa captioner; name an open_clip model instead"
            )
        return ClipScorer(
            captioner.model,
            captioner.tokenize,
            None,
            captioner.device,
            cfg.batch_size,
            name=f"{captioner.name}:contrastive",
        )
    import open_clip

    if cfg.model not in open_clip.list_models():
        raise ValueError(f"quality.model: unknown open_clip architecture {cfg.model!r}")
    pretrained = cfg.checkpoint or cfg.pretrained or None
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained)
    device = captioner.device
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return ClipScorer(model, tokenizer, preprocess, device, cfg.batch_size, name=f"clip:{cfg.model}")

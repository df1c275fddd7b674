"""Text-side helpers of the language-guided stages (region alignment, DenseCLIP).

- :func:`build_tokenizer`: the tokenizer of an open_clip architecture (our ``debug`` one included) at the
  model's context length; open_clip's BPE tokenizer for architectures it does not know.
- :func:`class_text_embeddings`: prompt-ensembled, L2-normalised class embeddings from a frozen text tower
  (mean over templates such as "a photo of a {}.", as CLIP zero-shot classification does).
- :class:`TextTower`: the text transformer of an open_clip ``CLIP`` / ``CustomTextCLIP`` run from token
  *embeddings*, so learnable context vectors (CoOp) can replace some of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def build_tokenizer(model_name: str, clip: nn.Module) -> Any:
    context_length = int(getattr(clip, "context_length", 77))
    if model_name in open_clip.list_models():
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


class TextTower(nn.Module):
    """The text transformer of ``clip`` (shared modules, not copies), callable on token embeddings."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        text = getattr(clip, "text", clip)  # CustomTextCLIP keeps the tower in .text
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.pool_type = getattr(clip, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if self.pool_type != "argmax":
            raise ValueError("model: only text towers pooled at the end-of-text token (argmax) are supported")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``embeddings``: N x L x W token embeddings; ``tokens``: N x L ids (locate the end-of-text token)."""
        x = embeddings + self.positional_embedding[: embeddings.shape[1]]
        mask = self.attn_mask[: x.shape[1], : x.shape[1]] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection if self.text_projection is not None else x


@torch.no_grad()
def class_text_embeddings(
    clip: nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """K x D: for each class, the normalised mean of its normalised prompt embeddings."""
    clip.eval()
    out = []
    for name in class_names:
        tokens = tokenizer([t.format(name.replace("_", " ")) for t in templates])
        emb = F.normalize(clip.encode_text(tokens), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return torch.stack(out)

"""Text tokenizers by open_clip model name, offline.

``get_tokenizer("ViT-B-16")`` returns open_clip's own tokenizer for that model (for every OpenAI-style CLIP
text tower that is the bundled BPE ``SimpleTokenizer``: nothing is downloaded). Models whose text tower uses a
Hugging Face tokenizer need that tokenizer in the local HF cache; without it this raises a ``ValueError``
naming the model instead of trying the network.

A tokenizer is any callable ``tokenizer(texts: list[str], context_length=N) -> LongTensor[len(texts), N]``;
the loader calls it once per batch.

    python -c "from pipeline.data.tokenizer import get_tokenizer; print(get_tokenizer('ViT-B-16')(['a cat']))"
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

Tokenizer = Callable[..., torch.Tensor]


@contextmanager
def _offline() -> Any:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def get_tokenizer(model_name: str = "ViT-B-16", context_length: int | None = None) -> Tokenizer:
    """open_clip's tokenizer for ``model_name`` (``debug`` and unknown names get the bundled CLIP BPE one)."""
    import open_clip

    config = open_clip.get_model_config(model_name) if model_name in open_clip.list_models() else None
    text_cfg = (config or {}).get("text_cfg", {})
    if context_length is None:
        context_length = int(text_cfg.get("context_length", 77))
    if config is None:
        return open_clip.SimpleTokenizer(context_length=context_length)
    try:
        with _offline():
            return open_clip.get_tokenizer(model_name, context_length=context_length)
    except Exception as e:
        hf_name = text_cfg.get("hf_tokenizer_name", "")
        raise ValueError(
            f"model {model_name!r}: its tokenizer {hf_name!r} is not available offline ({e}); "
            "put it in the local Hugging Face cache or pick a model with the bundled CLIP tokenizer"
        ) from None


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Call ``tokenizer`` on ``texts``; returns ``LongTensor[len(texts), context_length]`` or raises."""
    try:
        out = tokenizer(list(texts), context_length=context_length)
    except TypeError:
        out = tokenizer(list(texts))
    out = torch.as_tensor(out, dtype=torch.long)
    if out.shape != (len(texts), context_length):
        raise ValueError(
            f"context_length: the tokenizer returned shape {tuple(out.shape)}, expected "
            f"({len(texts)}, {context_length})"
        )
    return out

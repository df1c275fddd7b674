"""Captioners: one small interface over open_clip CoCa (our cached decoder) and Hugging Face image-to-text.

    captioner = build_captioner(CaptionerConfig(arch="coca_ViT-L-14", checkpoint="coca.pt"))
    pixels = torch.stack([captioner.preprocess(img) for img in pil_images])
    captions = captioner.caption(pixels, keys=uids)   # captions[i]: num_captions strings for image i

- :class:`CocaCaptioner`: any open_clip CoCa architecture (``open_clip.list_models()`` names starting with
  ``coca``, or ``coca_debug``, a tiny config for tests / CI), weights from a local checkpoint file (open_clip's
  ``{"state_dict": ...}``, a bare state dict, or :mod:`pipeline.caption.train_coca`'s checkpoints, which carry
  their model config), an open_clip pretrained tag (downloads: only where the user has network), or random.
- :class:`HFCaptioner`: a ``transformers`` image-to-text model (BLIP-style) saved in a LOCAL directory
  (``save_pretrained``); nothing is downloaded.

K captions per image (``num_captions``, default 5 as in DataCompDR) are deterministic given ``seed`` and the
image keys: CoCa sampling seeds each (image key, caption index) row on its own, so captions do not depend on
batching; ``unique`` re-samples duplicate or empty captions with fresh caption indices.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from pipeline.caption.decode import EOS_TOKEN_ID, SOT_TOKEN_ID, CocaDecoder, DecodeConfig, row_seed
from pipeline.dist import resolve_device

# A tiny CoCa for tests and CI (64 px, 64-wide towers of 2 layers, 32-token context).
COCA_DEBUG_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 16,
        "attentional_pool": True,
        "attn_pooler_queries": 16,
        "attn_pooler_heads": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 2,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 2,
        "attn_pooler_heads": 4,
    },
}
ARCH_DEBUG = "coca_debug"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")


@dataclass(frozen=True)
class CaptionerConfig:
    """Which captioning model, where its weights are, and how many captions to write per image."""

    backend: Literal["coca", "hf"] = "coca"
    """coca: open_clip CoCa with our cached decoder; hf: a transformers image-to-text model from hf_dir."""
    arch: str = "coca_ViT-L-14"
    """open_clip CoCa architecture (coca_ViT-B-32, coca_ViT-L-14, ...) or coca_debug (tiny, for tests)."""
    checkpoint: str = ""
    """Local CoCa checkpoint file (open_clip or pipeline.caption.train_coca format); "" = none."""
    pretrained: str = ""
    """open_clip pretrained tag (e.g. mscoco_finetuned_laion2b_s13b_b90k); downloads, so only with network."""
    hf_dir: str = ""
    """Local directory of a transformers image-to-text model and its processor (backend=hf)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights and activations dtype for inference (bf16 on GPUs)."""
    num_captions: int = 5
    """Captions per image (DataCompDR writes 5)."""
    seed: int = 0
    """Seed of the sampling; with the image keys it fixes every caption."""
    unique: bool = True
    """Re-sample captions that duplicate another caption of the same image, or are empty."""
    max_resample_rounds: int = 3
    """How many times duplicates are re-sampled before they are kept as they are."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding strategy and its knobs (max_len counts start and end tokens, as in open_clip)."""
    seed_init: int = 0
    """Seed of the random initialisation when no weights are given (tests)."""

    def __post_init__(self) -> None:
        if self.num_captions < 1:
            raise ValueError(f"num_captions: must be >= 1, got {self.num_captions}")
        if self.decode.strategy == "greedy" and self.num_captions != 1:
            raise ValueError("num_captions: greedy decoding writes one caption per image; use sample or beam")
        if self.decode.strategy == "beam" and self.num_captions > self.decode.num_beams:
            raise ValueError(
                f"num_captions: beam search returns at most decode.num_beams={self.decode.num_beams} captions"
            )
        if self.backend == "hf" and not self.hf_dir:
            raise ValueError("hf_dir: backend=hf needs a local model directory")
        if self.backend == "hf" and self.decode.strategy == "beam" and self.decode.num_beam_groups != 1:
            # transformers 4.57 moved group (diverse) beam search out of the library, to the Hub
            raise ValueError(
                "decode.num_beam_groups: backend=hf supports plain beam search only; set it to 1"
            )
        if self.max_resample_rounds < 0:
            raise ValueError(f"max_resample_rounds: must be >= 0, got {self.max_resample_rounds}")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Captioner(ABC):
    """Turns preprocessed images into ``num_captions`` strings each."""

    name: str
    num_captions: int

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> the model's input tensor [C, H, W]."""

    @abstractmethod
    def caption(self, images: torch.Tensor, keys: Sequence[str]) -> list[list[str]]:
        """Captions for a batch [B, C, H, W]; ``keys`` (sample uids) seed each image's captions."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_captions": self.num_captions}


# --------------------------------------------------------------------------------------------------------
# CoCa


def init_coca_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Initialise what open_clip 3.3.0 leaves uninitialised in a fresh CoCa: the decoder's output projection.

    ``MultimodalTransformer.init_parameters`` is never called (and would fail), so
    ``text_decoder.text_projection`` stays ``torch.empty`` memory; random-weight models then give
    garbage or all-zero logits.
    """
    proj = model.text_decoder.text_projection
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj.copy_(torch.randn(proj.shape, generator=gen) * proj.shape[0] ** -0.5)
    return model


def coca_model_cfg(arch: str) -> dict[str, Any]:
    import copy

    import open_clip

    if arch == ARCH_DEBUG:
        return copy.deepcopy(COCA_DEBUG_CFG)
    cfg = open_clip.get_model_config(arch)
    if cfg is None or "multimodal_cfg" not in cfg:
        coca = [m for m in open_clip.list_models() if m.startswith("coca")]
        raise ValueError(
            f"arch: {arch!r} is not an open_clip CoCa architecture; choose from {coca + [ARCH_DEBUG]}"
        )
    return cfg


def build_coca(model_cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A randomly initialised open_clip CoCa from a config dict (CPU, fp32, eval mode)."""
    import inspect

    import open_clip

    accepted = set(inspect.signature(open_clip.CoCa.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in model_cfg.items() if k in accepted}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CoCa(**cfg)
    return init_coca_(model, seed).eval()


def load_coca_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(extras, state_dict)`` from a local file; accepts open_clip and train_coca formats.

    ``extras`` holds ``model_cfg`` and ``vocab_ids`` when the checkpoint carries them (train_coca's do).
    """
    from pipeline.io import filesystem

    fs, p = filesystem(path)
    if not fs.exists(p):
        raise ValueError(f"checkpoint: no file at {path!r}")
    with fs.open(p, "rb") as f:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    extras: dict[str, Any] = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        extras = {k: obj[k] for k in ("model_cfg", "vocab_ids") if obj.get(k) is not None}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint: {path!r} holds no state dict")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}
    return extras, state


def image_transform_for(model_cfg: dict[str, Any]) -> Any:
    import open_clip

    size = model_cfg["vision_cfg"].get("image_size", 224)
    mean = model_cfg.get("preprocess_cfg", {}).get("mean")
    std = model_cfg.get("preprocess_cfg", {}).get("std")
    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)


class CocaCaptioner(Captioner):
    """open_clip CoCa + :class:`~pipeline.caption.decode.CocaDecoder`.

    A model trained on a small domain may use a compact vocabulary (``vocab_ids``: compact id -> open_clip
    BPE id, id 0 = padding); captions are mapped back to BPE ids before detokenising.
    """

    def __init__(
        self,
        cfg: CaptionerConfig,
        model: torch.nn.Module | None = None,
        model_cfg: dict[str, Any] | None = None,
        vocab_ids: Sequence[int] | None = None,
    ) -> None:
        import open_clip

        self.cfg = cfg
        self.num_captions = cfg.num_captions
        self.device = resolve_device(cfg.device)
        if model is None:
            model, model_cfg, vocab_ids = self._load(cfg)
        elif model_cfg is None:
            model_cfg = coca_model_cfg(cfg.arch)
        self.model_cfg = model_cfg
        self.model = model.to(device=self.device, dtype=_DTYPES[cfg.precision]).eval()
        self.vocab_ids = list(vocab_ids) if vocab_ids is not None else None
        if self.vocab_ids is not None:
            self._to_compact = {bpe: i for i, bpe in enumerate(self.vocab_ids)}
            self.decoder = CocaDecoder(
                self.model,
                sot_token_id=self._to_compact[SOT_TOKEN_ID],
                eos_token_id=self._to_compact[EOS_TOKEN_ID],
            )
        else:
            self.decoder = CocaDecoder(self.model)
        self.context_length = int(model_cfg["text_cfg"].get("context_length", 77))
        self.transform = image_transform_for(model_cfg)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer()
        self.name = f"coca:{cfg.arch}" + (f":{Path(cfg.checkpoint).name}" if cfg.checkpoint else "")

    @staticmethod
    def _load(cfg: CaptionerConfig) -> tuple[torch.nn.Module, dict[str, Any], list[int] | None]:
        import open_clip

        if cfg.pretrained:
            model = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained)
            return model, coca_model_cfg(cfg.arch), None
        if cfg.checkpoint:
            extras, state = load_coca_checkpoint(cfg.checkpoint)
            model_cfg = extras.get("model_cfg") or coca_model_cfg(cfg.arch)
            model = build_coca(model_cfg, cfg.seed_init)
            model.load_state_dict(state, strict=True)
            return model, model_cfg, extras.get("vocab_ids")
        model_cfg = coca_model_cfg(cfg.arch)
        return build_coca(model_cfg, cfg.seed_init), model_cfg, None

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] for this model's text tower (compact ids when it has a vocabulary)."""
        sot, eos = SOT_TOKEN_ID, EOS_TOKEN_ID
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [sot, *self.tokenizer.encode(text), eos]
            if self.vocab_ids is not None:
                ids = [self._to_compact[t] for t in ids if t in self._to_compact]
            ids = ids[: self.context_length]
            if ids[-1] != (self._to_compact[eos] if self.vocab_ids is not None else eos):
                ids[-1] = self._to_compact[eos] if self.vocab_ids is not None else eos
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "decode": self.cfg.decode.__dict__, "seed": self.cfg.seed}

    def decode_ids(self, ids: list[int]) -> str:
        if self.vocab_ids is not None:
            ids = [self.vocab_ids[i] for i in ids if 0 <= i < len(self.vocab_ids)]
        # open_clip's detokeniser leaves a space before punctuation ("on the grass .")
        return _SPACE_BEFORE_PUNCT.sub(r"\1", self.tokenizer.decode(ids)).strip()

    def caption(self, images: torch.Tensor, keys: Sequence[str]) -> list[list[str]]:
        if len(keys) != images.shape[0]:
            raise ValueError(f"keys: {len(keys)} keys for {images.shape[0]} images")
        k = self.num_captions
        dcfg = self.cfg.decode
        images = images.to(device=self.device, dtype=_DTYPES[self.cfg.precision])
        autocast = (
            torch.autocast(self.device.type, dtype=_DTYPES[self.cfg.precision])
            if self.cfg.precision != "fp32"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            embs = self.decoder.encode_images(images)
            if dcfg.strategy != "sample":
                ids = self.decoder.generate(None, dcfg, num_return=k, image_embs=embs)
                return [[self.decode_ids(c) for c in caps] for caps in ids]
            seeds = [row_seed(self.cfg.seed, key, j) for key in keys for j in range(k)]
            ids = self.decoder.generate(None, dcfg, num_return=k, row_seeds=seeds, image_embs=embs)
            out = [[self.decode_ids(c) for c in caps] for caps in ids]
            if self.cfg.unique:
                self._resample_duplicates(out, embs, keys, dcfg)
        return out

    def _resample_duplicates(
        self, out: list[list[str]], embs: torch.Tensor, keys: Sequence[str], dcfg: DecodeConfig
    ) -> None:
        k = self.num_captions
        for rnd in range(1, self.cfg.max_resample_rounds + 1):
            todo: list[tuple[int, int]] = []  # (image, slot)
            for i, caps in enumerate(out):
                seen: set[str] = set()
                for j, c in enumerate(caps):
                    norm = " ".join(c.lower().split())
                    if not norm or norm in seen:
                        todo.append((i, j))
                    seen.add(norm)
            if not todo:
                return
            # one row per slot to redo, each with its own fresh caption index
            image_idx = torch.tensor([i for i, _ in todo], device=embs.device)
            seeds = [row_seed(self.cfg.seed, keys[i], rnd * k + j) for i, j in todo]
            ids = self.decoder.generate(
                None, dcfg, num_return=1, row_seeds=seeds, image_embs=embs.index_select(0, image_idx)
            )
            for (i, j), caps in zip(todo, ids):
                out[i][j] = self.decode_ids(caps[0])


# --------------------------------------------------------------------------------------------------------
# Hugging Face image-to-text


class HFCaptioner(Captioner):
    """A transformers image-to-text model (BLIP-style) and its processor, from a local directory."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        import transformers

        self.cfg = cfg
        self.num_captions = cfg.num_captions
        self.device = resolve_device(cfg.device)
        path = Path(cfg.hf_dir)
        if not path.is_dir():
            raise ValueError(f"hf_dir: no model directory at {cfg.hf_dir!r}")
        auto = (
            getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        )
        self.processor = transformers.AutoProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = auto.from_pretrained(str(path), local_files_only=True)
        self.model = self.model.to(device=self.device, dtype=_DTYPES[cfg.precision]).eval()
        self.name = f"hf:{path.name}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        processed = self.processor(images=image.convert("RGB"), return_tensors="pt")
        return processed["pixel_values"][0]

    def _generate_kwargs(self) -> dict[str, Any]:
        d = self.cfg.decode
        kw: dict[str, Any] = {
            "max_new_tokens": d.max_len - 1,
            "min_new_tokens": max(d.min_len - 1, 0),
            "repetition_penalty": d.repetition_penalty,
            "num_return_sequences": self.num_captions,
        }
        if d.strategy == "sample":
            kw.update(do_sample=True, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
        elif d.strategy == "beam":
            kw.update(do_sample=False, num_beams=d.num_beams, length_penalty=d.length_penalty)
        else:
            kw.update(do_sample=False, num_beams=1)
        return {k: v for k, v in kw.items() if v is not None}

    def caption(self, images: torch.Tensor, keys: Sequence[str]) -> list[list[str]]:
        if len(keys) != images.shape[0]:
            raise ValueError(f"keys: {len(keys)} keys for {images.shape[0]} images")
        if not len(keys):
            return []
        pixels = images.to(device=self.device, dtype=_DTYPES[self.cfg.precision])
        kwargs = self._generate_kwargs()
        with (
            torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
            torch.inference_mode(),
        ):
            # transformers samples from the global generator: seed it from the batch's first key
            torch.manual_seed(row_seed(self.cfg.seed, keys[0], 0))
            ids = self.model.generate(pixel_values=pixels, **kwargs)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        k = self.num_captions
        return [[t.strip() for t in texts[i * k : (i + 1) * k]] for i in range(len(keys))]


def build_captioner(cfg: CaptionerConfig) -> Captioner:
    if cfg.backend == "hf":
        return HFCaptioner(cfg)
    return CocaCaptioner(cfg)


def with_decode(cfg: CaptionerConfig, **changes: Any) -> CaptionerConfig:
    """``cfg`` with some decode fields changed (helper for tests and benchmarks)."""
    return replace(cfg, decode=replace(cfg.decode, **changes))

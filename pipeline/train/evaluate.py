"""Evaluation during and after training: zero-shot classification and image/text retrieval.

    metrics = evaluate(model, tokenizer, preprocess, EvalConfig(zero_shot="data/val_folder",
                                                                 retrieval="data/val/{000..003}.tar"))
    # {"zs_top1": ..., "zs_top5": ..., "i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ..., "t2i_r5": ...}

- **Zero-shot classification** on an ImageNet-style folder: ``<root>/<class>/<image files>``. Class names are
  the folder names with ``_`` read as a space, or come from ``<root>/classnames.txt`` (one per line, in sorted
  folder order). Each class's text embedding is the normalised mean of its prompts (``templates``, each with
  a ``{}``), as in CLIP.
- **Retrieval** R@1 / R@5 in both directions on a held-out split given either as WebDataset shards of our
  schema (one image, its ``txt`` caption) or as a COCO/Flickr-style captions file (``*.json`` with
  ``images: [{id, file_name}]`` and ``annotations: [{image_id, caption}]``, image files beside it). With
  several captions per image, image -> text counts a hit when any of its captions ranks in the top K.

Images get the evaluation transform (resize shorter side, center crop, normalise) of the model's
preprocessing config. ``model`` is a plain open_clip model (the trainer loads EMA weights into a copy).

**Distributed.** When a process group is initialised every rank calls :func:`evaluate` (no rank waits in a
barrier while another evaluates). The work is cut into the same chunks of ``batch_size`` images or texts as on
one process, and rank r encodes chunks r, r + W, r + 2W, ...; the embeddings (or per-chunk hit counts) are
all-gathered and reassembled in chunk order, so every rank holds the *same* result as a single-rank
evaluation (each chunk runs through the same kernels at the same shape). The model forward, the expensive
part on a GPU, is split W ways; image decoding is split too for zero-shot folders and COCO-style files, but
not for retrieval shards (every rank streams the shards, encoding only its chunks). Time per eval call is
bounded by ``max_samples`` (per task) and falls as 1/W in the forward passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.data.loader import LoaderConfig, build_loader
from pipeline.data.transforms import BadImage, eval_image, normalize_batch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)
"""A few of CLIP's ImageNet prompt templates."""


@dataclass(frozen=True)
class EvalConfig:
    interval: int = 0
    """Evaluate every this many optimizer steps (0: only at the end of training)."""
    zero_shot: str = ""
    """ImageNet-style folder (<root>/<class>/<images>) for zero-shot classification; "" skips it."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """Zero-shot prompt templates, each with one '{}' for the class name."""
    retrieval: str = ""
    """Held-out image-text pairs: WebDataset shards (brace pattern / folder) or a COCO-style captions .json."""
    batch_size: int = 256
    """Images or texts per forward pass."""
    max_samples: int = 0
    """Use at most this many images per task (0: all)."""
    ema: bool = True
    """Evaluate the EMA weights when the run keeps an EMA (the final weights are evaluated at the end too)."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"interval: must be >= 0, got {self.interval}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("templates: need at least one, and each must contain '{}'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_samples < 0:
            raise ValueError(f"max_samples: must be >= 0, got {self.max_samples}")

    @property
    def enabled(self) -> bool:
        return bool(self.zero_shot or self.retrieval)


Tokenizer = Callable[..., torch.Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def map_chunks(fn: Callable[[int, Any], Any], chunks: Sequence[Any]) -> list[Any]:
    """``[fn(k, chunk) for k, chunk in enumerate(chunks)]``, chunk k computed on rank ``k % world_size`` and
    the results all-gathered (collective: every rank calls it with the same chunks; results go to CPU)."""
    world_size, rank = _world()
    mine = {k: fn(k, chunk) for k, chunk in enumerate(chunks) if k % world_size == rank}
    if world_size == 1:
        return [mine[k] for k in range(len(chunks))]
    mine = {k: _to_cpu(v) for k, v in mine.items()}
    parts: list[dict[int, Any]] = [{} for _ in range(world_size)]
    dist.all_gather_object(parts, mine)
    merged = {k: v for part in parts for k, v in part.items()}
    return [merged[k] for k in range(len(chunks))]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def _image_size(preprocess: dict[str, Any]) -> int:
    size = preprocess.get("size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_image(images.to(_device(model))).float(), dim=-1)


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Normalised text embeddings, on the model's device (batches split over ranks: see the module doc)."""

    def encode(_: int, chunk: list[str]) -> torch.Tensor:
        tokens = tokenizer(chunk).to(_device(model))
        return F.normalize(model.encode_text(tokens).float(), dim=-1)

    chunks = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    out = [t.to(_device(model)) for t in map_chunks(encode, chunks)]
    return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------- zero-shot


def read_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(class names, [(image path, class index)])`` of an ImageNet-style folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"zero_shot: {root} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"zero_shot: {root} has no class folders")
    names_file = root / "classnames.txt"
    if names_file.exists():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"zero_shot: {names_file} names {len(names)} classes, {root} has {len(folders)}")
    else:
        names = [p.name.replace("_", " ") for p in folders]
    items = [
        (f, label)
        for label, folder in enumerate(folders)
        for f in sorted(folder.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    return names, items


def _load_images(paths: Sequence[Path], preprocess: dict[str, Any]) -> tuple[torch.Tensor, list[int]]:
    """Normalised images and the positions of the ones that decoded (bad files are skipped)."""
    size = _image_size(preprocess)
    arrays, kept = [], []
    for i, path in enumerate(paths):
        try:
            arrays.append(eval_image(Path(path).read_bytes(), size))
            kept.append(i)
        except (OSError, BadImage):
            continue
    if not arrays:
        return torch.zeros(0, 3, size, size), kept
    mean = preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))
    return normalize_batch(arrays, mean, std), kept


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int,
) -> torch.Tensor:
    """``[num_classes, D]``: per class, the normalised mean of its normalised prompt embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts, batch_size).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot(
    model: nn.Module, tokenizer: Tokenizer, preprocess: dict[str, Any], cfg: EvalConfig
) -> dict[str, float]:
    names, items = read_image_folder(cfg.zero_shot)
    if cfg.max_samples:
        rng = np.random.default_rng(0)
        order = rng.permutation(len(items))[: cfg.max_samples]
        items = [items[i] for i in sorted(order)]
    classifier = zero_shot_classifier(model, tokenizer, names, cfg.templates, cfg.batch_size)
    k = min(5, len(names))

    def score(_: int, chunk: list[tuple[Path, int]]) -> tuple[int, int, int]:
        images, kept = _load_images([p for p, _ in chunk], preprocess)
        if not kept:
            return 0, 0, 0
        labels = torch.tensor([chunk[j][1] for j in kept], device=classifier.device)
        top = (encode_images(model, images) @ classifier.T).topk(k, dim=1).indices
        return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum()), len(kept)

    chunks = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    correct1, correct5, total = (sum(c) for c in zip((0, 0, 0), *map_chunks(score, chunks)))
    if total == 0:
        raise ValueError(f"zero_shot: no readable images under {cfg.zero_shot}")
    return {
        "zs_top1": correct1 / total,
        "zs_top5": correct5 / total,
        "zs_chance": 1 / len(names),
        "zs_images": total,
    }


# --------------------------------------------------------------------------------------- retrieval


def _coco_pairs(path: Path) -> tuple[list[Path], list[str], list[int]]:
    data = json.loads(path.read_text())
    images = {int(im["id"]): path.parent / im["file_name"] for im in data["images"]}
    order = {image_id: i for i, image_id in enumerate(sorted(images))}
    texts, owner = [], []
    for ann in data["annotations"]:
        if int(ann["image_id"]) in order:
            texts.append(str(ann["caption"]))
            owner.append(order[int(ann["image_id"])])
    return [images[i] for i in sorted(images)], texts, owner


def _shard_batches(spec: str, preprocess: dict[str, Any], tokenizer: Tokenizer, batch: int) -> Iterator[dict]:
    size = _image_size(preprocess)
    cfg = LoaderConfig(
        shards=spec,
        micro_batch=batch,
        num_workers=0,
        shuffle_buffer=0,
        shuffle_shards=False,
        epochs=1,
        drop_last=False,
        augment=False,
        image_size=size,
        mean=tuple(preprocess.get("mean", LoaderConfig.mean)),
        std=tuple(preprocess.get("std", LoaderConfig.std)),
        context_length=int(getattr(tokenizer, "context_length", 77)),
    )
    yield from build_loader(cfg, 0, 1, tokenizer)


def recall_at_k(
    similarity: torch.Tensor, owner: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """R@K both ways from ``similarity`` [images, texts]; ``owner[t]`` is the image of text ``t``."""
    out: dict[str, float] = {}
    num_images = similarity.shape[0]
    for k in ks:
        kk = min(k, similarity.shape[1])
        top_texts = similarity.topk(kk, dim=1).indices  # image -> text: any own caption in the top k
        i2t = (owner[top_texts] == torch.arange(num_images, device=owner.device)[:, None]).any(dim=1)
        top_images = similarity.T.topk(min(k, num_images), dim=1).indices
        t2i = (top_images == owner[:, None]).any(dim=1)
        out[f"i2t_r{k}"] = float(i2t.float().mean())
        out[f"t2i_r{k}"] = float(t2i.float().mean())
    return out


@torch.no_grad()
def retrieval(
    model: nn.Module, tokenizer: Tokenizer, preprocess: dict[str, Any], cfg: EvalConfig
) -> dict[str, float]:
    path = Path(cfg.retrieval)
    image_parts, text_parts, owners = [], [], []
    if path.suffix == ".json":
        image_paths, texts, owner = _coco_pairs(path)
        if cfg.max_samples:
            image_paths = image_paths[: cfg.max_samples]
            keep = [i for i, o in enumerate(owner) if o < len(image_paths)]
            texts, owner = [texts[i] for i in keep], [owner[i] for i in keep]

        def encode(_: int, paths: list[Path]) -> tuple[torch.Tensor | None, list[int]]:
            images, kept = _load_images(paths, preprocess)
            return (encode_images(model, images) if kept else None), kept

        starts = range(0, len(image_paths), cfg.batch_size)
        encoded = map_chunks(encode, [image_paths[i : i + cfg.batch_size] for i in starts])
        remap, base = {}, 0
        for i, (emb, kept) in zip(starts, encoded):
            for j in kept:
                remap[i + j] = base
                base += 1
            if kept:
                image_parts.append(emb.to(_device(model)))
        pairs = [(t, remap[o]) for t, o in zip(texts, owner) if o in remap]
        text_parts.append(encode_texts(model, tokenizer, [t for t, _ in pairs], cfg.batch_size))
        owners = [o for _, o in pairs]
    else:
        world_size, rank = _world()
        mine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        seen = num_chunks = 0
        for k, batch in enumerate(_shard_batches(cfg.retrieval, preprocess, tokenizer, cfg.batch_size)):
            n = batch["image"].shape[0]
            if cfg.max_samples:
                n = min(n, cfg.max_samples - seen)
            if k % world_size == rank:  # every rank streams the shards; each encodes its chunks
                text = F.normalize(model.encode_text(batch["text"][:n].to(_device(model))).float(), dim=-1)
                mine[k] = (encode_images(model, batch["image"][:n]), text)
            owners.extend(range(seen, seen + n))
            seen += n
            num_chunks = k + 1
            if cfg.max_samples and seen >= cfg.max_samples:
                break
        for img_k, txt_k in map_chunks(lambda k, _: mine[k], [None] * num_chunks):
            image_parts.append(img_k.to(_device(model)))
            text_parts.append(txt_k.to(_device(model)))
    if not image_parts or not owners:
        raise ValueError(f"retrieval: no usable pairs in {cfg.retrieval}")
    img, txt = torch.cat(image_parts), torch.cat(text_parts)
    result = recall_at_k(img @ txt.T, torch.tensor(owners, device=img.device))
    result["retrieval_images"] = img.shape[0]
    return result


def evaluate(
    model: nn.Module, tokenizer: Tokenizer, preprocess: dict[str, Any], cfg: EvalConfig
) -> dict[str, float]:
    """Every configured task; keys ``zs_*`` and ``i2t_r*`` / ``t2i_r*``.

    With a process group initialised, a collective: every rank calls it and gets the same result."""
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        if cfg.zero_shot:
            out.update(zero_shot(model, tokenizer, preprocess, cfg))
        if cfg.retrieval:
            out.update(retrieval(model, tokenizer, preprocess, cfg))
        return out
    finally:
        model.train(was_training)

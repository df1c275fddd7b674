"""Image transforms for CLIP training and evaluation: decode, RandomResizedCrop, resize + center crop, normalise.

Same maths as open_clip's / torchvision's (RandomResizedCrop's box sampling, bicubic resampling, CLIP mean/std),
but built for a fast, reproducible loader:

- the crop is drawn from a ``random.Random`` the caller seeds (the loader seeds it from seed, epoch and uid, so
  a resumed run crops every sample exactly as an uninterrupted one would);
- the crop is an integer box of the decoded pixels, resized with torch's antialiased bicubic kernel on
  ``uint8`` (the kernel Pillow uses, a SIMD path about 2-3x faster than Pillow's own ``resize`` here);
- a JPEG much larger than the output is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  ``Image.draft``) when the crop still keeps at least the output resolution;
- per-sample results stay ``uint8 [3, H, W]``; :func:`normalize_batch` writes the normalised float
  ``[B, 3, H, W]`` batch (in shared memory inside DataLoader workers, so it is not copied again on its way
  to the main process).

For evaluation code that wants a torchvision-style callable: ``eval_transform(224)(pil_image) -> [3, H, W]``.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's per-channel mean (open_clip's ``OPENAI_DATASET_MEAN``)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's per-channel std (open_clip's ``OPENAI_DATASET_STD``)."""

BICUBIC = Image.Resampling.BICUBIC


class BadImage(ValueError):
    """The bytes are not a usable image (undecodable, empty, or over the pixel limit)."""


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``; returns ``(x0, y0, x1, y1)``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = rng.randint(0, height - h)
            x0 = rng.randint(0, width - w)
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    y0, x0 = (height - h) // 2, (width - w) // 2
    return x0, y0, x0 + w, y0 + h


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (lazily) an image from bytes; raises :class:`BadImage` for empty data or over ``max_pixels``."""
    if not data:
        raise BadImage("empty image")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow raises many types for bad bytes
        raise BadImage(f"cannot open image: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise BadImage(f"image of {w}x{h} pixels is empty or over the {max_pixels} pixel limit")
    return img


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int) -> tuple[float, ...]:
    """Let libjpeg decode at a reduced scale while the crop keeps >= ``size`` pixels; rescale ``box``."""
    if img.format != "JPEG":
        return box
    w, h = img.size
    factor = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    if factor < 2:
        return box
    img.draft("RGB", (math.ceil(w / factor), math.ceil(h / factor)))
    sx, sy = img.size[0] / w, img.size[1] / h
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _decode(img: Image.Image) -> torch.Tensor:
    """Decode to ``uint8 [1, 3, H, W]`` (a channels-last view of the decoded RGB pixels)."""
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImage(f"unexpected decoded shape {arr.shape}")
    if not arr.flags.writeable:
        arr = np.array(arr)
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing of ``uint8 [1, 3, h, w]`` (PIL's kernel, torch's SIMD uint8 path)."""
    if x.shape[2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def _crop_resize(img: Image.Image, box: tuple[float, ...], size: int) -> torch.Tensor:
    x = _decode(img)
    h, w = x.shape[2:]
    x0, y0 = min(max(int(round(box[0])), 0), w - 1), min(max(int(round(box[1])), 0), h - 1)
    x1, y1 = max(min(int(round(box[2])), w), x0 + 1), max(min(int(round(box[3])), h), y0 + 1)
    return _resize(x[:, :, y0:y1, x0:x1], size, size)[0].contiguous()


def train_image(
    data: bytes,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: random.Random,
    max_pixels: int = 64_000_000,
    jpeg_draft: bool = True,
) -> torch.Tensor:
    """Decode + RandomResizedCrop(size, scale, ratio, bicubic) -> ``uint8 [3, size, size]``."""
    img = open_image(data, max_pixels)
    box: tuple[float, ...] = random_resized_crop_box(img.size[0], img.size[1], scale, ratio, rng)
    try:
        if jpeg_draft:
            box = _draft(img, box, size)
        return _crop_resize(img, box, size)
    except BadImage:
        raise
    except Exception as e:  # truncated / corrupt data surfaces here, at decode time
        raise BadImage(f"cannot decode image: {e}") from None


def _resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    x = _decode(img)
    h, w = x.shape[2:]
    # torchvision's Resize(size): shorter side -> size, longer side -> int(size * long / short); then CenterCrop.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    x = _resize(x, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[0, :, top : top + size, left : left + size].contiguous()


def eval_image(data: bytes, size: int, max_pixels: int = 64_000_000, jpeg_draft: bool = True) -> torch.Tensor:
    """Decode + resize shorter side to ``size`` + center crop (bicubic) -> ``uint8 [3, size, size]``."""
    img = open_image(data, max_pixels)
    try:
        if jpeg_draft and img.format == "JPEG" and min(img.size) >= 2 * size:
            img.draft("RGB", (size * img.size[0] // min(img.size), size * img.size[1] // min(img.size)))
        return _resize_center_crop(img, size)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"cannot decode image: {e}") from None


def _empty_float(shape: tuple[int, ...]) -> torch.Tensor:
    """A float tensor; in a DataLoader worker, in shared memory (as default_collate does: no copy on send)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    numel = math.prod(shape)
    elem = torch.empty(0, dtype=torch.float32)
    storage = elem._typed_storage()._new_shared(numel, device=elem.device)
    return elem.new(storage).resize_(shape)


def normalize_batch(
    images: Sequence[torch.Tensor],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """A list of ``uint8 [3, H, W]`` -> normalised ``float32 [B, 3, H, W]`` ((x / 255 - mean) / std)."""
    c, h, w = images[0].shape
    out = _empty_float((len(images), c, h, w))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(c, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(c, 1, 1)
    for i, image in enumerate(images):  # per image: stays in cache
        o = out[i]
        o.copy_(image)
        o.mul_(scale).sub_(shift)
    return out


def eval_transform(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """torchvision-style callable for evaluation: PIL image -> normalised ``float32 [3, size, size]``."""

    def transform(img: Image.Image) -> torch.Tensor:
        return normalize_batch([_resize_center_crop(img, image_size)], mean, std)[0]

    return transform


def train_transform(
    image_size: int,
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] = (0.75, 4.0 / 3.0),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    rng: random.Random | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """torchvision-style callable: PIL image -> RandomResizedCrop + normalise ``float32 [3, size, size]``."""
    rng = rng or random.Random()

    def transform(img: Image.Image) -> torch.Tensor:
        box = random_resized_crop_box(img.size[0], img.size[1], scale, ratio, rng)
        return normalize_batch([_crop_resize(img, box, image_size)], mean, std)[0]

    return transform

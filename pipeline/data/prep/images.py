"""Safe image decoding and resizing for the shard job: any web image in, one RGB JPEG (or a clear reason) out.

* Only the formats in ``ImageConfig.formats`` are opened (no EPS/Ghostscript and friends).
* The pixel count is checked from the header before any pixel is decoded (decompression bombs);
  ``ImageConfig.max_pixels`` is the only limit (Pillow's own limit is set from it).
* CMYK, palette (with or without transparency), greyscale, 16-bit and alpha images become RGB; EXIF
  orientation is applied, and ``original_width/height`` are the displayed (rotated) size.
* JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4 or 1/8) when the target is at least that much
  smaller, which is most of the speed-up over a plain decode + resize.
* An RGB JPEG that needs no resize, rotation or conversion is passed through byte for byte (after a
  cheap 1/8-scale decode proving it is not truncated) instead of being re-encoded.

    result = process_image(data, ImageConfig(resize_mode="center_crop", size=224))
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_ORIENTATION_TAG = 0x0112
Image.init()  # register every plugin now, so Image.open(formats=[..., "MPO"]) can look them all up


@dataclass(frozen=True)
class ImageConfig:
    resize_mode: Literal["keep_ratio_largest", "center_crop", "none"] = "keep_ratio_largest"
    """keep_ratio_largest: the longer side becomes `size`; center_crop: the shorter side becomes `size`,
    then a centred size x size crop; none: keep the original size."""
    size: int = 256
    """Target side in pixels for keep_ratio_largest and center_crop."""
    upscale: bool = False
    """Also enlarge images smaller than `size` (otherwise they keep their size; center_crop then crops a
    centred square of the shorter side)."""
    quality: int = 90
    """JPEG quality when an image is (re-)encoded."""
    resample: Literal["bicubic", "bilinear", "lanczos", "box"] = "bicubic"
    """Resampling filter for the final resize."""
    draft: bool = True
    """Decode JPEGs at 1/2, 1/4 or 1/8 scale when the target is that much smaller (much faster)."""
    keep_original_jpeg: bool = True
    """Pass an RGB JPEG through unchanged when no resize, rotation or conversion is needed (keeps its
    metadata); false re-encodes every image."""
    max_pixels: int = 89_478_485
    """Images with more pixels (width x height, from the header) fail as decompression_bomb. This is the only
    limit: Pillow's own ``Image.MAX_IMAGE_PIXELS`` is set from it in every process that decodes."""
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    """Pillow formats that may be opened (JPEG includes MPO); anything else fails as decode_error."""
    background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour that transparent pixels are composited onto."""

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if not self.formats:
            raise ValueError("formats must name at least one Pillow format")
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"formats: Pillow cannot open {unknown}; known: {sorted(Image.OPEN)}")


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is one of the failure-table reasons."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageResult:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    reencoded: bool
    rotated: bool = False
    """EXIF orientation was applied (pixels moved relative to the stored image)."""


def target_size(width: int, height: int, cfg: ImageConfig) -> tuple[int, int]:
    """Output size for a displayed ``width x height`` image under ``cfg``'s policy."""
    if cfg.resize_mode == "none":
        return width, height
    if cfg.resize_mode == "keep_ratio_largest":
        scale = cfg.size / max(width, height)
        if scale >= 1 and not cfg.upscale:
            return width, height
        return max(1, round(width * scale)), max(1, round(height * scale))
    side = min(width, height)
    return (cfg.size, cfg.size) if (side >= cfg.size or cfg.upscale) else (side, side)


def _use_as_pillow_limit(max_pixels: int) -> None:
    """Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (on open, and on some loads and crops)
    before our header check runs; with its limit set to ``max_pixels`` it never refuses one that the config
    allows. Set on every call: this runs in each process that decodes (pool workers, Ray tasks), and a
    process may meet several configs."""
    if Image.MAX_IMAGE_PIXELS != max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open(data: bytes, cfg: ImageConfig) -> Image.Image:
    if not data:
        raise ImageError("empty_file")
    _use_as_pillow_limit(cfg.max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(cfg.formats))
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError("decode_error", "not an image in an allowed format") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on garbage headers
        raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - broken EXIF blocks: treat as upright
        return 1


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled to 8, palette/alpha composited on ``background``, CMYK converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr.astype(np.uint32) >> 8
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _resize(
    im: Image.Image, display: tuple[int, int], target: tuple[int, int], cfg: ImageConfig
) -> Image.Image:
    """Resize (and for center_crop, crop) ``im``, which may already be draft-reduced from ``display``."""
    w, h = im.size
    if cfg.resize_mode == "center_crop":
        side = min(display)
        fx, fy = w / display[0], h / display[1]
        x0 = (display[0] - side) / 2 * fx
        y0 = (display[1] - side) / 2 * fy
        box = (x0, y0, x0 + side * fx, y0 + side * fy)
        if target == (w, h) and box == (0, 0, w, h):
            return im
        return im.resize(target, _RESAMPLE[cfg.resample], box=box)
    if (w, h) == target:
        return im
    return im.resize(target, _RESAMPLE[cfg.resample])


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_image(
    data: bytes,
    cfg: ImageConfig,
    check_size: Callable[[int, int], str | None] | None = None,
) -> ImageResult:
    """Decode, orient, convert, resize and encode one image, or raise :class:`ImageError` with a reason.

    ``check_size(width, height)`` (displayed size, read from the header before decoding) may return a
    failure reason such as ``too_small``; it is called before any pixel is decoded.
    """
    im = _open(data, cfg)
    try:
        w0, h0 = im.size
        if w0 <= 0 or h0 <= 0:
            raise ImageError("decode_error", f"bad size {w0}x{h0}")
        if w0 * h0 > cfg.max_pixels:
            raise ImageError("decompression_bomb", f"{w0}x{h0} pixels > max_pixels={cfg.max_pixels}")
        orientation = _orientation(im)
        rotated = orientation in (5, 6, 7, 8)
        display = (h0, w0) if rotated else (w0, h0)
        if check_size is not None:
            reason = check_size(*display)
            if reason:
                raise ImageError(reason, f"{display[0]}x{display[1]}")
        target = target_size(*display, cfg)
        passthrough = (
            cfg.keep_original_jpeg
            and im.format == "JPEG"
            and im.mode == "RGB"
            and orientation == 1
            and target == display
        )
        if im.format == "JPEG" and (cfg.draft or passthrough):
            if passthrough:
                request = (max(1, w0 // 8), max(1, h0 // 8))  # decode cheaply, only to prove integrity
            elif cfg.resize_mode == "center_crop":
                s = max(target) / min(display)
                request = (max(1, math.floor(w0 * s)), max(1, math.floor(h0 * s)))
            else:
                tw, th = (target[1], target[0]) if rotated else target
                request = (tw, th)
            im.draft(im.mode, request)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()
        except Image.DecompressionBombError as e:
            raise ImageError("decompression_bomb", str(e)) from None
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data raises OSError, SyntaxError, ...
            raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None
        if passthrough:
            return ImageResult(data, w0, h0, w0, h0, reencoded=False)
        try:
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            im = to_rgb(im, cfg.background)
            im = _resize(im, display, target, cfg)
            out = encode_jpeg(im, cfg.quality)
        except Exception as e:  # noqa: BLE001 - odd modes/corrupt tiles can fail late
            raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None
        return ImageResult(
            out, im.size[0], im.size[1], display[0], display[1], reencoded=True, rotated=orientation != 1
        )
    finally:
        im.close()

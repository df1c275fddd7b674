"""The shard job's image path, step by step, on photo-like JPEGs: where the CPU time of one image goes.

Builds distinct photo-like JPEGs (1/f-spectrum colour texture + hard edges + sensor noise, 640-1024 px,
quality 85-95; flat synthetic scenes decode unrealistically fast), then times, per image and on one core:

* the steps of ``pipeline.data.prep.images.process_image`` at ``--size`` with DataComp's settings
  (keep_ratio_largest, resize only if bigger, JPEG q95): header + EXIF, decode, resize, encode, the sha256
  of the source, the tar write, and an HTTP GET over loopback;
* candidate stacks for decode / resize / encode (Pillow draft, simplejpeg DCT scaling, OpenCV INTER_AREA,
  Pillow ``reduce``, pyvips shrink-on-load), each only where its package is installed;
* the single-core Pillow floor: draft decode + BOX resize + q95 encode, no network, no tar.

    .venv/bin/python -m benchmarks.bench_image_path --num-images 200 --size 512
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.prep.images import ImageConfig, process_image, target_size


def _pink_field(rng: np.random.Generator, side: int) -> np.ndarray:
    """A ``side x side x 3`` float field with a ~1/f amplitude spectrum and correlated colour channels."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / side) ** 1.1
    out = np.empty((side, side, 3), np.float32)
    for c in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        out[..., c] = np.fft.irfft2(amp * np.exp(1j * phase), s=(side, side))
    out /= out.std()
    mix = np.eye(3) * 0.45 + 0.55 * rng.uniform(0.5, 1.0, (3, 3))  # colour channels mostly move together
    return out @ mix.T.astype(np.float32)


class PhotoLike:
    """Distinct photo-like images: crops of a few large 1/f fields, recoloured, with edges and noise."""

    def __init__(self, seed: int = 0, num_fields: int = 8, field_side: int = 1280) -> None:
        self.rng = np.random.default_rng(seed)
        self.fields = [_pink_field(self.rng, field_side) for _ in range(num_fields)]

    def image(self, width: int, height: int) -> Image.Image:
        rng = self.rng
        field = self.fields[int(rng.integers(len(self.fields)))]
        y = int(rng.integers(0, field.shape[0] - height + 1))
        x = int(rng.integers(0, field.shape[1] - width + 1))
        crop = field[y : y + height, x : x + width]
        base = rng.uniform(60, 190, 3).astype(np.float32)
        arr = base + crop * rng.uniform(25, 45)
        arr += rng.normal(0, 3.0, arr.shape).astype(np.float32)  # sensor noise
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 8))):  # objects: hard-edged shapes of flat-ish colour
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y0), (x1, y0 + 10), (x1 - 15, y1), (x0 + 5, y1 - 20)], fill=colour)
        if rng.random() < 0.5:  # shapes carry texture too, as real objects do
            arr = np.asarray(im, np.float32) + crop[..., :1] * 12
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        return im

    def jpeg(self, min_side: int = 640, max_side: int = 1024) -> bytes:
        """One JPEG whose longer side is in ``[min_side, max_side]``, aspect 1:1 to 16:9, either way up."""
        rng = self.rng
        long = int(rng.integers(min_side, max_side + 1))
        short = int(long / rng.uniform(1.0, 16 / 9))
        w, h = (long, short) if rng.random() < 0.7 else (short, long)
        buf = io.BytesIO()
        self.image(w, h).save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
        return buf.getvalue()


def make_photo_jpegs(folder: Path, num_images: int, seed: int = 0) -> list[str]:
    """Write ``num_images`` distinct photo-like JPEGs into ``folder``; returns their names."""
    gen = PhotoLike(seed)
    names = []
    for i in range(num_images):
        name = f"{i:07d}.jpg"
        (folder / name).write_bytes(gen.jpeg())
        names.append(name)
    return names


def _per_image_ms(
    fn: Callable[[Any], object],
    data: Sequence[Any],
    repeats: int,
    clock: Callable[[], float] = time.process_time,
) -> float:
    """Median over ``repeats`` of the mean CPU milliseconds per item of ``fn`` over ``data``, by ``clock``."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        for d in data:
            fn(d)
        times.append((clock() - t0) / len(data) * 1000)
    return statistics.median(times)


def pillow_floor(data: bytes, size: int, quality: int = 95) -> bytes:
    """The single-core Pillow floor: draft decode, BOX resize to keep_ratio_largest, JPEG encode."""
    im = Image.open(io.BytesIO(data))
    target = target_size(*im.size, ImageConfig(size=size))
    im.draft("RGB", target)
    im = im.convert("RGB").resize(target, Image.Resampling.BOX)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _steps(size: int, quality: int) -> dict[str, Callable[[bytes], object]]:
    """Each step of the image path on its own (decoded inputs are cached per call)."""
    cfg = ImageConfig(size=size, quality=quality)

    def header(d: bytes) -> object:
        im = Image.open(io.BytesIO(d))
        return im.size, im.getexif().get(0x0112, 1)

    def decode_full(d: bytes) -> object:
        return Image.open(io.BytesIO(d)).convert("RGB")

    def decode_draft(d: bytes) -> object:
        im = Image.open(io.BytesIO(d))
        im.draft("RGB", target_size(*im.size, cfg))
        return im.convert("RGB")

    steps: dict[str, Callable[[bytes], object]] = {
        "header + EXIF (Pillow)": header,
        "decode full (Pillow)": decode_full,
        "decode draft 1/2^k (Pillow)": decode_draft,
        "sha256 of the source": lambda d: hashlib.sha256(d).digest(),
        "process_image (whole)": lambda d: process_image(d, cfg),
        "Pillow floor (draft + BOX + encode)": lambda d: pillow_floor(d, size, quality),
    }
    try:
        import simplejpeg

        def decode_scaled(d: bytes) -> object:
            w, h = Image.open(io.BytesIO(d)).size
            tw, th = target_size(w, h, cfg)
            return simplejpeg.decode_jpeg(d, "RGB", min_width=tw, min_height=th)

        steps["decode DCT-scaled n/8 (simplejpeg)"] = decode_scaled
    except ImportError:
        pass
    try:
        import pyvips

        def vips_thumb(d: bytes) -> object:
            im = pyvips.Image.thumbnail_buffer(d, size, size="down")
            return im.write_to_buffer(".jpg", Q=quality)

        steps["whole path (pyvips thumbnail + save)"] = vips_thumb
    except ImportError:
        pass
    return steps


def _resize_and_encode(data: list[bytes], size: int, quality: int, repeats: int) -> dict[str, float]:
    """Resize and encode steps on already-decoded full-size arrays."""
    cfg = ImageConfig(size=size, quality=quality)
    ims = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    targets = [target_size(*im.size, cfg) for im in ims]
    out: dict[str, float] = {}

    def timed(name: str, fn: Callable[[int], object]) -> None:
        idx = list(range(len(ims)))
        out[name] = _per_image_ms(lambda i: fn(i), idx, repeats)  # type: ignore[arg-type]

    timed("resize bicubic (Pillow)", lambda i: ims[i].resize(targets[i], Image.Resampling.BICUBIC))
    timed("resize box (Pillow)", lambda i: ims[i].resize(targets[i], Image.Resampling.BOX))
    small = [im.resize(t, Image.Resampling.BICUBIC) for im, t in zip(ims, targets)]

    def pil_encode(i: int) -> bytes:
        buf = io.BytesIO()
        small[i].save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    timed("encode q95 (Pillow)", pil_encode)
    try:
        import cv2

        cv2.setNumThreads(1)
        arrs = [np.asarray(im) for im in ims]
        timed(
            "resize INTER_AREA (OpenCV)",
            lambda i: cv2.resize(arrs[i], targets[i], interpolation=cv2.INTER_AREA),
        )
        smalls = [np.ascontiguousarray(np.asarray(s)[..., ::-1]) for s in small]
        timed(
            "encode q95 (OpenCV)",
            lambda i: cv2.imencode(".jpg", smalls[i], [cv2.IMWRITE_JPEG_QUALITY, quality]),
        )
    except ImportError:
        pass
    try:
        import simplejpeg

        sarrs = [np.asarray(s) for s in small]
        timed(
            "encode q95 4:2:0 (simplejpeg)", lambda i: simplejpeg.encode_jpeg(sarrs[i], quality, "RGB", "420")
        )
    except ImportError:
        pass
    return out


def _http_get_ms(folder: Path, names: list[str], repeats: int) -> float:
    from pipeline.data.prep.fixtures import LoopbackServer

    server = LoopbackServer(folder)
    try:
        # the client's CPU only: the server's threads are in this process too, so time with a thread clock
        def get(name: str) -> bytes:
            with urllib.request.urlopen(f"{server.url}/{name}") as resp:
                return resp.read()

        return _per_image_ms(get, names, repeats, clock=time.thread_time)
    finally:
        server.stop()


def _tar_write_ms(data: list[bytes], repeats: int) -> float:
    from pipeline.data.tar import TarBuilder

    with tempfile.TemporaryDirectory() as tmp:

        def write_all() -> None:
            with TarBuilder.open(Path(tmp) / "x.tar") as tar:
                for i, d in enumerate(data):
                    tar.write({"__key__": f"{i:09d}", "jpg": d, "txt": "a caption", "json": {"uid": str(i)}})

        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            write_all()
            times.append((time.process_time() - t0) / len(data) * 1000)
        return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_photo_jpegs(folder, args.num_images)
        data = [(folder / n).read_bytes() for n in names]
        sizes = [Image.open(io.BytesIO(d)).size for d in data]
        print(
            f"{len(data)} photo-like JPEGs, {np.mean([len(d) for d in data]) / 1024:.0f} KiB mean, "
            f"longer side {min(max(s) for s in sizes)}-{max(max(s) for s in sizes)} px; target {args.size} px, "
            f"q{args.quality}; CPU ms per image (median of {args.repeats})\n"
        )
        rows = {
            name: _per_image_ms(fn, data, args.repeats)
            for name, fn in _steps(args.size, args.quality).items()
        }
        rows.update(_resize_and_encode(data, args.size, args.quality, args.repeats))
        rows["tar write (TarBuilder)"] = _tar_write_ms(
            [pillow_floor(d, args.size) for d in data], args.repeats
        )
        rows["HTTP GET over loopback (client thread)"] = _http_get_ms(folder, names, args.repeats)
    print("| step | CPU ms / image | images per CPU-s |")
    print("|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {1000 / ms:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

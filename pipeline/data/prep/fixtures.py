"""Small synthetic inputs for the shard job's tests and benchmark: good images from the synthetic world,
hand-made bad files (zero-byte, truncated, not an image, decompression bomb, CMYK, palette, 16-bit,
EXIF-rotated), DataComp-style parquet tables, DataCompDR-style caption tars (:func:`write_datacompdr_tars`),
and a loopback HTTP server to fetch them from.

    url, stop = serve_directory(images_dir, delay_s=0.01)   # or LoopbackServer(dir) with a settable delay
"""

from __future__ import annotations

import functools
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import schema, synthworld
from pipeline.data.tar import TarBuilder


def encode(im: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def scene_image(index: int, size: int = 96, seed: int = 0) -> tuple[str, Image.Image, str]:
    """``(uid, image, noisy caption)`` of synthetic-world scene ``index``."""
    scene = synthworld.make_scene(synthworld.WorldConfig(image_size=size, seed=seed), index)
    return scene.uid, Image.fromarray(scene.image), scene.noisy_caption


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (its data is a valid 1x1 image)."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr_at = data.index(b"IHDR")
    body = bytearray(data[ihdr_at : ihdr_at + 4 + 13])
    body[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return data[:ihdr_at] + bytes(body) + crc + data[ihdr_at + 4 + 13 + 4 :]


def odd_images(seed: int = 0) -> dict[str, tuple[bytes, str | None, tuple[int, int]]]:
    """Hand-made images: name -> (bytes, expected failure reason or None if kept, displayed size)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))  # 80 x 48
    exif = base.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    sixteen = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    good_jpeg = encode(base, "JPEG", quality=90)
    return {
        "cmyk": (encode(base.convert("CMYK"), "JPEG"), None, (80, 48)),
        "palette": (encode(base.convert("P"), "PNG", transparency=0), None, (80, 48)),
        "sixteen_bit": (encode(sixteen, "PNG"), None, (50, 40)),
        "exif_rotated": (encode(base, "JPEG", exif=exif.tobytes()), None, (48, 80)),
        "grey": (encode(base.convert("L"), "JPEG"), None, (80, 48)),
        "webp": (encode(base, "WEBP"), None, (80, 48)),
        "zero_byte": (b"", "empty_file", (0, 0)),
        "truncated": (good_jpeg[: len(good_jpeg) // 2], "decode_error", (0, 0)),
        "not_an_image": (b"<html>404 not found</html>", "decode_error", (0, 0)),
        "bomb": (png_bomb(), "decompression_bomb", (0, 0)),
    }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        delay = getattr(self.server, "delay_s", 0.0)
        if delay:
            time.sleep(delay)
        super().do_GET()


class LoopbackServer:
    """A threaded static-file HTTP server on 127.0.0.1; ``delay_s`` (settable) slows every GET."""

    def __init__(self, directory: str | Path, delay_s: float = 0.0) -> None:
        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
        )
        self._server.daemon_threads = True
        self.delay_s = delay_s
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def delay_s(self) -> float:
        return self._server.delay_s  # type: ignore[attr-defined]

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._server.delay_s = value  # type: ignore[attr-defined]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_directory(directory: str | Path, delay_s: float = 0.0) -> tuple[str, Callable[[], None]]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread: returns (base URL, stop)."""
    server = LoopbackServer(directory, delay_s)
    return server.url, server.stop


def write_datacompdr_tars(
    root: str | Path,
    records: list[dict[str, object]],
    samples_per_tar: int = 4,
    tars_per_folder: int = 2,
    emb_dim: int = 8,
    seed: int = 0,
) -> list[Path]:
    """DataCompDR's published layout: numbered folders of numbered tars plus ``manifest.jsonl``; returns the tars.

    ``records``: dicts with ``uid``, ``syn_text`` (list) and optionally ``sha256`` and ``url``. Each sample is
    ``<key>.url.txt``, ``<key>.syn.json`` ({"syn_text"}), ``<key>.paug.json`` ({"param_aug"}), ``<key>.npz``
    (teacher ``image_emb`` [2, emb_dim] / ``text_emb`` [1 + captions, emb_dim], float16, seeded by the uid)
    and ``<key>.json`` ({"uid", "sha256"}); the member key is a running sample number, not the uid.
    """
    import json

    root = Path(root)
    tars: list[Path] = []
    manifest = []
    for t, start in enumerate(range(0, len(records), samples_per_tar)):
        folder = root / f"{t // tars_per_folder:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{t:08d}.tar"
        chunk = records[start : start + samples_per_tar]
        with TarBuilder.open(path) as tar:
            for i, rec in enumerate(chunk):
                meta = {"uid": rec["uid"], **({"sha256": rec["sha256"]} if rec.get("sha256") else {})}
                tar.write(
                    {
                        schema.KEY: f"{start + i:09d}",
                        "url.txt": str(rec.get("url", f"http://example.com/{rec['uid']}.jpg")),
                        schema.SYN_KEY: {"syn_text": list(rec["syn_text"])},  # type: ignore[arg-type]
                        "paug.json": {"param_aug": f"rrc-{seed}-{start + i}"},
                        schema.TEACHER_KEY: teacher_embeddings(
                            str(rec["uid"]), len(rec["syn_text"]), emb_dim
                        ),  # type: ignore[arg-type]
                        schema.META_KEY: meta,
                    }
                )
        tars.append(path)
        manifest.append({"shard": f"{t // tars_per_folder:08d}/{t:08d}", "num_samples": len(chunk)})
    (root / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    return tars


def teacher_embeddings(uid: str, num_captions: int, dim: int = 8) -> dict[str, np.ndarray]:
    """The fixture's teacher embeddings of ``uid``: fixed by the uid, so a test can recompute them."""
    rng = np.random.default_rng(int.from_bytes(uid.encode()[:8].ljust(8, b"\0"), "little"))
    return {
        "image_emb": rng.standard_normal((2, dim)).astype(np.float16),
        "text_emb": rng.standard_normal((1 + num_captions, dim)).astype(np.float16),
    }

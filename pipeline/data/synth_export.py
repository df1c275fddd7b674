"""Write the synthetic world out in the layouts real data arrives in (see docs/synthworld.md).

Layouts (each a folder under ``ExportConfig.out``):

* ``datacomp``: ``metadata/00000000.parquet`` (``uid, url, text, original_width, original_height, sha256,
  clip_b32_similarity_score, clip_l14_similarity_score``), ``images/<uid>.jpg``, DataCompDR-style synthetic
  captions as ``syn/syn_captions.jsonl`` (``{"uid", "syn_text": [...]}``) and as sidecar tars
  ``syn/00000.tar`` (``<uid>.syn.json``), and ``annotations.jsonl`` (the world's ground truth per uid).
  ``url`` is the image's absolute path, or ``base_url + "/images/<uid>.jpg"``; :func:`serve_directory`
  serves the folder over loopback HTTP so img2dataset (or the shard job) can fetch it.
* ``img2dataset``: what ``img2dataset --output_format webdataset`` writes: ``00000.tar`` (``<key>.jpg``,
  ``<key>.txt``, ``<key>.json`` with ``uid``/``url``/...), ``00000.parquet``, ``00000_stats.json``.
* ``imagenet``: ``<split>/<class>/<uid>.jpg`` (class = shape of the scene's main object), ``classes.txt``.
* ``coco``: ``images/<split>/<uid>.jpg``; ``annotations/instances_<split>.json`` (things: RLE masks from
  pycocotools, boxes, areas, colour/size/depth attributes; categories 1..8 = THING_CLASSES);
  ``annotations/stuff_<split>.json`` (COCO-Stuff style: one RLE annotation per stuff class present in an
  image; categories 101..108 = STUFF_CLASSES).
* ``ade20k``: ``images/<split>/<uid>.jpg``, ``annotations/<split>/<uid>.png`` (uint8; 0 = ignore, which this
  world never uses; k = SEMANTIC_CLASSES[k-1]), ``objectInfo.csv`` (Idx, Ratio, Train, Val, Name) and
  ``classes.txt``. Splits are named ``training`` / ``validation`` as in ADEChallengeData2016.
* ``nyuv2``: ``<split>/rgb/<uid>.png``, ``<split>/depth/<uid>.png`` (uint16 millimetres, 0 = invalid),
  ``<split>/label/<uid>.png`` (uint8 semantic, same indices as ade20k).

World splits: the pretraining pool (datacomp, img2dataset) is world split ``train``; the downstream sets
(imagenet, coco, ade20k, nyuv2) take their ``train`` from world split ``finetune`` and their ``val`` from
world split ``val``, so fine-tuning never sees pretraining images. Every layout folder is written into a
temporary sibling and renamed into place when complete (an interrupted export leaves no partial layout).

    from pipeline.data.synth_export import ExportConfig, export
    summary = export(ExportConfig(out="runs/synthworld", num_samples=1000))

Command line: ``python -m data_prep.synthworld --help``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io as _io
import json
import os
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import to_toml
from pipeline.data import schema as wds_schema
from pipeline.data import synthworld as sw
from pipeline.data.schema import encode_syn
from pipeline.data.tar import TarBuilder

LAYOUTS: tuple[str, ...] = ("datacomp", "img2dataset", "imagenet", "coco", "ade20k", "nyuv2")
POOL_LAYOUTS = ("datacomp", "img2dataset")
DOWNSTREAM_LAYOUTS = ("imagenet", "coco", "ade20k", "nyuv2")
POOL_SPLIT = "train"
DOWNSTREAM_SPLITS = {"train": "finetune", "val": "val"}
"""Downstream folder split -> world split."""
ADE_SPLITS = {"train": "training", "val": "validation"}
STUFF_CATEGORY_OFFSET = 101
DEPTH_SCALE = 1000.0
"""NYUv2-style depth PNGs store millimetres: metres = png / DEPTH_SCALE."""


@dataclass(frozen=True)
class ExportConfig:
    """What to generate and which layouts to write."""

    out: str = "runs/synthworld"
    """Output folder (local path); one sub-folder per layout."""
    num_samples: int = 1000
    """Pretraining pool size (world split 'train'), written in the datacomp / img2dataset layouts."""
    num_finetune: int = 200
    """Downstream train set size (world split 'finetune') for imagenet / coco / ade20k / nyuv2."""
    num_val: int = 200
    """Downstream val set size (world split 'val'); also the zero-shot / retrieval evaluation images."""
    layouts: str = "all"
    """Comma-separated layouts to write: 'all' or any of datacomp, img2dataset, imagenet, coco, ade20k,
    nyuv2."""
    num_syn_captions: int = 5
    """Synthetic (paraphrased precise) captions per pool image, DataCompDR style."""
    syn_seed: int = 0
    """Seed of the synthetic-caption paraphrases."""
    samples_per_shard: int = 1000
    """Samples per tar in the img2dataset layout and the synthetic-caption sidecar tars."""
    jpeg_quality: int = 95
    """JPEG quality of written images."""
    base_url: str = ""
    """If set, datacomp urls are base_url + '/images/<uid>.jpg' (e.g. a serve_directory URL); else
    absolute file paths."""
    world: sw.WorldConfig = field(default_factory=sw.WorldConfig)
    """The synthetic world's knobs."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_finetune", "num_val", "num_syn_captions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: must be in 1..100")
        if not self.out:
            raise ValueError("out: give an output folder")
        if "://" in self.out and not self.out.startswith("file://"):
            raise ValueError(
                f"out={self.out!r}: the export writes local folders (copy them to object storage)"
            )
        _ = self.layout_list  # raises on an unknown layout name

    @property
    def layout_list(self) -> tuple[str, ...]:
        names = [s.strip() for s in self.layouts.split(",") if s.strip()]
        if names == ["all"]:
            return LAYOUTS
        bad = [n for n in names if n not in LAYOUTS]
        if bad or not names:
            name = bad[0] if bad else ""
            raise ValueError(
                f"layouts={self.layouts!r}: unknown layout {name!r}; use all or {','.join(LAYOUTS)}"
            )
        return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- helpers


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 95, subsampling: int = 0) -> bytes:
    """PNG, or JPEG with PIL's chroma ``subsampling`` (0 = 4:4:4, the default here; 2 = 4:2:0)."""
    buf = _io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        # 4:4:4 chroma: small images with 1-pixel coloured outlines lose their colours under 4:2:0.
        Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def pretraining_sample(
    scene: sw.Scene, caption: str, syn_captions: list[str] | None, quality: int = 95
) -> dict[str, Any]:
    """One scene as a WebDataset sample in schema.py's layout, ready for ``TarWriter.write``: the image as a
    4:2:0 JPEG (like web images), ``caption`` as the web caption, the synthetic captions (member left out when
    None) and the metadata."""
    jpg = encode_image(scene.image, "jpg", quality, subsampling=2)
    meta = wds_schema.SampleMeta(
        uid=scene.uid,
        sha256=_sha256(jpg),
        original_width=scene.width,
        original_height=scene.height,
        width=scene.width,
        height=scene.height,
        source="synthworld",
    )
    sample: dict[str, Any] = {
        "__key__": scene.uid,
        wds_schema.IMAGE_KEY: jpg,
        wds_schema.CAPTION_KEY: caption.encode("utf-8"),
        wds_schema.META_KEY: meta.to_json(),
    }
    if syn_captions is not None:
        sample[wds_schema.SYN_KEY] = encode_syn(syn_captions)
    return sample


def write_pretraining_shards(
    out: str | os.PathLike[str],
    world: sw.WorldConfig,
    num_samples: int,
    per_shard: int,
    split: str = "train",
    num_syn: int | None = 3,
    precise_txt: bool = False,
    quality: int = 95,
    syn_seed: int = 0,
) -> list[str]:
    """Scenes ``0 .. num_samples - 1`` of ``split`` as pretraining shards ``<out>/00000.tar, ...`` (atomic,
    deterministic; :func:`pretraining_sample` per scene: the noisy or, with ``precise_txt``, the precise caption
    as the web caption, ``num_syn`` synthetic captions, None for no ``syn.json``). Returns the scene uids in
    shard order."""
    from pipeline.data.tar import TMP_DIR, open_shard

    uids: list[str] = []
    for s, start in enumerate(range(0, num_samples, per_shard)):
        with open_shard(os.path.join(os.fspath(out), f"{s:05d}.tar")) as tw:
            for index in range(start, min(num_samples, start + per_shard)):
                scene = sw.make_scene(world, index, split)
                caption = scene.precise_caption if precise_txt else scene.noisy_caption
                syn = sw.synthetic_captions(scene, num_syn, seed=syn_seed) if num_syn else None
                tw.write(pretraining_sample(scene, caption, syn, quality))
                uids.append(scene.uid)
    with contextlib.suppress(OSError):  # the temporaries' folder, once empty
        os.rmdir(os.path.join(os.fspath(out), TMP_DIR))
    return uids


def shard_pattern(out: str | os.PathLike[str], num_shards: int) -> str:
    """The brace pattern of ``<out>/00000.tar .. <out>/<num_shards - 1>.tar``."""
    return os.path.join(os.fspath(out), f"{{00000..{num_shards - 1:05d}}}.tar")


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a 2-D uint8 or uint16 array (16-bit PNG for uint16)."""
    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A label / depth PNG as a numpy array (uint16 depth stays uint16)."""
    with Image.open(path) as im:
        arr = np.array(im)
    return arr.astype(np.uint16) if arr.dtype == np.int32 else arr


def ade_label_map(semantic: np.ndarray) -> np.ndarray:
    """World semantic map (index into SEMANTIC_CLASSES) -> ADE-style label map (0 = ignore, k = class k-1)."""
    return (semantic.astype(np.uint16) + 1).astype(np.uint8)


def depth_png(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> NYUv2-style uint16 millimetres (0 means no depth)."""
    return np.clip(np.round(depth_m * DEPTH_SCALE), 0, 65535).astype(np.uint16)


def simulated_clip_scores(scene: sw.Scene) -> dict[str, float]:
    """Stand-ins for CLIP image-text similarity of the web caption: they rise with how faithful the alt-text
    is (share of things named with true attributes, minus wrong ones) plus noise, in the usual 0.1-0.4 range,
    so CLIP-score filtering in data prep keeps the better pairs as it does on real data."""
    named = sw.parse_objects(scene.noisy_caption)
    truth = {(t.size, t.colour, t.shape) for t in scene.things}
    right = sum(1 for p in named if p in truth)
    wrong = len(named) - right
    quality = max(0.0, (right - 0.5 * wrong) / max(len(truth), 1))
    r = np.random.default_rng(zlib.crc32(scene.uid.encode()))
    b32 = 0.12 + 0.2 * quality + 0.02 * float(r.standard_normal())
    l14 = 0.10 + 0.22 * quality + 0.02 * float(r.standard_normal())
    return {"clip_b32_similarity_score": round(b32, 6), "clip_l14_similarity_score": round(l14, 6)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)


def _open_tar(path: Path) -> TarBuilder:
    """A tar as ``tarfile.open(path, "w")`` writes it (pax, mode 0644, mtime 0), the way other tools' tars
    look; not atomic by itself (each layout is written in a staged folder)."""
    return TarBuilder.open(path, fmt="pax", mode=0o644)


@contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``final`` only when the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- writers


DATACOMP_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
        ("clip_b32_similarity_score", pa.float64()),
        ("clip_l14_similarity_score", pa.float64()),
    ]
)


class DataCompWriter:
    """Pool images as files + metadata parquet + DataCompDR synthetic captions (JSONL and sidecar tars)."""

    def __init__(self, root: Path, final_root: Path, cfg: ExportConfig) -> None:
        self.root, self.final_root, self.cfg = root, final_root, cfg
        self.rows: list[dict[str, Any]] = []
        self.syn: list[tuple[str, list[str]]] = []
        self.ann: list[str] = []

    def add(self, scene: sw.Scene, jpg: bytes) -> None:
        rel = f"images/{scene.uid}.jpg"
        _write_bytes(self.root / rel, jpg)
        url = (
            f"{self.cfg.base_url.rstrip('/')}/{rel}"
            if self.cfg.base_url
            else str((self.final_root / rel).resolve())
        )
        self.rows.append(
            {
                "uid": scene.uid,
                "url": url,
                "text": scene.noisy_caption,
                "original_width": scene.width,
                "original_height": scene.height,
                "sha256": _sha256(jpg),
                **simulated_clip_scores(scene),
            }
        )
        if self.cfg.num_syn_captions:
            self.syn.append(
                (scene.uid, sw.synthetic_captions(scene, self.cfg.num_syn_captions, self.cfg.syn_seed))
            )
        self.ann.append(json.dumps(sw.scene_annotation(scene), sort_keys=True))

    def close(self) -> dict[str, Any]:
        _write_parquet(self.root / "metadata" / "00000000.parquet", self.rows, DATACOMP_SCHEMA)
        _write_bytes(
            self.root / "annotations.jsonl", ("\n".join(self.ann) + "\n").encode() if self.ann else b""
        )
        if self.cfg.num_syn_captions:
            lines = [json.dumps({"uid": uid, "syn_text": caps}, ensure_ascii=False) for uid, caps in self.syn]
            _write_bytes(self.root / "syn" / "syn_captions.jsonl", ("\n".join(lines) + "\n").encode())
            per = self.cfg.samples_per_shard
            for shard, start in enumerate(range(0, len(self.syn), per)):
                with _open_tar(self.root / "syn" / f"{shard:05d}.tar") as tar:
                    for uid, caps in self.syn[start : start + per]:
                        tar.write({wds_schema.KEY: uid, wds_schema.SYN_KEY: caps})
        return {"samples": len(self.rows), "metadata": "metadata/00000000.parquet", "images": "images/"}


I2D_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("md5", pa.string()),
        ("sha256", pa.string()),
    ]
)
"""Columns of img2dataset 1.x's per-shard parquet (``uid`` is the saved additional column), plus sha256."""


class Img2DatasetWriter:
    """img2dataset's webdataset output. Keys are the shard number (5 digits) and the index in the shard
    (as many digits as samples_per_shard - 1 has), as img2dataset names them."""

    def __init__(self, root: Path, cfg: ExportConfig, datacomp_root: Path) -> None:
        self.root, self.cfg, self.datacomp_root = root, cfg, datacomp_root
        self.shard = -1
        self.count = 0
        self.tar: TarBuilder | None = None
        self.rows: list[dict[str, Any]] = []
        self.start = time.time()

    def _roll(self) -> None:
        self._finish_shard()
        self.shard += 1
        self.tar = _open_tar(self.root / f"{self.shard:05d}.tar")
        self.rows = []
        self.start = time.time()

    def _finish_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        _write_parquet(self.root / f"{self.shard:05d}.parquet", self.rows, I2D_SCHEMA)
        end = time.time()
        _write_json(
            self.root / f"{self.shard:05d}_stats.json",
            {
                "count": len(self.rows),
                "successes": len(self.rows),
                "failed_to_download": 0,
                "failed_to_resize": 0,
                "duration": round(end - self.start, 3),
                "start_time": self.start,
                "end_time": end,
                "status_dict": {"success": len(self.rows)},
            },
        )
        self.tar = None

    def add(self, scene: sw.Scene, jpg: bytes) -> None:
        if self.tar is None or len(self.rows) >= self.cfg.samples_per_shard:
            self._roll()
        assert self.tar is not None
        digits = len(str(max(self.cfg.samples_per_shard - 1, 1)))
        key = f"{self.shard:05d}{len(self.rows):0{digits}d}"
        rel = f"images/{scene.uid}.jpg"
        url = (
            f"{self.cfg.base_url.rstrip('/')}/{rel}"
            if self.cfg.base_url
            else str((self.datacomp_root / rel).resolve())
        )
        meta = {
            "uid": scene.uid,
            "caption": scene.noisy_caption,
            "url": url,
            "key": key,
            "status": "success",
            "error_message": None,
            "width": scene.width,
            "height": scene.height,
            "original_width": scene.width,
            "original_height": scene.height,
            "exif": "{}",
            "md5": hashlib.md5(jpg).hexdigest(),
            "sha256": _sha256(jpg),
        }
        # img2dataset's json: indented, in its own key order (stored as given)
        json_bytes = json.dumps(meta, indent=4, ensure_ascii=False).encode("utf-8")
        self.tar.write({wds_schema.KEY: key, "jpg": jpg, "txt": scene.noisy_caption, "json": json_bytes})
        self.rows.append(meta)
        self.count += 1

    def close(self) -> dict[str, Any]:
        self._finish_shard()
        return {"samples": self.count, "shards": self.shard + 1}


class ImageNetWriter:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.counts: dict[str, int] = {}

    def add(self, scene: sw.Scene, jpg: bytes, split: str) -> None:
        label = sw.main_thing(scene).shape
        _write_bytes(self.root / split / label / f"{scene.uid}.jpg", jpg)
        self.counts[split] = self.counts.get(split, 0) + 1

    def close(self) -> dict[str, Any]:
        _write_bytes(self.root / "classes.txt", ("\n".join(sw.THING_CLASSES) + "\n").encode())
        return {"samples": dict(self.counts)}


class CocoWriter:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data: dict[str, dict[str, list[Any]]] = {}

    def _split(self, split: str) -> dict[str, list[Any]]:
        return self.data.setdefault(split, {"images": [], "things": [], "stuff": []})

    def add(self, scene: sw.Scene, jpg: bytes, split: str) -> None:
        from pycocotools import mask as mask_utils

        d = self._split(split)
        image_id = len(d["images"]) + 1
        file_name = f"{scene.uid}.jpg"
        _write_bytes(self.root / "images" / split / file_name, jpg)
        d["images"].append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": scene.width,
                "height": scene.height,
                "uid": scene.uid,
            }
        )

        def rle(m: np.ndarray) -> dict[str, Any]:
            enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode("ascii")}

        for t in scene.things:
            x0, y0, x1, y1 = t.box
            d["things"].append(
                {
                    "id": 0,
                    "image_id": image_id,
                    "category_id": sw.THING_CLASSES.index(t.shape) + 1,
                    "segmentation": rle(t.mask),
                    "area": int(t.area),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                    "attributes": {"colour": t.colour, "size": t.size},
                    "depth": round(t.depth, 4),
                }
            )
        for name in sw.STUFF_CLASSES:
            m = scene.semantic == sw.STUFF_CLASSES.index(name)
            if not m.any():
                continue
            ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
            d["stuff"].append(
                {
                    "id": 0,
                    "image_id": image_id,
                    "category_id": STUFF_CATEGORY_OFFSET + sw.STUFF_CLASSES.index(name),
                    "segmentation": rle(m),
                    "area": int(m.sum()),
                    "bbox": [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)],
                    "iscrowd": 0,
                }
            )

    def close(self) -> dict[str, Any]:
        things_cats = [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(sw.THING_CLASSES)
        ]
        stuff_cats = [
            {"id": STUFF_CATEGORY_OFFSET + i, "name": n, "supercategory": "stuff"}
            for i, n in enumerate(sw.STUFF_CLASSES)
        ]
        info = {"description": "synthworld (pipeline.data.synthworld)", "version": "1"}
        out: dict[str, Any] = {}
        for split, d in self.data.items():
            for kind, cats in (("things", things_cats), ("stuff", stuff_cats)):
                anns = d[kind]
                for i, a in enumerate(anns, start=1):
                    a["id"] = i
                name = "instances" if kind == "things" else "stuff"
                _write_json(
                    self.root / "annotations" / f"{name}_{split}.json",
                    {"info": info, "images": d["images"], "annotations": anns, "categories": cats},
                )
            out[split] = {"images": len(d["images"]), "instances": len(d["things"]), "stuff": len(d["stuff"])}
        return out


class Ade20kWriter:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pixels = np.zeros(len(sw.SEMANTIC_CLASSES), np.int64)
        self.images = {s: np.zeros(len(sw.SEMANTIC_CLASSES), np.int64) for s in ADE_SPLITS.values()}
        self.counts: dict[str, int] = {}

    def add(self, scene: sw.Scene, jpg: bytes, split: str) -> None:
        folder = ADE_SPLITS[split]
        _write_bytes(self.root / "images" / folder / f"{scene.uid}.jpg", jpg)
        _write_bytes(
            self.root / "annotations" / folder / f"{scene.uid}.png", encode_png(ade_label_map(scene.semantic))
        )
        counts = np.bincount(scene.semantic.ravel(), minlength=len(sw.SEMANTIC_CLASSES))
        self.pixels += counts
        self.images[folder] += counts > 0
        self.counts[folder] = self.counts.get(folder, 0) + 1

    def close(self) -> dict[str, Any]:
        buf = _io.StringIO()
        w = csv.writer(buf)
        w.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        total = max(int(self.pixels.sum()), 1)
        for i, name in enumerate(sw.SEMANTIC_CLASSES):
            w.writerow(
                [
                    i + 1,
                    f"{self.pixels[i] / total:.6f}",
                    int(self.images["training"][i]),
                    int(self.images["validation"][i]),
                    name,
                ]
            )
        _write_bytes(self.root / "objectInfo.csv", buf.getvalue().encode())
        _write_bytes(
            self.root / "classes.txt", ("\n".join(("ignore",) + sw.SEMANTIC_CLASSES) + "\n").encode()
        )
        return {"samples": dict(self.counts)}


class NyuWriter:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.max_depth = 0.0
        self.counts: dict[str, int] = {}

    def add(self, scene: sw.Scene, png: bytes, split: str) -> None:
        base = self.root / split
        _write_bytes(base / "rgb" / f"{scene.uid}.png", png)
        _write_bytes(base / "depth" / f"{scene.uid}.png", encode_png(depth_png(scene.depth)))
        self.max_depth = max(self.max_depth, float(scene.depth.max()))
        _write_bytes(base / "label" / f"{scene.uid}.png", encode_png(ade_label_map(scene.semantic)))
        self.counts[split] = self.counts.get(split, 0) + 1

    def close(self) -> dict[str, Any]:
        _write_json(
            self.root / "info.json",
            {
                "depth": f"uint16 PNG, millimetres (metres = value / {DEPTH_SCALE:g}), 0 = invalid",
                "label": "uint8 PNG, 0 = ignore, k = classes[k] in classes.txt",
                "max_depth_m": round(self.max_depth, 3),
            },
        )
        _write_bytes(
            self.root / "classes.txt", ("\n".join(("ignore",) + sw.SEMANTIC_CLASSES) + "\n").encode()
        )
        return {"samples": dict(self.counts)}


# ------------------------------------------------------------------------------------------------ export


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Generate the world and write the requested layouts; returns the summary (also in summary.json)."""
    out = Path(cfg.out.removeprefix("file://")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    layouts = cfg.layout_list
    t0 = time.time()
    summary: dict[str, Any] = {"out": str(out.resolve()), "layouts": {}, "image_size": cfg.world.image_size}
    generated = 0
    with contextlib.ExitStack() as stack:
        roots = {name: stack.enter_context(_staged(out / name)) for name in layouts}
        pool: dict[str, Any] = {}
        if "datacomp" in roots:
            pool["datacomp"] = DataCompWriter(roots["datacomp"], out / "datacomp", cfg)
        if "img2dataset" in roots:
            pool["img2dataset"] = Img2DatasetWriter(roots["img2dataset"], cfg, out / "datacomp")
        if pool:
            for index in range(cfg.num_samples):
                scene = sw.make_scene(cfg.world, index, POOL_SPLIT)
                jpg = encode_image(scene.image, "jpg", cfg.jpeg_quality)
                for w in pool.values():
                    w.add(scene, jpg)
                generated += 1
        kinds = {"imagenet": ImageNetWriter, "coco": CocoWriter, "ade20k": Ade20kWriter, "nyuv2": NyuWriter}
        downstream = {name: kinds[name](roots[name]) for name in layouts if name in kinds}
        if downstream:
            for split, world_split in DOWNSTREAM_SPLITS.items():
                for index in range(cfg.num_finetune if split == "train" else cfg.num_val):
                    scene = sw.make_scene(cfg.world, index, world_split)
                    jpg = encode_image(scene.image, "jpg", cfg.jpeg_quality)
                    for name, w in downstream.items():
                        w.add(scene, encode_image(scene.image, "png") if name == "nyuv2" else jpg, split)
                    generated += 1
        for name, w in {**pool, **downstream}.items():
            summary["layouts"][name] = {"path": str(out / name), **w.close()}
        # Leaving the stack renames every staged folder into place.
    summary["scenes_generated"] = generated
    summary["seconds"] = round(time.time() - t0, 2)
    _atomic_text(out / "world.toml", to_toml(cfg))
    _atomic_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def with_base_url(datacomp_dir: str | os.PathLike[str], base_url: str, dest: str | os.PathLike[str]) -> str:
    """Write a copy of a datacomp layout's metadata with urls under ``base_url`` (e.g. from
    :func:`serve_directory` serving the layout folder); returns the new parquet path."""
    src = Path(datacomp_dir) / "metadata" / "00000000.parquet"
    table = pq.read_table(src)
    urls = [f"{base_url.rstrip('/')}/images/{uid}.jpg" for uid in table.column("uid").to_pylist()]
    table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp)
    os.replace(tmp, dest)
    return str(dest)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass


@contextmanager
def serve_directory(directory: str | os.PathLike[str]) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="synthworld-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

"""The one WebDataset sample schema, shared by every writer (data_prep) and reader (trainer, captioner).

A sample is a group of tar members sharing the key ``<uid>``:

    <uid>.jpg        the image, JPEG (RGB), resized by the shard job's policy
    <uid>.txt        the web caption (alt-text), UTF-8
    <uid>.syn.json   DataCompDR-compatible synthetic captions: {"syn_text": ["...", ...]}
    <uid>.json       metadata: {"uid", "sha256" (of the original image bytes), "original_width",
                     "original_height", "width", "height", "source", "scores": {name: float}, ...}
    <uid>.seg.png    optional: semantic label map (uint8 PNG, values index the dataset's class list)
    <uid>.depth.npy  optional: float32 depth map in metres
    <uid>.ann.json   optional: instances {"boxes": [[x0,y0,x1,y1]...], "labels": [...], ...}

Shard folders also hold ``sizes.json`` ({shard file name: samples}, open_clip's format), one
``<shard>.stats.json`` per shard, ``manifest.json`` describing the dataset and ``duplicate_images.txt``
(uids whose image bytes equal an earlier shard's sample; the loader skips them).

Tar member names follow one rule for every reader (:func:`member_key`): a name that is absolute, escapes
upwards (``..``) or holds NUL / backslash is unsafe and skipped; otherwise the key is the normalised path up
to the first dot of the base name (WebDataset's convention) and the extension the rest, lower-cased.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

IMAGE_KEY = "jpg"
CAPTION_KEY = "txt"
SYN_KEY = "syn.json"
META_KEY = "json"
SEG_KEY = "seg.png"
DEPTH_KEY = "depth.npy"
ANN_KEY = "ann.json"

SIZES_FILE = "sizes.json"
DUPLICATE_IMAGES_FILE = "duplicate_images.txt"
MANIFEST_FILE = "manifest.json"
STATS_SUFFIX = ".stats.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SampleMeta:
    """The ``json`` member of every sample."""

    uid: str
    sha256: str
    original_width: int
    original_height: int
    width: int
    height: int
    source: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = {
            "uid": self.uid,
            "sha256": self.sha256,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "width": self.width,
            "height": self.height,
            "source": self.source,
            "scores": self.scores,
            **self.extra,
        }
        return json.dumps(d, sort_keys=True, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> SampleMeta:
        d = json.loads(data) if isinstance(data, (bytes, str)) else dict(data)
        known = {"uid", "sha256", "original_width", "original_height", "width", "height", "source", "scores"}
        return cls(
            uid=str(d["uid"]),
            sha256=str(d.get("sha256", "")),
            original_width=int(d.get("original_width", 0)),
            original_height=int(d.get("original_height", 0)),
            width=int(d.get("width", 0)),
            height=int(d.get("height", 0)),
            source=str(d.get("source", "")),
            scores=dict(d.get("scores", {})),
            extra={k: v for k, v in d.items() if k not in known},
        )


def encode_syn(captions: list[str]) -> bytes:
    return json.dumps({"syn_text": list(captions)}, ensure_ascii=False).encode("utf-8")


def decode_syn(data: bytes | str) -> list[str]:
    d = json.loads(data)
    texts = d.get("syn_text", []) if isinstance(d, dict) else []
    return [t for t in texts if isinstance(t, str) and t.strip()]


def safe_member_name(name: str) -> str | None:
    """The normalised tar member name, or ``None`` when it is absolute, escapes upwards or has NUL / backslash."""
    if not name or "\x00" in name or "\\" in name:
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("/") or norm in (".", "") or any(part == ".." for part in norm.split("/")):
        return None
    return norm


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name, the rule every reader of shards follows.

    ``dir/abc.seg.PNG`` -> (``dir/abc``, ``seg.png``). ``None`` when the name is unsafe (see
    :func:`safe_member_name`); ``("", "")`` when it is safe but names no sample member (a hidden base name
    such as ``.hidden.txt``, or no extension): readers skip both, and count the unsafe ones.
    """
    norm = safe_member_name(name)
    if norm is None:
        return None
    head, base = posixpath.split(norm)
    stem, _, ext = base.partition(".")
    if not stem or not ext:
        return "", ""
    return (posixpath.join(head, stem) if head else stem), ext.lower()

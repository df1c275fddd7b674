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
    <uid>.npz        optional: DataCompDR teacher embeddings {"image_emb": array, "text_emb": array}
                     (carried verbatim from DataCompDR's tars by the shard job's ``syn.teacher_embeddings``)

Shard folders also hold ``sizes.json`` ({shard file name: samples}, open_clip's format), one
``<shard>.stats.json`` per shard, ``manifest.json`` describing the dataset and ``duplicate_images.txt``
(uids whose image bytes equal an earlier shard's sample; the loader skips them).

One sample, as the codec sees it, is a dict ``{"__key__": uid, extension: value}``: :func:`encode_sample`
turns it into its tar members ``[(name, bytes)]`` in :data:`MEMBER_ORDER` (image, caption, synthetic
captions, metadata, dense labels, then any other extension alphabetically), :func:`decode_sample` back.
Bytes are stored verbatim (images are encoded by the shard job's image policy, never here); ``txt`` is
UTF-8; ``json`` is a :class:`SampleMeta` or a dict (key-sorted JSON); ``syn.json`` a list of captions
(:func:`encode_syn`) or a dict (JSON in its own key order); other ``*.json`` dicts are key-sorted JSON;
``*.npy`` numpy arrays; ``npz`` a dict of arrays (a zip with fixed timestamps, so byte-identical). Tars themselves are read and written by :mod:`pipeline.data.tar`.

Tar member names follow one rule for every reader (:func:`member_key`): a name that is absolute, escapes
upwards (``..``) or holds NUL / backslash is unsafe and skipped; otherwise the key is the normalised path up
to the first dot of the base name (WebDataset's convention) and the extension the rest, lower-cased.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IMAGE_KEY = "jpg"
CAPTION_KEY = "txt"
SYN_KEY = "syn.json"
META_KEY = "json"
SEG_KEY = "seg.png"
DEPTH_KEY = "depth.npy"
ANN_KEY = "ann.json"
TEACHER_KEY = "npz"

SIZES_FILE = "sizes.json"
DUPLICATE_IMAGES_FILE = "duplicate_images.txt"
MANIFEST_FILE = "manifest.json"
STATS_SUFFIX = ".stats.json"
SCHEMA_VERSION = 1
KEY = "__key__"  # the sample's key (uid) in a sample dict, as in WebDataset
SYN_SCORES_FIELD = "syn_clip_scores"  # in syn.json and json: the quality filter's score per caption
MEMBER_ORDER = (IMAGE_KEY, CAPTION_KEY, SYN_KEY, META_KEY, SEG_KEY, DEPTH_KEY, ANN_KEY)
"""Order of a sample's members in a tar; other extensions follow, alphabetically."""


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


def encode_syn(captions: list[str], scores: list[float | None] | None = None) -> bytes:
    """The ``syn.json`` member: ``{"syn_text": [...]}``, plus the quality filter's scores when given."""
    payload: dict[str, Any] = {"syn_text": list(captions)}
    if scores is not None:
        payload[SYN_SCORES_FIELD] = list(scores)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def decode_syn(data: bytes | str) -> list[str]:
    d = json.loads(data)
    texts = d.get("syn_text", []) if isinstance(d, dict) else []
    return [t for t in texts if isinstance(t, str) and t.strip()]


def encode_npz(arrays: Mapping[str, Any]) -> bytes:
    """A ``.npz`` of named arrays that numpy's ``np.load`` reads, with fixed zip timestamps (``np.savez``
    stamps the current time, so its bytes differ between runs)."""
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.save(member, np.asarray(arrays[name]), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def decode_npz(data: bytes) -> dict[str, Any]:
    """``{name: array}`` of an ``.npz`` member."""
    import io

    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


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


# ---------------------------------------------------------------------------------------------- the codec


def _member_rank(ext: str) -> tuple[int, str]:
    return (MEMBER_ORDER.index(ext), ext) if ext in MEMBER_ORDER else (len(MEMBER_ORDER), ext)


def member_names(key: str, members: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """``[(tar member name, bytes)]`` of a sample's encoded members, in :data:`MEMBER_ORDER`."""
    return [(f"{key}.{ext}", members[ext]) for ext in sorted(members, key=_member_rank)]


def encode_member(ext: str, value: Any) -> bytes:
    """One member's bytes by its extension and value type (see the module docstring)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, SampleMeta):
        return value.to_json()
    if ext == SYN_KEY and isinstance(value, (list, tuple)):
        return encode_syn(list(value))
    if ext.endswith("json") and isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=ext != SYN_KEY, ensure_ascii=False).encode("utf-8")
    if ext.endswith("npz") and isinstance(value, Mapping):
        return encode_npz(value)
    if ext.endswith("npy") and hasattr(value, "dtype"):
        import io

        import numpy as np

        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    raise TypeError(f"cannot encode a {type(value).__name__} as a .{ext} member")


def encode_members(sample: Mapping[str, Any]) -> dict[str, bytes]:
    """``{extension: bytes}`` of a sample dict (keys starting with ``__`` are not members)."""
    return {ext: encode_member(ext, v) for ext, v in sample.items() if not ext.startswith("__")}


def encode_sample(sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """A sample dict ``{"__key__": uid, ext: value}`` as its tar members ``[(name, bytes)]``, in order."""
    key = sample[KEY]
    if not isinstance(key, str) or member_key(f"{key}.x") != (key, "x"):
        raise ValueError(f"sample key {key!r} is not a safe member name stem")
    return member_names(key, encode_members(sample))


def decode_member(ext: str, data: bytes) -> Any:
    """One member's value from its bytes: ``txt`` str, ``syn.json`` captions, other JSON, ``*.npy`` array,
    anything else (images) the bytes."""
    if ext == CAPTION_KEY:
        return data.decode("utf-8")
    if ext == SYN_KEY:
        return decode_syn(data)
    if ext.endswith("json"):
        return json.loads(data)
    if ext.endswith("npy"):
        import io

        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext.endswith("npz"):
        return decode_npz(data)
    return data


def decode_sample(members: Iterable[tuple[str, bytes]]) -> dict[str, Any]:
    """A sample dict from its tar members ``[(name, bytes)]`` (all of one key), the inverse of
    :func:`encode_sample` (up to :func:`decode_syn` dropping blank captions)."""
    sample: dict[str, Any] = {}
    for name, data in members:
        parts = member_key(name)
        if parts is None or not parts[0]:
            raise ValueError(f"{name!r} is not a sample member name")
        key, ext = parts
        if sample.setdefault(KEY, key) != key:
            raise ValueError(f"members of two samples: {sample[KEY]!r} and {key!r}")
        sample[ext] = decode_member(ext, data)
    return sample

"""Inputs of the shard job: metadata rows, the images they point to, and synthetic captions to join.

* DataComp-style parquet (``uid, url, text, <scores>...``): read by row range (only the row groups that
  overlap), so every output shard is an independent unit of work.
* A plain folder of images with ``.txt`` captions: listed once into a parquet of the same shape.
* Images by URL (``http(s)://``, ``s3://`` or any fsspec URL, or a local path, optionally relative to
  ``source.image_root``), fetched by a thread pool with timeouts, retries and a size cap; or from an
  img2dataset output folder (tars or files), joined by uid (or url) through an index of byte ranges.
* DataCompDR-style synthetic captions (``{"syn_text": [...]}``) from JSONL files, our sidecar tars, or
  DataCompDR's published tars as they are (``<key>.syn.json``, ``<key>.json`` with the uid and sha256,
  ``<key>.npz`` teacher embeddings, ...: joined by the json's uid, not the member key). The shard job joins
  them per shard through :mod:`pipeline.data.prep.index` (or, ``syn.join=memory``, from one dict per worker).

Everything external is read through fsspec (``pipeline.io.filesystem``), tars through ``safe_tar``.
"""

from __future__ import annotations

import gzip
import io as _io
import json
import os
import posixpath
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.data.prep import safe_tar
from pipeline.data.schema import META_KEY, SYN_KEY, TEACHER_KEY

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MISSING = object()  # a column the file does not have


@dataclass(frozen=True)
class FetchConfig:
    threads: int = 16
    """Concurrent downloads / reads per worker process."""
    timeout_s: float = 10.0
    """Connect + read timeout per attempt."""
    retries: int = 2
    """Extra attempts after a failed fetch (not after 404-like errors)."""
    backoff_s: float = 0.5
    """Wait before retry k is backoff_s * 2**k."""
    max_bytes: int = 32 << 20
    """Images larger than this fail as too_large (never read into memory beyond the cap)."""
    user_agent: str = "clip-pipeline-shard/1.0"
    """HTTP User-Agent header."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.retries < 0 or self.timeout_s <= 0 or self.max_bytes <= 0:
            raise ValueError("retries must be >= 0 and timeout_s, max_bytes > 0")


@dataclass(frozen=True)
class SynConfig:
    paths: tuple[str, ...] = ()
    """DataCompDR-style synthetic captions: JSONL files ({"uid"|"key": ..., "syn_text": [...]}, .gz ok),
    sidecar tars with <uid>.syn.json members, or DataCompDR's tars (<key>.syn.json beside <key>.json holding
    the uid and sha256; folders are searched, manifest.jsonl skipped); globs and URLs allowed. Joined by uid."""
    join: Literal["index", "memory"] = "index"
    """index: an index step partitions the caption records by the shard plan and each shard task reads only
    its own rows' captions (memory independent of the caption set); memory: every worker loads all of them
    into one dict (small caption sets)."""
    partition_mb: int = 1024
    """Index step: the caption files are hash-partitioned into ceil(their bytes / partition_mb) partitions;
    a join task holds one partition (and its rows' uids) in memory."""
    teacher_embeddings: bool = False
    """Carry DataCompDR's <key>.npz teacher embeddings (image_emb, text_emb) into each sample as an npz member."""
    required: bool = False
    """Rows without synthetic captions fail as syn_missing (otherwise they get no syn.json)."""
    max_captions: int = 0
    """Keep at most this many synthetic captions per sample (0: all)."""

    def __post_init__(self) -> None:
        if self.max_captions < 0:
            raise ValueError(f"max_captions must be >= 0, got {self.max_captions}")
        if self.join not in ("index", "memory"):
            raise ValueError(f"join must be index or memory, got {self.join!r}")
        if self.partition_mb < 1:
            raise ValueError(f"partition_mb must be >= 1, got {self.partition_mb}")


@dataclass(frozen=True)
class SourceConfig:
    kind: Literal["parquet", "folder"] = "parquet"
    """parquet: metadata tables (DataComp style); folder: a folder of images with .txt captions."""
    parquet: tuple[str, ...] = ()
    """Parquet files, globs or folders (local paths or URLs), read in this order (globs sorted)."""
    folder: str = ""
    """For kind=folder: the folder, searched recursively for images; captions from <stem>.txt beside them."""
    uid_column: str = "uid"
    """Parquet column with the sample id (becomes the tar key)."""
    url_column: str = "url"
    """Parquet column with the image URL or path (also the img2dataset url join key)."""
    text_column: str = "text"
    """Parquet column with the web caption (string or binary UTF-8)."""
    score_columns: tuple[str, ...] = ()
    """Columns copied into json "scores"; empty: every numeric column whose name contains "score"."""
    images: Literal["url", "img2dataset"] = "url"
    """Where images come from: url = fetch the url column; img2dataset = an img2dataset output folder."""
    image_root: str = ""
    """Prefix for relative paths in the url column (a folder or URL)."""
    img2dataset: str = ""
    """For images=img2dataset: the img2dataset output folder (webdataset tars or files format)."""
    img2dataset_join: Literal["uid", "url"] = "uid"
    """Join img2dataset samples to rows by their json's uid (needs save_additional_columns=["uid"]) or url."""
    img2dataset_index: Literal["index", "memory"] = "index"
    """How workers look images up: index = the img2dataset index joined to the plan's rows per shard by array
    tasks (:mod:`pipeline.data.prep.index`; a shard task loads only its own rows' entries); memory = one
    index built while planning and loaded whole into every worker (the old path, kept for comparison)."""
    max_member_bytes: int = 64 << 20
    """Members of external tars larger than this are skipped."""
    extras: tuple[str, ...] = ()
    """For kind=folder: dense labels copied verbatim into the sample from files beside each image
    (<stem>.<ext>), e.g. ["seg.png", "depth.npy", "ann.json"]; needs image.resize_mode=none."""

    def check_required(self) -> None:
        """Raise ValueError naming the missing field (called by the job: empty defaults keep --help working)."""
        if self.kind == "parquet" and not self.parquet:
            raise ValueError(
                "source.parquet: give at least one parquet file, glob or folder (or kind=folder)"
            )
        if self.kind == "folder" and not self.folder:
            raise ValueError("source.folder: required when source.kind=folder")
        if self.images == "img2dataset" and not self.img2dataset:
            raise ValueError("source.img2dataset: required when source.images=img2dataset")
        if self.img2dataset_index not in ("index", "memory"):
            raise ValueError(f"source.img2dataset_index: index or memory, got {self.img2dataset_index!r}")
        if self.extras and self.kind != "folder":
            raise ValueError("source.extras: only a folder source (source.kind=folder) has extras")
        reserved = {"jpg", "txt", "json", "syn.json"}
        if reserved & set(self.extras):
            raise ValueError(f"source.extras: {sorted(reserved & set(self.extras))} are written by the job")
        if self.kind == "folder" and self.images != "url":
            raise ValueError("source.images: a folder source reads its own images; leave images=url")


# ---------------------------------------------------------------------------------------------- listing


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_urls(patterns: Sequence[str], suffixes: tuple[str, ...] = (".parquet",)) -> list[str]:
    """Files named by ``patterns`` (files, globs, folders searched for ``suffixes``), sorted per pattern.

    A glob may match nothing; a plain path that does not exist raises ``FileNotFoundError(pattern)`` (a typo
    must not read as an empty input).
    """
    out: list[str] = []
    for pattern in patterns:
        fs, path = io.filesystem(pattern)
        if _has_glob(path):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(suffixes))
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(pattern)
        local = io.is_local(pattern)
        for p in found:
            url = p if local else fs.unstrip_protocol(p)
            if url not in out:
                out.append(url)
    return out


def count_rows(url: str) -> int:
    """Rows in a parquet file, from its footer (raises when the footer cannot be read)."""
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def list_folder(cfg: SourceConfig) -> pa.Table:
    """The images of a folder source as a table (uid, url, text_path), sorted by relative path.

    ``url`` and ``text_path`` are relative to the folder (so shards do not depend on where it lies). The
    uid is the relative path without extension with every character outside [A-Za-z0-9_-] replaced by
    ``_`` (``cats/img.1.jpg`` -> ``cats_img_1``); collisions are reported as duplicate_uid.
    """
    fs, root = io.filesystem(cfg.folder)
    root = root.rstrip("/")
    suffixes = tuple("." + e for e in IMAGE_EXTENSIONS)
    extras = tuple("." + e for e in cfg.extras)  # a.seg.png is a's label, not an image
    rels = sorted(
        posixpath.relpath(p, root)
        for p in fs.find(root)
        if p.lower().endswith(suffixes) and not p.endswith(extras)
    )
    uids = []
    for rel in rels:
        stem = rel.rsplit(".", 1)[0]
        uids.append("".join(c if (c.isascii() and (c.isalnum() or c in "_-")) else "_" for c in stem))
    text_paths = [rel.rsplit(".", 1)[0] + ".txt" for rel in rels]
    return pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "url": pa.array(rels, pa.string()),
            "text_path": pa.array(text_paths, pa.string()),
        }
    )


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class InputRow:
    row: int
    """Index of the row in its input file."""
    uid: Any
    url: Any
    text: Any
    text_path: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)


def _score_columns(schema: pa.Schema, cfg: SourceConfig) -> list[str]:
    if cfg.score_columns:
        return [c for c in cfg.score_columns if c in schema.names]
    return [
        f.name
        for f in schema
        if "score" in f.name.lower() and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))
    ]


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _values(col: pa.ChunkedArray) -> list[Any]:
    """Python values; strings come back as bytes so that one bad UTF-8 value fails its row, not the file."""
    if pa.types.is_string(col.type):
        col = col.cast(pa.binary())
    elif pa.types.is_large_string(col.type):
        col = col.cast(pa.large_binary())
    return col.to_pylist()


def _text(value: Any) -> Any:
    """Decode bytes as strict UTF-8; invalid bytes and other values come back unchanged."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def read_rows(url: str, start: int, end: int, cfg: SourceConfig) -> list[InputRow]:
    """Rows ``[start, end)`` of a parquet file, reading only the row groups that overlap the range.

    Columns the file lacks come back as :data:`MISSING`; the caller turns that into ``malformed_row``.
    """
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        groups, first = [], None
        offset = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if offset < end and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        names = pf.schema_arrow.names
        wanted = [cfg.uid_column, cfg.url_column, cfg.text_column, "text_path"]
        scores = _score_columns(pf.schema_arrow, cfg)
        columns = [c for c in dict.fromkeys(wanted + scores) if c in names]
        if not groups:
            return []
        table = pf.read_row_groups(groups, columns=columns).slice(start - first, end - start)
    data = {c: _values(table.column(c)) for c in columns}
    n = table.num_rows

    def col(name: str) -> list[Any]:
        return data[name] if name in data else [MISSING] * n

    uids, urls, texts = col(cfg.uid_column), col(cfg.url_column), col(cfg.text_column)
    tpaths = data.get("text_path", [None] * n)
    return [
        InputRow(
            row=start + i,
            uid=uids[i],
            url=_text(urls[i]),
            text=texts[i],
            text_path=_text(tpaths[i]),
            scores={c: _as_score(data[c][i]) for c in scores},
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------- fetching


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a URL or path, optionally a byte range inside it (img2dataset tars)."""

    url: str
    offset: int = -1
    size: int = -1


class _Permanent(Exception):
    """A fetch error that retrying will not fix (404, missing file, too large)."""


class Fetcher:
    """Reads image bytes from http(s), any fsspec URL or local paths, with timeouts, retries and a size cap."""

    def __init__(self, cfg: FetchConfig, image_root: str = "") -> None:
        self.cfg = cfg
        self.image_root = image_root
        self._lock = threading.Lock()
        self._filesystems: dict[str, Any] = {}

    def resolve(self, url: str) -> str:
        if self.image_root and "://" not in url and not os.path.isabs(url):
            return io.join(self.image_root, url)
        return url

    def fetch(self, ref: ImageRef) -> bytes:
        url = self.resolve(ref.url)
        if 0 <= ref.size and ref.size > self.cfg.max_bytes:
            raise FetchError("too_large", f"{ref.size} bytes")
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                return self._fetch_once(url, ref)
            except FetchError:
                raise
            except _Permanent as e:
                raise FetchError("fetch_failed", str(e)) from None
            except Exception as e:  # noqa: BLE001 - network / S3 / OS errors are all retried, then reported
                last = f"{type(e).__name__}: {e}"
        raise FetchError("fetch_failed", last[:500])

    def _limit(self, data: bytes) -> bytes:
        if len(data) > self.cfg.max_bytes:
            raise FetchError("too_large", f"> {self.cfg.max_bytes} bytes")
        return data

    def _fetch_once(self, url: str, ref: ImageRef) -> bytes:
        if url.startswith(("http://", "https://")) and ref.offset < 0:
            return self._http(url)
        if io.is_local(url):
            path = url[len("file://") :] if url.startswith("file://") else url
            try:
                with open(path, "rb") as f:
                    if ref.offset >= 0:
                        return safe_tar.read_range(f, safe_tar.TarEntry(path, ref.offset, ref.size))
                    return self._limit(f.read(self.cfg.max_bytes + 1))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
                raise _Permanent(f"{type(e).__name__}: {e}") from None
        fs, path = self._filesystem(url)
        try:
            if ref.offset >= 0:
                data = fs.cat_file(path, start=ref.offset, end=ref.offset + ref.size)
                if len(data) != ref.size:
                    raise EOFError(f"short read {len(data)} of {ref.size} bytes")
                return data
            with fs.open(path, "rb") as f:
                return self._limit(f.read(self.cfg.max_bytes + 1))
        except FileNotFoundError as e:
            raise _Permanent(f"not found: {e}") from None

    def _filesystem(self, url: str) -> tuple[Any, str]:
        protocol = url.split("://", 1)[0]
        with self._lock:
            if protocol not in self._filesystems:
                self._filesystems[protocol] = io.filesystem(url)[0]
            fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(url)

    def _http(self, url: str) -> bytes:
        req = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.cfg.max_bytes:
                    raise FetchError("too_large", f"Content-Length {length}")
                return self._limit(resp.read(self.cfg.max_bytes + 1))
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise _Permanent(f"HTTP {e.code}") from None
            raise


def read_caption_file(url: str) -> bytes | None:
    """Bytes of a ``.txt`` caption beside a folder image, or None when there is none."""
    try:
        if io.is_local(url):
            with open(url, "rb") as f:
                return f.read(1 << 20)
        fs, path = io.filesystem(url)
        with fs.open(path, "rb") as f:
            return f.read(1 << 20)
    except (FileNotFoundError, IsADirectoryError):
        return None


# ---------------------------------------------------------------------------------------------- syn captions


def _parse_syn(obj: Any, max_captions: int) -> list[str] | None:
    texts = obj.get("syn_text") if isinstance(obj, dict) else None
    if not isinstance(texts, list):
        return None
    clean = [t for t in texts if isinstance(t, str) and t.strip()]
    return clean[:max_captions] if max_captions else clean


class SynRecord(NamedTuple):
    """One caption record: the sample's synthetic captions, and from DataCompDR's tars the sha256 of the image
    the captions describe and the teacher-embedding npz bytes (when asked for)."""

    texts: list[str]
    sha256: str | None = None
    teacher: bytes | None = None


@dataclass
class SynReport:
    loaded: int = 0
    invalid: int = 0
    duplicates: int = 0
    tar: safe_tar.TarReport = field(default_factory=safe_tar.TarReport)


SYN_SUFFIXES = (".jsonl", ".jsonl.gz", ".tar", ".tar.gz", ".tgz")
MANIFEST_NAME = "manifest.jsonl"  # DataCompDR's list of its tars, not caption records


def syn_files(cfg: SynConfig) -> list[str]:
    """The caption files of ``cfg.paths`` in read order (DataCompDR's ``manifest.jsonl`` left out)."""
    return [
        u for u in expand_urls(cfg.paths, suffixes=SYN_SUFFIXES) if posixpath.basename(u) != MANIFEST_NAME
    ]


def _tar_record(
    key: str, members: dict[str, bytes], teacher: bool
) -> tuple[str, Any, str | None, bytes | None]:
    """(uid, parsed syn.json, sha256, npz) of one sidecar / DataCompDR sample. The uid is the ``json``
    member's (DataCompDR's member keys are not uids), else the member key (our sidecars)."""
    uid, sha = posixpath.basename(key), None
    if META_KEY in members:
        try:
            meta = json.loads(members[META_KEY])
        except ValueError:
            meta = None
        if isinstance(meta, dict) and meta.get("uid") is not None:
            uid = str(meta["uid"])
            sha = meta.get("sha256") if isinstance(meta.get("sha256"), str) else None
    return uid, json.loads(members[SYN_KEY]), sha, members.get(TEACHER_KEY) if teacher else None


def iter_file_records(
    url: str, cfg: SynConfig, max_member_bytes: int, report: SynReport
) -> Iterator[tuple[str, Any]]:
    """``(uid, SynRecord | None)`` of one caption file in file order (None: the record is not valid)."""
    fs, path = io.filesystem(url)
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        with fs.open(path, "rb") as f:
            for key, members in safe_tar.iter_tar_samples(f, max_member_bytes, report.tar):
                if SYN_KEY not in members:
                    continue
                try:
                    uid, obj, sha, teacher = _tar_record(key, members, cfg.teacher_embeddings)
                except ValueError:
                    report.invalid += 1
                    continue
                texts = _parse_syn(obj, cfg.max_captions)
                yield uid, None if texts is None else SynRecord(texts, sha, teacher)
        return
    with fs.open(path, "rb") as raw:
        stream = gzip.open(raw) if path.endswith(".gz") else raw
        for line in _io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                uid = obj.get("uid", obj.get("key"))
            except (ValueError, AttributeError):
                report.invalid += 1
                continue
            if uid is None:
                report.invalid += 1
                continue
            texts = _parse_syn(obj, cfg.max_captions)
            sha = obj.get("sha256") if isinstance(obj.get("sha256"), str) else None
            yield str(uid), None if texts is None else SynRecord(texts, sha)


def load_syn(cfg: SynConfig, max_member_bytes: int = 64 << 20) -> tuple[dict[str, SynRecord], SynReport]:
    """uid -> caption record (the first record of a uid wins), plus what was skipped: the in-memory join."""
    report = SynReport()
    out: dict[str, SynRecord] = {}
    for url in syn_files(cfg):
        for uid, rec in iter_file_records(url, cfg, max_member_bytes, report):
            if rec is None:
                report.invalid += 1
            elif uid in out:
                report.duplicates += 1
            else:
                out[uid] = rec
                report.loaded += 1
    return out, report


# ---------------------------------------------------------------------------------------------- img2dataset


_IMAGE_EXT_SET = frozenset(IMAGE_EXTENSIONS)


def _index_sample(
    members: dict[str, tuple[str, int, int]], read: Any, join: str
) -> tuple[str, tuple[str, int, int]] | None:
    """(join key, image location) for one img2dataset sample, or None when it is not a usable success."""
    image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
    if image is None or "json" not in members:
        return None
    try:
        meta = json.loads(read(members["json"]))
    except (ValueError, OSError, EOFError):
        return None
    if not isinstance(meta, dict) or meta.get("status", "success") != "success":
        return None
    value = meta.get(join)
    if value is None:
        return None
    return str(value), image


def img2dataset_items(cfg: SourceConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The img2dataset output's index work items, in first-key-wins order: ``("tar", (path,))`` per tar,
    then ``("files", paths)`` per folder of the files output format (its image and json files)."""
    fs, root = io.filesystem(cfg.img2dataset)
    files = sorted(fs.find(root))
    items: list[tuple[str, tuple[str, ...]]] = [("tar", (p,)) for p in files if p.endswith(".tar")]
    by_dir: dict[str, list[str]] = {}
    for path in files:
        ext = posixpath.basename(path).partition(".")[2]
        if ext in _IMAGE_EXT_SET or ext == "json":
            by_dir.setdefault(posixpath.dirname(path), []).append(path)
    for d in sorted(by_dir):  # a folder with jsons only (img2dataset's <shard>_stats.json) has no sample
        if any(posixpath.basename(p).partition(".")[2] in _IMAGE_EXT_SET for p in by_dir[d]):
            items.append(("files", tuple(by_dir[d])))
    return items


def index_img2dataset_item(
    cfg: SourceConfig, item: tuple[str, tuple[str, ...]], report: safe_tar.TarReport
) -> Iterator[tuple[str, tuple[str, int, int]]]:
    """(join key, (url, byte offset, size)) of each usable sample of one work item of
    :func:`img2dataset_items`. Tars: headers are read (data skipped) and each sample's small json member is
    read to get the key. Files output: ``<shard>/<key>.jpg`` beside ``<key>.json`` (offset and size -1)."""
    fs, _ = io.filesystem(cfg.img2dataset)
    local = io.is_local(cfg.img2dataset)
    kind, paths = item
    if kind == "tar":
        path = paths[0]
        url = path if local else fs.unstrip_protocol(path)
        with fs.open(path, "rb") as f:
            entries = safe_tar.index_tar(f, cfg.max_member_bytes, report)

            def read(loc: tuple[str, int, int]) -> bytes:
                return safe_tar.read_range(f, safe_tar.TarEntry(loc[0], loc[1], loc[2]))

            groups: dict[str, dict[str, tuple[str, int, int]]] = {}
            for e in entries:
                key, ext = safe_tar.split_key(e.name)
                groups.setdefault(key, {})[ext] = (url, e.offset, e.size)
            for key in groups:
                found = _index_sample(groups[key], read, cfg.img2dataset_join)
                if found is not None:
                    yield found
        return
    by_key: dict[str, dict[str, tuple[str, int, int]]] = {}
    for path in paths:
        stem, _, ext = posixpath.basename(path).partition(".")
        url = path if local else fs.unstrip_protocol(path)
        by_key.setdefault(stem, {})[ext] = (url, -1, -1)

    def read_file(loc: tuple[str, int, int]) -> bytes:
        with fs.open(fs._strip_protocol(loc[0]) if not local else loc[0], "rb") as f:
            return f.read(1 << 20)

    for stem in sorted(by_key):
        found = _index_sample(by_key[stem], read_file, cfg.img2dataset_join)
        if found is not None:
            yield found


def build_img2dataset_index(cfg: SourceConfig) -> tuple[pa.Table, safe_tar.TarReport]:
    """Index an img2dataset output folder in one process (``source.img2dataset_index=memory``): join key
    (uid or url) -> (file, byte offset, size) of the image; the first key wins, in :func:`img2dataset_items`
    order. The per-shard index (:mod:`pipeline.data.prep.index`) runs the same items as array tasks."""
    report = safe_tar.TarReport()
    keys: list[str] = []
    locs: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    for item in img2dataset_items(cfg):
        for key, loc in index_img2dataset_item(cfg, item, report):
            if key not in seen:
                seen.add(key)
                keys.append(key)
                locs.append(loc)
    return (
        pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "url": pa.array([loc[0] for loc in locs], pa.string()),
                "offset": pa.array([loc[1] for loc in locs], pa.int64()),
                "size": pa.array([loc[2] for loc in locs], pa.int64()),
            }
        ),
        report,
    )

"""Deterministic, atomic WebDataset shard writing, per-shard stats and the dataset-level files.

Every file is built in a temporary file and published in one step (:func:`atomic_file`): ``os.replace``
from ``<output>/_tmp/`` onto its name for local folders, a single upload for object stores, so neither ever
shows a partial tar and the shards' folder never holds a temporary. A shard's ``<name>.stats.json`` is
written after the tar and is the completion marker a re-run checks.

Tars are byte-identical for identical samples: GNU format, members in sample order and, within a sample, in
:data:`MEMBER_ORDER`, mtime 0, uid/gid 0, empty user/group names, mode 0444.

Dataset files written by :func:`write_dataset_files` after every shard is done: ``sizes.json``
(open_clip's ``{shard file name: samples}``), ``failures.parquet`` (every failed input row and its reason),
``duplicate_images.txt`` and ``manifest.json``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.data.schema import (
    ANN_KEY,
    CAPTION_KEY,
    DEPTH_KEY,
    IMAGE_KEY,
    MANIFEST_FILE,
    META_KEY,
    SEG_KEY,
    SIZES_FILE,
    STATS_SUFFIX,
    SYN_KEY,
)

MEMBER_ORDER = (IMAGE_KEY, CAPTION_KEY, SYN_KEY, META_KEY, SEG_KEY, DEPTH_KEY, ANN_KEY)
FAILURES_FILE = "failures.parquet"
DUPLICATE_IMAGES_FILE = "duplicate_images.txt"
STALE_TEMP_AGE_S = 3600.0  # a writer that has not touched its temporary for an hour is dead
TMP_DIR = "_tmp"  # temporaries live here, never beside the final names (sync tools can exclude it)
URL_QUERY_MODES = ("strip", "redact_credentials", "keep")
REDACTED = "REDACTED"
CREDENTIAL_PARAMS = frozenset(
    {
        "x-amz-credential",  # AWS SigV4 presigned URLs
        "x-amz-security-token",
        "x-amz-signature",
        "awsaccesskeyid",  # AWS SigV2
        "signature",  # SigV2, CloudFront
        "policy",
        "key-pair-id",
        "x-goog-credential",  # GCS V4 signed URLs
        "x-goog-signature",
        "googleaccessid",
        "sig",  # Azure SAS
        "token",
        "access_token",
        "api_key",
        "apikey",
    }
)
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


@dataclass(frozen=True)
class OutputConfig:
    path: str = ""
    """Output folder or URL (s3://bucket/prefix): shards, stats, sizes.json, manifest.json, failures."""
    samples_per_shard: int = 10_000
    """Input rows per shard: each shard holds at most this many samples (fewer when rows fail)."""
    name_format: str = "{index:06d}"
    """Shard file stem, formatted with the shard index (the file is <stem>.tar)."""
    overwrite: bool = False
    """Allow re-running into a folder planned with a different config (stale shards are rewritten)."""
    url_query: Literal["strip", "redact_credentials", "keep"] = "strip"
    """What of a URL's query string and user:password@ reaches the published files (each sample's json
    ``source``, stats, failures.parquet, manifest.json) and the logs: strip drops the query, fragment and
    user info (presigned URLs carry their X-Amz-Credential / X-Amz-Security-Token / X-Amz-Signature there);
    redact_credentials keeps the query with credential values (X-Amz-Credential, X-Amz-Security-Token,
    X-Amz-Signature, Signature, sig, token, ...) and user info replaced by REDACTED; keep copies URLs
    verbatim. Images are always fetched from the full URL."""

    def __post_init__(self) -> None:
        if self.url_query not in URL_QUERY_MODES:
            raise ValueError(f"url_query must be one of {URL_QUERY_MODES}, got {self.url_query!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        try:
            a, b = self.name_format.format(index=0), self.name_format.format(index=1)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"name_format must use only {{index}}, got {self.name_format!r}") from None
        if a == b or "/" in a or a.startswith("."):
            raise ValueError(f"name_format must give distinct plain file names, got {self.name_format!r}")

    def shard_name(self, index: int) -> str:
        return self.name_format.format(index=index) + ".tar"


def public_url(url: str, mode: str) -> str:
    """``url`` as it may be published under ``output.url_query`` = ``mode``; a path without a scheme (a
    local file name may hold a ``?``) is returned unchanged."""
    if mode == "keep" or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    before_fragment, hash_, fragment = tail.partition("#")
    path, question, query = before_fragment.partition("?")
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1] if mode == "strip" else f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    if mode == "strip":
        return f"{scheme}://{netloc}{path}"
    params = []
    for param in query.split("&") if question else ():
        name, eq, _ = param.partition("=")
        params.append(
            f"{name}{eq}{REDACTED}" if urllib.parse.unquote(name).lower() in CREDENTIAL_PARAMS else param
        )
    return f"{scheme}://{netloc}{path}{question}{'&'.join(params)}{hash_}{fragment}"


def public_text(text: str, mode: str, url: str = "") -> str:
    """``text`` (an error message, a traceback) with every ``scheme://`` URL in it made public; ``url`` is
    a URL the text may quote without its scheme (fsspec strips it from paths in its errors)."""
    if mode == "keep" or not text:
        return text
    text = _URL_RE.sub(lambda m: public_url(m.group(0), mode), text)
    query = url.partition("#")[0].partition("?")[2]
    if "://" in url and query:
        public_query = public_url(url, mode).partition("#")[0].partition("?")[2]
        text = text.replace(f"?{query}", f"?{public_query}" if public_query else "")
    return text


def public_json(obj: Any, mode: str) -> Any:
    """A JSON-like value with :func:`public_text` applied to every string in it."""
    if isinstance(obj, str):
        return public_text(obj, mode)
    if isinstance(obj, dict):
        return {k: public_json(v, mode) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_json(v, mode) for v in obj]
    return obj


def _member_sort_key(ext: str) -> tuple[int, str]:
    return (MEMBER_ORDER.index(ext), ext) if ext in MEMBER_ORDER else (len(MEMBER_ORDER), ext)


class TarBuilder:
    """Appends samples to an open binary file as a deterministic tar."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)
        self.num_samples = 0
        self.size = 0  # bytes, set by open_shard once the tar is closed

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members, key=_member_sort_key):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, _BytesReader(data))
        self.num_samples += 1

    def close(self) -> None:
        self._tar.close()


class _BytesReader:
    """Minimal file object over bytes (avoids a BytesIO copy per member)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _create_temp(tmp_dir: str, name: str, owner: str) -> tuple[str, IO[bytes]]:
    """A new temporary ``<tmp_dir>/<name>.tmp-[<owner>-]<pid>-<random>``, opened for writing."""
    tag = f"{owner}-" if owner else ""
    tmp = os.path.join(tmp_dir, f"{name}.tmp-{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    for attempt in range(5):
        os.makedirs(tmp_dir, exist_ok=True)
        try:
            return tmp, open(tmp, "xb")
        except FileNotFoundError:  # another job removed the (then empty) folder in between: make it again
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


@contextmanager
def atomic_file(url: str, tmp_dir: str = "", owner: str = "") -> Iterator[IO[bytes]]:
    """Write ``url`` (binary) all or nothing: it appears only if the block completes.

    Local: the data goes to a temporary in ``tmp_dir`` (default ``<url's folder>/_tmp``; it must be on the
    same file system), is fsynced, then renamed onto ``url`` with ``os.replace``. So the folder of the final
    names never holds a temporary, and a sync of it that excludes ``_tmp/`` never copies a partial file.
    ``owner`` tags the temporary's name, so that a run can remove its own leftovers
    (:func:`remove_stale_temp_files`). Object stores: a node-local temporary, uploaded in one ``put`` (no
    partial object and no temporary ever shows in the bucket).
    """
    local = io.is_local(url)
    if local:
        path = _local_path(url)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp_dir = _local_path(tmp_dir) if tmp_dir else os.path.join(folder, TMP_DIR)
        tmp, f = _create_temp(tmp_dir, os.path.basename(path), owner)
    else:
        fd, tmp = tempfile.mkstemp(suffix=".tmp")
        f = os.fdopen(fd, "wb")
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            fs, remote = io.filesystem(url)
            fs.put_file(tmp, remote)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(url: str, obj: Any, tmp_dir: str = "", owner: str = "") -> None:
    """``obj`` as indented, key-sorted JSON (the bytes of :func:`pipeline.io.write_json`), via :func:`atomic_file`."""
    with atomic_file(url, tmp_dir, owner) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


@contextmanager
def open_shard(url: str, tmp_dir: str = "", owner: str = "") -> Iterator[TarBuilder]:
    """Build a tar and publish it at ``url`` only if the block completes (see :func:`atomic_file`)."""
    with atomic_file(url, tmp_dir, owner) as f:
        builder = TarBuilder(f)
        yield builder
        builder.close()
        builder.size = f.tell()


@dataclass(frozen=True)
class OutputFolder:
    """The shard job's output folder: every file is written atomically, its temporaries in ``<url>/_tmp/``
    tagged with ``owner`` (one token per run, shared by the run's worker processes)."""

    url: str
    owner: str = ""

    def join(self, *parts: str) -> str:
        return io.join(self.url, *parts)

    @property
    def tmp_dir(self) -> str:
        return self.join(TMP_DIR)

    def open(self, *parts: str) -> AbstractContextManager[IO[bytes]]:
        return atomic_file(self.join(*parts), self.tmp_dir, self.owner)

    def shard(self, name: str) -> AbstractContextManager[TarBuilder]:
        return open_shard(self.join(name), self.tmp_dir, self.owner)

    def write_text(self, text: str, *parts: str) -> None:
        with self.open(*parts) as f:
            f.write(text.encode("utf-8"))

    def write_json(self, obj: Any, *parts: str) -> None:
        write_json(self.join(*parts), obj, self.tmp_dir, self.owner)


def as_output_folder(output: str | OutputFolder) -> OutputFolder:
    return output if isinstance(output, OutputFolder) else OutputFolder(output)


def remove_stale_temp_files(output_url: str, min_age_s: float = STALE_TEMP_AGE_S, owner: str = "") -> int:
    """Delete temporaries left by killed writers in ``<output>/_tmp/`` (and beside the shards, where older
    versions wrote them): ``owner``'s at once (a finished run's writers are all done), any other's once
    untouched for ``min_age_s`` seconds. Removes ``_tmp/`` when it is left empty.

    Array tasks on other hosts may be writing beside us (two tasks can merge at the same moment), so another
    writer's temporary is only taken as dead once it has not been touched for a while.
    """
    if not io.is_local(output_url):
        return 0  # object stores never see our temporaries
    root = _local_path(output_url)
    tmp_dir = os.path.join(root, TMP_DIR)
    now = time.time()
    removed = 0
    for path in glob.glob(os.path.join(tmp_dir, "*.tmp-*")) + glob.glob(os.path.join(root, "*.tmp-*")):
        try:
            mine = bool(owner) and f".tmp-{owner}-" in os.path.basename(path)
            if not mine and now - os.path.getmtime(path) < min_age_s:
                continue
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass  # its writer renamed or removed it meanwhile
    try:
        os.rmdir(tmp_dir)
    except OSError:
        pass  # not empty (another writer's temporary) or not there
    return removed


def stats_url(output_url: str, shard_name: str) -> str:
    return io.join(output_url, shard_name[: -len(".tar")] + STATS_SUFFIX)


def read_stats(output_url: str, shard_name: str) -> dict[str, Any] | None:
    """The shard's stats when both it and its tar exist (the completion marker), else None."""
    url = stats_url(output_url, shard_name)
    try:
        stats = io.read_json(url)
    except (FileNotFoundError, ValueError):
        return None
    if not io.exists(io.join(output_url, shard_name)):
        return None
    return stats


def shard_pattern(names: Sequence[str]) -> str:
    """A brace pattern for the shard list (``{000000..000041}.tar``) when names are contiguous numbers."""
    if not names:
        return ""
    stems = [n[: -len(".tar")] for n in names]
    if all(s.isdigit() and len(s) == len(stems[0]) for s in stems):
        ints = [int(s) for s in stems]
        if ints == list(range(ints[0], ints[0] + len(ints))):
            return f"{{{stems[0]}..{stems[-1]}}}.tar" if len(stems) > 1 else names[0]
    return "::".join(names)


def write_failures(output: str | OutputFolder, rows: Sequence[dict[str, Any]]) -> None:
    """The failure table: one row per failed input row (shard, input, row, uid, reason, detail)."""
    schema = pa.schema(
        [
            ("shard", pa.string()),
            ("input", pa.string()),
            ("row", pa.int64()),
            ("uid", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(list(rows), schema=schema)
    with as_output_folder(output).open(FAILURES_FILE) as f:
        pq.write_table(table, f)


def write_dataset_files(
    output: str | OutputFolder,
    sizes: dict[str, int],
    failures: Sequence[dict[str, Any]],
    duplicate_images: Sequence[str],
    manifest: dict[str, Any],
) -> None:
    out = as_output_folder(output)
    write_failures(out, failures)
    out.write_text("".join(u + "\n" for u in duplicate_images), DUPLICATE_IMAGES_FILE)
    out.write_json(sizes, SIZES_FILE)
    out.write_json(manifest, MANIFEST_FILE)

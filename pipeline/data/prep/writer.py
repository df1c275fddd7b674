"""Deterministic, atomic WebDataset shard writing, per-shard stats and the dataset-level files.

Every file is built in a temporary file and published in one step (:func:`pipeline.data.tar.atomic_file`):
``os.replace`` from ``<output>/_tmp/`` onto its name for local folders, a single upload for object stores, so
neither ever shows a partial tar and the shards' folder never holds a temporary. A shard's
``<name>.stats.json`` is written after the tar and is the completion marker a re-run checks. Tars are
written by :mod:`pipeline.data.tar` (deterministic: byte-identical for identical samples).

Dataset files written by :func:`write_dataset_files` after every shard is done: ``sizes.json``
(open_clip's ``{shard file name: samples}``), ``failures.parquet`` (every failed input row and its reason),
``duplicate_images.txt`` and ``manifest.json``.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.data.schema import MANIFEST_FILE, SIZES_FILE, STATS_SUFFIX
from pipeline.data.tar import (  # noqa: F401 - re-exported: the shard and caption jobs write through these
    STALE_TEMP_AGE_S,
    TMP_DIR,
    TarBuilder,
    atomic_file,
    open_shard,
    remove_stale_temp_files,
)

FAILURES_FILE = "failures.parquet"
DUPLICATE_IMAGES_FILE = "duplicate_images.txt"
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


def write_json(url: str, obj: Any, tmp_dir: str = "", owner: str = "") -> None:
    """``obj`` as indented, key-sorted JSON (the bytes of :func:`pipeline.io.write_json`), via :func:`atomic_file`."""
    with atomic_file(url, tmp_dir, owner) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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


FAILURE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("input", pa.string()),
        ("row", pa.int64()),
        ("uid", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
"""Columns of failures.parquet: one row per failed input row."""


def write_failures(output: str | OutputFolder, rows: Sequence[dict[str, Any]]) -> None:
    """The failure table: one row per failed input row (shard, input, row, uid, reason, detail)."""
    table = pa.Table.from_pylist(list(rows), schema=FAILURE_SCHEMA)
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

"""Storage helpers over fsspec: atomic writes, JSON, and URL joins for local paths and ``s3://``.

Every file the project writes goes through :func:`atomic_write` (temporary name, then rename) so a job
killed at any moment leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_local(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def storage_options_from_env(url: str) -> dict[str, Any]:
    """fsspec options for ``url``; S3 endpoint from ``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL`` (keys stay in env)."""
    if str(url).startswith("s3://"):
        endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options_from_env(str(url)))
    return fs, path


@contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``url`` all or nothing: a temporary sibling renamed onto it (local), or a local temporary uploaded
    in one put (object stores). An exception inside the block leaves ``url`` as it was."""
    url = str(url)
    fs, path = filesystem(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(url):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # Built in a local temporary and uploaded in one put only when the block completes: an fsspec file
        # opened on the store would commit whatever was written when an exception closes it.
        fd, tmp = tempfile.mkstemp(suffix=".tmp")
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            fs.put_file(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_text(url: str, text: str) -> None:
    with atomic_write(url, "w") as f:
        f.write(text)


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)

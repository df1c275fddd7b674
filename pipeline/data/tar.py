"""The one tar module: every shard reader and writer of the project goes through it.

Reading trusts nothing (shards we wrote, img2dataset output, DataCompDR sidecars alike). One small streaming
header reader (ustar, pax and GNU long names; faster than :mod:`tarfile` on the many small members of
WebDataset shards) serves the training loader (:func:`iter_tar`) and data prep (:func:`iter_tar_members`,
:func:`iter_tar_samples`, :func:`index_tar` + :func:`read_range`). Only regular files are returned (links,
devices, folders and sparse members are skipped), names follow the one rule of
:func:`pipeline.data.schema.member_key` (no absolute paths, no ``..``, no NUL or backslash), members over a
size limit are skipped without reading them into memory, and nothing is ever extracted to disk::

    with fsspec.open(url, "rb") as f:
        for key, members in iter_tar_samples(f, max_member_bytes=32 << 20):
            ...

Writing is deterministic and atomic: :func:`open_shard` builds a tar in a temporary under ``<folder>/_tmp/``
and publishes it in one step (:func:`atomic_file`: ``os.replace`` locally, one upload on object stores), so
no reader ever sees a partial tar. Tars are byte-identical for identical samples: GNU format, samples in the
order added and, within a sample, members in :data:`pipeline.data.schema.MEMBER_ORDER`, mtime 0, uid/gid 0,
empty user/group names, mode 0444 (:class:`TarBuilder`; ``fmt="pax", mode=0o644`` gives the layout of
``tarfile.open(path, "w")``, which the synthetic img2dataset export imitates). Samples are encoded by
:func:`pipeline.data.schema.encode_sample`.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import tarfile
import tempfile
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from pipeline import io
from pipeline.data import schema

DEFAULT_MAX_MEMBER_BYTES = 64 << 20
TMP_DIR = "_tmp"  # temporaries live here, never beside the final names (sync tools can exclude it)
STALE_TEMP_AGE_S = 3600.0  # a writer that has not touched its temporary for an hour is dead

# ------------------------------------------------------------------------------------------------ reading


class TarFormatError(ValueError):
    """The bytes are not a (complete) tar archive."""


CORRUPT_ERRORS = (TarFormatError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
"""A tar (or its compression) that raises one of these is corrupt or truncated."""

_BLOCK = 512
_MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name headers larger than this are treated as corruption
_REGULAR = (b"0", b"\x00", b"7")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" \x00")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("bad pax record") from None
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("bad pax record length")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


class _Stream:
    """Reads and skips over a tar stream, counting the bytes passed (member offsets for ranged reads)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.seekable = bool(getattr(f, "seekable", lambda: False)())
        self.pos = f.tell() if self.seekable else 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise TarFormatError(f"unexpected end of data ({len(data)} of {n} bytes)")
        return data

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        self.pos += n
        if self.seekable:
            self.f.seek(n, 1)
            return
        while n > 0:
            chunk = self.f.read(min(n, 1 << 20))
            if not chunk:
                raise TarFormatError("unexpected end of data")
            n -= len(chunk)


@dataclass
class _Header:
    """One member's header; the member's data is read with :meth:`read` (once) or skipped."""

    name: str
    size: int
    offset: int  # of the data in the stream
    regular: bool  # a regular, non-sparse file
    stream: _Stream
    consumed: int = 0

    def read(self) -> bytes:
        assert not self.consumed
        data = self.stream.read_exact(self.size)
        self.consumed = self.size
        return data


def _headers(f: Any) -> Iterator[_Header]:
    """Every member header of an uncompressed tar stream, in order, until the end-of-archive marker.

    Raises :class:`TarFormatError` on a truncated stream, a bad checksum or a header extension over 1 MiB.
    """
    s = _Stream(f)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = s.read(_BLOCK)
        if block == bytes(_BLOCK):
            return  # end-of-archive marker
        if not block:
            raise TarFormatError("no end-of-archive marker: truncated")
        if len(block) != _BLOCK:
            raise TarFormatError("truncated header")
        stored = _octal(block[148:156])
        if stored != sum(block[:148]) + 256 + sum(block[156:]):
            raise TarFormatError("bad header checksum")
        size = _octal(block[124:136])
        kind = block[156:157]
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (b"x", b"L", b"g"):
            if size > _MAX_HEADER_BYTES:
                raise TarFormatError(f"{size}-byte extended header")
            data = s.read_exact(padded)[:size]
            if kind == b"x":
                pax = _pax(data)
            elif kind == b"L":
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "replace")
            continue
        name = block[0:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
        if block[257:262] == b"ustar" and block[345:346] != b"\x00" and block[262:263] == b"\x00":
            prefix = block[345:500].split(b"\x00", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}"
        name = pax.get("path", long_name or name)
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarFormatError("bad pax size") from None
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        sparse = any(k.startswith("GNU.sparse.") for k in pax)
        pax, long_name = {}, None
        if size < 0:
            raise TarFormatError("negative member size")
        header = _Header(name, size, s.pos, kind in _REGULAR and not sparse, s)
        yield header
        s.skip(padded - header.consumed)


def iter_tar(f: Any, want: Callable[[str], bool], max_bytes: int) -> Iterator[tuple[str, bytes | None]]:
    """``(member name, data)`` for the regular files of an uncompressed tar stream (the loader's reader).

    Names are returned as stored (callers check them with :func:`pipeline.data.schema.member_key`); links,
    folders and devices are skipped; a corrupt stream raises :class:`TarFormatError`. ``data`` is None, and
    the member is skipped unread, when ``want(name)`` is False or the member is over ``max_bytes``.
    """
    for h in _headers(f):
        if not h.regular:
            continue
        if not want(h.name) or h.size > max_bytes:  # want() sees every regular member, in order
            yield h.name, None
            continue
        yield h.name, h.read()


@dataclass
class TarReport:
    """Counts of members read and skipped (by reason) while reading one or more tars."""

    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class TarEntry:
    """Where a member's bytes lie inside an uncompressed tar, for ranged reads."""

    name: str
    offset: int
    size: int


def split_key(name: str) -> tuple[str, str]:
    """The (key, extension) of a safe member name by :func:`pipeline.data.schema.member_key`."""
    parts = schema.member_key(name)
    if parts is None:
        raise ValueError(f"unsafe tar member name {name!r}")
    return parts


def _check(h: _Header, max_member_bytes: int, report: TarReport) -> str | None:
    """The member's normalised name if it is to be read, else None (the reason counted in ``report``)."""
    if not h.regular:
        report.skipped["not_regular_file"] += 1
        return None
    name = schema.safe_member_name(h.name)
    if name is None:
        report.skipped["unsafe_name"] += 1
        return None
    if "" in (schema.member_key(name) or ("",)):
        report.skipped["not_sample_member"] += 1
        return None
    if h.size > max_member_bytes:
        report.skipped["too_large"] += 1
        return None
    return name


class _Prefixed:
    """A read-only stream: ``head`` (bytes already read from ``f``), then the rest of ``f``."""

    def __init__(self, head: bytes, f: Any) -> None:
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.f.read(n - len(out)) if len(out) < n else b"")

    def seekable(self) -> bool:
        return False


def decompressed(f: Any) -> Any:
    """``f``, or a decompressing stream over it when it starts with a gzip, bzip2 or xz signature."""
    if getattr(f, "seekable", lambda: False)():
        start = f.tell()
        head = f.read(6)
        f.seek(start)
        raw = f
    else:
        head = f.read(6)
        raw = _Prefixed(head, f)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def iter_tar_members(
    fileobj: IO[bytes],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    report: TarReport | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Stream ``(name, data)`` for the safe regular members of a (possibly compressed) tar, in tar order.

    A truncated or corrupt tar ends the iteration (counted as ``skipped["corrupt_tar"]``), it never raises.
    """
    report = report if report is not None else TarReport()
    try:
        for h in _headers(decompressed(fileobj)):
            name = _check(h, max_member_bytes, report)
            if name is None:
                continue
            data = h.read()
            report.read += 1
            yield name, data
    except (*CORRUPT_ERRORS, OSError):
        report.skipped["corrupt_tar"] += 1


def iter_tar_samples(
    fileobj: IO[bytes],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    report: TarReport | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key, as WebDataset does: yields ``(key, {ext: data})``."""
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in iter_tar_members(fileobj, max_member_bytes, report):
        k, ext = split_key(name)
        if k != key:
            if key is not None and sample:
                yield key, sample
            key, sample = k, {}
        sample[ext] = data
    if key is not None and sample:
        yield key, sample


def index_tar(
    fileobj: IO[bytes],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    report: TarReport | None = None,
) -> list[TarEntry]:
    """Offsets and sizes of the safe members of an uncompressed, seekable tar (headers only are read)."""
    report = report if report is not None else TarReport()
    entries = []
    try:
        for h in _headers(fileobj):
            name = _check(h, max_member_bytes, report)
            if name is not None:
                entries.append(TarEntry(name, h.offset, h.size))
                report.read += 1
    except (*CORRUPT_ERRORS, OSError):
        report.skipped["corrupt_tar"] += 1
    return entries


def read_range(fileobj: IO[bytes], entry: TarEntry) -> bytes:
    fileobj.seek(entry.offset)
    data = fileobj.read(entry.size)
    if len(data) != entry.size:
        raise EOFError(f"tar member {entry.name!r} is truncated")
    return data


# ------------------------------------------------------------------------------------------------ writing


class TarBuilder:
    """Appends samples to an open binary file as a deterministic tar (see the module docstring)."""

    def __init__(self, fileobj: IO[bytes], fmt: Literal["gnu", "pax"] = "gnu", mode: int = 0o444) -> None:
        tar_format = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tar_format)
        self._mode = mode
        self._owned: IO[bytes] | None = None  # the file opened by TarBuilder.open
        self.num_samples = 0
        self.size = 0  # bytes, set by open_shard once the tar is closed

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """One sample of already encoded members ``{extension: bytes}``, in schema member order."""
        for name, data in schema.member_names(key, members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = self._mode
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, _BytesReader(data))
        self.num_samples += 1

    def write(self, sample: Mapping[str, Any]) -> None:
        """One sample as :func:`pipeline.data.schema.encode_sample` takes it (``__key__`` and members)."""
        self.add(sample[schema.KEY], dict(schema.encode_members(sample)))

    def close(self) -> None:
        self._tar.close()
        if self._owned is not None:
            self._owned.close()

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], fmt: Literal["gnu", "pax"] = "gnu", mode: int = 0o444
    ) -> TarBuilder:
        """A builder writing straight to the local file ``path``, closed with the builder. Not atomic: for
        files in a folder that is itself published in one step, and for test fixtures."""
        f = open(path, "wb")  # noqa: SIM115 - closed by close()
        builder = cls(f, fmt, mode)
        builder._owned = f
        return builder

    def __enter__(self) -> TarBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


@contextmanager
def open_shard(url: str, tmp_dir: str = "", owner: str = "") -> Iterator[TarBuilder]:
    """Build a deterministic tar and publish it at ``url`` only if the block completes (:func:`atomic_file`)."""
    with atomic_file(url, tmp_dir, owner) as f:
        builder = TarBuilder(f)
        yield builder
        builder.close()
        builder.size = f.tell()


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

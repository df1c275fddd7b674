"""Reading tars we did not write (img2dataset output, DataCompDR sidecars) without trusting them.

Nothing is ever extracted to disk. Member names are checked anyway, by the one rule the training loader
follows too (:func:`pipeline.data.schema.member_key`: no absolute paths, no ``..``, no NUL or backslash;
names without a key or an extension, such as ``.hidden`` or ``README``, belong to no sample). Only regular
files are read (links, devices, directories and sparse members are skipped), and a member larger than
``max_member_bytes`` is skipped without reading it into memory. Everything skipped is counted in a
:class:`TarReport` so callers can surface it.

    with fsspec.open(url, "rb") as f:
        for key, members in iter_tar_samples(f, max_member_bytes=32 << 20):
            ...
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from pipeline.data.schema import member_key, safe_member_name

DEFAULT_MAX_MEMBER_BYTES = 64 << 20


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
    parts = member_key(name)
    if parts is None:
        raise ValueError(f"unsafe tar member name {name!r}")
    return parts


def _check(member: tarfile.TarInfo, max_member_bytes: int, report: TarReport) -> str | None:
    if not member.isreg() or member.issparse():
        report.skipped["not_regular_file"] += 1
        return None
    name = safe_member_name(member.name)
    if name is None:
        report.skipped["unsafe_name"] += 1
        return None
    if "" in (member_key(name) or ("",)):
        report.skipped["not_sample_member"] += 1
        return None
    if member.size < 0 or member.size > max_member_bytes:
        report.skipped["too_large"] += 1
        return None
    return name


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
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for member in tf:
                name = _check(member, max_member_bytes, report)
                if name is None:
                    continue
                f = tf.extractfile(member)
                if f is None:
                    report.skipped["not_regular_file"] += 1
                    continue
                data = f.read(member.size)
                if len(data) != member.size:
                    report.skipped["corrupt_tar"] += 1
                    return
                report.read += 1
                yield name, data
    except (tarfile.TarError, EOFError, OSError, ValueError):
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
        with tarfile.open(fileobj=fileobj, mode="r:") as tf:
            for member in tf:
                name = _check(member, max_member_bytes, report)
                if name is not None:
                    entries.append(TarEntry(name, member.offset_data, member.size))
                    report.read += 1
    except (tarfile.TarError, EOFError, OSError, ValueError):
        report.skipped["corrupt_tar"] += 1
    return entries


def read_range(fileobj: IO[bytes], entry: TarEntry) -> bytes:
    fileobj.seek(entry.offset)
    data = fileobj.read(entry.size)
    if len(data) != entry.size:
        raise EOFError(f"tar member {entry.name!r} is truncated")
    return data

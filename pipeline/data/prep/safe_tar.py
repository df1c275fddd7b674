"""Reading tars we did not write (img2dataset output, DataCompDR sidecars) without trusting them.

The reader lives in :mod:`pipeline.data.tar` (one reader for the training loader and data prep); this module
names what data prep uses of it. Nothing is ever extracted to disk, member names follow
:func:`pipeline.data.schema.member_key`, only regular files are read, members over ``max_member_bytes`` are
skipped unread, and everything skipped is counted in a :class:`TarReport`::

    with fsspec.open(url, "rb") as f:
        for key, members in iter_tar_samples(f, max_member_bytes=32 << 20):
            ...
"""

from __future__ import annotations

from pipeline.data.schema import member_key, safe_member_name
from pipeline.data.tar import (
    DEFAULT_MAX_MEMBER_BYTES,
    TarEntry,
    TarReport,
    index_tar,
    iter_tar_members,
    iter_tar_samples,
    read_range,
    split_key,
)

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "TarEntry",
    "TarReport",
    "index_tar",
    "iter_tar_members",
    "iter_tar_samples",
    "member_key",
    "read_range",
    "safe_member_name",
    "split_key",
]

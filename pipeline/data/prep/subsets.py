"""Nested subsets for scaling curves, decided by a deterministic hash of the uid.

A uid belongs to the subset of fraction ``f`` when ``uid_fraction(uid, salt) < f``, so the 1% subset is
contained in the 10% subset, which is contained in the whole set, whatever shard or worker the uid lands in.
The shard job writes, for each fraction, ``subsets/<name>.txt`` (kept uids, one per line, in shard order) and
``subsets/<name>.json`` (fraction, salt, total and per-shard counts). A loader uses either the uid list or
:func:`in_subset` directly on each sample's key: no re-sharding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import io
from pipeline.data.prep.writer import OutputFolder, as_output_folder


@dataclass(frozen=True)
class SubsetConfig:
    fractions: tuple[float, ...] = ()
    """Subset sizes as fractions of the kept samples, e.g. [0.01, 0.1]; each is nested in the larger ones."""
    salt: str = "subset-v1"
    """Hash salt: change it to draw a different (still nested) family of subsets."""

    def __post_init__(self) -> None:
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ValueError(f"fractions must lie in (0, 1], got {f}")
        if len({subset_name(f) for f in self.fractions}) != len(self.fractions):
            raise ValueError(f"fractions must be distinct, got {list(self.fractions)}")


def uid_fraction(uid: str, salt: str = "subset-v1") -> float:
    """A uniform number in [0, 1) fixed by ``(salt, uid)``."""
    digest = hashlib.blake2b(f"{salt}\x00{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def in_subset(uid: str, fraction: float, salt: str = "subset-v1") -> bool:
    return uid_fraction(uid, salt) < fraction


def subset_name(fraction: float) -> str:
    """0.01 -> ``1pct``, 0.005 -> ``0.5pct``, 1.0 -> ``100pct``."""
    return f"{fraction * 100:.6g}pct"


def write_subsets(
    output: str | OutputFolder, shards: Sequence[tuple[str, Sequence[str]]], cfg: SubsetConfig
) -> dict[str, Any]:
    """Write the uid lists for ``shards`` = [(shard file name, kept uids in order)]; returns a summary."""
    out = as_output_folder(output)
    summary: dict[str, Any] = {}
    for fraction in sorted(cfg.fractions):
        name = subset_name(fraction)
        lines: list[str] = []
        per_shard: dict[str, int] = {}
        for shard, uids in shards:
            chosen = [u for u in uids if in_subset(u, fraction, cfg.salt)]
            per_shard[shard] = len(chosen)
            lines.extend(chosen)
        out.write_text("".join(u + "\n" for u in lines), "subsets", f"{name}.txt")
        info = {"fraction": fraction, "salt": cfg.salt, "num_samples": len(lines), "shards": per_shard}
        out.write_json(info, "subsets", f"{name}.json")
        summary[name] = {"fraction": fraction, "num_samples": len(lines), "uids": f"subsets/{name}.txt"}
    return summary


def read_uid_list(url: str) -> list[str]:
    """A uid list file: one uid per line, blank lines and ``#`` comments ignored."""
    fs, path = io.filesystem(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def uid_set(urls: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for url in urls:
        out.update(read_uid_list(url))
    return out

"""Nested subsets for scaling curves, decided by a deterministic hash of the uid.

A uid belongs to the subset of fraction ``f`` when ``uid_fraction(uid, salt) < f``, so the 1% subset is
contained in the 10% subset, which is contained in the whole set, whatever shard or worker the uid lands in.
The shard job writes, for each fraction, ``subsets/<name>.txt`` (kept uids, one per line, in shard order) and
``subsets/<name>.json`` (fraction, salt, total and per-shard counts). A loader uses either the uid list or
:func:`in_subset` directly on each sample's key: no re-sharding.

With ``subsets.materialize`` each subset is also written as its own shard set, ``subsets/<name>/`` (tars
re-packed to ``output.samples_per_shard`` samples in the uid list's order, ``sizes.json`` written last as
the completion marker, and the subset's part of ``duplicate_images.txt``), so a small scaling point reads
only its own bytes (:func:`materialize`). The largest subset is cut from the full shards and each smaller one
from the next larger one (nested, so the whole family reads about the full set once). Every output shard is
an independent, atomic unit (a killed run is finished by running again, to the same bytes).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import io
from pipeline.data.prep.executors import ExecutorConfig, run_units
from pipeline.data.prep.writer import OutputFolder, as_output_folder
from pipeline.data.schema import DUPLICATE_IMAGES_FILE, SIZES_FILE
from pipeline.data.tar import iter_tar_samples


@dataclass(frozen=True)
class SubsetConfig:
    fractions: tuple[float, ...] = ()
    """Subset sizes as fractions of the kept samples, e.g. [0.01, 0.1]; each is nested in the larger ones."""
    salt: str = "subset-v1"
    """Hash salt: change it to draw a different (still nested) family of subsets."""
    materialize: bool = False
    """Also write each subset as its own shard set subsets/<name>/ (re-packed tars, sizes.json), so that a small
    scaling point reads only its own bytes."""

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


class SubsetWriter:
    """The uid lists of ``cfg``'s subsets, written as shards go by: ``add(shard, uids)`` for every shard in
    order inside ``with``; each list file is published atomically when the block completes, then its
    ``.json``. Holds one shard's chosen uids and a count per (subset, shard), never a whole list, so the
    merge can feed it from the same streamed pass over the stats that writes the failure table."""

    def __init__(self, output: str | OutputFolder, cfg: SubsetConfig) -> None:
        self.out, self.cfg = as_output_folder(output), cfg
        self.fractions = sorted(cfg.fractions)
        self.names = [subset_name(f) for f in self.fractions]
        self.per_shard: list[dict[str, int]] = [{} for _ in self.fractions]
        self.summary: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self._files: list[Any] = []

    def __enter__(self) -> SubsetWriter:
        self._files = [self._stack.enter_context(self.out.open("subsets", f"{n}.txt")) for n in self.names]
        return self

    def add(self, shard: str, uids: Iterable[str]) -> None:
        chosen: list[list[str]] = [[] for _ in self.fractions]
        for uid in uids:
            x = uid_fraction(uid, self.cfg.salt)  # nested: in every subset from the first fraction above x
            for k in range(bisect.bisect_right(self.fractions, x), len(self.fractions)):
                chosen[k].append(uid)
        for f, counts, lines in zip(self._files, self.per_shard, chosen):
            counts[shard] = len(lines)
            f.write("".join(u + "\n" for u in lines).encode("utf-8"))

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)  # publishes the list files (or, on an exception, discards them)
        if exc[0] is not None:
            return
        for fraction, name, counts in zip(self.fractions, self.names, self.per_shard):
            num = sum(counts.values())
            info = {"fraction": fraction, "salt": self.cfg.salt, "num_samples": num, "shards": counts}
            self.out.write_json(info, "subsets", f"{name}.json")
            self.summary[name] = {"fraction": fraction, "num_samples": num, "uids": f"subsets/{name}.txt"}
            if self.cfg.materialize:
                self.summary[name]["shards"] = f"subsets/{name}/"


def write_subsets(
    output: str | OutputFolder, shards: Iterable[tuple[str, Iterable[str]]], cfg: SubsetConfig
) -> dict[str, Any]:
    """Write the uid lists for ``shards`` = (shard file name, kept uids in order), streamed in one pass
    (:class:`SubsetWriter`: ``shards`` may be a generator); returns a summary."""
    with SubsetWriter(output, cfg) as writer:
        for shard, uids in shards:
            writer.add(shard, uids)
    return writer.summary


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


# ---------------------------------------------------------------------------------------------- materialised


@dataclass(frozen=True)
class InSubset:
    """A picklable ``uid -> bool``: membership of the hash subset of ``fraction``."""

    fraction: float
    salt: str = "subset-v1"

    def __call__(self, uid: str) -> bool:
        return in_subset(uid, self.fraction, self.salt)


@dataclass(frozen=True)
class RepackTask:
    """Output shard ``j`` of a subset: its slice of the kept samples, read from the source shards that hold it.

    ``sources``: ``(tar url, number of kept samples in it)`` in order; ``keep``: picklable ``uid -> bool``.
    """

    sources: tuple[tuple[str, int], ...]
    keep: Callable[[str], bool]
    folder: str
    samples_per_shard: int
    name_format: str = "{index:06d}"
    owner: str = ""

    def name(self, j: int) -> str:
        return self.name_format.format(index=j) + ".tar"

    def __call__(self, j: int) -> dict[str, Any]:
        try:
            out = OutputFolder(self.folder, self.owner)
            if io.exists(out.join(self.name(j))):
                return {"ok": True}
            lo, hi = j * self.samples_per_shard, (j + 1) * self.samples_per_shard
            with out.shard(self.name(j)) as tar:
                before = 0  # kept samples in the sources before this one
                for url, count in self.sources:
                    if before + count > lo and before < hi:
                        self._copy(url, before, lo, hi, tar)
                    before += count
                    if before >= hi:
                        break
                num = tar.num_samples
            expected = min(hi, sum(c for _, c in self.sources)) - lo
            if num != expected:
                raise AssertionError(f"{self.name(j)}: {num} samples, expected {expected}")
            return {"ok": True}
        except Exception:  # noqa: BLE001 - reported by the driver; a re-run retries the shard
            return {"ok": False, "shard": self.name(j), "error": traceback.format_exc(limit=8)}

    def _copy(self, url: str, before: int, lo: int, hi: int, tar: Any) -> None:
        fs, path = io.filesystem(url)
        position = before
        with fs.open(path, "rb") as f:
            for key, members in iter_tar_samples(f):
                if not self.keep(key):
                    continue
                if lo <= position < hi:
                    tar.add(key, members)  # the members' bytes, verbatim
                position += 1
                if position >= hi:
                    return


def repack(
    sources: Sequence[tuple[str, int]],
    keep: Callable[[str], bool],
    folder: str,
    samples_per_shard: int,
    executor: ExecutorConfig | None = None,
    name_format: str = "{index:06d}",
    duplicates: Iterable[str] = (),
    owner: str = "",
) -> dict[str, int]:
    """Write the samples ``keep`` selects from ``sources`` (``(tar url, selected samples in it)``, in order) as
    a shard set in ``folder``: tars of ``samples_per_shard`` samples, the ``duplicates`` among them in
    ``duplicate_images.txt``, then ``sizes.json``. Skipped when ``sizes.json`` exists; returns the sizes."""
    out = OutputFolder(folder, owner)
    sizes_url = out.join(SIZES_FILE)
    if io.exists(sizes_url):
        return io.read_json(sizes_url)
    total = sum(c for _, c in sources)
    num_shards = -(-total // samples_per_shard)
    task = RepackTask(tuple(sources), keep, folder, samples_per_shard, name_format, owner)
    errors = [r for _, r in run_units(task, list(range(num_shards)), executor or ExecutorConfig(processes=1))]
    errors = [r for r in errors if not r["ok"]]
    if errors:
        first = errors[0]
        raise RuntimeError(
            f"subset {folder}: {len(errors)} shard(s) failed (first: {first['shard']}):\n{first['error']}"
            "re-run to retry them"
        )
    sizes = {task.name(j): min(samples_per_shard, total - j * samples_per_shard) for j in range(num_shards)}
    dups = [u for u in duplicates if keep(u)]
    out.write_text("".join(u + "\n" for u in dups), DUPLICATE_IMAGES_FILE)
    out.write_json(sizes, SIZES_FILE)
    return sizes


def _chunk_counts(uid_list_url: str, chunk: int, keep: Callable[[str], bool]) -> list[int]:
    """For each run of ``chunk`` consecutive uids of a uid list file: how many ``keep`` selects (streamed)."""
    counts: list[int] = []
    fs, path = io.filesystem(uid_list_url)
    with fs.open(path, "r", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % chunk == 0:
                counts.append(0)
            counts[-1] += keep(line.strip())
    return counts


def materialize(
    output: str,
    shards: Sequence[str],
    cfg: SubsetConfig,
    samples_per_shard: int,
    executor: ExecutorConfig | None = None,
    name_format: str = "{index:06d}",
    owner: str = "",
) -> dict[str, dict[str, int]]:
    """Write every subset of ``cfg`` as its own shard set ``<output>/subsets/<name>/`` (see the module
    docstring); ``shards``: the dataset's shard file names in order. Needs the merged dataset (the subset uid
    lists and their per-shard counts). Returns {name: sizes}."""
    root = OutputFolder(output, owner)
    dup_url = root.join(DUPLICATE_IMAGES_FILE)
    duplicates = read_uid_list(dup_url) if io.exists(dup_url) else []
    done: dict[str, dict[str, int]] = {}
    larger: tuple[str, str] | None = None  # (name, folder) of the next larger subset, already written
    for fraction in sorted(cfg.fractions, reverse=True):
        name = subset_name(fraction)
        keep = InSubset(fraction, cfg.salt)
        if larger is None:
            per_shard = io.read_json(root.join("subsets", f"{name}.json"))["shards"]
            sources = [(root.join(s), int(per_shard.get(s, 0))) for s in shards]
        else:
            counts = _chunk_counts(root.join("subsets", f"{larger[0]}.txt"), samples_per_shard, keep)
            src_names = [name_format.format(index=j) + ".tar" for j in range(len(counts))]
            sources = [(io.join(larger[1], s), c) for s, c in zip(src_names, counts)]
        folder = root.join("subsets", name)
        done[name] = repack(
            sources, keep, folder, samples_per_shard, executor, name_format, duplicates, owner
        )
        larger = (name, folder)
    return done

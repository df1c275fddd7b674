"""Bounded-memory bookkeeping for the shard job: the global uid dedupe of the plan and the cross-shard
duplicate-image list of the merge, as hash partitions on disk processed by array tasks.

No step holds more than one partition (or one input file, or one group of shard stats) in memory; the
partition count comes from ``plan.max_memory_gb``, so memory per process stays flat as the input grows.

Plan (files under ``<output>/_plan/<config hash>/``; every file is written atomically and its existence is
the task's completion marker, so a killed step is simply redone and gives the same bytes):

1. ``uids/input-NNNNNN.parts``: one task per input file reads its uid column in batches and writes
   (uid, input, row) as a *parts file*, one group per uid-hash partition (group ``p`` = partition ``p``).
2. ``dedupe/part-NNNNN.parts``: one task per partition reads group ``p`` of every input's file, sorts
   by (uid, input, row) and keeps the rows that repeat an earlier (input, row): the duplicates. They are
   written with one group per *bucket* (a contiguous range of input files).
3. ``duplicates/bucket-NNNNN.parquet``: one task per bucket gathers its group from every partition and
   sorts by (input, row); a shard unit reads only its own bucket (filtered to its rows).

A parts file is one small parquet file per group, concatenated, with the groups' byte offsets in a trailer
(:func:`_write_grouped`): a task reading group ``p`` makes two ranged reads per file (trailer, group) and
never parses the other groups' metadata, so the bytes a step reads stay the data it needs however many
partitions there are (a parquet footer with one row group per partition grows ~360 bytes per partition,
and every reader would fetch it). The request count is still files x groups: see docs/scale.md.

Merge (``<output>/_merge/<config hash>/``): the same shuffle keyed by image sha256 over groups of shard
stats (``sha/group-NNNNN.parts`` -> ``dup/part-NNNNN.parquet``), then one streaming k-way merge writes
``duplicate_images.txt`` in (shard, position) order, the order the in-memory merge used.

The result never depends on the partition count: the first occurrence in input (or shard) order is kept.
Run it through the shard job (``--stage plan`` / ``--stage merge``, or the per-step stages for SLURM arrays);
see docs/data-prep.md and docs/scale.md.
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.data.prep.filters import normalise_uid
from pipeline.data.prep.writer import OutputFolder, read_stats

PLAN_DIR = "_plan"
MERGE_DIR = "_merge"
BYTES_PER_UID_ROW = 256
"""Peak bytes one (uid, input, row) costs a dedupe task: the arrow table, the concatenated column, the sort
indices and the sorted copy (a DataComp uid is 32 hex characters); see docs/benchmarks.md for the measure."""
BYTES_PER_SHA_ROW = 384
"""The same for one (sha256, shard, position, uid) row of the merge's image dedupe."""

UID_SCHEMA = pa.schema([("uid", pa.string()), ("input", pa.int32()), ("row", pa.int64())])
DUP_SCHEMA = pa.schema([("input", pa.int32()), ("row", pa.int64())])
SHA_SCHEMA = pa.schema(
    [("sha", pa.string()), ("shard", pa.int32()), ("pos", pa.int32()), ("uid", pa.string())]
)
DUP_IMAGE_SCHEMA = pa.schema([("shard", pa.int32()), ("pos", pa.int32()), ("uid", pa.string())])


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    dedupe: Literal["partitioned", "memory"] = "partitioned"
    """partitioned: the global uid dedupe (and the merge's image dedupe) as hash partitions on disk, memory
    bounded by max_memory_gb; memory: every uid in one process (the old path, kept for comparison). Both
    keep the same rows and write the same shards."""
    max_memory_gb: float = 2.0
    """Memory one plan / merge task may use for its partition: the partition count is
    ceil(rows x bytes per row / this), so memory per task stays flat however many rows there are."""
    batch_rows: int = 65_536
    """Rows a partition task reads from an input file at a time."""

    def __post_init__(self) -> None:
        if self.dedupe not in ("partitioned", "memory"):
            raise ValueError(f"plan.dedupe must be 'partitioned' or 'memory', got {self.dedupe!r}")
        if not self.max_memory_gb > 0:
            raise ValueError(f"plan.max_memory_gb must be > 0, got {self.max_memory_gb}")
        if self.batch_rows < 1:
            raise ValueError(f"plan.batch_rows must be >= 1, got {self.batch_rows}")


def num_partitions(num_rows: int, bytes_per_row: int, max_memory_gb: float) -> int:
    """Partitions needed so that one partition's rows fit ``max_memory_gb``: ceil(rows x bytes / budget)."""
    return max(1, math.ceil(num_rows * bytes_per_row / (max_memory_gb * 2**30)))


def inputs_per_task(row_counts: Sequence[int], bytes_per_row: int, max_memory_gb: float) -> int:
    """How many input files one partition task reads: as many of the largest as fit ``max_memory_gb``
    (at least 1). Fewer, larger partition files cut the dedupe step's reads (partitions x files)."""
    largest = max([1, *row_counts])
    return max(1, int(max_memory_gb * 2**30 // (largest * bytes_per_row)))


def partition_of(values: Sequence[str], num_parts: int) -> np.ndarray:
    """Stable hash partition (crc32 of the UTF-8 bytes) of each value: the same in every process."""
    return np.fromiter((zlib.crc32(v.encode()) for v in values), np.uint64, len(values)) % num_parts


def _normalised(col: pa.Array) -> pa.Array:
    """The uid column as the in-memory path sees it: trimmed strings, other types via ``normalise_uid``."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.utf8_trim_whitespace(col.cast(pa.string()))
    return pa.array([normalise_uid(v) for v in col.to_pylist()], pa.string())


PARTS_MAGIC = b"PQPARTS1"


def _write_grouped(
    out: OutputFolder, parts: tuple[str, ...], table: pa.Table, key: np.ndarray, num_groups: int
) -> None:
    """``table`` as a *parts file*: group ``g`` (the rows whose ``key`` is ``g``, 0 .. num_groups - 1, in
    their order in ``table``) as its own small parquet file, the groups concatenated, then the trailer: the
    groups' num_groups + 1 byte offsets (int64 little-endian) and PARTS_MAGIC. An empty group is 0 bytes.

    A reader of one group fetches the trailer and its byte range (:func:`_read_group`: two ranged reads,
    whatever the group count), where a parquet file with one row group per group would make every reader
    fetch and parse a footer that grows with the group count (~360 bytes per row group)."""
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(num_groups + 1))
    table = table.take(pa.array(order))
    offsets = [0]
    with out.open(*parts) as f:
        for g in range(num_groups):
            rows = table.slice(int(bounds[g]), int(bounds[g + 1] - bounds[g]))
            if rows.num_rows:
                buf = pa.BufferOutputStream()
                pq.write_table(rows, buf)
                data = buf.getvalue()
                f.write(data)
                offsets.append(offsets[-1] + data.size)
            else:
                offsets.append(offsets[-1])
        f.write(np.asarray(offsets, "<i8").tobytes() + PARTS_MAGIC)


def _repeats(col: pa.ChunkedArray) -> pa.Array:
    """True where a sorted column repeats the value before it (every occurrence but the first)."""
    col = col.combine_chunks()
    if len(col) < 2:
        return pa.array([False] * len(col), pa.bool_())
    same = pc.equal(col.slice(1), col.slice(0, len(col) - 1)).fill_null(False)
    return pa.concat_arrays([pa.array([False], pa.bool_()), same])


def _read_group(url: str, group: int, num_groups: int, schema: pa.Schema) -> pa.Table:
    """Group ``group`` of the parts file ``url`` (:func:`_write_grouped`): its trailer, then its bytes."""
    fs, path = io.filesystem(url)
    size = 8 * (num_groups + 1) + len(PARTS_MAGIC)
    trailer = fs.cat_file(path, start=-size)
    if len(trailer) != size or not trailer.endswith(PARTS_MAGIC):
        raise ValueError(f"{url}: not a parts file of {num_groups} groups (a partial or foreign file?)")
    offsets = np.frombuffer(trailer[: -len(PARTS_MAGIC)], "<i8")
    start, end = int(offsets[group]), int(offsets[group + 1])
    if start == end:
        return schema.empty_table()
    return pq.read_table(pa.BufferReader(fs.cat_file(path, start=start, end=end))).cast(schema)


# ------------------------------------------------------------------------------------------- plan steps


@dataclass(frozen=True)
class UidDedupe:
    """Where one plan's uid partitions live and how many there are (everything a task needs)."""

    output: str
    chash: str
    inputs: tuple[dict[str, Any], ...]
    uid_column: str
    num_parts: int
    batch_rows: int = 65_536
    owner: str = ""
    inputs_per_task: int = 1
    """Input files one ``partition_inputs`` task reads and writes to one parts file (from the budget)."""

    @property
    def num_input_groups(self) -> int:
        return max(1, math.ceil(len(self.inputs) / self.inputs_per_task))

    @property
    def num_buckets(self) -> int:
        return min(self.num_parts, max(1, len(self.inputs)))

    def bucket_of(self, input_index: int) -> int:
        return input_index * self.num_buckets // max(1, len(self.inputs))

    def _parts(self, kind: str, name: str) -> tuple[str, ...]:
        return (PLAN_DIR, self.chash, kind, name)

    def uids_url(self, g: int) -> str:
        return io.join(self.output, *self._parts("uids", f"inputs-{g:06d}.parts"))

    def dedupe_url(self, p: int) -> str:
        return io.join(self.output, *self._parts("dedupe", f"part-{p:05d}.parts"))

    def bucket_url(self, b: int) -> str:
        return io.join(self.output, *self._parts("duplicates", f"bucket-{b:05d}.parquet"))

    def _out(self) -> OutputFolder:
        return OutputFolder(self.output, self.owner)

    def _rel(self, url: str) -> tuple[str, ...]:
        return tuple(url[len(self.output.rstrip("/")) + 1 :].split("/"))

    def partition_inputs(self, g: int) -> None:
        """Step 1 for input group ``g``: the (uid, input, row) rows of its input files, one group per
        partition."""
        if io.exists(self.uids_url(g)):
            return
        tables: list[pa.Table] = []
        first = g * self.inputs_per_task
        for i in range(first, min(len(self.inputs), first + self.inputs_per_task)):
            inp = self.inputs[i]
            if "error" in inp:
                continue
            try:
                tables += list(self._read_uids(i, inp["url"]))
            except Exception:  # noqa: BLE001 - an unreadable column: its rows fail in their unit instead
                continue
        table = pa.concat_tables([UID_SCHEMA.empty_table(), *tables]).combine_chunks()
        keys = [np.zeros(0, np.uint64)] + [
            partition_of(t.column("uid").to_pylist(), self.num_parts) for t in tables
        ]
        key = np.concatenate(keys)
        _write_grouped(self._out(), self._rel(self.uids_url(g)), table, key, self.num_parts)

    def _read_uids(self, i: int, url: str) -> Iterator[pa.Table]:
        fs, path = io.filesystem(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if self.uid_column not in pf.schema_arrow.names:
                return
            start = 0
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=[self.uid_column]):
                col = _normalised(batch.column(0))
                rows = pa.array(np.arange(start, start + len(col), dtype=np.int64))
                start += len(col)
                keep = pc.is_valid(col)
                t = pa.table({"uid": col, "input": pa.array(np.full(len(col), i, np.int32)), "row": rows})
                yield t.filter(keep).cast(UID_SCHEMA)

    def dedupe_partition(self, p: int) -> None:
        """Step 2 for partition ``p``: rows whose uid appeared at an earlier (input, row), by bucket."""
        if io.exists(self.dedupe_url(p)):
            return
        t = pa.concat_tables(
            [
                _read_group(self.uids_url(g), p, self.num_parts, UID_SCHEMA)
                for g in range(self.num_input_groups)
            ]
        )
        t = t.sort_by([("uid", "ascending"), ("input", "ascending"), ("row", "ascending")])
        dups = t.filter(_repeats(t.column("uid"))).select(["input", "row"]).cast(DUP_SCHEMA)
        key = np.asarray([self.bucket_of(i) for i in dups.column("input").to_pylist()], np.int64)
        _write_grouped(self._out(), self._rel(self.dedupe_url(p)), dups, key, self.num_buckets)

    def gather_bucket(self, b: int) -> None:
        """Step 3 for bucket ``b``: its duplicate rows from every partition, sorted by (input, row)."""
        if io.exists(self.bucket_url(b)):
            return
        t = pa.concat_tables(
            [_read_group(self.dedupe_url(p), b, self.num_buckets, DUP_SCHEMA) for p in range(self.num_parts)]
        )
        t = t.sort_by([("input", "ascending"), ("row", "ascending")])
        with self._out().open(*self._rel(self.bucket_url(b))) as f:
            pq.write_table(t, f)


def _run_step(dedupe: Any, step: str, index: int) -> dict[str, Any]:
    """Run ``dedupe.<step>(index)`` as an executor task: ``{"ok": True}`` or the error for the driver."""
    import traceback

    try:
        getattr(dedupe, step)(index)
        return {"ok": True}
    except Exception:  # noqa: BLE001 - reported by the driver; a re-run retries the task
        return {"ok": False, "error": traceback.format_exc(limit=8)}
    finally:  # a worker runs many tasks: give what the allocator kept of this one back
        pa.default_memory_pool().release_unused()


@dataclass(frozen=True)
class PlanStep:
    """A picklable plan-step call for the executors (``step`` is a :class:`UidDedupe` method name)."""

    dedupe: UidDedupe
    step: Literal["partition_inputs", "dedupe_partition", "gather_bucket"]

    def __call__(self, index: int) -> dict[str, Any]:
        return _run_step(self.dedupe, self.step, index)


def read_duplicate_rows(url: str, input_index: int, start: int, end: int) -> set[int]:
    """Rows ``[start, end)`` of input ``input_index`` listed in the duplicates file ``url``."""
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as f:
        t = pq.read_table(
            f, filters=[("input", "=", input_index), ("row", ">=", start), ("row", "<", end)], columns=["row"]
        )
    return set(t.column("row").to_pylist())


# ------------------------------------------------------------------------------------------ merge steps


@dataclass(frozen=True)
class ImageDedupe:
    """The merge's cross-shard duplicate-image shuffle: groups of shard stats -> sha256 partitions."""

    output: str
    chash: str
    shard_names: tuple[str, ...]
    group_size: int
    num_parts: int
    owner: str = ""

    @property
    def num_groups(self) -> int:
        return math.ceil(len(self.shard_names) / self.group_size)

    def _rel(self, url: str) -> tuple[str, ...]:
        return tuple(url[len(self.output.rstrip("/")) + 1 :].split("/"))

    def group_url(self, g: int) -> str:
        return io.join(self.output, MERGE_DIR, self.chash, "sha", f"group-{g:05d}.parts")

    def part_url(self, p: int) -> str:
        return io.join(self.output, MERGE_DIR, self.chash, "dup", f"part-{p:05d}.parquet")

    def partition_group(self, g: int) -> None:
        if io.exists(self.group_url(g)):
            return
        tables, keys = [SHA_SCHEMA.empty_table()], [np.zeros(0, np.uint64)]
        first = g * self.group_size
        for k, name in enumerate(self.shard_names[first : first + self.group_size], start=first):
            st = read_stats(self.output, name)
            if st is None:
                raise RuntimeError(f"{name}: not done")
            n = len(st["uids"])
            shard, pos = np.full(n, k, np.int32), np.arange(n, dtype=np.int32)
            cols = [pa.array(st["sha256"], pa.string()), shard, pos, pa.array(st["uids"], pa.string())]
            tables.append(pa.table(cols, schema=SHA_SCHEMA))
            keys.append(partition_of(st["sha256"], self.num_parts))
            del st
        table, key = pa.concat_tables(tables).combine_chunks(), np.concatenate(keys)
        out = OutputFolder(self.output, self.owner)
        _write_grouped(out, self._rel(self.group_url(g)), table, key, self.num_parts)

    def dedupe_partition(self, p: int) -> None:
        if io.exists(self.part_url(p)):
            return
        t = pa.concat_tables(
            [_read_group(self.group_url(g), p, self.num_parts, SHA_SCHEMA) for g in range(self.num_groups)]
        )
        t = t.sort_by([("sha", "ascending"), ("shard", "ascending"), ("pos", "ascending")])
        dups = t.filter(_repeats(t.column("sha"))).select(["shard", "pos", "uid"]).cast(DUP_IMAGE_SCHEMA)
        dups = dups.sort_by([("shard", "ascending"), ("pos", "ascending")])
        with OutputFolder(self.output, self.owner).open(*self._rel(self.part_url(p))) as f:
            pq.write_table(dups, f)

    def iter_duplicates(self) -> Iterator[str]:
        """Every duplicate image's uid in (shard, position) order: a k-way merge of the partitions."""

        def rows(p: int) -> Iterator[tuple[int, int, str]]:
            fs, path = io.filesystem(self.part_url(p))
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):  # x P_m files open at once
                    yield from zip(*(batch.column(c).to_pylist() for c in ("shard", "pos", "uid")))

        for _, _, uid in heapq.merge(*(rows(p) for p in range(self.num_parts))):
            yield uid


@dataclass(frozen=True)
class MergeStep:
    dedupe: ImageDedupe
    step: Literal["partition_group", "dedupe_partition"]

    def __call__(self, index: int) -> dict[str, Any]:
        return _run_step(self.dedupe, self.step, index)


def write_lines(f: IO[bytes], lines: Iterator[str], chunk: int = 65_536) -> int:
    """``lines`` to ``f``, one per line, in chunks (never all at once); returns how many."""
    buf: list[str] = []
    n = 0
    for line in lines:
        n += 1
        buf.append(line + "\n")
        if len(buf) >= chunk:
            f.write("".join(buf).encode("utf-8"))
            buf.clear()
    f.write("".join(buf).encode("utf-8"))
    return n

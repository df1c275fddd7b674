"""The index steps of the shard job: synthetic captions, and the img2dataset index, joined to the plan's rows
per shard, in memory that does not grow with the caption set or the img2dataset output. Run by
``data_prep.shard`` after planning (``--stage plan`` too) when ``syn.paths`` is set and ``syn.join=index``
(the default), and when ``source.images=img2dataset`` and ``source.img2dataset_index=index`` (the default);
see docs/data-prep.md.

Three kinds of array tasks (local pool, Ray or in-process, through ``executors.run_units``), each idempotent
and atomic (a task whose output exists is skipped, so a killed index step is finished by running again):

1. **rows** (one per input file): each row's normalised uid and shard unit, hash-partitioned by uid
   -> ``_plan/syn_index/rows/<input>.parquet`` (sorted by partition).
2. **records** (one per caption file): JSONL lines, sidecar tars or DataCompDR's tars (uid from each
   sample's ``json``, sha256, optionally the ``npz`` teacher embeddings), hash-partitioned the same way
   -> ``_plan/syn_index/records/<file>.parquet`` + ``.json`` (its counts).
3. **join** (one per partition): the partition's rows and records (first record of a uid wins, in file
   order, as the in-memory join) -> ``_plan/syn_index/joined/<part>.parquet`` sorted by unit, + ``.json``
   (matched rows, unmatched records per caption file).

Then ``_plan/syn_index/index.json`` (the totals) marks the index complete. A shard task reads only its own
unit's records from each partition (:func:`load_unit`; row groups of other units are skipped by their
statistics). The number of partitions is ``ceil(caption bytes / syn.partition_mb)``: a join task holds one
partition's records and uids.

The img2dataset index (:func:`build_img2dataset_index`, ``_plan/i2d_index/``) runs the same rows and join
tasks, keyed by uid or url (``source.img2dataset_join``), with one records task per img2dataset tar or
files-output folder (:func:`sources.index_img2dataset_item`); its partitions follow ``plan.max_memory_gb``.
A shard task loads its own unit's entries with :func:`load_img2dataset_unit`. (The join's counts keep the
caption names: ``rows_with_syn`` is the rows that found a record.)
"""

from __future__ import annotations

import hashlib
import math
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.data.prep import safe_tar, sources
from pipeline.data.prep.executors import ExecutorConfig, run_units
from pipeline.data.prep.filters import normalise_uid
from pipeline.data.prep.partition import num_partitions as partitions_for_budget
from pipeline.data.prep.sources import ImageRef, SourceConfig, SynConfig, SynRecord, SynReport
from pipeline.data.prep.writer import public_url, write_json
from pipeline.data.tar import atomic_file

INDEX_DIR = "syn_index"
INDEX_FILE = "index.json"
CHUNK_ROWS = 1 << 16  # records buffered before a row-group batch is written
ROW_GROUP = 4096  # small row groups: a reader of one partition / unit skips the others by statistics

_ROWS_SCHEMA = pa.schema([("part", pa.int32()), ("uid", pa.string()), ("unit", pa.int32())])
_RECORD_SCHEMA = pa.schema(
    [
        ("part", pa.int32()),
        ("uid", pa.string()),
        ("texts", pa.list_(pa.string())),
        ("sha256", pa.string()),
        ("teacher", pa.binary()),
    ]
)
_JOINED_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("uid", pa.string()),
        ("texts", pa.list_(pa.string())),
        ("sha256", pa.string()),
        ("teacher", pa.binary()),
    ]
)


def partition_of(uid: str, num_partitions: int) -> int:
    digest = hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_partitions


def num_partitions(files: list[str], partition_mb: int) -> int:
    total = 0
    for url in files:
        fs, path = io.filesystem(url)
        total += int(fs.size(path) or 0)
    return max(1, math.ceil(total / (partition_mb << 20)))


def _dir(plan_dir: str, *parts: str, name: str = INDEX_DIR) -> str:
    return io.join(plan_dir, name, *parts)


def _write_table(layout: IndexLayout, table: pa.Table, url: str) -> None:
    with atomic_file(url, layout.tmp_dir, layout.owner) as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP)


def _read(url: str, column: str, value: int) -> pa.Table:
    """Rows of a parquet file whose ``column`` equals ``value``, reading only the row groups whose statistics
    can hold it."""
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        idx = pf.schema_arrow.get_field_index(column)
        groups = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(idx).statistics
            if st is None or not st.has_min_max or st.min <= value <= st.max:
                groups.append(g)
        if not groups:
            return pf.schema_arrow.empty_table()
        t = pf.read_row_groups(groups)
    return t.filter(pc.equal(t.column(column), value))


# ---------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class IndexLayout:
    """Where the index lives and how it is cut (what every task needs to know)."""

    plan_dir: str
    num_partitions: int
    tmp_dir: str = ""
    """Where temporaries are written (the job's ``<output>/_tmp/``), tagged with ``owner``."""
    owner: str = ""
    name: str = INDEX_DIR
    """The index's folder under the plan: ``syn_index`` (captions) or ``i2d_index`` (img2dataset)."""

    def rows_url(self, i: int) -> str:
        return _dir(self.plan_dir, "rows", f"{i:06d}.parquet", name=self.name)

    def records_url(self, j: int, ext: str = "parquet") -> str:
        return _dir(self.plan_dir, "records", f"{j:06d}.{ext}", name=self.name)

    def joined_url(self, k: int, ext: str = "parquet") -> str:
        return _dir(self.plan_dir, "joined", f"{k:05d}.{ext}", name=self.name)


@dataclass(frozen=True)
class RowsTask:
    """Input file ``i`` -> (partition, uid, unit) of its rows, sorted by partition (row order kept).
    ``uid_column`` holds the join key: a uid (normalised), or with ``key="url"`` a url (as the shard task
    reads it: a string, or "" for any other value)."""

    layout: IndexLayout
    source: SourceConfig
    uid_column: str
    samples_per_shard: int
    key: str = "uid"

    def __call__(self, item: tuple[int, str, int]) -> dict[str, Any]:
        i, url, first_unit = item
        if io.exists(self.layout.rows_url(i)):
            return {"ok": True}
        parts, uids, units = [], [], []
        fs, path = io.filesystem(url)
        # storage errors raise (the task fails and a rerun retries it): an empty rows file would silently
        # drop the file's captions for good
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            row = 0
            has = self.uid_column in pf.schema_arrow.names
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                try:
                    values = sources._values(pf.read_row_group(g, [self.uid_column]).column(0)) if has else []
                except pa.ArrowInvalid:  # a corrupt row group: its rows fail in their unit (unreadable_input)
                    values = []
                for r, v in enumerate(values):
                    if self.key == "url":
                        v = sources._text(v)
                        uid = v if isinstance(v, str) else ""
                    else:
                        uid = normalise_uid(v)
                    if uid is not None:
                        parts.append(partition_of(uid, self.layout.num_partitions))
                        uids.append(uid)
                        units.append(first_unit + (row + r) // self.samples_per_shard)
                row += n
        t = pa.table({"part": parts, "uid": uids, "unit": units}, schema=_ROWS_SCHEMA)
        t = t.take(pc.sort_indices(t, [("part", "ascending")]))  # stable: row order within a part
        _write_table(self.layout, t, self.layout.rows_url(i))
        return {"ok": True}


@dataclass(frozen=True)
class RecordsTask:
    """Caption file ``j`` -> its records (partition, uid, captions, sha256, teacher npz), plus its counts."""

    layout: IndexLayout
    syn: SynConfig
    max_member_bytes: int

    def __call__(self, item: tuple[int, str]) -> dict[str, Any]:
        j, url = item
        if io.exists(self.layout.records_url(j, "json")):
            return {"ok": True}
        report = SynReport()
        lay = self.layout
        num_records = 0
        with atomic_file(lay.records_url(j), lay.tmp_dir, lay.owner) as f:
            writer = pq.ParquetWriter(f, _RECORD_SCHEMA)
            for chunk in _chunks(sources.iter_file_records(url, self.syn, self.max_member_bytes, report)):
                cols: dict[str, list[Any]] = {n: [] for n in _RECORD_SCHEMA.names}
                for uid, rec in chunk:
                    if rec is None:
                        report.invalid += 1
                        continue
                    cols["part"].append(partition_of(uid, self.layout.num_partitions))
                    cols["uid"].append(uid)
                    cols["texts"].append(rec.texts)
                    cols["sha256"].append(rec.sha256)
                    cols["teacher"].append(rec.teacher)
                t = pa.table(cols, schema=_RECORD_SCHEMA)
                num_records += t.num_rows
                writer.write_table(t.take(pc.sort_indices(t, [("part", "ascending")])), ROW_GROUP)
            writer.close()
        counts = {
            "records": num_records,
            "invalid": report.invalid,
            "tar_skipped": dict(sorted(report.tar.skipped.items())),
        }
        write_json(lay.records_url(j, "json"), counts, lay.tmp_dir, lay.owner)
        return {"ok": True}


def _chunks(it: Iterator[Any]) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class JoinTask:
    """Partition ``k``: every row's first record (caption, or img2dataset image), by unit; counts of matches
    per record file. ``schema``: the joined file's columns (unit, uid, then the records' value columns)."""

    layout: IndexLayout
    num_inputs: int
    num_files: int
    schema: pa.Schema = _JOINED_SCHEMA

    def __call__(self, k: int) -> dict[str, Any]:
        lay = self.layout
        if io.exists(lay.joined_url(k, "json")):
            return {"ok": True}
        rows = pa.concat_tables(
            [_read(lay.rows_url(i), "part", k) for i in range(self.num_inputs)]
            or [_ROWS_SCHEMA.empty_table()]
        )
        row_uids = set(rows.column("uid").to_pylist())
        first: dict[str, dict[str, Any]] = {}
        matched = [0] * self.num_files
        unmatched = [0] * self.num_files
        duplicates = 0
        for j in range(self.num_files):
            for rec in _read(lay.records_url(j), "part", k).to_pylist():
                if rec["uid"] in first:
                    duplicates += 1
                elif rec["uid"] in row_uids:
                    first[rec["uid"]] = rec
                    matched[j] += 1
                else:
                    unmatched[j] += 1
        cols: dict[str, list[Any]] = {n: [] for n in self.schema.names}
        seen: set[tuple[int, str]] = set()
        rows_with_syn = 0
        for uid, unit in zip(rows.column("uid").to_pylist(), rows.column("unit").to_pylist()):
            rec = first.get(uid)
            if rec is None:
                continue
            rows_with_syn += 1
            if (unit, uid) in seen:
                continue
            seen.add((unit, uid))
            cols["unit"].append(unit)
            for name in self.schema.names[1:]:
                cols[name].append(rec[name])
        t = pa.table(cols, schema=self.schema)
        t = t.take(pc.sort_indices(t, [("unit", "ascending")]))
        _write_table(lay, t, lay.joined_url(k))
        counts = {
            "rows": rows.num_rows,
            "rows_with_syn": rows_with_syn,
            "matched": matched,
            "unmatched": unmatched,
            "duplicates": duplicates,
        }
        write_json(lay.joined_url(k, "json"), counts, lay.tmp_dir, lay.owner)
        return {"ok": True}


@dataclass(frozen=True)
class _Safe:
    """A picklable task wrapper that returns errors as data (the driver raises once all tasks ran)."""

    task: Any

    def __call__(self, item: Any) -> dict[str, Any]:
        try:
            return self.task(item)
        except Exception:  # noqa: BLE001 - reported by the driver; a re-run retries the task
            return {"ok": False, "item": repr(item), "error": traceback.format_exc(limit=8)}


# ---------------------------------------------------------------------------------------------- driver


class CaptionIndexError(RuntimeError):
    """Some index tasks failed; re-run to retry them."""


def _run(task: Any, items: list[Any], executor: ExecutorConfig, what: str) -> None:
    """Run every item's task; then raise naming the first failure (a rerun retries only the failed ones)."""
    errors = [r for _, r in run_units(_Safe(task), items, executor) if not r["ok"]]
    if errors:
        raise CaptionIndexError(
            f"{what}: {len(errors)} task(s) failed (first: {errors[0]['item']}):\n"
            f"{errors[0]['error']}re-run the same command to retry them"
        )


def _write_rows(
    task: RowsTask, inputs: list[dict[str, Any]], first_units: list[int], executor: ExecutorConfig
) -> None:
    """The rows step: one task per readable input file; an unreadable one gets an empty rows file."""
    items = [(i, inp["url"], first_units[i]) for i, inp in enumerate(inputs) if "error" not in inp]
    _run(task, items, executor, f"{task.layout.name} rows")
    for i, inp in enumerate(inputs):  # unreadable files have no rows to join
        if "error" in inp and not io.exists(task.layout.rows_url(i)):
            _write_table(task.layout, _ROWS_SCHEMA.empty_table(), task.layout.rows_url(i))


def build_index(
    plan_dir: str,
    inputs: list[dict[str, Any]],
    first_units: list[int],
    source: SourceConfig,
    uid_column: str,
    samples_per_shard: int,
    syn: SynConfig,
    executor: ExecutorConfig,
    url_query: str = "strip",
    log: Callable[[str], None] = print,
    tmp_dir: str = "",
    owner: str = "",
) -> dict[str, Any]:
    """Build (or load, when complete) the caption index under ``<plan_dir>/syn_index/``; returns its totals.

    ``inputs``: the plan's input files (``{"url", "num_rows"}`` or ``{"url", "error"}``), ``first_units``:
    the shard unit number of each file's first rows; ``tmp_dir``/``owner``: where the job's temporaries go and
    the run's tag for them. Logs the join's counts and warns (in ``log``) for every
    caption file that matched no row.
    """
    marker = _dir(plan_dir, INDEX_FILE)
    if io.exists(marker):
        return io.read_json(marker)
    files = sources.syn_files(syn)
    layout = IndexLayout(plan_dir, num_partitions(files, syn.partition_mb), tmp_dir, owner)

    def run(task: Any, items: list[Any]) -> None:
        _run(task, items, executor, "caption index")

    _write_rows(RowsTask(layout, source, uid_column, samples_per_shard), inputs, first_units, executor)
    run(RecordsTask(layout, syn, source.max_member_bytes), list(enumerate(files)))
    run(JoinTask(layout, len(inputs), len(files)), list(range(layout.num_partitions)))
    source_of = {url: p for p in reversed(syn.paths) for url in sources.syn_files(SynConfig(paths=(p,)))}
    per_file = []
    for j, url in enumerate(files):
        counts = io.read_json(layout.records_url(j, "json"))
        per_file.append(
            {"url": url, "source": source_of.get(url, ""), **counts, "matched": 0, "unmatched": 0}
        )
    rows_with_syn = duplicates = 0
    for k in range(layout.num_partitions):
        c = io.read_json(layout.joined_url(k, "json"))
        rows_with_syn += c["rows_with_syn"]
        duplicates += c["duplicates"]
        for j in range(len(files)):
            per_file[j]["matched"] += c["matched"][j]
            per_file[j]["unmatched"] += c["unmatched"][j]
    totals = {
        "num_partitions": layout.num_partitions,
        "rows_with_syn": rows_with_syn,
        "records": sum(f["records"] for f in per_file),
        "matched": sum(f["matched"] for f in per_file),
        "unmatched": sum(f["unmatched"] for f in per_file),
        "duplicates": duplicates,
        "invalid": sum(f["invalid"] for f in per_file),
        "files": per_file,
    }
    write_json(marker, totals, tmp_dir, owner)
    log_report(totals, url_query, log)
    return totals


def log_report(totals: dict[str, Any], url_query: str, log: Callable[[str], None]) -> None:
    """One line of join counts, then one warning per ``syn.paths`` entry whose files matched no row."""
    log(
        f"synthetic captions: {totals['rows_with_syn']:,} rows got captions; {totals['records']:,} records, "
        f"{totals['unmatched']:,} matched no row, {totals['duplicates']:,} repeated a uid, "
        f"{totals['invalid']:,} invalid"
    )
    by_source: dict[str, list[int]] = {}
    for f in totals["files"]:
        n = by_source.setdefault(f["source"], [0, 0, 0])
        n[0], n[1], n[2] = n[0] + 1, n[1] + f["records"], n[2] + f["matched"]
    for source, (num_files, records, matched) in by_source.items():
        where = f"{public_url(source, url_query)} ({num_files:,} file(s), {records:,} records)"
        if not records:
            log(f"warning: syn.paths: {where} holds no caption record")
        elif not matched:
            log(
                f"warning: syn.paths: {where} matched no row (joined by uid: the json member's uid in "
                "DataCompDR tars, the key of our sidecars, the uid / key field of JSONL lines)"
            )


def load_unit(plan_dir: str, unit: int, num_partitions: int) -> dict[str, SynRecord]:
    """uid -> caption record of shard unit ``unit``'s rows (only that unit's row groups are read)."""
    out: dict[str, SynRecord] = {}
    layout = IndexLayout(plan_dir, num_partitions)
    for k in range(num_partitions):
        for rec in _read(layout.joined_url(k), "unit", unit).to_pylist():
            out[rec["uid"]] = SynRecord(rec["texts"], rec["sha256"], rec["teacher"])
    return out


# ---------------------------------------------------------------------------------------------- img2dataset

I2D_INDEX_DIR = "i2d_index"
BYTES_PER_I2D_ROW = 512
"""A join task's memory per row of its partition: the row's key and unit plus one index entry (key, url of
the tar, offset, size) as Python objects, with the dict and set that hold them."""

_I2D_RECORD_SCHEMA = pa.schema(
    [
        ("part", pa.int32()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
    ]
)
_I2D_JOINED_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
    ]
)


@dataclass(frozen=True)
class I2dRecordsTask:
    """Work item ``j`` of the img2dataset output (one tar, or one folder of the files format) -> its samples'
    (partition, join key, image url, offset, size), sorted by partition (sample order kept), plus counts."""

    layout: IndexLayout
    source: SourceConfig

    def __call__(self, item: tuple[int, tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
        j, work = item
        lay = self.layout
        if io.exists(lay.records_url(j, "json")):
            return {"ok": True}
        report = safe_tar.TarReport()
        cols: dict[str, list[Any]] = {n: [] for n in _I2D_RECORD_SCHEMA.names}
        for key, (url, offset, size) in sources.index_img2dataset_item(self.source, work, report):
            cols["part"].append(partition_of(key, lay.num_partitions))
            cols["uid"].append(key)
            cols["url"].append(url)
            cols["offset"].append(offset)
            cols["size"].append(size)
        t = pa.table(cols, schema=_I2D_RECORD_SCHEMA)
        _write_table(lay, t.take(pc.sort_indices(t, [("part", "ascending")])), lay.records_url(j))
        counts = {"records": t.num_rows, "tar_skipped": dict(sorted(report.skipped.items()))}
        write_json(lay.records_url(j, "json"), counts, lay.tmp_dir, lay.owner)
        return {"ok": True}


def build_img2dataset_index(
    plan_dir: str,
    inputs: list[dict[str, Any]],
    first_units: list[int],
    source: SourceConfig,
    samples_per_shard: int,
    max_memory_gb: float,
    executor: ExecutorConfig,
    log: Callable[[str], None] = print,
    tmp_dir: str = "",
    owner: str = "",
) -> dict[str, Any]:
    """Build (or load, when complete) the per-unit img2dataset index under ``<plan_dir>/i2d_index/``; returns
    its totals. The same three steps as the caption index: rows (keyed by uid or url, as
    ``source.img2dataset_join``), records (one task per img2dataset tar / files-format folder, in
    :func:`sources.img2dataset_items` order, so the first key wins as in the in-memory index) and a join per
    partition. Partitions: ``ceil(rows x BYTES_PER_I2D_ROW / max_memory_gb)`` (``plan.max_memory_gb``)."""
    marker = _dir(plan_dir, INDEX_FILE, name=I2D_INDEX_DIR)
    if io.exists(marker):
        return io.read_json(marker)
    # the first run's partition count holds until the index is complete (plan.max_memory_gb is not in the
    # config hash: a rerun with another budget must not mix two partitionings)
    fixed = _dir(plan_dir, "partitions.json", name=I2D_INDEX_DIR)
    if not io.exists(fixed):
        rows = sum(inp.get("num_rows", 0) for inp in inputs)
        parts = partitions_for_budget(rows, BYTES_PER_I2D_ROW, max_memory_gb)
        write_json(fixed, {"num_partitions": parts}, tmp_dir, owner)
    parts = io.read_json(fixed)["num_partitions"]
    layout = IndexLayout(plan_dir, parts, tmp_dir, owner, I2D_INDEX_DIR)
    by_url = source.img2dataset_join == "url"
    key_column = source.url_column if by_url else source.uid_column
    rows_task = RowsTask(layout, source, key_column, samples_per_shard, "url" if by_url else "uid")
    _write_rows(rows_task, inputs, first_units, executor)
    items = sources.img2dataset_items(source)
    _run(I2dRecordsTask(layout, source), list(enumerate(items)), executor, "img2dataset index records")
    join = JoinTask(layout, len(inputs), len(items), _I2D_JOINED_SCHEMA)
    _run(join, list(range(parts)), executor, "img2dataset index join")
    skipped: dict[str, int] = {}
    records = 0
    for j in range(len(items)):
        c = io.read_json(layout.records_url(j, "json"))
        records += c["records"]
        for reason, n in c["tar_skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    matched = duplicates = 0
    for k in range(parts):
        c = io.read_json(layout.joined_url(k, "json"))
        matched += c["rows_with_syn"]
        duplicates += c["duplicates"]
    totals = {
        "num_partitions": parts,
        "num_files": len(items),
        "records": records,
        "rows_matched": matched,
        "duplicates": duplicates,
        "tar_skipped": dict(sorted(skipped.items())),
    }
    write_json(marker, totals, tmp_dir, owner)
    if skipped:
        log(f"img2dataset index: skipped members {totals['tar_skipped']}")
    log(
        f"img2dataset index: {records:,} images in {len(items):,} file(s)/folder(s), {matched:,} rows matched, "
        f"{duplicates:,} repeated a key; {parts:,} partition(s)"
    )
    return totals


def load_img2dataset_unit(plan_dir: str, unit: int, num_partitions: int) -> dict[str, ImageRef]:
    """join key -> image of shard unit ``unit``'s rows (only that unit's row groups are read)."""
    out: dict[str, ImageRef] = {}
    layout = IndexLayout(plan_dir, num_partitions, name=I2D_INDEX_DIR)
    for k in range(num_partitions):
        t = _read(layout.joined_url(k), "unit", unit)
        for key, url, offset, size in zip(
            *(t.column(c).to_pylist() for c in ("uid", "url", "offset", "size"))
        ):
            out[key] = ImageRef(url, offset, size)
    return out

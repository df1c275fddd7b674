"""The shard job: plan -> shard units (any executor, any SLURM array task) -> merge. Run it with
``python -m data_prep.shard --config my.toml``; see docs/data-prep.md.

* **Plan** (once, deterministic, cached in ``<output>/_plan/``): list the inputs and their row counts, find
  duplicate uids over the whole input, list a folder source, index an img2dataset output. Input file ``i``
  rows ``[k*S, (k+1)*S)`` become shard unit number ``sum(units of files < i) + k`` (``S =
  output.samples_per_shard``), so every shard is an independent, idempotent unit of work.
* **Shard**: each unit reads its rows, fetches images with a thread pool, decodes/filters/resizes them in
  row order and writes one tar atomically, then its ``.stats.json`` (the completion marker). A re-run skips
  units whose stats exist for the same config; a killed unit is simply redone and gives the same bytes.
* **Merge** (when every unit is done): ``sizes.json``, ``failures.parquet``, ``duplicate_images.txt``,
  subset uid lists and ``manifest.json``; checks ``kept + failed == input`` and raises if not. It streams
  the shards' stats (the cross-shard duplicate-image list through sha256 partitions), never all uids at once.

The global uid dedupe of the plan and the image dedupe of the merge run as array tasks over hash partitions
on disk (:mod:`pipeline.data.prep.partition`), so no process holds more than ``plan.max_memory_gb`` of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import ConfigError, to_dict
from pipeline.data.prep import index as caption_index
from pipeline.data.prep import sources
from pipeline.data.prep.executors import ExecutorConfig, run_units, task_range
from pipeline.data.prep.filters import (
    REASONS,
    FilterConfig,
    check_caption,
    check_image_size,
    check_score,
    normalise_uid,
)
from pipeline.data.prep.images import ImageConfig, ImageError, process_image
from pipeline.data.prep.partition import (
    BYTES_PER_SHA_ROW,
    BYTES_PER_UID_ROW,
    ImageDedupe,
    MergeStep,
    PlanConfig,
    PlanStep,
    UidDedupe,
    inputs_per_task,
    num_partitions,
    read_duplicate_rows,
    write_lines,
)
from pipeline.data.prep.sources import (
    MISSING,
    FetchConfig,
    Fetcher,
    FetchError,
    ImageRef,
    SourceConfig,
    SynConfig,
    SynRecord,
)
from pipeline.data.prep.subsets import SubsetConfig, SubsetWriter, materialize, read_uid_list
from pipeline.data.prep.writer import (
    DUPLICATE_IMAGES_FILE,
    FAILURE_SCHEMA,
    FAILURES_FILE,
    OutputConfig,
    OutputFolder,
    public_json,
    public_text,
    public_url,
    read_stats,
    remove_stale_temp_files,
    shard_pattern,
    stats_url,
    write_json,
)
from pipeline.data.schema import (
    CAPTION_KEY,
    IMAGE_KEY,
    KEY,
    MANIFEST_FILE,
    META_KEY,
    SCHEMA_VERSION,
    SIZES_FILE,
    SYN_KEY,
    TEACHER_KEY,
    SampleMeta,
)

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
PLAN_STEPS = {
    "plan-partition": "partition_inputs",
    "plan-dedupe": "dedupe_partition",
    "plan-gather": "gather_bucket",
}
MERGE_STEPS = {"merge-partition": "partition_group", "merge-dedupe": "dedupe_partition"}
STAGES = ("all", "plan", *PLAN_STEPS, "shard", *MERGE_STEPS, "merge")
"""``plan`` and ``merge`` run all their steps through the executor; ``plan-*`` / ``merge-*`` run one step's
share of array task ``task_index`` (SLURM arrays chained with ``--dependency=afterok``)."""


@dataclass(frozen=True)
class ShardJobConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    syn: SynConfig = field(default_factory=SynConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    subsets: SubsetConfig = field(default_factory=SubsetConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        self.source.check_required()
        if self.source.extras and self.image.resize_mode != "none":
            raise ValueError(
                "source.extras: dense labels must stay aligned with the image; set image.resize_mode=none"
            )
        if not self.output.path:
            raise ValueError("output.path: required (a folder or s3://bucket/prefix)")


class ShardJobError(RuntimeError):
    """Some units failed (storage errors, bugs) or the accounting does not add up; re-run to retry."""


def content_config(cfg: ShardJobConfig) -> dict[str, Any]:
    """The config keys that decide the shards' content: not the executor, fetch.threads, output.path or
    output.overwrite, plan (so a re-run may change those and still resume; the plan's partitioning never
    changes which rows are kept)."""
    d = to_dict(cfg)
    d.pop("executor")
    d.pop("plan")
    d["fetch"].pop("threads")
    d["output"].pop("overwrite")
    d["output"].pop("path")
    return d


def config_hash(cfg: ShardJobConfig) -> str:
    return hashlib.sha256(json.dumps(content_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Unit:
    index: int
    name: str
    input_index: int
    url: str
    start: int
    end: int
    duplicates: str = ""
    """The file listing this unit's duplicate-uid rows (``""``: no uid dedupe)."""


@dataclass(frozen=True)
class Plan:
    config_hash: str
    inputs: list[dict[str, Any]]
    """One entry per input file: {"url", "num_rows"} or {"url", "error"} for unreadable files."""
    dedupe: dict[str, Any] = field(default_factory=dict)
    """How the uid dedupe was planned: {"mode", "num_partitions", "num_buckets"} ({} when off)."""

    def units(self, out: OutputConfig) -> list[Unit]:
        units: list[Unit] = []
        dd = _uid_dedupe_layout(out.path, self)
        for i, inp in enumerate(self.inputs):
            n = inp.get("num_rows", 0)
            dups = ""
            if self.dedupe.get("mode") == "memory":
                dups = io.join(out.path, PLAN_DIR, "duplicates.parquet")
            elif dd is not None:
                dups = dd.bucket_url(dd.bucket_of(i))
            for start in range(0, n, out.samples_per_shard):
                k = len(units)
                end = min(n, start + out.samples_per_shard)
                units.append(Unit(k, out.shard_name(k), i, inp["url"], start, end, dups))
        return units


def _uid_dedupe_layout(
    output: str, plan: Plan, owner: str = "", cfg: PlanConfig | None = None
) -> UidDedupe | None:
    if plan.dedupe.get("mode") != "partitioned":
        return None
    batch = cfg.batch_rows if cfg else PlanConfig().batch_rows
    return UidDedupe(
        output,
        plan.config_hash,
        tuple(plan.inputs),
        plan.dedupe["uid_column"],
        plan.dedupe["num_partitions"],
        batch,
        owner,
        plan.dedupe.get("inputs_per_task", 1),
    )


def _plan_url(cfg: ShardJobConfig, name: str) -> str:
    return io.join(cfg.output.path, PLAN_DIR, name)


def _uid_column(url: str, column: str) -> pa.Array | None:
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            return None
        col = pf.read(columns=[column]).column(column).combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.utf8_trim_whitespace(col.cast(pa.string()))
    return pa.array([normalise_uid(v) for v in col.to_pylist()], pa.string())


def find_duplicate_rows(inputs: list[dict[str, Any]], uid_column: str) -> pa.Table:
    """(input, row) of every row whose uid appeared earlier in input order; first occurrence is kept."""
    arrays, owners, offsets = [], [], []
    for i, inp in enumerate(inputs):
        if "error" in inp:
            continue
        try:
            col = _uid_column(inp["url"], uid_column)
        except Exception:  # noqa: BLE001 - an unreadable column: its rows fail in their unit instead
            col = None
        if col is None or len(col) == 0:
            continue
        arrays.append(col)
        owners.append(i)
        offsets.append(sum(len(a) for a in arrays[:-1]))
    empty = pa.table({"input": pa.array([], pa.int32()), "row": pa.array([], pa.int64())})
    if not arrays:
        return empty
    allv = pa.chunked_array(arrays, pa.string())
    counts = pc.value_counts(allv.drop_null() if allv.null_count else allv)
    dup_values = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup_values) == 0:
        return empty
    positions = pc.indices_nonzero(pc.is_in(allv, value_set=dup_values)).to_numpy()
    values = pc.take(allv, pa.array(positions)).to_pylist()
    offs = np.asarray(offsets)
    seen: set[str] = set()
    rows_in, rows_row = [], []
    for pos, value in zip(positions.tolist(), values):
        if value in seen:
            k = int(np.searchsorted(offs, pos, side="right") - 1)
            rows_in.append(owners[k])
            rows_row.append(pos - offsets[k])
        else:
            seen.add(value)
    return pa.table({"input": pa.array(rows_in, pa.int32()), "row": pa.array(rows_row, pa.int64())})


def _write_plan_parquet(out: OutputFolder, name: str, table: pa.Table) -> None:
    with out.open(PLAN_DIR, name) as f:
        pq.write_table(table, f)


def make_plan(
    cfg: ShardJobConfig,
    chash: str,
    log: Callable[[str], None] = print,
    owner: str = "",
    stage: str = "plan",
    task_index: int = 0,
    num_tasks: int = 1,
) -> Plan | None:
    """Load ``<output>/_plan/plan.json`` if it was made with this config, else build and write it
    (``owner``: the run's tag for its temporaries). ``stage`` ``plan-partition`` / ``plan-dedupe`` /
    ``plan-gather`` runs only array task ``task_index``'s share of that step and returns None."""
    out = OutputFolder(cfg.output.path, owner)
    plan_url = _plan_url(cfg, PLAN_FILE)
    if io.exists(plan_url):
        old = io.read_json(plan_url)
        if old.get("config_hash") == chash:
            return Plan(old["config_hash"], old["inputs"], old.get("dedupe", {}))
        if not cfg.output.overwrite:
            raise ConfigError(
                f"output.path: {cfg.output.path} was planned with another config ({old.get('config_hash')} != "
                f"{chash}); use a new output.path or set output.overwrite=true"
            )
    t0 = time.time()
    inputs = _plan_inputs(cfg, chash, out)
    uid_column = "uid" if cfg.source.kind == "folder" else cfg.source.uid_column
    dedupe: dict[str, Any] = {}
    if cfg.filters.dedupe_uid and cfg.plan.dedupe == "memory":
        dedupe = {"mode": "memory"}
        if stage == "plan":
            _write_plan_parquet(out, "duplicates.parquet", find_duplicate_rows(inputs, uid_column))
    elif cfg.filters.dedupe_uid:
        rows = sum(i.get("num_rows", 0) for i in inputs)
        parts = num_partitions(rows, BYTES_PER_UID_ROW, cfg.plan.max_memory_gb)
        per_task = inputs_per_task(
            [i.get("num_rows", 0) for i in inputs], BYTES_PER_UID_ROW, cfg.plan.max_memory_gb
        )
        dedupe = {
            "mode": "partitioned",
            "uid_column": uid_column,
            "num_partitions": parts,
            "inputs_per_task": per_task,
        }
        dd = _uid_dedupe_layout(cfg.output.path, Plan(chash, inputs, dedupe), owner, cfg.plan)
        assert dd is not None
        dedupe["num_buckets"] = dd.num_buckets
        counts = {
            "partition_inputs": dd.num_input_groups,
            "dedupe_partition": parts,
            "gather_bucket": dd.num_buckets,
        }
        for step, n in counts.items():
            items = _step_items(stage, "plan", PLAN_STEPS, step, n, task_index, num_tasks)
            if items is not None:
                _run_steps(PlanStep(dd, step), items, cfg, f"plan {step}", log)
    if stage != "plan":
        return None
    if cfg.source.images == "img2dataset" and cfg.source.img2dataset_index == "memory":
        index, report = sources.build_img2dataset_index(cfg.source)
        _write_plan_parquet(out, "img2dataset_index.parquet", index)
        if report.skipped:
            log(f"img2dataset index: skipped members {dict(report.skipped)}")
    out.write_json({"config_hash": chash, "inputs": inputs, "dedupe": dedupe}, PLAN_DIR, PLAN_FILE)
    rows = sum(i.get("num_rows", 0) for i in inputs)
    log(f"planned {len(inputs)} input file(s), {rows} rows in {time.time() - t0:.1f}s")
    return Plan(chash, inputs, dedupe)


def _plan_inputs(cfg: ShardJobConfig, chash: str, out: OutputFolder) -> list[dict[str, Any]]:
    """The input files and their row counts (cached in ``_plan/<config hash>/inputs.json``, so every
    array task of a plan step sees the same list)."""
    cached = _plan_url(cfg, f"{chash}/inputs.json")
    if io.exists(cached):
        return io.read_json(cached)["inputs"]
    if cfg.source.kind == "folder":
        folder_url = _plan_url(cfg, "folder.parquet")
        _write_plan_parquet(out, "folder.parquet", sources.list_folder(cfg.source))
        urls = [folder_url]
    else:
        try:
            urls = sources.expand_urls(cfg.source.parquet)
        except FileNotFoundError as e:
            path = public_text(e.args[0], cfg.output.url_query)
            raise ConfigError(f"source.parquet: {path} does not exist") from None
        if not urls:
            patterns = public_json(list(cfg.source.parquet), cfg.output.url_query)
            raise ConfigError(f"source.parquet: no files match {patterns}")

    def count(url: str) -> dict[str, Any]:
        try:
            return {"url": url, "num_rows": sources.count_rows(url)}
        except Exception as e:  # noqa: BLE001 - a broken file is reported, not fatal
            return {"url": url, "error": f"{type(e).__name__}: {e}"[:500]}

    with ThreadPoolExecutor(16) as pool:  # footers only; threads hide object-store latency
        inputs = list(pool.map(count, urls))
    out.write_json({"config_hash": chash, "inputs": inputs}, PLAN_DIR, chash, "inputs.json")
    return inputs


def _step_items(
    stage: str, whole: str, steps: dict[str, str], step: str, n: int, task_index: int, num_tasks: int
) -> list[int] | None:
    """The task indices of ``step`` (``n`` tasks) that this process runs: all of them when ``stage`` is the
    whole ``whole`` stage, this array task's share when ``stage`` is ``step``'s own array stage (``steps``
    maps array stages to steps), None when this process does not run ``step``."""
    if stage == whole:
        return list(range(n))
    if steps[stage] == step:
        return list(task_range(n, task_index, num_tasks))
    return None


def _run_steps(
    fn: Callable[[int], dict[str, Any]],
    items: list[int],
    cfg: ShardJobConfig,
    what: str,
    log: Callable[[str], None],
) -> None:
    """Run a plan or merge step's tasks through the executor; raise naming the first failed task."""
    t0 = time.time()
    errors = [(i, r["error"]) for i, r in run_units(fn, items, cfg.executor) if not r["ok"]]
    if errors:
        i, error = min(errors)
        log(f"{what} task {i} failed:\n{public_text(error, cfg.output.url_query)}")
        raise ShardJobError(
            f"{len(errors)} of {len(items)} {what} tasks failed; re-run the same command to retry"
        )
    if items:
        log(f"{what}: {len(items)} task(s) in {time.time() - t0:.1f}s")


# ---------------------------------------------------------------------------------------------- shard units


class _Resources:
    """Per-process lookups shared by the units a worker runs (loaded once per process)."""

    def __init__(self, cfg: ShardJobConfig) -> None:
        root = cfg.source.folder if cfg.source.kind == "folder" else cfg.source.image_root
        self.fetcher = Fetcher(cfg.fetch, root)
        self.syn: dict[str, SynRecord] = {}
        self.syn_partitions = 0  # syn.join=index: the caption index's partitions (captions loaded per unit)
        if cfg.syn.paths and cfg.syn.join == "memory":
            self.syn, _ = sources.load_syn(cfg.syn, cfg.source.max_member_bytes)
        elif cfg.syn.paths:
            marker = _plan_url(cfg, f"{caption_index.INDEX_DIR}/{caption_index.INDEX_FILE}")
            self.syn_partitions = io.read_json(marker)["num_partitions"]
        self.include: set[str] | None = None
        if cfg.filters.include_uids:
            self.include = set(read_uid_list(cfg.filters.include_uids))
        self.img2dataset: dict[str, ImageRef] = {}
        self.i2d_partitions = 0  # img2dataset_index=index: the index's partitions (entries loaded per unit)
        if cfg.source.images == "img2dataset" and cfg.source.img2dataset_index == "index":
            marker = _plan_url(cfg, f"{caption_index.I2D_INDEX_DIR}/{caption_index.INDEX_FILE}")
            self.i2d_partitions = io.read_json(marker)["num_partitions"]
        elif cfg.source.images == "img2dataset":
            t = pq.read_table(_open_bytes(_plan_url(cfg, "img2dataset_index.parquet")))
            for k, u, o, s in zip(*(t.column(c).to_pylist() for c in ("key", "url", "offset", "size"))):
                self.img2dataset[k] = ImageRef(u, o, s)


def _open_bytes(url: str) -> pa.BufferReader:
    fs, path = io.filesystem(url)
    with fs.open(path, "rb") as f:
        return pa.BufferReader(f.read())


_RESOURCES: dict[str, _Resources] = {}


def _resources(cfg: ShardJobConfig, chash: str) -> _Resources:
    key = f"{cfg.output.path}#{chash}"
    if key not in _RESOURCES:
        _RESOURCES.clear()
        _RESOURCES[key] = _Resources(cfg)
    return _RESOURCES[key]


@dataclass
class _Candidate:
    row: int
    uid: str
    caption: str
    syn: SynRecord | None
    scores: dict[str, float]
    ref: ImageRef
    source: str
    extras: tuple[tuple[str, str], ...] = ()
    """(member extension, path like ``ref.url``) of the optional dense-label files ``<stem>.<ext>``."""


def _fetch(fetcher: Fetcher, c: _Candidate) -> tuple[bytes | None, FetchError | None, dict[str, bytes]]:
    """The image bytes (or the error) and whichever extras exist; a missing extra is simply left out."""
    try:
        data = fetcher.fetch(c.ref)
    except FetchError as e:
        return None, e, {}
    extras = {}
    for ext, path in c.extras:
        try:
            extras[ext] = fetcher.fetch(ImageRef(path))
        except FetchError:
            pass
    return data, None, extras


def _select(
    cfg: ShardJobConfig,
    unit: Unit,
    res: _Resources,
    fail: Callable[..., None],
    syn: dict[str, SynRecord],
    i2d: dict[str, ImageRef],
) -> list[_Candidate]:
    """Read the unit's rows and apply every check that needs no image; failures go to ``fail``. ``syn``: uid
    -> caption record (all of them, or the unit's own from the caption index); ``i2d``: the same for the
    img2dataset index (join key -> image)."""
    try:
        rows = sources.read_rows(unit.url, unit.start, unit.end, _source_for(cfg))
    except Exception as e:  # noqa: BLE001 - a corrupt row group fails its rows, not the job
        for r in range(unit.start, unit.end):
            fail(r, None, "unreadable_input", f"{type(e).__name__}: {e}"[:300], unit.url)
        return []
    folder = cfg.source.kind == "folder"
    duplicates = (
        read_duplicate_rows(unit.duplicates, unit.input_index, unit.start, unit.end)
        if unit.duplicates
        else set()
    )
    out: list[_Candidate] = []
    seen: set[str] = set()
    for r in rows:
        if r.uid is MISSING:
            fail(r.row, None, "malformed_row", f"no column {cfg.source.uid_column!r}")
            continue
        uid = normalise_uid(r.uid)
        if uid is None:
            fail(r.row, None if r.uid is None else str(r.uid)[:200], "bad_uid")
            continue
        if r.row in duplicates or uid in seen:
            fail(r.row, uid, "duplicate_uid")
            continue
        seen.add(uid)
        if res.include is not None and uid not in res.include:
            fail(r.row, uid, "excluded_uid")
            continue
        if folder:
            try:
                raw = sources.read_caption_file(res.fetcher.resolve(r.text_path)) if r.text_path else None
            except Exception as e:  # noqa: BLE001 - storage errors fail the row, a re-run does not retry it
                fail(r.row, uid, "fetch_failed", f"caption: {type(e).__name__}: {e}"[:300])
                continue
        elif r.text is MISSING:
            fail(r.row, uid, "malformed_row", f"no column {cfg.source.text_column!r}")
            continue
        else:
            raw = r.text
        caption, reason = check_caption(raw, cfg.filters)
        reason = reason or check_score(r.scores, cfg.filters)
        if reason:
            fail(r.row, uid, reason)
            continue
        rec = syn.get(uid)
        if rec is None and cfg.syn.required:
            fail(r.row, uid, "syn_missing")
            continue
        source = r.url if isinstance(r.url, str) else ""
        if cfg.source.images == "img2dataset":
            ref = i2d.get(uid if cfg.source.img2dataset_join == "uid" else source)
            if ref is None:
                fail(r.row, uid, "not_in_img2dataset")
                continue
        elif r.url is MISSING or not (r.url is None or isinstance(r.url, str)):
            fail(r.row, uid, "malformed_row", f"column {cfg.source.url_column!r} missing or not a string")
            continue
        elif not (r.url or "").strip():
            fail(r.row, uid, "missing_url")
            continue
        else:
            ref = ImageRef(r.url.strip())
        scores = {k: v for k, v in r.scores.items() if v is not None and v == v}
        stem = ref.url.rsplit(".", 1)[0]
        extras = tuple((ext, f"{stem}.{ext}") for ext in cfg.source.extras) if folder else ()
        source = public_url(source, cfg.output.url_query)  # the json's source; ref keeps the full URL
        out.append(_Candidate(r.row, uid, caption, rec, scores, ref, source, extras))
    return out


def _source_for(cfg: ShardJobConfig) -> SourceConfig:
    if cfg.source.kind == "folder":  # the planned listing has fixed column names
        return SourceConfig(
            kind="folder",
            folder=cfg.source.folder,
            uid_column="uid",
            url_column="url",
            text_column="text",
            score_columns=("__none__",),
        )
    return cfg.source


def process_unit(cfg: ShardJobConfig, chash: str, unit: Unit, owner: str = "") -> dict[str, Any]:
    """Write one shard (or skip it when its stats show it is done); returns a slim summary. ``owner``: the
    run's tag for its temporaries."""
    out = cfg.output.path
    done = read_stats(out, unit.name)
    if done is not None and done.get("config_hash") == chash:
        return {**_slim(done), "skipped": True}
    t0 = time.time()
    res = _resources(cfg, chash)
    failures: list[dict[str, Any]] = []

    def fail(row: int, uid: str | None, reason: str, detail: str = "", url: str = "") -> None:
        """Record a failed row; ``url``: the URL that ``detail`` may quote (its credentials are removed)."""
        assert reason in REASONS, reason
        detail = public_text(detail, cfg.output.url_query, url)
        failures.append({"row": row, "uid": uid, "reason": reason, "detail": detail})

    syn = res.syn
    if res.syn_partitions:  # only this unit's rows' captions, from the caption index
        syn = caption_index.load_unit(_plan_url(cfg, ""), unit.index, res.syn_partitions)
    i2d = res.img2dataset
    if res.i2d_partitions:  # only this unit's rows' images, from the img2dataset index
        i2d = caption_index.load_img2dataset_unit(_plan_url(cfg, ""), unit.index, res.i2d_partitions)
    candidates = _select(cfg, unit, res, fail, syn, i2d)
    kept_uids: list[str] = []
    kept_sha: list[str] = []
    first_by_sha: dict[str, str] = {}
    num_reencoded = num_syn = num_syn_sha_mismatch = 0
    window = max(2, 2 * cfg.fetch.threads)
    with ThreadPoolExecutor(cfg.fetch.threads) as pool, OutputFolder(out, owner).shard(unit.name) as tar:
        queue: deque[tuple[_Candidate, Any]] = deque()
        todo = iter(candidates)
        while True:
            while len(queue) < window:
                c = next(todo, None)
                if c is None:
                    break
                queue.append((c, pool.submit(_fetch, res.fetcher, c)))
            if not queue:
                break
            c, future = queue.popleft()
            data, error, extras = future.result()
            if error is not None:
                fail(c.row, c.uid, error.reason, error.detail, c.ref.url)
                continue
            sha = hashlib.sha256(data).hexdigest()
            if c.syn is not None and c.syn.sha256 and c.syn.sha256 != sha:
                # the captions describe another image (DataCompDR's json sha256): not this sample's
                num_syn_sha_mismatch += 1
                if cfg.syn.required:
                    fail(
                        c.row, c.uid, "syn_missing", "synthetic captions are for an image with another sha256"
                    )
                    continue
                c.syn = None
            if cfg.filters.dedupe_image and sha in first_by_sha:
                fail(c.row, c.uid, "duplicate_image", f"same bytes as {first_by_sha[sha]}")
                continue
            try:
                img = process_image(data, cfg.image, lambda w, h: check_image_size(w, h, cfg.filters))
            except ImageError as e:
                fail(c.row, c.uid, e.reason, e.detail[:300])
                continue
            if extras and img.rotated:
                fail(c.row, c.uid, "dense_label_mismatch")
                continue
            meta = SampleMeta(
                c.uid,
                sha,
                img.original_width,
                img.original_height,
                img.width,
                img.height,
                source=c.source,
                scores=c.scores,
            )
            sample = {KEY: c.uid, IMAGE_KEY: img.data, CAPTION_KEY: c.caption, META_KEY: meta}
            if c.syn is not None:
                sample[SYN_KEY] = c.syn.texts
                if c.syn.teacher is not None:
                    sample[TEACHER_KEY] = c.syn.teacher
                num_syn += 1
            tar.write({**sample, **extras})
            first_by_sha[sha] = c.uid
            kept_uids.append(c.uid)
            kept_sha.append(sha)
            num_reencoded += img.reencoded
    failures.sort(key=lambda f: f["row"])
    num_input = unit.end - unit.start
    if len(kept_uids) + len(failures) != num_input:
        raise AssertionError(
            f"{unit.name}: kept {len(kept_uids)} + failed {len(failures)} != input {num_input}"
        )
    stats = {
        "schema_version": SCHEMA_VERSION,
        "shard": unit.name,
        "index": unit.index,
        "config_hash": chash,
        "input": {
            "index": unit.input_index,
            "url": public_url(unit.url, cfg.output.url_query),
            "start": unit.start,
            "end": unit.end,
        },
        "num_input": num_input,
        "num_kept": len(kept_uids),
        "num_failed": len(failures),
        "failed": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "bytes": tar.size,
        "num_reencoded": num_reencoded,
        "num_syn": num_syn,
        "num_syn_sha256_mismatch": num_syn_sha_mismatch,
        "seconds": round(time.time() - t0, 3),
        "uids": kept_uids,
        "sha256": kept_sha,
        "failures": failures,
    }
    write_json(stats_url(out, unit.name), stats, OutputFolder(out).tmp_dir, owner)
    return {**_slim(stats), "skipped": False}


def _slim(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("shard", "index", "num_input", "num_kept", "num_failed", "failed", "bytes")
    return {k: stats[k] for k in keys}


@dataclass(frozen=True)
class UnitTask:
    """A picklable call of :func:`process_unit` that never raises (errors come back as data)."""

    cfg: ShardJobConfig
    chash: str
    owner: str = ""
    """The run's tag for its temporaries (so that the run can remove those of its killed workers)."""

    def __call__(self, unit: Unit) -> dict[str, Any]:
        try:
            return {"ok": True, **process_unit(self.cfg, self.chash, unit, self.owner)}
        except Exception:  # noqa: BLE001 - reported by the driver; a re-run retries the unit
            return {"ok": False, "shard": unit.name, "error": traceback.format_exc(limit=8)}


# ---------------------------------------------------------------------------------------------- merge


FAILURE_ROWS_PER_GROUP = 65_536


def _iter_stats(
    out: str, units: list[Unit], window: int = 16
) -> Iterator[tuple[Unit, dict[str, Any] | None]]:
    """``(unit, stats or None)`` in unit order, read ``window`` at a time (never all at once)."""
    with ThreadPoolExecutor(window) as pool:
        for first in range(0, len(units), window):
            chunk = units[first : first + window]
            yield from zip(chunk, pool.map(lambda u: read_stats(out, u.name), chunk))


_CONFIG_HASH = re.compile(rb'"config_hash": "([0-9a-f]+)"')


def _unit_done(out: str, name: str, chash: str) -> bool:
    """Whether the shard and its stats exist for ``chash``, from the stats' first 4 KiB (the keys are
    sorted, so ``config_hash`` comes early): the completeness check never parses the uid lists."""
    url = stats_url(out, name)
    fs, path = io.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return False
    m = _CONFIG_HASH.search(head)
    if m is None:  # an unusual layout: read it all
        st = read_stats(out, name)
        return st is not None and st.get("config_hash") == chash
    return m.group(1).decode() == chash and io.exists(io.join(out, name))


def _image_dedupe_layout(cfg: ShardJobConfig, plan: Plan, units: list[Unit], owner: str) -> ImageDedupe:
    rows = sum(i.get("num_rows", 0) for i in plan.inputs)
    parts = num_partitions(rows, BYTES_PER_SHA_ROW, cfg.plan.max_memory_gb)
    rows_per_group = max(1, int(cfg.plan.max_memory_gb * 2**30 / BYTES_PER_SHA_ROW))
    group = max(1, rows_per_group // cfg.output.samples_per_shard)
    names = tuple(u.name for u in units)
    return ImageDedupe(cfg.output.path, plan.config_hash, names, group, parts, owner)


def merge(
    cfg: ShardJobConfig,
    plan: Plan,
    units: list[Unit],
    owner: str = "",
    stage: str = "merge",
    task_index: int = 0,
    num_tasks: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Write the dataset files if every unit is done (else return None); check the accounting. ``owner``:
    the run's tag for its temporaries. ``stage`` ``merge-partition`` / ``merge-dedupe`` runs only array task
    ``task_index``'s share of that step of the cross-shard image dedupe (and returns None)."""
    out = cfg.output.path
    with ThreadPoolExecutor(16) as pool:  # in chunks: pool.map would hold a future per shard
        for first in range(0, len(units), 1024):
            chunk = units[first : first + 1024]
            if not all(pool.map(lambda u: _unit_done(out, u.name, plan.config_hash), chunk)):
                return None
    dedupe: ImageDedupe | None = None
    if cfg.filters.dedupe_image and cfg.plan.dedupe == "partitioned":
        dedupe = _image_dedupe_layout(cfg, plan, units, owner)
        counts = {"partition_group": dedupe.num_groups, "dedupe_partition": dedupe.num_parts}
        for step, n in counts.items():
            items = _step_items(stage, "merge", MERGE_STEPS, step, n, task_index, num_tasks)
            if items is not None:
                _run_steps(MergeStep(dedupe, step), items, cfg, f"merge {step}", log)
    if stage != "merge":
        return None
    folder = OutputFolder(out, owner)
    sizes: dict[str, int] = {}
    reasons: Counter[str] = Counter()
    shards = []
    total_bytes = num_failed = num_syn = num_syn_sha256_mismatch = 0
    first_by_sha: dict[str, str] = {}  # only for plan.dedupe=memory (the old path)
    duplicate_images: list[str] = []
    num_input = sum(i.get("num_rows", 1 if "error" in i else 0) for i in plan.inputs)
    # one streamed pass over the stats writes the failure table and the subset uid lists
    subset_writer = SubsetWriter(folder, cfg.subsets)
    with folder.open(FAILURES_FILE) as f, pq.ParquetWriter(f, FAILURE_SCHEMA) as writer, subset_writer:
        failures: list[dict[str, Any]] = []
        for unit, st in _iter_stats(out, units):
            assert st is not None
            if st["num_kept"] + st["num_failed"] != unit.end - unit.start:
                raise ShardJobError(
                    f"{unit.name}: stats do not add up to its {unit.end - unit.start} input rows"
                )
            sizes[unit.name] = st["num_kept"]
            total_bytes += st["bytes"]
            num_syn += st.get("num_syn", 0)
            num_syn_sha256_mismatch += st.get("num_syn_sha256_mismatch", 0)
            shards.append({"name": unit.name, "num_samples": st["num_kept"], "bytes": st["bytes"]})
            reasons.update(st["failed"])
            num_failed += len(st["failures"])
            for fr in st["failures"]:
                failures.append(
                    {"shard": unit.name, "input": public_url(unit.url, cfg.output.url_query), **fr}
                )
            if len(failures) >= FAILURE_ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA))
                failures.clear()
            subset_writer.add(unit.name, st["uids"])
            for uid, sha in (
                zip(st["uids"], st["sha256"]) if cfg.filters.dedupe_image and dedupe is None else ()
            ):
                if sha in first_by_sha:
                    duplicate_images.append(uid)
                else:
                    first_by_sha[sha] = uid
        for inp in plan.inputs:
            if "error" in inp:
                failures.append(
                    {
                        "shard": None,
                        "input": public_url(inp["url"], cfg.output.url_query),
                        "row": -1,
                        "uid": None,
                        "reason": "unreadable_input",
                        "detail": public_text(inp["error"], cfg.output.url_query, inp["url"]),
                    }
                )
                reasons["unreadable_input"] += 1
                num_failed += 1
        writer.write_table(pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA))
        num_kept = sum(sizes.values())
        if num_kept + num_failed != num_input or sum(reasons.values()) != num_failed:
            raise ShardJobError(f"accounting: kept {num_kept} + failed {num_failed} != input {num_input}")
    subsets = subset_writer.summary
    num_duplicate_images = 0
    with folder.open(DUPLICATE_IMAGES_FILE) as f:
        lines = dedupe.iter_duplicates() if dedupe is not None else iter(duplicate_images)
        num_duplicate_images = write_lines(f, lines)
    names = [u.name for u in units]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": plan.config_hash,
        "config": public_json(content_config(cfg), cfg.output.url_query),
        "inputs": [_public_input(inp, cfg.output.url_query) for inp in plan.inputs],
        "num_shards": len(units),
        "shard_pattern": shard_pattern(names),
        "shards": shards,
        "totals": {
            "input": num_input,
            "kept": num_kept,
            "failed": num_failed,
            "failed_by_reason": dict(sorted(reasons.items())),
            "bytes": total_bytes,
            "duplicate_images_across_shards": num_duplicate_images,
            "syn": num_syn,
            "syn_sha256_mismatch": num_syn_sha256_mismatch,
        },
        "failures_file": FAILURES_FILE,
        "subsets": subsets,
        "members": {
            "jpg": "image",
            "txt": "web caption",
            "syn.json": "synthetic captions",
            "json": "metadata",
        },
    }
    folder.write_json(sizes, SIZES_FILE)
    folder.write_json(manifest, MANIFEST_FILE)
    remove_stale_temp_files(out, owner=owner)
    return manifest


def _public_input(inp: dict[str, Any], mode: str) -> dict[str, Any]:
    out = {**inp, "url": public_url(inp["url"], mode)}
    if "error" in inp:
        out["error"] = public_text(inp["error"], mode, inp["url"])
    return out


# ---------------------------------------------------------------------------------------------- driver


def run(
    cfg: ShardJobConfig,
    stage: str = "all",
    task_index: int = 0,
    num_tasks: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``stage`` (all / plan / shard / merge) of the job for array task ``task_index`` of ``num_tasks``.

    Returns {"plan", "units_run", "units_skipped", "this_run": {...}, "manifest" (None until merged)}.
    Raises :class:`ShardJobError` when units failed (after running all others) or accounting is off.
    Whatever happens, the temporaries of this run's writers (workers killed by the OOM killer, a Ray task
    retried elsewhere) are removed at the end; others' only once they are an hour old.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    owner = uuid.uuid4().hex[:12]  # tags this run's temporaries, in every worker process
    try:
        return _run_stages(cfg, stage, task_index, num_tasks, log, owner)
    finally:
        remove_stale_temp_files(cfg.output.path, min_age_s=math.inf, owner=owner)


def _caption_index(
    cfg: ShardJobConfig, plan: Plan, units: list[Unit], log: Callable[[str], None], owner: str
) -> dict[str, Any]:
    """Build (or load) the per-unit caption index of ``syn.paths`` beside the plan (pipeline.data.prep.index)."""
    first_units = [0] * len(plan.inputs)
    for u in reversed(units):
        first_units[u.input_index] = u.index
    uid_column = "uid" if cfg.source.kind == "folder" else cfg.source.uid_column
    return caption_index.build_index(
        _plan_url(cfg, ""),
        plan.inputs,
        first_units,
        cfg.source,
        uid_column,
        cfg.output.samples_per_shard,
        cfg.syn,
        cfg.executor,
        cfg.output.url_query,
        log,
        OutputFolder(cfg.output.path).tmp_dir,
        owner,
    )


def _img2dataset_index(
    cfg: ShardJobConfig, plan: Plan, units: list[Unit], log: Callable[[str], None], owner: str
) -> dict[str, Any]:
    """Build (or load) the per-unit img2dataset index beside the plan (pipeline.data.prep.index)."""
    first_units = [0] * len(plan.inputs)
    for u in reversed(units):
        first_units[u.input_index] = u.index
    return caption_index.build_img2dataset_index(
        _plan_url(cfg, ""),
        plan.inputs,
        first_units,
        cfg.source,
        cfg.output.samples_per_shard,
        cfg.plan.max_memory_gb,
        cfg.executor,
        log,
        OutputFolder(cfg.output.path).tmp_dir,
        owner,
    )


def _run_stages(
    cfg: ShardJobConfig, stage: str, task_index: int, num_tasks: int, log: Callable[[str], None], owner: str
) -> dict[str, Any]:
    t0 = time.time()
    chash = config_hash(cfg)
    plan_stage = stage if stage in PLAN_STEPS else "plan"
    plan = make_plan(cfg, chash, log, owner, plan_stage, task_index, num_tasks)
    if plan is None:  # one plan step's share of an array task
        return {"plan": None, "units_run": 0, "units_skipped": 0, "manifest": None}
    units = plan.units(cfg.output)
    syn_index = (
        _caption_index(cfg, plan, units, log, owner) if cfg.syn.paths and cfg.syn.join == "index" else None
    )
    result: dict[str, Any] = {"plan": plan, "units_run": 0, "units_skipped": 0, "manifest": None}
    result["syn_index"] = syn_index  # totals of the caption join (None without syn.paths / with join=memory)
    if cfg.source.images == "img2dataset" and cfg.source.img2dataset_index == "index":
        result["i2d_index"] = _img2dataset_index(cfg, plan, units, log, owner)
    if stage == "plan":
        return result
    if stage in MERGE_STEPS:  # one merge step's share of an array task
        merge(cfg, plan, units, owner, stage, task_index, num_tasks, log)
        return result
    this_run: Counter[str] = Counter()
    if stage in ("all", "shard"):
        mine = [units[i] for i in task_range(len(units), task_index, num_tasks)]
        errors = _run_shards(UnitTask(cfg, chash, owner), mine, this_run, result)
        if errors:
            for e in errors[:5]:
                log(f"shard {e['shard']} failed:\n{public_text(e['error'], cfg.output.url_query)}")
            raise ShardJobError(
                f"{len(errors)} of {len(mine)} shards failed (first: {errors[0]['shard']}); "
                "re-run the same command to retry them"
            )
    elapsed = time.time() - t0
    result["this_run"] = {**this_run, "seconds": round(elapsed, 3)}
    if stage in ("all", "merge"):
        result["manifest"] = merge(cfg, plan, units, owner, log=log)
        if result["manifest"] is None:
            if stage == "merge" or num_tasks == 1:
                raise ShardJobError(
                    "not every shard is done yet; run the shard stage (all array tasks) first"
                )
            log("other array tasks are still running; the last one to finish writes the dataset files")
        elif cfg.subsets.materialize and cfg.subsets.fractions:  # each subset as its own shard set
            names = [u.name for u in units]
            out = cfg.output
            materialize(
                out.path, names, cfg.subsets, out.samples_per_shard, cfg.executor, out.name_format, owner
            )
    log(summary_table(result, elapsed))
    return result


def _run_shards(
    task: UnitTask, mine: list[Unit], this_run: Counter[str], result: dict[str, Any]
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    cfg = task.cfg
    errors = []
    with tqdm(total=len(mine), unit="shard", disable=not cfg.executor.progress, dynamic_ncols=True) as bar:
        for _, r in run_units(task, mine, cfg.executor):
            bar.update(1)
            if not r["ok"]:
                errors.append(r)
                continue
            if r["skipped"]:
                result["units_skipped"] += 1
                continue
            result["units_run"] += 1
            this_run.update(
                {
                    "input": r["num_input"],
                    "kept": r["num_kept"],
                    "failed": r["num_failed"],
                    "bytes": r["bytes"],
                }
            )
            bar.set_postfix(kept=this_run["kept"], failed=this_run["failed"], refresh=False)
    return errors


def summary_table(result: dict[str, Any], elapsed: float) -> str:
    """Dataset totals (when merged) and this run's throughput, as an aligned text table."""
    run = result.get("this_run", {})
    rows: list[tuple[str, str]] = []
    manifest = result.get("manifest")
    if manifest is not None:
        t = manifest["totals"]
        rows += [
            ("dataset input rows", f"{t['input']:,}"),
            ("kept", f"{t['kept']:,}"),
            ("failed", f"{t['failed']:,}"),
        ]
        rows += [(f"  {reason}", f"{n:,}") for reason, n in t["failed_by_reason"].items()]
        rows += [("bytes", f"{t['bytes']:,}"), ("shards", f"{manifest['num_shards']:,}")]
    processed = run.get("input", 0)
    rows += [
        ("shards written / skipped (this run)", f"{result['units_run']} / {result['units_skipped']}"),
        ("rows processed (this run)", f"{processed:,}"),
        ("seconds", f"{elapsed:.1f}"),
        ("samples/s (this run)", f"{processed / elapsed:,.1f}" if elapsed > 0 else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>14}" for k, v in rows)

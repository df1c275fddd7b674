"""The caption job: synthetic captions for every sample of a set of WebDataset shards, one shard per work unit.

    plan = make_plan(cfg)                  # which shards this task owns, which are done / partly done
    summary = run_job(cfg)                 # local (CPU or one GPU), or a Ray Data actor pool
    # command line: python -m data_prep.caption --config caption.toml [--dry-run]

Outputs (``output.mode``):

- ``sidecar`` (default): for input shard ``<name>.tar`` a DataCompDR-style sidecar ``<output.path>/<name>.tar``
  holding, for every sample of the input in the same order and under the same key (the uid),
  ``<key>.syn.json`` = ``{"syn_text": [...]}`` (empty for bad images; plus ``syn_clip_scores`` when the quality
  filter is on). A loader joins the two by key (or by position).
- ``merge``: the input shard itself is rewritten (temporary file in ``<its folder>/_tmp/``, then one rename;
  one upload for object stores) with
  ``<key>.syn.json`` set (``output.on_existing``: replace, append to, or keep existing captions); other
  members are copied byte for byte.

Progress: a shard is done when its marker ``<progress>/<name>.caption.json`` exists (written after the
output, with the shard's counts); re-running a done shard is a no-op. While a shard runs, finished batches
are appended to ``<progress>/<name>.caption.partial.jsonl`` (local progress folders), so a killed job resumes
inside the shard; captions are seeded per (seed, uid, caption index), so a resumed shard gets the same
captions an uninterrupted run writes. ``<progress>`` is ``output.path``, or the input shard's folder for
``merge`` when ``output.path`` is empty.

Bad images (undecodable, empty, missing) are counted by reason in the marker and skipped, never fatal.

Execution: ``local`` runs the shards in this process; SLURM arrays run the same code with
``execution.task_index / num_tasks`` (default: ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``), each
task owning a contiguous shard range; ``ray`` runs shards on a Ray Data actor pool (one captioner per actor,
``ray_gpus_per_actor`` GPUs each, between ``ray_min_actors`` and ``ray_max_actors`` actors).
"""

from __future__ import annotations

import io as _io
import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from pipeline import io
from pipeline.caption.captioners import Captioner, CaptionerConfig, build_captioner
from pipeline.caption.quality import ClipScorer, QualityConfig, build_scorer, filter_captions
from pipeline.config import to_dict
from pipeline.data import schema
from pipeline.data.loader import expand_shards
from pipeline.data.prep.executors import task_from_env, task_range
from pipeline.data.prep.writer import write_json
from pipeline.data.tar import DEFAULT_MAX_MEMBER_BYTES, iter_tar_samples, open_shard, remove_stale_temp_files

MARKER_SUFFIX = ".caption.json"
PARTIAL_SUFFIX = ".caption.partial.jsonl"
SCORES_FIELD = schema.SYN_SCORES_FIELD


@dataclass(frozen=True)
class CaptionInputConfig:
    shards: str = ""
    """Shards to caption: a folder, brace pattern, glob, ``::``-joined list or .txt list (local or s3://)."""
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    """Member extensions tried, in order, for a sample's image."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """Members larger than this are not read (counted as bad images when they are the image)."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels are bad (decompression-bomb guard)."""


@dataclass(frozen=True)
class CaptionOutputConfig:
    mode: Literal["sidecar", "merge"] = "sidecar"
    """sidecar: DataCompDR-style syn.json shards in output.path; merge: rewrite the input shards."""
    path: str = ""
    """Sidecar folder (mode=sidecar); progress markers go here too (for merge: default next to the shards)."""
    on_existing: Literal["replace", "append", "keep"] = "replace"
    """merge: existing syn.json captions are replaced, appended to, or kept (such samples are not captioned)."""
    overwrite: bool = False
    """Redo shards whose done marker exists (otherwise a finished shard is a no-op)."""
    checkpoint_every: int = 1
    """Append finished captions to the shard's partial-progress file every this many batches."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class CaptionExecutionConfig:
    kind: Literal["local", "ray"] = "local"
    """local: this process (CPU or one GPU; SLURM array tasks too); ray: a Ray Data actor pool."""
    batch_size: int = 64
    """Images per captioning batch."""
    decode_threads: int = 4
    """Threads decoding and preprocessing images ahead of the model."""
    task_index: int = -1
    """This task's index among num_tasks (-1: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else 0)."""
    num_tasks: int = -1
    """Tasks sharing the shard list in contiguous ranges (-1: SLURM_ARRAY_TASK_COUNT, else 1)."""
    max_shards: int = 0
    """Caption at most this many of this task's shards that are not done yet (0: all)."""
    ray_min_actors: int = 1
    """Ray: fewest captioning actors (autoscaling lower bound)."""
    ray_max_actors: int = 1
    """Ray: most captioning actors (autoscaling upper bound)."""
    ray_gpus_per_actor: float = 1.0
    """Ray: GPUs reserved per actor (0 for CPU actors)."""
    ray_cpus_per_actor: float = 1.0
    """Ray: CPUs reserved per actor."""
    torch_threads: int = 0
    """torch intra-op threads (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads: must be >= 1, got {self.decode_threads}")
        if not 1 <= self.ray_min_actors <= self.ray_max_actors:
            raise ValueError(
                f"ray_min_actors / ray_max_actors: need 1 <= min <= max, got {self.ray_min_actors} / "
                f"{self.ray_max_actors}"
            )
        if self.max_shards < 0:
            raise ValueError(f"max_shards: must be >= 0, got {self.max_shards}")


@dataclass(frozen=True)
class CaptionJobConfig:
    """``python -m data_prep.caption``: synthetic captions for WebDataset shards."""

    input: CaptionInputConfig = field(default_factory=CaptionInputConfig)
    output: CaptionOutputConfig = field(default_factory=CaptionOutputConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    execution: CaptionExecutionConfig = field(default_factory=CaptionExecutionConfig)


def fingerprint(cfg: CaptionJobConfig) -> dict[str, Any]:
    """What decides the captions (stored in every marker)."""
    return {
        "captioner": to_dict(cfg.captioner),
        "quality": to_dict(cfg.quality),
        "mode": cfg.output.mode,
        "on_existing": cfg.output.on_existing,
    }


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardUnit:
    """One input shard and where its outputs and progress go."""

    index: int
    url: str
    output_url: str
    marker_url: str
    partial_url: str

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class CaptionPlan:
    num_shards_total: int
    task_index: int
    num_tasks: int
    owned: list[ShardUnit]
    done: list[ShardUnit]
    todo: list[ShardUnit]
    partial: dict[str, int]  # shard name -> samples already in its partial-progress file

    def describe(self, cfg: CaptionJobConfig) -> str:
        ex = cfg.execution
        lines = [
            f"caption plan: {self.num_shards_total} shards in total; task {self.task_index}/{self.num_tasks} owns "
            f"{len(self.owned)} (done {len(self.done)}, to do {len(self.todo)})",
            f"  output: mode={cfg.output.mode} path={cfg.output.path or '(next to the input shards)'} "
            f"on_existing={cfg.output.on_existing}",
            f"  captioner: backend={cfg.captioner.backend} arch={cfg.captioner.arch} "
            f"checkpoint={cfg.captioner.checkpoint or '-'} hf_dir={cfg.captioner.hf_dir or '-'} "
            f"device={cfg.captioner.device} precision={cfg.captioner.precision}",
            f"  decoding: {cfg.captioner.num_captions} captions/image, strategy={cfg.captioner.decode.strategy} "
            f"max_len={cfg.captioner.decode.max_len} seed={cfg.captioner.seed}",
            f"  quality filter: {'on' if cfg.quality.enabled else 'off'}",
            f"  execution: kind={ex.kind} batch_size={ex.batch_size}"
            + (
                f" actors={ex.ray_min_actors}..{ex.ray_max_actors} gpus/actor={ex.ray_gpus_per_actor}"
                if ex.kind == "ray"
                else ""
            ),
        ]
        for unit in self.owned:
            state = "done" if unit in self.done else "todo"
            if unit.name in self.partial:
                state += f" (resume: {self.partial[unit.name]} samples already captioned)"
            lines.append(f"  [{unit.index:>5}] {unit.url} -> {unit.output_url}: {state}")
        return "\n".join(lines)


def _progress_dir(cfg: CaptionJobConfig, shard_url: str) -> str:
    if cfg.output.path:
        return cfg.output.path
    return shard_url.rstrip("/").rsplit("/", 1)[0] if "/" in shard_url else "."


def _stem(name: str) -> str:
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _norm(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _existing_markers(folders: set[str]) -> set[str]:
    """Done markers in ``folders``, one listing per folder (not one request per shard on object stores)."""
    found: set[str] = set()
    for folder in folders:
        fs, path = io.filesystem(folder)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(MARKER_SUFFIX):
                base = name.rstrip("/").rsplit("/", 1)[-1]
                found.add(_norm(io.join(folder, base)))
    return found


def make_plan(cfg: CaptionJobConfig) -> CaptionPlan:
    if not cfg.input.shards:
        raise ValueError("input.shards: name the shards to caption")
    if cfg.output.mode == "sidecar" and not cfg.output.path:
        raise ValueError("output.path: mode=sidecar needs an output folder")
    urls = expand_shards(cfg.input.shards)
    if not urls:
        raise ValueError(f"input.shards: no shards match {cfg.input.shards!r}")
    units = []
    seen: dict[str, str] = {}
    for i, url in enumerate(urls):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        progress = _progress_dir(cfg, url)
        key = io.join(progress, name)
        if key in seen:
            raise ValueError(f"input.shards: {url} and {seen[key]} share the file name {name} in {progress}")
        seen[key] = url
        output_url = url if cfg.output.mode == "merge" else io.join(cfg.output.path, _stem(name) + ".tar")
        units.append(
            ShardUnit(
                i,
                url,
                output_url,
                io.join(progress, _stem(name) + MARKER_SUFFIX),
                io.join(progress, _stem(name) + PARTIAL_SUFFIX),
            )
        )
    ex = cfg.execution
    task_index, num_tasks = task_from_env(
        None if ex.task_index < 0 else ex.task_index, None if ex.num_tasks < 0 else ex.num_tasks
    )
    owned = [units[i] for i in task_range(len(units), task_index, num_tasks)]
    done, todo, partial = [], [], {}
    markers = _existing_markers({u.marker_url.rsplit("/", 1)[0] for u in owned}) if owned else set()
    for unit in owned:
        if _norm(unit.marker_url) in markers and not cfg.output.overwrite:
            done.append(unit)
            continue
        todo.append(unit)
        if io.is_local(unit.partial_url) and os.path.exists(unit.partial_url):
            partial[unit.name] = len([k for k in _read_partial(unit.partial_url) if k])
    if ex.max_shards:
        todo = todo[: ex.max_shards]
    return CaptionPlan(len(units), task_index, num_tasks, owned, done, todo, partial)


# ------------------------------------------------------------------------------------------- per shard


def _read_partial(path: str) -> dict[str, dict[str, Any]]:
    """Records of a partial-progress file; a torn last line (killed mid-write) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                out[rec["key"]] = rec
    return out


class _Partial:
    """Append-only record of finished samples of one shard (local progress folders only)."""

    def __init__(self, url: str, config: dict[str, Any]) -> None:
        self.enabled = io.is_local(url)
        self.path = url[len("file://") :] if url.startswith("file://") else url
        self.records: dict[str, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []
        if not self.enabled:
            return
        header = {"key": "", "config": config}
        if os.path.exists(self.path):
            self.records = _read_partial(self.path)
            if self.records.pop("", {}).get("config") != header["config"]:
                self.records = {}  # written under another config (or no header): start the shard again
                os.remove(self.path)
        if os.path.exists(self.path):
            with open(self.path, "rb+") as f:  # drop a torn last line before appending
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        else:
            self._pending.append(header)

    def add(self, rec: dict[str, Any]) -> None:
        self.records[rec["key"]] = rec
        self._pending.append(rec)

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            self._pending.clear()
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._pending))
            f.flush()
            os.fsync(f.fileno())
        self._pending.clear()

    def remove(self) -> None:
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)


@dataclass
class _Item:
    key: str
    pixels: torch.Tensor | None = None
    pil: Image.Image | None = None
    bad: str = ""


def _open_image(members: dict[str, bytes], cfg: CaptionInputConfig) -> Image.Image | str:
    """The sample's RGB image, or the reason it is bad."""
    data = next((members[k] for k in cfg.image_keys if k in members), None)
    if data is None:
        return "missing_image"
    if not data:
        return "empty_image"
    try:
        im = Image.open(_io.BytesIO(data))
        w, h = im.size
        if w < 1 or h < 1:
            return "empty_image"
        if w * h > cfg.max_image_pixels:
            return "too_many_pixels"
        im.load()
        return im.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
        return "undecodable_image"


def _has_syn(members: dict[str, bytes]) -> bool:
    try:
        return bool(schema.decode_syn(members.get(schema.SYN_KEY, b"") or b"{}"))
    except (ValueError, UnicodeDecodeError):
        return False


class ShardCaptioner:
    """Captions whole shards with one captioner (built once): the unit of work of every executor."""

    def __init__(
        self,
        cfg: CaptionJobConfig,
        captioner: Captioner | None = None,
        on_batch: Callable[[ShardUnit, int], None] | None = None,
        owner: str = "",
    ) -> None:
        self.cfg = cfg
        self.owner = owner  # the run's tag for its temporaries (written in <output folder>/_tmp/)
        if cfg.execution.torch_threads:
            torch.set_num_threads(cfg.execution.torch_threads)
        self.captioner = captioner if captioner is not None else build_captioner(cfg.captioner)
        self.scorer: ClipScorer | None = build_scorer(cfg.quality, self.captioner)
        self.on_batch = on_batch  # test hook: called after each batch is recorded
        self._pool = ThreadPoolExecutor(max_workers=cfg.execution.decode_threads)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _prepare(self, key: str, members: dict[str, bytes]) -> _Item:
        im = _open_image(members, self.cfg.input)
        if isinstance(im, str):
            return _Item(key, bad=im)
        try:
            pixels = self.captioner.preprocess(im)
        except Exception:  # noqa: BLE001 - odd sizes etc.: the image is bad, the job goes on
            return _Item(key, bad="preprocess_failed")
        keep_pil = self.scorer is not None and not self.scorer.shares_pixels
        return _Item(key, pixels=pixels, pil=im if keep_pil else None)

    def _batches(self, unit: ShardUnit, skip: set[str], counts: Counter[str]) -> Iterator[list[_Item]]:
        """Prepared batches of the shard's samples not in ``skip``, decoded in threads one batch ahead."""
        bs = self.cfg.execution.batch_size
        fs, path = io.filesystem(unit.url)
        pending: list[tuple[str, dict[str, bytes]]] = []
        with fs.open(path, "rb") as f:
            for key, members in iter_tar_samples(f, self.cfg.input.max_member_bytes):
                counts["samples"] += 1
                if key in skip:
                    continue
                if (
                    self.cfg.output.mode == "merge"
                    and self.cfg.output.on_existing == "keep"
                    and _has_syn(members)
                ):
                    counts["kept_existing"] += 1
                    continue
                pending.append((key, members))
                if len(pending) == bs:
                    yield list(self._pool.map(lambda km: self._prepare(*km), pending))
                    pending = []
        if pending:
            yield list(self._pool.map(lambda km: self._prepare(*km), pending))

    def _prefetch(self, batches: Iterator[list[_Item]]) -> Iterator[list[_Item]]:
        """Run ``batches`` in a thread, two batches ahead of the model."""
        q: queue.Queue[Any] = queue.Queue(maxsize=2)
        end = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(b)
                q.put(end)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # the consumer stopped (done, or an exception): unblock the producer and let it finish
            stop.set()
            while t.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            t.join()

    def _caption_items(self, items: list[_Item]) -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = [{"key": it.key, "bad": it.bad} for it in items if it.bad]
        good = [it for it in items if not it.bad]
        if not good:
            return recs
        pixels = torch.stack([it.pixels for it in good])
        keys = [it.key for it in good]
        caps = self.captioner.caption(pixels, keys)
        scores: list[list[float]] | None = None
        if self.scorer is not None:
            pils = [it.pil for it in good] if not self.scorer.shares_pixels else None
            scores = self.scorer.score(pils, pixels, caps)
            caps, scores = filter_captions(caps, scores, self.cfg.quality)
        for i, it in enumerate(good):
            rec: dict[str, Any] = {"key": it.key, "syn_text": caps[i]}
            if scores is not None:
                rec[SCORES_FIELD] = scores[i]
            recs.append(rec)
        return recs

    def __call__(self, unit: ShardUnit) -> dict[str, Any]:
        """Caption one shard (resuming from its partial-progress file); returns its marker record."""
        cfg = self.cfg
        if io.exists(unit.marker_url) and not cfg.output.overwrite:
            return {"shard": unit.name, "skipped": True}
        t0 = time.time()
        partial = _Partial(unit.partial_url, json.loads(json.dumps(fingerprint(cfg))))
        resumed = len(partial.records)
        counts: Counter[str] = Counter()
        num_batches = 0
        for items in self._prefetch(self._batches(unit, set(partial.records), counts)):
            for rec in self._caption_items(items):
                partial.add(rec)
            num_batches += 1
            if num_batches % cfg.output.checkpoint_every == 0:
                partial.flush()
            if self.on_batch is not None:
                self.on_batch(unit, num_batches)
        partial.flush()
        stats = self._write_output(unit, partial.records, counts)
        stats.update(
            shard=unit.name,
            input=unit.url,
            output=unit.output_url,
            resumed_samples=resumed,
            seconds=round(time.time() - t0, 3),
            captioner=self.captioner.name,
            config=fingerprint(cfg),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        captioned_now = stats["captioned"] - min(resumed, stats["captioned"])
        stats["images_per_s"] = round(captioned_now / max(stats["seconds"], 1e-9), 3)
        write_json(unit.marker_url, stats, owner=self.owner)
        partial.remove()
        return stats

    def _syn_payload(
        self, rec: dict[str, Any] | None, existing: list[str]
    ) -> tuple[list[str], list[float] | None]:
        if rec is None or rec.get("bad"):
            return existing, None
        texts = list(rec.get("syn_text", []))
        scores = rec.get(SCORES_FIELD)
        if self.cfg.output.mode == "merge" and self.cfg.output.on_existing == "append":
            new = [t for t in texts if t not in existing]
            if scores is not None:
                scores = [None] * len(existing) + [s for t, s in zip(texts, scores) if t not in existing]
            return existing + new, scores
        return texts, scores

    def _write_output(
        self, unit: ShardUnit, records: dict[str, dict[str, Any]], counts: Counter[str]
    ) -> dict[str, Any]:
        """Write the sidecar or the merged shard from the input's sample order; the shard's counts."""
        cfg = self.cfg
        bad: Counter[str] = Counter()
        captioned = num_captions = samples = 0
        fs, path = io.filesystem(unit.url)
        with fs.open(path, "rb") as f, open_shard(unit.output_url, owner=self.owner) as out:
            for key, members in iter_tar_samples(f, cfg.input.max_member_bytes):
                samples += 1
                rec = records.get(key)
                if rec is not None and rec.get("bad"):
                    bad[rec["bad"]] += 1
                existing: list[str] = []
                if cfg.output.mode == "merge" and schema.SYN_KEY in members:
                    try:
                        existing = schema.decode_syn(members[schema.SYN_KEY])
                    except (ValueError, UnicodeDecodeError):
                        existing = []
                texts, scores = self._syn_payload(rec, existing)
                if rec is not None and not rec.get("bad"):
                    captioned += 1
                    num_captions += len(rec.get("syn_text", []))
                syn_bytes = schema.encode_syn(texts, scores)
                if cfg.output.mode == "sidecar":
                    out.write({schema.KEY: key, schema.SYN_KEY: syn_bytes})
                    continue
                sample: dict[str, Any] = {schema.KEY: key, **members}  # other members kept byte for byte
                if rec is not None and not rec.get("bad"):
                    sample[schema.SYN_KEY] = syn_bytes
                    if scores is not None:
                        sample[schema.META_KEY] = _with_scores(members.get(schema.META_KEY), key, scores)
                out.write(sample)
        if samples != counts["samples"]:
            raise RuntimeError(
                f"{unit.url}: read {counts['samples']} samples, then {samples}: shard changed?"
            )
        return {
            "samples": samples,
            "captioned": captioned,
            "captions": num_captions,
            "bad": dict(sorted(bad.items())),
            "num_bad": sum(bad.values()),
            "kept_existing": counts["kept_existing"],
        }


def _with_scores(meta: bytes | None, key: str, scores: list[Any]) -> bytes:
    try:
        d = json.loads(meta) if meta else {"uid": key}
        if not isinstance(d, dict):
            d = {"uid": key}
    except (ValueError, UnicodeDecodeError):
        d = {"uid": key}
    d[SCORES_FIELD] = scores
    return json.dumps(d, sort_keys=True, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------------------------- run


class _WorkerFactory:
    """Picklable ``() -> ShardCaptioner`` for Ray actors (each actor builds its own captioner)."""

    def __init__(self, cfg: CaptionJobConfig, owner: str = "") -> None:
        self.cfg = cfg
        self.owner = owner

    def __call__(self) -> ShardCaptioner:
        return ShardCaptioner(self.cfg, owner=self.owner)


def run_job(
    cfg: CaptionJobConfig,
    captioner: Captioner | None = None,
    on_batch: Callable[[ShardUnit, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Caption this task's shards that are not done; returns a summary (shards, samples, bad, timings).

    Sidecars, merged shards and markers are written through ``<their folder>/_tmp/`` (never beside the final
    names); when the run ends, however it ends, its own leftover temporaries are removed (a killed worker's),
    and other runs' once they are an hour old.
    """
    plan = make_plan(cfg)
    owner = uuid.uuid4().hex[:12]
    try:
        return _run_plan(cfg, plan, captioner, on_batch, log, owner)
    finally:
        folders = {_folder(u.output_url) for u in plan.todo} | {_folder(u.marker_url) for u in plan.todo}
        for folder in sorted(folders):
            remove_stale_temp_files(folder, owner=owner)


def _folder(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."


def _run_plan(
    cfg: CaptionJobConfig,
    plan: CaptionPlan,
    captioner: Captioner | None,
    on_batch: Callable[[ShardUnit, int], None] | None,
    log: Callable[[str], None],
    owner: str,
) -> dict[str, Any]:
    log(
        f"caption: task {plan.task_index}/{plan.num_tasks}: {len(plan.todo)} shards to do, "
        f"{len(plan.done)} done"
    )
    t0 = time.time()
    results: list[dict[str, Any]] = []
    if plan.todo and cfg.execution.kind == "ray":
        from pipeline import ray_backend

        ex = cfg.execution
        results = ray_backend.map_actor_pool(
            _WorkerFactory(cfg, owner),
            plan.todo,
            min_actors=ex.ray_min_actors,
            max_actors=ex.ray_max_actors,
            num_gpus_per_actor=ex.ray_gpus_per_actor,
            num_cpus_per_actor=ex.ray_cpus_per_actor,
        )
    elif plan.todo:
        worker = ShardCaptioner(cfg, captioner=captioner, on_batch=on_batch, owner=owner)
        try:
            for unit in plan.todo:
                stats = worker(unit)
                results.append(stats)
                if not stats.get("skipped"):
                    log(
                        f"caption: {unit.name}: {stats['captioned']} images captioned, {stats['num_bad']} bad, "
                        f"{stats['images_per_s']} images/s"
                    )
        finally:
            worker.close()
    done = [r for r in results if not r.get("skipped")]
    bad: Counter[str] = Counter()
    for r in done:
        bad.update(r["bad"])
    seconds = time.time() - t0
    captioned = sum(r["captioned"] for r in done)
    return {
        "task_index": plan.task_index,
        "num_tasks": plan.num_tasks,
        "shards_captioned": len(done),
        "shards_already_done": len(plan.done) + (len(results) - len(done)),
        "samples": sum(r["samples"] for r in done),
        "captioned": captioned,
        "captions": sum(r["captions"] for r in done),
        "bad": dict(sorted(bad.items())),
        "seconds": round(seconds, 3),
        "images_per_s": round(captioned / max(seconds, 1e-9), 3),
    }

"""The training data loader: WebDataset shards -> batches of augmented images and tokenized captions.

    loader = build_loader(LoaderConfig(shards="data/shards/{00000..00099}.tar", micro_batch=256),
                          rank, world_size, tokenizer, start=checkpoint.get("data"))
    for batch in loader:   # dict(image=[B,3,H,W] float, text=[B,ctx] long, syn_text=[B,ctx] long,
        ...                #      has_syn=[B] bool, uid=list[str]; with teacher_embeddings also
                           #      teacher_image_emb=[B,...] float, teacher_text_emb=[B,...] float)
        state = loader.state_dict()   # JSON-able; position after the last yielded batch

Shards are tar files of the schema in :mod:`pipeline.data.schema`, named by brace patterns, ``::``-joined
lists of patterns, globs, a folder, or a list file (``.txt``), on local disk or any fsspec URL (``s3://``; the
endpoint comes from ``S3_ENDPOINT_URL``); a spec naming no shard raises :class:`ShardSpecError` naming the
path. Tars are read by the streaming reader of :mod:`pipeline.data.tar` (no webdataset pipeline, so no
``KeyError: 'fname'`` at shard ends): only regular members, keys and extensions by the rule data prep shares
(:func:`pipeline.data.schema.member_key`; unsafe names such as ``../x.jpg`` are skipped and counted), members
over ``max_member_bytes`` dropped unread.

``syn_shards`` names DataCompDR-style caption sidecars (``data_prep.caption``'s output): sidecar ``i`` is read
whole when shard ``i`` is opened and replaces each sample's ``syn.json`` by its entry for the sample's key
(samples without one keep theirs and are counted as ``missing_sidecar``). uids listed in data prep's
``duplicate_images.txt`` beside the shards are skipped (``skip_duplicate_images``), counted as
``duplicate_image``.

Bad samples never stop training: undecodable / missing / oversized images, missing / empty / non-UTF-8
captions, bad ``json`` or ``syn.json``, unreadable or truncated shards are skipped and counted by reason in
``loader.stats``. Samples with no synthetic caption get their web caption as ``syn_text`` (``has_syn`` is then
False, and ``loader.counts["syn_fallback"]`` counts them).

Order, shuffling and exact resume
---------------------------------
Everything below is a pure function of (config, rank, world size, number of workers), never of timing.

- Slots: rank ``r``'s loader worker ``w`` is slot ``s = r * W + w`` of ``S = world_size * W`` (``W =
  max(1, num_workers)``). Epoch ``e`` permutes the shard list with a seed from (seed, e) and slot ``s`` reads
  shards ``s, s + S, s + 2S, ...`` of that permutation, so in one epoch every shard is read by exactly one
  slot. Needs at least ``S`` shards. In resampled mode slot ``s`` instead draws its ``k``-th shard uniformly
  with replacement from a seed of (seed, r, w, k): an endless stream.
- Shuffle: each slot cuts its stream into windows of ``shuffle_buffer`` samples (windows never cross an
  epoch; with ``group_size > 1`` they end on group boundaries) and emits each window in a random order seeded
  by (seed, epoch, slot, window start). This is a block shuffle: a sample moves at most one window away from
  its place in the slot's stream (webdataset's rolling buffer mixes a bit further, but cannot be resumed
  without replaying the stream). Shards are shuffled every epoch, so windows differ between epochs.
- Hard-negative groups (``group_size = g``): samples ``g*k .. g*k+g-1`` of a shard form a group; windows
  shuffle whole groups, so a group's samples stay consecutive and, as ``micro_batch`` is a multiple of ``g``,
  in one micro-batch (unless a member was dropped as bad or by the subset filter).
- Batches: each worker builds whole micro-batches from its own stream (a batch may span an epoch boundary);
  the loader takes batches from workers in a fixed round-robin order, as torch's DataLoader does.
- Augmentation and caption choice are seeded per sample from (seed, visit, uid), ``visit`` being the epoch
  (resampled mode: the shard draw index): a sample gets a new crop each epoch, the same crop on a resume.
  ``syn_sampling``: ``random`` (uniform from that seed), ``first``, or ``cycle`` (caption ``visit mod n``).
- State: per worker (epoch, window start as (shard index, sample index in shard), samples of the window
  consumed) plus bad-sample counters, and which worker delivers next. On resume a worker re-opens the
  window's shard, skips to the window start reading only tar headers, re-reads that one window (raw bytes, no
  decoding) and skips the consumed samples; earlier shards are never touched. The next batches are then
  identical to an uninterrupted run's. A resume needs the same shards, seed, shuffle settings, micro-batch,
  world size, rank and number of workers (checked: a mismatch raises ``ValueError`` naming the field);
  image size and augmentation settings may change. A shard-level read error inside the re-read window is
  counted again after a resume.
- Finite runs: ``epochs = n`` stops each worker after ``n`` passes; with ``drop_last = False`` each worker's
  last partial batch is yielded, so one epoch yields every (good) sample exactly once over all ranks and
  workers. Ranks may then yield different numbers of batches: distributed training uses endless mode.
- A subset (``subset_uids``, a uid list file from data prep's nested subsets, one uid per line or a JSON
  list) keeps only those uids, decided from tar keys before any decoding: no re-sharding. Windows count only
  kept samples. Duplicate images stay in windows as markers, so skipping them never moves a position.
- ``iter(loader)`` builds the pass at once (workers start there) and the DataLoader seeds its workers from
  its own generator: a loader never draws from or moves the global torch RNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import io as pio
from pipeline.data import schema
from pipeline.data.tar import CORRUPT_ERRORS, TarFormatError, decompressed, iter_tar  # noqa: F401
from pipeline.data.tokenizer import get_tokenizer, tokenize
from pipeline.data.transforms import CLIP_MEAN, CLIP_STD, BadImage, eval_image, normalize_batch, train_image

log = logging.getLogger(__name__)

STATE_VERSION = 1
IMAGE_KEYS = (schema.IMAGE_KEY, "jpeg", "png", "webp")
LoaderState = dict[str, Any]
"""What ``Loader.state_dict()`` returns and ``build_loader(start=...)`` takes (JSON-able)."""


@dataclass(frozen=True)
class LoaderConfig:
    """Training data: which shards, how they are split, shuffled, augmented and tokenized."""

    shards: str = ""
    """Shards: brace pattern(s) joined by '::', a glob, a folder, or a .txt list file; local or fsspec URL."""
    micro_batch: int = 64
    """Samples per batch, per rank."""
    num_workers: int = 2
    """Worker processes per rank (0 = decode in the main process)."""
    shuffle_buffer: int = 1000
    """Samples per shuffle window (0 or 1: no sample shuffle)."""
    shuffle_shards: bool = True
    """Permute the shard list every epoch."""
    resampled: bool = False
    """Draw shards with replacement (an endless stream) instead of epochs over the shard list."""
    epochs: int | None = None
    """Stop after this many passes over the shards (None: endless, the usual for training)."""
    drop_last: bool = True
    """With epochs set, drop each worker's last partial batch."""
    seed: int = 0
    """Seed of shard order, shuffle windows, crops and synthetic-caption choice."""
    image_size: int = 224
    """Output image side in pixels."""
    augment: bool = True
    """RandomResizedCrop (True) or resize + center crop (False)."""
    scale: tuple[float, float] = (0.9, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    """RandomResizedCrop aspect-ratio range."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Normalisation mean (CLIP's)."""
    std: tuple[float, float, float] = CLIP_STD
    """Normalisation std (CLIP's)."""
    context_length: int = 77
    """Tokens per caption."""
    syn_shards: str = ""
    """DataCompDR-style sidecar caption shards (data_prep.caption's output), same forms as shards: the i-th
    joins the i-th shard (same file names) by key, its syn.json replacing the shard's synthetic captions."""
    subset_uids: str | None = None
    """uid list file (one per line, or a JSON list) selecting a subset of the shards' samples."""
    skip_duplicate_images: bool = True
    """Skip the uids listed in duplicate_images.txt beside the shards (cross-shard image duplicates)."""
    syn_sampling: Literal["random", "first", "cycle"] = "random"
    """Which synthetic caption a sample gets per visit (epoch): random, the first, or cycling."""
    group_size: int = 1
    """Keep groups of this many consecutive samples of a shard together (hard negatives)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = True
    """Pin batches in page-locked memory (only when CUDA is available)."""
    max_member_bytes: int = 64 * 1024 * 1024
    """Tar members larger than this are skipped unread (counted as member_too_large)."""
    max_pixels: int = 64_000_000
    """Images with more pixels are skipped (decompression-bomb guard)."""
    jpeg_draft: bool = True
    """Decode large JPEGs at 1/2, 1/4 or 1/8 scale when the crop still has enough pixels (faster)."""
    read_retries: int = 2
    """Re-open a shard this many times after an I/O error (not after a corrupt tar)."""
    teacher_embeddings: bool = False
    """Also return each sample's DataCompDR teacher embeddings (its npz member: image_emb, text_emb) as
    batch["teacher_image_emb"] / batch["teacher_text_emb"] (float32); samples without them are skipped and
    counted as missing_teacher_emb."""

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if self.epochs is not None and self.resampled:
            raise ValueError("epochs: a resampled stream is endless; leave epochs unset")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if self.syn_sampling not in ("random", "first", "cycle"):
            raise ValueError(f"syn_sampling must be random, first or cycle, got {self.syn_sampling!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.micro_batch % self.group_size:
            raise ValueError(
                f"group_size ({self.group_size}) must divide micro_batch ({self.micro_batch}) "
                "so that groups stay inside one batch"
            )
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.max_member_bytes < 1:
            raise ValueError(f"max_member_bytes must be >= 1, got {self.max_member_bytes}")
        if self.read_retries < 0:
            raise ValueError(f"read_retries must be >= 0, got {self.read_retries}")


# Fields that decide which sample comes when; a resume must keep them.
_FINGERPRINT_FIELDS = (
    "shards",
    "micro_batch",
    "num_workers",
    "shuffle_buffer",
    "shuffle_shards",
    "resampled",
    "seed",
    "subset_uids",
    "group_size",
)


def _hash_int(*parts: object) -> int:
    """A stable 64-bit hash of ``parts`` (Python's ``hash`` is salted per process)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------- shard lists


class ShardSpecError(ValueError):
    """A shard spec names no shard (missing folder or list file, empty glob, no existing file)."""


def _read_lines(url: str) -> list[str]:
    fs, path = pio.filesystem(url)
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


_SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def _none_exists(part: str, urls: list[str]) -> bool:
    """True when no file of ``urls`` exists (local: any of them; object stores: the first and the last)."""
    if pio.is_local(part):
        return not any(os.path.exists(u.removeprefix("file://")) for u in urls)
    fs, _ = pio.filesystem(part)
    return not any(fs.exists(pio.filesystem(u)[1]) for u in dict.fromkeys(urls[:1] + urls[-1:]))


def _expand_one(part: str) -> list[str]:
    import braceexpand

    if part.endswith((".txt", ".list", ".lst")) and "{" not in part:
        base = part.rsplit("/", 1)[0] if "/" in part else ""
        try:
            lines = _read_lines(part)
        except FileNotFoundError:
            raise ShardSpecError(f"list file {part} does not exist") from None
        if not lines:
            raise ShardSpecError(f"list file {part} names no shard")
        out = []
        for line in lines:
            line = line if ("://" in line or line.startswith("/") or not base) else pio.join(base, line)
            out.extend(_expand_one(line))
        return out
    fs, path = pio.filesystem(part)
    if any(c in part for c in "*?["):
        found = [p if pio.is_local(part) else fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]
        if not found:
            raise ShardSpecError(f"{part} matches no file")
        return found
    if "{" not in part and not part.endswith(_SHARD_SUFFIXES):
        if fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(_SHARD_SUFFIXES))
            if not found:
                raise ShardSpecError(f"folder {part} holds no .tar / .tgz / .tar.gz shard")
            return [p if pio.is_local(part) else fs.unstrip_protocol(p) for p in found]
        if not fs.exists(path):
            raise ShardSpecError(f"{part} does not exist (no such folder or shard)")
    urls = list(braceexpand.braceexpand(part))
    if _none_exists(part, urls):
        if len(urls) == 1:
            raise ShardSpecError(f"shard {part} does not exist")
        raise ShardSpecError(f"none of the {len(urls)} shards of {part} exists")
    return urls


def expand_shards(spec: str) -> list[str]:
    """Shard URLs named by ``spec`` (see :class:`LoaderConfig.shards`), in order.

    Raises :class:`ShardSpecError` (a ``ValueError``) naming the path when a part of ``spec`` names no shard:
    a missing folder or list file, a glob matching nothing, a brace pattern or path none of whose files
    exists (on object stores only its first and last file are checked). Single missing shards of a pattern
    are not errors here: the loader counts them as ``shard_error``.
    """
    urls: list[str] = []
    for part in str(spec).split("::"):
        if part.strip():
            urls.extend(_expand_one(part.strip()))
    if not urls:
        raise ShardSpecError(f"{spec!r} names no shard")
    return urls


def _shard_stem(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_shards(cfg: LoaderConfig) -> tuple[list[str], list[str] | None]:
    """The shard URLs of ``cfg.shards`` and, when ``cfg.syn_shards`` is set, their sidecars, paired.

    Raises :class:`ShardSpecError` with a one-line message naming the field and the path (jobs turn it
    into exit code 2, as they do config errors).
    """
    if not cfg.shards:
        raise ShardSpecError("shards: no shards given")
    try:
        urls = expand_shards(cfg.shards)
    except ShardSpecError as e:
        raise ShardSpecError(f"shards: {e}") from None
    if not cfg.syn_shards:
        return urls, None
    try:
        syn_urls = expand_shards(cfg.syn_shards)
    except ShardSpecError as e:
        raise ShardSpecError(f"syn_shards: {e}") from None
    return urls, pair_sidecars(urls, syn_urls)


def pair_sidecars(urls: list[str], syn_urls: list[str]) -> list[str]:
    """Check that sidecar ``i`` belongs to shard ``i`` (same count, same file names); returns ``syn_urls``."""
    if len(syn_urls) != len(urls):
        raise ShardSpecError(f"syn_shards: {len(syn_urls)} sidecar shards for {len(urls)} shards")
    for url, syn in zip(urls, syn_urls):
        if _shard_stem(url) != _shard_stem(syn):
            raise ShardSpecError(
                f"syn_shards: sidecar {syn} sits where {url} expects its own (sidecar i joins shard i, "
                "so both lists need the same file names in the same order)"
            )
    return syn_urls


# ------------------------------------------------------------------------------------------------- subsets


def _uid_hash(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest(), "little")


class UidSubset:
    """A set of uids stored as sorted 64-bit hashes (8 bytes per uid, shared copy-on-write by workers)."""

    def __init__(self, uids: Sequence[str]):
        self._hashes = np.unique(np.fromiter((_uid_hash(u) for u in uids), dtype=np.uint64, count=len(uids)))

    @classmethod
    def from_file(cls, url: str) -> UidSubset:
        """One uid per line (``#`` comments allowed), or a JSON list / ``{"uids": [...]}`` for ``.json``."""
        if url.endswith(".json"):
            data = pio.read_json(url)
            uids = data.get("uids", []) if isinstance(data, dict) else data
            if not isinstance(uids, list):
                raise ValueError(f"subset_uids: {url} holds no list of uids")
            return cls([str(u) for u in uids])
        return cls(_read_lines(url))

    def __len__(self) -> int:
        return int(self._hashes.size)

    def __contains__(self, uid: object) -> bool:
        h = np.uint64(_uid_hash(str(uid)))
        i = int(np.searchsorted(self._hashes, h))
        return i < self._hashes.size and self._hashes[i] == h


def duplicate_image_uids(urls: Sequence[str]) -> UidSubset | None:
    """The uids of ``duplicate_images.txt`` in the folders holding ``urls`` (data prep's cross-shard image
    duplicates), or None when no folder has one or the lists are empty."""
    folders = dict.fromkeys(u.rsplit("/", 1)[0] if "/" in u else "." for u in urls)
    uids: list[str] = []
    for folder in folders:
        path = pio.join(folder, schema.DUPLICATE_IMAGES_FILE)
        if pio.exists(path):
            uids.extend(_read_lines(path))
    return UidSubset(uids) if uids else None


# ------------------------------------------------------------------------------------------- tar reading

_ERROR = "__error__"


_UNSAFE = "/unsafe"  # in a sample's members: how many members with unsafe names were skipped near it
_TEACHER_FIELDS = ("teacher_image_emb", "teacher_text_emb")
_NO_SIDECAR = "/no_sidecar"  # in a sample's members: the sidecar shard has no entry for its key
# (no member extension can hold "/": these never collide with a member)


def _tar_groups(fileobj: Any, skip: int, max_bytes: int) -> Iterator[tuple[int, str | None, dict[str, Any]]]:
    """``(index in shard, key, {ext: bytes})`` for each sample of a tar stream, from sample ``skip`` on.

    Keys and extensions follow :func:`pipeline.data.schema.member_key`, the rule data prep's tar reader
    follows too; hidden and extension-less names are ignored. Members with unsafe names (absolute, ``..``)
    are skipped unread and counted under ``_UNSAFE`` in the sample open at that point (the first sample
    when no sample has started yet); a tar holding nothing else yields one ``(0, None, {...})``. Members
    of the first ``skip`` samples are not read; members over ``max_bytes`` become None.
    """
    state: dict[str, Any] = {"index": -1, "key": None, "exts": set(), "parts": None}

    def want(name: str) -> bool:
        # Called once per regular member, in order, just before iter_tar yields it: tracks sample
        # boundaries before any data is read.
        parts = state["parts"] = schema.member_key(name)
        if parts is None or not parts[0]:
            return False
        key, ext = parts
        if key != state["key"] or ext in state["exts"]:
            state["index"], state["key"], state["exts"] = state["index"] + 1, key, set()
        state["exts"].add(ext)
        return state["index"] >= skip

    index, key, members, unsafe = -1, None, {}, 0
    for _, data in iter_tar(fileobj, want, max_bytes):
        parts = state["parts"]
        if parts is None:  # unsafe name: counted with the sample open now, or the first one
            if max(state["index"], 0) < skip:
                continue
            if key is not None:
                members[_UNSAFE] = members.get(_UNSAFE, 0) + 1
            else:
                unsafe += 1
            continue
        if state["index"] < skip or not parts[0]:
            continue
        if state["index"] != index:
            if key is not None:
                yield index, key, members
            index, key, members = state["index"], parts[0], {}
            if unsafe:
                members[_UNSAFE], unsafe = unsafe, 0
        members[parts[1]] = data
    if key is not None:
        yield index, key, members
    elif unsafe:
        yield 0, None, {_ERROR: None, _UNSAFE: unsafe}


def _open_shard(url: str) -> Any:
    if pio.is_local(url):
        return open(url.removeprefix("file://"), "rb", buffering=1 << 20)
    fs, path = pio.filesystem(url)
    return fs.open(path, "rb", block_size=8 << 20)


_CORRUPT = CORRUPT_ERRORS  # a shard that raises one of these is corrupt or truncated


def _shard_groups(
    url: str, skip: int, max_bytes: int, retries: int
) -> Iterator[tuple[int, str | None, dict[str, Any]]]:
    """:func:`_tar_groups` over a shard URL; a read failure ends the shard with an error marker sample."""
    next_index, attempt = skip, 0
    while True:
        try:
            with _open_shard(url) as raw:
                f = decompressed(raw)
                for index, key, members in _tar_groups(f, next_index, max_bytes):
                    yield index, key, members
                    next_index = index + 1
            return
        except _CORRUPT as e:  # deterministic: no retry
            log.warning("shard %s: unreadable after sample %d (%s); skipping its rest", url, next_index, e)
            yield next_index, None, {_ERROR: "truncated_shard"}
            return
        except FileNotFoundError as e:
            log.warning("shard %s: %s", url, e)
            yield next_index, None, {_ERROR: "shard_error"}
            return
        except Exception as e:  # I/O, object store: retry from where we were
            attempt += 1
            if attempt > retries:
                log.warning("shard %s: giving up after %d attempts (%s)", url, attempt, e)
                yield next_index, None, {_ERROR: "shard_error"}
                return
            time.sleep(0.5 * attempt)


# ---------------------------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class _Sources:
    """What every slot reads from: shard URLs, their sidecars (or None), the uid subset and exclusions."""

    urls: list[str]
    syn_urls: list[str] | None
    subset: UidSubset | None
    exclude: UidSubset | None


@dataclass
class _WorkerState:
    epoch: int = 0
    shard: int = 0  # window start: index into this worker's shard sequence of the epoch
    sample: int = 0  # window start: sample index inside that shard
    offset: int = 0  # samples of the (shuffled) window already consumed
    done: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "sample": self.sample,
            "offset": self.offset,
            "done": self.done,
            "stats": dict(self.stats),
            "counts": dict(self.counts),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _WorkerState:
        return cls(
            epoch=int(d["epoch"]),
            shard=int(d["shard"]),
            sample=int(d["sample"]),
            offset=int(d["offset"]),
            done=bool(d.get("done", False)),
            stats=dict(d.get("stats", {})),
            counts=dict(d.get("counts", {})),
        )


class _SlotStream:
    """The batches of one (rank, worker) slot, from a given state. Runs inside a loader worker."""

    def __init__(
        self,
        cfg: LoaderConfig,
        sources: _Sources,
        tokenizer: Callable[..., torch.Tensor],
        rank: int,
        world_size: int,
        worker: int,
        state: _WorkerState,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.urls, self.syn_urls = sources.urls, sources.syn_urls
        self.subset, self.exclude = sources.subset, sources.exclude
        self.rank, self.worker = rank, worker
        self.num_workers = max(1, cfg.num_workers)
        self.slot = rank * self.num_workers + worker
        self.num_slots = world_size * self.num_workers
        self.state = state

    # -- shard sequence
    def _epoch_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        if self.cfg.shuffle_shards:
            random.Random(_hash_int(self.cfg.seed, "shards", epoch)).shuffle(order)
        return order[self.slot :: self.num_slots]

    def _shard_at(self, epoch: int, i: int, mine: list[int] | None) -> int | None:
        if self.cfg.resampled:
            return _hash_int(self.cfg.seed, "resample", self.rank, self.worker, i) % len(self.urls)
        assert mine is not None
        return mine[i] if i < len(mine) else None

    def _sidecar(self, shard: int) -> dict[str, bytes | None]:
        """``{key: syn.json bytes}`` of the sidecar of shard ``shard`` (read whole: a few KB per sample)."""
        assert self.syn_urls is not None
        out: dict[str, bytes | None] = {}
        for _, key, members in _shard_groups(
            self.syn_urls[shard], 0, self.cfg.max_member_bytes, self.cfg.read_retries
        ):
            if key is None:  # unreadable from here on (logged): its samples count as missing_sidecar
                break
            if schema.SYN_KEY in members:
                out.setdefault(key, members[schema.SYN_KEY])
        return out

    def _raw(self, epoch: int, shard: int, sample: int) -> Iterator[tuple[int, int, str | None, dict]]:
        mine = None if self.cfg.resampled else self._epoch_shards(epoch)
        i, idle = shard, 0
        while (index := self._shard_at(epoch, i, mine)) is not None:
            kept = 0
            sidecar = self._sidecar(index) if self.syn_urls is not None else None
            for j, key, members in _shard_groups(
                self.urls[index],
                sample if i == shard else 0,
                self.cfg.max_member_bytes,
                self.cfg.read_retries,
            ):
                if key is not None and self.subset is not None and key not in self.subset:
                    continue
                if key is not None and self.exclude is not None and key in self.exclude:
                    # stays in the stream as a marker, so windows do not depend on skip_duplicate_images
                    key, members = None, {_ERROR: "duplicate_image", _UNSAFE: members.get(_UNSAFE, 0)}
                if key is not None and sidecar is not None:
                    members = dict(members)
                    if key in sidecar:
                        members[schema.SYN_KEY] = sidecar[key]
                    else:
                        members[_NO_SIDECAR] = 1
                kept += 1
                yield i, j, key, members
            idle = 0 if kept else idle + 1
            if self.cfg.resampled and idle > 4 * len(self.urls) + 16:
                raise RuntimeError(
                    f"rank {self.rank} worker {self.worker}: {idle} shard draws in a row gave no "
                    f"sample (shards {self.cfg.shards!r}, subset {self.cfg.subset_uids!r})"
                )
            i += 1

    def _windows(self, epoch: int, shard: int, sample: int) -> Iterator[tuple[tuple[int, int], list]]:
        """Windows of >= shuffle_buffer kept samples (ending on group boundaries), with their start position."""
        size, g = max(1, self.cfg.shuffle_buffer), self.cfg.group_size
        items: list[tuple[int, int, str | None, dict]] = []
        start = (shard, sample)
        for i, j, key, members in self._raw(epoch, shard, sample):
            if len(items) >= size and j % g == 0:
                yield start, items
                items, start = [], (i, j)
            items.append((i, j, key, members))
        if items:
            yield start, items

    def _order(self, epoch: int, start: tuple[int, int], items: list) -> list:
        if self.cfg.shuffle_buffer <= 1:
            return items
        rng = random.Random(_hash_int(self.cfg.seed, "window", epoch, self.rank, self.worker, *start))
        g = self.cfg.group_size
        if g == 1:
            items = list(items)
            rng.shuffle(items)
            return items
        units: dict[tuple[int, int], list] = {}
        for item in items:
            units.setdefault((item[0], item[1] // g), []).append(item)
        groups = list(units.values())
        rng.shuffle(groups)
        return [item for group in groups for item in group]

    # -- samples
    def _bad(self, reason: str, n: int = 1) -> None:
        self.state.stats[reason] = self.state.stats.get(reason, 0) + n

    def _count(self, name: str) -> None:
        self.state.counts[name] = self.state.counts.get(name, 0) + 1

    def _sample(self, key: str | None, members: dict[str, Any], visit: int) -> dict[str, Any] | None:
        cfg = self.cfg
        if members.get(_UNSAFE):
            self._bad("unsafe_member_name", members[_UNSAFE])
        if members.get(_NO_SIDECAR):
            self._bad("missing_sidecar")  # the sample is kept, with its own syn.json
        if key is None:
            if members[_ERROR]:
                self._bad(members[_ERROR])
            return None
        image_key = next((k for k in IMAGE_KEYS if k in members), None)
        if image_key is None:
            self._bad("missing_image")
            return None
        if members[image_key] is None or members.get(schema.CAPTION_KEY, b"") is None:
            self._bad("member_too_large")
            return None
        if schema.CAPTION_KEY not in members:
            self._bad("missing_txt")
            return None
        try:
            text = members[schema.CAPTION_KEY].decode("utf-8").strip()
        except UnicodeDecodeError:
            self._bad("bad_txt")
            return None
        if not text:
            self._bad("empty_txt")
            return None
        if schema.META_KEY in members:
            try:
                meta = json.loads(members[schema.META_KEY] or b"")
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._bad("bad_json")
                return None
        syn: list[str] = []
        if schema.SYN_KEY in members:
            try:
                syn = schema.decode_syn(members[schema.SYN_KEY] or b"")
            except (ValueError, TypeError, AttributeError):
                self._bad("bad_syn_json")
                return None
        try:
            if cfg.augment:
                rng = random.Random(_hash_int(cfg.seed, "crop", visit, key))
                image = train_image(
                    members[image_key],
                    cfg.image_size,
                    cfg.scale,
                    cfg.ratio,
                    rng,
                    cfg.max_pixels,
                    cfg.jpeg_draft,
                )
            else:
                image = eval_image(members[image_key], cfg.image_size, cfg.max_pixels, cfg.jpeg_draft)
        except BadImage:
            self._bad("undecodable_image")
            return None
        if syn:
            if cfg.syn_sampling == "first":
                choice = 0
            elif cfg.syn_sampling == "cycle":
                choice = visit % len(syn)
            else:
                choice = _hash_int(cfg.seed, "syn", visit, key) % len(syn)
            syn_text, has_syn = syn[choice], True
        else:
            syn_text, has_syn = text, False
            self._count("syn_fallback")
        out = {"image": image, "text": text, "syn_text": syn_text, "has_syn": has_syn, "uid": key}
        if cfg.teacher_embeddings:
            try:
                emb = schema.decode_npz(members[schema.TEACHER_KEY] or b"")
                out["teacher_image_emb"] = torch.from_numpy(np.asarray(emb["image_emb"], np.float32))
                out["teacher_text_emb"] = torch.from_numpy(np.asarray(emb["text_emb"], np.float32))
            except (KeyError, ValueError, OSError, zipfile.BadZipFile):
                self._bad("missing_teacher_emb")
                return None
        self._count("samples")
        return out

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        teacher = {k: torch.stack([s[k] for s in samples]) for k in _TEACHER_FIELDS if cfg.teacher_embeddings}
        return {
            **teacher,
            "image": normalize_batch([s["image"] for s in samples], cfg.mean, cfg.std),
            "text": tokenize(self.tokenizer, [s["text"] for s in samples], cfg.context_length),
            "syn_text": tokenize(self.tokenizer, [s["syn_text"] for s in samples], cfg.context_length),
            "has_syn": torch.tensor([s["has_syn"] for s in samples], dtype=torch.bool),
            "uid": [s["uid"] for s in samples],
            "_worker": self.worker,
            "_state": self.state.to_dict(),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg, st = self.cfg, self.state
        pending: list[dict[str, Any]] = []
        empty_epochs, bad_run, was_done = 0, 0, st.done
        while not st.done:
            if cfg.epochs is not None and st.epoch >= cfg.epochs:
                st.done = True
                break
            from_start, good = st.shard == 0 and st.sample == 0 and st.offset == 0, 0
            skip = st.offset  # only the first window after a (re)start is partly consumed
            for start, items in self._windows(st.epoch, st.shard, st.sample):
                order = self._order(st.epoch, start, items)
                st.shard, st.sample, st.offset = start[0], start[1], skip
                for k in range(skip, len(order)):
                    i, _, key, members = order[k]
                    sample = self._sample(key, members, i if cfg.resampled else st.epoch)
                    st.offset = k + 1
                    if sample is None:
                        bad_run += 1
                        if bad_run >= 100_000:
                            raise RuntimeError(
                                f"rank {self.rank} worker {self.worker}: {bad_run} bad samples "
                                f"in a row; loader stats {st.stats}"
                            )
                        continue
                    good, bad_run = good + 1, 0
                    pending.append(sample)
                    if len(pending) == cfg.micro_batch:
                        yield self._collate(pending)
                        pending = []
                skip = 0
            empty_epochs = empty_epochs + 1 if (from_start and not good) else 0
            if cfg.epochs is None and empty_epochs > 2 * self.num_slots + 2:
                raise RuntimeError(
                    f"rank {self.rank} worker {self.worker}: {empty_epochs} epochs in a row gave "
                    f"no usable sample from shards {cfg.shards!r}; loader stats {st.stats}"
                )
            st.epoch, st.shard, st.sample, st.offset = st.epoch + 1, 0, 0, 0
        if pending and not cfg.drop_last:
            yield self._collate(pending)
        if not was_done:  # end of a finite stream: report the final state (bad samples after the last batch)
            yield {"_worker": self.worker, "_state": st.to_dict()}


class _Dataset(IterableDataset):
    """Hands each DataLoader worker its slot; worker ``j`` plays logical worker ``(j + rotation) mod W``."""

    def __init__(self, loader: Loader, states: list[_WorkerState], rotation: int):
        super().__init__()
        self.cfg, self.sources = loader.cfg, loader.sources
        self.tokenizer, self.rank, self.world_size = loader.tokenizer, loader.rank, loader.world_size
        self.states, self.rotation = states, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num = max(1, self.cfg.num_workers)
        worker = ((info.id if info is not None else 0) + self.rotation) % num
        state = _WorkerState.from_dict(self.states[worker].to_dict())
        return iter(
            _SlotStream(self.cfg, self.sources, self.tokenizer, self.rank, self.world_size, worker, state)
        )


class Loader:
    """Iterable of batches; ``state_dict()`` is the position after the last batch it yielded.

    Iterating again continues from that position (fresh worker processes).
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        rank: int,
        world_size: int,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        start: LoaderState | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.urls, syn_urls = resolve_shards(cfg)
        self.tokenizer = tokenizer or get_tokenizer("ViT-B-16", cfg.context_length)
        num_slots = world_size * max(1, cfg.num_workers)
        if not cfg.resampled and len(self.urls) < num_slots:
            raise ValueError(
                f"shards: {len(self.urls)} shards for {num_slots} readers (world_size {world_size} x "
                f"num_workers {max(1, cfg.num_workers)}); use more shards, fewer workers, or resampled"
            )
        self.subset = UidSubset.from_file(cfg.subset_uids) if cfg.subset_uids else None
        self.exclude = duplicate_image_uids(self.urls) if cfg.skip_duplicate_images else None
        self.sources = _Sources(self.urls, syn_urls, self.subset, self.exclude)
        self._states = [_WorkerState() for _ in range(max(1, cfg.num_workers))]
        self._batches = 0
        self._next_worker = 0
        if start is not None:
            self._load(start)

    def _fingerprint(self) -> dict[str, Any]:
        fp = {name: getattr(self.cfg, name) for name in _FINGERPRINT_FIELDS}
        fp.update(rank=self.rank, world_size=self.world_size, num_shards=len(self.urls))
        return fp

    def _load(self, state: LoaderState) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = state["fingerprint"]
        for name, value in self._fingerprint().items():
            if saved.get(name) != value:
                raise ValueError(
                    f"{name}: the loader state was saved with {name}={saved.get(name)!r}, now {value!r}; "
                    "exact resume needs the same value"
                )
        self._states = [_WorkerState.from_dict(d) for d in state["workers"]]
        self._batches = int(state["batches"])
        self._next_worker = int(state["next_worker"])

    def state_dict(self) -> LoaderState:
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "batches": self._batches,
            "next_worker": self._next_worker,
            "workers": [s.to_dict() for s in self._states],
        }

    @property
    def stats(self) -> dict[str, int]:
        """Bad samples by reason, over this rank's workers (carried over a resume)."""
        return _sum_dicts(s.stats for s in self._states)

    @property
    def counts(self) -> dict[str, int]:
        """``samples`` decoded (all delivered but a dropped last partial batch) and ``syn_fallback`` (of those,
        the samples whose ``syn_text`` is their web caption)."""
        return _sum_dicts(s.counts for s in self._states)

    @property
    def epoch(self) -> int:
        """The epoch the slowest worker of this rank is in."""
        return min(s.epoch for s in self._states)

    @property
    def batches(self) -> int:
        return self._batches

    def __iter__(self) -> _Pass:
        return _Pass(self)


class _Pass(Iterator[dict[str, Any]]):
    """One pass over a :class:`Loader`, from its current position.

    Built eagerly by ``iter(loader)`` (not a generator), so the worker processes start there, and the
    DataLoader draws its worker seed from its own generator seeded by (seed, rank): iterating never draws
    from, or moves, the global torch RNG (a resumed run's training RNG streams stay those of an
    uninterrupted one).
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        cfg = loader.cfg
        states = [_WorkerState.from_dict(s.to_dict()) for s in loader._states]
        dataset = _Dataset(loader, states, loader._next_worker)
        if cfg.num_workers == 0:
            self._source: Iterator[dict[str, Any]] = iter(dataset)
        else:
            generator = torch.Generator()
            generator.manual_seed(_hash_int(cfg.seed, "dataloader", loader.rank) >> 1)
            self._source = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=cfg.num_workers,
                    prefetch_factor=cfg.prefetch_factor,
                    pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                    persistent_workers=False,
                    generator=generator,
                )
            )

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> dict[str, Any]:
        loader, num = self.loader, max(1, self.loader.cfg.num_workers)
        while True:
            batch = next(self._source)
            worker = int(batch.pop("_worker"))
            loader._states[worker] = _WorkerState.from_dict(batch.pop("_state"))
            loader._next_worker = (worker + 1) % num
            if batch:  # else a worker's end-of-stream state report
                loader._batches += 1
                return batch


def _sum_dicts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))


def build_loader(
    cfg: LoaderConfig,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Callable[..., torch.Tensor] | None = None,
    start: LoaderState | None = None,
) -> Loader:
    """The training loader of ``rank`` (of ``world_size``), continuing from ``start`` (a ``state_dict()``)."""
    return Loader(cfg, rank, world_size, tokenizer, start)

"""Step-granularity checkpoints: save, resume from ``latest``, keep the last N plus every K-th.

    <run>/checkpoints/<step>/                DeepSpeed's files (weights, optimizer shards, scheduler, step)
    <run>/checkpoints/<step>/rank<r>.pt      this rank's state: RNG states, data position, EMA (shards)
    <run>/checkpoints/<step>/meta.json       step, world size, time, the run's resolved config
    <run>/checkpoints/<step>/sha256.json     sha256 of every other file of the checkpoint (written atomically)
    <run>/checkpoints/latest                 text: the newest *complete* step (written last, atomically)

A checkpoint is complete once ``latest`` names it: every rank has written its part and passed a barrier
before rank 0 replaces ``latest``, so a job killed mid-save resumes from the previous checkpoint. The
EMA is stored by rank 0 when it is replicated (ZeRO 0-2) and by every rank under ZeRO-3 (its shards).
Resuming needs the same world size (DeepSpeed's optimizer shards, the EMA shards and the data position are
per rank). Our files are read with ``torch.load(weights_only=True)``; DeepSpeed reads its own
(``*_model_states.pt``, ``*_optim_states.pt``) with full pickle (``weights_only=False``, inside
``engine.load_checkpoint``), because its optimizer files hold DeepSpeed objects (``ZeroStageEnum``,
``LossScaler``, ``fragment_address``). So before anything is loaded, every file is checked against
``sha256.json`` (the ranks split the hashing): a changed, missing or unlisted file is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import io

LATEST = "latest"
MANIFEST = "sha256.json"
"""Per checkpoint: ``{"algorithm": "sha256", "files": {relative path: hex digest}}`` of every other file."""


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 1000
    """Save every this many optimizer steps (0: only at the end and on preemption)."""
    keep_last: int = 3
    """Keep the newest N checkpoints (at least 1)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    resume: str = "auto"
    """``auto``: continue from the run directory's ``latest`` if there is one; ``never``; or the path of a
    checkpoints folder (its ``latest``) or of one ``checkpoints/<step>`` folder to start from."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"interval: must be >= 0, got {self.interval}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")
        if self.keep_every < 0:
            raise ValueError(f"keep_every: must be >= 0, got {self.keep_every}")


# ------------------------------------------------------------------------------------------------ RNG


def seed_rngs(seed: int, rank: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch's with ``seed + rank``, so that two runs
    with the same seed draw the same streams on every rank (and ranks draw different ones)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ locations


def latest_step(checkpoints: Path) -> int | None:
    """The step named by ``checkpoints/latest``, or None when there is no complete checkpoint."""
    marker = checkpoints / LATEST
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    return int(text) if text.isdigit() else None


def resolve_resume(cfg: CheckpointConfig, checkpoints: Path) -> tuple[Path, int] | None:
    """``(checkpoints folder, step)`` to resume from, following ``cfg.resume``; None to start fresh."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        step = latest_step(checkpoints)
        return None if step is None else (checkpoints, step)
    path = Path(cfg.resume)
    if (path / LATEST).exists():
        step = latest_step(path)
        if step is None:
            raise ValueError(f"resume: {path / LATEST} names no step")
        return path, step
    if path.is_dir() and path.name.isdigit() and (path / "meta.json").exists():
        return path.parent, int(path.name)
    raise ValueError(
        f"resume: {cfg.resume!r} is neither 'auto', 'never', a checkpoints folder nor a checkpoint"
    )


def saved_steps(checkpoints: Path) -> list[int]:
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def to_delete(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Steps that fall out of "the newest ``keep_last`` plus every multiple of ``keep_every``"."""
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]


# ---------------------------------------------------------------------------------------- save / load


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(
    checkpoints: Path,
    step: int,
    engine: Any,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    cfg: CheckpointConfig,
) -> Path:
    """Collective: write checkpoint ``step`` (engine + this rank's ``rank_state``), then mark it latest."""
    rank = _rank()
    folder = checkpoints / str(step)
    engine.save(str(checkpoints), str(step), client_state={"step": step})
    folder.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(str(folder / f"rank{rank}.pt"), "wb") as f:
        torch.save(rank_state, f)
    _barrier()
    if rank == 0:
        io.write_json(str(folder / "meta.json"), {"step": step, "time": time.time(), **meta})
        write_manifest(folder)
        io.write_text(str(checkpoints / LATEST), f"{step}\n")
        for old in to_delete(saved_steps(checkpoints), cfg.keep_last, cfg.keep_every):
            shutil.rmtree(checkpoints / str(old), ignore_errors=True)
    _barrier()
    return folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Write ``folder/sha256.json``: the sha256 of every file of the checkpoint (atomically)."""
    files = {name: file_sha256(folder / name) for name in _checkpoint_files(folder)}
    io.write_json(str(folder / MANIFEST), {"algorithm": "sha256", "files": files})


def verify_files(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems of checkpoint ``folder`` against its ``sha256.json``, each naming its file (empty: all good).

    Every rank checks the listing; rank ``r`` hashes every ``world_size``-th listed file from the ``r``-th."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing: the checkpoint's files cannot be verified before loading"]
    listed: dict[str, str] = json.loads(manifest_path.read_text())["files"]
    present = set(_checkpoint_files(folder))
    problems = [f"{folder / name} is not listed in {manifest_path}" for name in sorted(present - set(listed))]
    problems += [
        f"{folder / name} is listed in {manifest_path} but missing" for name in sorted(set(listed) - present)
    ]
    for name in sorted(set(listed) & present)[rank::world_size]:
        if file_sha256(folder / name) != listed[name]:
            problems.append(
                f"{folder / name} does not match its sha256 in {manifest_path} (changed after saving)"
            )
    return problems


def _verify(folder: Path) -> None:
    """Collective: raise ValueError on every rank when any rank found a problem with the checkpoint's files."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    problems = verify_files(folder, _rank(), world_size)
    if world_size > 1:
        gathered: list[list[str]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for rank_problems in gathered for p in rank_problems})
    if problems:
        raise ValueError(
            "resume: refusing to load checkpoint files that fail verification: " + "; ".join(problems)
        )


def read_rank_state(checkpoints: Path, step: int, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s saved state of checkpoint ``step`` (RNG, data position, EMA when it holds one)."""
    return torch.load(checkpoints / str(step) / f"rank{rank}.pt", map_location="cpu", weights_only=True)


def load(checkpoints: Path, step: int, engine: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: verify every file of checkpoint ``step`` against its ``sha256.json``, then restore the
    engine from it; returns ``(this rank's state, meta.json)``."""
    folder = checkpoints / str(step)
    _verify(folder)
    meta = json.loads((folder / "meta.json").read_text())
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size", world_size) != world_size:
        raise ValueError(
            f"resume: checkpoint {folder} was written by {meta['world_size']} ranks, this run has {world_size}"
        )
    client = engine.load(str(checkpoints), str(step))
    if int(client.get("step", step)) != step:
        raise ValueError(f"resume: {folder} holds step {client.get('step')}, expected {step}")
    return read_rank_state(checkpoints, step, _rank()), meta


# ------------------------------------------------------------------------- one-file loops (no DeepSpeed)

STATE_FILE = "state.pt"
"""The state of a loop without a DeepSpeed engine (fine-tuning, CoCa): ``<step>/state.pt``, one file."""


def save_state(
    checkpoints: Path, step: int, state: dict[str, Any], keep_last: int, keep_every: int = 0
) -> Path | None:
    """Collective: rank 0 writes ``<step>/state.pt`` (``state`` is replicated, e.g. a
    :class:`pipeline.train.state.TrainState`'s ``state_dict()``), its ``sha256.json``, then ``latest``,
    and applies retention; the other ranks wait. The same protocol as :func:`save`, for replicated state."""
    folder = checkpoints / str(step)
    if _rank() == 0:
        with io.atomic_write(str(folder / STATE_FILE), "wb") as f:
            torch.save(state, f)
        write_manifest(folder)
        io.write_text(str(checkpoints / LATEST), f"{step}\n")
        for old in to_delete(saved_steps(checkpoints), keep_last, keep_every):
            shutil.rmtree(checkpoints / str(old), ignore_errors=True)
    _barrier()
    return folder / STATE_FILE if _rank() == 0 else None


def latest_state_file(checkpoints: Path) -> Path | None:
    """``<step>/state.pt`` of the step ``latest`` names, or None when there is no complete checkpoint."""
    step = latest_step(checkpoints)
    path = None if step is None else checkpoints / str(step) / STATE_FILE
    return path if path is not None and path.is_file() else None


def load_state(path: Path) -> dict[str, Any]:
    """Verify ``path``'s folder against its ``sha256.json`` (when it has one), then load it on CPU."""
    if (path.parent / MANIFEST).is_file():
        problems = verify_files(path.parent)
        if problems:
            raise ValueError(
                "resume: refusing to load a checkpoint that fails verification: " + "; ".join(problems)
            )
    return torch.load(path, map_location="cpu", weights_only=True)

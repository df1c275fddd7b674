"""Where the shard job's units of work run: this process, a local process pool, or Ray tasks.

Each unit is independent and idempotent, so executors only need to run ``fn(item)`` for every item and
report results as they finish; output order never depends on scheduling (the job orders by unit index).
A SLURM array splits the units into contiguous ranges, one per array task (:func:`task_range`).

    for item, result in run_units(fn, items, ExecutorConfig(processes=4)):
        ...
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    """local: a process pool on this machine; ray: Ray tasks on the connected (or a new local) cluster."""
    processes: int = 0
    """Local pool size (0: all cores of this machine/allocation; 1: run in this process)."""
    ray_cpus_per_task: float = 1.0
    """CPUs Ray reserves per shard task."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.processes < 0:
            raise ValueError(f"processes must be >= 0, got {self.processes}")
        if self.ray_cpus_per_task <= 0:
            raise ValueError(f"ray_cpus_per_task must be > 0, got {self.ray_cpus_per_task}")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def task_from_env(task_index: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
    """``(task_index, num_tasks)``: explicit values, else SLURM_ARRAY_TASK_ID/COUNT (ids may start at MIN)."""
    env = os.environ
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", "1") or 1)
    if task_index is None:
        task_id = env.get("SLURM_ARRAY_TASK_ID")
        task_index = int(task_id) - int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0) if task_id else 0
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is not in [0, num_tasks={num_tasks})")
    return task_index, num_tasks


def task_range(num_items: int, task_index: int, num_tasks: int) -> range:
    """The contiguous slice of ``num_items`` units that array task ``task_index`` of ``num_tasks`` owns."""
    return range(num_items * task_index // num_tasks, num_items * (task_index + 1) // num_tasks)


def run_units(fn: Callable[[T], R], items: Sequence[T], cfg: ExecutorConfig) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` as units finish. ``fn`` must be picklable and should not raise."""
    if not items:
        return
    if cfg.kind == "ray":
        from pipeline import ray_backend

        yield from ray_backend.map_tasks_as_completed(fn, items, num_cpus_per_task=cfg.ray_cpus_per_task)
        return
    processes = min(cfg.processes or available_cpus(), len(items))
    if processes <= 1:
        for item in items:
            yield item, fn(item)
        return
    # spawn: workers start clean (no inherited threads or locks from the driver).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        pending: dict[Any, T] = {}
        queue = list(reversed(items))
        while queue or pending:
            while queue and len(pending) < 2 * processes:
                item = queue.pop()
                pending[pool.submit(fn, item)] = item
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                yield item, future.result()

"""Launching work: the one sweep runner for fine-tuning, and the pretraining launches of a scaling grid.

Every caller of a fine-tune sweep goes through :func:`run_sweep` (plan -> run the pending trials with a
runner -> results table), so the sweep job, the pretrain -> fine-tune -> report DAG and the scaling report
drive a sweep the same way:

    from pipeline import orchestrate
    result = orchestrate.run_sweep(sweep_cfg, runner="ray")                     # jobs.finetune_sweep, jobs.pipeline
    result = orchestrate.run_sweep(sweep_cfg, runner=LocalRunner(parallel=2))  # no Ray: spawned processes
    launches = orchestrate.run_pretraining(scaling_cfg, points)   # jobs.scaling_report, jobs.reproduce
    finetune = orchestrate.run_finetuning(scaling_cfg, points)    # run_sweep over the finished points' exports

Runners: ``"ray"`` (:class:`RayRunner`: one Ray Tune experiment, each trial a Ray Train ``TorchTrainer`` of
``resources.workers_per_trial`` workers, retries and restore; see pipeline.ray_backend, the only module that
imports Ray) and ``"local"`` (:class:`LocalRunner`: trials in this process one after another, or ``parallel``
at a time in spawned processes). Whatever the runner, finished trials are never rerun, and the results table
(pipeline.finetune.sweep.write_results) is written at the end, also when trials failed.

Pretraining launches (:func:`run_pretraining`) run ``python -m jobs.pretrain`` per grid point of
pipeline.report.scaling (which only plans the grid and reads run directories) through ``pretrain.launcher``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline import io
from pipeline.config import ConfigError
from pipeline.finetune import sweep as sw
from pipeline.report.collect import POINT_FILE
from pipeline.report.scaling import ROOT, Point, ScalingConfig, point_done, source_overrides, sweep_config

Echo = Callable[..., None]
"""``echo(line)``: where progress lines go (``print`` by default; called with ``flush=True``)."""


# ----------------------------------------------------------------------------------------- runners


class Runner(Protocol):
    """Runs the pending trials of a sweep; returns ``{trial name: error}`` for those that failed."""

    def __call__(
        self, cfg: sw.SweepConfig, trials: Sequence[sw.Trial], pending: Sequence[sw.Trial], echo: Echo
    ) -> dict[str, str]: ...


@dataclass(frozen=True)
class RayRunner:
    """All trials as one Ray Tune experiment (restored when it ran before; finished trials return at once)."""

    def __call__(
        self, cfg: sw.SweepConfig, trials: Sequence[sw.Trial], pending: Sequence[sw.Trial], echo: Echo
    ) -> dict[str, str]:
        # Ray's log deduplication drops "words with digits" and then folds lines that look alike across
        # workers, i.e. every trial's progress line but the first; keep them all (read when Ray is imported).
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        from pipeline import ray_backend  # the one module that imports Ray

        # The whole trial list, not only the pending ones: the Tune experiment is named by its fingerprint.
        return ray_backend.run_tune_sweep(cfg, trials)


@dataclass(frozen=True)
class LocalRunner:
    """Trials on this machine without Ray: one after another in this process, or ``parallel`` at a time,
    each in a fresh spawned process. One process per trial (``resources.workers_per_trial`` must be 1)."""

    parallel: int = 1
    """Trials running at once (> 1: spawned worker processes)."""
    threads: int = 0
    """torch CPU threads per trial (0 = torch's default; 1 is faster on a crowded CPU)."""

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel: must be >= 1, got {self.parallel}")

    def __call__(
        self, cfg: sw.SweepConfig, trials: Sequence[sw.Trial], pending: Sequence[sw.Trial], echo: Echo
    ) -> dict[str, str]:
        if cfg.resources.workers_per_trial > 1:
            raise ConfigError(
                f"resources.workers_per_trial: {cfg.resources.workers_per_trial} workers per trial need the "
                "ray runner (a Ray Train worker group per trial); the local runner runs one process per trial"
            )
        if self.parallel > 1:
            return _run_in_processes(pending, self.parallel, self.threads, echo)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        errors: dict[str, str] = {}
        for k, trial in enumerate(pending):
            echo(f"[sweep] trial {k + 1}/{len(pending)} {trial.name}", flush=True)
            try:
                sw.run_trial(trial, out=lambda line: echo(line, flush=True))
            except Exception:  # one failed trial must not stop the others; it is listed as failed
                errors[trial.name] = traceback.format_exc()
                echo(
                    f"[sweep] {trial.name} failed: {errors[trial.name].strip().splitlines()[-1]}", flush=True
                )
        return errors


def _process_trial(trial: dict[str, Any], threads: int) -> str:
    """Run one trial in a worker process; returns "" or the formatted exception."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        sw.run_trial(trial, out=lambda line: print(line, flush=True))
    except Exception:
        return traceback.format_exc()
    return ""


def _run_in_processes(trials: Sequence[sw.Trial], workers: int, threads: int, echo: Echo) -> dict[str, str]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    errors: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")
    echo(f"[sweep] {len(trials)} trials, {workers} at a time in worker processes", flush=True)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_process_trial, t.to_dict(), threads): t for t in trials}
        for future, trial in futures.items():
            try:
                error = future.result()
            except Exception:  # the worker process died
                error = traceback.format_exc()
            if error:
                errors[trial.name] = error
                echo(f"[sweep] {trial.name} failed: {error.strip().splitlines()[-1]}", flush=True)
    return errors


RUNNERS: dict[str, Callable[[], Runner]] = {"ray": RayRunner, "local": LocalRunner}
"""Runners by name (``run_sweep(cfg, runner="local")``)."""


def get_runner(runner: str | Runner) -> Runner:
    if not isinstance(runner, str):
        return runner
    if runner not in RUNNERS:
        raise ConfigError(f"runner: unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    return RUNNERS[runner]()


# --------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    sweep_dir: str
    rows: list[dict[str, Any]]
    """The results table (pipeline.finetune.sweep.write_results), one row per trial."""
    errors: dict[str, str] = field(default_factory=dict)
    """trial name -> error, for trials that failed in this run."""
    done_before: int = 0
    """Trials that were complete before this run (not rerun)."""

    @property
    def complete(self) -> bool:
        return all(r["status"] == "complete" for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        """The fine-tuning record the scaling report reads (rows, errors, trials, done_before, sweep_dir)."""
        return {
            "rows": self.rows,
            "errors": self.errors,
            "trials": len(self.rows),
            "done_before": self.done_before,
            "sweep_dir": self.sweep_dir,
        }


def run_sweep(
    cfg: sw.SweepConfig, runner: str | Runner = "ray", *, run: bool = True, echo: Echo = print
) -> SweepResult:
    """Plan the sweep, run its unfinished trials with ``runner`` (``run=False``: none), write its results.

    The plan (sweep.toml, trials.json) and the results table (results.{parquet,csv,md}, best.json) go to the
    sweep directory; the runner is not even built when every trial is complete (so Ray is not started).
    """
    cfg = sw.resolve_paths(cfg)
    trials = sw.expand_trials(cfg)
    sw.write_plan(cfg, trials)
    pending = [t for t in trials if sw.trial_done(t) is None]
    done = len(trials) - len(pending)
    echo(
        f"[sweep] {cfg.name}: {len(trials)} trials, {done} already complete; results in {cfg.sweep_dir}",
        flush=True,
    )
    errors: dict[str, str] = {}
    if pending and run:
        errors = get_runner(runner)(cfg, trials, pending, echo)
    rows = sw.write_results(cfg, trials, errors)
    return SweepResult(cfg.sweep_dir, rows, errors, done)


# ------------------------------------------------------------------- scaling grid: pretraining launches


@dataclass
class Launch:
    point: str
    status: Literal["done-before", "complete", "failed", "preempted", "timeout", "skipped"]
    returncode: int | None = None
    seconds: float = 0.0
    log: str = ""
    detail: str = ""


def pretrain_command(cfg: ScalingConfig, point: Point) -> list[str]:
    """The launch command of one point (run from the repository root)."""
    launcher = list(cfg.pretrain.launcher) or [sys.executable]
    args = ["-m", "jobs.pretrain", f"--config={cfg.pretrain.config}"]
    args += [str(o) for o in cfg.pretrain.overrides]
    args += [str(o) for o in cfg.pretrain.model_overrides.get(point.model, [])]
    args += source_overrides(cfg, point.caption_source)
    args += [f"--run_dir={point.run_dir}", f"--model.name={point.model}"]
    args += [f"--data.seed={point.seed}", f"--model.seed={point.seed}"]
    if point.shards:  # a materialised subset: its own shard set, read whole
        args.append(f"--data.shards={point.shards}")
    else:
        if cfg.pretrain.shards:
            args.append(f"--data.shards={cfg.pretrain.shards}")
        if point.subset_uids:
            args.append(f"--data.subset_uids={point.subset_uids}")
    return launcher + args


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _launch_env(cfg: ScalingConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH", "")])])
    env.update({str(k): str(v) for k, v in cfg.pretrain.env.items()})
    return env


def _finish(point: Point, code: int | None, log: Path, seconds: float) -> Launch:
    if code is None:
        status = "timeout"
    elif code == 0 and point_done(point):
        status = "complete"
    elif code == 124:
        status = "preempted"
    else:
        status = "failed"
    return Launch(
        point.name, status, code, round(seconds, 1), str(log), "" if status == "complete" else _tail(log)
    )


def run_pretraining(cfg: ScalingConfig, points: list[Point], echo: Echo = print) -> list[Launch]:
    """Launch every unfinished point (``pretrain.parallel`` at a time); finished points are skipped.

    A launch past ``pretrain.timeout_s`` gets SIGTERM (the trainer checkpoints and exits 124), then SIGKILL
    after two minutes; it is reported as ``timeout`` and resumes on the next run.
    """
    results: dict[str, Launch] = {}
    queue: list[tuple[int, Point]] = []
    for i, point in enumerate(points):
        if point_done(point):
            results[point.name] = Launch(point.name, "done-before")
        elif not cfg.pretrain.run:
            results[point.name] = Launch(point.name, "skipped", detail="pretrain.run = false")
        elif point.subset_uids and point.subset_size is None:
            results[point.name] = Launch(
                point.name, "failed", detail=f"subset uid list {point.subset_uids} not readable"
            )
        else:
            queue.append((i, point))
    env = _launch_env(cfg)
    running: list[tuple[Point, subprocess.Popen, Any, float, Path, bool]] = []
    while queue or running:
        while queue and len(running) < cfg.pretrain.parallel:
            i, point = queue.pop(0)
            run_dir = Path(point.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            io.write_json(str(run_dir / POINT_FILE), point.labels())
            command = pretrain_command(cfg, point)
            log = run_dir / "logs" / "launch.out"
            log.parent.mkdir(parents=True, exist_ok=True)
            echo(
                f"[scaling] pretrain {i + 1}/{len(points)} {point.name}: {' '.join(command[1:4])} ...",
                flush=True,
            )
            out = open(log, "a")  # noqa: SIM115 - closed when the process ends
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running.append((point, proc, out, time.time(), log, False))
        time.sleep(0.5)
        still = []
        for point, proc, out, started, log, signalled in running:
            code = proc.poll()
            elapsed = time.time() - started
            if code is None:
                if cfg.pretrain.timeout_s and elapsed > cfg.pretrain.timeout_s and not signalled:
                    proc.terminate()  # the trainer checkpoints on SIGTERM and exits 124
                    signalled = True
                elif signalled and elapsed > cfg.pretrain.timeout_s + 120:
                    proc.kill()
                still.append((point, proc, out, started, log, signalled))
                continue
            out.close()
            launch = _finish(point, None if signalled else code, log, elapsed)
            results[point.name] = launch
            echo(f"[scaling] pretrain {point.name}: {launch.status} in {elapsed:.0f} s", flush=True)
        running = still
    return [results[p.name] for p in points]


# ------------------------------------------------------------------------ scaling grid: fine-tuning


def finetune_runner(cfg: ScalingConfig) -> Runner:
    """The runner named by ``finetune.runner`` with the grid's ``parallel`` / ``threads``."""
    ft = cfg.finetune
    return RayRunner() if ft.runner == "ray" else LocalRunner(parallel=ft.parallel, threads=ft.threads)


def run_finetuning(cfg: ScalingConfig, points: list[Point], echo: Echo = print) -> dict[str, Any]:
    """Run (or with ``finetune.run = false`` only collect) the one sweep over every finished point's export
    (plus random init); returns the record the report reads (:meth:`SweepResult.as_dict`)."""
    scfg = sweep_config(cfg, points)
    if scfg is None:
        return {"rows": [], "errors": {}, "trials": 0}
    result = run_sweep(scfg, finetune_runner(cfg), run=cfg.finetune.run, echo=echo)
    return result.as_dict()


__all__ = [
    "Launch",
    "LocalRunner",
    "RayRunner",
    "Runner",
    "SweepResult",
    "finetune_runner",
    "get_runner",
    "pretrain_command",
    "run_finetuning",
    "run_pretraining",
    "run_sweep",
]

"""Fine-tune sweeps without Ray: the sweep config, the expanded trials, one trial's run, the results table.

``pipeline.orchestrate.run_sweep`` (used by ``jobs.finetune_sweep``, ``jobs.pipeline`` and
``jobs.scaling_report``) hands the trials made here to a runner (:mod:`pipeline.ray_backend`: Ray Tune + Ray
Train, or local processes); everything in this module is plain Python and testable without Ray:

    cfg = load_config(SweepConfig, "jobs/configs/sweep/debug.toml", ["--sweep.segmentation.lr=[5e-4,2e-4]"])
    trials = expand_trials(cfg)                    # deterministic names, resolved stage configs
    summary = run_trial(trials[0])                 # what each Ray Train worker calls (idempotent, resumable)
    table = write_results(cfg, trials)             # results.parquet / .csv / .md + best.json in the sweep dir

Search space (``[sweep.<stage>]``, or ``[sweep.all]`` for every stage; stage tables win): a key is a dotted
stage-config key or a shorthand (``lr`` = ``optim.lr``, ``drop_path_rate`` = ``backbone.drop_path_rate``, see
:data:`SHORTHANDS`); a list is a grid axis (random search: a uniform choice), a scalar is fixed, and a table
``{loguniform = [lo, hi]}`` / ``{uniform = [lo, hi]}`` / ``{randint = [lo, hi]}`` / ``{choice = [...]}`` is
sampled (random search only). Grid search runs the cartesian product (times ``search.num_samples``, each
repeat with the next ``train.seed``); random search draws ``search.num_samples`` points per stage from
``search.seed``. ``checkpoints`` (label -> checkpoint) repeats everything once per pretrained checkpoint.

Trial identity: the name is ``[<point>-]<stage>-<swept key>=<value>...-<hash>`` where the hash covers the
stage's fully resolved config, so a trial is rerun only when its config changes. Each trial's run directory
(``<sweep dir>/trials/<name>/``) is an ordinary fine-tuning run directory (config.toml, metrics.jsonl,
checkpoints/, summary.json) plus ``attempts.jsonl`` (one line per time the stage was started, so retries and
restores are visible). A trial whose ``summary.json`` says ``complete`` is never run again.

Storage: ``storage`` may be a local folder or ``s3://bucket/prefix``. With S3, trials train in
``scratch_dir`` (on the worker's disk) and their small files (config.toml, metrics.jsonl, summary.json,
attempts.jsonl, logs/) are uploaded when the trial ends; the results table and Tune's state go to S3 directly.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import importlib.util
import io as _io
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import io
from pipeline.config import ConfigError, load_config, to_toml

SHORTHANDS: dict[str, str] = {
    "lr": "optim.lr",
    "layer_decay": "optim.layer_decay",
    "weight_decay": "optim.weight_decay",
    "drop_path_rate": "backbone.drop_path_rate",
    "drop_path": "backbone.drop_path_rate",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "warmup_steps": "schedule.warmup_steps",
}
"""Search-space shorthands for the stage-config keys every stage has."""

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
ALL = "all"
"""The ``[sweep.all]`` / ``[base.all]`` table applies to every stage."""
BASE_KEYS = ("preset", "config")
"""Keys of a ``[base.<stage>]`` table that are not stage-config values."""
IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of a ``ray job submit`` job."""


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SearchConfig:
    kind: Literal["grid", "random"] = "grid"
    """grid: every combination of the listed values; random: ``num_samples`` draws per stage."""
    num_samples: int = 1
    """Random search: points per stage. Grid search: repeats of the grid, repeat r with train.seed + r."""
    seed: int = 0
    """Seed of the random draws (the same seed gives the same trials)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")


@dataclass(frozen=True)
class ResourcesConfig:
    workers_per_trial: int = 1
    """Ray Train workers per trial: > 1 trains each trial data-parallel over its own process group (every
    registered stage can; a stage given as a module path declares ``DATA_PARALLEL = True``). The stage's
    ``train.batch_size`` is the global batch, so the loss curve does not depend on this number."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker reserves."""
    gpus_per_worker: float = 0.0
    """GPUs each Ray Train worker reserves (0 = CPU workers, e.g. on a laptop)."""
    driver_cpus: float = 0.01
    """CPUs reserved by each trial's Tune driver (it only launches and watches its Ray Train run)."""
    max_concurrent: int = 0
    """Trials running at once (0 = as many as the cluster's resources allow)."""

    def __post_init__(self) -> None:
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial: must be >= 1, got {self.workers_per_trial}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker / gpus_per_worker: must be >= 0")
        if self.driver_cpus <= 0:
            raise ValueError(
                f"driver_cpus: must be > 0 (Ray Tune needs a resource to place a trial), got {self.driver_cpus}"
            )
        if self.max_concurrent < 0:
            raise ValueError(f"max_concurrent: must be >= 0, got {self.max_concurrent}")


@dataclass(frozen=True)
class FailureConfig:
    max_failures: int = 2
    """Restarts of a trial's Ray Train workers after a worker dies or raises (the stage resumes from its
    newest checkpoint); -1 = unlimited."""
    max_trial_failures: int = 1
    """Re-launches of a trial's Tune driver when the driver itself fails (e.g. its node is lost)."""
    fault_injection: str = ""
    """Test knob: ``"<trial name substring>@<step>"`` makes that trial's worker SIGKILL itself once, right
    after optimizer step <step> (a marker file in the run directory keeps it to once). Empty = off."""

    def __post_init__(self) -> None:
        if self.max_failures < -1 or self.max_trial_failures < -1:
            raise ValueError("max_failures / max_trial_failures: must be >= -1")
        if self.fault_injection and not re.fullmatch(r".+@\d+", self.fault_injection):
            raise ValueError(
                f"fault_injection: expected '<trial substring>@<step>', got {self.fault_injection!r}"
            )


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    """Sweep name: the sweep directory is ``<storage>/<name>``."""
    storage: str = "runs/sweeps"
    """Where sweeps live: a local folder (absolute under ``ray job submit``) or ``s3://bucket/prefix``."""
    stages: tuple[str, ...] = ("segmentation", "depth")
    """Stages to sweep (names from pipeline.finetune.stages, or a module path with the stage contract)."""
    checkpoint: str = ""
    """Pretrained image tower / open_clip checkpoint for every stage (sets backbone.checkpoint); "" = each
    stage's own setting."""
    checkpoints: dict[str, Any] = field(default_factory=dict)
    """label -> checkpoint: run the whole sweep once per checkpoint (e.g. one per data-scale point)."""
    base: dict[str, Any] = field(default_factory=dict)
    """Per-stage base config: ``[base.<stage>]`` (or ``[base.all]``) with optional ``preset`` (a file in
    jobs/configs/finetune/<stage>/; default: the stage's code defaults, its debug size), ``config`` (a stage
    TOML file on top of it) and any stage keys (``train.steps = 40``)."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """Search space per stage: ``[sweep.<stage>]`` / ``[sweep.all]``, e.g. ``lr = [5e-4, 2e-4]`` (see the
    module docstring for distributions and shorthands)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Grid or random search."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Workers, CPUs and GPUs per trial, concurrency."""
    failure: FailureConfig = field(default_factory=FailureConfig)
    """Retries of failed trials."""
    scratch_dir: str = ""
    """Local folder for trial run directories when ``storage`` is remote ("" = the system temp dir)."""
    progress_every: int = 0
    """Print a progress line every this many steps of each trial (0 = at each of the stage's log steps)."""

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"name: letters, digits, '.', '_' and '-' only, got {self.name!r}")
        if not self.stages:
            raise ValueError("stages: name at least one stage")
        for stage in self.stages:
            _check_stage_name(stage)
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: listed twice in {list(self.stages)}")
        for table in ("base", "sweep"):
            for key, value in getattr(self, table).items():
                if key != ALL and key not in self.stages:
                    raise ValueError(f"{table}.{key}: not one of stages {list(self.stages)} (or {ALL!r})")
                if not isinstance(value, Mapping):
                    raise ValueError(f"{table}.{key}: expected a table of keys, got {value!r}")
        for label, path in self.checkpoints.items():
            if not re.fullmatch(r"[A-Za-z0-9._-]+", label):
                raise ValueError(f"checkpoints.{label}: labels use letters, digits, '.', '_' and '-' only")
            if not isinstance(path, str):
                raise ValueError(f"checkpoints.{label}: expected a path, got {path!r}")
        if self.checkpoint and self.checkpoints:
            raise ValueError("checkpoint / checkpoints: set one or the other")
        if self.progress_every < 0:
            raise ValueError(f"progress_every: must be >= 0, got {self.progress_every}")
        # Command-line overrides arrive as strings ("[5e-4,2e-4]"): read them as TOML would have typed them.
        object.__setattr__(self, "base", parse_value(self.base))
        object.__setattr__(self, "sweep", parse_value(self.sweep))

    @property
    def sweep_dir(self) -> str:
        return io.join(self.storage, self.name)


def _check_stage_name(stage: str) -> None:
    from pipeline.finetune.stages import STAGES

    if stage in STAGES:
        return
    try:
        found = importlib.util.find_spec(stage) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(
            f"stages: unknown stage {stage!r}; choose from {', '.join(STAGES)} or give an importable module "
            "with the stage contract (STAGE_CONFIG, presets, run_stage)"
        )


def is_data_parallel(stage: str, module: Any) -> bool:
    """Whether every worker of a trial trains the stage: the registered stages do (``stages.run_stage`` is
    data-parallel inside any process group); a stage given as a module path says so with ``DATA_PARALLEL``."""
    from pipeline.finetune.stages import STAGES

    return stage in STAGES or bool(getattr(module, "DATA_PARALLEL", False))


def load_stage_module(stage: str) -> Any:
    """The stage's module: a registered stage name or a dotted module path with the same contract."""
    from pipeline.finetune.stages import STAGES, load_stage

    return load_stage(stage) if stage in STAGES else importlib.import_module(stage)


def resolve_paths(cfg: SweepConfig, cwd: str | None = None) -> SweepConfig:
    """Make local ``storage``, ``scratch_dir`` and checkpoint paths absolute (relative to ``cwd``).

    Under ``ray job submit`` the driver's working directory is Ray's temporary copy of the code, so a
    relative storage path would put the results where nobody finds them: that raises ``ConfigError``.
    """
    cwd = cwd or os.getcwd()
    if io.is_local(cfg.storage) and not os.path.isabs(cfg.storage) and os.environ.get(IN_RAY_JOB_ENV):
        raise ConfigError(
            f"storage: {cfg.storage!r} is relative, and this is a `ray job submit` driver whose working directory is "
            "Ray's temporary copy of the code; give an absolute path on shared storage or an s3:// URL"
        )

    def absolute(path: str) -> str:
        return path if not path or not io.is_local(path) or os.path.isabs(path) else os.path.join(cwd, path)

    return dataclasses.replace(
        cfg,
        storage=absolute(cfg.storage),
        scratch_dir=absolute(cfg.scratch_dir),
        checkpoint=absolute(cfg.checkpoint),
        checkpoints={k: absolute(v) for k, v in cfg.checkpoints.items()},
    )


# ----------------------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: a stage, its resolved config and where it runs. Plain data (JSON-able)."""

    name: str
    stage: str
    point: str
    """Checkpoint label (``checkpoints``), or "" for a single-checkpoint sweep."""
    params: dict[str, Any]
    """The swept values by dotted stage key."""
    checkpoint: str
    """The pretrained weights the stage starts from ("" = the stage config's own)."""
    config_toml: str
    """The stage's fully resolved config."""
    config_hash: str
    run_dir: str
    """Where the stage writes (a local folder: the storage dir itself, or scratch for remote storage)."""
    storage_dir: str
    """Where the trial's record lives (== run_dir for local storage)."""
    fault_step: int = 0
    """Test knob: SIGKILL this trial's worker once after this step (0 = never)."""
    progress_every: int = 0
    data_parallel: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        return cls(**dict(data))


def parse_value(value: Any) -> Any:
    """A search-space value from TOML (already typed) or the command line (a string such as ``[5e-4,2e-4]``)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            import ast

            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if text.startswith("[") and text.endswith("]"):
                return [parse_value(v) for v in text[1:-1].split(",") if v.strip()]
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            return text
    if isinstance(value, Mapping):
        return {k: parse_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [parse_value(v) for v in value]
    return value


def _is_distribution(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def flatten_space(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys (distribution tables stay values); shorthands expanded."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        value = parse_value(value)
        if isinstance(value, Mapping) and not _is_distribution(value):
            out.update(flatten_space(value, full + "."))
        else:
            out[SHORTHANDS.get(full, full)] = value
    return out


def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = repr(list(value))
    else:
        text = str(value)
    return f"--{key}={text}"


def stage_config(stage: str, base: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    """The stage's config: code defaults < preset (jobs/configs/finetune/<stage>/<preset>.toml) < base config
    file < base keys < ``values`` (dotted keys)."""
    module = load_stage_module(stage)
    base = dict(base)
    preset = str(base.pop("preset", "")) or None
    config_file = str(base.pop("config", "")) or None
    fixed = flatten_space(base)
    overrides = [_override(k, v) for k, v in {**fixed, **values}.items()]
    try:
        return load_config(
            module.STAGE_CONFIG, config_file, overrides, job=f"finetune/{stage}", preset=preset
        )
    except ConfigError as e:
        raise ConfigError(f"stage {stage}: {e}") from None


def _merged(table: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """``table["all"]`` overlaid by ``table[stage]`` (both nested)."""
    from pipeline.config import _merge

    return _merge(dict(table.get(ALL, {})), dict(table.get(stage, {})))


def _sample(dist: Mapping[str, Any], rng: random.Random, key: str) -> Any:
    ((kind, arg),) = dist.items()
    if kind == "choice":
        if not isinstance(arg, (list, tuple)) or not arg:
            raise ConfigError(f"sweep {key}: choice needs a non-empty list")
        return rng.choice(list(arg))
    if not isinstance(arg, (list, tuple)) or len(arg) != 2:
        raise ConfigError(f"sweep {key}: {kind} needs [low, high]")
    lo, hi = arg
    if kind == "uniform":
        return rng.uniform(float(lo), float(hi))
    if kind == "loguniform":
        if lo <= 0 or hi <= 0:
            raise ConfigError(f"sweep {key}: loguniform bounds must be > 0")
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(int(lo), int(hi))


def space_points(space: Mapping[str, Any], search: SearchConfig, stage: str) -> list[dict[str, Any]]:
    """The swept values of each trial of one stage (dotted keys), in a deterministic order."""
    keys = sorted(space)
    if search.kind == "grid":
        for key in keys:
            if _is_distribution(space[key]):
                raise ConfigError(f'sweep.{stage}.{key}: distributions need search.kind = "random"')
        axes = [space[k] if isinstance(space[k], list) else [space[k]] for k in keys]
        for key, axis in zip(keys, axes):
            if not axis:
                raise ConfigError(f"sweep.{stage}.{key}: empty list")
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*axes)]
        return [dict(p) | ({"_repeat": r} if r else {}) for r in range(search.num_samples) for p in grid]
    rng = random.Random(f"{search.seed}:{stage}")
    points = []
    for _ in range(search.num_samples):
        point = {}
        for key in keys:
            value = space[key]
            if _is_distribution(value):
                point[key] = _sample(value, rng, key)
            elif isinstance(value, list):
                if not value:
                    raise ConfigError(f"sweep.{stage}.{key}: empty list")
                point[key] = rng.choice(value)
            else:
                point[key] = value
        points.append(point)
    return points


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = "_".join(_format_value(v) for v in value)
    else:
        text = str(value)
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")
    return text[:24] or "_"


def trial_name(stage: str, point: str, params: Mapping[str, Any], config_hash: str) -> str:
    """``[point-]stage-key=value-...-hash``; keys by their last dotted part unless two share it."""
    keys = sorted(params)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    parts = [point] if point else []
    parts.append(stage.rsplit(".", 1)[-1])
    for key, leaf in zip(keys, leaves):
        label = leaf if leaves.count(leaf) == 1 else key.replace(".", "_")
        parts.append(f"{label}={_format_value(params[key])}")
    parts.append(config_hash[:8])
    return "-".join(parts)


def _fault(cfg: FailureConfig, name: str) -> int:
    if not cfg.fault_injection:
        return 0
    needle, step = cfg.fault_injection.rsplit("@", 1)
    return int(step) if needle in name else 0


def expand_trials(cfg: SweepConfig) -> list[Trial]:
    """Every trial of the sweep, in a deterministic order (point, stage, search order)."""
    points = dict(cfg.checkpoints) or {"": cfg.checkpoint}
    trials: list[Trial] = []
    scratch = cfg.scratch_dir or os.path.join(tempfile.gettempdir(), "pipeline-sweeps")
    for point, checkpoint in points.items():
        for stage in cfg.stages:
            module = load_stage_module(stage)
            space = flatten_space(_merged(cfg.sweep, stage))
            base = _merged(cfg.base, stage)
            for values in space_points(space, cfg.search, stage):
                params = dict(values)
                repeat = params.pop("_repeat", 0)
                fixed = {"backbone.checkpoint": checkpoint} if checkpoint else {}
                if repeat:
                    seed = stage_config(stage, base, {**fixed, **params}).train.seed
                    params["train.seed"] = seed + repeat
                stage_cfg = stage_config(stage, base, {**fixed, **params})
                text = to_toml(stage_cfg)
                digest = hashlib.sha1(f"{stage}\n{text}".encode()).hexdigest()
                name = trial_name(stage, point, params, digest)
                storage_dir = io.join(cfg.sweep_dir, "trials", name)
                run_dir = storage_dir if io.is_local(storage_dir) else os.path.join(scratch, cfg.name, name)
                trials.append(
                    Trial(
                        name=name,
                        stage=stage,
                        point=point,
                        params=params,
                        checkpoint=str(getattr(getattr(stage_cfg, "backbone", None), "checkpoint", "") or ""),
                        config_toml=text,
                        config_hash=digest,
                        run_dir=run_dir,
                        storage_dir=storage_dir,
                        fault_step=_fault(cfg.failure, name),
                        progress_every=cfg.progress_every,
                        data_parallel=is_data_parallel(stage, module),
                    )
                )
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"sweep: two trials have the same config ({dupes[0]}); remove the duplicate values")
    if cfg.resources.workers_per_trial > 1:
        serial = sorted({t.stage for t in trials if not t.data_parallel})
        if serial:
            raise ConfigError(
                f"resources.workers_per_trial: stage(s) {', '.join(serial)} train in one process; "
                "use workers_per_trial = 1 (and more concurrent trials) for them"
            )
    return trials


# ------------------------------------------------------------------------------------- one trial


def read_summary(trial: Trial) -> dict[str, Any] | None:
    url = io.join(trial.storage_dir, "summary.json")
    try:
        return io.read_json(url) if io.exists(url) else None
    except (OSError, ValueError):
        return None


def trial_done(trial: Trial) -> dict[str, Any] | None:
    """The trial's summary when it finished before (it is then never run again), else None."""
    summary = read_summary(trial)
    return summary if summary is not None and summary.get("status") == "complete" else None


def read_attempts(trial: Trial) -> list[dict[str, Any]]:
    url = io.join(trial.storage_dir, "attempts.jsonl")
    if not io.exists(url):
        return []
    fs, path = io.filesystem(url)
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _latest_step(run_dir: str) -> int:
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip())
    except (OSError, ValueError):
        return 0


def _record_attempt(trial: Trial, world_size: int) -> dict[str, Any]:
    path = Path(trial.run_dir) / "attempts.jsonl"
    previous = len(path.read_text().splitlines()) if path.exists() else 0
    row = {
        "attempt": previous + 1,
        "time": round(time.time(), 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_step": _latest_step(trial.run_dir),
        "world_size": world_size,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # append-only log: one writer (rank 0) at a time per trial
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


class TrialWatch:
    """Given to the stage as its ``preemption`` flag, which ``fit`` polls once after every optimizer step.

    It prints a progress line a person can follow in ``ray job logs`` (trial name, step / total, loss, speed),
    and runs the ``fault_injection`` test knob. It never asks the stage to stop.
    """

    def __init__(
        self, trial: Trial, total_steps: int, log_every: int, out: Callable[[str], None] = print
    ) -> None:
        self.trial = trial
        self.total = total_steps
        self.every = trial.progress_every or max(1, log_every)
        self.step = _latest_step(trial.run_dir)
        self.out = out
        self.started = time.time()
        self.start_step = self.step

    def _last_loss(self) -> str:
        path = Path(self.trial.run_dir) / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                offset = max(0, path.stat().st_size - 4096)
                f.seek(offset)
                lines = f.read().decode(errors="ignore").splitlines()[1 if offset else 0 :]  # skip a cut line
                rows = [json.loads(x) for x in lines if x.strip()]
        except (OSError, ValueError):
            return ""
        for row in reversed(rows):
            if row.get("step") == self.step and "loss" in row:
                return f" loss={row['loss']:.4g}"
        return ""

    def is_set(self) -> bool:
        self.step += 1
        if self.step % self.every == 0 or self.step == self.total:
            rate = (self.step - self.start_step) / max(1e-9, time.time() - self.started)
            self.out(
                f"[trial {self.trial.name}] step {self.step}/{self.total}{self._last_loss()} ({rate:.2f} steps/s)"
            )
        if self.trial.fault_step and self.step == self.trial.fault_step:
            marker = Path(self.trial.run_dir) / ".fault_injected"
            if not marker.exists():
                marker.write_text(f"{time.time()}\n")
                self.out(
                    f"[trial {self.trial.name}] fault injection: killing this worker (pid {os.getpid()}) at step {self.step}"
                )
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return False


def _upload(trial: Trial) -> None:
    """Copy the trial's record (not its checkpoints) from the local run dir to remote storage."""
    root = Path(trial.run_dir)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] == "checkpoints" or path.name.startswith("."):
            continue
        with io.atomic_write(io.join(trial.storage_dir, *rel.parts), "wb") as f:
            f.write(path.read_bytes())


def run_trial(
    trial: Trial | Mapping[str, Any], rank: int = 0, world_size: int = 1, out: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run one trial's stage (resuming its run directory) and return its summary; a finished one returns at once.

    Under Ray Train every worker of the trial calls this, inside the worker group's process group (gloo on
    CPU, NCCL on GPU, set up by ``TorchTrainer``): a data-parallel stage runs on every rank (rank 0 records
    the attempt, prints progress and uploads), a stage that trains in one process runs on rank 0 only.
    """
    from pipeline.finetune.stages import STAGES, run_stage

    trial = trial if isinstance(trial, Trial) else Trial.from_dict(trial)
    done = trial_done(trial)
    if done is not None:
        if rank == 0:
            out(
                f"[trial {trial.name}] already complete: {done.get('primary_metric')} = {done.get('primary_value')}"
            )
        return done
    if rank != 0 and not trial.data_parallel:
        return {}
    module = load_stage_module(trial.stage)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stage.toml")
        Path(path).write_text(trial.config_toml)
        stage_cfg = load_config(module.STAGE_CONFIG, path)
    Path(trial.run_dir).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        attempt = _record_attempt(trial, world_size)
        where = f"resuming at step {attempt['start_step']}" if attempt["start_step"] else "from step 0"
        params = ", ".join(f"{k}={v}" for k, v in sorted(trial.params.items()))
        out(
            f"[trial {trial.name}] start attempt {attempt['attempt']} ({where}); {params}; run dir {trial.run_dir}"
        )
    # Progress lines and the fault knob on rank 0 only (a killed rank 0 restarts the whole worker group).
    watched = trial if rank == 0 else dataclasses.replace(trial, fault_step=0)
    watch = TrialWatch(
        watched, stage_cfg.train.steps, stage_cfg.train.log_every, out if rank == 0 else _quiet
    )
    started = time.time()
    if trial.stage in STAGES:  # data-parallel over the worker group's process group, when there is one
        summary = run_stage(trial.stage, stage_cfg, trial.run_dir, preemption=watch)
    else:
        summary = module.run_stage(stage_cfg, trial.run_dir, preemption=watch)
    if rank == 0:
        if not io.is_local(trial.storage_dir):
            _upload(trial)
        out(
            f"[trial {trial.name}] done in {time.time() - started:.1f} s: "
            f"{summary.get('primary_metric')} = {summary.get('primary_value')}"
        )
    return summary


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------ results table


def _flat_metric(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def trial_row(trial: Trial, status: str | None = None, error: str = "") -> dict[str, Any]:
    """One row of the results table (status: complete / failed / pending)."""
    summary = read_summary(trial) or {}
    attempts = read_attempts(trial)
    complete = summary.get("status") == "complete"
    row: dict[str, Any] = {
        "trial": trial.name,
        "stage": trial.stage,
        "point": trial.point,
        "checkpoint": trial.checkpoint,
        "status": "complete" if complete else (status or "pending"),
        "primary_metric": summary.get("primary_metric", ""),
        "primary_value": _flat_metric(summary.get("primary_value")),
        "higher_is_better": bool(summary.get("higher_is_better", True)),
        "steps": summary.get("steps"),
        "train_flops": _flat_metric(summary.get("train_flops")),
        "attempts": len(attempts),
        "error": "" if complete else error,
        "config_hash": trial.config_hash[:8],
        "run_dir": trial.storage_dir,
        "params": json.dumps(trial.params, sort_keys=True),
    }
    for key, value in sorted(trial.params.items()):
        row[f"param.{key}"] = value
    for key, value in sorted((summary.get("metrics") or {}).items()):
        if _flat_metric(value) is not None:
            row[f"metric.{key}"] = _flat_metric(value)
    return row


def mark_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``best`` on the best complete trial of each (point, stage) by its primary metric."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        row["best"] = False
        if row["status"] == "complete" and row["primary_value"] is not None:
            groups.setdefault((row["point"], row["stage"]), []).append(row)
    for members in groups.values():
        sign = 1.0 if members[0]["higher_is_better"] else -1.0
        members.sort(key=lambda r: r["trial"])  # ties go to the first name
        max(members, key=lambda r: sign * r["primary_value"]).update(best=True)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = [
        "trial",
        "stage",
        "point",
        "status",
        "best",
        "primary_metric",
        "primary_value",
        "higher_is_better",
    ]
    rest = sorted({k for r in rows for k in r} - set(first))
    ordered = [k for k in rest if k.startswith("param.")] + [k for k in rest if k.startswith("metric.")]
    return first + ordered + [k for k in rest if k not in ordered]


def _normalise(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list[Any]]:
    """Column-wise values with one type per column (numbers, else strings) so parquet and CSV agree."""
    table: dict[str, list[Any]] = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            table[col] = values
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            table[col] = [float(v) if v is not None else None for v in values]
        else:
            table[col] = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values]
    return table


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def best_markdown(rows: list[dict[str, Any]]) -> str:
    """The "best per stage" section of the summary (also printed at the end of a sweep)."""
    done = sum(r["status"] == "complete" for r in rows)
    lines = [
        f"{len(rows)} trials: {done} complete, {len(rows) - done} not complete.",
        "",
        "## Best per stage",
        "",
    ]
    lines += ["| point | stage | metric | value | trial |", "|---|---|---|---|---|"]
    for row in rows:
        if row.get("best"):
            arrow = "higher is better" if row["higher_is_better"] else "lower is better"
            lines.append(
                f"| {row['point'] or '-'} | {row['stage']} | {row['primary_metric']} ({arrow}) | "
                f"{_fmt(row['primary_value'])} | `{row['trial']}` |"
            )
    return "\n".join(lines)


def markdown_summary(name: str, rows: list[dict[str, Any]]) -> str:
    """Best trial per stage, then every trial with its swept values and metric, grouped by stage."""
    lines = [f"# Sweep `{name}`", "", best_markdown(rows)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["point"], row["stage"]), []).append(row)
    for (point, stage), members in groups.items():
        params = sorted({k for r in members for k in r if k.startswith("param.")})
        metrics = sorted({k for r in members for k in r if k.startswith("metric.")})
        title = f"{point} / {stage}" if point else stage
        lines += ["", f"## {title}", ""]
        header = [
            "trial",
            "status",
            *[p[6:] for p in params],
            "primary",
            *[m[7:] for m in metrics],
            "attempts",
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in members:
            cells = [f"`{r['trial']}`" + (" **best**" if r.get("best") else ""), r["status"]]
            cells += [_fmt(r.get(p)) for p in params]
            cells += [_fmt(r["primary_value"])] + [_fmt(r.get(m)) for m in metrics] + [str(r["attempts"])]
            lines.append("| " + " | ".join(cells) + " |")
        errors = [r for r in members if r.get("error")]
        for r in errors:
            lines.append(f"\n`{r['trial']}` failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
    lines += [
        "",
        "Each trial's full config: `<run_dir>/config.toml`; per-step metrics: `<run_dir>/metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def write_results(
    cfg: SweepConfig, trials: Sequence[Trial], errors: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Collect every trial's summary.json into results.{parquet,csv,md} and best.json in the sweep dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    errors = dict(errors or {})
    rows = mark_best(
        [trial_row(t, "failed" if t.name in errors else None, errors.get(t.name, "")) for t in trials]
    )
    columns = _columns(rows)
    table = _normalise(rows, columns)
    buffer = _io.BytesIO()
    pq.write_table(pa.table(table), buffer)
    with io.atomic_write(io.join(cfg.sweep_dir, "results.parquet"), "wb") as f:
        f.write(buffer.getvalue())
    text = _io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for i in range(len(rows)):
        writer.writerow(["" if table[c][i] is None else table[c][i] for c in columns])
    io.write_text(io.join(cfg.sweep_dir, "results.csv"), text.getvalue())
    io.write_text(io.join(cfg.sweep_dir, "results.md"), markdown_summary(cfg.name, rows))
    best = {f"{r['point']}/{r['stage']}" if r["point"] else r["stage"]: r for r in rows if r.get("best")}
    io.write_json(io.join(cfg.sweep_dir, "best.json"), best)
    return rows


def read_results(sweep_dir: str) -> list[dict[str, Any]]:
    """The rows of a sweep's results.parquet (as dicts)."""
    import pyarrow.parquet as pq

    fs, path = io.filesystem(io.join(sweep_dir, "results.parquet"))
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def write_plan(cfg: SweepConfig, trials: Sequence[Trial]) -> None:
    """The resolved sweep config and its trial list, for the record (and to notice a changed sweep)."""
    io.write_text(io.join(cfg.sweep_dir, "sweep.toml"), to_toml(cfg))
    io.write_json(io.join(cfg.sweep_dir, "trials.json"), [t.to_dict() for t in trials])


def sweep_fingerprint(trials: Sequence[Trial]) -> str:
    """Short hash of the trial list: the Tune experiment is restored only for the same list of trials."""
    return hashlib.sha1("\n".join(t.name for t in trials).encode()).hexdigest()[:10]

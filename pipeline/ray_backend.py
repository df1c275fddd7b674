"""The one module that imports Ray: the rest of the project sees plain functions.

Connection: if Ray is already initialised (e.g. inside ``ray job submit``), it is used as is; otherwise
``ray.init`` connects to ``RAY_ADDRESS`` when set, or starts a local instance. Workers get this project on
their ``PYTHONPATH`` (for clusters whose nodes do not share this checkout, submit with
``ray job submit --working-dir .``).

    from pipeline import ray_backend
    results = ray_backend.map_tasks(process_shard, shards, num_cpus_per_task=1)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray

T = TypeVar("T")
R = TypeVar("R")

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def ensure_initialized(num_cpus: int | None = None) -> None:
    """Connect to (or start) a Ray cluster unless this process is already connected."""
    if ray.is_initialized():
        return
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)  # no cluster named: start a local one
    ray.init(**kwargs)  # reads RAY_ADDRESS itself when set


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def map_tasks_as_completed(
    fn: Callable[[T], R],
    items: Sequence[T],
    num_cpus_per_task: float = 1.0,
    max_retries: int = 3,
) -> Iterator[tuple[T, R]]:
    """Run ``fn(item)`` as one Ray task per item; yield ``(item, result)`` in completion order.

    ``max_retries`` re-runs a task whose worker died (``fn`` should be idempotent). An exception raised by
    ``fn`` is re-raised here.
    """
    ensure_initialized()
    remote = ray.remote(num_cpus=num_cpus_per_task, max_retries=max_retries)(_call)
    fn_ref = ray.put(fn)
    refs = {remote.remote(fn_ref, item): item for item in items}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            yield refs[ref], ray.get(ref)


def map_tasks(
    fn: Callable[[T], R], items: Sequence[T], num_cpus_per_task: float = 1.0, max_retries: int = 3
) -> list[R]:
    """``[fn(item) for item in items]`` as Ray tasks, results in input order."""
    out: list[Any] = [None] * len(items)
    indexed = list(enumerate(items))
    for (i, _), result in map_tasks_as_completed(_Indexed(fn), indexed, num_cpus_per_task, max_retries):
        out[i] = result
    return out


class _Indexed:
    """``fn`` applied to the item of an ``(index, item)`` pair (picklable, unlike a lambda)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, pair: tuple[int, Any]) -> Any:
        return self.fn(pair[1])


# ----------------------------------------------------------------------------------- Ray Data actor pool


class _ActorCall:
    """A Ray Data actor: builds ``factory()`` once (e.g. loads a model onto its GPU), then maps items."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]]) -> None:
        self.fn = factory()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import pickle

        import numpy as np

        results = [pickle.dumps(self.fn(pickle.loads(item))) for item in batch["item"]]
        out = np.empty(len(results), dtype=object)
        out[:] = results
        return {"index": batch["index"], "result": out}


def map_actor_pool(
    factory: Callable[[], Callable[[T], R]],
    items: Sequence[T],
    min_actors: int = 1,
    max_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
) -> list[R]:
    """``[fn(item) for item in items]`` on a Ray Data actor pool, results in input order.

    Each actor calls ``factory()`` once to build ``fn`` (a model stays loaded across items) and reserves
    ``num_gpus_per_actor`` GPUs; the pool autoscales between ``min_actors`` and ``max_actors``. Items and
    results are pickled, one item per call.
    """
    import pickle

    import ray.data

    if not items:
        return []
    ensure_initialized()
    rows = [{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    mapped = ds.map_batches(
        _ActorCall,
        fn_constructor_args=(factory,),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_gpus=num_gpus_per_actor or None,
        num_cpus=num_cpus_per_actor,
    )
    out: list[Any] = [None] * len(items)
    for row in mapped.iter_rows():
        out[int(row["index"])] = pickle.loads(row["result"])
    return out


# -------------------------------------------------------------- fine-tune sweeps: Ray Tune + Ray Train
#
# One Tune trial per sweep trial (pipeline.finetune.sweep.Trial). Ray Train V2 (the default in Ray 2.60)
# runs a TorchTrainer launched from inside a Tune function trainable: the trial's Tune function is a light
# driver (``resources.driver_cpus``) that starts a TorchTrainer with ``workers_per_trial`` workers of
# ``cpus_per_worker`` CPUs / ``gpus_per_worker`` GPUs; each worker calls ``sweep.run_trial``. A dead or failing
# worker is restarted by Ray Train (``failure.max_failures``; the stage resumes from its newest checkpoint);
# a failing Tune driver is re-launched by Tune (``failure.max_trial_failures``). The Tune experiment lives in
# ``<sweep dir>/tune-<fingerprint of the trial list>`` and is restored (``Tuner.restore``) when the same sweep
# runs again; trials whose summary.json is complete return at once without starting Ray Train.


def init_for_sweeps(num_cpus: int | None = None) -> None:
    """Like :func:`ensure_initialized`, but worker output reaches the driver (so ``ray job logs`` shows it).

    Inside ``ray job submit`` the job's own runtime environment (its uploaded working dir) is used as is.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        ray.init()
        return
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)


def _sweep_train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: run (or resume, or skip) the trial's stage."""
    import ray.train

    from pipeline.finetune.sweep import run_trial

    ctx = ray.train.get_context()
    run_trial(
        loop_config["trial"], rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), out=_stdout_line
    )


def _stdout_line(text: str) -> None:
    """One progress line to stdout (Ray Train's patched ``print`` would log it twice)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _tune_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    value = summary.get("primary_value")
    out: dict[str, Any] = {"primary_metric": summary.get("primary_metric"), "primary_value": value}
    if isinstance(value, (int, float)):
        out["score"] = value if summary.get("higher_is_better", True) else -value
    return out


def _storage_for_ray(url: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Tune / Train; S3 endpoint from ``S3_ENDPOINT_URL``."""
    if url.startswith("s3://"):
        endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            import pyarrow.fs

            scheme = "https" if endpoint.startswith("https") else "http"
            host = endpoint.split("://", 1)[-1].rstrip("/")
            fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme)
            return url[len("s3://") :], fs
    return url, None


def _sweep_trial_driver(config: dict[str, Any], trials: dict[str, Any], options: dict[str, Any]) -> None:
    """The Tune function of one trial: skip it if finished, else run it as a Ray Train TorchTrainer."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer

    from pipeline.finetune.sweep import Trial, trial_done

    trial = Trial.from_dict(trials[config["trial"]])
    summary = trial_done(trial)
    if summary is not None:
        print(
            f"[sweep] {trial.name}: already complete ({summary.get('primary_metric')} = "
            f"{summary.get('primary_value')}); not rerun",
            flush=True,
        )
    else:
        workers, cpus, gpus = (
            options["workers_per_trial"],
            options["cpus_per_worker"],
            options["gpus_per_worker"],
        )
        print(
            f"[sweep] {trial.name}: starting Ray Train with {workers} worker(s) x ({cpus} CPU, {gpus} GPU)",
            flush=True,
        )
        resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
        storage_path, storage_fs = _storage_for_ray(options["train_storage"])
        trainer = TorchTrainer(
            _sweep_train_worker,
            train_loop_config={"trial": trial.to_dict()},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=trial.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=options["max_failures"]),
            ),
        )
        trainer.fit()
        summary = trial_done(trial)
        if summary is None:
            raise RuntimeError(f"trial {trial.name}: training ended without a complete summary.json")
        print(
            f"[sweep] {trial.name}: complete ({summary.get('primary_metric')} = {summary.get('primary_value')})",
            flush=True,
        )
    ray.tune.report(_tune_metrics(summary))


def _tune_trial_name(trial: Any) -> str:
    return str(trial.config["trial"])


def run_tune_sweep(cfg: Any, trials: Sequence[Any]) -> dict[str, str]:
    """Run ``trials`` (``sweep.Trial``) of sweep config ``cfg`` as one Ray Tune experiment, restoring it if it
    ran before. Returns ``{trial name: error}`` for trials that still failed after their retries."""
    import ray.tune as tune

    from pipeline import io
    from pipeline.finetune.sweep import sweep_fingerprint

    init_for_sweeps()
    res, fail = cfg.resources, cfg.failure
    options = {
        "workers_per_trial": res.workers_per_trial,
        "cpus_per_worker": res.cpus_per_worker,
        "gpus_per_worker": res.gpus_per_worker,
        "max_failures": fail.max_failures,
        "train_storage": io.join(cfg.sweep_dir, "ray_train"),
    }
    by_name = {t.name: t.to_dict() for t in trials}
    trainable = tune.with_resources(
        tune.with_parameters(_sweep_trial_driver, trials=by_name, options=options), {"cpu": res.driver_cpus}
    )
    experiment = f"tune-{sweep_fingerprint(trials)}"
    storage_path, storage_fs = _storage_for_ray(cfg.sweep_dir)
    path = io.join(cfg.sweep_dir, experiment) if storage_fs is None else f"{storage_path}/{experiment}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        print(f"[sweep] restoring the Tune experiment in {path}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, restart_errored=True, storage_filesystem=storage_fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(by_name))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=res.max_concurrent or None,
                trial_name_creator=_tune_trial_name,
                trial_dirname_creator=_tune_trial_name,
            ),
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=fail.max_trial_failures),
            ),
        )
    grid = tuner.fit()
    errors: dict[str, str] = {}
    for result in grid:
        if result.error is not None:
            errors[str(result.config.get("trial"))] = f"{type(result.error).__name__}: {result.error}"
    return errors

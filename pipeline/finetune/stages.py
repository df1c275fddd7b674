"""The fine-tuning stages by name, and the one entry point that runs any of them on 1 or N processes.

    summary = run_stage("segmentation", cfg, "runs/seg")                    # one process
    summary = run_stage("segmentation", cfg, run_dir, world=WorldInfo(...))  # a rank of a data-parallel run

:func:`run_stage` works inside any initialised process group (torchrun, srun, a Ray Train worker with
``num_workers > 1``): every rank calls it with the same ``cfg`` and ``run_dir``; each trains on its share of
the global batch (``train.batch_size``), rank 0 writes the run directory, every rank returns the summary. With
``world`` (a :class:`pipeline.dist.WorldInfo` of more than one rank) and no process group yet, it initialises
one (``pipeline.dist.init_distributed``, env:// rendezvous) and leaves it up for the caller to close.

Each stage module has ``STAGE_CONFIG`` (its frozen config class, whose defaults are the debug size) and
``run_stage(cfg, run_dir, preemption=None) -> summary dict``; its presets are the TOML files in
``jobs/configs/finetune/<stage>/`` (``--preset NAME``, see ``pipeline.config``). Modules are
imported on demand, so listing stages costs nothing (a Ray Tune driver can use this too).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.dist import WorldInfo, init_distributed

STAGES: dict[str, str] = {
    "classification": "pipeline.finetune.classification",
    "detection": "pipeline.finetune.detection",
    "segmentation": "pipeline.finetune.segmentation",
    "depth": "pipeline.finetune.depth",
    "region": "pipeline.finetune.region",
    "denseclip": "pipeline.finetune.denseclip",
}


def load_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"stage: unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def run_stage(
    stage: str,
    cfg: Any = None,
    run_dir: str | Path = "runs/finetune",
    world: WorldInfo | None = None,
    preemption: Any = None,
) -> dict[str, Any]:
    """Run fine-tuning stage ``stage`` with ``cfg`` (its ``STAGE_CONFIG``; None = the defaults) in ``run_dir``;
    data-parallel over the initialised process group (or the one ``world`` asks for). Returns summary.json."""
    module = load_stage(stage)
    if cfg is None:
        cfg = module.STAGE_CONFIG()
    elif not isinstance(cfg, module.STAGE_CONFIG):
        raise ValueError(
            f"cfg: expected {module.STAGE_CONFIG.__name__} for stage {stage!r}, got {type(cfg).__name__}"
        )
    if world is not None and world.world_size > 1:
        init_distributed(world)
    return module.run_stage(cfg, run_dir, preemption=preemption)

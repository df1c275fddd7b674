"""The fine-tuning stages by name: ``load_stage("segmentation")`` -> its module.

Each stage module has ``STAGE_CONFIG`` (its frozen config class, whose defaults are the debug size) and
``run_stage(cfg, run_dir, preemption=None) -> summary dict``; its presets are the TOML files in
``jobs/configs/finetune/<stage>/`` (``--preset NAME``, see ``pipeline.config``). Modules are
imported on demand, so listing stages costs nothing (a Ray Tune driver can use this too).
"""

from __future__ import annotations

import importlib
from types import ModuleType

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

"""Fake-but-realistic run directories for the report tests, written through ``RunDir`` with the real config
classes (so key names cannot drift from the trainer's and the stages'), plus a real open_clip export of a
randomly initialised ``debug`` model for the attention analysis.

Metrics follow known curves so tests can check what the report recovers:
``metric = base + slope * log10(subset size) + gain[source] + noise(seed)``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import load_config
from pipeline.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1000, 4000, 16000)
SOURCES = {"web": (1.0, 0.0), "web+syn": (1.0, 1.0)}
SEG_GAIN = {"web": 0.0, "web+syn": 2.0}
"""mIoU points added by each caption source."""
SEG_SLOPE = 3.0
DEPTH_GAIN = {"web": 0.0, "web+syn": -0.05}
DEPTH_SLOPE = -0.1


def seg_miou(size: int, source: str, seed: int) -> float:
    return 30.0 + SEG_SLOPE * math.log10(size) + SEG_GAIN[source] + 0.3 * math.sin(7 * seed + size % 97)


def depth_rmse(size: int, source: str, seed: int) -> float:
    return 2.0 + DEPTH_SLOPE * math.log10(size) + DEPTH_GAIN[source] + 0.01 * math.cos(5 * seed + size % 89)


def write_uid_list(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"train-s0-{i:08d}\n" for i in range(n)))
    return path


def make_export(out_dir: Path) -> Path:
    """A real open_clip export (random debug weights) as the trainer writes it."""
    from pipeline.model.clip import ModelConfig, build_clip
    from pipeline.train.export import export_open_clip

    cfg = ModelConfig(name="debug", seed=1)
    model, preprocess, _ = build_clip(cfg)
    return export_open_clip(
        model.state_dict(), cfg, preprocess, out_dir, info={"step": 10, "weights_kind": "ema"}
    )


def write_pretrain_run(
    path: Path,
    source: str,
    subset_uids: Path | None,
    seed: int,
    steps: int = 20,
    export: Path | None = None,
    with_point: bool = True,
    size: int | None = None,
) -> RunDir:
    from pipeline.train.trainer import TrainConfig

    w_real, w_syn = SOURCES[source]
    cfg = load_config(
        TrainConfig,
        ROOT / "jobs/configs/pretrain/debug.toml",
        [
            f"--run_dir={path}",
            f"--steps={steps}",
            f"--loss.w_real={w_real}",
            f"--loss.w_syn={w_syn}",
            f"--data.subset_uids={subset_uids or ''}",
            f"--data.seed={seed}",
        ],
    )
    run = RunDir(path)
    run.write_config(cfg)
    for step in range(1, steps + 1):
        run.log({"loss": 4.0 * 0.9**step + (0.5 if source == "web" else 0.1), "lr": 1e-3}, step)
    if with_point:
        from pipeline.io import write_json

        write_json(
            str(path / "point.json"),
            {
                "name": path.name,
                "model": "debug",
                "caption_source": source,
                "subset": subset_uids.stem if subset_uids else "all",
                "subset_size": size,
                "seed": seed,
            },
        )
    exports = {}
    if export is not None:
        exports = {"ema": str(export), "final": str(export)}
    run.write_summary(
        {
            "step": steps,
            "world_size": 1,
            "global_batch": cfg.global_batch,
            "accumulation_steps": 2,
            "flops_per_sample": 3 * 44_000_000,
            "params": 3_439_169,
            "params_visual": 200_000,
            "params_text": 3_239_169,
            "first_loss": 4.1,
            "final_loss": 0.5 if source == "web" else 0.1,
            "samples_per_s": 250.0,
            "eval": {"eval/ema/zs_top1": 0.25 + (0.1 if source != "web" else 0.0), "eval/final/zs_top1": 0.2},
            "exports": exports,
            "loader": {"stats": {}, "counts": {}},
        }
    )
    return run


def write_finetune_run(
    path: Path, stage: str, checkpoint: str, value: float, lr: float = 1e-3, frozen: bool = False
) -> RunDir:
    from pipeline.finetune.stages import load_stage

    module = load_stage(stage)
    cfg = module.STAGE_CONFIG()
    cfg = dataclasses.replace(
        cfg,
        backbone=dataclasses.replace(cfg.backbone, checkpoint=checkpoint),
        optim=dataclasses.replace(cfg.optim, lr=lr, backbone_lr_mult=0.0 if frozen else 1.0),
    )
    run = RunDir(path)
    run.write_config(cfg)
    primary, higher = ("mIoU", True) if stage == "segmentation" else ("rmse", False)
    metrics = {primary: value}
    if stage == "segmentation":
        metrics.update(mAcc=value + 5, aAcc=value + 20)
    else:
        metrics.update(abs_rel=value / 10, delta1=0.5)
    run.log({"loss": 1.0}, 10)
    run.write_summary(
        {
            "stage": stage,
            "status": "complete",
            "steps": 40,
            "samples_seen": 320,
            "primary_metric": primary,
            "primary_value": value,
            "higher_is_better": higher,
            "metrics": metrics,
            "per_class": {},
            "flops": {
                "forward_per_step": 1e9,
                "backward_per_step": 2e9,
                "per_step": 3e9,
                "train_total": 1.2e11,
            },
            "train_flops": 1.2e11,
            "params": 10,
            "trainable_params": 10,
            "wall_s_last_session": 3.0,
        }
    )
    return run


def write_world_images(folder: Path, num: int = 6) -> Path:
    from PIL import Image

    from pipeline.data import synthworld as sw

    folder.mkdir(parents=True, exist_ok=True)
    world = sw.shape_necessary_config()
    for i in range(num):
        Image.fromarray(sw.make_scene(world, i, "val").image).save(folder / f"{i:03d}.png")
    return folder


@dataclasses.dataclass
class FakeStudy:
    root: Path
    pretrain: dict[tuple[str, int, int], Path]
    export: Path
    images: Path


def make_study(
    root: Path, seeds: tuple[int, ...] = (0, 1), sizes: tuple[int, ...] = SIZES, with_export: bool = True
) -> FakeStudy:
    """<root>/pretrain/<point>/ for every (source, size, seed) and <root>/finetune/<...>/ trials: segmentation
    and depth per point (segmentation with two lr trials, the worse one first), plus random-init trials."""
    subsets = root / "shards" / "subsets"
    export = make_export(root / "shared_export") if with_export else None
    runs: dict[tuple[str, int, int], Path] = {}
    for source in SOURCES:
        for size in sizes:
            uids = write_uid_list(subsets / f"n{size}.txt", size)
            for seed in seeds:
                name = f"debug-{source.replace('+', '_')}-n{size}-s{seed}"
                path = root / "pretrain" / name
                # every run exports into its own folder: copy the shared export's files
                run_export = None
                if export is not None:
                    run_export = path / "export" / "ema"
                    run_export.mkdir(parents=True, exist_ok=True)
                    for f in export.iterdir():
                        (run_export / f.name).write_bytes(f.read_bytes())
                write_pretrain_run(path, source, uids, seed, export=run_export, size=size)
                runs[(source, size, seed)] = path
                ckpt = str(run_export) if run_export else str(path / "export" / "ema")
                trials = root / "finetune" / "ft" / "trials"
                good = seg_miou(size, source, seed)
                write_finetune_run(
                    trials / f"{name}-segmentation-lr=0.01", "segmentation", ckpt, good - 4, lr=1e-2
                )
                write_finetune_run(
                    trials / f"{name}-segmentation-lr=0.001", "segmentation", ckpt, good, lr=1e-3
                )
                write_finetune_run(trials / f"{name}-depth", "depth", ckpt, depth_rmse(size, source, seed))
    trials = root / "finetune" / "ft" / "trials"
    write_finetune_run(trials / "random-init-segmentation", "segmentation", "", 25.0)
    write_finetune_run(trials / "random-init-depth", "depth", "", 2.5)
    images = write_world_images(root / "images")
    return FakeStudy(root, runs, export or Path(), images)


def values(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows if isinstance(r.get(key), float)])

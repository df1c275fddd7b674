"""The scaling grid: (model size x caption source x subset size x seed) pretraining points and where their
run directories are. This module plans and reads; it launches nothing: ``pipeline.orchestrate`` runs the
pretraining launches and the fine-tuning sweep, ``jobs.scaling_report`` is the command line over both.

    cfg = load_config(ScalingConfig, "jobs/configs/scaling_report/debug.toml")
    cfg = resolve_paths(cfg)
    points = plan_points(cfg)                                   # every grid point, with its run directory
    launches = orchestrate.run_pretraining(cfg, points)         # finished points (summary.json) are skipped
    finetune = orchestrate.run_finetuning(cfg, points)          # one sweep over the finished points' exports
    # then pipeline.report.build.build_report(...)

Layout under ``root``:

    <root>/pretrain/<point>/        a pretraining run directory (+ point.json naming its grid point)
    <root>/finetune/<sweep>/trials/<trial>/   fine-tuning trials (pipeline.finetune.sweep's layout)
    <root>/report/                  index.html, tables, plots (pipeline.report.build)

A point's pretraining is ``python -m jobs.pretrain --config <pretrain.config> <overrides>`` run through
``pretrain.launcher`` (default: this Python; e.g. ``["torchrun", "--nproc_per_node", "8"]`` or ``["srun",
"python"]``), with overrides, in order: ``pretrain.overrides``, ``pretrain.model_overrides[<model>]``, the
caption source's loss weights and overrides (:func:`source_overrides`), and the point's own (run dir, model,
shards, subset, seeds). A point whose run directory has ``summary.json`` is never launched again; one with
checkpoints but no summary resumes (the trainer resumes from ``latest``). Fine-tuning is one sweep
(:func:`sweep_config`: every finished point's export ``export/<pretrain.weights>`` is one checkpoint, plus a
random-init baseline) run by ``pipeline.orchestrate.run_sweep`` with ``finetune.runner``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import io
from pipeline.finetune.sweep import ResourcesConfig, SearchConfig
from pipeline.report.collect import count_lines
from pipeline.report.flops import CostConfig

ROOT = Path(__file__).resolve().parents[2]
BUILTIN_SOURCES: dict[str, dict[str, Any]] = {
    "web": {"w_real": 1.0, "w_syn": 0.0},
    "syn": {"w_real": 0.0, "w_syn": 1.0},
    "web+syn": {"w_real": 1.0, "w_syn": 1.0},
}
"""Caption sources by name: loss weights of the web caption and the synthetic caption."""
RANDOM_INIT_LABEL = "random-init"


@dataclass(frozen=True)
class GridConfig:
    models: tuple[str, ...] = ("debug",)
    """Model sizes: open_clip architecture names (``debug`` is the tiny CI one)."""
    caption_sources: tuple[str, ...] = ("web", "web+syn")
    """Caption sources: web, syn, web+syn, or a name defined in [pretrain.sources]."""
    subsets: tuple[str, ...] = ("all",)
    """Subset sizes: names of data prep's nested subsets (``<pretrain.subsets_dir>/<name>.txt``, e.g. 1pct),
    uid-list file paths, or ``all``."""
    seeds: tuple[int, ...] = (0,)
    """Pretraining seeds (data order and initialisation); each is a separate point."""
    reference_source: str = ""
    """Caption source the others are compared with ("" = the first of caption_sources)."""

    def __post_init__(self) -> None:
        for name in ("models", "caption_sources", "subsets", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name}: list at least one")
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: {list(values)} lists a value twice")
        if self.reference_source and self.reference_source not in self.caption_sources:
            raise ValueError(f"reference_source: {self.reference_source!r} is not in caption_sources")

    @property
    def reference(self) -> str:
        return self.reference_source or self.caption_sources[0]


@dataclass(frozen=True)
class PretrainGridConfig:
    config: str = "jobs/configs/pretrain/debug.toml"
    """Base pretraining config (TOML of jobs.pretrain) every point starts from."""
    shards: str = ""
    """Pretraining shards (data.shards of every point); "" keeps the base config's."""
    subsets_dir: str = ""
    """Folder of subset uid lists (<name>.txt); "" = the ``subsets`` folder beside the shards."""
    total_samples: int = 0
    """Size of the ``all`` subset; 0 = the sum of ``sizes.json`` beside the shards (when there is one)."""
    overrides: tuple[str, ...] = ()
    """jobs.pretrain overrides for every point, e.g. ["--steps=200", "--global_batch=128"]."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """model name -> list of overrides for that model size (e.g. image size, micro-batch)."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Extra caption sources: name -> {w_real, w_syn, overrides = [...]} (e.g. other synthetic captions)."""
    launcher: tuple[str, ...] = ()
    """Command prefix that runs ``-m jobs.pretrain ...`` (default: this Python interpreter)."""
    timeout_s: int = 0
    """Kill a pretraining launch after this many seconds (0 = no limit)."""
    parallel: int = 1
    """Launches running at once (e.g. 2 one-thread runs of a tiny model on a 2-core CPU; 1 on a cluster)."""
    env: dict[str, Any] = field(default_factory=dict)
    """Extra environment variables of every launch, e.g. {OMP_NUM_THREADS = "1"}."""
    run: bool = True
    """Launch missing points; false = only reuse finished runs (a report of what exists)."""
    weights: Literal["ema", "final"] = "ema"
    """Which export the fine-tuning stages start from (ema falls back to final when a run has no EMA)."""

    def __post_init__(self) -> None:
        for name, spec in self.sources.items():
            if not isinstance(spec, dict):
                raise ValueError(f"sources.{name}: expected a table with w_real / w_syn / overrides")
            unknown = set(spec) - {"w_real", "w_syn", "overrides"}
            if unknown:
                raise ValueError(f"sources.{name}: unknown key(s) {sorted(unknown)}")
        for name, value in self.model_overrides.items():
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"model_overrides.{name}: expected a list of --key=value strings")
        if self.timeout_s < 0:
            raise ValueError(f"timeout_s: must be >= 0, got {self.timeout_s}")
        if self.parallel < 1:
            raise ValueError(f"parallel: must be >= 1, got {self.parallel}")


@dataclass(frozen=True)
class FinetuneGridConfig:
    stages: tuple[str, ...] = ("segmentation", "depth")
    """Fine-tuning stages run on every finished point (() = none)."""
    base: dict[str, Any] = field(default_factory=dict)
    """Per-stage base config, as the sweep's [base.<stage>] / [base.all] (preset, config, stage keys)."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """Search space per stage, as the sweep's [sweep.<stage>] (e.g. lr = [1e-3, 3e-4]); {} = one trial."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Grid or random search (num_samples repeats / draws)."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Ray resources per trial (runner = "ray")."""
    runner: Literal["local", "ray"] = "local"
    """local: trials in this process (``parallel`` at a time in worker processes); ray: a Ray Tune sweep
    (pipeline.orchestrate.run_sweep's runners)."""
    random_init: bool = True
    """Also fine-tune from a random initialisation: the no-pretraining baseline of every plot."""
    run: bool = True
    """Run missing trials; false = only collect finished ones."""
    threads: int = 0
    """torch CPU threads of local trials (0 = torch's default; 1 is faster on a crowded CPU)."""
    parallel: int = 1
    """Local trials running at once, each in its own process (runner = "local")."""
    name: str = "finetune"
    """Sweep name: trials live in <root>/finetune/<name>/trials/."""


@dataclass(frozen=True)
class AttentionConfig:
    enabled: bool = True
    """Compute the average attention distance per layer and head (the paper's Figure 3 analysis)."""
    images: str = ""
    """Folder of images (searched recursively) to average over; "" skips the analysis."""
    num_images: int = 64
    """Images used (the first ones in sorted path order)."""
    which: Literal["largest", "all"] = "largest"
    """Points analysed: the largest subset per (model, caption source), first seed; or every point."""
    random_init: bool = True
    """Also analyse a randomly initialised tower of each model (the reference)."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """More image towers to analyse beside the grid's points, label -> checkpoint (anything
    ``backbone.checkpoint`` takes: an export folder, visual.pt, an open_clip checkpoint), e.g.
    ``{teacher = "...", "FD student" = "..."}``."""
    model: str = "debug"
    """Architecture of a ``checkpoints`` entry without an ``open_clip_config.json`` beside it."""
    side_by_side: bool = False
    """Draw the attention distance of each tower in its own panel (shared y axis) instead of overlaid."""
    maps: bool = True
    """Also plot the average attention map per layer of every tower (FD-CLIP's locality diagnostic)."""
    cka_reference: str = ""
    """Label of the tower every other one is compared with, block by block, by linear CKA ("" = the first
    of ``checkpoints``; no CKA without one)."""

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images: must be >= 1, got {self.num_images}")


@dataclass(frozen=True)
class ReportConfig:
    fit: Literal["loglinear", "powerlaw", "powerlaw_gap"] = "loglinear"
    """Curve fitted per (model, caption source): y = a + b log10(x), y = a x^b, or ceiling - y = a x^b."""
    level: float = 0.95
    """Confidence level of the intervals and bands."""
    metrics: tuple[str, ...] = ()
    """Columns to plot and fit (e.g. "segmentation.mIoU", "depth.rmse", "zs_top1"); () = every stage's
    primary metric plus zero-shot top-1 when the runs have it."""
    ceilings: dict[str, float] = field(default_factory=dict)
    """metric -> ceiling for fit = "powerlaw_gap" (default 1.0, or 100 for metrics named like mIoU/mAcc)."""
    title: str = ""
    """Report title ("" = "Scaling report: <name>")."""
    reference_model: str = "ViT-B-16"
    """Model whose counted FLOPs are checked against open_clip's published figure and projected for the
    seed recipe ("" skips)."""

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"level: must be in (0, 1), got {self.level}")


@dataclass(frozen=True)
class ScalingConfig:
    name: str = "scaling"
    """Name of the study (report title, file names)."""
    root: str = "runs/scaling"
    """Folder of everything: pretrain/, finetune/, report/."""
    grid: GridConfig = field(default_factory=GridConfig)
    """The grid of points."""
    pretrain: PretrainGridConfig = field(default_factory=PretrainGridConfig)
    """How each point is pretrained."""
    finetune: FinetuneGridConfig = field(default_factory=FinetuneGridConfig)
    """Fine-tuning stages (and sweeps) per finished point."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention-distance analysis."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """Fits, metrics and title."""
    cost: CostConfig = field(default_factory=CostConfig)
    """Device, MFU and throughput for projected device-hours."""
    collect: tuple[str, ...] = ()
    """More folders whose run directories the report collects (pretraining runs, sweep folders made elsewhere,
    e.g. by jobs.pipeline), besides <root>/pretrain and <root>/finetune."""

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"name: letters, digits, '.', '_' and '-' only, got {self.name!r}")
        known = set(BUILTIN_SOURCES) | set(self.pretrain.sources)
        for source in self.grid.caption_sources:
            if source not in known:
                raise ValueError(
                    f"grid.caption_sources: {source!r} is not built in ({', '.join(BUILTIN_SOURCES)}) "
                    "nor defined in [pretrain.sources]"
                )

    @property
    def pretrain_dir(self) -> Path:
        return Path(self.root) / "pretrain"

    @property
    def finetune_dir(self) -> Path:
        return Path(self.root) / "finetune"

    @property
    def report_dir(self) -> Path:
        return Path(self.root) / "report"


def resolve_paths(cfg: ScalingConfig, cwd: str | os.PathLike[str] | None = None) -> ScalingConfig:
    """Make local paths absolute (relative to ``cwd``), so launched processes find them from anywhere."""
    base = Path(cwd or os.getcwd())

    def absolute(path: str) -> str:
        return path if not path or "://" in path or os.path.isabs(path) else str(base / path)

    pre = cfg.pretrain
    config = pre.config
    if config and not os.path.isabs(config) and not (base / config).exists() and (ROOT / config).exists():
        config = str(ROOT / config)  # a repository config file named from another working directory
    return dataclasses.replace(
        cfg,
        root=absolute(cfg.root),
        pretrain=dataclasses.replace(
            pre, config=absolute(config), shards=absolute(pre.shards), subsets_dir=absolute(pre.subsets_dir)
        ),
        attention=dataclasses.replace(cfg.attention, images=absolute(cfg.attention.images)),
        collect=tuple(absolute(c) for c in cfg.collect),
    )


# ------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Point:
    name: str
    model: str
    caption_source: str
    subset: str
    subset_uids: str
    """uid list file ("" = all samples)."""
    subset_size: int | None
    seed: int
    run_dir: str
    shards: str = ""
    """The point's own shard set: data prep's materialised subset (``<subsets_dir>/<name>/``, read instead of
    filtering the full shards by ``subset_uids``); "" = ``pretrain.shards``."""

    def labels(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "caption_source": self.caption_source,
            "subset": self.subset,
            "subset_size": self.subset_size,
            "subset_uids": self.subset_uids,
            "seed": self.seed,
        }


def safe_label(text: str) -> str:
    """A file / sweep-label safe version of ``text`` (``web+syn`` -> ``web_syn``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def shard_folder(shards: str) -> str:
    """The folder of a shard spec (brace pattern, glob, folder or list file)."""
    first = shards.split("::")[0]
    if io.is_local(first) and os.path.isdir(first):
        return first
    return os.path.dirname(first)


def _base_shards(cfg: ScalingConfig) -> str:
    if cfg.pretrain.shards:
        return cfg.pretrain.shards
    from pipeline.report.collect import get, read_toml

    return str(get(read_toml(Path(cfg.pretrain.config)), "data.shards", "") or "")


def total_samples(cfg: ScalingConfig) -> int | None:
    """Size of the ``all`` subset: ``pretrain.total_samples`` or the sum of ``sizes.json`` beside the shards."""
    if cfg.pretrain.total_samples:
        return cfg.pretrain.total_samples
    shards = _base_shards(cfg)
    if not shards:
        return None
    sizes = io.join(shard_folder(shards), "sizes.json")
    try:
        return int(sum(io.read_json(sizes).values())) if io.exists(sizes) else None
    except (OSError, ValueError, AttributeError):
        return None


def subset_file(cfg: ScalingConfig, subset: str) -> str:
    """The uid list of a grid subset ("" for ``all``)."""
    if subset == "all":
        return ""
    if subset.endswith(".txt") or "/" in subset:
        return subset if os.path.isabs(subset) or "://" in subset else str(Path(subset).resolve())
    folder = cfg.pretrain.subsets_dir or io.join(shard_folder(_base_shards(cfg)), "subsets")
    return io.join(folder, f"{subset}.txt")


def materialised_subset(uids: str) -> str:
    """The shard set data prep materialised beside the uid list ``<dir>/<name>.txt`` (``<dir>/<name>/``, complete
    once its ``sizes.json`` exists), or ""."""
    if not uids.endswith(".txt"):
        return ""
    folder = uids[: -len(".txt")]
    return folder if io.exists(io.join(folder, "sizes.json")) else ""


def plan_points(cfg: ScalingConfig) -> list[Point]:
    """Every grid point in a fixed order (model, source, subset, seed)."""
    points = []
    total = None
    for model in cfg.grid.models:
        for source in cfg.grid.caption_sources:
            for subset in cfg.grid.subsets:
                uids = subset_file(cfg, subset)
                if uids:
                    size = count_lines(uids)
                else:
                    total = total if total is not None else total_samples(cfg)
                    size = total
                label = Path(subset).stem if (subset.endswith(".txt") or "/" in subset) else subset
                shards = materialised_subset(uids)
                for seed in cfg.grid.seeds:
                    name = safe_label(f"{model}-{source}-{label}-s{seed}")
                    run_dir = str(cfg.pretrain_dir / name)
                    points.append(Point(name, model, source, label, uids, size, seed, run_dir, shards))
    return points


def source_overrides(cfg: ScalingConfig, source: str) -> list[str]:
    spec = {**BUILTIN_SOURCES.get(source, {}), **cfg.pretrain.sources.get(source, {})}
    out = [f"--loss.w_real={float(spec.get('w_real', 1.0))}", f"--loss.w_syn={float(spec.get('w_syn', 1.0))}"]
    return out + [str(o) for o in spec.get("overrides", [])]


def point_done(point: Point) -> bool:
    return (Path(point.run_dir) / "summary.json").is_file()


# ------------------------------------------------------------------------------------------ fine-tuning


def export_dir(point: Point, weights: str) -> str | None:
    """The export the stages start from: ``export/<weights>`` (ema falls back to final), None if absent."""
    summary_path = Path(point.run_dir) / "summary.json"
    if not summary_path.is_file():
        return None
    exports = json.loads(summary_path.read_text()).get("exports") or {}
    path = exports.get(weights) or exports.get("final")
    if path and Path(path).is_dir():
        return str(Path(path).resolve())
    for name in (weights, "final"):
        candidate = Path(point.run_dir) / "export" / name
        if candidate.is_dir():
            return str(candidate.resolve())
    return None


def sweep_config(cfg: ScalingConfig, points: list[Point]) -> Any:
    """The fine-tuning sweep over every finished point's export (plus random init), or None if empty."""
    from pipeline.finetune.sweep import SweepConfig

    checkpoints: dict[str, str] = {}
    for point in points:
        path = export_dir(point, cfg.pretrain.weights)
        if path is not None:
            checkpoints[point.name] = path
    if cfg.finetune.random_init:
        checkpoints[RANDOM_INIT_LABEL] = ""
    if not checkpoints or not cfg.finetune.stages:
        return None
    return SweepConfig(
        name=cfg.finetune.name,
        storage=str(cfg.finetune_dir),
        stages=tuple(cfg.finetune.stages),
        checkpoints=checkpoints,
        base=dict(cfg.finetune.base),
        sweep=dict(cfg.finetune.sweep),
        search=cfg.finetune.search,
        resources=cfg.finetune.resources,
    )


__all__ = [
    "AttentionConfig",
    "FinetuneGridConfig",
    "GridConfig",
    "Point",
    "PretrainGridConfig",
    "ReportConfig",
    "ScalingConfig",
    "export_dir",
    "plan_points",
    "point_done",
    "resolve_paths",
    "source_overrides",
    "sweep_config",
]

"""The toy reproduction of the paper's claim on the synthetic world: its data, its study, its verdict.

    data = write_toy_data(ToyDataConfig(), "runs/reproduce/data")      # idempotent
    study = study_config(ReproduceConfig(), data)                       # a ScalingConfig over that data
    verdict = toy_verdict(report, study)                                # after pipeline.report.build

The claim: CLIP pretrained on web captions *plus* precise synthetic captions transfers better to dense tasks
(segmentation, depth) than CLIP pretrained on noisy web captions only, and is more data-efficient (reaches a
given downstream quality with fewer pretraining samples). The toy world is the "shape-necessary" one of
docs/synthworld.md: few colours (one per scene), four shapes, hard-negative groups of 8 scenes whose captions
differ only in shape words, kept together in a batch by the loader (``data.group_size``).

Data written under ``<out>/data``: ``shards/NNNNN.tar`` (our WebDataset schema: ``jpg``, ``txt`` = the noisy
web caption, ``syn.json`` = paraphrases of the precise caption, ``json``) and ``sizes.json``; nested subsets
``subsets/n<size>.txt`` (the first ``size`` samples of the pool: whole hard-negative groups, each subset a
prefix of the next), each also materialised as its own shard set ``subsets/n<size>/`` (tars + ``sizes.json``:
the study's points read only their subset's bytes); ``zero_shot/<shape>/<uid>.png`` (held-out world split ``val``: zero-shot evaluation
during pretraining, and the images of the attention-distance analysis); ``data.json`` (what was written,
and the config it was written from: a changed config rewrites the data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.config import to_dict, to_toml
from pipeline.data import schema
from pipeline.data import synthworld as sw
from pipeline.report.readouts import ReadoutConfig
from pipeline.report.scaling import Point, ScalingConfig


@dataclass(frozen=True)
class ToyDataConfig:
    world: sw.WorldConfig = field(default_factory=sw.shape_necessary_config)
    """The synthetic world (default: shape_necessary_config(): 4 shapes, 1 colour per scene, groups of 8)."""
    pool_size: int = 8192
    """Pretraining pool (world split train); the largest subset must not exceed it."""
    subset_sizes: tuple[int, ...] = (512, 2048, 8192)
    """Nested pretraining subsets (prefixes of the pool), each a multiple of world.group_size."""
    samples_per_shard: int = 512
    """Samples per tar (a multiple of world.group_size, so no group straddles two shards)."""
    num_syn_captions: int = 5
    """Synthetic captions (paraphrases of the precise caption) per image."""
    syn_seed: int = 0
    """Seed of the paraphrases."""
    num_eval: int = 512
    """Held-out images (world split val) for zero-shot evaluation and attention distances."""
    jpeg_quality: int = 95
    """JPEG quality of the pool images."""

    def __post_init__(self) -> None:
        g = max(1, self.world.group_size)
        if not self.subset_sizes or sorted(set(self.subset_sizes)) != list(self.subset_sizes):
            raise ValueError(f"subset_sizes: give increasing distinct sizes, got {list(self.subset_sizes)}")
        for size in self.subset_sizes:
            if size < 1 or size % g:
                raise ValueError(f"subset_sizes: {size} is not a positive multiple of world.group_size ({g})")
        if self.subset_sizes[-1] > self.pool_size:
            raise ValueError(
                f"pool_size: {self.pool_size} is smaller than the largest subset {self.subset_sizes[-1]}"
            )
        if self.samples_per_shard < 1 or self.samples_per_shard % g:
            raise ValueError(f"samples_per_shard: must be a positive multiple of world.group_size ({g})")
        if self.num_syn_captions < 1 or self.num_eval < 1:
            raise ValueError("num_syn_captions / num_eval: must be >= 1")


def _default_study() -> ScalingConfig:
    return ScalingConfig(name="reproduce")


@dataclass(frozen=True)
class ReproduceConfig:
    out: str = "runs/reproduce"
    """Output folder: data/, study/ (runs and report)."""
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    """The toy data."""
    study: ScalingConfig = field(default_factory=_default_study)
    """The scaling study run on it; root, shards, subsets, images are filled in from ``out`` and ``data``."""
    readouts: ReadoutConfig = field(default_factory=ReadoutConfig)
    """Dense readouts of every export and of random initialisation (pipeline/report/readouts.py): the verdict."""
    readout_parallel: int = 2
    """Encoders read out at once (one process and one thread each)."""
    level: float = 0.95
    """Confidence level of the paired bootstrap intervals."""
    num_boot: int = 2000
    """Bootstrap draws per interval."""


# ------------------------------------------------------------------------------------------------ data


def _fingerprint(cfg: ToyDataConfig) -> str:
    return hashlib.sha1(to_toml(cfg).encode()).hexdigest()[:12]


def write_toy_data(cfg: ToyDataConfig, folder: str | Path) -> dict[str, Any]:
    """Write (or reuse, when ``data.json`` matches ``cfg``) the toy data; returns ``data.json``'s content."""
    from PIL import Image

    from pipeline.data.prep.subsets import repack
    from pipeline.data.synth_export import write_pretraining_shards

    folder = Path(folder)
    info_path = folder / "data.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == _fingerprint(cfg):
            return info
    for sub in ("shards", "subsets", "zero_shot"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    world = cfg.world
    num_shards = math.ceil(cfg.pool_size / cfg.samples_per_shard)
    uids = write_pretraining_shards(
        shards,
        world,
        cfg.pool_size,
        cfg.samples_per_shard,
        "train",
        cfg.num_syn_captions,
        quality=cfg.jpeg_quality,
        syn_seed=cfg.syn_seed,
    )
    sizes = {
        f"{s:05d}.tar": min(cfg.samples_per_shard, cfg.pool_size - s * cfg.samples_per_shard)
        for s in range(num_shards)
    }
    io.write_json(str(shards / schema.SIZES_FILE), sizes)
    subsets = {}
    per = cfg.samples_per_shard
    for size in cfg.subset_sizes:
        path = folder / "subsets" / f"n{size}.txt"
        io.write_text(str(path), "".join(u + "\n" for u in uids[:size]))
        # materialised: the subset as its own shard set (a prefix of the pool: its first shards' samples)
        sources = [
            (str(shards / f"{s:05d}.tar"), max(0, min(per, size - s * per))) for s in range(num_shards)
        ]
        subset_shards = folder / "subsets" / f"n{size}"
        repack(
            sources, frozenset(uids[:size]).__contains__, str(subset_shards), per, name_format="{index:05d}"
        )
        subsets[f"n{size}"] = {"size": size, "uids": str(path), "shards": str(subset_shards)}
    eval_world = dataclasses.replace(world, group_size=1)
    zero_shot = folder / "zero_shot"
    for index in range(cfg.num_eval):
        scene = sw.make_scene(eval_world, index, "val")
        target = zero_shot / sw.THING_CLASSES[sw.zero_shot_label(scene)]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(target / f"{scene.uid}.png")
    for name in world.shapes:  # every class has a folder, even if no image landed in it
        (zero_shot / name).mkdir(parents=True, exist_ok=True)
    info = {
        "fingerprint": _fingerprint(cfg),
        "config": to_dict(cfg),
        "shards": str(shards / f"{{00000..{num_shards - 1:05d}}}.tar"),
        "num_shards": num_shards,
        "pool_size": cfg.pool_size,
        "subsets": subsets,
        "subsets_dir": str(folder / "subsets"),
        "zero_shot": str(zero_shot),
        "classes": list(world.shapes),
    }
    io.write_json(str(info_path), info)
    return info


# ----------------------------------------------------------------------------------------------- study


def study_config(cfg: ReproduceConfig, data: dict[str, Any]) -> ScalingConfig:
    """The scaling study over the toy data: root, shards, subsets, evaluation and attention images, the group
    size of the loader and the fine-tuning world (the pretraining world without groups) filled in."""
    out = Path(cfg.out)
    study = cfg.study
    world = cfg.data.world
    overrides = (
        f"--eval.zero_shot={data['zero_shot']}",
        f"--data.group_size={max(1, world.group_size)}",
        *study.pretrain.overrides,
    )
    ft_world = {k: v for k, v in to_dict(dataclasses.replace(world, group_size=1)).items()}
    base = {k: dict(v) for k, v in study.finetune.base.items()}
    all_base = base.setdefault("all", {})
    data_table = dict(all_base.get("data", {}))
    data_table["world"] = {**ft_world, **dict(data_table.get("world", {}))}
    all_base["data"] = data_table
    return dataclasses.replace(
        study,
        root=str(out / "study"),
        grid=dataclasses.replace(
            study.grid, subsets=tuple(sorted(data["subsets"], key=lambda k: data["subsets"][k]["size"]))
        ),
        pretrain=dataclasses.replace(
            study.pretrain,
            shards=data["shards"],
            subsets_dir=data["subsets_dir"],
            overrides=overrides,
            total_samples=data["pool_size"],
        ),
        finetune=dataclasses.replace(study.finetune, base=base),
        attention=dataclasses.replace(study.attention, images=data["zero_shot"]),
    )


# --------------------------------------------------------------------------------------------- verdict


def _overall(answers: list[str]) -> str:
    """One answer for all readouts: the common one, or "mixed (yes on 3, not significant on 1 of 4 readouts)"."""
    if not answers:
        return "not measured"
    if len(set(answers)) == 1:
        return answers[0]
    counts = Counter(answers).most_common()
    return f"mixed ({', '.join(f'{a} on {n}' for a, n in counts)} of {len(answers)} readouts)"


def toy_verdict(report: dict[str, Any], study: ScalingConfig) -> dict[str, Any]:
    """Does the quality-caption source transfer better, and is it more data-efficient, than the reference?

    Per stage metric (from the measured means, no model):

    - transfer: "yes" when the quality source is better at every subset size, "no" when at none; with two or
      more seeds (confidence intervals on the gains), "not significant" when it is better at every size but no
      size's 95% interval excludes zero;
    - data efficiency: "yes" when the quality source at the smallest size is better than the reference at
      that size *and* at least as good as the reference at a larger size; "no" when it is not better at the
      smallest size; "undetermined" when the reference itself does not improve from the smallest to the largest
      size (then the data axis cannot be traded against caption quality at this budget).

    The fitted data multipliers of :func:`pipeline.report.build.compare` are quoted beside, not used.
    """
    reference = study.grid.reference
    stage_metrics = [m for m in report["metrics"] if "." in m]
    rows = [c for c in report["comparisons"] if c["metric"] in stage_metrics]
    lines: list[str] = []
    transfer: list[str] = []
    efficiency: list[str] = []
    per_metric: dict[str, Any] = {}
    for metric in stage_metrics:
        mine = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["subset_size"])
        if not mine:
            continue
        source = mine[0]["source"]
        higher = next((f["higher"] for f in report["figures"] if f["metric"] == metric), True)
        sign = 1.0 if higher else -1.0
        tol = 1e-9 * max(1.0, max(abs(r["reference_mean"]) for r in mine))
        better = [r["gain"] > tol for r in mine]
        has_ci = any(math.isfinite(r["gain_lo"]) for r in mine)  # compare() gives lo and hi, or NaN for both
        answer = "yes" if all(better) else "no" if not any(better) else "mixed"
        if answer == "yes" and has_ci and not any(r["gain_lo"] > 0 for r in mine):  # NaN > 0 is False
            answer = "not significant"  # the right sign everywhere, but no 95% interval excludes zero
        transfer.append(answer)
        gains = ", ".join(
            f"n={int(r['subset_size'])}: {r['source_mean']:.4g} vs {r['reference_mean']:.4g} ({r['gain']:+.3g}"
            + (
                f", 95% CI {r['gain_lo']:+.3g} to {r['gain_hi']:+.3g})"
                if math.isfinite(r["gain_lo"])
                else ")"
            )
            for r in mine
        )
        lines.append(
            f"Transfer, {metric} ({'higher' if higher else 'lower'} is better): {source} vs "
            f"{reference}: {gains}"
            + (
                "; better at every size, but every interval includes zero"
                if answer == "not significant"
                else ""
            )
            + "."
        )
        smallest, largest = mine[0], mine[-1]
        ref_gain = sign * (largest["reference_mean"] - smallest["reference_mean"])
        matched = [r for r in mine[1:] if sign * (smallest["source_mean"] - r["reference_mean"]) >= 0]
        n0 = int(smallest["subset_size"])
        text = f"Data efficiency, {metric}: "
        if len(mine) < 2 or ref_gain <= tol:
            answer = "undetermined"
            text += (
                f"{reference} does not improve from n={n0} to n={int(largest['subset_size'])} "
                f"({smallest['reference_mean']:.4g} -> {largest['reference_mean']:.4g}) at this pretraining "
                "budget, so more data cannot be traded against better captions here"
            )
        elif not better[0]:
            answer = "no"
            text += f"{source} is not better than {reference} at the smallest subset (n={n0})"
        elif matched:
            answer = "yes"
            n_match = int(max(r["subset_size"] for r in matched))
            text += (
                f"{source} with {n0} samples is at least as good as {reference} with {n_match} "
                f"({n_match / n0:g}x the data)"
            )
        else:
            answer = "mixed"
            text += f"{source} is better at n={n0} but does not reach {reference} at any larger subset"
        mults = [
            r["data_multiplier"]
            for r in mine
            if isinstance(r["data_multiplier"], float) and math.isfinite(r["data_multiplier"])
        ]
        if mults:
            text += f"; fitted data multiplier {', '.join(f'{m:.3g}x' for m in mults)} at the measured sizes"
        efficiency.append(answer)
        lines.append(text + ".")
        baseline = next(
            (p.get(metric) for p in report.get("points", []) if p.get("point") == "random init"), None
        )
        pretrained = [
            p[metric]
            for p in report.get("points", [])
            if p.get("kind") == "pretrain" and isinstance(p.get(metric), float)
        ]
        beats_random = None
        if isinstance(baseline, float) and pretrained:
            best = max(pretrained) if higher else min(pretrained)
            beats_random = sign * (best - baseline) > tol
            if not beats_random:
                lines.append(
                    f"Sensitivity, {metric}: no pretrained encoder (either caption source, any size) beats random "
                    f"initialisation ({baseline:.4g}; pretrained {min(pretrained):.4g}-{max(pretrained):.4g}), so "
                    "this readout does not depend on the pretrained features at this scale and cannot show a "
                    "caption effect."
                )
        per_metric[metric] = {
            "transfer": transfer[-1],
            "data_efficiency": answer,
            "better_at": sum(better),
            "sizes": len(better),
            "multipliers": mults,
            "beats_random_init": beats_random,
        }
    zs = [c for c in report["comparisons"] if c["metric"] == "zs_top1"]
    if zs:
        lines.append(
            "Zero-shot shape accuracy after pretraining (EMA weights): "
            + ", ".join(
                f"n={int(r['subset_size'])}: {r['source_mean']:.3f} vs {r['reference_mean']:.3f}" for r in zs
            )
            + "."
        )
    seeds = len(study.grid.seeds)
    caveat = f"{seeds} pretraining seed(s) per point" + (
        ": no confidence interval on the differences; at this scale "
        'a seed-to-seed spread of about 1 mIoU point was measured before (docs/synthworld.md, "Measured '
        'at CPU scale"), so differences of that size are not evidence.'
        if seeds < 2
        else "."
    )
    return {
        "transfer": _overall(transfer),
        "data_efficiency": _overall(efficiency),
        "lines": lines,
        "caveat": caveat,
        "per_metric": per_metric,
    }


# -------------------------------------------------------------------------------------------- readouts


def random_label(model: str, seed: int) -> str:
    """The encoder label of a random initialisation (``BackboneConfig.seed`` = the pretraining seed)."""
    return f"random-init-{model}-s{seed}"


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: ReadoutConfig, world: dict[str, Any], model: str) -> None:
    import torch

    from pipeline.model.backbone import BackboneConfig, build_backbone
    from pipeline.report import readouts as R

    torch.set_num_threads(1)
    world_cfg = sw.WorldConfig(**world)
    patch = build_backbone(BackboneConfig(model=model)).patch_size
    _WORKER["cfg"] = cfg
    _WORKER["train"] = R.world_scenes(world_cfg, "finetune", cfg.num_train, patch)
    _WORKER["val"] = R.world_scenes(world_cfg, "val", cfg.num_val, patch)


def _read_out(label: str, model: str, checkpoint: str, seed: int, path: str, fingerprint: str) -> str:
    import numpy as np

    from pipeline.model.backbone import BackboneConfig, build_backbone
    from pipeline.report import readouts as R

    cfg = _WORKER["cfg"]
    encoder = R.PatchEncoder(
        build_backbone(BackboneConfig(model=model, checkpoint=checkpoint, seed=seed)), cfg.layers
    )
    stats = R.run_readouts(cfg, encoder, _WORKER["train"], _WORKER["val"])
    tmp = Path(path).with_suffix(".tmp.npz")
    np.savez(tmp, _fingerprint=np.array(fingerprint), **stats)
    tmp.replace(path)  # atomic: a killed run leaves no half-written statistics
    return label


def readout_encoders(study: ScalingConfig, points: list[Point]) -> dict[str, dict[str, Any]]:
    """Every encoder to read out: each finished point's export and one random init per (model, seed)."""
    from pipeline.report.scaling import export_dir

    encoders: dict[str, dict[str, Any]] = {}
    for point in points:
        path = export_dir(point, study.pretrain.weights)
        if path is not None:
            encoders[point.name] = {"model": point.model, "checkpoint": path, "seed": point.seed}
    for model in study.grid.models:
        for seed in study.grid.seeds:
            encoders[random_label(model, seed)] = {"model": model, "checkpoint": "", "seed": seed}
    return encoders


def run_toy_readouts(
    cfg: ReproduceConfig, study: ScalingConfig, points: list[Point], echo: Any = print
) -> dict[str, dict[str, Any]]:
    """Read out every encoder (cached in ``<out>/readouts/<label>.npz``, reused while config, world and
    weights are unchanged); returns ``{label: {readout: seeds x scenes x K statistics}}``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    folder = Path(cfg.out) / "readouts"
    folder.mkdir(parents=True, exist_ok=True)
    world = to_dict(dataclasses.replace(cfg.data.world, group_size=1))
    encoders = readout_encoders(study, points)
    base = to_toml(cfg.readouts) + json.dumps(world, sort_keys=True)

    def fingerprint(enc: dict[str, Any]) -> str:
        stamp = ""
        if enc["checkpoint"]:
            files = sorted(Path(enc["checkpoint"]).glob("*"))
            stamp = ",".join(
                f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.is_file()
            )
        key = base + json.dumps([enc["model"], enc["checkpoint"], enc["seed"], stamp])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def load(path: Path, want: str) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        with np.load(path) as z:
            if str(z["_fingerprint"]) != want:
                return None
            return {k: z[k] for k in z.files if k != "_fingerprint"}

    pending = []
    for label, enc in encoders.items():
        path = folder / f"{safe_name(label)}.npz"
        if load(path, fingerprint(enc)) is None:
            pending.append((label, enc["model"], enc["checkpoint"], enc["seed"], str(path), fingerprint(enc)))
    if pending:
        echo(
            f"[reproduce] readouts: {len(pending)} encoder(s) of {len(encoders)}, {len(cfg.readouts.names())} readouts x "
            f"{len(cfg.readouts.seeds)} readout seeds each, {cfg.readout_parallel} at a time",
            flush=True,
        )
        models = {p[1] for p in pending}
        if len(models) != 1:
            raise ValueError(f"study.grid.models: the toy readouts take one model, got {sorted(models)}")
        with ProcessPoolExecutor(
            max_workers=max(1, min(cfg.readout_parallel, len(pending))),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(cfg.readouts, world, next(iter(models))),
        ) as pool:
            for done in pool.map(_read_out, *zip(*pending)):
                echo(f"[reproduce] readouts done: {done}", flush=True)
    results = {}
    for label, enc in encoders.items():
        stats = load(folder / f"{safe_name(label)}.npz", fingerprint(enc))
        if stats is not None:
            results[label] = stats
    return results


def safe_name(label: str) -> str:
    from pipeline.report.scaling import safe_label

    return safe_label(label)


def readout_verdict(
    results: dict[str, dict[str, Any]],
    study: ScalingConfig,
    points: list[Point],
    readouts: tuple[str, ...],
    level: float = 0.95,
    num_boot: int = 2000,
) -> dict[str, Any]:
    """Per readout: is it sensitive (pretrained beats random init, paired by seed, interval above zero), and if
    so does the quality caption source transfer better (per subset size) and is it more data-efficient?

    - gate: the mean of the caption sources at the largest subset vs random init of the same seed; when its
      interval is not above zero the readout gets "no verdict" and says why (it cannot show a caption effect);
    - transfer: "yes" when the quality source is better at every size and significantly so at one or more,
      none significantly worse; "no" when significantly worse at one or more and better at none significantly;
      "mixed" when both; otherwise "not significant";
    - data efficiency: "undetermined" when the reference source does not significantly improve from the
      smallest to the largest size; "no" when the quality source is not significantly better at the smallest
      size; "yes" when the quality source at the smallest size is at least as good (point estimate) as the
      reference at a larger size (the largest such size gives the data multiplier); otherwise "mixed".

    Intervals: :func:`pipeline.report.readouts.paired_gain` (bootstrap over pretraining seeds and held-out
    scenes jointly, at ``level``)."""
    from pipeline.report import readouts as R

    model = study.grid.models[0]
    reference = study.grid.reference
    quality = next(s for s in study.grid.caption_sources if s != reference)
    seeds = list(study.grid.seeds)
    by = {(p.caption_source, p.subset_size or 0, p.seed): p.name for p in points if p.model == model}
    sizes = sorted({p.subset_size or 0 for p in points if p.model == model})

    def stats(label: str, readout: str) -> Any:
        return results.get(label, {}).get(readout)

    def side(source: str, size: int) -> list[Any] | None:
        got = [stats(by.get((source, size, s), ""), readout) for s in seeds]
        return None if any(x is None for x in got) else got

    def interval(g: dict[str, Any], scale: float = 1.0) -> str:
        return f"{g['gain'] * scale:+.3g} ({level:.0%} CI {g['lo'] * scale:+.3g} to {g['hi'] * scale:+.3g})"

    lines: list[str] = []
    per_readout: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    transfer: list[str] = []
    efficiency: list[str] = []
    kw = {"level": level, "num_boot": num_boot}
    for readout in readouts:
        unit = "mIoU" if R.task_of(readout) == "seg" else "RMSE m"
        rand = [stats(random_label(model, s), readout) for s in seeds]
        groups = {(src, n): side(src, n) for src in (reference, quality) for n in sizes}
        if any(x is None for x in rand) or any(g is None for g in groups.values()):
            lines.append(
                f"{readout}: not measured for every encoder (a pretraining run or readout is missing)."
            )
            per_readout[readout] = {"transfer": "not measured", "data_efficiency": "not measured"}
            continue
        largest = sizes[-1]
        pooled = [[groups[(reference, largest)][i], groups[(quality, largest)][i]] for i in range(len(seeds))]
        gate = R.paired_gain(pooled, rand, readout, **kw)
        vs_random = {
            src: R.paired_gain(groups[(src, largest)], rand, readout, **kw) for src in (reference, quality)
        }
        gains = {n: R.paired_gain(groups[(quality, n)], groups[(reference, n)], readout, **kw) for n in sizes}
        row = {"readout": readout, "unit": unit, "random": R.mean_metric(rand, readout)}
        for (src, n), g in groups.items():
            row[f"{src}@{n}"] = R.mean_metric(g, readout)
        row["gap_vs_random"] = gate
        row["gain"] = {str(n): g for n, g in gains.items()}
        table.append(row)
        sensitive = gate["lo"] > 0
        gap_text = (
            f"{readout}: pretrained (mean of {reference} and {quality} at n={largest}) vs random init: "
            f"{interval(gate)} ({unit}, positive = pretrained better); {reference} {interval(vs_random[reference])}, "
            f"{quality} {interval(vs_random[quality])}"
        )
        if not sensitive:
            lines.append(
                gap_text + ". No verdict on this readout: its pretrained-vs-random gap is not significantly "
                "positive, so it does not depend on the pretrained features here and cannot show a caption effect."
            )
            per_readout[readout] = {"transfer": "no verdict", "data_efficiency": "no verdict", "gap": gate}
            continue
        lines.append(gap_text + ".")
        pos = [n for n, g in gains.items() if g["lo"] > 0]
        neg = [n for n, g in gains.items() if g["hi"] < 0]
        answer = (
            "mixed"
            if pos and neg
            else "yes"
            if pos and all(g["gain"] > 0 for g in gains.values())
            else "no"
            if neg
            else "not significant"
        )
        transfer.append(answer)
        lines.append(
            f"Transfer, {readout}: {quality} vs {reference} (positive = {quality} better): "
            + ", ".join(f"n={n}: {interval(g)}" for n, g in gains.items())
            + f" -> {answer}."
        )
        n0 = sizes[0]
        text = f"Data efficiency, {readout}: "
        growth = (
            R.paired_gain(groups[(reference, largest)], groups[(reference, n0)], readout, **kw)
            if len(sizes) > 1
            else None
        )
        if growth is None or growth["lo"] <= 0:
            eff = "undetermined"
            text += (
                f"{reference} does not significantly improve from n={n0} to n={largest}"
                + (f" ({interval(growth)})" if growth else "")
                + ", so more data cannot be traded against better captions here"
            )
        elif gains[n0]["lo"] <= 0:
            eff = "no"
            text += f"{quality} is not significantly better than {reference} at the smallest subset (n={n0})"
        else:
            matched = []
            for n in sizes[1:]:
                g = R.paired_gain(groups[(quality, n0)], groups[(reference, n)], readout, **kw)
                if g["gain"] >= 0:
                    matched.append((n, g))
            if matched:
                eff = "yes"
                n, g = matched[-1]
                text += f"{quality} with {n0} samples vs {reference} with {n} ({n / n0:g}x the data): {interval(g)}"
            else:
                eff = "mixed"
                text += f"{quality} is better at n={n0} but does not reach {reference} at any larger subset"
        efficiency.append(eff)
        lines.append(text + ".")
        per_readout[readout] = {"transfer": answer, "data_efficiency": eff, "gap": gate, "gains": gains}
    none = "no verdict (no readout beats random initialisation significantly)"
    return {
        "transfer": _overall(transfer) if transfer else none,
        "data_efficiency": _overall(efficiency) if efficiency else none,
        "lines": lines,
        "per_readout": per_readout,
        "table": table,
        "sources": [reference, quality],
        "sizes": sizes,
        "seeds": seeds,
    }


def readout_table(verdict: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The readout table (headers, rows): mean metric per (source, size) and for random init, the pretrained -
    random gap and the per-size gains of the quality source, each with its interval, and the verdict."""
    reference, quality = verdict["sources"]
    sizes = verdict["sizes"]
    head = ["readout", "random init", *[f"{s} n={n}" for s in (reference, quality) for n in sizes]]
    head += ["pretrained - random (CI)", *[f"{quality} - {reference} n={n} (CI)" for n in sizes], "verdict"]

    def ci(x: dict[str, Any]) -> str:
        return f"{x['gain']:+.3g} ({x['lo']:+.3g}, {x['hi']:+.3g})"

    rows = []
    for row in verdict["table"]:
        digits = 2 if row["unit"] == "mIoU" else 4
        cells = [f"{row['readout']} ({row['unit']})", f"{row['random']:.{digits}f}"]
        cells += [f"{row[f'{s}@{n}']:.{digits}f}" for s in (reference, quality) for n in sizes]
        cells += [ci(row["gap_vs_random"])] + [ci(row["gain"][str(n)]) for n in sizes]
        cells.append(verdict["per_readout"][row["readout"]]["transfer"])
        rows.append(cells)
    return head, rows


def readout_caveat(cfg: ReproduceConfig, study: ScalingConfig) -> str:
    seeds, r = len(study.grid.seeds), len(cfg.readouts.seeds)
    text = (
        f"{seeds} pretraining seed(s) per point (both caption sources share each seed: initialisation and data "
        f"order), {r} readout seed(s) per encoder (the same training scenes for every encoder), "
        f"{cfg.readouts.num_val} held-out scenes; intervals are paired {cfg.level:.0%} bootstrap intervals over "
        "pretraining seeds and held-out scenes jointly."
    )
    if seeds < 2:
        text += " With one pretraining seed they do not include seed-to-seed variation of pretraining."
    return text


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def verdict_markdown(verdict: dict[str, Any], command: str, seconds: float, seeds: tuple[int, ...]) -> str:
    lines = [
        f"**Do quality captions give better transfer?** {verdict['transfer']}. "
        f"**Better data efficiency?** {verdict['data_efficiency']}.",
        "",
        *[f"- {line}" for line in verdict["lines"]],
        "",
        f"Caveat: {verdict['caveat']}",
        "",
        *(_markdown_table(*readout_table(verdict)) if verdict.get("table") else []),
        "",
        f"Command: `{command}`; seeds {list(seeds)}; wall time {seconds / 60:.1f} min (all invocations).",
    ]
    return "\n".join(lines)


__all__ = [
    "ReproduceConfig",
    "readout_caveat",
    "readout_table",
    "readout_verdict",
    "run_toy_readouts",
    "ToyDataConfig",
    "study_config",
    "toy_verdict",
    "verdict_markdown",
    "write_toy_data",
]

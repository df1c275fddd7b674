"""The whole pipeline on the embedded default, end to end, in a few minutes on 2 CPU cores.

    python -m jobs.quickstart                    # everything under runs/quickstart
    python -m jobs.quickstart --out=runs/qs --pretrain_steps=300

Steps (each is the real job, called as a user would call it; each one skips work that is already done, so a
killed quickstart re-runs from where it stopped):
  1. synthworld  generate the synthetic world in the DataComp layout (+ downstream layouts)
  2. shard       DataComp parquet + images + DataCompDR-style synthetic captions -> WebDataset shards
  3. caption     train a tiny CoCa on the precise captions, then write 2 synthetic captions per image
                 for the shards as DataCompDR-style sidecar shards
  4. pretrain    DeepSpeed CLIP pretraining of the debug model on web captions + the CoCa captions of step 3
                 (the loader joins the sidecar shards to the image shards by key: ``data.syn_shards``), EMA
  5. finetune    segmentation and depth from the pretrained (EMA) image tower
  6. summary     a table of what each step wrote and its headline numbers
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import job_main, parse_config


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = "runs/quickstart"
    """Folder that receives every step's output."""
    num_samples: int = 1000
    """Image-text pairs in the pretraining pool."""
    image_size: int = 64
    """Scene size in pixels."""
    coca_steps: int = 40
    """Training steps of the tiny CoCa captioner (step 3)."""
    pretrain_steps: int = 100
    """Pretraining steps of the debug CLIP."""
    finetune_steps: int = 40
    """Training steps of each fine-tuning stage."""
    stages: tuple[str, ...] = ("segmentation", "depth")
    """Fine-tuning stages to run."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "image_size", "pretrain_steps", "finetune_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _step(title: str, fn: Callable[[], int | None]) -> float:
    print(f"\n=== {title}", flush=True)
    start = time.time()
    rc = fn()
    if rc not in (0, None):
        raise SystemExit(f"quickstart: step '{title}' failed with exit code {rc}")
    return time.time() - start


def caption_source(syn: Path) -> str:
    """Where the pretraining synthetic captions come from, from the caption job's done markers."""
    markers = [json.loads(p.read_text()) for p in sorted(syn.glob("*.caption.json"))]
    captioners = sorted({str(m.get("captioner", "?")).split(":")[0] for m in markers}) or ["?"]
    samples = sum(int(m.get("samples", 0)) for m in markers)
    captioned = sum(int(m.get("captioned", 0)) for m in markers)
    return (
        f"synthetic captions: {syn} ({', '.join(c.replace('coca', 'CoCa') for c in captioners)}, "
        f"{captioned} of {samples} samples captioned, {len(markers)} sidecar shards)"
    )


def run(cfg: QuickstartConfig) -> dict:
    from data_prep import caption, shard, synthworld, train_coca
    from jobs import finetune, pretrain

    out = Path(cfg.out)
    world, shards, syn = out / "world", out / "shards", out / "captions"
    coca, pre = out / "coca.pt", out / "pretrain"
    timings: dict[str, float] = {}

    timings["synthworld"] = _step(
        "1/5 synthworld: generate the synthetic world",
        lambda: synthworld.main(
            [
                f"--out={world}",
                f"--num_samples={cfg.num_samples}",
                "--num_finetune=0",
                "--num_val=200",
                "--layouts=datacomp",
                f"--world.image_size={cfg.image_size}",
            ]
        ),
    )
    timings["shard"] = _step(
        "2/5 shard: parquet + images + synthetic captions -> WebDataset shards",
        lambda: shard.main(
            [
                f"--source.parquet=['{world}/datacomp/metadata/*.parquet']",
                f"--syn.paths=['{world}/datacomp/syn/syn_captions.jsonl']",
                f"--output.path={shards}",
                "--output.samples_per_shard=250",
                "--image.resize_mode=none",
            ]
        ),
    )
    if not coca.exists():
        timings["train_coca"] = _step(
            "3/5 caption: train a tiny CoCa on precise captions",
            lambda: train_coca.main([f"--out={coca}", f"--steps={cfg.coca_steps}"]),
        )
    timings["caption"] = _step(
        "3/5 caption: 2 synthetic captions per image (sidecar shards)",
        lambda: caption.main(
            [
                "--preset=debug",
                f"--input.shards={shards}",
                f"--output.path={syn}",
                f"--captioner.checkpoint={coca}",
                "--captioner.num_captions=2",
                "--captioner.decode.max_len=12",
                "--execution.batch_size=128",
            ]
        ),
    )
    source = caption_source(syn)
    timings["pretrain"] = _step(
        f"4/5 pretrain: DeepSpeed CLIP (debug model) on web + CoCa captions\n    {source}",
        lambda: pretrain.main(
            [
                "--preset=debug",
                f"--data.shards={shards}",
                f"--data.syn_shards={syn}",
                f"--run_dir={pre}",
                f"--steps={cfg.pretrain_steps}",
                "--log.progress=false",
            ]
        ),
    )
    for stage in cfg.stages:
        timings[f"finetune_{stage}"] = _step(
            f"5/5 finetune: {stage} from the pretrained EMA image tower",
            lambda stage=stage: finetune.main(
                [
                    "--stage",
                    stage,
                    "--preset",
                    "synthetic",
                    f"--backbone.checkpoint={pre}/export/ema",
                    f"--run_dir={out}/finetune/{stage}",
                    f"--train.steps={cfg.finetune_steps}",
                ]
            ),
        )
    summary = {
        "out": str(out),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "pretrain_captions": source,
    }
    pre_summary = pre / "summary.json"
    if pre_summary.exists():
        summary["pretrain"] = json.loads(pre_summary.read_text())
    summary["finetune"] = {}
    for stage in cfg.stages:
        path = out / "finetune" / stage / "summary.json"
        if path.exists():
            summary["finetune"][stage] = json.loads(path.read_text())
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _headline(d: dict, keys: Sequence[str]) -> str:
    flat: dict = {}

    def walk(x: object, prefix: str = "") -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(x, (int, float)):
            flat[prefix[:-1]] = x

    walk(d)
    parts = []
    for key in keys:
        hits = [k for k in flat if k.endswith(key)]
        if hits:
            parts.append(f"{key}={flat[hits[0]]:.4g}")
    return ", ".join(parts)


@job_main("python -m jobs.quickstart")
def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(
        QuickstartConfig,
        argv,
        prog="python -m jobs.quickstart",
        job="quickstart",
        description=__doc__.split("\n\n")[0],
    )
    start = time.time()
    summary = run(cfg)
    print(f"\n=== quickstart: done in {time.time() - start:.0f} s; everything is under {cfg.out}/")
    rows = [
        ("world", f"{cfg.out}/world/datacomp", "DataComp-layout parquet + images + syn captions"),
        ("shards", f"{cfg.out}/shards", "WebDataset tars, sizes.json, manifest.json, failures.parquet"),
        (
            "captions",
            f"{cfg.out}/captions",
            "sidecar syn.json shards by the tiny CoCa: pretraining's syn captions",
        ),
        (
            "pretrain",
            f"{cfg.out}/pretrain",
            _headline(summary.get("pretrain", {}), ["loss", "zero_shot_top1"]),
        ),
    ]
    for stage, s in summary["finetune"].items():
        rows.append((stage, f"{cfg.out}/finetune/{stage}", _headline(s, ["mIoU", "miou", "rmse", "abs_rel"])))
    width = max(len(r[1]) for r in rows)
    for name, path, what in rows:
        print(f"  {name:<13} {path:<{width}}  {what}")
    print(f"  {'seconds':<13} {json.dumps(summary['seconds'])}")
    print(f"  {summary['pretrain_captions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

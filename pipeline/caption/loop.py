"""The synthetic world closes the loop: DataCompDR's recipe end to end, in miniature.

1. train a small CoCa on the world's *precise* captions (:mod:`pipeline.caption.train_coca`);
2. write held-out scenes as web-style shards whose ``txt`` is the *noisy* alt-text;
3. caption those shards with the caption job (sidecar ``syn.json``, K captions per image);
4. measure, against the world's ground truth, how often each caption names the image's objects: shape-word
   recall (true shapes named / shapes in the image) and precision (named shapes that are in the image).

    report = close_the_loop(LoopConfig(), work_dir="runs/loop")
    report["generated"]["recall"], report["noisy"]["recall"]
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.caption.captioners import CaptionerConfig
from pipeline.caption.decode import DecodeConfig
from pipeline.caption.job import (
    CaptionExecutionConfig,
    CaptionInputConfig,
    CaptionJobConfig,
    CaptionOutputConfig,
)
from pipeline.caption.train_coca import TrainCocaConfig, train_coca
from pipeline.data import synthworld as sw

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class LoopConfig:
    train: TrainCocaConfig = field(default_factory=TrainCocaConfig)
    """The small CoCa and the world it learns (the noisy split comes from the same world)."""
    num_eval: int = 64
    """Held-out scenes (world split ``val``) captioned through the caption job."""
    per_shard: int = 32
    """Scenes per noisy shard."""
    num_captions: int = 5
    """Captions per image."""
    decode: DecodeConfig = field(
        default_factory=lambda: DecodeConfig(strategy="sample", top_p=0.9, temperature=0.7, min_len=2)
    )
    """Decoding of the trained CoCa (max_len is set from the model's context)."""


def shape_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w in sw.THING_CLASSES}


def mention_stats(captions: Iterable[tuple[sw.Scene, Sequence[str]]]) -> dict[str, float]:
    """Mean shape-word recall / precision over every caption, and the share naming every object exactly."""
    recall, precision, exact, n = 0.0, 0.0, 0, 0
    for scene, texts in captions:
        truth = {t.shape for t in scene.things}
        for text in texts:
            named = shape_words(text)
            recall += len(named & truth) / len(truth)
            precision += len(named & truth) / len(named) if named else 0.0
            exact += named == truth
            n += 1
    n = max(n, 1)
    return {
        "recall": round(recall / n, 4),
        "precision": round(precision / n, 4),
        "exact": round(exact / n, 4),
        "captions": n,
    }


def write_noisy_shards(
    world: sw.WorldConfig, split: str, num_scenes: int, out: Path, per_shard: int
) -> list[sw.Scene]:
    """Scenes as web-style shards (``jpg``, noisy ``txt``, ``json``), keyed by uid; returns the scenes."""
    from pipeline.data.synth_export import encode_image
    from pipeline.data.tar import open_shard

    out.mkdir(parents=True, exist_ok=True)
    scenes = [sw.make_scene(world, i, split) for i in range(num_scenes)]
    for s, start in enumerate(range(0, num_scenes, per_shard)):
        with open_shard(str(out / f"{s:06d}.tar")) as sink:
            for scene in scenes[start : start + per_shard]:
                sink.write(
                    {
                        "__key__": scene.uid,
                        "jpg": encode_image(scene.image),
                        "txt": scene.noisy_caption,
                        "json": {"uid": scene.uid, "source": "synthworld"},
                    }
                )
    return scenes


def read_sidecars(folder: Path) -> dict[str, list[str]]:
    """{uid: synthetic captions} of every caption sidecar tar in ``folder``."""
    from pipeline.data.schema import SYN_KEY, decode_syn
    from pipeline.data.tar import iter_tar_samples

    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.tar")):
        with open(path, "rb") as f:
            for key, members in iter_tar_samples(f):
                if SYN_KEY in members:
                    out[key] = decode_syn(members[SYN_KEY])
    return out


def close_the_loop(
    cfg: LoopConfig, work_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train, caption the noisy split through the caption job, and compare both captions to the truth."""
    from pipeline.caption.job import run_job

    work = Path(work_dir)
    ckpt = work / "coca_world.pt"
    train = train_coca(cfg.train, str(ckpt), log=log)
    scenes = write_noisy_shards(cfg.train.world, "val", cfg.num_eval, work / "noisy", cfg.per_shard)
    job = CaptionJobConfig(
        input=CaptionInputConfig(shards=str(work / "noisy")),
        output=CaptionOutputConfig(path=str(work / "syn")),
        captioner=CaptionerConfig(
            arch="coca_debug",
            checkpoint=str(ckpt),
            device="cpu",
            num_captions=cfg.num_captions,
            decode=replace(cfg.decode, max_len=train["context_length"] + 1),
        ),
        execution=CaptionExecutionConfig(batch_size=64, decode_threads=2),
    )
    summary = run_job(job, log=log)
    generated = read_sidecars(work / "syn")
    report = {
        "train": train,
        "caption_job": summary,
        "generated": mention_stats((s, generated[s.uid]) for s in scenes),
        "noisy": mention_stats((s, [s.noisy_caption]) for s in scenes),
        "examples": [
            {
                "uid": s.uid,
                "truth": s.precise_caption,
                "noisy": s.noisy_caption,
                "generated": generated[s.uid][:2],
            }
            for s in scenes[:4]
        ],
    }
    (work / "loop_report.json").write_text(json.dumps(report, indent=2))
    return report

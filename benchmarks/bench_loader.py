"""Loader throughput: our loader vs open_clip's WebDataset pipeline on the same shards, side by side.

Both decode the JPEG, apply RandomResizedCrop(224, scale=(0.9, 1.0), bicubic) + CLIP normalisation and
tokenize the caption (ours also reads ``syn.json`` and tokenizes a synthetic caption: more work), with sample
shuffle buffers of 1000 (ours) / 5000 (open_clip's default), over one pass of the same shards. Runs alternate
(ours, open_clip, ours, ...) so load on a shared machine hits both alike; the median of ``--repeats`` runs
is reported, as samples/s of wall time and per CPU-second (this process plus its DataLoader workers: the
per-core figure, robust on a shared machine). ``--workers 0`` decodes in the main process, one torch thread.

    .venv/bin/python -m benchmarks.bench_loader                     # writes 2048 synthetic 256 px samples
    .venv/bin/python -m benchmarks.bench_loader --shards 'data/{00000..00007}.tar' --samples 80000 --workers 2

open_clip's pipeline is run as its trainer runs it, except that webdataset 1.0.2's end-of-shard marker
(which makes open_clip fail with ``KeyError: 'fname'``) is switched off, as in webdataset <= 0.2.86.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def write_bench_shards(folder: Path, num_samples: int, per_shard: int, image_size: int) -> str:
    """Synthetic-world samples (JPEG q95, web + 5 synthetic captions, json) in the project's schema."""
    from pipeline.data import schema
    from pipeline.data.synth_export import shard_pattern, write_pretraining_shards
    from pipeline.data.synthworld import WorldConfig

    write_pretraining_shards(
        folder, WorldConfig(image_size=image_size), num_samples, per_shard, "train", num_syn=5
    )
    num_shards = (num_samples + per_shard - 1) // per_shard
    sizes = {f"{s:05d}.tar": min(per_shard, num_samples - s * per_shard) for s in range(num_shards)}
    (folder / schema.SIZES_FILE).write_text(json.dumps(sizes))
    return shard_pattern(folder, num_shards)


def run_ours(shards: str, batch: int, workers: int, image_size: int) -> int:
    from pipeline.data.loader import LoaderConfig, build_loader
    from pipeline.data.tokenizer import get_tokenizer

    cfg = LoaderConfig(
        shards=shards,
        micro_batch=batch,
        num_workers=workers,
        shuffle_buffer=1000,
        epochs=1,
        image_size=image_size,
        scale=(0.9, 1.0),
    )
    n = 0
    for b in build_loader(cfg, 0, 1, get_tokenizer("ViT-B-16")):
        n += b["image"].shape[0]
    return n


def run_open_clip(shards: str, num_samples: int, batch: int, workers: int, image_size: int) -> int:
    import open_clip
    import open_clip_train.data as ocd
    from open_clip.transform import AugmentationCfg, image_transform
    from webdataset.tariterators import tar_file_expander

    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    args = SimpleNamespace(
        train_data=shards,
        val_data=None,
        train_num_samples=num_samples,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch,
        workers=workers,
        world_size=1,
    )
    preprocess = image_transform(image_size, is_train=True, aug_cfg=AugmentationCfg(scale=(0.9, 1.0)))
    data = ocd.get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    n = 0
    for images, _texts in data.dataloader:
        n += images.shape[0]
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shards", default=None, help="existing shards (brace pattern); default: write synthetic ones"
    )
    p.add_argument("--samples", type=int, default=2048, help="samples to write / in --shards")
    p.add_argument("--source-size", type=int, default=256, help="side of the written images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="0: main process, one thread (per-core figure)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.workers == 0:
        torch.set_num_threads(1)
    import open_clip  # noqa: F401  (import once, outside the timed runs)
    import open_clip_train.data  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = args.shards
        if shards is None:
            t0 = time.perf_counter()
            shards = write_bench_shards(Path(tmp), args.samples, 256, args.source_size)
            print(f"wrote {args.samples} samples in {time.perf_counter() - t0:.1f}s")
        wall: dict[str, list[float]] = {"ours": [], "open_clip": []}
        cpu: dict[str, list[float]] = {"ours": [], "open_clip": []}
        counts: dict[str, int] = {}
        for r in range(args.repeats):
            for name in wall:
                t0, c0 = time.perf_counter(), _cpu_seconds()
                if name == "ours":
                    n = run_ours(shards, args.batch, args.workers, args.image_size)
                else:
                    n = run_open_clip(shards, args.samples, args.batch, args.workers, args.image_size)
                gc.collect()  # shut open_clip's persistent workers down, so their CPU time is counted
                dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
                wall[name].append(n / dt)
                cpu[name].append(n / dc)
                counts[name] = n
                print(
                    f"run {r}: {name:9s} {n} samples in {dt:.2f}s wall, {dc:.2f} CPU-s: "
                    f"{n / dt:.1f} samples/s, {n / dc:.1f} per CPU-second"
                )
    result = {name: statistics.median(v) for name, v in wall.items()}
    per_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"\nmedian over {args.repeats} runs, {args.workers} workers:")
    for name in wall:
        print(
            f"  {name:9s} {result[name]:8.1f} samples/s wall   {per_cpu[name]:8.1f} samples per CPU-second   "
            f"({counts[name]} samples)"
        )
    speedup = {"wall": result["ours"] / result["open_clip"], "cpu": per_cpu["ours"] / per_cpu["open_clip"]}
    print(f"  ours / open_clip: {speedup['wall']:.2f}x wall, {speedup['cpu']:.2f}x per CPU-second")
    if args.json:
        out = {
            "samples_per_s": result,
            "samples_per_cpu_s": per_cpu,
            "wall": wall,
            "cpu": cpu,
            "speedup": speedup,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined by then)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())

"""Shard-job throughput vs img2dataset on the same images over loopback HTTP, in one run.

Both tools read the same parquet (uid, url, text) of JPEGs served by a local HTTP server, resize to 256
(center crop: the same geometry in both), re-encode at JPEG quality 90 and write WebDataset tars. Reported
per tool: wall time of the whole command (start-up included), samples/s, samples/s per process, and samples
per CPU-second of the tool's processes (user + sys; a per-core figure that other load on the machine does not
distort).

    .venv/bin/python -m benchmarks.bench_shard --num-images 2000 --processes 1
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.prep.fixtures import LoopbackServer, encode, scene_image
from pipeline.tools import img2dataset_executable

REPO = Path(__file__).resolve().parent.parent


def make_images(folder: Path, num_images: int, side: int, seed: int = 0) -> list[str]:
    """``num_images`` distinct JPEGs (~side x 0.75 side) from synthetic-world scenes: crops, flips, qualities."""
    rng = np.random.default_rng(seed)
    bases = [scene_image(i, size=512)[1] for i in range(min(48, num_images))]
    names = []
    for i in range(num_images):
        im = bases[i % len(bases)]
        w = int(rng.integers(400, 513))
        h = int(w * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, 513 - w)), int(rng.integers(0, 513 - h))
        im = im.crop((x, y, x + w, y + h)).resize((side, int(side * h / w)), Image.Resampling.BILINEAR)
        if i % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        name = f"{i:07d}.jpg"
        (folder / name).write_bytes(encode(im, "JPEG", quality=int(rng.integers(85, 96))))
        names.append(name)
    return names


def _timed(
    cmd: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    return wall, cpu, done


def count_samples(folder: Path) -> int:
    import tarfile

    n = 0
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as tf:
            n += sum(1 for m in tf if m.name.endswith(".jpg"))
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=640, help="source image width in pixels")
    parser.add_argument("--processes", type=int, default=1, help="worker processes for both tools")
    parser.add_argument("--threads", type=int, default=16, help="download threads per process, both tools")
    parser.add_argument("--workdir", default="", help="keep inputs/outputs here (default: a temp dir)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_shard_"))
    www = work / "www"
    shutil.rmtree(work / "out_ours", ignore_errors=True)
    shutil.rmtree(work / "out_ours_kr", ignore_errors=True)
    shutil.rmtree(work / "out_img2dataset", ignore_errors=True)
    www.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    names = sorted(p.name for p in www.glob("*.jpg"))
    if len(names) != args.num_images:
        shutil.rmtree(www)
        www.mkdir()
        names = make_images(www, args.num_images, args.side)
    print(
        f"{len(names)} images, {sum((www / n).stat().st_size for n in names) / len(names) / 1024:.0f} KiB "
        f"mean, ready in {time.time() - t0:.0f}s",
        flush=True,
    )
    server = LoopbackServer(www)
    try:
        pq.write_table(
            pa.table(
                {
                    "uid": [n[:-4] for n in names],
                    "url": [f"{server.url}/{n}" for n in names],
                    "text": [f"image {n}" for n in names],
                }
            ),
            work / "meta.parquet",
        )
        per_shard = max(1, args.num_images // (4 * args.processes))
        ours = [
            sys.executable,
            "-m",
            "data_prep.shard",
            f"--source.parquet=['{work}/meta.parquet']",
            "--image.size=256",
            "--image.quality=90",
            f"--fetch.threads={args.threads}",
            f"--output.samples_per_shard={per_shard}",
            f"--executor.processes={args.processes}",
            "--executor.progress=false",
            "--filters.dedupe_uid=false",
        ]
        i2d = [
            str(img2dataset_executable()),
            f"--url_list={work}/meta.parquet",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=text",
            "--output_format=webdataset",
            f"--output_folder={work}/out_img2dataset",
            f"--processes_count={args.processes}",
            f"--thread_count={args.threads}",
            "--image_size=256",
            "--resize_mode=center_crop",
            "--encode_quality=90",
            f"--number_sample_per_shard={per_shard}",
            "--enable_wandb=False",
            "--retries=0",
        ]
        runs = [
            (
                "ours, center_crop 256",
                ours + ["--image.resize_mode=center_crop", f"--output.path={work}/out_ours"],
                None,
                work / "out_ours",
            ),
            (
                "img2dataset 1.47.0, center_crop 256",
                i2d,
                None,
                work / "out_img2dataset",
            ),
            (
                "ours, keep_ratio_largest 256",
                ours + ["--image.resize_mode=keep_ratio_largest", f"--output.path={work}/out_ours_kr"],
                None,
                work / "out_ours_kr",
            ),
        ]
        rows = []
        for name, cmd, env, out in runs:
            wall, cpu, _ = _timed(cmd, env)
            n = count_samples(out)
            rows.append((name, n, wall, cpu))
            print(f"{name}: {n} samples, {wall:.1f}s wall, {cpu:.1f}s CPU", flush=True)
    finally:
        server.stop()
    base = rows[1]
    print(
        f"\nmachine: {os.cpu_count()} cores; {args.num_images} images of {args.side} px; "
        f"{args.processes} process(es) x {args.threads} threads each\n"
    )
    print(
        "| tool | samples | wall s | samples/s | samples/s per process | samples per CPU-s | vs img2dataset (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, n, wall, cpu in rows:
        ratio = (n / cpu) / (base[1] / base[3])
        print(
            f"| {name} | {n} | {wall:.1f} | {n / wall:.0f} | {n / wall / args.processes:.0f} | "
            f"{n / cpu:.0f} | {ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shard-job bookkeeping at scale: plan (global uid dedupe), shard accounting and merge on DataComp-style
metadata of 1M / 10M / 50M rows, peak RSS per process and time per stage, partitioned vs in-memory path.

The inputs are parquet files of (uid, url, text, clip_l14_similarity_score) with 2% of the rows repeating a uid
from a shared pool, so duplicates are spread across files. No image is fetched: the ``shard`` stage here is
the job's per-unit bookkeeping only (read the unit's rows, drop its duplicate uids, write its ``.stats.json``
with uids, image sha256s (1% from a small pool of images: cross-shard duplicates) and failures, and an empty
tar), so that plan and merge see exactly what a real run gives them. Each stage runs in a fresh process;
reported: wall seconds, CPU seconds (user + sys of the stage process and its workers: the per-core figure a
shared machine does not distort), the stage process's peak RSS and the largest peak RSS of its worker processes
(``VmHWM`` of each process, the workers' sampled every 50 ms; ``resource.getrusage`` ``ru_maxrss`` of
RUSAGE_SELF / RUSAGE_CHILDREN is printed too, but Linux carries the launching process's high-water mark
across fork + exec into it, so it is only an upper bound). The in-memory path
(``plan.dedupe=memory``) runs beside it up to ``--memory-path-max-rows``, and its duplicate rows and dataset
files are checked to be identical to the partitioned path's.

With ``--shards`` the ``shard`` stage is the job's real one on both paths (``data_prep.shard --stage shard``:
fetch, sha256, integrity decode, tar, stats) over a pool of IMAGE_POOL tiny JPEGs served from files (16 px,
below the 256 px target, so they pass through byte for byte; the cheapest honest image work), with subset
lists on; then every published file of the two paths (each tar and stats file, sizes.json, manifest.json,
failures.parquet, duplicate_images.txt, the subset lists) is compared byte for byte.

    .venv/bin/python -m benchmarks.bench_prep_scale --rows 1000000 10000000 --max-memory-gb 0.25 --processes 2
    nice -n 10 .venv/bin/python -m benchmarks.bench_prep_scale --rows 1000000 --shards --processes 2
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
ROWS_PER_FILE = 250_000
SAMPLES_PER_SHARD = 10_000
DUP_FRACTION = 0.02
IMAGE_POOL = 100_003
SUBSET_FRACTIONS = "[0.01,0.1]"


# ----------------------------------------------------------------------------------------------- inputs


def _hex_strings(raw: bytes, width: int) -> pa.Array:
    """``raw`` as lowercase hex, cut into strings of ``width`` characters (vectorised)."""
    data = raw.hex().encode()
    n = len(data) // width
    offsets = np.arange(0, n * width + 1, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])


@functools.lru_cache(maxsize=1)
def _base_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_jpeg(k: int) -> bytes:
    """A 16 x 16 RGB JPEG made unique by a comment segment holding ``k`` (one encode, then a byte splice):
    below the 256 px target, so the job passes it through byte for byte after an integrity decode."""
    base, payload = _base_jpeg(), f"bench image {k}".encode()
    return base[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + base[2:]


def generate(folder: Path, num_rows: int, seed: int = 0, images: bool = False) -> None:
    """DataComp-style metadata in files of ROWS_PER_FILE rows (row groups of SAMPLES_PER_SHARD). With
    ``images``, row ``r``'s url is ``img/<r mod IMAGE_POOL>.jpg`` and that pool of tiny JPEGs is written under
    ``folder/img/`` (a shard holds consecutive rows, so its images are distinct; across shards each image
    repeats every IMAGE_POOL rows: cross-shard duplicates for the merge's image dedupe)."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        (folder / "img").mkdir(exist_ok=True)
        for k in range(min(num_rows, IMAGE_POOL)):
            (folder / "img" / f"{k}.jpg").write_bytes(tiny_jpeg(k))
    pool = _hex_strings(np.random.default_rng([seed, 1]).bytes(16 * max(1, num_rows // 100)), 32)
    for f, start in enumerate(range(0, num_rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, num_rows - start)
        rng = np.random.default_rng([seed, 2, f])
        uids = _hex_strings(rng.bytes(16 * n), 32)
        dup = np.flatnonzero(rng.random(n) < DUP_FRACTION)
        idx = np.arange(n)
        combined = pa.concat_arrays([uids, pc.take(pool, pa.array(rng.integers(0, len(pool), len(dup))))])
        idx[dup] = n + np.arange(len(dup))
        uids = pc.take(combined, pa.array(idx))
        k = pa.array(np.arange(start, start + n) % IMAGE_POOL).cast(pa.string())
        prefix = "img/" if images else "https://img.example.com/"
        url = pc.binary_join_element_wise(prefix, k, ".jpg", "")
        text = pc.binary_join_element_wise("a photo of thing number ", k, "")
        score = pa.array(rng.uniform(0.1, 0.45, n).astype(np.float32))
        table = pa.table({"uid": uids, "url": url, "text": text, "clip_l14_similarity_score": score})
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=SAMPLES_PER_SHARD)


# ----------------------------------------------------------------------------------------------- stages


def job_config(
    inputs: Path, out: Path, mode: str, max_memory_gb: float, processes: int, shards: bool = False
) -> Any:
    """The shard job's config; ``shards``: the real job over the image pool (pass-through JPEGs, subset
    lists), else the bookkeeping-only simulation's."""
    from pipeline.cli import parse_config
    from pipeline.data.prep.job import ShardJobConfig

    real = [f"--source.image_root={inputs}", "--fetch.threads=2", f"--subsets.fractions={SUBSET_FRACTIONS}"]
    args = [
        *(real if shards else []),
        f"--source.parquet=['{inputs}/part-*.parquet']",
        f"--output.path={out}",
        f"--output.samples_per_shard={SAMPLES_PER_SHARD}",
        f"--executor.processes={processes}",
        "--executor.progress=false",
        f"--plan.dedupe={mode}",
        f"--plan.max_memory_gb={max_memory_gb}",
    ]
    cfg, _ = parse_config(ShardJobConfig, args, prog="bench", description="")
    return cfg


class SimUnit:
    """The shard stage's bookkeeping for one unit, without images (picklable for the process pool)."""

    def __init__(self, output: str, chash: str) -> None:
        self.output, self.chash = output, chash

    def __call__(self, unit: Any) -> dict[str, Any]:
        from pipeline.data.prep.partition import read_duplicate_rows
        from pipeline.data.prep.writer import stats_url, write_json

        pf = pq.ParquetFile(unit.url)
        uids = pf.read_row_group(unit.start // SAMPLES_PER_SHARD, columns=["uid"]).column(0).to_pylist()
        dups = read_duplicate_rows(unit.duplicates, unit.input_index, unit.start, unit.end)
        kept, sha, failures, seen = [], [], [], set()
        for row, uid in enumerate(uids, start=unit.start):
            if row in dups or uid in seen:
                failures.append({"row": row, "uid": uid, "reason": "duplicate_uid", "detail": ""})
                continue
            seen.add(uid)
            kept.append(uid)
            h = zlib.crc32(uid.encode())
            sha.append(f"{h % 1000:064x}" if h % 100 == 0 else uid + uid)  # 1%: a small shared pool
        (Path(self.output) / unit.name).write_bytes(b"")
        stats = {
            "shard": unit.name,
            "index": unit.index,
            "config_hash": self.chash,
            "num_input": unit.end - unit.start,
            "num_kept": len(kept),
            "num_failed": len(failures),
            "failed": {"duplicate_uid": len(failures)} if failures else {},
            "bytes": 0,
            "uids": kept,
            "sha256": sha,
            "failures": failures,
        }
        write_json(stats_url(self.output, unit.name), stats, str(Path(self.output) / "_tmp"))
        return {"ok": True}


def run_stage(
    stage: str, inputs: Path, out: Path, mode: str, max_memory_gb: float, processes: int, shards: bool
) -> None:
    from pipeline.data.prep.executors import run_units
    from pipeline.data.prep.job import config_hash, make_plan, merge, run

    cfg = job_config(inputs, out, mode, max_memory_gb, processes, shards)
    chash = config_hash(cfg)
    quiet = lambda s: None  # noqa: E731
    if stage == "plan":
        make_plan(cfg, chash, quiet)
    elif stage == "shard" and shards:  # the job's real shard stage: fetch, check, tar, stats
        run(cfg, stage="shard", log=quiet)
    elif stage == "shard":
        plan = make_plan(cfg, chash, quiet)
        units = plan.units(cfg.output)
        for _ in run_units(SimUnit(str(out), chash), units, cfg.executor):
            pass
    elif stage == "merge":
        plan = make_plan(cfg, chash, quiet)
        assert merge(cfg, plan, plan.units(cfg.output), log=quiet) is not None


def measure(
    stage: str, inputs: Path, out: Path, mode: str, max_memory_gb: float, processes: int, shards: bool
) -> dict:
    """Run one stage in a fresh process; wall seconds and peak RSS (MB) of it and of its workers."""
    cmd = [sys.executable, "-m", "benchmarks.bench_prep_scale", "--one-stage", stage, "--inputs", str(inputs)]
    cmd += ["--out", str(out), "--mode", mode, "--max-memory-gb", str(max_memory_gb)]
    cmd += ["--processes", str(processes)] + (["--shards"] if shards else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{stage} ({mode}) failed:\n{done.stderr[-3000:]}")
    return {
        "stage": stage,
        "mode": mode,
        "seconds": round(wall, 1),
        **json.loads(done.stdout.splitlines()[-1]),
    }


def _hwm_kb(pid: int | str) -> int:
    """The process's own peak RSS (VmHWM of its address space; 0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _WorkerPeaks(threading.Thread):
    """Samples the VmHWM of this process's children every 50 ms (the peak of each worker process)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for task in Path("/proc/self/task").iterdir():
                try:
                    pids = [int(p) for p in (task / "children").read_text().split()]
                except OSError:
                    continue
                for pid in pids:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), _hwm_kb(pid))


def _one_stage(args: argparse.Namespace) -> None:
    sampler = _WorkerPeaks()
    sampler.start()
    run_stage(
        args.one_stage,
        Path(args.inputs),
        Path(args.out),
        args.mode,
        args.max_memory_gb,
        args.processes,
        args.shards,
    )
    sampler.stop.set()
    sampler.join()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    out = {
        "cpu_s": round(cpu, 1),
        "rss_main_mb": round(_hwm_kb("self") / 1024),
        "rss_worker_mb": round(max(sampler.peaks.values(), default=0) / 1024),
        "num_workers": len(sampler.peaks),
        # ru_maxrss: Linux carries the launching process's high-water mark across fork + exec into it, so
        # these include the launcher's size (an upper bound, not the process's own peak)
        "ru_maxrss_main_mb": round(me.ru_maxrss / 1024),
        "ru_maxrss_worker_mb": round(kids.ru_maxrss / 1024),
    }
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------- checks


def duplicate_rows(out: Path) -> pa.Table:
    """Every (input, row) the plan marks as a duplicate, sorted, from either path's files."""
    files = sorted(out.glob("_plan/*/duplicates/bucket-*.parquet")) or [out / "_plan" / "duplicates.parquet"]
    t = pa.concat_tables([pq.read_table(f) for f in files]).select(["input", "row"])
    return t.sort_by([("input", "ascending"), ("row", "ascending")])


DATASET_FILES = ("sizes.json", "manifest.json", "failures.parquet", "duplicate_images.txt")


def published_digests(out: Path) -> dict[str, str]:
    """sha256 of every published file (tars, stats, dataset files, subset lists; not the plan, the merge's
    scratch or temporaries), a stats file without its ``seconds`` (wall time, not content)."""
    got = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not p.is_file() or rel.parts[0] in ("_plan", "_merge", "_tmp"):
            continue
        h = hashlib.sha256()
        if p.name.endswith(".stats.json"):
            h.update(json.dumps({**json.loads(p.read_bytes()), "seconds": None}, sort_keys=True).encode())
        else:
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        got[str(rel)] = h.hexdigest()
    return got


def compare_paths(a: Path, b: Path, rows: int, shards: bool) -> None:
    """Raise unless both paths published the same files with the same bytes (with ``shards``: every tar,
    stats file and subset list too; else the dataset files)."""
    if shards:
        da, db = published_digests(a), published_digests(b)
        differ = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
        num_tars = sum(k.endswith(".tar") for k in da)
        print(
            f"{rows:,} rows: {len(da)} published files ({num_tars} tars, "
            f"{sum(f.stat().st_size for f in a.glob('*.tar')):,} tar bytes): "
            f"{len(differ)} differ between the partitioned and in-memory paths",
            flush=True,
        )
        if differ or not num_tars:
            raise AssertionError(f"{rows}: files differ between the two paths: {differ[:10]}")
        return
    same = all((a / f).read_bytes() == (b / f).read_bytes() for f in DATASET_FILES)
    print(f"{rows:,} rows: partitioned and in-memory dataset files identical: {same}", flush=True)
    if not same:
        raise AssertionError(f"{rows}: dataset files differ between the two paths")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument(
        "--max-memory-gb", type=float, default=0.25, help="plan.max_memory_gb (fixed across sizes)"
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--memory-path-max-rows", type=int, default=10_000_000)
    p.add_argument(
        "--shards",
        action="store_true",
        help="run the job's real shard stage on both paths (tiny pass-through JPEGs from a pool of "
        f"{IMAGE_POOL:,} files) and byte-compare every tar, stats file and dataset file",
    )
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--one-stage", default="", help=argparse.SUPPRESS)
    p.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="partitioned", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_stage:
        _one_stage(args)
        return 0
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prep_scale_"))
    results = []
    try:
        for rows in args.rows:
            inputs = work / (f"in_{rows}_img" if args.shards else f"in_{rows}")
            t0 = time.perf_counter()
            if not inputs.exists():  # generated beside, then renamed: a killed run leaves no partial input
                part = inputs.with_name(inputs.name + ".part")
                shutil.rmtree(part, ignore_errors=True)
                generate(part, rows, images=args.shards)
                part.rename(inputs)
            print(f"{rows:,} rows: generated in {time.perf_counter() - t0:.0f}s", flush=True)
            modes = ["partitioned"] + (["memory"] if rows <= args.memory_path_max_rows else [])
            for mode in modes:
                out = work / f"out_{rows}_{mode}"
                shutil.rmtree(out, ignore_errors=True)
                for stage in ("plan", "shard", "merge"):
                    if stage == "shard" and mode == "memory":
                        if not duplicate_rows(out).equals(duplicate_rows(work / f"out_{rows}_partitioned")):
                            raise AssertionError(f"{rows}: the two paths mark different duplicate rows")
                        if not args.shards:  # the simulated stats are the same: link the partitioned run's
                            src = work / f"out_{rows}_partitioned"
                            for f in src.iterdir():
                                if f.name.endswith((".tar", ".stats.json")):
                                    os.link(f, out / f.name)
                            continue
                    r = measure(stage, inputs, out, mode, args.max_memory_gb, args.processes, args.shards)
                    r["rows"] = rows
                    results.append(r)
                    print(json.dumps(r), flush=True)
            if "memory" in modes:
                compare_paths(
                    work / f"out_{rows}_partitioned", work / f"out_{rows}_memory", rows, args.shards
                )
            manifest = json.loads((work / f"out_{rows}_partitioned" / "manifest.json").read_text())
            print(f"{rows:,} rows: totals {json.dumps(manifest['totals'])}", flush=True)
            for mode in modes:
                shutil.rmtree(work / f"out_{rows}_{mode}", ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| rows | path | stage | wall s | CPU s | rows per CPU-s | peak RSS main (MB) | peak RSS worker (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r["rows"] / r["cpu_s"] if r["cpu_s"] else 0
        print(
            f"| {r['rows']:,} | {r['mode']} | {r['stage']} | {r['seconds']} | {r['cpu_s']} | {rate:,.0f} | "
            f"{r['rss_main_mb']:,} | {r['rss_worker_mb']:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests of the shard job's bounded-memory plan and merge (pipeline.data.prep.partition): the partitioned uid
dedupe keeps exactly the rows the in-memory one keeps and the shards come out byte-identical, the per-step
array stages add up to the one-process plan, and kill -9 during plan or merge resumes to identical files.

    .venv/bin/pytest tests/test_shard_scale.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import parse_config
from pipeline.data.prep.fixtures import encode, scene_image
from pipeline.data.prep.job import ShardJobConfig, find_duplicate_rows, run
from pipeline.data.prep.partition import (
    UID_SCHEMA,
    _read_group,
    _write_grouped,
    inputs_per_task,
    num_partitions,
    read_duplicate_rows,
)
from pipeline.data.prep.writer import OutputFolder

REPO = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-c", "import sys; from data_prep.shard import main; sys.exit(main(sys.argv[1:]))"]
TINY_BUDGET = "--plan.max_memory_gb=0.000002"  # ~8 uid rows per partition: many partitions, many buckets
GROUP_BUDGET = "--plan.max_memory_gb=0.00003"  # 2 input files per partition task, 3 partitions


def write_inputs(root: Path, num_files: int, rows: int, num_images: int = 6, seed: int = 0) -> Path:
    """``num_files`` DataComp-style parquet files whose uids repeat across (and within) files; every
    ``rows // num_images``-th row points at a real image, the others have no URL (they fail cheaply)."""
    rng = np.random.default_rng(seed)
    img = root / "img"
    img.mkdir(parents=True)
    paths = []
    for i in range(num_images):
        uid, im, _ = scene_image(i)
        (img / f"{uid}.jpg").write_bytes(encode(im, "JPEG", quality=90))
        paths.append(f"img/{uid}.jpg")
    pool = [f"{k:032x}" for k in range(num_files * rows * 2 // 3)]  # ~1/3 of the rows repeat a uid
    for f in range(num_files):
        uids: list[object] = [pool[k] for k in rng.integers(0, len(pool), rows)]
        uids[1] = None  # no uid: never a duplicate, fails as bad_uid
        uids[2] = f"  {uids[3]} "  # the same uid after trimming
        urls = [paths[(f * rows + r) % num_images] if r % 7 == 0 else None for r in range(rows)]
        texts = [f"caption {f}-{r}" for r in range(rows)]
        table = pa.table({"uid": uids, "url": urls, "text": texts, "clip_l14_similarity_score": [0.5] * rows})
        pq.write_table(table, root / f"part-{f:03d}.parquet", row_group_size=max(1, rows // 3))
    return root


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--source.parquet=['{root}/part-*.parquet']",
        f"--source.image_root={root}",
        f"--output.path={out}",
        "--output.samples_per_shard=16",
        "--image.size=32",
        "--filters.min_image_size=8",
        "--executor.processes=1",
        "--executor.progress=false",
        "--fetch.threads=1",
        "--subsets.fractions=[0.5]",
        *extra,
    ]


def config(root: Path, out: Path, *extra: str) -> ShardJobConfig:
    cfg, _ = parse_config(ShardJobConfig, args(root, out, *extra), prog="t", description="")
    return cfg


def files(out: Path) -> dict[str, bytes]:
    """Every published file of the output folder (shards, dataset files, subsets; stats without their
    timing), not the plan."""
    skip = ("_plan", "_merge", "_tmp")
    got = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.relative_to(out).parts[0] not in skip:
            data = p.read_bytes()
            if p.name.endswith(".stats.json"):
                data = json.dumps({**json.loads(data), "seconds": None}).encode()
            got[str(p.relative_to(out))] = data
    return got


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("scale"), num_files=5, rows=60)


@pytest.fixture(scope="module")
def reference(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole job through the old in-memory path (every uid in one process)."""
    out = tmp_path_factory.mktemp("memory")
    run(config(inputs, out, "--plan.dedupe=memory"), log=lambda s: None)
    return out


def unit_duplicates(out: Path, cfg: ShardJobConfig) -> set[tuple[int, int]]:
    plan = run(cfg, stage="plan", log=lambda s: None)["plan"]
    return {
        (u.input_index, r)
        for u in plan.units(cfg.output)
        for r in read_duplicate_rows(u.duplicates, u.input_index, u.start, u.end)
    }


def test_partition_count_comes_from_the_memory_budget() -> None:
    assert num_partitions(1_000_000, 256, 2.0) == 1
    assert num_partitions(12_800_000_000, 256, 2.0) == 1526  # ceil(12.8e9 x 256 / 2 GiB)
    assert num_partitions(10_000, 256, 0.000002) == 1193


def test_partition_tasks_read_as_many_input_files_as_the_budget_holds() -> None:
    assert inputs_per_task([1_000_000] * 12_800, 256, 2.0) == 8  # 2 GiB / (1M rows x 256 B)
    assert inputs_per_task([10, 1_000_000, 10], 256, 0.1) == 1  # the largest file decides; at least 1
    assert inputs_per_task([], 256, 2.0) == inputs_per_task([0], 256, 2.0) > 1_000_000


def test_a_parts_file_reader_reads_only_the_trailer_and_its_own_group(tmp_path: Path) -> None:
    uids = [f"{k:032x}" for k in range(50)]
    table = pa.table({"uid": uids, "input": [0] * 50, "row": list(range(50))}, schema=UID_SCHEMA)
    key = np.asarray([k % 7 for k in range(50)], np.uint64)
    key[key == 3] = 4  # group 3 is empty
    _write_grouped(OutputFolder(str(tmp_path)), ("x.parts",), table, key, 7)
    url = str(tmp_path / "x.parts")
    data = bytearray((tmp_path / "x.parts").read_bytes())
    trailer = 8 * 8 + 8
    offsets = np.frombuffer(bytes(data[-trailer:-8]), "<i8")
    lo, hi = int(offsets[5]), int(offsets[6])
    data[:lo] = b"\0" * lo  # every other group's bytes overwritten: group 5 still reads
    data[hi:-trailer] = b"\0" * (len(data) - trailer - hi)
    (tmp_path / "x.parts").write_bytes(bytes(data))
    assert _read_group(url, 5, 7, UID_SCHEMA).column("row").to_pylist() == [5, 12, 19, 26, 33, 40, 47]
    assert _read_group(url, 3, 7, UID_SCHEMA).num_rows == 0
    (tmp_path / "x.parts").write_bytes(bytes(data[:-3]))  # a cut-off file
    with pytest.raises(ValueError, match="x.parts: not a parts file"):
        _read_group(url, 5, 7, UID_SCHEMA)


@pytest.mark.parametrize("budget, num_input_groups", [(TINY_BUDGET, 5), (GROUP_BUDGET, 3)])
def test_partitioned_dedupe_finds_the_rows_the_in_memory_one_finds(
    inputs: Path, tmp_path: Path, budget: str, num_input_groups: int
) -> None:
    cfg = config(inputs, tmp_path / "p", budget)
    plan = run(cfg, stage="plan", log=lambda s: None)["plan"]
    assert len(list((tmp_path / "p" / "_plan").rglob("uids/inputs-*.parts"))) == num_input_groups
    assert plan.dedupe["num_partitions"] > (20 if budget == TINY_BUDGET else 2)
    assert plan.dedupe["num_buckets"] == min(5, plan.dedupe["num_partitions"])
    expected = find_duplicate_rows(plan.inputs, "uid")
    want = set(zip(expected.column("input").to_pylist(), expected.column("row").to_pylist()))
    assert len(want) > 50 and {i for i, _ in want} == set(range(5))  # repeats in every file
    assert unit_duplicates(tmp_path / "p", cfg) == want


def test_partitioned_and_in_memory_paths_write_byte_identical_shards(
    inputs: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "partitioned"
    run(config(inputs, out, TINY_BUDGET), log=lambda s: None)
    got, want = files(out), files(reference)
    assert got == want
    assert sum(name.endswith(".tar") for name in got) == 20
    assert (reference / "duplicate_images.txt").read_text().count("\n") > 3  # the image shuffle had work


def test_array_tasks_of_each_plan_and_merge_step_add_up_to_the_one_process_job(
    inputs: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "array"
    cfg = config(inputs, out, TINY_BUDGET)
    for stage in ("plan-partition", "plan-dedupe", "plan-gather"):
        for task in range(3):
            assert run(cfg, stage=stage, task_index=task, num_tasks=3, log=lambda s: None)["plan"] is None
    assert not (out / "_plan" / "plan.json").exists()
    for task in range(2):
        run(cfg, stage="shard", task_index=task, num_tasks=2, log=lambda s: None)
    for stage in ("merge-partition", "merge-dedupe"):
        for task in range(3):
            run(cfg, stage=stage, task_index=task, num_tasks=3, log=lambda s: None)
    assert not (out / "manifest.json").exists()
    run(cfg, stage="merge", log=lambda s: None)
    assert files(out) == files(reference)


def kill_when(cmd: list[str], ready: callable, what: str) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert proc.poll() is None, f"the job finished before it could be killed {what}: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_during_plan_then_rerun_gives_identical_plan_and_shards(
    inputs: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed_plan"
    a = args(inputs, out, TINY_BUDGET)
    kill_when(CMD + a + ["--stage=plan"], lambda: any((out / "_plan").rglob("part-*.parts")), "in the plan")
    assert not (out / "_plan" / "plan.json").exists()
    assert subprocess.run(CMD + a, cwd=REPO, capture_output=True).returncode == 0
    assert files(out) == files(reference)
    fresh = tmp_path / "fresh"
    run(config(inputs, fresh, TINY_BUDGET), stage="plan", log=lambda s: None)
    plan_files = sorted(p.relative_to(out) for p in (out / "_plan").rglob("*.parts"))
    plan_files += sorted(p.relative_to(out) for p in (out / "_plan").rglob("*.parquet"))
    assert len(plan_files) > 10
    assert plan_files == sorted(p.relative_to(fresh) for p in (fresh / "_plan").rglob("*.parts")) + sorted(
        p.relative_to(fresh) for p in (fresh / "_plan").rglob("*.parquet")
    )
    assert all((out / p).read_bytes() == (fresh / p).read_bytes() for p in plan_files)


def test_kill_9_during_merge_then_rerun_gives_identical_dataset_files(
    inputs: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed_merge"
    a = args(inputs, out, TINY_BUDGET)
    run(config(inputs, out, TINY_BUDGET), stage="shard", log=lambda s: None)
    kill_when(
        CMD + a + ["--stage=merge"], lambda: any((out / "_merge").rglob("part-*.parquet")), "in the merge"
    )
    assert not (out / "manifest.json").exists()
    assert subprocess.run(CMD + a + ["--stage=merge"], cwd=REPO, capture_output=True).returncode == 0
    assert files(out) == files(reference)

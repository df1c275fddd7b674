"""The img2dataset index joined per shard (issue 16 item 2): the per-shard index gives the same shard bytes
as the in-memory index (joined by uid and by url, webdataset and files output), a shard task loads only its
own rows' entries, and a killed index step is finished by a rerun to identical output. The img2dataset
output is written here in img2dataset's layout (``<key>.jpg`` + ``<key>.json`` with uid, url and status),
without running img2dataset (tests/test_shard_img2dataset.py runs the real tool).

    .venv/bin/pytest tests/test_shard_i2d_index.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_helpers import index_files, kill_and_rerun_during_index, tar_bytes

from data_prep.shard import main
from pipeline.cli import parse_config
from pipeline.data.prep.fixtures import encode, scene_image

REPO = Path(__file__).resolve().parent.parent
NUM_ROWS = 14
NUM_IMAGES = 12  # rows 12 and 13 have no image: not_in_img2dataset
SHARD = 3


def failures(out: Path) -> list[dict[str, object]]:
    return pq.read_table(out / "failures.parquet").to_pylist()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def _sample_json(uid: str, url: str, status: str = "success") -> bytes:
    return json.dumps({"url": url, "uid": uid, "status": status}, indent=4).encode()


class Inputs:
    """14 rows in two parquet files (8 + 6); an img2dataset webdataset output of 3 tars holding images for
    rows 0-11, a failed download, an image of no row and a later second image of row 2's uid (the first
    wins), and the same samples in the files output format."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uids, self.urls, rows = [], [], []
        for i in range(NUM_ROWS):
            uid, _, caption = scene_image(i, size=64)
            url = f"http://example.invalid/{uid}.jpg"
            self.uids.append(uid), self.urls.append(url), rows.append((uid, url, caption))
        for name, part in (("a.parquet", rows[:8]), ("b.parquet", rows[8:])):
            table = pa.table({k: [r[j] for r in part] for j, k in enumerate(("uid", "url", "text"))})
            pq.write_table(table, root / name, row_group_size=3)
        samples = [
            (self.uids[i], self.urls[i], encode(scene_image(i, size=64)[1]), "success") for i in range(12)
        ]
        samples.insert(
            5, ("stray", "http://example.invalid/stray.jpg", encode(scene_image(50)[1]), "success")
        )
        samples.insert(7, (self.uids[12], self.urls[12], b"", "failed_to_download"))
        samples.append((self.uids[2], self.urls[2], encode(scene_image(51)[1]), "success"))
        self.webdataset = root / "i2d_webdataset"
        self.files = root / "i2d_files"
        self.webdataset.mkdir()
        for shard in range(3):
            part = samples[shard * 5 : shard * 5 + 5]
            (self.files / f"{shard:05d}").mkdir(parents=True)
            with tarfile.open(self.webdataset / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
                for n, (uid, url, jpg, status) in enumerate(part):
                    key = f"{shard:05d}{n:04d}"
                    if jpg:
                        _add(tf, f"{key}.jpg", jpg)
                        (self.files / f"{shard:05d}" / f"{key}.jpg").write_bytes(jpg)
                    _add(tf, f"{key}.json", _sample_json(uid, url, status))
                    (self.files / f"{shard:05d}" / f"{key}.json").write_bytes(_sample_json(uid, url, status))
            (self.webdataset / f"{shard:05d}_stats.json").write_text("{}")

    def args(self, out: Path, *extra: str, i2d: Path | None = None) -> list[str]:
        return [
            f"--source.parquet=['{self.root}/*.parquet']",
            "--source.images=img2dataset",
            f"--source.img2dataset={i2d or self.webdataset}",
            "--image.resize_mode=none",
            f"--output.path={out}",
            f"--output.samples_per_shard={SHARD}",
            "--executor.processes=1",
            "--executor.progress=false",
            *extra,
        ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("join", ["uid", "url"])
@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_per_shard_img2dataset_join_writes_the_same_bytes_as_the_in_memory_index(
    inputs: Inputs, tmp_path: Path, join: str, layout: str
) -> None:
    i2d = inputs.webdataset if layout == "webdataset" else inputs.files
    memory, index, many = tmp_path / "memory", tmp_path / "index", tmp_path / "many"
    common = (f"--source.img2dataset_join={join}",)
    assert main(inputs.args(memory, *common, "--source.img2dataset_index=memory", i2d=i2d)) == 0
    assert main(inputs.args(index, *common, i2d=i2d)) == 0
    # a memory budget of ~2 KiB: 14 rows x 512 bytes -> 4 partitions
    assert main(inputs.args(many, *common, "--plan.max_memory_gb=0.000002", i2d=i2d)) == 0
    assert json.loads((many / "_plan" / "i2d_index" / "index.json").read_text())["num_partitions"] == 4
    assert tar_bytes(index) == tar_bytes(memory) == tar_bytes(many) != {}
    assert failures(index) == failures(memory) == failures(many)
    assert [(f["uid"], f["reason"]) for f in failures(index)] == [
        (uid, "not_in_img2dataset") for uid in inputs.uids[12:]
    ]
    assert not (memory / "_plan" / "i2d_index").exists()
    assert not (index / "_plan" / "img2dataset_index.parquet").exists()
    # the first image of a uid wins, as in the in-memory index: row 2's is scene 2, not the later scene 51
    with tarfile.open(index / "000000.tar") as tf:
        assert tf.extractfile(f"{inputs.uids[2]}.jpg").read() == encode(scene_image(2, size=64)[1])


def test_each_shard_task_loads_only_its_own_rows_img2dataset_entries(inputs: Inputs, tmp_path: Path) -> None:
    from pipeline.data.prep import index, job

    out = tmp_path / "out"
    assert main(inputs.args(out, "--plan.max_memory_gb=0.000002")) == 0
    plan_dir = str(out / "_plan")
    total = json.loads((out / "_plan" / "i2d_index" / "index.json").read_text())
    assert total["num_partitions"] == 4 and total["records"] == 14 and total["duplicates"] == 1
    u = inputs.uids
    units = [u[0:3], u[3:6], u[6:8], u[8:11], u[11:14]]  # a.parquet: 8 rows, b.parquet: 6, 3 per shard
    seen: set[str] = set()
    for unit, own in enumerate(units):
        mine = index.load_img2dataset_unit(plan_dir, unit, total["num_partitions"])
        assert set(mine) == set(own) & set(u[:NUM_IMAGES])
        seen |= set(mine)
    assert seen == set(u[:NUM_IMAGES])
    # a worker process holds no whole index: its per-process resources have none
    cfg, _ = parse_config(job.ShardJobConfig, inputs.args(out), prog="shard", description="", job="shard")
    res = job._Resources(cfg)
    assert res.img2dataset == {} and res.i2d_partitions == 4


def test_img2dataset_index_step_killed_with_sigkill_reruns_to_identical_output(
    inputs: Inputs, tmp_path: Path
) -> None:
    many = tmp_path / "i2d_many"  # many small tars: an index step long enough to be killed in
    many.mkdir()
    for t in range(200):
        with tarfile.open(many / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            i = t % NUM_IMAGES
            _add(tf, f"{t:05d}0000.jpg", encode(scene_image(i, size=64)[1]))
            uid = inputs.uids[i] if t < NUM_IMAGES else f"other_{t}"
            _add(tf, f"{t:05d}0000.json", _sample_json(uid, inputs.urls[i]))
    ref, out = tmp_path / "reference", tmp_path / "killed"
    assert main(inputs.args(ref, i2d=many)) == 0
    kill_and_rerun_during_index(inputs.args(out, "--stage=plan", i2d=many), out, "i2d_index")
    assert tar_bytes(out) == tar_bytes(ref) != {}
    assert index_files(out, "i2d_index") == index_files(ref, "i2d_index") != {}
    assert {p.parent for p in out.rglob("*.tmp-*")} <= {out / "_tmp"}


def test_manifest_totals_rows_with_synthetic_captions_and_sha256_mismatches(
    inputs: Inputs, tmp_path: Path
) -> None:
    from pipeline.data.prep.fixtures import write_datacompdr_tars

    def sha(i: int) -> str:
        return hashlib.sha256(encode(scene_image(i, size=64)[1])).hexdigest()

    records = [{"uid": inputs.uids[i], "syn_text": [f"caption {i}"], "sha256": sha(i)} for i in range(3)]
    records.append({"uid": inputs.uids[3], "syn_text": ["another image's"], "sha256": "0" * 64})
    write_datacompdr_tars(tmp_path / "dr", records)
    out = tmp_path / "out"
    assert main(inputs.args(out, f"--syn.paths=['{tmp_path / 'dr'}']")) == 0
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert (totals["syn"], totals["syn_sha256_mismatch"]) == (3, 1)

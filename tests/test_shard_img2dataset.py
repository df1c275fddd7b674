"""img2dataset itself produces the shard job's input: synthetic-world images served over loopback HTTP,
img2dataset downloads them (1 process, one shard) in both of its output formats (webdataset tars and
"files" folders), then we shard its output joined by uid (and by url). Rows img2dataset could not fetch fail
as not_in_img2dataset.

img2dataset runs as the plain command users run: from its own env (``.venv-img2dataset``, pinned by
``requirements/img2dataset.lock.txt``; ``bash scripts/dev.sh setup`` makes it, ``scripts/dev.sh test`` sets
$IMG2DATASET), never imported into the project's env, whose webdataset 1.x it conflicts with. When the tool
is missing the tests fail and say how to install it: they do not skip.

    .venv/bin/pytest tests/test_shard_img2dataset.py -q
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_helpers import run_img2dataset

from data_prep.shard import main
from pipeline.data.prep.fixtures import LoopbackServer, encode, scene_image
from pipeline.tools import REPO

NUM_IMAGES = 24


def _shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf})
    return members


def _jpgs(members: dict[str, bytes]) -> list[bytes]:
    return sorted(v for k, v in members.items() if k.endswith(".jpg"))


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory):
    """(folder, parquet of uid/url/text, the uids served): NUM_IMAGES JPEGs and one URL that 404s."""
    tmp = tmp_path_factory.mktemp("img2dataset_src")
    images = tmp / "www"
    images.mkdir()
    server = LoopbackServer(images)
    rows: dict[str, list[str]] = {"uid": [], "url": [], "text": []}
    for i in range(NUM_IMAGES):
        uid, im, caption = scene_image(i, size=96)
        (images / f"{uid}.jpg").write_bytes(encode(im))
        rows["uid"].append(uid), rows["url"].append(f"{server.url}/{uid}.jpg"), rows["text"].append(caption)
    rows["uid"].append("gone"), rows["url"].append(f"{server.url}/gone.jpg"), rows["text"].append("404")
    pq.write_table(pa.table(rows), tmp / "meta.parquet")
    try:
        yield tmp, tmp / "meta.parquet", set(rows["uid"][:NUM_IMAGES])
    finally:
        server.stop()


def _img2dataset(parquet: Path, output: Path, output_format: str) -> set[str]:
    """Run the img2dataset command; returns the uids it reports as downloaded."""
    run_img2dataset(
        parquet,
        output,
        output_format=output_format,
        resize_mode="center_crop",
        number_sample_per_shard=100,
        retries=0,
        timeout=5,
    )
    status = pq.read_table(output / "00000.parquet").to_pylist()
    return {r["uid"] for r in status if r["status"] == "success"}


def _shard(parquet: Path, i2d: Path, out: Path, *extra: str) -> dict[str, bytes]:
    args = [
        f"--source.parquet=['{parquet}']",
        "--source.images=img2dataset",
        f"--source.img2dataset={i2d}",
        "--image.resize_mode=none",
        "--output.samples_per_shard=10",
        "--executor.processes=1",
        "--executor.progress=false",
        f"--output.path={out}",
        *extra,
    ]
    assert main(args) == 0
    return _shard_members(out)


def test_img2dataset_is_pinned_in_its_own_lock_not_the_projects() -> None:
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / "requirements" / name).read_text().splitlines()
        return dict(line.lower().split("==", 1) for line in lines if "==" in line)

    project, tool = pins("lock.txt"), pins("img2dataset.lock.txt")
    assert "img2dataset" not in project and "albumentations" not in project
    assert tool["img2dataset"] == "1.47.0"
    assert tool["albumentations"].startswith("1.")  # what img2dataset's resizer calls (2.x removed it)
    assert "img2dataset" not in (REPO / "requirements" / "dev.txt").read_text()


@pytest.mark.slow
def test_img2dataset_webdataset_output_is_joined_by_uid_and_by_url_and_sharded(meta) -> None:
    tmp, parquet, uids = meta
    i2d = tmp / "i2d_webdataset"
    assert _img2dataset(parquet, i2d, "webdataset") == uids  # it really downloaded and resized them all
    with tarfile.open(i2d / "00000.tar") as tf:
        i2d_jpgs = sorted(tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg"))

    members = _shard(parquet, i2d, tmp / "by_uid")
    assert {name[: -len(".jpg")] for name in members if name.endswith(".jpg")} == uids
    # images already resized by img2dataset pass through byte for byte (no second re-encode)
    assert _jpgs(members) == i2d_jpgs
    failures = pq.read_table(tmp / "by_uid" / "failures.parquet").to_pylist()
    assert [(f["uid"], f["reason"]) for f in failures] == [("gone", "not_in_img2dataset")]

    assert _shard(parquet, i2d, tmp / "by_url", "--source.img2dataset_join=url") == members


@pytest.mark.slow
def test_img2dataset_files_output_is_joined_by_uid_and_sharded(meta) -> None:
    tmp, parquet, uids = meta
    i2d = tmp / "i2d_files"
    assert _img2dataset(parquet, i2d, "files") == uids
    i2d_jpgs = sorted(p.read_bytes() for p in (i2d / "00000").glob("*.jpg"))
    assert len(i2d_jpgs) == len(uids)

    members = _shard(parquet, i2d, tmp / "files")
    assert {name[: -len(".jpg")] for name in members if name.endswith(".jpg")} == uids
    assert _jpgs(members) == i2d_jpgs
    failures = pq.read_table(tmp / "files" / "failures.parquet").to_pylist()
    assert [(f["uid"], f["reason"]) for f in failures] == [("gone", "not_in_img2dataset")]

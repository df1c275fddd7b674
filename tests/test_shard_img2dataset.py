"""img2dataset itself produces the shard job's input: synthetic-world images served over loopback HTTP,
img2dataset's CLI downloads them (1 process, one shard), then we shard its output joined by uid (and by url,
and from its "files" layout). Rows img2dataset could not fetch fail as not_in_img2dataset.

img2dataset 1.25.4 needs albumentations 1.x helpers that albumentations 2 removed; the CLI runs with the
small shim from pipeline/data/prep/fixtures.py (``img2dataset_env``) on its PYTHONPATH.

    .venv/bin/pytest tests/test_shard_img2dataset.py -q
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.shard import main
from pipeline.data.prep.fixtures import LoopbackServer, encode, img2dataset_env, scene_image


def _shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf})
    return members


@pytest.mark.slow
def test_img2dataset_output_is_joined_by_uid_and_sharded(tmp_path: Path) -> None:
    images = tmp_path / "www"
    images.mkdir()
    server = LoopbackServer(images)
    rows: dict[str, list[str]] = {"uid": [], "url": [], "text": []}
    try:
        for i in range(24):
            uid, im, caption = scene_image(i, size=96)
            (images / f"{uid}.jpg").write_bytes(encode(im))
            (
                rows["uid"].append(uid),
                rows["url"].append(f"{server.url}/{uid}.jpg"),
                rows["text"].append(caption),
            )
        rows["uid"].append("gone"), rows["url"].append(f"{server.url}/gone.jpg"), rows["text"].append("404")
        pq.write_table(pa.table(rows), tmp_path / "meta.parquet")
        i2d = tmp_path / "i2d"
        cmd = [
            str(Path(sys.executable).with_name("img2dataset")),
            f"--url_list={tmp_path}/meta.parquet",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=text",
            "--save_additional_columns=['uid']",
            "--output_format=webdataset",
            f"--output_folder={i2d}",
            "--processes_count=1",
            "--thread_count=4",
            "--image_size=64",
            "--resize_mode=center_crop",
            "--number_sample_per_shard=100",
            "--enable_wandb=False",
            "--retries=0",
            "--timeout=5",
        ]
        done = subprocess.run(
            cmd, env=img2dataset_env(tmp_path / "shim"), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        server.stop()
    status = pq.read_table(i2d / "00000.parquet").to_pylist()
    ok = {r["uid"] for r in status if r["status"] == "success"}
    assert ok == set(rows["uid"][:24])  # img2dataset really downloaded and resized them
    i2d_jpgs = {}
    with tarfile.open(i2d / "00000.tar") as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                i2d_jpgs[m.name] = tf.extractfile(m).read()

    common = [
        f"--source.parquet=['{tmp_path}/meta.parquet']",
        "--source.images=img2dataset",
        "--image.resize_mode=none",
        "--output.samples_per_shard=10",
        "--executor.processes=1",
        "--executor.progress=false",
    ]
    assert main([*common, f"--source.img2dataset={i2d}", f"--output.path={tmp_path / 'by_uid'}"]) == 0
    members = _shard_members(tmp_path / "by_uid")
    kept = {name[: -len(".jpg")] for name in members if name.endswith(".jpg")}
    assert kept == ok
    # images already resized by img2dataset pass through byte for byte (no second re-encode)
    assert sorted(v for k, v in members.items() if k.endswith(".jpg")) == sorted(i2d_jpgs.values())
    failures = pq.read_table(tmp_path / "by_uid" / "failures.parquet").to_pylist()
    assert [(f["uid"], f["reason"]) for f in failures] == [("gone", "not_in_img2dataset")]

    assert (
        main(
            [
                *common,
                f"--source.img2dataset={i2d}",
                "--source.img2dataset_join=url",
                f"--output.path={tmp_path / 'by_url'}",
            ]
        )
        == 0
    )
    assert _shard_members(tmp_path / "by_url") == members

    # img2dataset's "files" layout (<shard>/<key>.jpg + .json) indexes to the same samples
    files = tmp_path / "i2d_files" / "00000"
    files.mkdir(parents=True)
    with tarfile.open(i2d / "00000.tar") as tf:
        for m in tf:
            (files / m.name).write_bytes(tf.extractfile(m).read())
    assert main([*common, f"--source.img2dataset={files.parent}", f"--output.path={tmp_path / 'files'}"]) == 0
    assert _shard_members(tmp_path / "files") == members

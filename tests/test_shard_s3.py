"""The shard job against S3: a real moto_server on 127.0.0.1 (credentials and endpoint from env, as in
production), inputs and outputs as s3:// URLs, S3 errors on single images reported per row.

    .venv/bin/pytest tests/test_shard_s3.py -q
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto_s3 import moto_s3

from data_prep.shard import main
from pipeline import io
from pipeline.data.prep.fixtures import encode, scene_image


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto_server on a free loopback port; yields the endpoint URL (env set for pipeline.io)."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


def _put(url: str, data: bytes) -> None:
    with io.atomic_write(url, "wb") as f:
        f.write(data)


def _cat(url: str) -> bytes:
    fs, path = io.filesystem(url)
    fs.invalidate_cache()
    return fs.cat_file(path)


def test_s3_inputs_and_outputs_match_a_local_output(s3: str, tmp_path: Path) -> None:
    fs, _ = io.filesystem("s3://data")
    fs.mkdir("data")
    rows: dict[str, list[object]] = {"uid": [], "url": [], "text": []}
    for i in range(6):
        uid, im, caption = scene_image(i)
        _put(f"s3://data/img/{uid}.jpg", encode(im))
        rows["uid"].append(uid), rows["url"].append(f"s3://data/img/{uid}.jpg"), rows["text"].append(caption)
    rows["uid"] += ["no_such_key", "no_such_bucket"]
    rows["url"] += ["s3://data/img/missing.jpg", "s3://bucket-that-does-not-exist/x.jpg"]
    rows["text"] += ["x", "y"]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(rows), buf)
    _put("s3://data/meta/part-0.parquet", buf.getvalue().to_pybytes())
    _put("s3://data/syn/syn.jsonl", json.dumps({"uid": rows["uid"][0], "syn_text": ["from s3"]}).encode())

    common = [
        "--source.parquet=['s3://data/meta/*.parquet']",
        "--syn.paths=['s3://data/syn/syn.jsonl']",
        "--output.samples_per_shard=3",
        "--image.size=48",
        "--fetch.retries=1",
        "--fetch.backoff_s=0.01",
        "--executor.processes=1",
        "--executor.progress=false",
    ]
    assert main([*common, "--output.path=s3://data/shards"]) == 0
    local = tmp_path / "local"
    assert main([*common, f"--output.path={local}"]) == 0

    sizes = json.loads(_cat("s3://data/shards/sizes.json"))
    assert sizes == json.loads((local / "sizes.json").read_text())
    assert sum(sizes.values()) == 6
    for name in sizes:
        assert _cat(f"s3://data/shards/{name}") == (local / name).read_bytes()
    with tarfile.open(local / "000000.tar") as tf:
        assert json.loads(tf.extractfile(f"{rows['uid'][0]}.syn.json").read()) == {"syn_text": ["from s3"]}
    failures = pq.read_table(pa.BufferReader(_cat("s3://data/shards/failures.parquet"))).to_pylist()
    assert {f["uid"]: f["reason"] for f in failures} == {
        "no_such_key": "fetch_failed",
        "no_such_bucket": "fetch_failed",
    }
    manifest = json.loads(_cat("s3://data/shards/manifest.json"))
    assert manifest["totals"]["kept"] + manifest["totals"]["failed"] == manifest["totals"]["input"] == 8
    # a re-run finds every shard done (its stats on S3) and rewrites nothing
    from pipeline.cli import parse_config
    from pipeline.data.prep.job import ShardJobConfig, run

    cfg, _ = parse_config(
        ShardJobConfig, [*common, "--output.path=s3://data/shards"], prog="t", description=""
    )
    result = run(cfg, log=lambda s: None)
    assert (result["units_run"], result["units_skipped"]) == (0, len(sizes))

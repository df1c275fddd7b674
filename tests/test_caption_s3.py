"""The caption job against S3: a real moto_server on 127.0.0.1 (endpoint and credentials from env), input
shards and sidecar / merged outputs as s3:// URLs, the same bytes as a local run.

    .venv/bin/pytest tests/test_caption_s3.py -q
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from moto_s3 import moto_s3
from test_caption_job import common_args, write_shards

from data_prep.caption import main
from pipeline import io

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto_server on a free loopback port; yields its endpoint (set in env for pipeline.io)."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


def _cat(url: str) -> bytes:
    fs, path = io.filesystem(url)
    fs.invalidate_cache()
    return fs.cat_file(path)


def test_s3_shards_get_the_same_sidecars_and_merged_shards_as_local_ones(s3: str, tmp_path: Path) -> None:
    local = tmp_path / "shards"
    write_shards(local, num_shards=2, per_shard=4)
    fs, _ = io.filesystem("s3://caption")
    fs.mkdir("caption")
    for p in sorted(local.glob("*.tar")):
        fs.put_file(str(p), f"caption/shards/{p.name}")

    assert main(common_args(local, tmp_path / "syn")) == 0
    assert main(common_args("s3://caption/shards", "s3://caption/syn")) == 0
    for name in ("000000.tar", "000001.tar"):
        assert _cat(f"s3://caption/syn/{name}") == (tmp_path / "syn" / name).read_bytes()
    fs.invalidate_cache()
    assert fs.exists("caption/syn/000000.caption.json")
    assert main(common_args("s3://caption/shards", "s3://caption/syn")) == 0  # done: a no-op
    assert not fs.exists("caption/syn/000000.caption.partial.jsonl")

    merge = ("--output.mode=merge",)
    assert main(common_args(local, tmp_path / "progress", *merge)) == 0
    assert main(common_args("s3://caption/shards", "s3://caption/progress", *merge)) == 0
    for name in ("000000.tar", "000001.tar"):
        assert _cat(f"s3://caption/shards/{name}") == (local / name).read_bytes()

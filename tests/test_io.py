"""pipeline.io's atomic writes, locally and on a real S3 endpoint (moto_server on loopback).

.venv/bin/pytest tests/test_io.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moto_s3 import moto_s3

from pipeline import io


def _write_then_fail(url: str) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        with io.atomic_write(url, "w") as f:
            f.write('{"partial": ')
            raise RuntimeError("killed mid-write")


def test_a_local_write_that_raises_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    _write_then_fail(str(tmp_path / "a.json"))
    assert list(tmp_path.iterdir()) == []
    io.write_json(str(tmp_path / "a.json"), {"x": 1})
    assert io.read_json(str(tmp_path / "a.json")) == {"x": 1}


def test_an_s3_write_that_raises_publishes_nothing_and_a_finished_one_publishes_all(tmp_path: Path) -> None:
    with moto_s3(tmp_path):
        fs, _ = io.filesystem("s3://bucket")
        fs.mkdir("bucket")
        _write_then_fail("s3://bucket/a.json")
        fs.invalidate_cache()
        assert not fs.exists("bucket/a.json")
        io.write_json("s3://bucket/a.json", {"x": 1})
        fs.invalidate_cache()
        assert json.loads(fs.cat_file("bucket/a.json")) == {"x": 1}

"""Tests of the one sample codec (pipeline/data/schema.py) and the one tar module (pipeline/data/tar.py): the
container format is pinned byte for byte, and a sample survives encode -> write -> read -> decode.

    .venv/bin/pytest tests/test_tar.py -q
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import schema, tar

# Fixed raw member bytes (no image encoding, so nothing depends on the CPU or the libjpeg build).
SAMPLES = [
    (
        "a",
        {
            "json": b'{"uid": "a"}',
            "txt": b"a cat",
            "jpg": b"\xff\xd8\xff\xe0 not a real jpeg",
            "syn.json": b'{"syn_text": ["x"]}',
        },
    ),
    (
        "dir/b\u00e9",
        {
            "zz.custom": b"z" * 1000,
            "depth.npy": bytes(range(256)),
            "seg.png": b"\x89PNG",
            "ann.json": b"{}",
            "txt": "caf\u00e9".encode(),
        },
    ),
    ("k" * 150, {"txt": b"", "jpg": b"\x00" * 513}),
]
# sha256 of the tars the shard writer (pipeline/data/prep/writer.py TarBuilder) and synth_export's
# img2dataset writer (tarfile.open(path, "w"), mode 0644, mtime 0) wrote before the tar module existed.
GOLDEN_GNU = "fc040395b0c45980a4d7dae9e26fe1bbfd155cfbcf4017d1940b975e2fb95080"
GOLDEN_PAX = "508bf0bbee700d982455aacedf9ed5ee1516cbb853eed6c8e0bcbc48e77560b2"


def test_shard_tars_are_byte_identical_to_the_pinned_container_format() -> None:
    buf = io.BytesIO()
    with tar.TarBuilder(buf) as builder:
        for key, members in SAMPLES:
            builder.add(key, members)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == GOLDEN_GNU
    buf = io.BytesIO()
    with tar.TarBuilder(buf, fmt="pax", mode=0o644) as builder:
        key, members = SAMPLES[0]
        builder.add(key, {ext: members[ext] for ext in ("json", "txt", "jpg")})
    assert hashlib.sha256(buf.getvalue()).hexdigest() == GOLDEN_PAX


def test_members_are_written_in_schema_order_then_alphabetically() -> None:
    key, members = SAMPLES[1]
    names = [name for name, _ in schema.member_names(key, members)]
    assert names == [f"{key}.{ext}" for ext in ("txt", "seg.png", "depth.npy", "ann.json", "zz.custom")]


def test_a_sample_survives_encode_write_read_decode(tmp_path: Path) -> None:
    depth = np.arange(12, dtype=np.float32).reshape(3, 4)
    meta = schema.SampleMeta("u1", "ab" * 32, 64, 48, 32, 24, source="test", scores={"clip": 0.25})
    samples = [
        {
            schema.KEY: "u1",
            "jpg": b"\xff\xd8raw",
            "txt": "a caf\u00e9",
            "json": meta,
            "syn.json": ["one", "two"],
            "depth.npy": depth,
            "ann.json": {"boxes": [[0, 0, 1, 1]], "labels": [3]},
            "seg.png": b"\x89PNG",
        },
        {schema.KEY: "sub/u2", "jpg": b"\xff\xd8other", "txt": "second"},
    ]
    with tar.open_shard(str(tmp_path / "000000.tar")) as builder:
        for sample in samples:
            builder.write(sample)
    assert builder.num_samples == 2 and builder.size == (tmp_path / "000000.tar").stat().st_size
    assert not (tmp_path / "000000.tar.tmp").exists() and not list(tmp_path.glob("_tmp/*"))
    with open(tmp_path / "000000.tar", "rb") as f:
        members = list(tar.iter_tar_members(f))
    assert members == [m for s in samples for m in schema.encode_sample(s)]
    decoded = [
        schema.decode_sample([m for m in members if m[0].startswith(s[schema.KEY] + ".")]) for s in samples
    ]
    first = decoded[0]
    assert first.pop("depth.npy").tolist() == depth.tolist()
    assert schema.SampleMeta.from_json(first.pop("json")) == meta
    assert first == {k: v for k, v in samples[0].items() if k not in ("depth.npy", "json")}
    assert decoded[1] == samples[1]
    with open(tmp_path / "000000.tar", "rb") as f:  # the loader's reader sees the same members
        assert [(n, d) for n, d in tar.iter_tar(f, lambda n: True, 1 << 20)] == members
    compressed = io.BytesIO(gzip.compress((tmp_path / "000000.tar").read_bytes()))
    assert list(tar.iter_tar_members(compressed)) == members
    with open(tmp_path / "000000.tar", "rb") as f:  # ranged reads by offset, as data prep joins img2dataset
        entries = tar.index_tar(f)
        assert [(e.name, tar.read_range(f, e)) for e in entries] == members


def test_the_codec_refuses_unsafe_keys_and_mixed_samples() -> None:
    for key in ("../up", "/abs", "a.b", ""):
        with pytest.raises(ValueError):
            schema.encode_sample({schema.KEY: key, "txt": "x"})
    with pytest.raises(ValueError):
        schema.decode_sample([("a.txt", b"x"), ("b.txt", b"y")])
    with pytest.raises(TypeError):
        schema.encode_sample({schema.KEY: "a", "jpg": object()})
    assert schema.encode_syn(["a"], [0.5]) == b'{"syn_text": ["a"], "syn_clip_scores": [0.5]}'

"""The synthetic world round-trips through every export layout with its labels intact; the CLI works.

Run: .venv/bin/pytest -q tests/test_synth_export.py   (the real-img2dataset test is marked slow)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_helpers import run_img2dataset

from data_prep import synthworld as cli
from pipeline.data import synthworld as sw
from pipeline.data.schema import decode_syn
from pipeline.data.synth_export import (
    DATACOMP_SCHEMA,
    DEPTH_SCALE,
    ExportConfig,
    export,
    serve_directory,
    with_base_url,
)

WORLD = sw.WorldConfig(image_size=64, seed=5)
CFG_KW = dict(
    num_samples=40, num_finetune=8, num_val=6, num_syn_captions=3, samples_per_shard=16, world=WORLD
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "world"
    summary = export(ExportConfig(out=str(out), **CFG_KW))
    return out, summary


def scene(split: str, index: int) -> sw.Scene:
    return sw.make_scene(WORLD, index, split)


def decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def close_image(a: np.ndarray, b: np.ndarray) -> bool:
    """JPEG round trip: same picture up to compression error."""
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 6


def test_export_writes_every_layout_and_a_summary(exported):
    out, summary = exported
    assert set(summary["layouts"]) == {"datacomp", "img2dataset", "imagenet", "coco", "ade20k", "nyuv2"}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["scenes_generated"] == 40 + 8 + 6
    assert "image_size = 64" in (out / "world.toml").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_datacomp_layout_round_trips_captions_images_and_scores(exported):
    out, _ = exported
    root = out / "datacomp"
    table = pq.read_table(root / "metadata" / "00000000.parquet")
    assert table.schema.names == DATACOMP_SCHEMA.names
    rows = table.to_pylist()
    assert [r["uid"] for r in rows] == [sw.scene_uid(WORLD, i, "train") for i in range(40)]
    syn = {
        json.loads(line)["uid"]: json.loads(line)["syn_text"]
        for line in open(root / "syn" / "syn_captions.jsonl")
    }
    ann = {json.loads(line)["uid"]: json.loads(line) for line in open(root / "annotations.jsonl")}
    for i, row in enumerate(rows):
        s = scene("train", i)
        data = Path(row["url"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert close_image(decode(data), s.image)
        assert row["text"] == s.noisy_caption
        assert (row["original_width"], row["original_height"]) == (64, 64)
        assert syn[s.uid] == sw.synthetic_captions(s, 3, 0)
        assert ann[s.uid]["boxes"] == [list(t.box) for t in s.things]
        assert ann[s.uid]["precise_caption"] == s.precise_caption
    # The simulated CLIP scores rank faithful alt-text above unrelated alt-text, as real scores do.
    unrelated = [r["clip_l14_similarity_score"] for r in rows if ann[r["uid"]]["noise"]["unrelated"]]
    faithful = [
        r["clip_l14_similarity_score"]
        for r in rows
        if not any(ann[r["uid"]]["noise"][k] for k in ("unrelated", "filename", "dropped", "wrong"))
    ]
    assert unrelated and faithful and np.mean(faithful) > np.mean(unrelated) + 0.1


def test_datacomp_synthetic_caption_sidecar_tars_match_the_jsonl(exported):
    out, _ = exported
    syn = {
        json.loads(line)["uid"]: json.loads(line)["syn_text"]
        for line in open(out / "datacomp" / "syn" / "syn_captions.jsonl")
    }
    found = {}
    for tar_path in sorted((out / "datacomp" / "syn").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                assert member.isfile() and member.name.endswith(".syn.json")
                found[member.name[: -len(".syn.json")]] = decode_syn(tar.extractfile(member).read())
    assert len(list((out / "datacomp" / "syn").glob("*.tar"))) == 3  # 40 samples, 16 per shard
    assert found == syn


def test_datacomp_images_are_fetched_over_loopback_http(exported, tmp_path):
    out, _ = exported
    with serve_directory(out / "datacomp") as base:
        assert base.startswith("http://127.0.0.1:")
        meta = with_base_url(out / "datacomp", base, tmp_path / "http.parquet")
        rows = pq.read_table(meta).to_pylist()
        assert all(r["url"].startswith(base) for r in rows)
        for row in rows[:10]:
            with urllib.request.urlopen(row["url"], timeout=10) as resp:
                assert hashlib.sha256(resp.read()).hexdigest() == row["sha256"]


def test_img2dataset_layout_round_trips(exported):
    out, summary = exported
    root = out / "img2dataset"
    assert summary["layouts"]["img2dataset"]["shards"] == 3
    seen = []
    for shard in range(3):
        stats = json.loads((root / f"{shard:05d}_stats.json").read_text())
        rows = pq.read_table(root / f"{shard:05d}.parquet").to_pylist()
        assert stats["count"] == stats["successes"] == len(rows)
        with tarfile.open(root / f"{shard:05d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for row in rows:
            key = row["key"]
            assert key.startswith(f"{shard:05d}") and len(key) == 7  # 5-digit shard + 2 digits (16 per shard)
            meta = json.loads(members[f"{key}.json"])
            s = scene("train", int(meta["uid"].rsplit("-", 1)[1]))
            assert meta["uid"] == row["uid"] == s.uid and meta["url"] == row["url"]
            assert members[f"{key}.txt"].decode() == s.noisy_caption == row["caption"]
            assert close_image(decode(members[f"{key}.jpg"]), s.image)
            assert hashlib.md5(members[f"{key}.jpg"]).hexdigest() == row["md5"]
            seen.append(s.index)
    assert sorted(seen) == list(range(40))


def test_imagenet_layout_labels_are_the_main_object_shape(exported):
    out, _ = exported
    root = out / "imagenet"
    assert (root / "classes.txt").read_text().split() == list(sw.THING_CLASSES)
    for split, world_split, n in (("train", "finetune", 8), ("val", "val", 6)):
        files = sorted((root / split).glob("*/*.jpg"))
        assert len(files) == n
        for f in files:
            s = scene(world_split, int(f.stem.rsplit("-", 1)[1]))
            assert f.parent.name == sw.main_thing(s).shape == sw.THING_CLASSES[sw.zero_shot_label(s)]
            assert close_image(np.array(Image.open(f).convert("RGB")), s.image)


def test_coco_layout_round_trips_masks_boxes_and_stuff(exported):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out, _ = exported
    root = out / "coco"
    for split, world_split in (("train", "finetune"), ("val", "val")):
        things = COCO(str(root / "annotations" / f"instances_{split}.json"))
        stuff = COCO(str(root / "annotations" / f"stuff_{split}.json"))
        assert [things.cats[i]["name"] for i in sorted(things.cats)] == list(sw.THING_CLASSES)
        assert [stuff.cats[i]["name"] for i in sorted(stuff.cats)] == list(sw.STUFF_CLASSES)
        for image_id, info in things.imgs.items():
            s = scene(world_split, int(Path(info["file_name"]).stem.rsplit("-", 1)[1]))
            assert close_image(
                np.array(Image.open(root / "images" / split / info["file_name"]).convert("RGB")), s.image
            )
            anns = things.loadAnns(things.getAnnIds(imgIds=[image_id]))
            assert len(anns) == len(s.things)
            for a, t in zip(anns, s.things):
                assert things.cats[a["category_id"]]["name"] == t.shape
                np.testing.assert_array_equal(things.annToMask(a).astype(bool), t.mask)
                x0, y0, x1, y1 = t.box
                assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert list(mask_utils.toBbox(a["segmentation"])) == a["bbox"]
                assert a["area"] == t.area and a["attributes"] == {"colour": t.colour, "size": t.size}
            union = np.zeros(s.semantic.shape, int)
            for a in stuff.loadAnns(stuff.getAnnIds(imgIds=[image_id])):
                m = stuff.annToMask(a).astype(bool)
                name = stuff.cats[a["category_id"]]["name"]
                np.testing.assert_array_equal(m, s.semantic == sw.SEMANTIC_CLASSES.index(name))
                union += m
            for t in s.things:
                union += t.mask
            assert (union == 1).all(), "things + stuff tile the image exactly once"


def test_ade20k_layout_round_trips_the_semantic_map(exported):
    out, _ = exported
    root = out / "ade20k"
    names = (root / "classes.txt").read_text().split()
    assert names == ["ignore", *sw.SEMANTIC_CLASSES]
    with open(root / "objectInfo.csv") as f:
        info = list(csv.DictReader(f))
    assert [r["Name"] for r in info] == list(sw.SEMANTIC_CLASSES) and info[0]["Idx"] == "1"
    for split, world_split, n in (("training", "finetune", 8), ("validation", "val", 6)):
        pngs = sorted((root / "annotations" / split).glob("*.png"))
        assert len(pngs) == n
        for p in pngs:
            s = scene(world_split, int(p.stem.rsplit("-", 1)[1]))
            label = np.array(Image.open(p))
            assert label.dtype == np.uint8 and label.min() >= 1
            np.testing.assert_array_equal(label - 1, s.semantic)
            assert (root / "images" / split / f"{p.stem}.jpg").exists()
    assert sum(int(r["Train"]) > 0 for r in info) >= 3


def test_nyuv2_layout_round_trips_depth_in_millimetres(exported):
    out, _ = exported
    for split, world_split, n in (("train", "finetune", 8), ("val", "val", 6)):
        depths = sorted((out / "nyuv2" / split / "depth").glob("*.png"))
        assert len(depths) == n
        for p in depths:
            s = scene(world_split, int(p.stem.rsplit("-", 1)[1]))
            raw = np.array(Image.open(p))
            assert raw.dtype == np.uint16 and raw.min() > 0
            np.testing.assert_allclose(raw / DEPTH_SCALE, s.depth, atol=0.0006)
            rgb = np.array(Image.open(out / "nyuv2" / split / "rgb" / p.name))
            np.testing.assert_array_equal(rgb, s.image)  # PNG: lossless
            label = np.array(Image.open(out / "nyuv2" / split / "label" / p.name))
            np.testing.assert_array_equal(label - 1, s.semantic)


def test_failed_export_keeps_the_previous_layout_and_leaves_no_temporary_folders(tmp_path, monkeypatch):
    out = tmp_path / "w"
    export(
        ExportConfig(out=str(out), layouts="imagenet", num_samples=0, num_finetune=3, num_val=2, world=WORLD)
    )
    before = sorted(p.name for p in (out / "imagenet").rglob("*.jpg"))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sw, "make_scene", boom)
    with pytest.raises(RuntimeError):
        export(ExportConfig(out=str(out), layouts="imagenet", num_finetune=5, num_val=5, world=WORLD))
    assert sorted(p.name for p in (out / "imagenet").rglob("*.jpg")) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_cli_writes_the_requested_layouts_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(
        [
            f"--out={out}",
            "--preset=debug",
            "--layouts=datacomp,ade20k",
            "--num_samples=8",
            "--world.image_size=96",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert str(out) in text and "datacomp" in text and "ade20k" in text and "coco" not in text
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ade20k", "datacomp"]
    assert len(list((out / "datacomp" / "images").glob("*.jpg"))) == 8
    img = Image.open(next((out / "datacomp" / "images").glob("*.jpg")))
    assert img.size == (96, 96)


def test_cli_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("out", "num_samples", "layouts", "base_url"):
        assert f"--{name}" in text
    for f in sw.WorldConfig.__dataclass_fields__:
        assert f"--world.{f}" in text


@pytest.mark.parametrize(
    "arg,key",
    [
        ("--world.drop_object_prob=2", "drop_object_prob"),
        ("--layouts=coco,bogus", "layouts"),
        ("--world.colours=3", "world.colours"),
    ],
)
def test_cli_bad_value_exits_2_with_one_line_naming_the_key(arg, key, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([arg])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err


@pytest.mark.slow
def test_real_img2dataset_fetches_the_served_pool_and_writes_the_same_layout(exported, tmp_path):
    out, _ = exported
    with serve_directory(out / "datacomp") as base:
        meta = with_base_url(out / "datacomp", base, tmp_path / "meta.parquet")
        run_img2dataset(
            meta,
            tmp_path / "i2d",
            output_format="webdataset",
            resize_mode="no",
            number_sample_per_shard=1000,
            timeout=10,
        )
    ours = pq.read_table(out / "img2dataset" / "00000.parquet").schema.names
    theirs = pq.read_table(tmp_path / "i2d" / "00000.parquet").schema.names
    assert set(theirs) - {"md5"} <= set(ours)
    captions = {}
    with tarfile.open(tmp_path / "i2d" / "00000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                meta_json = json.loads(tar.extractfile(m).read())
                captions[meta_json["uid"]] = meta_json["caption"]
    assert len(captions) == 40
    assert all(captions[s.uid] == s.noisy_caption for s in (scene("train", i) for i in range(40)))

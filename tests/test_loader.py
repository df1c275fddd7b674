"""The training data loader: shapes, splitting, exact resume, subsets, bad samples, captions, groups, S3.

.venv/bin/pytest tests/test_loader.py -q
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from moto_s3 import moto_s3
from PIL import Image

from pipeline.data import schema
from pipeline.data.loader import LoaderConfig, _tar_groups, build_loader, expand_shards, iter_tar
from pipeline.data.prep.subsets import SubsetConfig, write_subsets
from pipeline.data.synthworld import WorldConfig, make_scene, synthetic_captions
from pipeline.data.tokenizer import get_tokenizer
from pipeline.data.transforms import eval_transform, random_resized_crop_box, train_image

TOKENIZER = get_tokenizer("ViT-B-16", 16)
WORLD = WorldConfig(image_size=64, group_size=4)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, num_shards: int, per_shard: int, num_syn: int = 3) -> list[list[str]]:
    """Synthetic-world shards in the project's schema; returns the uids of each shard in order."""
    folder.mkdir(parents=True, exist_ok=True)
    uids: list[list[str]] = []
    for s in range(num_shards):
        shard_uids = []
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for k in range(per_shard):
                scene = make_scene(WORLD, s * per_shard + k)
                meta = schema.SampleMeta(scene.uid, "0" * 64, 64, 64, 64, 64, source="synthworld")
                sample = {
                    "__key__": scene.uid,
                    "jpg": _jpeg(scene.image),
                    "txt": scene.noisy_caption.encode(),
                    "json": meta.to_json(),
                }
                if num_syn:
                    sample["syn.json"] = schema.encode_syn(synthetic_captions(scene, num_syn, seed=0))
                sink.write(sample)
                shard_uids.append(scene.uid)
        uids.append(shard_uids)
    return uids


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, list[list[str]]]:
    folder = tmp_path_factory.mktemp("shards")
    uids = write_shards(folder, num_shards=4, per_shard=10)
    return str(folder / "{00000..00003}.tar"), uids


def config(pattern: str, **kw) -> LoaderConfig:
    base = dict(
        shards=pattern, micro_batch=4, num_workers=0, shuffle_buffer=6, image_size=32, context_length=16
    )
    base.update(kw)
    return LoaderConfig(**base)


def take(loader, n: int) -> list[dict]:
    return list(islice(iter(loader), n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["uid"] == y["uid"]
        for key in ("image", "text", "syn_text", "has_syn"):
            assert torch.equal(x[key], y[key]), key


def test_batches_have_image_text_and_synthetic_text_of_the_configured_shapes(shards):
    pattern, _ = shards
    batch = take(build_loader(config(pattern), 0, 1, TOKENIZER), 1)[0]
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == torch.long
    assert batch["syn_text"].shape == (4, 16) and batch["syn_text"].dtype == torch.long
    assert batch["has_syn"].all() and len(batch["uid"]) == 4
    # normalised with CLIP mean/std: roughly centred, not in [0, 1]
    assert batch["image"].min() < 0 < batch["image"].max()


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_one_epoch_over_ranks_and_workers_yields_every_sample_exactly_once(shards, world_size, num_workers):
    pattern, uids = shards
    cfg = config(pattern, num_workers=num_workers, epochs=1, drop_last=False)
    per_rank = [
        [u for b in build_loader(cfg, r, world_size, TOKENIZER) for u in b["uid"]] for r in range(world_size)
    ]
    everything = [u for rank_uids in per_rank for u in rank_uids]
    assert sorted(everything) == sorted(u for shard in uids for u in shard)
    if world_size == 2:
        assert not set(per_rank[0]) & set(per_rank[1]) and per_rank[0] and per_rank[1]
    flat_order = [u for shard in uids for u in shard]
    assert everything != flat_order  # shards and samples were shuffled


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resumed_loader_yields_the_same_next_batches_as_an_uninterrupted_one(shards, num_workers, world_size):
    pattern, _ = shards
    cfg = config(pattern, num_workers=num_workers)
    before, after = 5, 6  # 11 batches of 4 > one epoch of a rank: crosses the epoch boundary
    for rank in range(world_size):
        reference = take(build_loader(cfg, rank, world_size, TOKENIZER), before + after)
        first = build_loader(cfg, rank, world_size, TOKENIZER)
        head = take(first, before)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_loader(cfg, rank, world_size, TOKENIZER, start=state)
        assert_same_batches(head, reference[:before])
        assert_same_batches(take(resumed, after), reference[before:])
        assert resumed.batches == before + after


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_a_finite_run_delivers_the_rest_of_the_epochs_and_keeps_the_counts(shards, num_workers):
    pattern, _ = shards
    cfg = config(pattern, num_workers=num_workers, epochs=2, drop_last=False, shuffle_buffer=4)
    full = build_loader(cfg, 1, 2, TOKENIZER)
    reference = list(full)
    assert sum(len(b["uid"]) for b in reference) == 40  # this rank's 2 shards, twice
    for cut in (3, len(reference) - 1):
        first = build_loader(cfg, 1, 2, TOKENIZER)
        head = take(first, cut)
        resumed = build_loader(cfg, 1, 2, TOKENIZER, start=json.loads(json.dumps(first.state_dict())))
        assert_same_batches(head + list(resumed), reference)
        assert resumed.counts == full.counts and resumed.epoch == 2


def test_resampled_stream_runs_past_the_data_and_resumes_exactly(shards):
    pattern, uids = shards
    cfg = config(pattern, resampled=True, num_workers=2)
    reference = take(build_loader(cfg, 0, 1, TOKENIZER), 14)  # 56 samples > 40 in the data
    first = build_loader(cfg, 0, 1, TOKENIZER)
    take(first, 9)
    resumed = build_loader(cfg, 0, 1, TOKENIZER, start=first.state_dict())
    assert_same_batches(take(resumed, 5), reference[9:])
    seen = [u for b in reference for u in b["uid"]]
    assert len(seen) > len(set(seen))  # drawn with replacement


def test_resume_refuses_a_different_world_size(shards):
    pattern, _ = shards
    loader = build_loader(config(pattern), 0, 1, TOKENIZER)
    take(loader, 2)
    with pytest.raises(ValueError, match="world_size"):
        build_loader(config(pattern), 0, 2, TOKENIZER, start=loader.state_dict())


def test_subset_uid_list_from_data_prep_selects_exactly_those_uids(shards, tmp_path):
    pattern, uids = shards
    summary = write_subsets(
        str(tmp_path), [(f"{i:05d}.tar", u) for i, u in enumerate(uids)], SubsetConfig((0.4,))
    )
    subset_file = str(tmp_path / summary["40pct"]["uids"])
    wanted = Path(subset_file).read_text().split()
    assert 0 < len(wanted) < 40
    cfg = config(pattern, subset_uids=subset_file, epochs=1, drop_last=False, num_workers=2)
    got = [u for b in build_loader(cfg, 0, 1, TOKENIZER) for u in b["uid"]]
    assert sorted(got) == sorted(wanted)


def test_bad_samples_are_counted_by_reason_and_never_stop_the_loader(tmp_path):
    good_uids = []
    scene = make_scene(WORLD, 0)
    jpg = _jpeg(scene.image)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for k in range(6):
            sink.write({"__key__": f"good{k}", "jpg": jpg, "txt": b"a red circle"})
            good_uids.append(f"good{k}")
        sink.write({"__key__": "noimage", "txt": b"caption only"})
        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x"})
        sink.write({"__key__": "truncjpg", "jpg": jpg[: len(jpg) // 3], "txt": b"x"})
        sink.write({"__key__": "notxt", "jpg": jpg})
        sink.write({"__key__": "emptytxt", "jpg": jpg, "txt": b"  "})
        sink.write({"__key__": "latin1", "jpg": jpg, "txt": b"caf\xe9"})
        sink.write({"__key__": "badjson", "jpg": jpg, "txt": b"x", "json": b"{nope"})
        sink.write({"__key__": "badsyn", "jpg": jpg, "txt": b"x", "syn.json": b"[1,"})
    # a second shard cut off in the middle of a member, and a third that does not exist
    whole = tmp_path / "whole.tar"
    with wds.TarWriter(str(whole)) as sink:
        for k in range(4):
            sink.write({"__key__": f"cut{k}", "jpg": jpg, "txt": b"a blue square"})
    data = whole.read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: int(len(data) * 0.6)])
    whole.unlink()
    cfg = config(str(tmp_path / "{00000..00002}.tar"), epochs=1, drop_last=False, micro_batch=2)
    loader = build_loader(cfg, 0, 1, TOKENIZER)
    got = [u for b in loader for u in b["uid"]]
    assert set(good_uids) <= set(got) and all(u.startswith(("good", "cut")) for u in got)
    stats = loader.stats
    expected_once = ["missing_image", "missing_txt", "empty_txt", "bad_txt", "bad_json", "bad_syn_json"]
    expected_once += ["truncated_shard", "shard_error"]
    assert {k: stats.get(k) for k in expected_once} == dict.fromkeys(expected_once, 1)
    assert stats["undecodable_image"] >= 1  # the corrupt one; the truncated JPEG may decode partly
    assert loader.counts["samples"] == len(got)


def test_synthetic_caption_choice_is_deterministic_per_seed_and_follows_the_rule(tmp_path):
    write_shards(tmp_path / "s", num_shards=1, per_shard=8, num_syn=3)
    pattern = str(tmp_path / "s" / "00000.tar")
    scenes = {make_scene(WORLD, i).uid: make_scene(WORLD, i) for i in range(8)}
    captions = {uid: synthetic_captions(s, 3, seed=0) for uid, s in scenes.items()}

    def syn_by_uid(**kw) -> dict[tuple[int, str], list[int]]:
        out = {}
        for b in build_loader(config(pattern, micro_batch=8, **kw), 0, 1, TOKENIZER):
            epoch = len(out) // 8
            out.update({(epoch, u): t.tolist() for u, t in zip(b["uid"], b["syn_text"])})
        return out

    def tok(text: str) -> list[int]:
        return TOKENIZER([text], context_length=16)[0].tolist()

    first = syn_by_uid(syn_sampling="first", epochs=2)
    assert all(t == tok(captions[u][0]) for (_, u), t in first.items())
    cycle = syn_by_uid(syn_sampling="cycle", epochs=3)
    assert all(t == tok(captions[u][e % 3]) for (e, u), t in cycle.items())
    random_a = syn_by_uid(syn_sampling="random", epochs=3, seed=1)
    assert random_a == syn_by_uid(syn_sampling="random", epochs=3, seed=1)
    assert random_a != syn_by_uid(syn_sampling="random", epochs=3, seed=2)
    assert len({tuple(t) for t in random_a.values()}) > len(scenes)  # more than one caption per sample used


def test_sample_without_synthetic_captions_falls_back_to_its_web_caption(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=4, num_syn=0)
    loader = build_loader(config(str(tmp_path / "00000.tar"), epochs=1), 0, 1, TOKENIZER)
    batch = next(iter(loader))
    assert torch.equal(batch["syn_text"], batch["text"]) and not batch["has_syn"].any()
    assert loader.counts["syn_fallback"] == 4


def test_group_size_keeps_hard_negative_groups_together_while_shuffling_groups(tmp_path):
    uids = write_shards(tmp_path, num_shards=2, per_shard=16)  # groups of 4 scenes (WORLD.group_size)
    group_of = {u: (s, k // 4) for s, shard in enumerate(uids) for k, u in enumerate(shard)}
    cfg = config(
        str(tmp_path / "{00000..00001}.tar"), micro_batch=8, group_size=4, shuffle_buffer=8, epochs=2
    )
    batches = list(build_loader(cfg, 0, 1, TOKENIZER))
    order = [u for b in batches for u in b["uid"]]
    assert len(order) == 64
    for b in batches:  # every group sits whole inside one batch
        groups = [group_of[u] for u in b["uid"]]
        assert all(groups.count(g) == 4 for g in groups)
    runs = [group_of[u] for u in order[::4]]
    assert all(len({group_of[u] for u in order[i : i + 4]}) == 1 for i in range(0, 64, 4))
    assert runs[:8] != sorted(runs[:8])  # groups were shuffled


def test_shard_spec_accepts_lists_folders_and_globs(shards, tmp_path):
    pattern, _ = shards
    folder = Path(pattern).parent
    expected = [str(folder / f"{i:05d}.tar") for i in range(4)]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in expected))
    assert expand_shards(pattern) == expected
    assert expand_shards(str(tmp_path / "list.txt")) == expected
    assert expand_shards(str(folder)) == expected
    assert expand_shards(str(folder / "*.tar")) == expected
    assert expand_shards(f"{expected[0]}::{expected[1]}") == expected[:2]


def test_random_resized_crop_boxes_follow_scale_and_ratio_and_their_seed():
    rng = random.Random(0)
    boxes = []
    for _ in range(300):
        w = rng.randint(40, 300)
        h = int(w * rng.uniform(0.8, 1.25))
        x0, y0, x1, y1 = box = random_resized_crop_box(w, h, (0.5, 1.0), (0.75, 4 / 3), rng)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0) * (y1 - y0) >= 0.5 * w * h * 0.93
        assert 0.7 <= (x1 - x0) / (y1 - y0) <= 1.4
        boxes.append(box)
    assert len(set(boxes)) > 250
    wide = random_resized_crop_box(400, 100, (0.9, 1.0), (0.75, 4 / 3), random.Random(1))
    # no crop fits: torchvision's central crop at the nearest allowed ratio
    from torchvision.transforms import RandomResizedCrop

    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(1, 100, 400), (0.9, 1.0), (0.75, 4 / 3))
    assert wide == (j, i, j + w, i + h)
    again = [random_resized_crop_box(200, 180, (0.5, 1.0), (0.75, 4 / 3), random.Random(s)) for s in range(5)]
    assert again == [
        random_resized_crop_box(200, 180, (0.5, 1.0), (0.75, 4 / 3), random.Random(s)) for s in range(5)
    ]


def test_eval_transform_matches_open_clip_preprocessing():
    from open_clip.transform import image_transform

    reference = image_transform(48, is_train=False)
    ours = eval_transform(48)
    for size in [(80, 60), (61, 97), (48, 48)]:
        img = Image.fromarray(make_scene(WORLD, size[0]).image).resize(size)
        assert float((reference(img) - ours(img)).abs().mean()) < 0.02


# ------------------------------------------------------------------------------------------------ S3


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    with moto_s3(tmp_path) as endpoint:
        yield endpoint


def test_loader_reads_shards_from_s3_exactly_as_from_local_disk(shards, s3_endpoint):
    from pipeline.io import filesystem

    pattern, _ = shards
    fs, _ = filesystem("s3://bucket/x")
    fs.mkdir("bucket")
    for i in range(4):
        fs.put(str(Path(pattern).parent / f"{i:05d}.tar"), f"bucket/shards/{i:05d}.tar")
    fs.invalidate_cache()
    local = list(build_loader(config(pattern, epochs=1, num_workers=2), 0, 1, TOKENIZER))
    remote_cfg = config("s3://bucket/shards/{00000..00003}.tar", epochs=1, num_workers=2)
    assert_same_batches(list(build_loader(remote_cfg, 0, 1, TOKENIZER)), local)
    assert expand_shards("s3://bucket/shards/*.tar") == [f"s3://bucket/shards/{i:05d}.tar" for i in range(4)]
    assert os.environ["S3_ENDPOINT_URL"] == s3_endpoint


def test_train_crop_matches_torchvision_resized_crop_on_pil_within_two_grey_levels():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    data = _jpeg(make_scene(WorldConfig(image_size=128), 3).image)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    for seed in range(4):
        ours = train_image(data, 96, (0.5, 1.0), (0.75, 4 / 3), random.Random(seed))
        x0, y0, x1, y1 = random_resized_crop_box(128, 128, (0.5, 1.0), (0.75, 4 / 3), random.Random(seed))
        crop = TF.resized_crop(pil, y0, x0, y1 - y0, x1 - x0, [96, 96], InterpolationMode.BICUBIC)
        assert (ours.int() - TF.pil_to_tensor(crop).int()).abs().max() <= 2


def test_tar_reader_agrees_with_tarfile_and_keys_samples_by_the_shared_member_name_rule(tmp_path):
    path = tmp_path / "odd.tar"
    long_dir = "d" * 120
    members = [
        (f"{long_dir}/a1.jpg", b"A" * 700),  # long path: pax / GNU headers; the folder is part of the key
        (f"{long_dir}/a1.txt", b"caption"),
        ("./b2.jpg", b"B"),  # normalised to b2.jpg
        ("b2.TXT", b"x"),  # extensions are lower-cased
        (".hidden.txt", b"h"),
        ("noext", b"n"),
    ]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        with tarfile.open(path, "w", format=fmt) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("c3.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        with open(path, "rb") as f:
            names = [name for name, _ in iter_tar(f, lambda n: True, 1 << 20)]
        with tarfile.open(path) as tf:
            assert names == [m.name for m in tf.getmembers() if m.isreg()]
        with open(path, "rb") as f:
            groups = list(_tar_groups(f, 0, 1 << 20))
        assert [(i, k, sorted(m)) for i, k, m in groups] == [
            (0, f"{long_dir}/a1", ["jpg", "txt"]),
            (1, "b2", ["jpg", "txt"]),
        ]
        assert groups[0][2]["jpg"] == b"A" * 700
        with open(path, "rb") as f:  # skipping a sample reads none of its members; over-size members are None
            assert [(i, k, m) for i, k, m in _tar_groups(f, 1, 1)] == [(1, "b2", {"jpg": b"B", "txt": b"x"})]
        with open(path, "rb") as f:
            assert list(_tar_groups(f, 0, 100))[0][2] == {"jpg": None, "txt": b"caption"}

"""What the loader reads besides the shards' own members: caption sidecars, data prep's duplicate list, the
shared tar member-name rule, shard specs that name nothing, and the global torch RNG it must leave alone.

.venv/bin/pytest tests/test_loader_sources.py -q
"""

from __future__ import annotations

import io
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
import webdataset as wds
from test_loader import TOKENIZER, WORLD, _jpeg, assert_same_batches, config, take, write_shards

from pipeline.data import schema
from pipeline.data.loader import ShardSpecError, build_loader, expand_shards
from pipeline.data.prep import safe_tar
from pipeline.data.synthworld import make_scene, synthetic_captions


def tok(text: str) -> list[int]:
    return TOKENIZER([text], context_length=16)[0].tolist()


def write_sidecars(folder: Path, uids: list[list[str]], captions: dict[str, list[str]]) -> None:
    """DataCompDR-style sidecars: ``<shard>.tar`` holding ``<uid>.syn.json`` for the uids in ``captions``."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, shard_uids in enumerate(uids):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for uid in shard_uids:
                if uid in captions:
                    sink.write({"__key__": uid, "syn.json": schema.encode_syn(captions[uid])})


# ------------------------------------------------------------------------------------------ sidecars


@pytest.mark.usefixtures("one_torch_thread")
def test_batches_carry_the_captions_the_caption_job_wrote_not_the_shards_own_paraphrases(tmp_path):
    from data_prep.caption import main as caption_main

    uids = write_shards(tmp_path / "shards", num_shards=2, per_shard=6, num_syn=3)
    scenes = {make_scene(WORLD, i).uid: make_scene(WORLD, i) for i in range(12)}
    paraphrases = {uid: synthetic_captions(scene, 3, seed=0) for uid, scene in scenes.items()}
    args = [
        "--preset=debug",
        f"--input.shards={tmp_path / 'shards'}",
        f"--output.path={tmp_path / 'captions'}",
        "--captioner.num_captions=2",
        "--captioner.decode.max_len=8",
        "--execution.batch_size=4",
        "--execution.decode_threads=1",
        "--execution.torch_threads=1",
    ]
    assert caption_main(args) == 0
    generated: dict[str, list[str]] = {}
    for s in range(2):
        for key, members in safe_tar.iter_tar_samples(open(tmp_path / "captions" / f"{s:05d}.tar", "rb")):
            generated[key] = schema.decode_syn(members[schema.SYN_KEY])
    assert sorted(generated) == sorted(u for shard in uids for u in shard)
    assert all(len(c) == 2 for c in generated.values())

    cfg = config(
        str(tmp_path / "shards"),
        syn_shards=str(tmp_path / "captions"),
        syn_sampling="cycle",
        epochs=2,
        drop_last=False,
        num_workers=2,
        micro_batch=3,
    )
    loader = build_loader(cfg, 0, 1, TOKENIZER)
    seen: dict[str, list[list[int]]] = {}
    for batch in loader:
        assert batch["has_syn"].all()
        for uid, row in zip(batch["uid"], batch["syn_text"]):
            seen.setdefault(uid, []).append(row.tolist())
    assert sorted(seen) == sorted(generated)
    for uid, rows in seen.items():  # cycle: epoch e gets caption e of the sidecar
        assert sorted(rows) == sorted(tok(t) for t in generated[uid])
        assert not {tuple(r) for r in rows} & {tuple(tok(t)) for t in paraphrases[uid]}
    assert "missing_sidecar" not in loader.stats


def test_samples_missing_from_their_sidecar_are_counted_and_keep_their_own_captions(tmp_path):
    uids = write_shards(tmp_path / "shards", num_shards=2, per_shard=5, num_syn=3)
    flat = [u for shard in uids for u in shard]
    missing = {uids[0][1], uids[1][4]}
    generated = {u: [f"generated caption {k}"] for k, u in enumerate(flat) if u not in missing}
    generated["not-in-any-shard"] = ["stray sidecar entry"]
    uids_with_stray = [uids[0][::-1] + ["not-in-any-shard"], uids[1]]  # another order, one extra key
    write_sidecars(tmp_path / "syn", uids_with_stray, generated)
    cfg = config(
        str(tmp_path / "shards"),
        syn_shards=str(tmp_path / "syn"),
        syn_sampling="first",
        epochs=1,
        drop_last=False,
    )
    loader = build_loader(cfg, 0, 1, TOKENIZER)
    rows = {u: r.tolist() for b in loader for u, r in zip(b["uid"], b["syn_text"])}
    assert sorted(rows) == sorted(flat)  # nothing dropped
    scenes = {make_scene(WORLD, i).uid: make_scene(WORLD, i) for i in range(10)}
    for uid, row in rows.items():
        expected = synthetic_captions(scenes[uid], 3, seed=0)[0] if uid in missing else generated[uid][0]
        assert row == tok(expected), uid
    assert loader.stats == {"missing_sidecar": 2}


def test_resume_with_sidecars_yields_the_same_next_batches(tmp_path):
    uids = write_shards(tmp_path / "shards", num_shards=4, per_shard=6, num_syn=2)
    write_sidecars(tmp_path / "syn", uids, {u: [f"gen {u} a", f"gen {u} b"] for s in uids for u in s})
    cfg = config(str(tmp_path / "shards"), syn_shards=str(tmp_path / "syn"), num_workers=2)
    whole = take(build_loader(cfg, 0, 1, TOKENIZER), 8)
    first = build_loader(cfg, 0, 1, TOKENIZER)
    take(first, 3)
    resumed = build_loader(cfg, 0, 1, TOKENIZER, start=first.state_dict())
    assert_same_batches(take(resumed, 5), whole[3:])


def test_sidecar_lists_must_pair_one_to_one_with_the_shards_by_file_name(tmp_path):
    uids = write_shards(tmp_path / "shards", num_shards=3, per_shard=2, num_syn=0)
    write_sidecars(tmp_path / "syn", uids[:2], {u: ["x"] for s in uids for u in s})
    with pytest.raises(ValueError, match=r"syn_shards: 2 sidecar shards for 3 shards"):
        build_loader(config(str(tmp_path / "shards"), syn_shards=str(tmp_path / "syn")), 0, 1, TOKENIZER)
    (tmp_path / "syn" / "00001.tar").rename(tmp_path / "syn" / "other.tar")
    (tmp_path / "syn" / "00000.tar").rename(tmp_path / "syn" / "00002.tar")
    with pytest.raises(ValueError, match=r"syn_shards: sidecar .*00002.tar sits where .*00000.tar"):
        shards = str(tmp_path / "shards" / "{00000..00001}.tar")
        build_loader(config(shards, syn_shards=str(tmp_path / "syn")), 0, 1, TOKENIZER)


# ---------------------------------------------------------------------------------- duplicate images


def test_cross_shard_duplicate_images_listed_by_data_prep_are_skipped_unless_opted_out(tmp_path):
    from pipeline.data.prep.writer import DUPLICATE_IMAGES_FILE

    assert DUPLICATE_IMAGES_FILE == schema.DUPLICATE_IMAGES_FILE  # the file data prep's merge step writes
    uids = write_shards(tmp_path, num_shards=2, per_shard=5, num_syn=1)
    dups = [uids[1][0], uids[1][3]]
    (tmp_path / schema.DUPLICATE_IMAGES_FILE).write_text("".join(u + "\n" for u in dups))
    flat = [u for shard in uids for u in shard]
    for num_workers in (0, 2):
        cfg = config(str(tmp_path), epochs=1, drop_last=False, num_workers=num_workers)
        loader = build_loader(cfg, 0, 1, TOKENIZER)
        got = [u for b in loader for u in b["uid"]]
        assert sorted(got) == sorted(set(flat) - set(dups))
        assert loader.stats == {"duplicate_image": 2} and loader.counts["samples"] == 8
    kept = build_loader(
        config(str(tmp_path), epochs=1, drop_last=False, skip_duplicate_images=False), 0, 1, TOKENIZER
    )
    assert sorted(u for b in kept for u in b["uid"]) == sorted(flat) and kept.stats == {}
    # a resume lands on the same samples: duplicates stay in the stream's positions as markers
    cfg = config(str(tmp_path), shuffle_buffer=4)
    whole = take(build_loader(cfg, 0, 1, TOKENIZER), 6)
    first = build_loader(cfg, 0, 1, TOKENIZER)
    take(first, 2)
    assert_same_batches(take(build_loader(cfg, 0, 1, TOKENIZER, start=first.state_dict()), 4), whole[2:])
    assert not set(dups) & {u for b in whole for u in b["uid"]}


# ------------------------------------------------------------------------------------- member names

UNSAFE_NAMES = ["../x.jpg", "/abs/x.txt", "a/../../x.json"]


def write_tar_with_unsafe_members(path: Path) -> list[str]:
    """Two good samples, then a sample whose every member has an unsafe name, then a good one."""
    jpg = _jpeg(make_scene(WORLD, 0).image)
    good = ["g0", "g1", "g2"]
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for uid in good[:2]:
            add(f"{uid}.jpg", jpg)
            add(f"{uid}.txt", b"a red circle")
        add(UNSAFE_NAMES[0], jpg)
        add(UNSAFE_NAMES[1], b"caption of an escaping sample")
        add(UNSAFE_NAMES[2], b"{}")
        add("g2.jpg", jpg)
        add("g2.txt", b"a blue square")
    return good


def test_unsafe_member_names_are_skipped_and_counted_by_the_loader_and_data_prep_alike(tmp_path):
    good = write_tar_with_unsafe_members(tmp_path / "00000.tar")
    loader = build_loader(config(str(tmp_path / "00000.tar"), epochs=1, drop_last=False), 0, 1, TOKENIZER)
    assert sorted(u for b in loader for u in b["uid"]) == good  # "x" is never trained on
    assert loader.stats == {"unsafe_member_name": 3}
    report = safe_tar.TarReport()
    with open(tmp_path / "00000.tar", "rb") as f:
        assert [k for k, _ in safe_tar.iter_tar_samples(f, report=report)] == good
    assert report.skipped == {"unsafe_name": 3}
    for name in UNSAFE_NAMES:
        assert schema.member_key(name) is None and safe_tar.safe_member_name(name) is None
    assert schema.member_key("a/./b.Seg.PNG") == ("a/b", "seg.png") == safe_tar.split_key("a/./b.Seg.PNG")
    assert schema.member_key(".hidden.txt") == schema.member_key("README") == ("", "")


def test_unsafe_member_counts_survive_a_resume_exactly(tmp_path):
    for s in range(2):
        write_tar_with_unsafe_members(tmp_path / f"{s:05d}.tar")
    cfg = config(str(tmp_path / "{00000..00001}.tar"), micro_batch=1, shuffle_buffer=0, shuffle_shards=False)
    cfg_epochs = config(
        str(tmp_path / "{00000..00001}.tar"), micro_batch=1, shuffle_buffer=0, shuffle_shards=False, epochs=1
    )
    for stop in range(1, 6):
        first = build_loader(cfg, 0, 1, TOKENIZER)
        take(first, stop)
        resumed = build_loader(cfg_epochs, 0, 1, TOKENIZER, start=first.state_dict())
        list(resumed)
        assert resumed.stats == {"unsafe_member_name": 6}, stop


# ------------------------------------------------------------------------------------ global torch RNG


@pytest.mark.parametrize("num_workers", [0, 2])
def test_building_and_iterating_a_loader_leaves_the_global_torch_rng_untouched(tmp_path, num_workers):
    write_shards(tmp_path, num_shards=2, per_shard=4, num_syn=1)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    loader = build_loader(config(str(tmp_path), num_workers=num_workers), 0, 1, TOKENIZER)
    batches = iter(loader)  # a pass starts here: workers and their seeds too
    list(islice(batches, 3))
    again = take(
        build_loader(config(str(tmp_path), num_workers=num_workers), 0, 1, TOKENIZER, loader.state_dict()), 1
    )
    assert torch.equal(torch.get_rng_state(), before) and again


# ------------------------------------------------------------------------------ shard specs naming nothing


def test_a_shard_spec_naming_no_shard_raises_one_error_naming_the_path(tmp_path):
    write_shards(tmp_path / "shards", num_shards=1, per_shard=1, num_syn=0)
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "nope"): "does not exist",
        str(tmp_path / "empty"): "holds no .tar",
        str(tmp_path / "shards" / "*.tgz"): "matches no file",
        str(tmp_path / "missing.txt"): "list file .* does not exist",
        str(tmp_path / "nope" / "{00000..00009}.tar"): "none of the 10 shards",
        str(tmp_path / "nope" / "00000.tar"): "does not exist",
    }
    for spec, message in cases.items():
        with pytest.raises(ShardSpecError, match=message) as e:
            expand_shards(spec)
        assert str(Path(spec.split("/{")[0]).name) in str(e.value)
        with pytest.raises(ValueError, match=f"^shards: .*{message}"):
            build_loader(config(spec), 0, 1, TOKENIZER)
    with pytest.raises(ValueError, match="^syn_shards: .*does not exist"):
        build_loader(config(str(tmp_path / "shards"), syn_shards=str(tmp_path / "nope")), 0, 1, TOKENIZER)
    # one missing shard of a pattern is not an error (counted as shard_error when read)
    assert len(expand_shards(str(tmp_path / "shards" / "{00000..00001}.tar"))) == 2


def test_pretrain_on_a_missing_shards_folder_exits_2_with_one_line_naming_it(tmp_path, capsys):
    from jobs.pretrain import main

    missing = tmp_path / "no_such_folder"
    debug = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "pretrain" / "debug.toml"
    code = main([f"--config={debug}", f"--data.shards={missing}", f"--run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("python -m jobs.pretrain: error: data.shards: ") and str(missing) in err[0]
    assert not (tmp_path / "run").exists()

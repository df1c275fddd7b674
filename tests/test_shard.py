"""Tests of the shard job (python -m data_prep.shard) on local files and loopback HTTP: every row accounted
for, bad inputs, schema, determinism, resume after a crash or kill -9, subsets, SLURM-array splitting, the
folder source, safe tar reading, and open_clip's own WebDataset loader reading the result.

    .venv/bin/pytest tests/test_shard.py -q
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_helpers import tar_bytes

from data_prep.shard import main
from pipeline.data.prep import safe_tar
from pipeline.data.prep.fixtures import LoopbackServer, encode, odd_images, scene_image
from pipeline.data.prep.images import ImageConfig, process_image
from pipeline.data.prep.subsets import in_subset
from pipeline.data.schema import SampleMeta, decode_syn

REPO = Path(__file__).resolve().parent.parent
SHARD = 8  # input rows per shard


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        samples.update(read_tar(tar))
    return samples


class Inputs:
    """A DataComp-style input set with every kind of bad row; ``expected[(file, row)]`` = reason or None."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        img = root / "img"
        img.mkdir(parents=True)
        self.expected: dict[tuple[str, int], str | None] = {}
        self.syn: dict[str, list[str]] = {}
        self.originals: dict[str, bytes] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        rows: list[tuple[object, object, object, float]] = []

        def add(uid: object, url: object, text: object, reason: str | None, score: float = 0.5) -> None:
            self.expected[("a.parquet", len(rows))] = reason
            rows.append((uid, url, text, score))

        def put(name: str, data: bytes) -> str:
            (img / name).write_bytes(data)
            return f"img/{name}"

        goods = []
        for i in range(10):
            uid, im, caption = scene_image(i)
            data = encode(im, "JPEG", quality=90)
            path = put(f"{uid}.jpg", data)
            url = f"{base_url}/{path}" if i % 2 else path  # half over HTTP, half as local relative paths
            self.originals[uid], self.sizes[uid] = data, im.size
            goods.append((uid, url))
            add(uid, url, caption, None)
            if i == 0:
                add("same_bytes_as_first", url, "a copy", "duplicate_image")
        for name, (data, reason, size) in odd_images().items():
            add(name, put(name, data), f"odd image {name}", reason)
            self.originals[name], self.sizes[name] = data, size
        add("tiny", put("tiny.png", encode(Image.new("RGB", (8, 8), "red"), "PNG")), "tiny", "too_small")
        add(
            "wide",
            put("wide.png", encode(Image.new("RGB", (200, 20), "blue"), "PNG")),
            "wide",
            "bad_aspect_ratio",
        )
        noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
        add("huge", put("huge.png", encode(Image.fromarray(noise), "PNG")), "huge", "too_large")
        add("missing_file", "img/does_not_exist.jpg", "gone", "fetch_failed")
        add("http_404", f"{base_url}/img/does_not_exist.jpg", "gone", "fetch_failed")
        add("unreachable", "http://127.0.0.1:9/x.jpg", "nobody listens on port 9", "fetch_failed")
        add("low_score", goods[2][1], "low", "low_clip_score", score=0.1)
        add(None, goods[2][1], "no uid", "bad_uid")
        add("has/slash", goods[2][1], "bad uid", "bad_uid")
        add("no_caption", goods[2][1], None, "caption_missing")
        add("blank_caption", goods[2][1], "   ", "caption_empty")
        add("no_url", None, "no url", "missing_url")
        pq.write_table(
            pa.table(
                {
                    "uid": [r[0] for r in rows],
                    "url": [r[1] for r in rows],
                    "text": [r[2] for r in rows],
                    "clip_l14_similarity_score": [r[3] for r in rows],
                }
            ),
            root / "a.parquet",
            row_group_size=5,
        )
        # b: captions stored as binary, no score column, a uid already used in a.parquet
        b_rows = [
            (goods[3][0], goods[4][1], b"dup uid", "duplicate_uid"),
            ("latin1_caption", goods[5][1], "caf\xe9".encode("latin-1"), "caption_not_utf8"),
            (
                "binary_caption_ok",
                put("copy.jpg", self.originals[goods[6][0]] + b"\0"),
                "café".encode(),
                None,
            ),
        ]
        for i, (_, _, _, reason) in enumerate(b_rows):
            self.expected[("b.parquet", i)] = reason
        pq.write_table(
            pa.table(
                {
                    "uid": [r[0] for r in b_rows],
                    "url": [r[1] for r in b_rows],
                    "text": pa.array([r[2] for r in b_rows], pa.binary()),
                }
            ),
            root / "b.parquet",
        )
        # c: no url column at all; d: not a parquet file
        pq.write_table(pa.table({"uid": ["c0", "c1"], "text": ["x", "y"]}), root / "c.parquet")
        self.expected.update({("c.parquet", 0): "malformed_row", ("c.parquet", 1): "malformed_row"})
        (root / "d.parquet").write_bytes(b"PAR1 this is not parquet")
        self.expected[("d.parquet", -1)] = "unreadable_input"
        # synthetic captions: JSONL for some uids, a sidecar tar (with a hostile member) for others
        with open(root / "syn.jsonl", "w") as f:
            for uid, _ in goods[:4]:
                self.syn[uid] = [f"a scene {uid}", "another view"]
                f.write(json.dumps({"uid": uid, "syn_text": self.syn[uid]}) + "\n")
            f.write("{not json\n")
        with tarfile.open(root / "syn.tar", "w") as tf:
            for uid, _ in goods[4:7]:
                self.syn[uid] = [f"tar caption {uid}"]
                data = json.dumps({"syn_text": self.syn[uid]}).encode()
                info = tarfile.TarInfo(f"{uid}.syn.json")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            evil = json.dumps({"syn_text": ["evil"]}).encode()
            info = tarfile.TarInfo(f"../{goods[7][0]}.syn.json")
            info.size = len(evil)
            tf.addfile(info, io.BytesIO(evil))
        self.kept = sorted(k for k, v in self.expected.items() if v is None)

    def args(self, out: Path, *extra: str) -> list[str]:
        return [
            f"--source.parquet=['{self.root}/*.parquet']",
            f"--source.image_root={self.root}",
            f"--syn.paths=['{self.root}/syn.jsonl', '{self.root}/syn.tar']",
            f"--output.path={out}",
            f"--output.samples_per_shard={SHARD}",
            "--image.size=64",
            "--fetch.retries=0",
            "--fetch.threads=4",
            "--fetch.max_bytes=60000",
            "--filters.min_image_size=16",
            "--filters.max_aspect_ratio=4",
            "--filters.min_clip_score=0.2",
            "--subsets.fractions=[0.25, 0.5]",
            "--executor.progress=false",
            *extra,
        ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("inputs")
    server = LoopbackServer(root)
    yield root, server
    server.stop()


@pytest.fixture(scope="module")
def inputs(server: tuple[Path, LoopbackServer]) -> Inputs:
    root, srv = server
    return Inputs(root, srv.url)


@pytest.fixture(scope="module")
def reference(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert main(inputs.args(out, "--executor.processes=1")) == 0
    return out


def test_every_input_row_is_kept_or_failed_with_its_reason(inputs: Inputs, reference: Path) -> None:
    failures = pq.read_table(reference / "failures.parquet").to_pylist()
    got = {(Path(f["input"]).name, f["row"]): f["reason"] for f in failures}
    assert len(got) == len(failures), "a row failed twice"
    expected_failed = {k: v for k, v in inputs.expected.items() if v is not None}
    assert got == expected_failed
    samples = read_shards(reference)
    manifest = json.loads((reference / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["input"] == len(inputs.expected)
    assert totals["kept"] == len(samples) == len(inputs.kept)
    assert totals["kept"] + totals["failed"] == totals["input"]


def test_shards_hold_rgb_jpegs_captions_synthetic_captions_and_metadata(
    inputs: Inputs, reference: Path
) -> None:
    samples = read_shards(reference)
    for uid, sample in samples.items():
        assert set(sample) <= {"jpg", "txt", "json", "syn.json"}
        im = Image.open(io.BytesIO(sample["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 64
        meta = SampleMeta.from_json(sample["json"])
        assert meta.uid == uid and (meta.width, meta.height) == im.size
        assert sample["txt"].decode("utf-8").strip()
        if uid in inputs.originals:
            assert meta.sha256 == __import__("hashlib").sha256(inputs.originals[uid]).hexdigest()
            assert (meta.original_width, meta.original_height) == inputs.sizes[uid]
        assert ("syn.json" in sample) == (uid in inputs.syn)
        if uid in inputs.syn:
            assert decode_syn(sample["syn.json"]) == inputs.syn[uid]
    rotated = Image.open(io.BytesIO(samples["exif_rotated"]["jpg"]))
    assert rotated.height > rotated.width  # stored 80x48 with EXIF orientation 6 -> displayed portrait
    assert samples["binary_caption_ok"]["txt"].decode() == "café"
    assert json.loads(samples[sorted(inputs.syn)[0]]["json"])["scores"] == {"clip_l14_similarity_score": 0.5}


def test_sizes_json_and_manifest_describe_the_shards(reference: Path) -> None:
    sizes = json.loads((reference / "sizes.json").read_text())
    manifest = json.loads((reference / "manifest.json").read_text())
    assert sizes == {p.name: len(read_tar(p)) for p in sorted(reference.glob("*.tar"))}
    assert [s["name"] for s in manifest["shards"]] == sorted(sizes)
    for name in sizes:
        stats = json.loads((reference / name.replace(".tar", ".stats.json")).read_text())
        assert stats["num_kept"] == sizes[name]
        assert stats["num_kept"] + stats["num_failed"] == stats["num_input"]
        assert stats["bytes"] == (reference / name).stat().st_size
    assert manifest["totals"]["failed_by_reason"]["fetch_failed"] == 3


def test_same_inputs_give_byte_identical_shards_from_a_process_pool(
    inputs: Inputs, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pool"
    assert main(inputs.args(out, "--executor.processes=2", "--fetch.threads=2")) == 0
    assert tar_bytes(out) == tar_bytes(reference)
    for name in ("sizes.json", "manifest.json", "failures.parquet", "subsets/25pct.txt"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_rerun_after_a_crash_redoes_only_unfinished_shards(
    inputs: Inputs, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "crash"
    assert main(inputs.args(out, "--executor.processes=1")) == 0
    names = sorted(p.name for p in out.glob("*.tar"))
    (out / names[1]).unlink()  # killed before the rename: no tar, no stats
    (out / names[2].replace(".tar", ".stats.json")).unlink()  # killed between tar and stats
    (out / "_tmp").mkdir()
    dead = out / "_tmp" / (names[3] + ".tmp-1234-abcd")
    dead.write_bytes(b"partial tar")  # a dead writer's temporary: untouched for two hours
    legacy = out / (names[0] + ".tmp-4321-dcba")  # where older versions wrote temporaries
    legacy.write_bytes(b"partial tar")
    for old in (dead, legacy):
        os.utime(old, (time.time() - 7200, time.time() - 7200))
    live = out / "_tmp" / (names[4] + ".tmp-5678-ef01")
    live.write_bytes(b"being written")  # another array task's temporary, touched just now
    from pipeline.cli import parse_config
    from pipeline.data.prep.job import ShardJobConfig, run

    cfg, _ = parse_config(
        ShardJobConfig, inputs.args(out, "--executor.processes=1"), prog="t", description=""
    )
    result = run(cfg, log=lambda s: None)
    assert (result["units_run"], result["units_skipped"]) == (2, len(names) - 2)
    assert tar_bytes(out) == tar_bytes(reference)
    assert [p.relative_to(out) for p in out.rglob("*.tmp-*")] == [live.relative_to(out)]
    assert (out / "sizes.json").read_bytes() == (reference / "sizes.json").read_bytes()


def test_job_killed_with_sigkill_resumes_to_identical_shards(
    inputs: Inputs, reference: Path, tmp_path: Path, server: tuple[Path, LoopbackServer]
) -> None:
    out = tmp_path / "killed"
    args = inputs.args(out, "--executor.processes=1", "--fetch.threads=1")
    cmd = [sys.executable, "-c", "import sys; from data_prep.shard import main; sys.exit(main(sys.argv[1:]))"]
    server[1].delay_s = 0.25  # slow HTTP images, so that the kill lands in the middle of the job
    try:
        proc = subprocess.Popen(cmd + args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60

        def mid_shard() -> bool:  # a shard done and the next one being written
            return bool(list(out.glob("*.stats.json")) and list(out.rglob("*.tar.tmp-*")))

        while not mid_shard() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        server[1].delay_s = 0.0
    assert not (out / "sizes.json").exists()
    sizes = json.loads((reference / "sizes.json").read_text())
    for tar in out.glob("*.tar"):  # whatever is visible is a complete shard, never a partial tar
        assert len(read_tar(tar)) == sizes[tar.name]
    killed_temps = list(out.rglob("*.tmp-*"))
    assert killed_temps and {p.parent.name for p in killed_temps} == {"_tmp"}  # none beside the shards
    assert subprocess.run(cmd + args, cwd=REPO, capture_output=True).returncode == 0
    assert tar_bytes(out) == tar_bytes(reference) != {}
    # the killed writer's temporary may be another task's that is still writing: it waits out its hour in
    # _tmp/ (which a sync excludes); the rerun itself left none, and none anywhere else
    assert sorted(out.rglob("*.tmp-*")) == sorted(killed_temps)


def test_a_finished_job_leaves_no_temporaries_of_its_own(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while writing (OOM killer, preempted Ray task) never cleans up; the run that started
    it removes its temporaries at the end. Here the first shard's writer dies without cleaning up."""
    from pipeline.data.prep import writer

    out = tmp_path / "out"
    real_add, real_remove, died = writer.TarBuilder.add, os.remove, []

    def dying_add(self: writer.TarBuilder, key: str, members: dict[str, bytes]) -> None:
        if not died:
            died.append(self._tar.fileobj.name)  # the temporary it was writing
            raise RuntimeError("killed")
        real_add(self, key, members)

    def remove(path: str) -> None:
        if died and path == died[0] and len(died) == 1:
            died.append("no cleanup")  # a killed process runs no finally: its temporary stays
            return
        real_remove(path)

    monkeypatch.setattr(writer.TarBuilder, "add", dying_add)
    monkeypatch.setattr(os, "remove", remove)
    assert main(inputs.args(out, "--executor.processes=1")) == 1  # one shard failed: re-run to retry
    assert died[1:] == ["no cleanup"] and "/_tmp/" in died[0]
    assert not list(out.rglob("*.tmp-*")) and not (out / "_tmp").exists()
    monkeypatch.undo()
    assert main(inputs.args(out, "--executor.processes=1")) == 0
    assert not list(out.rglob("*.tmp-*")) and not (out / "_tmp").exists()


def test_nested_subsets_are_contained_in_each_other(reference: Path) -> None:
    small = (reference / "subsets/25pct.txt").read_text().split()
    large = (reference / "subsets/50pct.txt").read_text().split()
    kept = set(read_shards(reference))
    assert set(small) <= set(large) <= kept and len(small) < len(large) < len(kept)
    assert small == [u for u in large if in_subset(u, 0.25)]
    info = json.loads((reference / "subsets/50pct.json").read_text())
    assert info["num_samples"] == len(large) == sum(info["shards"].values())


def test_slurm_array_tasks_together_write_the_same_dataset(
    inputs: Inputs, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "array"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    for task_id in (3, 1, 2):  # array ids 1..3, finishing in any order; the last one merges
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
        assert main(inputs.args(out, "--executor.processes=1")) == 0
        assert (out / "sizes.json").exists() == (task_id == 2)
    assert tar_bytes(out) == tar_bytes(reference)
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


def test_open_clip_wds_loader_reads_our_shards(reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip's get_wds_dataset with webdataset 1.0.2: webdataset yields an empty end-of-shard marker
    that open_clip's group_by_keys_nothrow cannot handle (KeyError 'fname', open_clip#935). We run open_clip's
    own pipeline with that marker switched off (tar_file_expander(eof_value=None)), nothing else changed."""
    from types import SimpleNamespace

    import open_clip
    import open_clip_train.data as ocd
    import torchvision.transforms as T
    import webdataset.tariterators as wt

    monkeypatch.setattr(ocd, "tar_file_expander", functools.partial(wt.tar_file_expander, eof_value=None))
    manifest = json.loads((reference / "manifest.json").read_text())
    args = SimpleNamespace(
        train_data=str(reference / manifest["shard_pattern"]),
        val_data=None,
        train_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=4,
        workers=0,
        world_size=1,
    )
    preprocess = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    info = ocd.get_wds_dataset(args, preprocess, True, tokenizer=open_clip.get_tokenizer("RN50"))
    assert info.dataloader.num_samples >= manifest["totals"]["kept"]  # from our sizes.json, rounded up
    batches = list(info.dataloader)
    assert len(batches) == info.dataloader.num_batches
    images, texts = batches[0]
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 77)


def test_folder_of_images_with_txt_captions_and_dense_labels(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    (root / "cats").mkdir(parents=True)
    uid, im, caption = scene_image(0)
    (root / "cats" / "a.jpg").write_bytes(encode(im))
    (root / "cats" / "a.txt").write_text(caption)
    seg = encode(Image.fromarray(np.arange(96 * 96, dtype=np.uint8).reshape(96, 96)), "PNG")
    (root / "cats" / "a.seg.png").write_bytes(seg)
    (root / "b.png").write_bytes(encode(im, "PNG"))
    (root / "b.txt").write_bytes("na\xefve".encode("latin-1"))
    (root / "c.jpg").write_bytes(encode(im, quality=80))  # no caption file
    (root / "d.jpg").write_bytes(b"")
    (root / "d.txt").write_text("empty image")
    exif = im.getexif()
    exif[0x0112] = 6
    (root / "e.jpg").write_bytes(encode(im, "JPEG", exif=exif.tobytes()))
    (root / "e.txt").write_text("rotated, with labels that would not rotate")
    (root / "e.seg.png").write_bytes(seg)
    (root / "f.jpg").write_bytes(encode(im, quality=70))
    (root / "f.txt").write_text("no labels: still kept")
    out = tmp_path / "out"
    args = [
        "--source.kind=folder",
        f"--source.folder={root}",
        f"--output.path={out}",
        "--executor.processes=1",
        "--executor.progress=false",
        "--source.extras=['seg.png', 'depth.npy']",
    ]
    with pytest.raises(SystemExit):  # labels would not follow a resize
        main(args)
    assert main([*args, "--image.resize_mode=none"]) == 0
    samples = read_shards(out)
    assert sorted(samples) == ["cats_a", "f"] and samples["cats_a"]["txt"].decode() == caption
    assert samples["cats_a"]["seg.png"] == seg and "seg.png" not in samples["f"]
    failures = {f["uid"]: f["reason"] for f in pq.read_table(out / "failures.parquet").to_pylist()}
    assert failures == {
        "b": "caption_not_utf8",
        "c": "caption_missing",
        "d": "empty_file",
        "e": "dense_label_mismatch",
    }


def test_include_uid_list_excludes_other_rows(tmp_path: Path) -> None:
    rows = {"uid": [], "url": [], "text": []}
    for i in range(4):
        uid, im, caption = scene_image(i)
        (tmp_path / f"{i}.jpg").write_bytes(encode(im))
        rows["uid"].append(uid), rows["url"].append(str(tmp_path / f"{i}.jpg")), rows["text"].append(caption)
    pq.write_table(pa.table(rows), tmp_path / "m.parquet")
    (tmp_path / "keep.txt").write_text(f"# DataComp-style uid list\n{rows['uid'][1]}\n{rows['uid'][3]}\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                f"--source.parquet=['{tmp_path}/m.parquet']",
                f"--output.path={out}",
                f"--filters.include_uids={tmp_path}/keep.txt",
                "--executor.progress=false",
                "--executor.processes=1",
            ]
        )
        == 0
    )
    assert sorted(read_shards(out)) == [rows["uid"][1], rows["uid"][3]]
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert sorted(f["reason"] for f in failures) == ["excluded_uid", "excluded_uid"]


def test_rerun_with_a_different_config_in_the_same_folder_is_refused(
    inputs: Inputs, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tar_bytes(reference)
    assert main(inputs.args(reference, "--image.size=32")) == 2
    assert "output.overwrite" in capsys.readouterr().err
    assert tar_bytes(reference) == before


def test_cli_names_a_bad_key_and_a_missing_output(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--source.parquet=['x.parquet']", "--output.path=o", "--image.sise=3"])
    assert e.value.code == 2 and "image.sise" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--source.parquet=['x.parquet']"])
    assert "output.path" in capsys.readouterr().err


def test_a_missing_parquet_path_exits_2_naming_it_like_a_glob_that_matches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    typo = tmp_path / "metadta.parquet"
    assert main([f"--source.parquet=['{typo}']", f"--output.path={out}", "--executor.progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(typo) in err[0] and "does not exist" in err[0]
    assert not out.exists() or not list(out.rglob("*.json"))  # no plan, no "empty dataset"
    glob = tmp_path / "nothing" / "*.parquet"
    assert main([f"--source.parquet=['{glob}']", f"--output.path={out}", "--executor.progress=false"]) == 2
    assert str(glob) in capsys.readouterr().err


def one_image_dataset(root: Path, url: str | None = None, size: tuple[int, int] = (64, 48)) -> list[str]:
    """A one-row parquet (image at ``url``, default a local JPEG of ``size``); returns args for ``main``."""
    root.mkdir(parents=True, exist_ok=True)
    uid, im, caption = scene_image(0)
    (root / "0.jpg").write_bytes(encode(im.resize(size)))
    pq.write_table(
        pa.table({"uid": [uid], "url": [url or str(root / "0.jpg")], "text": [caption]}), root / "m.parquet"
    )
    return [
        f"--source.parquet=['{root}/m.parquet']",
        "--executor.processes=1",
        "--executor.progress=false",
        "--fetch.retries=0",
    ]


def test_image_max_pixels_is_the_only_pixel_limit_not_pillows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS before the job's own check. A 64x48 image
    stands in for a 200-megapixel one: Pillow's built-in limit is lowered to 1000 pixels for the test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    args = one_image_dataset(tmp_path / "in")
    assert main([*args, f"--output.path={tmp_path / 'allowed'}", "--image.max_pixels=10000"]) == 0
    assert len(read_shards(tmp_path / "allowed")) == 1
    assert main([*args, f"--output.path={tmp_path / 'refused'}", "--image.max_pixels=3000"]) == 0
    [failure] = pq.read_table(tmp_path / "refused" / "failures.parquet").to_pylist()
    assert failure["reason"] == "decompression_bomb" and "max_pixels=3000" in failure["detail"]


PRESIGNED = (
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASECRETKEYID%2F20261201%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=SECRETSESSIONTOKEN&X-Amz-Signature=5ecre7519a7ure"
)
SECRETS = (b"AKIASECRETKEYID", b"SECRETSESSIONTOKEN", b"5ecre7519a7ure")


def test_presigned_url_credentials_reach_no_published_file_nor_log(
    tmp_path: Path, server: tuple[Path, LoopbackServer], capsys: pytest.CaptureFixture[str]
) -> None:
    srv = server[1]
    root = tmp_path / "in"
    (srv_root := server[0] / "presigned").mkdir(exist_ok=True)
    uid, im, caption = scene_image(3)
    (srv_root / "ok.jpg").write_bytes(encode(im))
    rows = {
        "uid": ["ok", "http_404", "s3_like_missing"],
        "url": [  # fetched over HTTP with the query; an fsspec error quotes the path and query, no scheme
            f"{srv.url}/presigned/ok.jpg{PRESIGNED}",
            f"{srv.url}/presigned/gone.jpg{PRESIGNED}",
            f"memory://bucket/gone.jpg{PRESIGNED}",
        ],
        "text": [caption] * 3,
    }
    root.mkdir()
    pq.write_table(pa.table(rows), root / "m.parquet")
    args = [f"--source.parquet=['{root}/m.parquet']", "--executor.processes=1", "--fetch.retries=0"]

    def published(out: Path) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())

    assert main([*args, f"--output.path={tmp_path / 'strip'}"]) == 0  # default: output.url_query=strip
    out = tmp_path / "strip"
    [sample] = read_shards(out).values()
    assert json.loads(sample["json"])["source"] == f"{srv.url}/presigned/ok.jpg"
    failures = {f["uid"]: f for f in pq.read_table(out / "failures.parquet").to_pylist()}
    assert failures["s3_like_missing"]["detail"] == "not found: /bucket/gone.jpg"
    logs = capsys.readouterr()
    everything = published(out) + (logs.out + logs.err).encode()
    assert not [s for s in SECRETS if s in everything]

    out = tmp_path / "redacted"
    assert main([*args, f"--output.path={out}", "--output.url_query=redact_credentials"]) == 0
    source = json.loads(next(iter(read_shards(out).values()))["json"])["source"]
    assert "X-Amz-Signature=REDACTED" in source and "X-Amz-Expires=3600" in source
    assert not [s for s in SECRETS if s in published(out) + capsys.readouterr().out.encode()]

    out = tmp_path / "kept"
    assert main([*args, f"--output.path={out}", "--output.url_query=keep"]) == 0
    assert json.loads(next(iter(read_shards(out).values()))["json"])["source"] == rows["url"][0]


def test_safe_tar_skips_traversal_links_and_oversized_members() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [
            ("ok.txt", b"fine"),
            ("../escape.txt", b"x"),
            ("/abs.txt", b"x"),
            ("big.bin", b"x" * 5000),
            ("a/../../up.txt", b"x"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    report = safe_tar.TarReport()
    members = list(
        safe_tar.iter_tar_members(io.BytesIO(buf.getvalue()), max_member_bytes=1000, report=report)
    )
    assert members == [("ok.txt", b"fine")]
    assert report.skipped == {"unsafe_name": 3, "too_large": 1, "not_regular_file": 1}
    truncated = io.BytesIO(buf.getvalue()[:700])
    assert list(safe_tar.iter_tar_members(truncated, report=report)) == [("ok.txt", b"fine")]
    assert report.skipped["corrupt_tar"] == 1


def test_image_policies_passthrough_draft_and_center_crop() -> None:
    _, im, _ = scene_image(0, size=256)
    data = encode(im, "JPEG", quality=90)
    same = process_image(data, ImageConfig(size=256))
    assert same.data == data and not same.reencoded  # no resize needed: original bytes kept
    drafted = process_image(data, ImageConfig(size=64))
    plain = process_image(data, ImageConfig(size=64, draft=False))
    a = np.asarray(Image.open(io.BytesIO(drafted.data)), dtype=np.float32)
    b = np.asarray(Image.open(io.BytesIO(plain.data)), dtype=np.float32)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a - b).mean() < 6  # draft decode ~ full decode
    wide = encode(Image.fromarray(np.zeros((100, 300, 3), np.uint8)), "PNG")
    crop = process_image(wide, ImageConfig(resize_mode="center_crop", size=50))
    keep = process_image(wide, ImageConfig(resize_mode="keep_ratio_largest", size=150))
    none = process_image(wide, ImageConfig(resize_mode="none"))
    assert [(r.width, r.height) for r in (crop, keep, none)] == [(50, 50), (150, 50), (300, 100)]


def test_synthworld_datacomp_and_img2dataset_layouts_shard_to_the_same_samples(tmp_path: Path) -> None:
    from pipeline.data.synth_export import ExportConfig, export

    export(
        ExportConfig(
            out=str(tmp_path / "world"),
            num_samples=30,
            num_finetune=0,
            num_val=0,
            layouts="datacomp,img2dataset",
            samples_per_shard=10,
            num_syn_captions=3,
        )
    )
    dc, i2d = tmp_path / "world" / "datacomp", tmp_path / "world" / "img2dataset"
    common = [
        "--output.samples_per_shard=12",
        "--executor.processes=1",
        "--executor.progress=false",
        "--image.size=48",
    ]
    assert (
        main(
            [
                *common,
                f"--source.parquet=['{dc}/metadata']",
                f"--syn.paths=['{dc}/syn/*.tar']",
                "--syn.required=true",
                f"--output.path={tmp_path / 'from_datacomp'}",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                *common,
                f"--source.parquet=['{dc}/metadata']",
                f"--syn.paths=['{dc}/syn/*.jsonl']",
                "--source.images=img2dataset",
                f"--source.img2dataset={i2d}",
                f"--output.path={tmp_path / 'from_img2dataset'}",
            ]
        )
        == 0
    )
    a, b = read_shards(tmp_path / "from_datacomp"), read_shards(tmp_path / "from_img2dataset")
    metadata = pq.read_table(dc / "metadata").to_pylist()
    assert sorted(a) == sorted(b) == sorted(r["uid"] for r in metadata)
    for uid, sample in a.items():
        assert len(decode_syn(sample["syn.json"])) == 3 and sample["syn.json"] == b[uid]["syn.json"]
        meta = json.loads(sample["json"])
        assert set(meta["scores"]) == {"clip_b32_similarity_score", "clip_l14_similarity_score"}
        assert meta["sha256"] == next(r["sha256"] for r in metadata if r["uid"] == uid)

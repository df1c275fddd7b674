"""The caption job end to end on tiny shards (written here with webdataset.TarWriter) and a tiny random CoCa.

.venv/bin/pytest tests/test_caption_job.py -q
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.caption import main
from pipeline.caption.job import CaptionJobConfig, make_plan
from pipeline.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BAD = {"s0-02": "undecodable_image", "s0-04": "empty_image", "s1-01": "missing_image"}


def _jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(root: Path, num_shards: int = 2, per_shard: int = 6) -> list[Path]:
    """Shards in the project schema: jpg / txt / json, some with syn.json, three bad images."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = root / f"{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                uid = f"s{s}-{i:02d}"
                sample = {"__key__": uid, "txt": f"web caption {uid}", "json": {"uid": uid, "source": "test"}}
                if BAD.get(uid) == "undecodable_image":
                    sample["jpg"] = b"\xff\xd8 not really a jpeg"
                elif BAD.get(uid) == "empty_image":
                    sample["jpg"] = b""
                elif BAD.get(uid) != "missing_image":
                    sample["jpg"] = _jpeg(100 * s + i)
                if i % 3 == 0:
                    sample["syn.json"] = {"syn_text": [f"old caption of {uid}"]}
                sink.write(sample)
        paths.append(path)
    return paths


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = data
    return out


def common_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset=debug",
        f"--input.shards={shards}",
        f"--output.path={out}",
        "--captioner.num_captions=3",
        "--captioner.decode.max_len=10",
        "--captioner.decode.top_k=50",
        "--execution.batch_size=2",
        "--execution.decode_threads=2",
        "--execution.torch_threads=1",
        *extra,
    ]


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards")
    return tmp_path / "shards"


def test_sidecar_shards_hold_k_distinct_captions_per_uid_in_input_order_and_count_bad_images(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    assert main(common_args(shards, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards_captioned"] == 2
    assert summary["bad"] == {"empty_image": 1, "missing_image": 1, "undecodable_image": 1}
    for name in ("000000", "000001"):
        source = read_tar(shards / f"{name}.tar")
        sidecar = read_tar(out / f"{name}.tar")
        assert [k for k, _ in sidecar] == [k for k, _ in source]
        for key, members in sidecar:
            assert set(members) == {"syn.json"}
            texts = json.loads(members["syn.json"])["syn_text"]
            if key in BAD:
                assert texts == []
            else:
                assert len(texts) == 3 and len(set(texts)) == 3 and all(t.strip() for t in texts)
        marker = json.loads((out / f"{name}.caption.json").read_text())
        assert marker["samples"] == 6 and marker["captioned"] + marker["num_bad"] == 6
        assert not (out / f"{name}.caption.partial.jsonl").exists()


def test_rerunning_finished_shards_is_a_no_op(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    assert main(common_args(shards, out)) == 0
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    capsys.readouterr()
    assert main(common_args(shards, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards_captioned"] == 0 and summary["shards_already_done"] == 2
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == stamps


def test_killed_job_resumes_inside_its_shard_and_writes_what_an_uninterrupted_run_writes(
    shards: Path, tmp_path: Path
) -> None:
    from pipeline.caption.job import run_job

    whole = tmp_path / "whole"
    assert main(common_args(shards, whole)) == 0

    killed = tmp_path / "killed"
    cfg = load_config(
        CaptionJobConfig,
        overrides=common_args(shards, killed)[1:],
        job="caption",
        preset="debug",
    )

    class Killed(Exception):
        pass

    def die_after_two_batches(unit, num_batches):  # noqa: ANN001
        if unit.index == 0 and num_batches == 2:
            raise Killed

    with pytest.raises(Killed):
        run_job(cfg, on_batch=die_after_two_batches, log=lambda s: None)
    partial = killed / "000000.caption.partial.jsonl"
    assert partial.exists() and not (killed / "000000.caption.json").exists()
    assert not (killed / "000000.tar").exists()
    with open(partial, "a") as f:
        f.write('{"key": "s0-05", "syn_te')  # a write torn by the kill
    assert "resume: 4 samples already captioned" in make_plan(cfg).describe(cfg)

    summary = run_job(cfg, log=lambda s: None)
    assert summary["shards_captioned"] == 2
    marker = json.loads((killed / "000000.caption.json").read_text())
    assert marker["resumed_samples"] == 4
    for name in ("000000.tar", "000001.tar"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes()


def test_sidecar_temporaries_stay_out_of_the_sidecar_folder_and_a_finished_run_removes_its_own(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar writer killed mid-write (no cleanup runs) leaves its temporary in <out>/_tmp/, never beside
    the sidecars that a sync publishes; the run that started it removes it when it ends."""
    from pipeline.data.prep import writer

    out = tmp_path / "out"
    real_add, real_remove, died = writer.TarBuilder.add, os.remove, []

    def dying_add(self: writer.TarBuilder, key: str, members: dict[str, bytes]) -> None:
        if not died:
            died.append(self._tar.fileobj.name)  # the temporary it was writing
            assert not list(out.glob("*.tmp-*")) and Path(died[0]).parent == out / "_tmp"
            raise RuntimeError("killed")
        real_add(self, key, members)

    def remove(path: str) -> None:
        if died and path == died[0] and len(died) == 1:
            died.append("no cleanup")  # a killed process runs no finally: its temporary stays
            return
        real_remove(path)

    monkeypatch.setattr(writer.TarBuilder, "add", dying_add)
    monkeypatch.setattr(os, "remove", remove)
    with pytest.raises(RuntimeError, match="killed"):
        main(common_args(shards, out))
    assert died[1:] == ["no cleanup"]
    assert not list(out.rglob("*.tmp-*")) and not (out / "_tmp").exists()
    monkeypatch.undo()
    assert main(common_args(shards, out)) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert not list(out.rglob("*.tmp-*")) and not (out / "_tmp").exists()


def test_merge_mode_rewrites_shards_in_place_keeping_other_members_byte_for_byte(
    shards: Path, tmp_path: Path
) -> None:
    original = {p.name: read_tar(p) for p in shards.glob("*.tar")}
    progress = tmp_path / "progress"
    assert main(common_args(shards, progress, "--output.mode=merge", "--output.on_existing=append")) == 0
    assert not list(shards.rglob("*.tmp-*")) and not (shards / "_tmp").exists()
    for name, samples in original.items():
        merged = read_tar(shards / name)
        assert [k for k, _ in merged] == [k for k, _ in samples]
        for (key, before), (_, after) in zip(samples, merged):
            for ext in before:
                if ext != "syn.json":
                    assert after[ext] == before[ext], (key, ext)
            old = json.loads(before["syn.json"])["syn_text"] if "syn.json" in before else []
            new = json.loads(after["syn.json"])["syn_text"] if "syn.json" in after else []
            if key in BAD:
                assert new == old
            else:
                assert new[: len(old)] == old and len(new) == len(old) + 3


def test_keep_mode_only_captions_samples_without_synthetic_captions(shards: Path, tmp_path: Path) -> None:
    assert main(common_args(shards, tmp_path / "p", "--output.mode=merge", "--output.on_existing=keep")) == 0
    marker = json.loads((tmp_path / "p" / "000000.caption.json").read_text())
    assert marker["kept_existing"] == 2  # s0-00 and s0-03 had captions
    for key, members in read_tar(shards / "000000.tar"):
        texts = json.loads(members["syn.json"])["syn_text"] if "syn.json" in members else []
        if key in ("s0-00", "s0-03"):
            assert texts == [f"old caption of {key}"]
        elif key not in BAD:
            assert len(texts) == 3


def test_quality_filter_keeps_the_best_k_captions_and_stores_their_scores(
    shards: Path, tmp_path: Path
) -> None:
    args = common_args(
        shards,
        tmp_path / "p",
        "--output.mode=merge",
        "--captioner.num_captions=4",
        "--quality.enabled=true",
        "--quality.keep_top_k=2",
    )
    assert main(args) == 0
    for key, members in read_tar(shards / "000001.tar"):
        if key in BAD:
            continue
        syn = json.loads(members["syn.json"])
        meta = json.loads(members["json"])
        assert len(syn["syn_text"]) == 2
        assert syn["syn_clip_scores"] == meta["syn_clip_scores"]
        assert syn["syn_clip_scores"] == sorted(syn["syn_clip_scores"], reverse=True)
        assert meta["uid"] == key and meta["source"] == "test"


def test_slurm_array_tasks_caption_contiguous_shard_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_shards(tmp_path / "shards", num_shards=4, per_shard=2)
    out = tmp_path / "syn"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(common_args(tmp_path / "shards", out)) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["000002.tar", "000003.tar"]
    assert main([*common_args(tmp_path / "shards", out), "--task-index=0"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:06d}.tar" for i in range(4)]


def test_dry_run_prints_the_plan_and_captions_nothing(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    assert main([*common_args(shards, out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "2 shards in total" in text and "to do 2" in text
    assert "000000.tar" in text and "000001.tar" in text
    assert not out.exists()
    assert main(common_args(shards, out)) == 0
    capsys.readouterr()
    assert main([*common_args(shards, out), "--dry-run"]) == 0
    assert "done 2, to do 0" in capsys.readouterr().out


def test_bad_config_values_exit_with_an_error_naming_the_key(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([f"--input.shards={shards}", "--output.mode=sidecar"]) == 2
    assert "output.path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"--input.shards={shards}", "--output.path=x", "--captioner.decode.top_p=0"])
    assert "top_p" in capsys.readouterr().err


def test_copied_shard_folders_plan_independently(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    cfg = load_config(
        CaptionJobConfig, overrides=[f"--input.shards={copy}", f"--output.path={tmp_path / 'o'}"]
    )
    plan = make_plan(cfg)
    assert [u.name for u in plan.todo] == ["000000.tar", "000001.tar"]
    assert all(os.path.dirname(u.marker_url) == str(tmp_path / "o") for u in plan.todo)


@pytest.mark.slow
def test_sigkilled_job_process_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    write_shards(tmp_path / "shards", num_shards=1, per_shard=40)
    args = common_args(tmp_path / "shards", tmp_path / "killed", "--captioner.decode.max_len=16")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.caption", *args], cwd=root, env=env)
    partial = tmp_path / "killed" / "000000.caption.partial.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and len(partial.read_text().splitlines()) >= 5:  # header + 4 samples
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "000000.caption.json").exists()
    done_before = len(partial.read_text().splitlines()) - 1

    assert main(args) == 0
    marker = json.loads((tmp_path / "killed" / "000000.caption.json").read_text())
    assert marker["resumed_samples"] >= min(done_before, 4)
    assert main(common_args(tmp_path / "shards", tmp_path / "whole", "--captioner.decode.max_len=16")) == 0
    assert (tmp_path / "killed" / "000000.tar").read_bytes() == (
        tmp_path / "whole" / "000000.tar"
    ).read_bytes()


def test_hf_backend_runs_through_the_same_job(shards: Path, tmp_path: Path) -> None:
    from test_caption_captioners import write_tiny_blip

    blip = write_tiny_blip(tmp_path / "blip")
    out = tmp_path / "syn"
    args = [
        *common_args(shards, out, "--captioner.backend=hf", f"--captioner.hf_dir={blip}"),
        "--captioner.decode.min_len=2",
    ]
    assert main(args) == 0
    for key, members in read_tar(out / "000001.tar"):
        texts = json.loads(members["syn.json"])["syn_text"]
        assert len(texts) == (0 if key in BAD else 3)
    assert json.loads((out / "000001.caption.json").read_text())["captioner"] == "hf:blip"

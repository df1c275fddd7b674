"""Synthetic captions joined per shard (issue 16 item 2): DataCompDR's published tars joined by the json's
uid, sha256 checked, unmatched records counted and warned, the per-shard index giving the same bytes as the
in-memory join, a killed index step finished by a rerun, and teacher embeddings reaching a loader batch.

    .venv/bin/pytest tests/test_shard_captions.py -q
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_helpers import index_files, kill_and_rerun_during_index, tar_bytes

from data_prep.shard import main
from pipeline.data import schema
from pipeline.data.prep.fixtures import encode, scene_image, teacher_embeddings, write_datacompdr_tars
from pipeline.data.tar import iter_tar_samples

REPO = Path(__file__).resolve().parent.parent
NUM_ROWS = 12
SHARD = 4


def read_shards(out: Path) -> dict[str, dict[str, object]]:
    samples: dict[str, dict[str, object]] = {}
    for tar in sorted(out.glob("*.tar")):
        with open(tar, "rb") as f:
            for key, members in iter_tar_samples(f):
                samples[key] = schema.decode_sample([(f"{key}.{e}", d) for e, d in members.items()])
    return samples


class Inputs:
    """12 rows in two parquet files; DataCompDR tars with captions for rows 0-9 (row 9's sha256 wrong), plus
    3 records of uids no row has, and a second DataCompDR folder none of whose records matches a row."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "img").mkdir(parents=True)
        self.uids, self.sha = [], {}
        rows = []
        for i in range(NUM_ROWS):
            uid, im, caption = scene_image(i)
            data = encode(im, "JPEG", quality=90)
            (root / "img" / f"{uid}.jpg").write_bytes(data)
            self.uids.append(uid)
            self.sha[uid] = hashlib.sha256(data).hexdigest()
            rows.append((uid, f"img/{uid}.jpg", caption))
        for name, part in (("a.parquet", rows[:7]), ("b.parquet", rows[7:])):
            table = pa.table({k: [r[j] for r in part] for j, k in enumerate(("uid", "url", "text"))})
            pq.write_table(table, root / name, row_group_size=3)
        self.syn = {
            uid: [f"a precise caption of {uid}", f"another view {i}"] for i, uid in enumerate(self.uids[:10])
        }
        records = [
            {"uid": uid, "syn_text": texts, "sha256": self.sha[uid] if uid != self.uids[9] else "0" * 64}
            for uid, texts in self.syn.items()
        ]
        records.insert(3, {"uid": "ghost_a", "syn_text": ["nobody"]})
        records += [{"uid": "ghost_b", "syn_text": ["nobody"]}, {"uid": "ghost_c", "syn_text": ["x"]}]
        write_datacompdr_tars(root / "dr", records[::-1], samples_per_tar=4, tars_per_folder=2)
        write_datacompdr_tars(root / "dr_other", [{"uid": "ghost_d", "syn_text": ["elsewhere"]}])

    def args(self, out: Path, *extra: str) -> list[str]:
        return [
            f"--source.parquet=['{self.root}/*.parquet']",
            f"--source.image_root={self.root}",
            f"--syn.paths=['{self.root}/dr', '{self.root}/dr_other']",
            f"--output.path={out}",
            f"--output.samples_per_shard={SHARD}",
            "--image.size=64",
            "--fetch.retries=0",
            "--executor.processes=1",
            "--executor.progress=false",
            *extra,
        ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.shard", *inputs.args(out)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_datacompdr_tars_join_by_the_json_uid_not_the_member_key(inputs: Inputs, reference) -> None:
    out, _ = reference
    samples = read_shards(out)
    assert sorted(samples) == sorted(inputs.uids)
    for uid in inputs.uids[:9]:
        assert samples[uid][schema.SYN_KEY] == inputs.syn[uid]
    for uid in inputs.uids[10:]:
        assert schema.SYN_KEY not in samples[uid]
    assert all(schema.TEACHER_KEY not in s for s in samples.values())  # only on request


def test_a_sha256_mismatch_drops_the_captions_and_is_counted(inputs: Inputs, reference) -> None:
    out, _ = reference
    samples = read_shards(out)
    assert schema.SYN_KEY not in samples[inputs.uids[9]]
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*.stats.json"))]
    assert sum(s["num_syn_sha256_mismatch"] for s in stats) == 1
    assert sum(s["num_syn"] for s in stats) == 9


def test_unmatched_records_are_counted_and_a_source_matching_nothing_is_warned(
    inputs: Inputs, reference
) -> None:
    out, stdout = reference
    index = json.loads((out / "_plan" / "syn_index" / "index.json").read_text())
    assert index["rows_with_syn"] == 10  # rows whose uid has a record (row 9's is dropped later, by sha256)
    assert index["records"] == 14 and index["matched"] == 10 and index["unmatched"] == 4
    by_folder = {Path(f["url"]).parent.parent.name: f for f in index["files"]}
    assert len(by_folder) == 2 and by_folder["dr_other"]["matched"] == 0
    assert "10 rows got captions" in stdout and "4 matched no row" in stdout
    warnings = [line for line in stdout.splitlines() if line.startswith("warning: syn.paths")]
    assert len(warnings) == 1 and "dr_other (1 file(s), 1 records)" in warnings[0]
    assert "matched no row" in warnings[0]
    assert not any("manifest.jsonl" in f["url"] for f in index["files"])


def test_per_shard_join_writes_the_same_bytes_as_the_in_memory_join(
    inputs: Inputs, reference, tmp_path: Path
) -> None:
    out, _ = reference
    memory = tmp_path / "memory"
    assert main(inputs.args(memory, "--syn.join=memory")) == 0
    assert tar_bytes(memory) == tar_bytes(out) != {}
    assert not (memory / "_plan" / "syn_index").exists()


def test_index_partitions_follow_the_memory_budget_and_join_to_the_same_bytes(
    inputs: Inputs, reference, tmp_path: Path, monkeypatch
) -> None:
    from pipeline.data.prep import index

    monkeypatch.setattr(index, "num_partitions", lambda files, mb: 5)
    out = tmp_path / "five"
    assert main(inputs.args(out, "--stage=plan")) == 0
    assert json.loads((out / "_plan" / "syn_index" / "index.json").read_text())["num_partitions"] == 5
    assert len(list((out / "_plan" / "syn_index" / "joined").glob("*.parquet"))) == 5
    assert main(inputs.args(out)) == 0
    samples = read_shards(out)
    assert {u for u, s in samples.items() if schema.SYN_KEY in s} == set(inputs.uids[:9])
    assert tar_bytes(out) == tar_bytes(reference[0])


def test_each_shard_task_reads_only_its_own_rows_captions(inputs: Inputs, reference) -> None:
    from pipeline.data.prep import index

    out, _ = reference
    plan_dir = str(out / "_plan")
    total = json.loads((out / "_plan" / "syn_index" / "index.json").read_text())["num_partitions"]
    u = inputs.uids
    units = [u[0:4], u[4:7], u[7:11], u[11:12]]  # a.parquet: 7 rows, b.parquet: 5 rows, 4 rows per shard
    seen: set[str] = set()
    for unit, own in enumerate(units):
        mine = index.load_unit(plan_dir, unit, total)
        assert set(mine) == set(own) & set(u[:10])
        seen |= set(mine)
    assert seen == set(inputs.uids[:10])


def test_index_step_killed_with_sigkill_reruns_to_identical_output(inputs: Inputs, tmp_path: Path) -> None:
    many = tmp_path / "dr_many"  # many small caption files: an index step long enough to be killed in
    write_datacompdr_tars(many, [{"uid": f"other_{i}", "syn_text": ["x"]} for i in range(300)], 1, 50)
    paths = f"--syn.paths=['{inputs.root}/dr', '{many}']"
    ref, out = tmp_path / "reference", tmp_path / "killed"
    assert main(inputs.args(ref, paths)) == 0
    kill_and_rerun_during_index(inputs.args(out, paths, "--stage=plan"), out, "syn_index")
    assert tar_bytes(out) == tar_bytes(ref) != {}
    assert index_files(out, "syn_index") == index_files(ref, "syn_index")
    # the killed writer's temporaries wait in <output>/_tmp/ (an hour, as the shard job's), nowhere else
    assert {p.parent for p in out.rglob("*.tmp-*")} <= {out / "_tmp"}


def test_teacher_embeddings_reach_a_loader_batch(inputs: Inputs, tmp_path: Path) -> None:
    from pipeline.data.loader import LoaderConfig, build_loader

    out = tmp_path / "teacher"
    assert main(inputs.args(out, "--syn.teacher_embeddings=true")) == 0
    samples = read_shards(out)
    for uid in inputs.uids[:9]:
        want = teacher_embeddings(uid, len(inputs.syn[uid]))
        assert {k: v.tolist() for k, v in samples[uid][schema.TEACHER_KEY].items()} == {
            k: v.tolist() for k, v in want.items()
        }
    cfg = LoaderConfig(
        shards=str(out),
        micro_batch=3,
        num_workers=0,
        epochs=1,
        drop_last=False,
        image_size=32,
        augment=False,
        shuffle_buffer=0,
        teacher_embeddings=True,
        skip_duplicate_images=False,
    )
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    uids = [u for b in batches for u in b["uid"]]
    assert sorted(uids) == sorted(inputs.uids[:9])  # rows without embeddings are skipped, and counted
    assert loader.stats.get("missing_teacher_emb") == 3
    b = batches[0]
    assert b["teacher_image_emb"].shape == (3, 2, 8) and b["teacher_image_emb"].dtype.is_floating_point
    want = teacher_embeddings(b["uid"][0], 2)["text_emb"].astype(np.float32)
    assert np.array_equal(b["teacher_text_emb"][0].numpy(), want)

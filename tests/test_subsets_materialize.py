"""Materialised subsets (issue 16 item 4): ``subsets.materialize`` writes each nested subset as its own shard
set (re-packed tars + sizes.json), nested and deterministic, that a loader reads without touching the full
set's bytes; the scaling grid and the toy reproduction point their runs at them. The subset uid lists are
written in one streamed pass over the shards (no process holds the dataset's uids).

    .venv/bin/pytest tests/test_subsets_materialize.py -q
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_helpers import tar_bytes

from data_prep.shard import main
from pipeline.data.prep.fixtures import encode, scene_image
from pipeline.data.prep.subsets import SubsetConfig, in_subset, write_subsets
from pipeline.data.tar import iter_tar_samples

NUM_ROWS = 40
SHARD = 8


def samples_of(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            out += list(iter_tar_samples(f))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    (root / "img").mkdir()
    rows = []
    for i in range(NUM_ROWS):
        uid, im, caption = scene_image(i, size=64)
        (root / "img" / f"{uid}.jpg").write_bytes(encode(im, "JPEG", quality=85))
        rows.append((uid, f"img/{uid}.jpg", caption))
    pq.write_table(
        pa.table({k: [r[j] for r in rows] for j, k in enumerate(("uid", "url", "text"))}), root / "a.parquet"
    )
    return root


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--source.parquet=['{root}/a.parquet']",
        f"--source.image_root={root}",
        f"--output.path={out}",
        f"--output.samples_per_shard={SHARD}",
        "--image.size=32",
        "--subsets.fractions=[0.25, 0.5]",
        "--subsets.materialize=true",
        "--executor.processes=1",
        "--executor.progress=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def dataset(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    assert main(args(inputs, out)) == 0
    return out


def test_subset_uid_lists_stream_from_a_generator_without_holding_the_chosen_uids(tmp_path: Path) -> None:
    num_shards, per_shard, fractions = 60, 1_500, (0.5, 1.0)

    def shard_uids(s: int) -> Iterator[str]:  # made on demand: only what the writer keeps stays alive
        return (f"{s:08x}{k:024x}" for k in range(per_shard))

    def shards() -> Iterator[tuple[str, Iterator[str]]]:
        return ((f"{s:06d}.tar", shard_uids(s)) for s in range(num_shards))

    tracemalloc.start()
    try:
        summary = write_subsets(str(tmp_path), shards(), SubsetConfig(fractions))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # what holding the chosen uids would take: one str object per uid of either list (1.5 x all uids)
    uid_bytes = sys.getsizeof(f"{0:032x}")
    held = summary["50pct"]["num_samples"] * uid_bytes + num_shards * per_shard * uid_bytes
    assert peak < held / 10, (peak, held)
    for fraction, name in zip(fractions, ("50pct", "100pct")):
        want = [u for s in range(num_shards) for u in shard_uids(s) if in_subset(u, fraction)]
        assert (tmp_path / "subsets" / f"{name}.txt").read_text() == "".join(u + "\n" for u in want)
        info = json.loads((tmp_path / "subsets" / f"{name}.json").read_text())
        assert info["num_samples"] == len(want) == summary[name]["num_samples"]
        assert sum(info["shards"].values()) == len(want) and len(info["shards"]) == num_shards
    assert 0.45 < summary["50pct"]["num_samples"] / (num_shards * per_shard) < 0.55


def test_each_subset_is_its_own_shard_set_in_uid_list_order(dataset: Path) -> None:
    full = dict(samples_of(dataset))
    manifest = json.loads((dataset / "manifest.json").read_text())
    for name in ("25pct", "50pct"):
        folder = dataset / "subsets" / name
        uids = (dataset / "subsets" / f"{name}.txt").read_text().split()
        got = samples_of(folder)
        assert [k for k, _ in got] == uids and 0 < len(uids) < NUM_ROWS
        assert all(members == full[key] for key, members in got)  # members copied byte for byte
        sizes = json.loads((folder / "sizes.json").read_text())
        assert sum(sizes.values()) == len(uids) and all(n == SHARD for n in list(sizes.values())[:-1])
        assert sorted(p.name for p in folder.glob("*.tar")) == sorted(sizes)
        assert manifest["subsets"][name]["shards"] == f"subsets/{name}/"


def test_materialised_subsets_are_nested_and_deterministic(
    inputs: Path, dataset: Path, tmp_path: Path
) -> None:
    small = {k for k, _ in samples_of(dataset / "subsets" / "25pct")}
    large = {k for k, _ in samples_of(dataset / "subsets" / "50pct")}
    assert small < large
    again = tmp_path / "again"
    assert main(args(inputs, again, "--fetch.threads=2")) == 0
    for name in ("25pct", "50pct"):
        a, b = dataset / "subsets" / name, again / "subsets" / name
        assert tar_bytes(a) == tar_bytes(b) != {}
        assert (a / "sizes.json").read_bytes() == (b / "sizes.json").read_bytes()


def test_an_interrupted_materialisation_is_finished_by_a_rerun(
    inputs: Path, dataset: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    want = tar_bytes(out / "subsets" / "25pct")
    # what a kill leaves: some shards written, no sizes.json (the completion marker)
    (out / "subsets" / "25pct" / "sizes.json").unlink()
    for tar in sorted((out / "subsets" / "25pct").glob("*.tar"))[1:]:
        tar.unlink()
    assert main(args(inputs, out)) == 0
    assert tar_bytes(out / "subsets" / "25pct") == want


def test_a_loader_on_a_materialised_subset_reads_only_its_own_bytes(dataset: Path, monkeypatch) -> None:
    from pipeline.data import loader as loader_mod

    opened: list[str] = []
    real_open = loader_mod._open_shard
    monkeypatch.setattr(loader_mod, "_open_shard", lambda url: opened.append(url) or real_open(url))
    folder = dataset / "subsets" / "25pct"
    cfg = loader_mod.LoaderConfig(
        shards=str(folder),
        micro_batch=2,
        num_workers=0,
        epochs=1,
        drop_last=False,
        image_size=16,
        augment=False,
    )
    uids = [u for b in loader_mod.build_loader(cfg) for u in b["uid"]]
    assert sorted(uids) == sorted((dataset / "subsets" / "25pct.txt").read_text().split())
    assert opened and all(Path(u).parent == folder for u in opened)
    own = sum(p.stat().st_size for p in folder.glob("*.tar"))
    full = sum(p.stat().st_size for p in dataset.glob("*.tar"))
    assert own < full / 2


def test_the_scaling_grid_points_a_subset_at_its_materialised_shards(dataset: Path, tmp_path: Path) -> None:
    from pipeline.report.scaling import GridConfig, PretrainGridConfig, ScalingConfig, plan_points

    cfg = ScalingConfig(
        root=str(tmp_path / "study"),
        grid=GridConfig(subsets=("25pct", "50pct", "all"), caption_sources=("web",)),
        pretrain=PretrainGridConfig(shards=str(dataset)),
    )
    points = {p.subset: p for p in plan_points(cfg)}
    for name in ("25pct", "50pct"):
        assert points[name].shards == str(dataset / "subsets" / name)
        assert points[name].subset_size == len((dataset / "subsets" / f"{name}.txt").read_text().split())
    assert points["all"].shards == ""


def test_the_toy_reproduction_materialises_its_subsets_and_its_points_use_them(tmp_path: Path) -> None:
    from pipeline.report.scaling import plan_points
    from pipeline.report.toy import ReproduceConfig, ToyDataConfig, study_config, write_toy_data

    cfg = ToyDataConfig(
        pool_size=24, subset_sizes=(8, 24), samples_per_shard=16, num_syn_captions=2, num_eval=4
    )
    data = write_toy_data(cfg, tmp_path / "data")
    pool = {
        k: m for t in sorted((tmp_path / "data" / "shards").glob("*.tar")) for k, m in samples_of(t.parent)
    }
    for name, size in (("n8", 8), ("n24", 24)):
        folder = Path(data["subsets"][name]["shards"])
        got = samples_of(folder)
        assert [k for k, _ in got] == Path(data["subsets"][name]["uids"]).read_text().split()
        assert all(m == pool[k] for k, m in got)
        assert sum(json.loads((folder / "sizes.json").read_text()).values()) == size
    study = study_config(ReproduceConfig(out=str(tmp_path), data=cfg), data)
    shards = {p.subset: p.shards for p in plan_points(study)}
    assert shards == {"n8": data["subsets"]["n8"]["shards"], "n24": data["subsets"]["n24"]["shards"]}

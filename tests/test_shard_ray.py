"""The shard job on a real Ray cluster (``ray start --head`` on loopback, from tests/ray_cluster.py):
``--executor ray`` writes the same bytes as the local executor.

    .venv/bin/pytest tests/test_shard_ray.py -q
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray_cluster import local_ray_cluster  # tests/ is on sys.path under pytest

from data_prep.shard import main
from pipeline.data.prep.fixtures import encode, scene_image


@pytest.mark.slow
def test_ray_executor_writes_the_same_shards_as_the_local_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from pipeline import ray_backend

    rows: dict[str, list[str]] = {"uid": [], "url": [], "text": []}
    for i in range(12):
        uid, im, caption = scene_image(i)
        (tmp_path / f"{uid}.jpg").write_bytes(encode(im))
        rows["uid"].append(uid), rows["url"].append(f"{uid}.jpg"), rows["text"].append(caption)
    rows["url"][5] = "missing.jpg"
    pq.write_table(pa.table(rows), tmp_path / "meta.parquet")
    args = [
        f"--source.parquet=['{tmp_path}/meta.parquet']",
        f"--source.image_root={tmp_path}",
        "--output.samples_per_shard=4",
        "--image.size=32",
        "--executor.progress=false",
    ]
    assert main([*args, f"--output.path={tmp_path / 'local'}", "--executor.processes=1"]) == 0
    with local_ray_cluster(num_cpus=2) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        try:
            assert main([*args, f"--output.path={tmp_path / 'ray'}", "--executor", "ray"]) == 0
            assert ray_backend.map_tasks(abs, [-3, 2, -1], num_cpus_per_task=0.5) == [3, 2, 1]
        finally:
            ray.shutdown()
    for name in ("000000.tar", "000001.tar", "000002.tar", "sizes.json", "manifest.json", "failures.parquet"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name

"""The caption job on a Ray Data actor pool (a real ``ray start --head`` on loopback, tests/ray_cluster.py):
``--executor ray`` writes the same sidecar shards as the local executor.

    .venv/bin/pytest tests/test_caption_ray.py -q -m slow
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import pytest
from ray_cluster import local_ray_cluster  # tests/ is on sys.path under pytest
from test_caption_job import common_args, write_shards

from data_prep.caption import main


@pytest.mark.slow
def test_ray_actor_pool_writes_the_same_sidecars_as_the_local_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from pipeline import ray_backend

    write_shards(tmp_path / "shards", num_shards=3, per_shard=4)
    assert main(common_args(tmp_path / "shards", tmp_path / "local")) == 0
    with local_ray_cluster(num_cpus=2) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        try:
            args = [
                *common_args(tmp_path / "shards", tmp_path / "ray"),
                "--executor",
                "ray",
                "--execution.ray_gpus_per_actor=0",
                "--execution.ray_min_actors=1",
                "--execution.ray_max_actors=2",
            ]
            assert main(args) == 0
            negate = functools.partial(functools.partial, operator.neg)  # a factory of a callable
            assert ray_backend.map_actor_pool(negate, [3, -2, 5], max_actors=2) == [-3, 2, -5]
        finally:
            ray.shutdown()
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
        assert (tmp_path / "ray" / name.replace(".tar", ".caption.json")).exists()

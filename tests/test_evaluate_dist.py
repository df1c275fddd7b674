"""Distributed evaluation: 2 gloo processes split zero-shot and retrieval and get the single-rank result.

.venv/bin/pytest tests/test_evaluate_dist.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_fixtures import make_world_data

from pipeline.model.clip import ModelConfig, build_clip
from pipeline.train.evaluate import EvalConfig, evaluate, map_chunks


def _evaluate(cfg: EvalConfig) -> dict[str, float]:
    torch.manual_seed(0)
    model, preprocess, tokenizer = build_clip(ModelConfig(name="debug"))
    return evaluate(model, tokenizer, preprocess, cfg)


def _worker(rank: int, world_size: int, store: str, cfg: EvalConfig, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        chunks = map_chunks(lambda k, chunk: (k, dist.get_rank(), chunk * 2), [1, 2, 3])
        result = {"metrics": _evaluate(cfg), "chunks": chunks}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_zero_shot_and_retrieval_and_both_get_the_single_rank_result(tmp_path: Path) -> None:
    data = make_world_data(tmp_path / "world", num_shards=1, per_shard=4, num_val=40)
    # batches of 8: 5 chunks per task, 3 on rank 0 and 2 on rank 1
    cfg = EvalConfig(zero_shot=str(data.zero_shot), retrieval=str(data.retrieval), batch_size=8)
    single = _evaluate(cfg)
    assert single["zs_images"] == 40 and single["retrieval_images"] == 40
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), cfg, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["metrics"] == single
        assert got["chunks"] == [[0, 0, 2], [1, 1, 4], [2, 0, 6]]  # chunk k ran on rank k % 2

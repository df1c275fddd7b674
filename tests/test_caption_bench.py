"""Smoke runs of the captioning benchmarks (tiny settings), so the scripts keep working.

.venv/bin/pytest tests/test_caption_bench.py -q
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    """benchmarks/ is not an installed package: load the script by path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_caption = _load("bench_caption")
gpu_caption = _load("gpu_caption")


def test_cpu_benchmark_checks_equal_tokens_and_reports_both_implementations(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--batch-sizes", "1", "3", "--max-len", "7", "--repeats", "1", "--images", "3", "--out", str(out)]
    assert bench_caption.main(args) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["batch_size"] for r in results] == [1, 3, 3]
    assert all(r["same_tokens"] and r["ours_captions_per_s"] > 0 for r in results[:2])
    assert results[2]["captions_per_image"] == 5


def test_gpu_benchmark_runs_on_cpu_with_the_debug_coca(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    args = ["--arch", "coca_debug", "--device", "cpu", "--precision", "fp32", "--batch-sizes", "2"]
    assert gpu_caption.main([*args, "--max-len", "7", "--iters", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["greedy_images_per_s"] > 0 and row["open_clip_batch_size"] == 2

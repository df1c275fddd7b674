"""Benchmark: synthetic-world generation speed on one core (scenes/s with masks, semantic map and depth),
synthetic-caption speed, and end-to-end export speed.

    python -m benchmarks.bench_synthworld                       # 64, 128, 256 px
    python -m benchmarks.bench_synthworld --sizes=[128] --num_scenes=2000 --json_out=runs/bench_sw.json

The issue's target: >= 200 scenes/s at 128 px on one core. Figures go in docs/benchmarks.md ("Synthetic world").
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.cli import parse_config
from pipeline.data import synthworld as sw
from pipeline.data.synth_export import ExportConfig, export


@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = (64, 128, 256)
    """Image sizes to time."""
    num_scenes: int = 500
    """Scenes per timed repeat."""
    repeats: int = 3
    """Timed repeats per size (the median is reported)."""
    num_export: int = 300
    """Pool size of the timed export (all layouts, 64 px); 0 skips it."""
    json_out: str = ""
    """Optional path for the results as JSON."""

    def __post_init__(self) -> None:
        if self.num_scenes < 1 or self.repeats < 1:
            raise ValueError("num_scenes and repeats must be >= 1")


def time_scenes(cfg: sw.WorldConfig, n: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) scenes/s of make_scene over ``repeats`` runs of ``n`` fresh indices. CPU time is
    this process's own, so it is the one-core rate even on a shared, busy machine."""
    sw.make_scene(cfg, 10**6)  # warm-up (noise bank, imports)
    wall, cpu = [], []
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for i in range(r * n, (r + 1) * n):
            sw.make_scene(cfg, i)
        wall.append(n / (time.perf_counter() - t))
        cpu.append(n / max(time.process_time() - c, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(
        BenchConfig, argv, prog="python -m benchmarks.bench_synthworld", description=__doc__
    )
    results: dict[str, object] = {"cpu_count": os.cpu_count(), "threads": 1}
    results["load_average_1min"] = os.getloadavg()[0]
    print(f"load average (1 min): {results['load_average_1min']:.1f} on {os.cpu_count()} cores")
    worlds = [(f"{size}px", sw.WorldConfig(image_size=size)) for size in cfg.sizes]
    worlds.append(("128px_shape_necessary", sw.shape_necessary_config(image_size=128)))
    for name, world in worlds:
        wall, cpu = time_scenes(world, cfg.num_scenes, cfg.repeats)
        results[f"scenes_per_s_{name}"] = {"wall": round(wall, 1), "cpu": round(cpu, 1)}
        print(f"make_scene {name:<22} {cpu:8.1f} scenes/s per CPU-second ({wall:7.1f} wall)")
    scenes = [sw.make_scene(sw.WorldConfig(), i) for i in range(200)]
    c = time.process_time()
    for s in scenes:
        sw.synthetic_captions(s, 5, 0)
    syn_rate = len(scenes) / max(time.process_time() - c, 1e-9)
    results["synthetic_captions_5_per_s"] = round(syn_rate, 1)
    print(f"synthetic_captions(k=5)           {syn_rate:8.1f} scenes/s per CPU-second")
    if cfg.num_export:
        n = cfg.num_export
        with tempfile.TemporaryDirectory() as tmp:
            c = time.process_time()
            summary = export(ExportConfig(out=tmp, num_samples=n, num_finetune=n // 5, num_val=n // 5))
            cpu = time.process_time() - c
        scenes_done = summary["scenes_generated"]
        results["export_all_layouts_64px"] = {
            "scenes": scenes_done,
            "wall": round(scenes_done / max(summary["seconds"], 1e-9), 1),
            "cpu": round(scenes_done / max(cpu, 1e-9), 1),
        }
        print(
            f"export, all layouts, 64 px        {results['export_all_layouts_64px']['cpu']:8.1f} scenes/s per "
            f"CPU-second ({results['export_all_layouts_64px']['wall']:.1f} wall, {scenes_done} scenes)"
        )
    if cfg.json_out:
        os.makedirs(os.path.dirname(cfg.json_out) or ".", exist_ok=True)
        with open(cfg.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: peak memory and time of one exact contrastive step, tiled loss + gradient caching vs naive.

    python -m benchmarks.bench_loss_memory                          # full run, ~10-20 min on 2 CPU cores
    python -m benchmarks.bench_loss_memory --parts=[big] --json_out=runs/bench_loss_big.json   # only the 65k step

Model: the ``debug`` CLIP at ``image_size`` px and ``context_length`` tokens, fp32, one CPU process, loss on
the web caption *and* a synthetic caption (two CLIP terms, as in the DataCompDR recipe). Every measurement
runs in a fresh subprocess, which reports its peak resident memory (``ru_maxrss``) and the wall / CPU time of
one full step (forward, loss, backward; no optimizer), after an untimed 64-sample warm-up step. Parts:

1. the loss alone (two terms, forward + backward, random features of width ``embed_dim``): its memory
   growth, naive (full B x B logits, open_clip's way) at each of ``naive_batches`` until the next would exceed
   ``budget_gib`` (extrapolated quadratically: the machine is shared, nothing is run to OOM), and tiled;
2. full steps at ``time_batches``: peak memory of each path in its own process, and time side by side ``naive`` (one forward / backward of the whole batch, naive
   loss), ``tiled`` (the same with the tiled loss) and ``cached``
   (:func:`pipeline.train.gradcache.cached_contrastive_step` with micro-batches of ``micro_batch``, tiled
   loss: what the trainer runs);
3. the headline: one exact ``big_batch``-sample step through the cached path (must fit in ``budget_gib``).

Figures go in docs/benchmarks.md ("Contrastive loss memory").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from pipeline.cli import parse_config

GIB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    big_batch: int = 65536
    """The exact global batch of the headline step (cached path); 0 skips it."""
    micro_batch: int = 4096
    """Micro-batch of the cached path."""
    tile_size: int = 4096
    """Tile of the tiled loss."""
    naive_batches: tuple[int, ...] = (4096, 8192, 16384, 32768)
    """Batches at which the loss alone is measured, naive (until the next would exceed the budget) and tiled."""
    embed_dim: int = 64
    """Feature width of the loss-alone measurement (the debug model's)."""
    time_batches: tuple[int, ...] = (4096, 8192)
    """Batches at which naive, tiled and cached steps are timed side by side."""
    repeats: int = 3
    """Timed repeats per (path, batch), interleaved across paths in one process; the fastest is reported."""
    image_size: int = 32
    """Image resolution of the debug model (px)."""
    context_length: int = 16
    """Text context length of the debug model (tokens)."""
    budget_gib: float = 8.0
    """Memory budget of one process (GiB)."""
    threads: int = 1
    """torch intra-op threads of each measurement (1: CPU time is then the work done, even on a busy machine
    where idle OpenMP threads would spin)."""
    parts: tuple[str, ...] = ("loss", "step_memory", "time", "big")
    """Which parts to run: ``loss`` (the loss alone), ``step_memory``, ``time``, ``big`` (the big step)."""
    json_out: str = ""
    """Optional path for the results as JSON."""

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.tile_size < 1 or self.repeats < 1:
            raise ValueError("micro_batch, tile_size and repeats must be >= 1")
        unknown = set(self.parts) - {"loss", "step_memory", "time", "big"}
        if unknown:
            raise ValueError(f"parts: unknown {sorted(unknown)}; choose from loss, step_memory, time, big")
        if self.big_batch and self.big_batch % self.micro_batch:
            raise ValueError(
                f"big_batch: {self.big_batch} is not a multiple of micro_batch {self.micro_batch}"
            )


def _setup(batch: int, cfg: BenchConfig):  # noqa: ANN202 - returns (step(path, n) -> loss, model)
    """The debug model, ``batch`` random samples and ``step(path, n)``: one training step (no optimizer)
    on the first ``n`` samples through ``path``."""
    import torch

    from pipeline.model.clip import ModelConfig, build_clip
    from pipeline.train.gradcache import cached_contrastive_step
    from pipeline.train.loss import LossConfig, contrastive_loss

    torch.set_num_threads(cfg.threads)
    model, _, _ = build_clip(
        ModelConfig(name="debug", image_size=cfg.image_size, context_length=cfg.context_length)
    )
    model.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    texts = torch.randint(1, model.vocab_size, (batch, cfg.context_length), generator=g)
    syn = torch.randint(1, model.vocab_size, (batch, cfg.context_length), generator=g)

    def embed(mb: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        out = model(image=mb[0], text=mb[1])
        return {
            "image": out["image_features"],
            "text": out["text_features"],
            "syn_text": model.encode_text(mb[2], normalize=True),
            "logit_scale": out["logit_scale"],
        }

    def step(path: str, n: int) -> float:
        loss_fn = partial(
            contrastive_loss,
            cfg=LossConfig(tile_size=cfg.tile_size, impl="naive" if path == "naive" else "tiled"),
        )
        model.zero_grad(set_to_none=True)
        if path == "cached":
            num_micro = max(1, n // cfg.micro_batch)
            micro = list(
                zip(images[:n].chunk(num_micro), texts[:n].chunk(num_micro), syn[:n].chunk(num_micro))
            )
            return float(cached_contrastive_step(embed, micro, loss_fn)["loss"])
        out = embed((images[:n], texts[:n], syn[:n]))
        loss, _ = loss_fn({k: v for k, v in out.items() if k != "logit_scale"}, out["logit_scale"])
        loss.backward()
        return float(loss.detach())

    return step


def _measure(path: str, batch: int, cfg: BenchConfig) -> dict[str, float]:
    """Peak RSS and time of one step through ``path`` in this (fresh) process, after a 64-sample warm-up."""
    step = _setup(batch, cfg)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(path, 64)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step(path, batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "path": path,
        "batch": batch,
        "peak_rss_gib": peak / GIB,
        "inputs_rss_gib": rss_inputs / GIB,
        "wall_s": wall,
        "cpu_s": cpu,
        "loss": loss,
    }


def _measure_time(batch: int, cfg: BenchConfig) -> dict[str, object]:
    """Steps of all three paths on the same model and data, interleaved, after a full-size warm-up of each:
    the fastest wall and CPU time of ``repeats`` per path (shapes and allocator are warm for all)."""
    step = _setup(batch, cfg)
    paths = ("naive", "tiled", "cached")
    for path in paths:
        step(path, batch)
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
    for _ in range(cfg.repeats):
        for path in paths:
            wall, cpu = time.perf_counter(), time.process_time()
            step(path, batch)
            times[path].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        "path": "time",
        "batch": batch,
        **{f"{p}_wall_s": min(w for w, _ in t) for p, t in times.items()},
        **{f"{p}_cpu_s": min(c for _, c in t) for p, t in times.items()},
    }


def _measure_loss(impl: str, batch: int, cfg: BenchConfig) -> dict[str, float]:
    """The loss alone (real + synthetic terms, forward + backward) on random features of the debug model's
    width: its own memory growth, without the towers' activations."""
    import torch
    import torch.nn.functional as F

    from pipeline.train.loss import LossConfig, contrastive_loss

    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(0)
    feats = {
        k: F.normalize(torch.randn(batch, cfg.embed_dim, generator=g), dim=1).requires_grad_()
        for k in ("image", "text", "syn_text")
    }
    scale = torch.tensor(30.0, requires_grad=True)
    small = {k: v[:64].detach().clone().requires_grad_() for k, v in feats.items()}  # untimed warm-up
    contrastive_loss(small, scale, LossConfig(tile_size=cfg.tile_size, impl=impl))[0].backward()  # type: ignore[arg-type]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall, cpu = time.perf_counter(), time.process_time()
    loss, _ = contrastive_loss(feats, scale, LossConfig(tile_size=cfg.tile_size, impl=impl))  # type: ignore[arg-type]
    loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "path": f"loss-{impl}",
        "batch": batch,
        "peak_rss_gib": peak / GIB,
        "inputs_rss_gib": before / GIB,
        "growth_gib": (peak - before) / GIB,
        "wall_s": wall,
        "cpu_s": cpu,
        "loss": float(loss),
    }


def _run(path: str, batch: int, cfg: BenchConfig) -> dict[str, float]:
    """``_measure`` in a fresh interpreter, so each peak RSS is its own."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_loss_memory",
        f"--measure={path}:{batch}",
        *[
            f"--{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}"
            for k, v in asdict(cfg).items()
            if k != "json_out"
        ],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{path} at {batch} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if path == "time":
        print(
            f"  time B={batch}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("_s"))
        )
        return result
    print(
        f"  {path:>10} B={batch:>6}: peak {result['peak_rss_gib']:.2f} GiB "
        f"(growth {result['peak_rss_gib'] - result['inputs_rss_gib']:.2f}), "
        f"wall {result['wall_s']:.2f} s, cpu {result['cpu_s']:.2f} s, loss {result['loss']:.4f}",
        flush=True,
    )
    return result


def _extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(
        BenchConfig,
        argv,
        prog="python -m benchmarks.bench_loss_memory",
        description=__doc__,
        extra_args=_extra_args,
    )
    if args.measure:
        path, batch = args.measure.split(":")
        if path == "time":
            print(json.dumps(_measure_time(int(batch), cfg)))
        elif path.startswith("loss-"):
            print(json.dumps(_measure_loss(path.removeprefix("loss-"), int(batch), cfg)))
        else:
            print(json.dumps(_measure(path, int(batch), cfg)))
        return 0
    results: dict[str, object] = {"config": asdict(cfg), "cpu_count": os.cpu_count()}
    if "loss" in cfg.parts:
        results["loss_memory"] = _loss_part(cfg)
    if "step_memory" in cfg.parts:
        print("full steps: peak memory", flush=True)
        results["step_memory"] = [
            _run(path, batch, cfg) for batch in cfg.time_batches for path in ("naive", "tiled", "cached")
        ]
    if "time" in cfg.parts:
        results["timing"] = _time_part(cfg)
    if cfg.big_batch and "big" in cfg.parts:
        results["big_step"] = _big_part(cfg)
    if cfg.json_out:
        from pipeline.io import write_json

        write_json(cfg.json_out, results)
    return 0


def _loss_part(cfg: BenchConfig) -> list[dict[str, float]]:
    print("loss alone (two terms, forward + backward): memory growth", flush=True)
    loss_mem: list[dict[str, float]] = []
    for batch in sorted(cfg.naive_batches):
        if loss_mem and loss_mem[-1]["growth_gib"] * (batch / loss_mem[-1]["batch"]) ** 2 > cfg.budget_gib:
            predicted = loss_mem[-1]["growth_gib"] * (batch / loss_mem[-1]["batch"]) ** 2
            loss_mem.append({"path": "loss-naive", "batch": batch, "predicted_growth_gib": predicted})
            print(
                f"  loss-naive B={batch}: predicted growth {predicted:.1f} GiB > budget, not run", flush=True
            )
            break
        loss_mem.append(_run("loss-naive", batch, cfg))
    for batch in sorted(cfg.naive_batches):
        loss_mem.append(_run("loss-tiled", batch, cfg))
    return loss_mem


def _time_part(cfg: BenchConfig) -> list[dict[str, float]]:
    print("full steps: time, interleaved in one process per batch", flush=True)
    timing = []
    for batch in cfg.time_batches:
        timing.append(_run("time", batch, cfg))
        for path in ("tiled", "cached"):
            print(
                f"  B={batch} {path}/naive: wall {timing[-1][f'{path}_wall_s'] / timing[-1]['naive_wall_s']:.2f}x, "
                f"cpu {timing[-1][f'{path}_cpu_s'] / timing[-1]['naive_cpu_s']:.2f}x",
                flush=True,
            )
    return timing


def _big_part(cfg: BenchConfig) -> dict[str, float]:
    print(f"exact {cfg.big_batch}-sample step (cached, micro-batch {cfg.micro_batch})", flush=True)
    big = _run("cached", cfg.big_batch, cfg)
    big["fits_budget"] = big["peak_rss_gib"] <= cfg.budget_gib
    big["naive_logits_gib"] = cfg.big_batch**2 * 4 / GIB
    print(
        f"  fits {cfg.budget_gib} GiB: {big['fits_budget']}; one fp32 {cfg.big_batch}^2 logit matrix "
        f"alone: {big['naive_logits_gib']:.1f} GiB"
    )
    return big


if __name__ == "__main__":
    sys.exit(main())

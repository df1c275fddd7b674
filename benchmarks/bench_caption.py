"""Captions/s on CPU: our cached, batched CoCa decoder vs open_clip's own ``CoCa.generate``, same weights.

Greedy decoding (open_clip: ``generation_type="top_k", top_k=1``), same ``max_len`` / ``min_len``, random
weights of the tiny ``coca_debug`` CoCa (64 px, 64-wide towers; random weights rarely end early, so every
caption runs to ``max_len`` in both implementations: the same work). The script checks that both produce
the same tokens before it reports timings. Each point is the median of ``--repeats`` runs, the two
implementations interleaved so machine load hits both alike.

    python -m benchmarks.bench_caption                        # batch 1, 16, 64; writes JSON lines
    python -m benchmarks.bench_caption --batch-sizes 64 --threads 2 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from pipeline.caption.captioners import ARCH_DEBUG, build_coca, coca_model_cfg
from pipeline.caption.decode import CocaDecoder, DecodeConfig
from pipeline.caption.openclip_compat import enable_open_clip_generate


def _ours(decoder: CocaDecoder, images: torch.Tensor, cfg: DecodeConfig, num_return: int = 1) -> Any:
    seeds = list(range(images.shape[0] * num_return)) if cfg.strategy == "sample" else None
    return decoder.generate(images, cfg, num_return=num_return, row_seeds=seeds)


def _open_clip(model: torch.nn.Module, images: torch.Tensor, cfg: DecodeConfig) -> list[list[int]]:
    out = model.generate(
        images, generation_type="top_k", top_k=1, seq_len=cfg.max_len, min_seq_len=cfg.min_len
    )
    rows = []
    for row in out.tolist():
        seq = []
        for tok in row[1:]:
            if tok in (49407, 0):
                break
            seq.append(tok)
        rows.append(seq)
    return rows


def _time(fn: Any) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine CPU time is the fair per-core figure."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def run(
    batch_sizes: list[int], max_len: int, repeats: int, images_per_point: int, seed: int
) -> list[dict[str, Any]]:
    enable_open_clip_generate()
    model = build_coca(coca_model_cfg(ARCH_DEBUG), seed=seed)
    decoder = CocaDecoder(model)
    cfg = DecodeConfig(strategy="greedy", max_len=max_len, min_len=5)
    gen = torch.Generator().manual_seed(seed)
    results = []
    with torch.inference_mode():
        for bs in batch_sizes:
            n_batches = max(1, images_per_point // bs)
            batches = [torch.randn(bs, 3, 64, 64, generator=gen) for _ in range(n_batches)]
            ours_tokens = [c[0] for b in batches[:1] for c in _ours(decoder, b, cfg)]
            ref_tokens = _open_clip(model, batches[0], cfg)
            if ours_tokens != ref_tokens:
                raise AssertionError(f"batch {bs}: our greedy tokens differ from open_clip's")
            ours_t, ref_t = [], []
            for _ in range(repeats):
                ours_t.append(_time(lambda bs_=batches: [_ours(decoder, b, cfg) for b in bs_]))
                ref_t.append(_time(lambda bs_=batches: [_open_clip(model, b, cfg) for b in bs_]))
            n = bs * n_batches
            ours_s, ref_s = statistics.median(t[0] for t in ours_t), statistics.median(t[0] for t in ref_t)
            ours_c, ref_c = statistics.median(t[1] for t in ours_t), statistics.median(t[1] for t in ref_t)
            mean_len = sum(len(t) for t in ours_tokens) / len(ours_tokens)
            results.append(
                {
                    "batch_size": bs,
                    "images": n,
                    "max_len": max_len,
                    "mean_tokens": round(mean_len, 2),
                    "ours_captions_per_s": round(n / ours_s, 2),
                    "open_clip_captions_per_s": round(n / ref_s, 2),
                    "speedup": round(ref_s / ours_s, 2),
                    "ours_captions_per_cpu_s": round(n / ours_c, 2),
                    "open_clip_captions_per_cpu_s": round(n / ref_c, 2),
                    "speedup_cpu_time": round(ref_c / ours_c, 2),
                    "same_tokens": True,
                }
            )
        # DataCompDR setting: 5 sampled captions per image at the largest batch (ours only)
        bs = batch_sizes[-1]
        images = torch.randn(bs, 3, 64, 64, generator=gen)
        sample = DecodeConfig(strategy="sample", max_len=max_len, min_len=5, top_k=50)
        times = [_time(lambda: _ours(decoder, images, sample, num_return=5)) for _ in range(repeats)]
        t, c = statistics.median(x[0] for x in times), statistics.median(x[1] for x in times)
        results.append(
            {
                "batch_size": bs,
                "images": bs,
                "captions_per_image": 5,
                "strategy": "sample top_k=50",
                "ours_captions_per_s": round(5 * bs / t, 2),
                "ours_images_per_s": round(bs / t, 2),
                "ours_captions_per_cpu_s": round(5 * bs / c, 2),
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_caption", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-len", type=int, default=20, help="tokens per caption incl. start / end")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--images", type=int, default=32, help="images per measured point (at least one batch)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.batch_sizes, args.max_len, args.repeats, args.images, args.seed)
    for r in results:
        print(json.dumps({**r, "threads": args.threads}))
    if args.out:
        from pipeline.io import write_json

        write_json(args.out, {"threads": args.threads, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

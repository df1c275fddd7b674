"""GPU captioning throughput: coca_ViT-L-14 at batch 256+ in bf16, our decoder vs open_clip's ``generate``.

For when a GPU is lent. Weights are random unless ``--checkpoint`` (local file) or ``--pretrained`` (an
open_clip tag: downloads) is given; random weights rarely emit the end token, so every caption runs to
``--max-len`` tokens (the worst case for throughput, the same work for both implementations). Reports, per
batch size: images/s and captions/s for greedy and for DataCompDR-style sampling (5 captions per image),
peak GPU memory, and open_clip's greedy ``generate`` (top_k=1) at the same batch for comparison (skipped
with ``--no-reference``; it re-runs the whole prefix every step, so it is slow at long lengths).

    python -m benchmarks.gpu_caption --batch-sizes 256 512 --out gpu_caption.json
    python -m benchmarks.gpu_caption --arch coca_debug --device cpu --batch-sizes 4 --iters 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from pipeline.caption.captioners import build_coca, coca_model_cfg, load_coca_checkpoint
from pipeline.caption.decode import CocaDecoder, DecodeConfig
from pipeline.caption.openclip_compat import enable_open_clip_generate

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, iters: int) -> float:
    fn()  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def load_model(arch: str, checkpoint: str, pretrained: str) -> torch.nn.Module:
    if pretrained:
        import open_clip

        return open_clip.create_model(arch, pretrained=pretrained).eval()
    model = build_coca(coca_model_cfg(arch), seed=0)
    if checkpoint:
        _, state = load_coca_checkpoint(checkpoint)
        model.load_state_dict(state)
    return model


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    dtype = _DTYPES[args.precision]
    model = load_model(args.arch, args.checkpoint, args.pretrained).to(device=device, dtype=dtype)
    decoder = CocaDecoder(model)
    size = coca_model_cfg(args.arch)["vision_cfg"]["image_size"]
    greedy = DecodeConfig(strategy="greedy", max_len=args.max_len, min_len=5)
    sample = DecodeConfig(strategy="sample", max_len=args.max_len, min_len=5, top_p=0.9)
    results = []
    for bs in args.batch_sizes:
        images = torch.randn(bs, 3, size, size, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            t_greedy = _timed(lambda x=images: decoder.generate(x, greedy), device, args.iters)
            seeds = list(range(bs * 5))
            t_sample = _timed(
                lambda x=images, s=seeds: decoder.generate(x, sample, num_return=5, row_seeds=s),
                device,
                args.iters,
            )
        row: dict[str, Any] = {
            "arch": args.arch,
            "device": str(device),
            "precision": args.precision,
            "batch_size": bs,
            "max_len": args.max_len,
            "greedy_images_per_s": round(bs / t_greedy, 1),
            "sample5_images_per_s": round(bs / t_sample, 1),
            "sample5_captions_per_s": round(5 * bs / t_sample, 1),
        }
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            row["gpu"] = torch.cuda.get_device_name(device)
        if not args.no_reference:
            enable_open_clip_generate()
            ref_bs = min(bs, args.reference_batch)
            ref_images = images[:ref_bs]
            autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            with torch.inference_mode(), autocast:
                t_ref = _timed(
                    lambda x=ref_images: model.generate(
                        x, generation_type="top_k", top_k=1, seq_len=args.max_len, min_seq_len=5
                    ),
                    device,
                    1,
                )
            row["open_clip_greedy_images_per_s"] = round(ref_bs / t_ref, 1)
            row["open_clip_batch_size"] = ref_bs
            row["greedy_speedup_vs_open_clip"] = round(t_ref / ref_bs / (t_greedy / bs), 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_caption", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", default="coca_ViT-L-14")
    parser.add_argument("--checkpoint", default="", help="local CoCa checkpoint file")
    parser.add_argument("--pretrained", default="", help="open_clip pretrained tag (downloads)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--reference-batch", type=int, default=256, help="largest batch for open_clip's generate"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip open_clip's generate")
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_caption: no CUDA device; use --device cpu with --arch coca_debug for a smoke run",
            file=sys.stderr,
        )
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    results = run(args)
    if args.out:
        from pipeline.io import write_json

        write_json(args.out, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Samples/s per GPU and model FLOP utilisation of a pretraining step: ViT-B/16, bf16, micro-batch 256.

    python -m benchmarks.gpu_pretrain_mfu                          # one GPU, the seed recipe's model
    torchrun --nproc_per_node 8 -m benchmarks.gpu_pretrain_mfu     # 8 GPUs (global batch 8 x 256)
    python -m benchmarks.gpu_pretrain_mfu --model debug --image-size 64 --context 32 --micro-batch 32 --cpu  # smoke

It runs the trainer's own step (``Trainer.train_step``'s pieces: the DeepSpeed engine, the exact gathered
contrastive loss on the web caption and a synthetic caption, bf16, ZeRO stage as given) on random inputs, so
the data loader is out of the measurement. MFU = samples/s x 3 x forward FLOPs per sample (counted with
``torch.utils.flop_counter``) / (devices x peak bf16 FLOP/s: 989 TFLOP/s for H100/H200, 312 for A100, or
``--peak-tflops``). Without a GPU it prints that and exits 0 unless ``--cpu`` asks for a CPU run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from functools import partial

import torch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_pretrain_mfu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--context", type=int, default=77)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument(
        "--accumulation", type=int, default=1, help="micro-batches per step (gradient caching)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-syn", action="store_true", help="web caption only (one text per image)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak (0: known GPU value)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU when there is no GPU (a smoke test)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_pretrain_mfu: no CUDA device here; nothing measured (use --cpu for a smoke run)")
        return 0

    from pipeline.dist import close_distributed
    from pipeline.model.clip import ModelConfig, build_clip
    from pipeline.model.flops import forward_flops_per_sample, train_flops_per_sample
    from pipeline.train.engine import Engine, EngineConfig, init_distributed
    from pipeline.train.gradcache import cached_contrastive_step
    from pipeline.train.loss import LossConfig, contrastive_loss
    from pipeline.train.optim import OptimConfig
    from pipeline.train.trainer import MAX_LOGIT_SCALE, LogConfig, memory_gib, peak_flops_per_device

    init_distributed()
    world = torch.distributed.get_world_size()
    model_cfg = ModelConfig(
        name=args.model,
        image_size=args.image_size,
        context_length=args.context,
        grad_checkpointing=args.grad_checkpointing,
    )
    model, _, _ = build_clip(model_cfg)
    num_texts = 1 if args.no_syn else 2
    flops = train_flops_per_sample(forward_flops_per_sample(model, args.image_size, args.context, num_texts))
    engine = Engine(
        model,
        EngineConfig(zero_stage=args.zero_stage, precision=args.precision),
        OptimConfig(warmup_steps=10),
        10_000,
        args.micro_batch,
        args.accumulation,
    )
    loss_cfg = LossConfig(w_syn=0.0 if args.no_syn else 1.0)
    loss_fn = partial(contrastive_loss, cfg=loss_cfg)
    device = engine.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        {
            "image": torch.randn(args.micro_batch, 3, args.image_size, args.image_size, generator=gen).to(
                device
            ),
            "text": torch.randint(1, 49407, (args.micro_batch, args.context), generator=gen).to(device),
            "syn_text": torch.randint(1, 49407, (args.micro_batch, args.context), generator=gen).to(device),
        }
        for _ in range(args.accumulation)
    ]

    def embed(batch):
        n = batch["image"].shape[0]
        text = batch["text"] if args.no_syn else torch.cat([batch["text"], batch["syn_text"]])
        out = engine(image=batch["image"], text=text)
        feats = {"image": out["image_features"].float(), "text": out["text_features"][:n].float()}
        if not args.no_syn:
            feats["syn_text"] = out["text_features"][n:].float()
        feats["logit_scale"] = out["logit_scale"].float().reshape(()).clamp(max=MAX_LOGIT_SCALE)
        return feats

    def backward(t):
        engine.backward(t)
        engine.micro_step()

    def step():
        if len(batches) == 1:
            feats = embed(batches[0])
            scale = feats.pop("logit_scale")
            loss, _ = loss_fn(feats, scale)
            backward(loss)
        else:
            cached_contrastive_step(embed, batches, loss_fn, backward=backward)

    engine.train()
    for _ in range(args.warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    per_device = args.micro_batch * args.accumulation / seconds
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_device(LogConfig())
    result = {
        "model": args.model,
        "precision": args.precision,
        "zero_stage": args.zero_stage,
        "devices": world,
        "micro_batch": args.micro_batch,
        "accumulation": args.accumulation,
        "texts_per_image": num_texts,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "step_s": round(seconds, 4),
        "samples_per_s_per_device": round(per_device, 1),
        "train_gflops_per_sample": round(flops / 1e9, 2),
        "peak_tflops_per_device": peak / 1e12,
        "mfu": round(per_device * flops / peak, 4),
        "memory_gib": round(memory_gib(), 2),
    }
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result, indent=2))
        print(
            f"{args.model} {args.precision} micro-batch {args.micro_batch}: "
            f"{per_device:.1f} samples/s/device, MFU {100 * result['mfu']:.1f}%"
        )
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Forward FLOPs of the detection encoder: global attention vs ViTDet's windowed attention, counted on meta tensors.

Builds the backbone of ``pipeline.model.backbone`` on the ``meta`` device (no weights, no compute) and counts
one image's forward pass with ``torch.utils.flop_counter`` (attention through the math backend, so its
matmuls are counted). Attention FLOPs are the ``bmm`` / ``baddbmm`` products inside the attention modules; the
rest is projections, MLPs and the patch embedding. Counts, not timings: the same on every machine.

    python -m benchmarks.bench_vitdet_flops                                  # ViT-B-16 at 1024 px, windows 0 and 14
    python -m benchmarks.bench_vitdet_flops --model debug --image-size 256 --windows 0 4
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.backbone import BackboneConfig, build_backbone


def count(model: str, image_size: int, window: int) -> dict[str, Any]:
    with torch.device("meta"):
        backbone = build_backbone(
            BackboneConfig(model=model, image_size=image_size, window_size=window, out_indices=(-1,))
        ).eval()
    image = torch.zeros(1, 3, image_size, image_size, device="meta")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            backbone(image)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    total = counter.get_total_flops()
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in per_op.items() if "bmm" in str(op))
    return {
        "model": model,
        "image_size": image_size,
        "window_size": window,
        "global_blocks": list(backbone.global_blocks),
        "forward_gflops": round(total / 1e9, 1),
        "attention_gflops": round(attention / 1e9, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_vitdet_flops", description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 14], help="0 = global attention")
    args = parser.parse_args(argv)
    for window in args.windows:
        print(json.dumps(count(args.model, args.image_size, window)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

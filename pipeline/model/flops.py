"""FLOPs per training sample of a CLIP model, counted (not estimated) with ``torch.utils.flop_counter``.

    fwd = forward_flops_per_sample(model, image_size=224, context_length=77, num_texts=2)
    mfu = samples_per_s * train_flops_per_sample(fwd) / peak_flops

The count runs one forward pass on a batch of 1 (an image plus ``num_texts`` captions) under
``FlopCounterMode``. A training step costs forward C + backward 2C = 3C per sample: that is the *model*
FLOPs that MFU is defined on. Recomputation (gradient caching's no-grad first pass, activation
checkpointing) is real work the hardware does but, by the usual convention, not counted in MFU.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

PEAK_FLOPS: dict[str, float] = {
    "h100-bf16": 989e12,
    "h200-bf16": 989e12,
    "a100-bf16": 312e12,
    "cpu": 1e12,
}
"""Dense peak FLOP/s of common devices (bf16 tensor cores, no sparsity); ``cpu`` is a rough placeholder."""


@torch.no_grad()
def forward_flops_per_sample(
    model: torch.nn.Module, image_size: int, context_length: int, num_texts: int = 1
) -> int:
    """FLOPs of one forward pass over one image and ``num_texts`` captions (counted on CPU, fp32)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    image = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    text = torch.zeros(num_texts, context_length, dtype=torch.long, device=device)
    text[:, 0] = 1
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # The counter knows matmuls and the GPU attention kernels, not the fused CPU ones: count attention
    # through the math backend and keep nn.MultiheadAttention off its fused inference path.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(image=image, text=text)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return int(counter.get_total_flops())


def train_flops_per_sample(forward_flops: int) -> int:
    """Model FLOPs of one training sample: forward C plus backward 2C."""
    return 3 * forward_flops


def mfu(samples_per_s: float, flops_per_sample: int, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the hardware's peak (all devices together)."""
    if peak_flops <= 0:
        return 0.0
    return samples_per_s * flops_per_sample / peak_flops

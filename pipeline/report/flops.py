"""Training FLOPs and cost accounting for reports: per run, per sample, and projected GPU-hours.

    fwd = count_forward_flops("ViT-B-16", num_texts=2)          # counted, {"image": ..., "text": ..., "total": ...}
    check = check_reference("ViT-B-16")                          # against open_clip's published figure
    run = pretrain_flops(summary, config)                        # a pretraining run's total training FLOPs
    hours = gpu_hours(run["model_flops"], CostConfig(device="h100-bf16", mfu=0.4))

The counting rule (the same as :func:`pipeline.train.flops.count_training_flops` applies per module):

- forward of every op that runs costs ``C`` (counted by ``torch.utils.flop_counter`` through
  :func:`pipeline.model.flops.forward_flops_per_sample`, 2 FLOPs per multiply-add);
- backward costs ``2C`` for a module with trainable parameters (gradients w.r.t. inputs and weights);
- ``C`` for a frozen module that gradients still flow through (gradients w.r.t. inputs only);
- ``0`` where no gradient flows (a frozen prefix, a ``no_grad`` encoder of a linear probe);
- sparse compute (dropped tokens, masked patches, skipped samples) is free: only ops that run are counted;
- a pruned module of weight density d: forward dC, backward (1 + d)C trained, dC frozen
  (:func:`pipeline.train.flops.layer_step_flops`, the formula for per-layer frozen flags and densities).

So a fully trained model costs ``3C`` per sample: the *model FLOPs* MFU is defined on. Work the hardware does
on top (gradient caching's no-grad embedding pass: ``+C``; activation checkpointing: ``+C``) is reported
separately as *hardware FLOPs*. Pretraining runs record ``flops_per_sample = 3C`` in their ``summary.json``;
fine-tuning runs record ``train_flops`` (their stage's counted total).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.model.flops import PEAK_FLOPS
from pipeline.train.flops import LayerCost, layer_step_flops, training_flops

REFERENCE_GFLOPS: dict[str, dict[str, Any]] = {
    "ViT-B-16": {
        "image_size": 224,
        "context_length": 77,
        "image": 35.13,
        "text": 5.96,
        "total": 41.09,
        "source": "open_clip docs/model_profile.csv (forward, one image + one 77-token text, "
        "torch.utils.flop_counter)",
    },
}
"""Published forward GFLOPs per image-text pair (open_clip's model profile), to check our counts against."""

SEED_RECIPE: dict[str, Any] = {
    "model": "ViT-B-16",
    "image_size": 224,
    "context_length": 77,
    "num_texts": 2,
    "global_batch": 65_536,
    "steps": 200_000,
}
"""The seed pretraining recipe (web caption + one synthetic caption per sample)."""


@dataclass(frozen=True)
class CostConfig:
    device: str = "h100-bf16"
    """Key of pipeline.model.flops.PEAK_FLOPS (h100-bf16, h200-bf16, a100-bf16, cpu) for the projection."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device; 0 = the value of ``device``."""
    mfu: float = 0.4
    """Model FLOP utilisation assumed for projected GPU-hours (0 < mfu <= 1)."""
    samples_per_s_per_device: float = 0.0
    """Measured training throughput per device; > 0 adds a projection from it (beside the MFU one)."""
    price_per_device_hour: float = 0.0
    """Price of one device-hour; > 0 adds a cost column (currency of your choice)."""

    def __post_init__(self) -> None:
        if not self.peak_flops and self.device not in PEAK_FLOPS:
            raise ValueError(
                f"device: {self.device!r} is not one of {sorted(PEAK_FLOPS)} (or set peak_flops)"
            )
        if self.peak_flops < 0:
            raise ValueError(f"peak_flops: must be >= 0, got {self.peak_flops}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu: must be in (0, 1], got {self.mfu}")
        if self.samples_per_s_per_device < 0 or self.price_per_device_hour < 0:
            raise ValueError("samples_per_s_per_device / price_per_device_hour: must be >= 0")

    @property
    def peak(self) -> float:
        return self.peak_flops or PEAK_FLOPS[self.device]


# --------------------------------------------------------------------------------------------- rules


def step_flops(trainable: float, frozen_with_grad: float = 0.0, no_grad: float = 0.0) -> dict[str, float]:
    """Forward / backward / total FLOPs of one step from the forward FLOPs of its three kinds of modules."""
    if min(trainable, frozen_with_grad, no_grad) < 0:
        raise ValueError("forward FLOPs must be >= 0")
    forward = trainable + frozen_with_grad + no_grad
    backward = 2 * trainable + frozen_with_grad
    return {"forward": forward, "backward": backward, "total": forward + backward}


def gpu_hours(total_flops: float, cost: CostConfig) -> float:
    """Device-hours to do ``total_flops`` of model FLOPs at ``cost.mfu`` of ``cost.peak`` per device."""
    return total_flops / (cost.peak * cost.mfu) / 3600.0


def gpu_hours_from_throughput(samples: float, samples_per_s_per_device: float) -> float:
    """Device-hours to process ``samples`` at a measured per-device throughput."""
    if samples_per_s_per_device <= 0:
        raise ValueError("samples_per_s_per_device: must be > 0")
    return samples / samples_per_s_per_device / 3600.0


# -------------------------------------------------------------------------------------------- counting


def count_forward_flops(
    name: str, image_size: int = 0, context_length: int = 0, num_texts: int = 1
) -> dict[str, int]:
    """Counted forward FLOPs of one image and ``num_texts`` captions of open_clip architecture ``name``.

    The image / text split is counted too: the text tower's share is the difference between counts with
    two captions and with one (one image in both), so each tower is counted by the same code path. The model
    is built on the ``meta`` device (shapes only, no weights): counting ViT-B/16 takes about two seconds.
    """
    import open_clip
    import torch

    from pipeline.model.clip import ModelConfig, open_clip_config  # registers our architectures too
    from pipeline.model.flops import forward_flops_per_sample

    cfg = ModelConfig(name=name, image_size=image_size, context_length=context_length)
    model_cfg = open_clip_config(cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    context = model_cfg["text_cfg"].get("context_length", 77)
    with torch.device("meta"):
        model = open_clip.create_model(
            name,
            device="meta",
            force_image_size=image_size or None,
            force_context_length=context_length or None,
            output_dict=True,
        )
    one = forward_flops_per_sample(model, size, context, num_texts=1)
    two = forward_flops_per_sample(model, size, context, num_texts=2)
    text = two - one
    image = one - text
    return {
        "model": name,
        "image_size": int(size),
        "context_length": int(context),
        "num_texts": num_texts,
        "image": image,
        "text": text,
        "total": image + num_texts * text,
        "params": sum(p.numel() for p in model.parameters()),
    }


def check_reference(name: str = "ViT-B-16", counted: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our count of ``name`` (one image + one text, the reference's resolution) against the published one."""
    ref = REFERENCE_GFLOPS[name]
    counted = counted or count_forward_flops(name, ref["image_size"], ref["context_length"], num_texts=1)
    out: dict[str, Any] = {"model": name, "source": ref["source"]}
    for part in ("image", "text", "total"):
        ours = counted["image"] + counted["text"] if part == "total" else counted[part]
        out[f"{part}_gflops_counted"] = ours / 1e9
        out[f"{part}_gflops_published"] = ref[part]
        out[f"{part}_rel_error"] = abs(ours / 1e9 - ref[part]) / ref[part]
    return out


def cached_count(
    cache_path: str | Path, name: str, image_size: int = 0, context_length: int = 0, num_texts: int = 1
) -> dict[str, int]:
    """:func:`count_forward_flops` memoised in a JSON file (counting ViT-B-16 takes a few seconds)."""
    from pipeline import io

    key = f"{name}|{image_size}|{context_length}|{num_texts}"
    path = Path(cache_path)
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache[key] = count_forward_flops(name, image_size, context_length, num_texts)
        io.write_json(str(path), cache)
    return cache[key]


# ------------------------------------------------------------------------------------------------ runs


def _get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def pretrain_flops(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Training FLOPs of a finished pretraining run from its ``summary.json`` and ``config.toml`` (as dicts).

    ``model_flops`` = 3C x samples (what MFU counts); ``hardware_flops`` adds gradient caching's no-grad
    embedding pass (+C per sample when a step has more than one micro-batch per rank) and activation
    checkpointing's recomputation (+C).
    """
    per_sample = float(summary.get("flops_per_sample") or 0)
    steps = int(summary.get("step") or 0)
    global_batch = int(summary.get("global_batch") or _get(config, "global_batch", 0) or 0)
    samples = steps * global_batch
    forward = per_sample / 3.0
    extra = 0.0
    if int(summary.get("accumulation_steps") or 1) > 1:
        extra += forward
    if _get(config, "model.grad_checkpointing", False):
        extra += forward
    return {
        "flops_per_sample": per_sample,
        "forward_flops_per_sample": forward,
        "samples": samples,
        "model_flops": per_sample * samples,
        "hardware_flops": (per_sample + extra) * samples,
    }


def finetune_flops(summary: dict[str, Any]) -> dict[str, Any]:
    """Training FLOPs a fine-tuning stage counted (forward C, backward 2C / C / 0 per module)."""
    flops = summary.get("flops") or {}
    total = summary.get("train_flops", flops.get("train_total"))
    dense = flops.get("dense_forward_per_step")
    forward = flops.get("forward_per_step")
    return {
        "per_step": flops.get("per_step"),
        "forward_per_step": forward,
        "backward_per_step": flops.get("backward_per_step"),
        "dense_forward_per_step": dense,
        "frozen_forward_per_step": flops.get("frozen_forward_per_step"),
        "no_grad_forward_per_step": flops.get("no_grad_forward_per_step"),
        # the dense, fully trained model's 3C: what the step would cost with nothing frozen or pruned
        "full_per_step": 3 * dense if dense else None,
        "density": forward / dense if dense and forward is not None else None,
        "model_flops": float(total) if total is not None else None,
    }


def recipe_projection(forward: dict[str, Any], recipe: dict[str, Any], cost: CostConfig) -> dict[str, Any]:
    """Total training FLOPs and device-hours of ``recipe`` (steps x global_batch samples) from counted
    forward FLOPs ``forward`` (as :func:`count_forward_flops` returns them)."""
    per_sample_forward = forward["image"] + recipe["num_texts"] * forward["text"]
    samples = recipe["steps"] * recipe["global_batch"]
    total = 3 * per_sample_forward * samples
    out = {
        **recipe,
        "forward_gflops_per_sample": per_sample_forward / 1e9,
        "train_gflops_per_sample": 3 * per_sample_forward / 1e9,
        "samples": samples,
        "model_flops": total,
        "device": cost.device if not cost.peak_flops else "custom",
        "peak_flops": cost.peak,
        "mfu": cost.mfu,
        "device_hours_at_mfu": gpu_hours(total, cost),
    }
    if cost.samples_per_s_per_device:
        out["device_hours_at_throughput"] = gpu_hours_from_throughput(samples, cost.samples_per_s_per_device)
    if cost.price_per_device_hour:
        out["cost_at_mfu"] = out["device_hours_at_mfu"] * cost.price_per_device_hour
    return out


__all__ = [
    "REFERENCE_GFLOPS",
    "SEED_RECIPE",
    "CostConfig",
    "cached_count",
    "check_reference",
    "count_forward_flops",
    "finetune_flops",
    "gpu_hours",
    "gpu_hours_from_throughput",
    "LayerCost",
    "layer_step_flops",
    "training_flops",
    "pretrain_flops",
    "recipe_projection",
    "step_flops",
]

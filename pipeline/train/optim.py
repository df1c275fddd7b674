"""The optimizer toolkit every training loop uses: AdamW parameter groups, learning-rate schedules.

    groups = param_groups(model, cfg.weight_decay)       # pretraining: decay on weight matrices only
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg, total_steps)        # a LambdaLR stepped once per optimizer step

    # fine-tuning / CoCa: layer-wise lr decay, lr multipliers, frozen parts, any schedule shape
    groups = layered_param_groups(model, wd, layer_of=..., num_layers=L, layer_decay=0.65)
    set_lr(opt, peak_lr * lr_factor(step, total_steps, ScheduleConfig(name="poly")))

No weight decay on biases, normalisation weights, the logit scale, or embeddings (token, positional,
class): every parameter with fewer than two dimensions, every parameter of a norm layer, and every
parameter whose name says it is an embedding. The schedule warms up linearly from ``lr / warmup_steps``
to ``lr`` over ``warmup_steps`` optimizer steps, then follows a half cosine down to ``min_lr`` at
``total_steps`` (``schedule = "const"`` stays at ``lr`` after warmup).

:func:`lr_factor` is the one schedule (shapes ``cosine``, ``const``, ``linear``, ``poly``, ``step``; the
pretraining ``lr_at`` is its cosine / const case). :func:`layered_param_groups` adds BEiT / MAE layer-wise lr
decay and per-part lr multipliers: a parameter of layer ``l`` of ``L`` gets ``lr * layer_decay ** (L + 1 - l)
* mult``; each group carries ``lr_scale``, which :func:`set_lr` applies. A multiplier of 0 freezes the part:
its parameters get ``requires_grad = False`` (:func:`freeze`) and no group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RMSNorm,
)
EMBEDDING_NAME_PARTS: tuple[str, ...] = ("embedding", "pos_embed", "cls_token")
NO_DECAY_SUFFIXES: tuple[str, ...] = ("ctx",)
"""Learned prompt context vectors (CoOp / DenseCLIP) are embeddings too."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr: float = 1e-6
    """Learning rate at the last step (end of the cosine)."""
    warmup_steps: int = 2000
    """Optimizer steps of linear warmup."""
    schedule: Literal["cosine", "const"] = "cosine"
    """After warmup: ``cosine`` decay to ``min_lr``, or ``const`` at ``lr``."""
    weight_decay: float = 0.2
    """Decoupled weight decay on weight matrices (none on biases, norms, logit scale, embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("cosine", "const"):
            raise ValueError(f"schedule: must be cosine or const, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm: must be >= 0, got {self.grad_clip_norm}")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay (see the module docstring for the rule)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES)
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                is_norm
                or param.ndim < 2
                or any(part in full for part in EMBEDDING_NAME_PARTS)
                or full.endswith(NO_DECAY_SUFFIXES)
            ):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, ``decay`` and ``no_decay``, over the trainable parameters (in model order)."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def layered_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_of: Callable[[str], int] | None = None,
    num_layers: int = 0,
    layer_decay: float = 1.0,
    lr_mult: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups keyed by (layer, decay, multiplier) over the trainable parameters, in model order.

    ``layer_of(name)`` is a parameter's depth in ``0 .. num_layers + 1`` (default: the top, ``num_layers + 1``);
    ``lr_mult(name)`` an extra factor (default 1). Each group has ``lr_scale`` = ``layer_decay ** (num_layers
    + 1 - layer) * mult`` and ``layer_id``; groups whose scale is 0 are left out (see :func:`freeze`)."""
    skip = no_decay_names(model)
    groups: dict[tuple[int, bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of(name) if layer_of is not None else num_layers + 1
        mult = lr_mult(name) if lr_mult is not None else 1.0
        decay = name not in skip
        key = (layer, decay, mult)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - layer) * mult,
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["lr_scale"] > 0]


def freeze(params: list[nn.Parameter]) -> int:
    """Turn gradients off for a part that learns at lr 0 (no weight-gradient work, nothing to clip); returns
    the number of tensors frozen."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group["lr_scale"]`` (1 when the group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """torch AdamW over ``groups`` (fused kernel on CUDA); ``cfg`` has ``lr``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay`` (:class:`OptimConfig` or a fine-tuning optimizer config)."""
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine", "const", "linear", "poly", "step"] = "cosine"
    """Shape after warmup: cosine / linear / poly decay to min_lr_ratio * lr, const, or step (x gamma)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup (lr * (step + 1) / warmup_steps)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr (cosine, linear, poly)."""
    poly_power: float = 1.0
    """Exponent of the poly schedule (mmsegmentation uses 1.0 for ADE20K)."""
    milestones: tuple[int, ...] = ()
    """Steps at which the step schedule multiplies lr by gamma."""
    gamma: float = 0.1
    """Factor of the step schedule."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones: must be increasing, got {self.milestones}")


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "const":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    lo = cfg.min_lr_ratio
    if cfg.name == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return lo + (1 - lo) * (1 - progress)
    if cfg.name == "poly":
        return lo + (1 - lo) * (1 - progress) ** cfg.poly_power
    raise ValueError(f"name: unknown schedule {cfg.name!r}")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps`` (:func:`lr_factor`'s cosine or
    const shape with ``min_lr_ratio = min_lr / lr``)."""
    shape = ScheduleConfig(name=cfg.schedule, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr / cfg.lr)
    return cfg.lr * lr_factor(step, total_steps, shape)


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule as a LambdaLR multiplier of the peak ``lr``."""
    return lambda step: lr_at(step, cfg, total_steps) / cfg.lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

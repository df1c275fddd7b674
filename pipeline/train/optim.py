"""AdamW with CLIP's parameter groups, and the warmup + cosine learning-rate schedule.

    groups = param_groups(model, cfg.weight_decay)       # decay on weight matrices only
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg, total_steps)        # a LambdaLR stepped once per optimizer step

No weight decay on biases, normalisation weights, the logit scale, or embeddings (token, positional,
class): every parameter with fewer than two dimensions, every parameter of a norm layer, and every
parameter whose name says it is an embedding. The schedule warms up linearly from ``lr / warmup_steps``
to ``lr`` over ``warmup_steps`` optimizer steps, then follows a half cosine down to ``min_lr`` at
``total_steps`` (``schedule = "const"`` stays at ``lr`` after warmup).
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
            if is_norm or param.ndim < 2 or any(part in full for part in EMBEDDING_NAME_PARTS):
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


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW over ``groups`` (fused kernel on CUDA)."""
    fused = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "const":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule as a LambdaLR multiplier of the peak ``lr``."""
    return lambda step: lr_at(step, cfg, total_steps) / cfg.lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

"""Exponential moving average of the weights, correct under ZeRO stages 0-3 and kept in fp32.

    ema = EMA(engine.module, EMAConfig(decay=0.9995))
    ...after each optimizer step:  ema.update(step)
    weights = ema.full_state_dict()        # collective under ZeRO-3: every rank calls it
    eval_model.load_state_dict(weights, strict=False)

Each rank averages exactly what it holds of the weights: under ZeRO 0/1/2 the parameters are replicated, so
the EMA is the full fp32 copy (identical on every rank); under ZeRO-3 a rank holds only its partition of
each parameter (``param.ds_tensor``, a flat slice of ``ceil(numel / world)`` elements), and the EMA keeps
just that slice. An update is then one fused lerp over local tensors, with no communication; the full
weights are gathered only when asked for (evaluation, export, checkpoint of a replicated EMA).

The EMA follows the working weights of the module: under bf16 those are the bf16 copies of the fp32 master
weights, so each update sees the master weights rounded to bf16; the average itself is accumulated in fp32.
With ``update_interval = k`` the EMA is updated every k optimizer steps with decay ``decay ** k``, which
keeps the same time constant in steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    """Keep an EMA of the weights (evaluated and exported beside the final weights)."""
    decay: float = 0.9995
    """Per-step decay; the EMA's time constant is 1 / (1 - decay) optimizer steps."""
    update_interval: int = 1
    """Update every this many optimizer steps (with decay ** interval)."""

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay: must be in [0, 1), got {self.decay}")
        if self.update_interval < 1:
            raise ValueError(f"update_interval: must be >= 1, got {self.update_interval}")


def is_partitioned(param: nn.Parameter) -> bool:
    """True for a ZeRO-3 partitioned parameter (its local shard is ``param.ds_tensor``)."""
    return hasattr(param, "ds_tensor")


class EMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.names.append(name)
                self.params.append(param)
        kinds = {is_partitioned(p) for p in self.params}
        if len(kinds) > 1:
            raise ValueError("EMA: mixed partitioned and replicated parameters are not supported")
        self.sharded = kinds == {True}
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = [self._local(p).detach().to(torch.float32).clone() for p in self.params]

    def _local(self, param: nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if self.sharded else param.data

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the current weights in after optimizer step ``step`` (1-based); False when not due."""
        if step % self.cfg.update_interval != 0:
            return False
        weight = 1.0 - self.cfg.decay**self.cfg.update_interval
        current = [self._local(p).to(torch.float32) for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a full fp32 ``{name: tensor}``; a collective under ZeRO-3 (all ranks call)."""
        if not self.sharded:
            return {n: t.clone() for n, t in zip(self.names, self.shadow)}
        world_size = dist.get_world_size()
        out: dict[str, torch.Tensor] = {}
        for name, param, shard in zip(self.names, self.params, self.shadow):
            device = param.ds_tensor.device
            parts = [torch.empty_like(shard, device=device) for _ in range(world_size)]
            dist.all_gather(parts, shard.to(device))
            full = torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
            out[name] = full.cpu()
        return out

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the EMA weights into ``module``'s parameters of the same names (e.g. an evaluation copy of the
        model; its buffers stay as they are); a collective under ZeRO-3. Returns ``module``."""
        for name, value in self.full_state_dict().items():
            param = module.get_parameter(name)
            param.copy_(value.to(device=param.device, dtype=param.dtype))
        return module

    def state_dict(self) -> dict[str, Any]:
        """This rank's EMA state (the full EMA when replicated, this rank's shards under ZeRO-3)."""
        return {
            "num_updates": self.num_updates,
            "sharded": self.sharded,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "names": list(self.names),
            "shadow": [t.cpu() for t in self.shadow],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names:
            raise ValueError("EMA checkpoint: parameter names differ from the model's")
        if state["sharded"] != self.sharded:
            raise ValueError("EMA checkpoint: saved with a different ZeRO partitioning (stage 3 vs 0-2)")
        for dst, src in zip(self.shadow, state["shadow"]):
            if dst.shape != src.shape:
                raise ValueError("EMA checkpoint: shard shapes differ (resume with the same world size)")
            dst.copy_(src)
        self.num_updates = int(state["num_updates"])

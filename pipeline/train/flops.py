"""Training FLOPs of any model, counted from one traced training-shaped forward pass.

    flops = count_training_flops(model, lambda: loss_fn(model, batch))
    # {"forward_per_step": C, "backward_per_step": B, "per_step": C + B, ...}
    flops = count_training_flops(model, forward, densities={model.head: 0.5})   # a pruned head
    step = training_flops([LayerCost("block0", c0, frozen=True), LayerCost("head", c1, density=0.3)])

Every op with a FLOP formula in ``torch.utils.flop_counter`` (matmuls, convolutions, attention) is charged
to the innermost module that ran it (``TorchDispatchMode`` + global module hooks). Each module then costs
what :func:`layer_step_flops` says for its dense forward FLOPs C (the rule of "Transferable and principled
efficiency for open-vocabulary segmentation", section on training FLOPs):

- trained, dense: forward C, backward 2C (gradients w.r.t. inputs and weights);
- frozen (no trainable parameters of its own) with gradients flowing through (its output requires grad):
  forward C, backward C (activation gradients only); 0 backward where no gradient flows (e.g. a frozen
  prefix, a linear probe's encoder under ``no_grad``);
- a subnetwork of density d (the fraction of a module's weights kept by pruning; the masked matmul is still
  charged by its dense shape, so the density is passed in): forward dC, backward (1 + d)C when trained;
  frozen and sparse: backward dC (activation gradients through the sparse weights; our extension, the
  paper states only the two cases above).

Used by the fine-tuning trainer; ``pipeline.model.flops`` counts CLIP's analytically for pretraining MFU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


class _FlopMode(TorchDispatchMode):
    def __init__(self, owner: _FlopTracer) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.owner.counts[self.owner.stack[-1]] += int(
                flop_registry[packet](*args, **kwargs, out_val=out)
            )
        return out


class _FlopTracer:
    def __init__(self, root: nn.Module) -> None:
        self.stack: list[nn.Module] = [root]
        self.counts: dict[nn.Module, int] = defaultdict(int)
        self.grad_out: dict[nn.Module, bool] = defaultdict(bool)

    def pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if len(self.stack) > 1 and self.stack[-1] is module:
            self.stack.pop()
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(output)):
            self.grad_out[module] = True


@dataclass(frozen=True)
class LayerCost:
    """One layer (module) of a training step, for :func:`training_flops`."""

    name: str
    """A label (e.g. the module's name)."""
    forward: float
    """Its dense forward FLOPs C per step."""
    frozen: bool = False
    """No trainable parameters: backward computes activation gradients only."""
    density: float = 1.0
    """Fraction of its weights kept (1 = dense; a pruned subnetwork's mask density)."""
    grad_flows: bool = True
    """Whether a gradient flows through it at all (False: a frozen prefix, a ``no_grad`` encoder)."""


def layer_step_flops(
    forward: float, *, frozen: bool = False, density: float = 1.0, grad_flows: bool = True
) -> tuple[float, float]:
    """(forward, backward) FLOPs of one layer of dense forward cost ``forward`` = C (see the module docstring):
    trained: dC and (1 + d)C; frozen with a gradient flowing through: dC and dC; no gradient: dC and 0."""
    if forward < 0:
        raise ValueError(f"forward: FLOPs must be >= 0, got {forward}")
    if not 0 <= density <= 1:
        raise ValueError(f"density: must be in [0, 1], got {density}")
    if not frozen:
        return density * forward, (1 + density) * forward
    return density * forward, density * forward if grad_flows else 0.0


def training_flops(layers: Sequence[LayerCost]) -> dict[str, Any]:
    """Per-step FLOPs of a model made of ``layers``: totals plus one row per layer."""
    rows = []
    for layer in layers:
        fwd, bwd = layer_step_flops(
            layer.forward, frozen=layer.frozen, density=layer.density, grad_flows=layer.grad_flows
        )
        rows.append(
            {
                "name": layer.name,
                "forward": fwd,
                "backward": bwd,
                "frozen": layer.frozen,
                "density": layer.density,
                "dense_forward": layer.forward,
            }
        )
    forward = sum(r["forward"] for r in rows)
    backward = sum(r["backward"] for r in rows)
    return {"forward": forward, "backward": backward, "total": forward + backward, "layers": rows}


def count_training_flops(
    root: nn.Module, forward: Callable[[], Any], densities: Mapping[nn.Module, float] | None = None
) -> dict[str, int]:
    """Trace ``forward()`` (a training-shaped forward of ``root``) and apply :func:`layer_step_flops` to every
    module that ran an op. ``densities``: the weight density of pruned modules (default 1).

    Returns ``forward_per_step``, ``backward_per_step``, ``per_step`` and the forward FLOPs split by kind:
    ``dense_forward_per_step`` (every module at density 1: the unpruned model's C), ``frozen_forward_per_step``
    (modules without trainable parameters that a gradient flows through) and ``no_grad_forward_per_step``."""
    densities = densities or {}
    tracer = _FlopTracer(root)
    pre = nn.modules.module.register_module_forward_pre_hook(tracer.pre)
    post = nn.modules.module.register_module_forward_hook(tracer.post, always_call=True)
    try:
        with _FlopMode(tracer):
            forward()
    finally:
        pre.remove()
        post.remove()
    layers = []
    any_grad = any(tracer.grad_out.values())
    for module, flops in tracer.counts.items():
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        flows = trainable or tracer.grad_out[module] or (module is root and any_grad)
        layers.append(
            LayerCost("", flops, frozen=not trainable, density=densities.get(module, 1.0), grad_flows=flows)
        )
    out = training_flops(layers)
    frozen = sum(c.forward for c in layers if c.frozen and c.grad_flows)
    no_grad = sum(c.forward for c in layers if not c.grad_flows)
    return {
        "forward_per_step": int(round(out["forward"])),
        "backward_per_step": int(round(out["backward"])),
        "per_step": int(round(out["forward"])) + int(round(out["backward"])),
        "dense_forward_per_step": int(sum(c.forward for c in layers)),
        "frozen_forward_per_step": int(frozen),
        "no_grad_forward_per_step": int(no_grad),
    }

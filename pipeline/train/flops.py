"""Training FLOPs of any model, counted from one traced training-shaped forward pass.

    flops = count_training_flops(model, lambda: loss_fn(model, batch))
    # {"forward_per_step": C, "backward_per_step": B, "per_step": C + B}

Every op with a FLOP formula in ``torch.utils.flop_counter`` (matmuls, convolutions, attention) is charged
to the innermost module that ran it (``TorchDispatchMode`` + global module hooks). A step costs forward C,
plus backward 2C for modules with trainable parameters and C for frozen modules that gradients flow through
(their outputs require grad), 0 where no gradient flows (e.g. a linear probe's encoder under ``no_grad``).
Used by the fine-tuning trainer; ``pipeline.model.flops`` counts CLIP's analytically for pretraining MFU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
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


def count_training_flops(root: nn.Module, forward: Callable[[], Any]) -> dict[str, int]:
    """Trace ``forward()`` (a training-shaped forward of ``root``) and apply the C / 2C / C rule."""
    tracer = _FlopTracer(root)
    pre = nn.modules.module.register_module_forward_pre_hook(tracer.pre)
    post = nn.modules.module.register_module_forward_hook(tracer.post, always_call=True)
    try:
        with _FlopMode(tracer):
            forward()
    finally:
        pre.remove()
        post.remove()
    fwd = bwd = 0
    for module, flops in tracer.counts.items():
        fwd += flops
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if trainable:
            bwd += 2 * flops
        elif tracer.grad_out[module] or (module is root and any(tracer.grad_out.values())):
            bwd += flops
    return {"forward_per_step": fwd, "backward_per_step": bwd, "per_step": fwd + bwd}

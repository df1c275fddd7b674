"""All the resume state of a training loop in one object (lingua's ``TrainState``).

    state = TrainState(model, optimizer, ema=ema)
    state.load_state_dict(checkpoint.load_state(path))     # resume
    ...after each optimizer step:  state.step += 1
    checkpoint.save_state(checkpoints, state.step, state.state_dict(), keep_last=2)

``state_dict()`` holds the model weights (``model``), the optimizer, the EMA (:class:`pipeline.train.ema.EMA`),
the step, the RNG states (:func:`pipeline.train.checkpoint.rng_state`) and ``extra``: whatever else a loop must
carry across a restart (the data position when the loader is not a pure function of the step, the FLOP count,
...). The loops whose batches are a pure function of ``(seed, step)`` (fine-tuning, CoCa) need no loader state:
the step is the data position. Read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.ema import EMA


class Preempted(Exception):
    """Raised by a training loop after it wrote a checkpoint because of ``stop_after_step`` or a preemption
    signal: the job exits with the requeue code and a rerun resumes from that checkpoint."""


def save_or_stop(
    step: int,
    steps: int,
    checkpoint_every: int,
    stop_after_step: int,
    preempted: Callable[[], bool],
    save: Callable[[], None],
) -> bool:
    """The end-of-step rule every toolkit loop shares: ``save()`` every ``checkpoint_every`` steps (0: none on
    a schedule), at the last step, and when stopping (``step == stop_after_step``, else ``preempted()``).
    Returns True when the loop must stop now (it then raises :class:`Preempted`); at the last step it never
    does: the run is complete."""
    stop = step == stop_after_step or preempted()
    if (checkpoint_every and step % checkpoint_every == 0) or step == steps or stop:
        save()
    return stop and step < steps


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


@dataclass
class TrainState:
    model: nn.Module
    """The bare model (not a DDP wrapper: checkpoint keys stay the model's own)."""
    optimizer: torch.optim.Optimizer
    ema: EMA | None = None
    step: int = 0
    """Optimizer steps taken."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Loop-specific resume state (data position, FLOP count, ...)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "rng": rng_state(),
            "extra": dict(self.extra),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        self.extra = dict(state.get("extra") or {})

"""Gradient caching (GradCache, arXiv 2101.06983) across accumulation steps, engine-agnostic.

The contrastive loss of a global batch of ``world x micro_batch x accumulation`` samples couples every
sample with every other, so plain gradient accumulation (one loss per micro-batch) would shrink the
negatives to one micro-batch. :func:`cached_contrastive_step` makes the step exact:

1. embed every micro-batch *without* grad (saving the RNG state before each, so dropout / drop-path masks
   repeat), concatenate the local features;
2. compute the loss over the whole global batch (``loss_fn`` gathers across ranks; see
   :mod:`pipeline.train.loss`) with grad w.r.t. the detached local features and the detached logit scale;
3. for each micro-batch, restore its RNG state, re-embed it *with* grad and call
   ``backward(scale * surrogate)`` where ``surrogate = sum_k (features_k * cached_grad_k).sum()`` plus, for
   the first micro-batch only, ``logit_scale * dL/dlogit_scale`` (so the temperature's gradient also flows
   through the engine's own backward). The sum of these backwards is exactly this rank's ``dL/dparams``.

The RNG is left as it was after step 1, as if the micro-batches had been embedded once. With a single
micro-batch there is nothing to cache: it is embedded once with grad and ``backward(scale * loss)`` is called.

``embed(micro_batch)`` returns a dict: the feature tensors the loss uses (``image``, ``text``, optionally
``syn_text``; each (m, D), normalised) and ``logit_scale`` (the model's scalar, ``exp`` of its learnable
log-temperature, computed *inside* the model's forward so it works with ZeRO-3 partitioned parameters).
Put the model in train mode with the same autocast context in both phases.

Backward contract:

* plain torch: ``backward=torch.Tensor.backward`` (default), ``scale=1``; then average the gradients over
  ranks (all-reduce / world size, as tests/test_gradcache.py does; with DDP, run all but the last
  micro-batch under ``no_sync()``) and step the optimizer.
* DeepSpeed (managed gradient accumulation, the default): configure ``gradient_accumulation_steps =
  len(micro_batches)`` and ``train_micro_batch_size_per_gpu`` = the micro-batch size. ``engine.backward(loss)``
  divides the loss by ``gradient_accumulation_steps``, and DeepSpeed only reduces gradients and updates the
  weights when ``engine.step()`` is called on the last micro-step of the window (it counts micro-steps in
  ``step()``), so ``engine.step()`` must follow *every* ``engine.backward``. :func:`engine_backward` builds
  exactly that callable (``engine.backward(t, scale_wrt_gas=False); engine.step()``); equivalently pass
  ``backward=lambda t: (engine.backward(t), engine.step())`` with ``scale=len(micro_batches)`` to undo the
  division. Either way, after this function returns the optimizer step has happened. Checked for ZeRO 0, 1, 2
  and 3 with 2 processes and 4 micro-batches (update == naive full-batch gradient, relative error < 1e-6);
  tests/test_gradcache.py keeps the ZeRO-3 case (marked slow). Under ZeRO-3 ``embed`` must call the engine's
  forward (``engine(images, texts)``), not ``module.encode_text`` directly: parameters owned by the top-level
  module (``text_projection``, ``logit_scale``) are only gathered by the forward hooks of that module.
  Note DeepSpeed's default ``gradient_clipping`` is 1.0: set it explicitly.

    out = cached_contrastive_step(embed, micro_batches, partial(contrastive_loss, cfg=loss_cfg))
    out["loss"], out["loss_real"], out["loss_syn"], out["logit_scale"]      # detached tensors for logging

**Any global batch on any number of ranks.** :class:`BatchSplit` says how many samples each rank takes in a
step and how it cuts them into micro-batches: every rank runs the same number of micro-batches (DeepSpeed
counts them), ranks differ by at most one sample (the ``global_batch mod world_size`` extra samples rotate
over the ranks from step to step), micro-batches on a rank differ by at most one sample and never exceed the
configured size. Pass ``counts`` to the loss (``partial(contrastive_loss, cfg=..., counts=split.counts(step))``)
so the gather pads and masks; the parameter gradient stays that of the full batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Embed = Callable[[Any], Mapping[str, Tensor]]
LossFn = Callable[[dict[str, Tensor], Tensor], tuple[Tensor, dict[str, Tensor]]]
SCALE_KEY = "logit_scale"


@dataclass(frozen=True)
class BatchSplit:
    """How ``global_batch`` samples are split over ``world_size`` ranks x ``accumulation`` micro-batches.

    ``micro_batch`` is the largest micro-batch allowed; ``accumulation = 0`` picks the fewest micro-batches
    that respect it. The split is a pure function of the step, so a resumed run takes the same samples.
    """

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.micro_batch < 1 or self.accumulation < 0:
            raise ValueError(f"BatchSplit: bad sizes {self}")
        if self.global_batch < self.world_size:
            raise ValueError(
                f"global_batch: {self.global_batch} is smaller than the {self.world_size} ranks (each needs a sample)"
            )
        if self.accumulation == 0:
            object.__setattr__(
                self, "accumulation", math.ceil(self.global_batch / (self.world_size * self.micro_batch))
            )
        smallest, largest = (
            self.global_batch // self.world_size,
            math.ceil(self.global_batch / self.world_size),
        )
        if self.accumulation > smallest or math.ceil(largest / self.accumulation) > self.micro_batch:
            raise ValueError(
                f"accumulation_steps: {self.accumulation} micro-batches cannot carry {smallest}-{largest} samples "
                f"per rank (global_batch {self.global_batch} over {self.world_size} ranks) in micro-batches of "
                f"1 to {self.micro_batch} (data.micro_batch)"
            )

    @property
    def uneven(self) -> bool:
        """Ranks hold different numbers of samples (the loss then pads and masks: pass it ``counts``)."""
        return self.global_batch % self.world_size != 0

    @property
    def max_micro_batch(self) -> int:
        """The largest micro-batch any rank runs."""
        return math.ceil(math.ceil(self.global_batch / self.world_size) / self.accumulation)

    def counts(self, step: int) -> list[int]:
        """Samples of each rank in ``step`` (0-based): ``global_batch // world_size``, plus one on
        ``global_batch % world_size`` ranks that rotate with the step (so every rank reads at the same rate)."""
        base, extra = divmod(self.global_batch, self.world_size)
        first = (step * extra) % self.world_size
        return [base + ((r - first) % self.world_size < extra) for r in range(self.world_size)]

    def loss_counts(self, step: int) -> list[int] | None:
        """The loss's ``counts`` argument for ``step``: None when the ranks are even (no padding)."""
        return self.counts(step) if self.uneven else None

    def micro_sizes(self, count: int) -> list[int]:
        """``count`` samples cut into ``accumulation`` micro-batches differing by at most one (larger first)."""
        base, extra = divmod(count, self.accumulation)
        return [base + (k < extra) for k in range(self.accumulation)]


class _RngState:
    """CPU and current-CUDA-device RNG state (what dropout and drop-path draw from)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda = (torch.cuda.current_device(), torch.cuda.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


def _split_output(out: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    if SCALE_KEY not in out:
        raise ValueError(f"embed: output must contain {SCALE_KEY!r} (got {sorted(out)})")
    feats = {k: v for k, v in out.items() if k != SCALE_KEY and k != "logit_bias"}
    return feats, out[SCALE_KEY]


def cached_contrastive_step(
    embed: Embed,
    micro_batches: Sequence[Any],
    loss_fn: LossFn,
    backward: Callable[[Tensor], Any] = Tensor.backward,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """One exact contrastive step over ``micro_batches`` (this rank's share of the global batch).

    ``loss_fn(features, logit_scale) -> (loss, terms)`` is e.g. ``partial(contrastive_loss, cfg=...)``;
    it runs once, on all local features, with the collectives of the cross-rank gather (so every rank must
    call this function with the same number of micro-batches). ``backward`` is called once per micro-batch
    with ``scale * surrogate``; see the module docstring for DeepSpeed. Returns detached tensors: ``loss``,
    the loss terms, ``logit_scale`` and ``reembed_max_abs_diff`` (largest difference between the re-embedded
    and the cached features: 0 for a deterministic model, a red flag otherwise).
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches: need at least one micro-batch")
    if len(micro_batches) == 1:  # nothing to cache: one forward with grad, the loss, one backward
        feats, logit_scale = _split_output(embed(micro_batches[0]))
        loss, terms = loss_fn(dict(feats), logit_scale)
        backward(loss * scale)
        out = {
            "loss": loss.detach(),
            "logit_scale": logit_scale.detach(),
            "reembed_max_abs_diff": torch.zeros((), device=loss.device),
        }
        out.update({name: t.detach() for name, t in terms.items()})
        return out
    # Phase 1: embed without grad, remembering each micro-batch's RNG state.
    states: list[_RngState] = []
    cached: dict[str, list[Tensor]] = {}
    logit_scale: Tensor | None = None
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_RngState())
            feats, mb_scale = _split_output(embed(mb))
            if logit_scale is None:
                logit_scale = mb_scale.detach()
            if cached and set(feats) != set(cached):
                raise ValueError(
                    f"embed: micro-batches return different keys: {sorted(feats)} vs {sorted(cached)}"
                )
            for key, value in feats.items():
                cached.setdefault(key, []).append(value.detach())
    after = _RngState()
    assert logit_scale is not None
    sizes = [t.shape[0] for t in cached[next(iter(cached))]]

    # The full-batch loss and its gradient w.r.t. the (detached) local features and logit scale.
    leaves = {key: torch.cat(parts).requires_grad_(True) for key, parts in cached.items()}
    scale_leaf = logit_scale.clone().requires_grad_(True)
    with torch.enable_grad():
        loss, terms = loss_fn(leaves, scale_leaf)
        grads = torch.autograd.grad(loss, [*leaves.values(), scale_leaf], allow_unused=True)
    feat_grads = {key: g for key, g in zip(leaves, grads[:-1]) if g is not None}
    scale_grad = grads[-1]
    del leaves

    # Phase 2: re-embed each micro-batch with grad and push the cached gradients through the model.
    max_diff = torch.zeros((), device=logit_scale.device)
    offset = 0
    try:
        for k, (mb, size) in enumerate(zip(micro_batches, sizes)):
            states[k].restore()
            feats, mb_scale = _split_output(embed(mb))
            surrogate = mb_scale.new_zeros(()).float()
            for key, grad in feat_grads.items():
                feat = feats[key]
                if feat.shape[0] != size:
                    raise ValueError(
                        f"embed: {key!r} has {feat.shape[0]} rows on re-embedding, expected {size}"
                    )
                surrogate = surrogate + (feat.float() * grad[offset : offset + size].float()).sum()
                diff = (feat.detach() - cached[key][k]).abs().max().to(max_diff.dtype)
                max_diff = torch.maximum(max_diff, diff)
            if k == 0 and scale_grad is not None:
                surrogate = surrogate + (mb_scale.float() * scale_grad.float()).sum()
            backward(surrogate * scale)
            offset += size
    finally:
        after.restore()
    out = {"loss": loss.detach(), "logit_scale": logit_scale, "reembed_max_abs_diff": max_diff}
    out.update({name: t.detach() for name, t in terms.items()})
    return out


def engine_backward(engine: Any) -> Callable[[Tensor], None]:
    """The ``backward`` for a DeepSpeed engine with ``gradient_accumulation_steps = len(micro_batches)``.

    Calls ``engine.backward(t, scale_wrt_gas=False)`` (no division by the accumulation steps: the cached
    gradients are already those of the whole step) and then ``engine.step()``, which DeepSpeed needs after
    every micro-step to count them; it reduces gradients and updates the weights on the last one only.
    """

    def _backward(t: Tensor) -> None:
        engine.backward(t, scale_wrt_gas=False)
        engine.step()

    return _backward

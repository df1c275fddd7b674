"""What is fine-tuning-specific and shared by the stages: config pieces, the encoder's layer-wise lr groups,
the step-indexed sampler, the per-rank data splits, and the ``StageSpec`` a stage hands to the trainer.

The contract (each module in ``pipeline/finetune/`` follows it; a Ray Tune sweep only needs this):

    summary = run_stage(stage_cfg, run_dir)   # trains, evaluates, writes the run directory, returns summary.json

The loop itself is :class:`pipeline.finetune.trainer.FinetuneTrainer` (``fit`` here is its one-line entry),
built on the training toolkit every loop shares: ``pipeline.train.optim`` (parameter groups, layer-wise lr
decay, lr multipliers, frozen parts, schedules), ``pipeline.train.ema``, ``pipeline.train.checkpoint``
(``latest``, retention, sha256 manifests), ``pipeline.train.state.TrainState``, ``pipeline.train.flops``.

Learning rates: parameter ``p`` at depth ``layer_id(p)`` of a ViT with ``L`` blocks gets
``lr * layer_decay ** (L + 1 - layer_id(p))`` (BEiT / MAE layer-wise decay; heads have depth ``L + 1``),
times ``backbone_lr_mult`` inside the image encoder (DenseCLIP's 0.1; 0 freezes it). Heavy-tail freezing
(``optim.freeze.alpha_below_quantile``, :func:`alpha_freeze`) turns off the blocks of smallest alpha before
the optimizer is built, so they are left out of it and counted as frozen in the FLOPs.

Data order: the global batch of step ``s`` is a pure function of ``(seed, s)`` (:class:`StepBatchSampler`),
each sample's augmentation seed comes with its position in the global batch, and rank ``r`` of ``N`` takes the
``r``-th contiguous ``batch_size / N`` of it (:func:`rank_slice`), so the global batch does not depend on how
many processes train it. Evaluation splits the validation set into ``N`` contiguous shards (:func:`eval_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.model.backbone import ViTBackbone
from pipeline.train.checkpoint import latest_state_file
from pipeline.train.optim import ScheduleConfig, freeze, layered_param_groups, lr_factor
from pipeline.train.optim import build_optimizer as _build_optimizer

__all__ = ["ScheduleConfig", "lr_factor"]  # re-exported: stage configs and tests

# ------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class FreezeConfig:
    alpha_below_quantile: float = 0.0
    """Heavy-tail layer freezing: freeze the floor(q * L) image-encoder blocks of smallest alpha (the power-law
    exponent of their weight spectra, :mod:`pipeline.analysis.heavytail`), i.e. those below the q-quantile of
    the L blocks' alphas; 0 = off, 0.5 = the paper's median rule (0.25 / 0.75 are its ablations)."""
    write_alpha: bool = True
    """Write every block's alpha before and after fine-tuning to ``alpha.json`` (also when nothing is frozen)."""
    min_tail: int = 10
    """Fewest eigenvalues the power-law fit's tail may keep (the KS search over xmin stops there)."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha_below_quantile <= 1:
            raise ValueError(f"alpha_below_quantile: must be in [0, 1], got {self.alpha_below_quantile}")
        if self.min_tail < 2:
            raise ValueError(f"min_tail: must be >= 2, got {self.min_tail}")


@dataclass(frozen=True)
class FinetuneOptimConfig:
    lr: float = 1e-4
    """Peak learning rate (after warmup) of the head / top of the network."""
    weight_decay: float = 0.05
    """Decoupled AdamW weight decay (none on biases, norms, embeddings, 1-d parameters)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: block i of L gets lr * layer_decay ** (L + 1 - (i + 1)); 1.0 disables it."""
    backbone_lr_mult: float = 1.0
    """Extra lr multiplier for every image-encoder parameter (DenseCLIP uses 0.1)."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Heavy-tail (alpha) layer freezing of the image encoder; frozen blocks are left out of the optimizer."""
    masks: str = ""
    """Weight masks of a pruned image-encoder subnetwork (``masks.pt`` of ``python -m jobs.prune``): masked
    weights are zeroed and held at zero while fine-tuning (:mod:`pipeline.model.sparsity`), and counted
    sparse in the FLOPs; "" = the dense encoder."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.backbone_lr_mult < 0:
            raise ValueError(f"backbone_lr_mult: must be >= 0, got {self.backbone_lr_mult}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class FinetuneTrainConfig:
    steps: int = 40
    """Optimizer steps of fine-tuning."""
    batch_size: int = 8
    """Training images per step."""
    eval_batch_size: int = 16
    """Images per evaluation batch."""
    eval_every: int = 0
    """Evaluate every this many steps (0 = only at the end)."""
    log_every: int = 10
    """Append loss / lr to metrics.jsonl every this many steps."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0 = only at the end and when preempted)."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints."""
    seed: int = 0
    """Seed of the head initialisation, sampling order, augmentation, drop-path and mixup."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for forward passes (weights and optimizer state stay fp32)."""
    stop_after_step: int = 0
    """Checkpoint and stop after this step as if preempted (0 = never); used to test resumption."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size / eval_batch_size: must be >= 1")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")


# ----------------------------------------------------------------------------- optimiser + schedule


def find_backbone(model: nn.Module) -> tuple[str, ViTBackbone] | None:
    """The (prefix, module) of the first image encoder with trainable parameters (else the first one)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ViTBackbone)]
    for name, module in found:
        if any(p.requires_grad for p in module.parameters()):
            return name, module
    return found[0] if found else None


def param_groups(model: nn.Module, cfg: FinetuneOptimConfig) -> list[dict[str, Any]]:
    """AdamW groups (:func:`pipeline.train.optim.layered_param_groups`): image-encoder layer ``l`` of ``L``
    gets ``lr_scale = layer_decay ** (L + 1 - l) * backbone_lr_mult``, everything else (heads) is layer
    ``L + 1`` at scale 1."""
    found = find_backbone(model)
    prefix, backbone = (found[0] + ".", found[1]) if found else ("\0", None)
    num_layers = backbone.num_layers if backbone is not None else 0

    def layer_of(name: str) -> int:
        if backbone is not None and name.startswith(prefix):
            return backbone.layer_id(name[len(prefix) :])
        return num_layers + 1

    def lr_mult(name: str) -> float:
        return cfg.backbone_lr_mult if backbone is not None and name.startswith(prefix) else 1.0

    return layered_param_groups(
        model,
        cfg.weight_decay,
        layer_of=layer_of,
        num_layers=num_layers,
        layer_decay=cfg.layer_decay,
        lr_mult=lr_mult,
    )


def freeze_zero_lr(model: nn.Module, cfg: FinetuneOptimConfig) -> int:
    """With ``backbone_lr_mult = 0`` (a frozen encoder) turn the image encoder's gradients off
    (:func:`pipeline.train.optim.freeze`). Returns the number of parameter tensors frozen."""
    found = find_backbone(model) if cfg.backbone_lr_mult == 0 else None
    return 0 if found is None else freeze(list(found[1].parameters()))


def alpha_freeze(model: nn.Module, cfg: FreezeConfig) -> dict[str, Any] | None:
    """Fit every image-encoder block's alpha and freeze the ``cfg.alpha_below_quantile`` share with the smallest
    (:func:`pipeline.analysis.heavytail.lowest_alpha_blocks`) before the optimizer is built. Returns
    ``{"quantile", "before": [{block, alpha, matrices}], "frozen": [block indices]}``, or None when there is
    no trainable encoder or alpha is neither written nor needed."""
    from pipeline.analysis.heavytail import layer_alphas, lowest_alpha_blocks

    found = find_backbone(model)
    if found is None or not (cfg.write_alpha or cfg.alpha_below_quantile > 0):
        return None
    backbone = found[1]
    before = layer_alphas(backbone, cfg.min_tail)
    frozen = lowest_alpha_blocks([r["alpha"] for r in before], cfg.alpha_below_quantile)
    blocks = backbone.visual.transformer.resblocks
    for i in frozen:
        freeze(list(blocks[i].parameters()))
    return {
        "quantile": cfg.alpha_below_quantile,
        "min_tail": cfg.min_tail,
        "before": before,
        "frozen": frozen,
    }


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (``pipeline.train.optim.build_optimizer``)."""
    return _build_optimizer(param_groups(model, cfg), cfg)


# --------------------------------------------------------------------------------------- data order


def sample_seed(seed: int, step: int, position: int) -> int:
    """Augmentation seed of the ``position``-th sample of ``step`` (independent of how the run was split)."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])


class StepBatchSampler:
    """Batches of ``(index, augmentation_seed)`` for steps ``start+1 .. end``: epoch-wise permutations drawn
    from ``(seed, epoch)``, so the batch of any step is known without replaying earlier ones."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_step: int, end_step: int) -> None:
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.n, self.bs, self.seed = num_samples, batch_size, seed
        self.start, self.end = start_step, end_step
        self._cached: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The batch of 1-based ``step``."""
        first = (step - 1) * self.bs
        out = []
        for k in range(self.bs):
            epoch, offset = divmod(first + k, self.n)
            out.append((int(self._perm(epoch)[offset]), sample_seed(self.seed, step, k)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start + 1, self.end + 1):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.end - self.start


def rank_slice(batch: list[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous ``len(batch) / world_size`` share of a global batch."""
    if len(batch) % world_size:
        raise ValueError(f"batch_size: {len(batch)} does not divide over {world_size} ranks")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


class RankBatchSampler:
    """This rank's share (:func:`rank_slice`) of each global batch of a :class:`StepBatchSampler`."""

    def __init__(self, sampler: StepBatchSampler, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            yield rank_slice(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.sampler)


def eval_batches(
    num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, None]]]:
    """Rank ``rank``'s evaluation batches: the ``rank``-th of ``world_size`` contiguous, near-equal shards of
    the validation indices (every index exactly once over the ranks), in batches of ``batch_size``."""
    shard = np.array_split(np.arange(num_samples), world_size)[rank]
    keys = [(int(i), None) for i in shard]
    return [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class StageSpec:
    """What a stage hands to :func:`fit`: model, data, loss and evaluator."""

    name: str
    model: nn.Module
    train_set: Any
    """Map-style dataset indexed by ``(index, augmentation_seed)``; ``seed=None`` means no augmentation."""
    val_set: Any
    collate: Callable[[list[Any]], Any]
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
    """``(model, batch) -> (loss, scalars to log)`` in training mode."""
    evaluate: Callable[[nn.Module, Iterable[Any]], dict[str, Any]]
    """``(model, batches) -> metrics`` in eval mode, under no_grad."""
    primary_metric: str
    """Key of the metric a sweep optimises (e.g. ``mIoU``)."""
    higher_is_better: bool = True
    ema_decay: float = 0.0
    """Keep and evaluate an EMA of the weights when > 0."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts for summary.json (class names, head type, ...)."""


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint file (``checkpoints/<step>/state.pt``) of a fine-tuning run."""
    return latest_state_file(Path(run_dir) / "checkpoints")


def finite_or_none(value: Any) -> Any:
    """NaN / inf -> None, recursively, so metrics.jsonl and summary.json stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def fit(spec: StageSpec, cfg: Any, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Train ``spec`` with ``cfg.optim`` / ``cfg.schedule`` / ``cfg.train``, evaluate, write ``run_dir``
    (:class:`pipeline.finetune.trainer.FinetuneTrainer`; data-parallel inside an initialised process group)."""
    from pipeline.finetune.trainer import FinetuneTrainer

    return FinetuneTrainer(spec, cfg, run_dir, preemption).train()


def seed_everything(seed: int) -> None:
    """Seed torch and numpy for model / head construction."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))

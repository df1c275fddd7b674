"""What every fine-tuning stage shares: config pieces, AdamW with layer-wise lr decay, schedules, FLOPs
counting, checkpoint / resume, and the training loop behind the ``run_stage`` contract.

The contract (each module in ``pipeline/finetune/`` follows it; a Ray Tune sweep only needs this):

    summary = run_stage(stage_cfg, run_dir)   # trains, evaluates, writes the run directory, returns summary.json

``run_dir`` gets ``config.toml``, ``metrics.jsonl`` (loss / lr every ``train.log_every`` steps, evaluations),
``checkpoints/<step>/state.pt`` + ``checkpoints/latest`` and, when training finishes, ``summary.json`` with
the final metrics, the stage's primary metric and the training FLOPs. Calling ``run_stage`` again on the same
directory resumes from the newest checkpoint (a finished run returns its summary at once). A resumed run
reproduces the uninterrupted one exactly: each step reseeds the RNG from (seed, step) and draws its batch
from a sampler that is a pure function of (seed, step), and augmentation seeds come with the indices.

Learning rates: AdamW; parameter ``p`` at depth ``layer_id(p)`` of a ViT with ``L`` blocks gets
``lr * layer_decay ** (L + 1 - layer_id(p))`` (BEiT / MAE layer-wise decay; heads have depth ``L + 1``),
times ``backbone_lr_mult`` inside the image encoder (DenseCLIP's 0.1). Weight decay skips biases, norm
layers, embeddings and every parameter with fewer than two dimensions (the rule of ``pipeline.train.optim``).
Schedules: linear warmup from ``lr / warmup_steps`` (as the pretraining trainer does), then ``cosine`` (to
``min_lr_ratio * lr``), ``const``, ``linear``, ``poly`` (mmseg's, power ``poly_power``) or ``step`` (x
``gamma`` at each of ``milestones``).

Training FLOPs: one training-shaped forward pass is traced; each matmul / conv is charged to the innermost
module that ran it; a step costs forward C, plus backward 2C for modules with trainable parameters and C for
frozen modules that gradients flow through (their outputs require grad), 0 where no gradient flows (e.g. a
linear probe's encoder run under ``no_grad``). ``summary.json["flops"]`` holds per-step and total figures.
"""

from __future__ import annotations

import copy
import io as _io
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from pipeline import io
from pipeline.model.backbone import ViTBackbone
from pipeline.run_dir import RunDir

# ------------------------------------------------------------------------------------------ configs


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


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: norms, biases / 1-d tensors, embeddings."""
    names = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, _NORMS) or p.ndim < 2 or "embedding" in full or full.endswith("ctx"):
                names.add(full)
    return names


def find_backbone(model: nn.Module) -> tuple[str, ViTBackbone] | None:
    """The (prefix, module) of the first image encoder with trainable parameters (else the first one)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ViTBackbone)]
    for name, module in found:
        if any(p.requires_grad for p in module.parameters()):
            return name, module
    return found[0] if found else None


def param_groups(model: nn.Module, cfg: FinetuneOptimConfig) -> list[dict[str, Any]]:
    """AdamW groups keyed by (lr scale, weight decay); each group carries ``lr_scale`` and ``layer_id``."""
    skip = no_decay_names(model)
    found = find_backbone(model)
    prefix, backbone = (found[0] + ".", found[1]) if found else ("\0", None)
    num_layers = backbone.num_layers if backbone is not None else 0
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = backbone is not None and name.startswith(prefix)
        layer = backbone.layer_id(name[len(prefix) :]) if in_backbone else num_layers + 1
        decay = name not in skip
        key = (layer, decay, in_backbone)
        if key not in groups:
            scale = cfg.layer_decay ** (num_layers + 1 - layer) * (
                cfg.backbone_lr_mult if in_backbone else 1.0
            )
            groups[key] = {
                "params": [],
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["lr_scale"] > 0]


def freeze_zero_lr(model: nn.Module, cfg: FinetuneOptimConfig) -> int:
    """With ``backbone_lr_mult = 0`` (a frozen encoder) turn the image encoder's gradients off, so it costs no
    weight-gradient work and its (never applied) gradients stay out of gradient clipping. Returns the number
    of parameter tensors frozen."""
    found = find_backbone(model) if cfg.backbone_lr_mult == 0 else None
    if found is None:
        return 0
    params = [p for p in found[1].parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    return len(params)


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class ModelEma:
    """Exponential moving average of a model's floating-point state (params and buffers), for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if value.dtype.is_floating_point:
                target.lerp_(value.detach(), 1.0 - self.decay)
            else:
                target.copy_(value)


# -------------------------------------------------------------------------------------------- FLOPs


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


def eval_batches(num_samples: int, batch_size: int) -> list[list[tuple[int, None]]]:
    keys = [(i, None) for i in range(num_samples)]
    return [keys[i : i + batch_size] for i in range(0, num_samples, batch_size)]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


class Preempted(Exception):
    """Raised inside :func:`fit` when a checkpoint was written because of ``stop_after_step`` or a signal."""


def _save_checkpoint(rd: RunDir, step: int, state: dict[str, Any], keep: int) -> Path:
    path = rd.checkpoints / str(step) / "state.pt"
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    with io.atomic_write(str(path), "wb") as f:
        f.write(buffer.getvalue())
    io.write_text(str(rd.checkpoints / "latest"), f"{step}\n")
    steps = sorted(int(p.name) for p in rd.checkpoints.iterdir() if p.is_dir() and p.name.isdigit())
    for old in steps[:-keep]:
        shutil.rmtree(rd.checkpoints / str(old), ignore_errors=True)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = latest.parent / latest.read_text().strip() / "state.pt"
    return path if path.is_file() else None


def finite_or_none(value: Any) -> Any:
    """NaN / inf -> None, recursively, so metrics.jsonl and summary.json stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def fit(spec: StageSpec, cfg: Any, run_dir: str | Path, preemption: Any = None) -> dict[str, Any]:
    """Train ``spec`` with ``cfg.optim`` / ``cfg.schedule`` / ``cfg.train``, evaluate, write ``run_dir``."""
    rd = RunDir(run_dir)
    done = rd.read_summary()
    if done is not None and done.get("status") == "complete":
        return done
    tcfg: FinetuneTrainConfig = cfg.train
    log = rd.logger(f"finetune.{spec.name}")
    rd.write_config(cfg)
    device = resolve_device(tcfg.device)
    model = spec.model.to(device)
    if frozen := freeze_zero_lr(model, cfg.optim):
        log.info("%s: backbone_lr_mult = 0, image encoder frozen (%d parameter tensors)", spec.name, frozen)
    optimizer = build_optimizer(model, cfg.optim)
    ema = ModelEma(model, spec.ema_decay) if spec.ema_decay > 0 else None
    step, flops = 0, None
    ckpt = latest_checkpoint(rd.path)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        step, flops = int(state["step"]), state.get("flops")
        rd.truncate_metrics_after(step)
        log.info("resumed %s from %s at step %d", spec.name, ckpt, step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    sampler = StepBatchSampler(len(spec.train_set), tcfg.batch_size, tcfg.seed, step, tcfg.steps)
    loader = torch.utils.data.DataLoader(
        spec.train_set, batch_sampler=sampler, collate_fn=spec.collate, num_workers=tcfg.num_workers
    )

    if flops is None:  # trace one training-shaped forward (buffers such as BN statistics are restored)
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        sample = to_device(spec.collate([spec.train_set[k] for k in sampler.batch(1)]), device)
        model.train()
        with autocast:
            flops = count_training_flops(model, lambda: spec.loss_fn(model, sample))
        model.load_state_dict(buffers)
        optimizer.zero_grad(set_to_none=True)

    def state_dict() -> dict[str, Any]:
        return {
            "model": _model_state(model),
            "optimizer": optimizer.state_dict(),
            "ema": _model_state(ema.module) if ema is not None else None,
            "step": step,
            "flops": flops,
        }

    def run_eval() -> dict[str, Any]:
        batches = eval_batches(len(spec.val_set), tcfg.eval_batch_size)
        val_loader = torch.utils.data.DataLoader(
            spec.val_set, batch_sampler=batches, collate_fn=spec.collate, num_workers=tcfg.num_workers
        )
        out = {}
        for prefix, module in [("", model)] + ([("ema_", ema.module)] if ema is not None else []):
            module.eval()
            with torch.no_grad(), autocast:
                metrics = spec.evaluate(module, (to_device(b, device) for b in val_loader))
            out.update({prefix + k: v for k, v in metrics.items()})
        model.train()
        return out

    started = time.time()
    model.train()
    for batch in loader:
        step += 1
        torch.manual_seed(sample_seed(tcfg.seed, step, 2**32 - 1))  # model-side randomness of this step
        lr = cfg.optim.lr * lr_factor(step - 1, tcfg.steps, cfg.schedule)
        set_lr(optimizer, lr)
        batch = to_device(batch, device)
        with autocast:
            loss, report = spec.loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec.name}: loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip_norm > 0:
            trainable = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip_norm)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            rd.log({"loss": round(loss.item(), 6), "lr": lr, **report}, step)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
            metrics = run_eval()
            rd.log(
                finite_or_none({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}),
                step,
            )
        stop = step == tcfg.stop_after_step or (preemption is not None and preemption.is_set())
        if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or step == tcfg.steps or stop:
            _save_checkpoint(rd, step, state_dict(), tcfg.keep_checkpoints)
        if stop and step < tcfg.steps:
            log.info("%s: checkpointed at step %d and stopping (preempted)", spec.name, step)
            raise Preempted(f"{spec.name} stopped after step {step}")

    metrics = finite_or_none(run_eval())
    rd.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}, step)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    primary = metrics.get(spec.primary_metric)
    summary = {
        "stage": spec.name,
        "status": "complete",
        "steps": step,
        "samples_seen": step * tcfg.batch_size,
        "primary_metric": spec.primary_metric,
        "primary_value": primary,
        "higher_is_better": spec.higher_is_better,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None},
        "per_class": {k: v for k, v in metrics.items() if isinstance(v, list)},
        "flops": {**flops, "train_total": flops["per_step"] * step},
        "train_flops": flops["per_step"] * step,
        "params": params,
        "trainable_params": trainable,
        "wall_s_last_session": round(time.time() - started, 3),
        "final_checkpoint": str(latest_checkpoint(rd.path)),
        **spec.info,
    }
    rd.write_summary(summary)
    log.info("%s finished: %s = %s", spec.name, spec.primary_metric, primary)
    return summary


def seed_everything(seed: int) -> None:
    """Seed torch and numpy for model / head construction."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))

"""The fine-tuning trainer: one loop for every stage, on one process or data-parallel on N.

    summary = FinetuneTrainer(spec, cfg, run_dir, preemption).train()      # what ``fit`` and run_stage call
    torchrun --nproc_per_node 4 -m jobs.finetune --stage segmentation ...  # the same, data-parallel

``train()`` has the pretraining ``Trainer.train()``'s shape: resume, then step / log / eval / save /
preemption check, then the final evaluation and ``summary.json``. It is built from the shared toolkit:
``pipeline.train.optim`` (groups, schedules), ``pipeline.train.ema``, ``pipeline.train.checkpoint``
(``save_state`` / ``load_state``: ``latest``, retention, sha256), ``pipeline.train.state.TrainState`` and
``pipeline.train.flops``.

Data parallelism (inside any initialised process group: torchrun, srun, a Ray Train worker) is torch
``DistributedDataParallel`` around a small module that runs the stage's loss function, so every forward a loss
makes (heads, teachers, detector internals) is inside DDP's forward. Why DDP and not the DeepSpeed engine:
fine-tuned models are small next to their activations (ViT-B + a head is ~100M parameters; ZeRO sharding saves
nothing that matters), the stages' losses call into torchvision / open_clip modules freely, and DDP keeps the
plain ``nn.Module`` and torch optimizer the single-process loop uses, so 1 and N processes run the same code.
BatchNorm layers become :class:`pipeline.model.heads.SyncBatchNorm` (global-batch statistics). Rank ``r``
trains on its contiguous share of each step's global batch (``train.batch_size`` is global, so the
loss curve does not depend on the number of processes), model-side randomness (drop-path, dropout) is seeded
from ``(seed, step, rank)``, evaluation is split over ranks and each stage's evaluator reduces its own
statistics (confusion matrices and depth sums all-reduced, logits gathered, COCO detections gathered to rank
0). Rank 0 writes the run directory; the state is replicated, so one ``state.pt`` per checkpoint.

Heavy-tail freezing (``optim.freeze``, :func:`pipeline.finetune.common.alpha_freeze`) is decided from the
initial weights before the optimizer is built (so a resumed run freezes the same blocks); ``alpha.json`` holds
every encoder block's alpha before and after fine-tuning and the frozen blocks, ``summary.json`` the frozen
blocks and the FLOPs with them counted as frozen (backward C instead of 2C).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline import io
from pipeline.dist import resolve_device
from pipeline.finetune.common import (
    FinetuneTrainConfig,
    RankBatchSampler,
    StageSpec,
    StepBatchSampler,
    alpha_freeze,
    build_optimizer,
    eval_batches,
    find_backbone,
    finite_or_none,
    freeze_zero_lr,
    latest_checkpoint,
    rank_slice,
    sample_seed,
    to_device,
)
from pipeline.model.heads import convert_sync_batchnorm
from pipeline.model.sparsity import apply_mask_file, flop_densities
from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.ema import EMA, EMAConfig
from pipeline.train.flops import count_training_flops
from pipeline.train.optim import lr_factor, set_lr
from pipeline.train.state import Preempted, TrainState, save_or_stop

ALPHA_FILE = "alpha.json"
"""Per-block heavy-tail alpha before / after fine-tuning and the frozen blocks (see ``write_alpha``)."""


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: puts the whole loss computation inside DDP's forward."""

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.model, batch)


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that report it (one object all-gather)."""
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    keys = [k for k in gathered[0]] + [k for g in gathered[1:] for k in g if k not in gathered[0]]
    out = {}
    for k in keys:
        vals = [g[k] for g in gathered if k in g and isinstance(g[k], (int, float))]
        if vals:
            out[k] = round(sum(vals) / len(vals), 6)
    return out


class FinetuneTrainer:
    def __init__(self, spec: StageSpec, cfg: Any, run_dir: str | Path, preemption: Any = None) -> None:
        self.spec, self.cfg = spec, cfg
        self.tcfg: FinetuneTrainConfig = cfg.train
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if self.tcfg.batch_size % self.world_size:
            raise ValueError(
                f"batch_size: the global batch {self.tcfg.batch_size} does not divide over "
                f"{self.world_size} processes"
            )
        self.preemption = preemption
        self.rd = RunDir(run_dir, rank=self.rank)
        self.log = self.rd.logger(f"finetune.{spec.name}")
        self.device = resolve_device(self.tcfg.device)
        model = convert_sync_batchnorm(spec.model) if self.distributed else spec.model
        model = model.to(self.device)
        if frozen := freeze_zero_lr(model, cfg.optim):
            self.log.info("%s: backbone_lr_mult = 0, image encoder frozen (%d tensors)", spec.name, frozen)
        if cfg.optim.masks:  # a pruned subnetwork: its masked weights stay zero (pipeline.model.sparsity)
            apply_mask_file(find_backbone(model)[1], cfg.optim.masks)
        self.alpha = alpha_freeze(model, cfg.optim.freeze)
        if self.alpha is not None and self.alpha["frozen"]:
            self.log.info(
                "%s: froze blocks %s (alpha below the %g quantile)",
                spec.name,
                self.alpha["frozen"],
                self.alpha["quantile"],
            )
        ema = EMA(model, EMAConfig(decay=spec.ema_decay)) if spec.ema_decay > 0 else None
        self.state = TrainState(model, build_optimizer(model, cfg.optim), ema)
        self.model = model
        self.forward = _LossModule(model, spec.loss_fn)
        if self.distributed:
            ids = [self.device.index or torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(
                self.forward, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False
            )
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.tcfg.precision == "bf16"
        )
        self.started = time.time()

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to ``train.steps`` (resuming from ``checkpoints/latest``), evaluate, write summary.json."""
        done = self.rd.read_summary()
        if done is not None and done.get("status") == "complete":
            return done
        tcfg = self.tcfg
        self.rd.write_config(self.cfg)
        self.resume()
        sampler = StepBatchSampler(
            len(self.spec.train_set), tcfg.batch_size, tcfg.seed, self.state.step, tcfg.steps
        )
        if "flops" not in self.state.extra:
            self.state.extra["flops"] = self.count_flops(sampler)
        loader = torch.utils.data.DataLoader(
            self.spec.train_set,
            batch_sampler=RankBatchSampler(sampler, self.rank, self.world_size),
            collate_fn=self.spec.collate,
            num_workers=tcfg.num_workers,
        )
        self.model.train()
        for batch in loader:
            self.state.step += 1
            step = self.state.step
            loss, report, lr = self.train_step(batch)
            if self.state.ema is not None:
                self.state.ema.update(step)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                self.log_step(loss, report, lr)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                self.rd.log(self.scalars(self.evaluate()), step)
            if save_or_stop(
                step, tcfg.steps, tcfg.checkpoint_every, tcfg.stop_after_step, self.preempted, self.save
            ):
                self.log.info("%s: checkpointed at step %d and stopping (preempted)", self.spec.name, step)
                raise Preempted(f"{self.spec.name} stopped after step {step}")
        return self.finish()

    # ------------------------------------------------------------------------------------------- step
    def train_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float], float]:
        """One optimizer step on this rank's share of the global batch; returns the global-batch loss."""
        step, optimizer = self.state.step, self.state.optimizer
        torch.manual_seed(sample_seed(self.tcfg.seed, step, 2**32 - 1 - self.rank))  # drop-path, dropout, ...
        lr = self.cfg.optim.lr * lr_factor(step - 1, self.tcfg.steps, self.cfg.schedule)
        set_lr(optimizer, lr)
        batch = to_device(batch, self.device)
        with self.autocast:
            loss, report = self.forward(batch)
        value = loss.detach().float().clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world_size
        if not torch.isfinite(value):
            raise FloatingPointError(f"{self.spec.name}: loss became {value.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip_norm > 0:
            trainable = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(trainable, self.cfg.optim.grad_clip_norm)
        optimizer.step()
        return value, report, lr

    def log_step(self, loss: torch.Tensor, report: dict[str, float], lr: float) -> None:
        if self.distributed:
            report = _mean_over_ranks(report)
        self.rd.log(
            {"loss": loss.item(), "lr": lr, **report}, self.state.step
        )  # unrounded: tests compare curves

    def preempted(self) -> bool:
        if self.preemption is None:
            return False
        any_rank = getattr(self.preemption, "any_rank_set", None)
        return bool(any_rank() if any_rank is not None and self.distributed else self.preemption.is_set())

    def count_flops(self, sampler: StepBatchSampler) -> dict[str, int]:
        """Trace one training-shaped forward on this rank's share of batch 1, scaled to the global batch
        (buffers such as BN statistics are restored)."""
        buffers = {k: v.clone() for k, v in self.model.state_dict().items()}
        keys = rank_slice(sampler.batch(1), self.rank, self.world_size)
        sample = to_device(self.spec.collate([self.spec.train_set[k] for k in keys]), self.device)
        self.model.train()
        with self.autocast, torch.random.fork_rng(devices=[]):
            flops = count_training_flops(
                self.model,
                lambda: self.spec.loss_fn(self.model, sample),
                densities=flop_densities(self.model),
            )
        self.model.load_state_dict(buffers)
        self.state.optimizer.zero_grad(set_to_none=True)
        return {k: v * self.world_size for k, v in flops.items()}

    # ------------------------------------------------------------------------------- eval / save / end
    def evaluate(self) -> dict[str, Any]:
        """Metrics of the weights (and the EMA's, as ``ema_<name>``) on the validation split, each rank
        evaluating its shard and the stage's evaluator reducing over ranks: every rank gets the result."""
        batches = eval_batches(len(self.spec.val_set), self.tcfg.eval_batch_size, self.rank, self.world_size)
        loader = torch.utils.data.DataLoader(
            self.spec.val_set,
            batch_sampler=batches,
            collate_fn=self.spec.collate,
            num_workers=self.tcfg.num_workers,
        )
        modules = [("", self.model)]
        if self.state.ema is not None:
            modules.append(("ema_", self.state.ema.copy_to(copy.deepcopy(self.model))))
        out: dict[str, Any] = {}
        for prefix, module in modules:
            module.eval()
            with torch.no_grad(), self.autocast:
                metrics = self.spec.evaluate(module, (to_device(b, self.device) for b in loader))
            out.update({prefix + k: v for k, v in metrics.items()})
        self.model.train()
        return out

    @staticmethod
    def scalars(metrics: dict[str, Any]) -> dict[str, Any]:
        return finite_or_none({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})

    def save(self) -> None:
        checkpoint.save_state(
            self.rd.checkpoints, self.state.step, self.state.state_dict(), self.tcfg.keep_checkpoints
        )

    def resume(self) -> None:
        path = latest_checkpoint(self.rd.path)
        if path is None:
            return
        self.state.load_state_dict(checkpoint.load_state(path))
        self.rd.truncate_metrics_after(self.state.step)
        self.log.info("resumed %s from %s at step %d", self.spec.name, path, self.state.step)

    def write_alpha(self) -> None:
        """``alpha.json``: every encoder block's alpha before (the initial weights) and after fine-tuning, and
        which blocks were frozen."""
        from pipeline.analysis.heavytail import layer_alphas

        found = find_backbone(self.model)
        assert found is not None and self.alpha is not None
        after = layer_alphas(found[1], self.alpha["min_tail"])
        io.write_json(str(self.rd.path / ALPHA_FILE), {**self.alpha, "after": after})

    def finish(self) -> dict[str, Any]:
        spec, step = self.spec, self.state.step
        metrics = finite_or_none(self.evaluate())
        self.rd.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}, step
        )
        flops = self.state.extra["flops"]
        primary = metrics.get(spec.primary_metric)
        summary = {
            "stage": spec.name,
            "status": "complete",
            "steps": step,
            "samples_seen": step * self.tcfg.batch_size,
            "world_size": self.world_size,
            "primary_metric": spec.primary_metric,
            "primary_value": primary,
            "higher_is_better": spec.higher_is_better,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None},
            "per_class": {k: v for k, v in metrics.items() if isinstance(v, list)},
            "flops": {**flops, "train_total": flops["per_step"] * step},
            "train_flops": flops["per_step"] * step,
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "wall_s_last_session": round(time.time() - self.started, 3),
            "final_checkpoint": str(latest_checkpoint(self.rd.path)),
            **spec.info,
        }
        if self.alpha is not None:
            summary["frozen_blocks"] = self.alpha["frozen"]
            if self.rank == 0:
                self.write_alpha()
        self.rd.write_summary(summary)
        if self.distributed:
            dist.barrier()
        self.log.info("%s finished: %s = %s", spec.name, spec.primary_metric, primary)
        return summary

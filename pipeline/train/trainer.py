"""The CLIP pretraining loop: exact global-batch contrastive loss, DeepSpeed ZeRO, EMA, exact resume.

    cfg = load_config(TrainConfig, "jobs/configs/pretrain/debug.toml")
    exit_code = Trainer(cfg).train()        # 0 done, 124 preempted (checkpointed; requeue)

One optimizer step takes ``global_batch`` samples: each of ``world_size`` ranks runs ``accumulation_steps``
micro-batches of at most ``data.micro_batch`` samples (:class:`pipeline.train.gradcache.BatchSplit`; when the
batch does not split evenly, ranks differ by one sample and the loss pads and masks). Every
sample's negatives are the whole global batch: features are gathered across ranks with gradient, and with
accumulation the micro-batches are embedded without grad first, the loss and its gradient w.r.t. all
embeddings computed once, then each micro-batch re-embedded and back-propagated (gradient caching; see
:mod:`pipeline.train.gradcache` and :mod:`pipeline.train.loss`). The loss is
``w_real * CLIP(image, web caption) + w_syn * CLIP(image, synthetic caption)``; the learnable logit scale
is clamped at 100 as in CLIP.

``train()`` reads top to bottom: resume from the run directory's ``latest`` checkpoint (or start), then
step / log / evaluate / save / check for preemption until ``steps``, then a final checkpoint, evaluation of
the EMA and final weights, export and ``summary.json``. SIGUSR1 / SIGTERM finish the running step, save
and return :data:`PreemptionFlag.EXIT_CODE` (124).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import to_dict
from pipeline.data.loader import LoaderConfig, build_loader
from pipeline.dist import PreemptionFlag, exit_with_launcher
from pipeline.model.clip import ModelConfig, build_clip, describe, open_clip_config
from pipeline.model.flops import PEAK_FLOPS, forward_flops_per_sample, mfu, train_flops_per_sample
from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.batching import SampleQueue
from pipeline.train.checkpoint import CheckpointConfig
from pipeline.train.ema import EMA, EMAConfig
from pipeline.train.engine import Engine, EngineConfig, init_distributed
from pipeline.train.evaluate import EvalConfig, evaluate
from pipeline.train.export import export_open_clip
from pipeline.train.gradcache import BatchSplit, cached_contrastive_step
from pipeline.train.loss import LossConfig, contrastive_loss
from pipeline.train.optim import OptimConfig

MAX_LOGIT_SCALE = 100.0
"""CLIP clamps the learnable logit scale (1 / temperature) at 100."""


@dataclass(frozen=True)
class LogConfig:
    interval: int = 10
    """Log metrics every this many optimizer steps."""
    tensorboard: bool = False
    """Mirror metrics to TensorBoard under <run>/tensorboard."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for the MFU estimate; 0 picks a known value for the GPU (bf16) or CPU."""

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval: must be >= 1, got {self.interval}")
        if self.peak_flops < 0:
            raise ValueError(f"peak_flops: must be >= 0, got {self.peak_flops}")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/pretrain"
    """Run directory: config, metrics, checkpoints, exports, logs."""
    steps: int = 200_000
    """Optimizer steps to train for."""
    global_batch: int = 65_536
    """Samples per optimizer step over all ranks, exactly, on any number of ranks (>= world_size)."""
    accumulation_steps: int = 0
    """Micro-batches per rank per step; 0: the fewest that keep micro-batches within data.micro_batch."""
    export: bool = True
    """Export the final and EMA weights as open_clip checkpoints at the end."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(micro_batch=256))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch: must be >= 1, got {self.global_batch}")
        if self.accumulation_steps < 0:
            raise ValueError(f"accumulation_steps: must be >= 0, got {self.accumulation_steps}")
        if self.accumulation_steps:
            self.batch_split(1)  # an accumulation that cannot work even on one rank fails here
        model_cfg = open_clip_config(self.model)
        image_size = model_cfg["vision_cfg"]["image_size"]
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        if self.data.image_size != image_size:
            raise ValueError(f"data.image_size: {self.data.image_size} differs from the model's {image_size}")
        context = model_cfg["text_cfg"].get("context_length", 77)
        if self.data.context_length != context:
            raise ValueError(
                f"data.context_length: {self.data.context_length} differs from the model's {context}"
            )
        if self.data.epochs is not None:
            raise ValueError("data.epochs: training reads an endless stream; leave it unset")

    def batch_split(self, world_size: int) -> BatchSplit:
        """How each step's ``global_batch`` is split over ``world_size`` ranks (ValueError naming the field)."""
        return BatchSplit(self.global_batch, world_size, self.data.micro_batch, self.accumulation_steps)

    def accumulation_for(self, world_size: int) -> int:
        """Micro-batches per rank per step for ``world_size`` ranks."""
        return self.batch_split(world_size).accumulation


def peak_flops_per_device(cfg: LogConfig) -> float:
    if cfg.peak_flops:
        return cfg.peak_flops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for key in ("h200", "h100", "a100"):
            if key in name:
                return PEAK_FLOPS[f"{key}-bf16"]
    return PEAK_FLOPS["cpu"]


def memory_gib() -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        exit_with_launcher()  # under torchrun: die with the launcher (its workers run in sessions of their own)
        self.preemption = PreemptionFlag()  # first: a signal during start-up must not kill the job
        self.world = init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.split = cfg.batch_split(self.world_size)
        self.accumulation = self.split.accumulation
        self.run = RunDir(cfg.run_dir, self.rank)
        self.log = self.run.logger("pretrain")
        if cfg.log.tensorboard:
            self.run.enable_tensorboard()
        checkpoint.seed_rngs(cfg.data.seed, self.rank)  # python, numpy, torch; saved and restored per rank
        model, self.preprocess, self.tokenizer = build_clip(cfg.model)
        num_texts = 2 if cfg.loss.w_syn > 0 else 1
        self.flops_per_sample = train_flops_per_sample(
            forward_flops_per_sample(model, cfg.data.image_size, cfg.data.context_length, num_texts)
        )
        self.model_info = describe(model)
        self.engine = Engine(
            model, cfg.engine, cfg.optim, cfg.steps, self.split.max_micro_batch, self.accumulation
        )
        self.ema = EMA(self.engine.module, cfg.ema) if cfg.ema.enabled else None
        self.loss_fn = partial(contrastive_loss, cfg=cfg.loss)
        self.peak_flops = peak_flops_per_device(cfg.log) * self.world_size
        self.step = 0
        self.data_state: dict[str, Any] | None = None
        self.data_skip = 0
        self.eval_model: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> int:
        """Run to ``cfg.steps`` (0) or until preempted (124, after a checkpoint)."""
        cfg = self.cfg
        self.resume()
        self.loader = build_loader(
            cfg.data, self.rank, self.world_size, self.tokenizer, start=self.data_state
        )
        self.samples = SampleQueue(self.loader, skip=self.data_skip)
        with torch.random.fork_rng(devices=[]):  # worker seeding must not shift the training RNG streams
            self.samples.start(iter(self.loader))
        progress = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=self.rank != 0 or not cfg.log.progress,
            desc="pretrain",
            dynamic_ncols=True,
        )
        self.engine.train()
        window = {"time": 0.0, "wait": 0.0, "steps": 0}
        last = time.perf_counter()
        while self.step < cfg.steps:
            micro_batches, wait = self.next_micro_batches()
            out = self.train_step(micro_batches)
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)
            preempted = self.preemption.any_rank_set()
            now = time.perf_counter()  # step time: everything but evaluation and checkpoints
            window["time"] += now - last
            window["wait"] += wait
            window["steps"] += 1
            last = now
            progress.update(1)
            if self.step % cfg.log.interval == 0 or self.step == cfg.steps:
                metrics = self.metrics(out, window)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                window = {"time": 0.0, "wait": 0.0, "steps": 0}
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.steps:
                self.evaluate(final=False)
                last = time.perf_counter()
            if preempted or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                self.save()
                last = time.perf_counter()
            if preempted:
                self.log.info(
                    f"preemption signal ({self.preemption.signal_name}) at step {self.step}: saved, exiting"
                )
                progress.close()
                return PreemptionFlag.EXIT_CODE
        progress.close()
        self.finish()
        return 0

    # ------------------------------------------------------------------------------------------- step
    def next_micro_batches(self) -> tuple[list[dict[str, Any]], float]:
        """This rank's ``accumulation`` micro-batches of this step and the seconds spent waiting for them."""
        start = time.perf_counter()
        sizes = self.split.micro_sizes(self.split.counts(self.step)[self.rank])
        try:
            with torch.random.fork_rng(devices=[]):  # loading never draws from the training RNG streams
                micro = [self.samples.take(size) for size in sizes]
        except StopIteration:
            raise RuntimeError(
                "the data loader ended; training needs an endless stream (data.epochs unset)"
            ) from None
        return micro, time.perf_counter() - start

    def embed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Normalised features of one micro-batch (image, web caption, synthetic caption) and the logit scale."""
        n = batch["image"].shape[0]
        use_syn = self.cfg.loss.w_syn > 0
        text = torch.cat([batch["text"], batch["syn_text"]]) if use_syn else batch["text"]
        out = self.engine(image=batch["image"], text=text)
        features = {"image": out["image_features"].float(), "text": out["text_features"][:n].float()}
        if use_syn:
            features["syn_text"] = out["text_features"][n:].float()
        features["logit_scale"] = out["logit_scale"].float().reshape(()).clamp(max=MAX_LOGIT_SCALE)
        return features

    def _backward(self, surrogate: torch.Tensor) -> None:
        self.engine.backward(surrogate)
        self.engine.micro_step()

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over the global batch; returns detached loss terms and the step's lr."""
        lr = self.engine.lr()
        loss_fn = partial(self.loss_fn, counts=self.split.loss_counts(self.step))  # pad + mask when uneven
        if len(micro_batches) == 1:  # nothing to cache: one forward with grad, one backward
            features = self.embed(micro_batches[0])
            scale = features.pop("logit_scale")
            loss, terms = loss_fn(features, scale)
            self._backward(loss)
            out = {
                "loss": loss.detach(),
                "logit_scale": scale.detach(),
                **{k: v.detach() for k, v in terms.items()},
            }
        else:
            out = cached_contrastive_step(self.embed, micro_batches, loss_fn, backward=self._backward)
        out["lr"] = lr
        return out

    # ---------------------------------------------------------------------------------------- logging
    def metrics(self, out: dict[str, Any], window: dict[str, float]) -> dict[str, Any]:
        """Reduce this step's loss terms over ranks and log them with throughput, MFU and memory."""
        names = [k for k in ("loss", "loss_real", "loss_syn") if k in out]
        values = torch.stack([out[k].float().reshape(()).cpu() for k in names])
        if self.world_size > 1:
            values = values.to(self.engine.device)
            dist.all_reduce(values)
            values = values.cpu() / self.world_size
        step_time = window["time"] / max(1, window["steps"])
        samples_per_s = self.cfg.global_batch / step_time if step_time > 0 else 0.0
        metrics: dict[str, Any] = {name: float(v) for name, v in zip(names, values)}
        metrics.update(
            logit_scale=float(out["logit_scale"]),
            lr=float(out["lr"]),
            grad_norm=self.engine.grad_norm(),
            samples_per_s=samples_per_s,
            samples_per_s_per_device=samples_per_s / self.world_size,
            data_wait_frac=window["wait"] / window["time"] if window["time"] > 0 else 0.0,
            mfu=mfu(samples_per_s, self.flops_per_sample, self.peak_flops),
            step_time_s=step_time,
            memory_gib=memory_gib(),
            samples_seen=self.step * self.cfg.global_batch,
        )
        if "reembed_max_abs_diff" in out:
            metrics["reembed_max_abs_diff"] = float(out["reembed_max_abs_diff"])
        if not math.isfinite(metrics["loss"]):
            self.log.warning(f"step {self.step}: loss is {metrics['loss']}")
        self.run.log(metrics, self.step)
        return metrics

    # ------------------------------------------------------------------------------------- evaluation
    def _eval_weights(self, ema: bool) -> dict[str, torch.Tensor]:
        """Full fp32 weights to evaluate or export (collective under ZeRO-3: all ranks call it)."""
        if ema and self.ema is not None:
            return self.ema.full_state_dict()
        return self.engine.full_state_dict()

    def _run_eval(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.eval_model is None:
            self.eval_model, _, _ = build_clip(dataclasses.replace(self.cfg.model, pretrained=""))
            self.eval_model.to(self.engine.device)
        missing, unexpected = self.eval_model.load_state_dict(
            {k: v.reshape(self.eval_model.state_dict()[k].shape) for k, v in weights.items()}, strict=False
        )
        if unexpected or any(k in dict(self.eval_model.named_parameters()) for k in missing):
            raise RuntimeError(
                f"evaluation weights do not fit the model: missing {missing}, unexpected {unexpected}"
            )
        return evaluate(self.eval_model, self.tokenizer, self.preprocess, self.cfg.eval)

    def evaluate(self, final: bool) -> dict[str, float]:
        """Evaluate the EMA weights, and at the end also the final weights, split over all ranks (each gets
        the same result); logs ``eval/...`` and ``eval/seconds``."""
        if not self.cfg.eval.enabled:
            return {}
        variants = ["ema"] if (self.cfg.eval.ema and self.ema is not None) else []
        if final or not variants:
            variants.append("final")
        results: dict[str, float] = {}
        start = time.perf_counter()
        for variant in variants:  # every rank evaluates its share (pipeline.train.evaluate); none waits idle
            weights = self._eval_weights(ema=variant == "ema")
            results.update({f"eval/{variant}/{k}": v for k, v in self._run_eval(weights).items()})
            del weights
        results["eval/seconds"] = time.perf_counter() - start
        if self.rank == 0:
            self.run.log(results, self.step)
            self.log.info("step %d eval: %s", self.step, {k: round(v, 4) for k, v in results.items()})
        return results

    # ------------------------------------------------------------------------------ checkpoint/resume
    def save(self) -> None:
        state = {
            "step": self.step,
            "rng": checkpoint.rng_state(),
            **self.samples.state_dict(),  # data (loader state) and data_skip (see pipeline.train.batching)
        }
        if self.ema is not None and (self.ema.sharded or self.rank == 0):
            state["ema"] = self.ema.state_dict()
        meta = {"world_size": self.world_size, "config": to_dict(self.cfg)}
        checkpoint.save(self.run.checkpoints, self.step, self.engine, state, meta, self.cfg.checkpoint)
        self.log.info(f"saved checkpoint {self.step}")

    def resume(self) -> None:
        """Continue from the latest checkpoint (per ``checkpoint.resume``), or start: write the config."""
        found = checkpoint.resolve_resume(self.cfg.checkpoint, self.run.checkpoints)
        if found is None:
            self.run.write_config(self.cfg)
            self.run.truncate_metrics_after(0)
            return
        folder, step = found
        own, meta = checkpoint.load(folder, step, self.engine)
        if self.engine.global_steps != step:
            raise RuntimeError(f"resume: DeepSpeed restored step {self.engine.global_steps}, expected {step}")
        if self.ema is not None:  # a replicated EMA is stored once, by rank 0
            holder = (
                own if self.ema.sharded or self.rank == 0 else checkpoint.read_rank_state(folder, step, 0)
            )
            ema_state = holder.get("ema")
            if ema_state is None:
                raise ValueError(f"resume: checkpoint {folder / str(step)} has no EMA state")
            self.ema.load_state_dict(ema_state)
        if meta.get("config") != to_dict(self.cfg):
            self.log.warning("resuming with a config that differs from the checkpoint's")
        self.step = step
        self.data_state = own["data"]
        self.data_skip = int(own.get("data_skip", 0))
        self.run.write_config(self.cfg)
        self.run.truncate_metrics_after(step)
        checkpoint.set_rng_state(own["rng"])
        self.log.info(f"resumed from {folder / str(step)}")

    # ------------------------------------------------------------------------------------------ finish
    def finish(self) -> None:
        """Final checkpoint, evaluation, export and summary."""
        cfg = self.cfg
        if checkpoint.latest_step(self.run.checkpoints) != self.step:
            self.save()
        results = self.evaluate(final=True)
        exports: dict[str, str] = {}
        if cfg.export:
            variants = ["final"] + (["ema"] if self.ema is not None else [])
            for variant in variants:
                weights = self._eval_weights(ema=variant == "ema")
                if self.rank == 0:
                    out_dir = self.run.path / "export" / variant
                    export_open_clip(
                        weights,
                        cfg.model,
                        self.preprocess,
                        out_dir,
                        info={"step": self.step, "weights_kind": variant},
                    )
                    exports[variant] = str(out_dir)
                del weights
        rows = self.run.read_metrics() if self.rank == 0 else []
        train_rows = [r for r in rows if "loss" in r]
        summary = {
            "step": self.step,
            "world_size": self.world_size,
            "global_batch": cfg.global_batch,
            "accumulation_steps": self.accumulation,
            "flops_per_sample": self.flops_per_sample,
            **self.model_info,
            "first_loss": train_rows[0]["loss"] if train_rows else None,
            "final_loss": train_rows[-1]["loss"] if train_rows else None,
            "samples_per_s": train_rows[-1]["samples_per_s"] if train_rows else None,
            "eval": results,
            "exports": exports,
            "loader": {"stats": self.loader.stats, "counts": self.loader.counts},
        }
        self.run.write_summary(summary)
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        self.run.close()

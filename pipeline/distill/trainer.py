"""The FD-CLIP distillation loop: resumable, on the shared training toolkit, exporting a fine-tunable CLIP.

    summary = DistillTrainer(DistillConfig(), "runs/distill").train()
    python -m jobs.distill --preset debug --run_dir=runs/distill        # the same from the command line

The shape of ``CocaTrainer.train()``: resume from ``<run_dir>/checkpoints/latest``, then step / log / save /
preemption check, then :meth:`DistillTrainer.finish`. The toolkit pieces: ``pipeline.train.optim`` (AdamW
groups with no decay on norms, biases and embeddings -- the relative position tables included -- and the
warmup + cosine schedule), ``pipeline.train.ema`` (optional), ``pipeline.train.state.TrainState`` and
``pipeline.train.checkpoint.save_state`` / ``load_state`` (``checkpoints/<step>/state.pt`` + ``sha256.json``),
``pipeline.train.flops.count_training_flops``, ``pipeline.run_dir.RunDir``.

Data: the synthetic world (``data.source = "synthetic"``: ``num_scenes`` scenes made in memory; the batch of
step ``s`` is a pure function of ``(seed, s)``) or WebDataset shards through ``pipeline.data.loader`` (its
``state_dict`` is saved in each checkpoint, so a resume continues with the next batch). Either way a rerun
after a kill ends with the same weights as an uninterrupted run.

Data-parallel under any launcher that sets the ranks (``pipeline.dist``): ``train.batch_size`` is the global
batch, process ``r`` of ``N`` takes the ``r``-th contiguous ``1/N`` of it (synthetic) or reads its own slots of
the shards (the loader's rank split), DDP averages the gradients, and each checkpoint gathers every process's
RNG state and loader position into rank 0's ``state.pt``.

The run directory: ``config.toml``, ``metrics.jsonl`` (loss, lr), ``flops.json`` (teacher forward C per
sample, student forward C' and backward 2C', totals), ``checkpoints/``, ``summary.json`` and ``export/``: a
full CLIP (the teacher's text tower, the student's image tower) in the layout of ``pipeline.train.export``
(``open_clip_pytorch_model.bin``, ``visual.pt``, ``open_clip_config.json``, ``export.json``), which every
fine-tuning stage takes as ``backbone.checkpoint`` (``export_ema/`` too when the EMA is on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from pipeline import io
from pipeline.data import synthworld as sw
from pipeline.data.loader import CLIP_MEAN, CLIP_STD, LoaderConfig, build_loader
from pipeline.dist import resolve_device
from pipeline.distill.fdclip import (
    FDStudent,
    LossConfig,
    StudentConfig,
    TeacherConfig,
    build_student,
    build_teacher,
    feature_loss,
    teacher_targets,
)
from pipeline.finetune.metrics import all_gather_objects
from pipeline.model.backbone import ViTBackbone
from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.checkpoint import rng_state, seed_rngs, set_rng_state
from pipeline.train.ema import EMA, EMAConfig
from pipeline.train.export import VISUAL_FILE, WEIGHTS_FILE
from pipeline.train.flops import count_training_flops
from pipeline.train.optim import OptimConfig, build_optimizer, lr_at, param_groups, set_lr
from pipeline.train.state import Preempted, TrainState, save_or_stop


@dataclass(frozen=True, kw_only=True)
class DistillDataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"
    """``synthetic``: the synthetic world's training scenes, made in memory; ``shards``: WebDataset shards
    (``loader.shards``) read by the project's loader."""
    world: sw.WorldConfig = field(default_factory=sw.WorldConfig)
    """The synthetic world (images are resized to the model's input size when they differ)."""
    num_scenes: int = 256
    """Synthetic training scenes (world split ``train``)."""
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(num_workers=0))
    """The shard loader (``source = "shards"``); its ``micro_batch`` and ``image_size`` are set from
    ``train.micro_batch`` and the model's input size."""

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "shards"):
            raise ValueError(f"source: must be synthetic or shards, got {self.source!r}")
        if self.num_scenes < 1:
            raise ValueError(f"num_scenes: must be >= 1, got {self.num_scenes}")


@dataclass(frozen=True, kw_only=True)
class DistillTrainConfig:
    steps: int = 20
    """Optimizer steps."""
    batch_size: int = 16
    """Images per optimizer step over all processes (FD-CLIP: 2048); each of N processes takes 1/N."""
    micro_batch: int = 0
    """Images per forward / backward on each process (gradient accumulation up to the process's share of
    ``batch_size``); 0 = the whole share."""
    log_every: int = 10
    """Append loss / lr to metrics.jsonl every this many steps (and at the last)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0 = only at the end and when stopped or preempted)."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints."""
    seed: int = 0
    """Seed of the batch order and of the RNG streams (drop-path)."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the forward passes (weights, optimizer state and the loss stay fp32)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    stop_after_step: int = 0
    """Checkpoint and stop after this step as if preempted (0 = never); used to test resumption."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch: must be >= 0, got {self.micro_batch}")
        if self.checkpoint_every < 0 or self.stop_after_step < 0:
            raise ValueError("checkpoint_every / stop_after_step: must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: must be fp32 or bf16, got {self.precision!r}")

    def split(self, world_size: int) -> tuple[int, int]:
        """(images per forward, micro-batches per step) on each of ``world_size`` processes."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size: {self.batch_size} does not divide over {world_size} processes")
        share = self.batch_size // world_size
        micro = self.micro_batch or share
        if share % micro:
            raise ValueError(f"micro_batch: must divide the per-process batch {share}, got {micro}")
        return micro, share // micro


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """FD-CLIP feature distillation: teacher, student, loss, data, optimizer and loop."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen CLIP whose whitened output tokens the student regresses."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student image tower (the teacher's architecture, random init) and its head."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Token-level regression loss."""
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    """Training images: the synthetic world or WebDataset shards."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.05)
    )
    """AdamW and the warmup + cosine schedule (the fdclip preset holds FD-CLIP's Table 4 values)."""
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    """EMA of the student (exported as ``export_ema/`` when enabled)."""
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    """Steps, batch, logging, checkpoints, device."""


def _trajectory(cfg: DistillConfig) -> dict[str, Any]:
    """The config values that decide the weights (not logging, checkpointing, stopping, threads, device)."""
    control = {"log_every", "checkpoint_every", "keep_checkpoints", "stop_after_step", "threads", "device"}
    out = dataclasses.asdict(cfg)
    out["train"] = {k: v for k, v in out["train"].items() if k not in control}
    return out


def _plain(value: Any) -> Any:
    """JSON / torch-weights_only friendly (tuples -> lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class DistillTrainer:
    """Feature distillation on the training toolkit; only the data, the loss and the export are its own."""

    def __init__(
        self,
        cfg: DistillConfig,
        run_dir: str | Path,
        log: Callable[[str], None] = print,
        preemption: Any = None,
    ) -> None:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.micro_batch, self.accumulation = cfg.train.split(self.world_size)
        self.cfg, self.preemption = cfg, preemption
        self.log = log if self.rank == 0 else (lambda message: None)
        self.rd = RunDir(run_dir, rank=self.rank)
        self.device = resolve_device(cfg.train.device)
        self.started = time.time()
        teacher, self.model_cfg = build_teacher(cfg.teacher)
        self.teacher = teacher.to(self.device)
        self.preprocess = dict(open_clip.get_model_preprocess_cfg(teacher))
        self.clip = build_student(self.teacher, self.model_cfg, cfg.student)
        self.teacher_backbone = ViTBackbone(self.teacher.visual)
        self.image_size = int(self.teacher.visual.image_size[0])
        model = FDStudent(self.clip.visual, self.teacher_backbone.width, cfg.student).to(self.device)
        self.state = TrainState(
            model,
            build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim),
            ema=EMA(model, cfg.ema) if cfg.ema.enabled else None,
        )
        self.state.extra["trajectory"] = _plain(_trajectory(cfg))
        self.forward: nn.Module = model
        if self.distributed:  # gradients averaged over the processes: the global batch's mean loss
            ids = [self.device.index or torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        self.loader = None
        self._data_state: Any = None
        if cfg.data.source == "synthetic":
            self.images = self._synthetic_images()
            self._order_gen = torch.Generator().manual_seed(cfg.train.seed)
            self._order, self._epoch = torch.randperm(cfg.data.num_scenes, generator=self._order_gen), 0

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Distil to ``train.steps`` (resuming from ``checkpoints/latest``), export, return the summary; raises
        :class:`Preempted` after checkpointing at ``stop_after_step`` or on a preemption signal."""
        cfg = self.cfg.train
        self.rd.write_config(self.cfg)
        seed_rngs(cfg.seed, self.rank)
        self.resume()
        self.write_flops()
        batches = self.batches()
        while self.state.step < cfg.steps:
            self.state.step += 1
            step = self.state.step
            loss, lr = self.train_step(next(batches))
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.rd.log({"loss": loss, "lr": lr}, step)
                self.log(f"distill: step {step} loss {loss:.4f} lr {lr:.3g}")
            if save_or_stop(
                step, cfg.steps, cfg.checkpoint_every, cfg.stop_after_step, self.preempted, self.save
            ):
                self.log(f"distill: checkpointed at step {step} in {self.rd.checkpoints} and stopping")
                raise Preempted(f"distill stopped after step {step}")
        return self.finish()

    def train_step(self, images: torch.Tensor) -> tuple[float, float]:
        model, opt = self.state.model, self.state.optimizer
        lr = lr_at(self.state.step - 1, self.cfg.optim, self.cfg.train.steps)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        parts = images.to(self.device).chunk(self.accumulation)
        total = torch.zeros((), device=self.device)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.distributed else self.forward.no_sync()
            with sync:
                with self._autocast():
                    target = teacher_targets(self.teacher_backbone, part)
                    pred = self.forward(part)
                loss = feature_loss(pred, target, self.cfg.loss)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distill: loss became {loss.item()} at step {self.state.step}")
                (loss / len(parts)).backward()
            total += loss.detach() / len(parts)
        if self.distributed:  # the logged loss is the global batch's
            dist.all_reduce(total)
            total /= self.world_size
        if self.cfg.optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip_norm)
        opt.step()
        if self.state.ema is not None:
            self.state.ema.update(self.state.step)
        return total.item(), lr

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def preempted(self) -> bool:
        return self.preemption is not None and bool(self.preemption.is_set())

    # ------------------------------------------------------------------------------------------- data
    def _synthetic_images(self) -> torch.Tensor:
        world, n = self.cfg.data.world, self.cfg.data.num_scenes
        raw = np.stack([sw.make_scene(world, i, "train").image for i in range(n)])
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(self.preprocess.get("mean", CLIP_MEAN)).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.get("std", CLIP_STD)).view(1, 3, 1, 1)
        return (x - mean) / std

    def batch_indices(self, step: int) -> torch.Tensor:
        """Scenes of ``step`` (1-based): epoch-wise permutations from one seeded generator (remainder dropped);
        a pure function of ``(seed, step)``."""
        size = self.cfg.train.batch_size
        per_epoch = max(1, self.cfg.data.num_scenes // size)
        epoch, k = divmod(step - 1, per_epoch)
        while self._epoch < epoch:
            self._order, self._epoch = (
                torch.randperm(self.cfg.data.num_scenes, generator=self._order_gen),
                self._epoch + 1,
            )
        return self._order[k * size : (k + 1) * size]

    def batches(self) -> Iterator[torch.Tensor]:
        """Training batches from the step after ``state.step`` on."""
        if self.cfg.data.source == "synthetic":
            step = self.state.step
            share = self.cfg.train.batch_size // self.world_size
            while True:
                step += 1
                yield self.images[self.batch_indices(step)[self.rank * share : (self.rank + 1) * share]]
        loader_cfg = dataclasses.replace(
            self.cfg.data.loader, micro_batch=self.micro_batch, image_size=self.image_size
        )
        start = (self.state.extra.get("data") or [None] * self.world_size)[self.rank]
        self.loader = build_loader(loader_cfg, self.rank, self.world_size, start=start)
        it = iter(self.loader)
        while True:
            parts = [next(it)["image"] for _ in range(self.accumulation)]
            self._data_state = self.loader.state_dict()
            yield torch.cat(parts)

    # ------------------------------------------------------------------------------------------ FLOPs
    def write_flops(self) -> dict[str, Any]:
        """Count one sample's FLOPs: teacher forward C_t (no backward), student forward C_s and backward 2C_s
        (``count_training_flops``' rule); write ``flops.json``."""
        model = self.state.model
        image = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(
            False
        )  # count nn.MultiheadAttention's matmuls, not its fused op
        was_training = model.training
        model.eval()  # no drop-path draws: the RNG streams stay those of an uncounted run
        try:
            with sdpa_kernel(SDPBackend.MATH):
                teacher = count_training_flops(
                    self.teacher, lambda: teacher_targets(self.teacher_backbone, image)
                )
                both = count_training_flops(
                    nn.ModuleList([self.teacher, model]),
                    lambda: feature_loss(
                        model(image), teacher_targets(self.teacher_backbone, image), self.cfg.loss
                    ),
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            model.train(was_training)
        student_fwd = both["forward_per_step"] - teacher["forward_per_step"]
        per_sample = both["per_step"]
        samples = self.cfg.train.steps * self.cfg.train.batch_size
        flops = {
            "teacher_forward_per_sample": teacher["forward_per_step"],
            "teacher_backward_per_sample": teacher["backward_per_step"],
            "student_forward_per_sample": student_fwd,
            "student_backward_per_sample": both["backward_per_step"],
            "per_sample": per_sample,
            "per_step": per_sample * self.cfg.train.batch_size,
            "total": per_sample * samples,
            "samples": samples,
            "rule": "teacher forward C (frozen, no backward); student forward C' + backward 2C'",
        }
        if self.rank == 0:
            io.write_json(str(self.rd.path / "flops.json"), flops)
        self.flops = flops
        return flops

    # ------------------------------------------------------------------------------- save / resume / end
    def save(self) -> None:
        """Collective: every process's RNG state and loader position go into rank 0's checkpoint."""
        self.state.extra["world_size"] = self.world_size
        self.state.extra["rank_rng"] = all_gather_objects(rng_state())
        if self.cfg.data.source == "shards":
            self.state.extra["data"] = all_gather_objects(self._data_state)
        checkpoint.save_state(
            self.rd.checkpoints, self.state.step, self.state.state_dict(), self.cfg.train.keep_checkpoints
        )

    def resume(self) -> None:
        path = checkpoint.latest_state_file(self.rd.checkpoints)
        if path is None:
            return
        saved = checkpoint.load_state(path)
        trained_with = (saved.get("extra") or {}).get("trajectory")
        mine = self.state.extra["trajectory"]
        if trained_with != mine:
            changed = sorted(k for k in mine if (trained_with or {}).get(k) != mine[k])
            raise ValueError(
                f"resume: {path} was trained with other values of {', '.join(changed) or 'the config'}; "
                f"use another run directory or delete {self.rd.path}"
            )
        saved_world = (saved.get("extra") or {}).get("world_size", 1)
        if saved_world != self.world_size:
            raise ValueError(
                f"resume: {path} was written by {saved_world} processes, this run has {self.world_size}; "
                "resume with the same number"
            )
        self.state.load_state_dict(saved)
        set_rng_state(self.state.extra["rank_rng"][self.rank])
        self.rd.truncate_metrics_after(self.state.step)
        self.log(f"distill: resumed from {path} at step {self.state.step}")

    def finish(self) -> dict[str, Any]:
        """Export the student CLIP (``export/``; ``export_ema/`` with the EMA) and write ``summary.json``."""
        exports = {"final": str(self.export(self.rd.path / "export"))}
        if self.state.ema is not None:  # last: the EMA overwrites the working weights (already saved)
            self.state.ema.copy_to(self.state.model)
            exports["ema"] = str(self.export(self.rd.path / "export_ema", kind="ema"))
        if self.distributed:
            dist.barrier()
        rows = [r for r in self.rd.read_metrics() if "loss" in r]
        summary = {
            "status": "complete",
            "steps": self.state.step,
            "seconds": round(time.time() - self.started, 2),
            "history": [{"step": r["step"], "loss": round(r["loss"], 5)} for r in rows],
            "student_position": self.cfg.student.position,
            "world_size": self.world_size,
            "flops": self.flops,
            "exports": exports,
            "run_dir": str(self.rd.path),
        }
        self.rd.write_summary(summary)
        return summary

    def model_name(self) -> str:
        """The teacher's architecture name: its export's ``model_name`` when it came from an export folder."""
        folder = Path(self.cfg.teacher.checkpoint)
        if self.cfg.teacher.checkpoint and (folder / "export.json").is_file():
            return str(json.loads((folder / "export.json").read_text())["model_name"])
        return self.cfg.teacher.model

    def export(self, out: Path, kind: str = "final") -> Path:
        """The student CLIP in ``pipeline.train.export``'s layout (+ ``student_position`` in export.json);
        written by rank 0."""
        if self.rank != 0:
            return out
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().float().cpu().contiguous() for k, v in self.clip.state_dict().items()}
        visual = {k[len("visual.") :]: v for k, v in weights.items() if k.startswith("visual.")}
        for name, obj in ((WEIGHTS_FILE, weights), (VISUAL_FILE, visual)):
            with io.atomic_write(str(out / name), "wb") as f:
                torch.save(obj, f)
        name = self.model_name()
        pre = {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess.items()}
        io.write_json(str(out / f"{name}.json"), self.model_cfg)
        io.write_json(
            str(out / "open_clip_config.json"), {"model_cfg": self.model_cfg, "preprocess_cfg": pre}
        )
        io.write_json(
            str(out / "export.json"),
            {
                "model_name": name,
                "architecture": name,
                "weights": WEIGHTS_FILE,
                "image_tower": VISUAL_FILE,
                "model_config": f"{name}.json",
                "params": int(sum(v.numel() for v in weights.values())),
                "step": self.state.step,
                "kind": kind,
                "student_position": self.cfg.student.position,
                "open_clip_compatible": self.cfg.student.position == "ape",
                "teacher": dataclasses.asdict(self.cfg.teacher),
                "made_by": "python -m jobs.distill",
            },
        )
        return out


def run_distill(
    cfg: DistillConfig, run_dir: str | Path, log: Callable[[str], None] = print, preemption: Any = None
) -> dict[str, Any]:
    """Distil (resuming from ``<run_dir>/checkpoints/latest``), export, return the summary."""
    return DistillTrainer(cfg, run_dir, log, preemption).train()

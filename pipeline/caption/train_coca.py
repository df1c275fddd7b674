"""A small, dedicated CoCa training entry: a captioner trained on the synthetic world's precise captions.

This is the first half of the DataCompDR recipe in miniature (see :mod:`pipeline.caption.loop`): train a CoCa
on clean captions, then caption the noisy web data with it. The model is an open_clip ``CoCa`` with a compact
vocabulary (only the BPE tokens that occur in the training captions, so the output layer is tiny and a few
hundred CPU steps suffice); the checkpoint carries its ``model_cfg`` and ``vocab_ids`` so
:class:`~pipeline.caption.captioners.CocaCaptioner` (and ``python -m data_prep.caption``) load it directly.

    summary = train_coca(TrainCocaConfig(steps=250), out="runs/coca_world.pt")   # run dir runs/coca_world/
    # command line: python -m data_prep.train_coca --steps=250 --out=runs/coca_world.pt

:class:`CocaTrainer` has the shape of the fine-tuning ``FinetuneTrainer.train()``: resume, then step / log /
save / preemption check, then ``finish()`` (export ``out``, ``summary.json``), on the shared toolkit:
``pipeline.train.optim`` (groups, schedule), ``pipeline.train.state.TrainState`` and
``pipeline.train.checkpoint.save_state`` / ``load_state`` (``<run_dir>/checkpoints/<step>/state.pt``,
``latest``, retention, sha256), ``pipeline.run_dir.RunDir`` (``config.toml``, ``metrics.jsonl``). Batches are a
pure function of ``(seed, step)``, so a rerun resumes exactly where ``checkpoints/latest`` left off and ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import io
from pipeline.caption.captioners import build_coca
from pipeline.caption.decode import EOS_TOKEN_ID, SOT_TOKEN_ID
from pipeline.data import synthworld as sw
from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.checkpoint import seed_rngs
from pipeline.train.optim import OptimConfig, build_optimizer, lr_at, param_groups, set_lr
from pipeline.train.state import Preempted, TrainState, save_or_stop

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def loop_world() -> sw.WorldConfig:
    """Big single objects on plain backgrounds: shape is learnable in a couple of hundred CPU steps."""
    return sw.WorldConfig(
        num_shapes=4,
        num_colours=2,
        num_sizes=1,
        max_things=1,
        num_stuff_classes=2,
        min_radius=0.2,
        max_radius=0.3,
        noise_std=0.0,
        haze=0.0,
    )


@dataclass(frozen=True)
class TrainCocaConfig:
    """World, model size and optimisation of the small CoCa."""

    world: sw.WorldConfig = field(default_factory=loop_world)
    """The synthetic world the captions describe (default: one big object of 4 shapes x 2 colours, 64 px)."""
    num_scenes: int = 2000
    """Training scenes (world split ``train``), generated in memory."""
    caption: Literal["first_sentence", "full"] = "first_sentence"
    """Train on the precise caption's first sentence (objects + background) or the whole caption."""
    steps: int = 250
    """Optimiser steps."""
    batch_size: int = 64
    """Scenes per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    warmup_steps: int = 20
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    caption_loss_weight: float = 2.0
    """Weight of the captioning (next-token) loss, as in CoCa."""
    clip_loss_weight: float = 1.0
    """Weight of the contrastive loss."""
    width: int = 64
    """Width of every tower."""
    layers: int = 2
    """Layers of every tower."""
    heads: int = 4
    """Attention heads of every tower."""
    patch_size: int = 16
    """Vision patch size in pixels."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    log_interval: int = 50
    """Append a ``metrics.jsonl`` row (loss, caption_loss, clip_loss, lr) every this many steps, and at the
    last."""
    checkpoint_interval: int = 0
    """Save ``<run_dir>/checkpoints/<step>/state.pt`` every this many optimizer steps (0: only at the end and
    when stopped or preempted); a rerun resumes from ``checkpoints/latest``."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints."""
    stop_after_step: int = 0
    """Checkpoint and stop after this step as if preempted (0: never); used to test resumption."""

    def __post_init__(self) -> None:
        for name in (
            "num_scenes",
            "steps",
            "batch_size",
            "width",
            "layers",
            "heads",
            "patch_size",
            "log_interval",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"heads: must divide width={self.width}, got {self.heads}")
        if self.world.image_size % self.patch_size:
            raise ValueError(f"patch_size: must divide world.image_size={self.world.image_size}")
        if self.batch_size > self.num_scenes:
            raise ValueError(f"batch_size: must be <= num_scenes={self.num_scenes}, got {self.batch_size}")
        if self.checkpoint_interval < 0 or self.stop_after_step < 0:
            raise ValueError("checkpoint_interval, stop_after_step: must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


def training_caption(scene: sw.Scene, mode: str) -> str:
    text = scene.precise_caption
    if mode == "first_sentence":
        text = text.split(". ")[0].rstrip(".") + "."
    return text


def build_vocab(texts: Sequence[str]) -> list[int]:
    """Compact vocabulary: id 0 = padding (BPE 0), then every BPE id of ``texts``, then start, end."""
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()
    used: set[int] = set()
    for t in texts:
        used.update(tok.encode(t))
    used -= {0, SOT_TOKEN_ID, EOS_TOKEN_ID}
    return [0, *sorted(used), SOT_TOKEN_ID, EOS_TOKEN_ID]


def encode_texts(texts: Sequence[str], vocab_ids: Sequence[int], context_length: int) -> torch.Tensor:
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()
    to_compact = {bpe: i for i, bpe in enumerate(vocab_ids)}
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [SOT_TOKEN_ID, *tok.encode(t)][: context_length - 1] + [EOS_TOKEN_ID]
        out[i, : len(ids)] = torch.tensor([to_compact[x] for x in ids])
    return out


def coca_cfg_for(cfg: TrainCocaConfig, vocab_size: int, context_length: int) -> dict[str, Any]:
    w, n, h = cfg.width, cfg.layers, cfg.heads
    return {
        "embed_dim": w,
        "vision_cfg": {
            "image_size": cfg.world.image_size,
            "layers": n,
            "width": w,
            "head_width": w // h,
            "patch_size": cfg.patch_size,
            "attentional_pool": True,
            "attn_pooler_queries": 16,
            "attn_pooler_heads": h,
            "output_tokens": True,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": w,
            "heads": h,
            "layers": n,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": w,
            "heads": h,
            "layers": n,
            "attn_pooler_heads": h,
        },
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> normalised float NCHW (what open_clip's eval transform gives at native size)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def default_run_dir(out: str | Path) -> Path:
    """``runs/coca_world.pt`` -> ``runs/coca_world/`` (``runs/coca`` -> ``runs/coca.run/``)."""
    path = Path(out)
    return path.with_suffix("") if path.suffix else path.with_name(path.name + ".run")


def _trajectory(cfg: TrainCocaConfig) -> dict[str, Any]:
    """The config fields that decide the weights (not checkpointing, logging, stopping or threads)."""
    control = {"checkpoint_interval", "keep_checkpoints", "log_interval", "stop_after_step", "threads"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in control}


class CocaTrainer:
    """The CoCa loop on the training toolkit: ``TrainState`` + ``checkpoint.save_state`` / ``load_state``,
    ``optim`` groups and schedule, ``RunDir`` metrics; only the data, the loss and the export are CoCa's own."""

    def __init__(
        self,
        cfg: TrainCocaConfig,
        out: str | Path,
        run_dir: str | Path | None = None,
        log: Callable[[str], None] = print,
        preemption: Any = None,
    ) -> None:
        import open_clip
        from open_clip.loss import CoCaLoss

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.out, self.log, self.preemption = cfg, Path(out), log, preemption
        self.rd = RunDir(default_run_dir(out) if run_dir is None else run_dir)
        self.started = time.time()
        scenes = [sw.make_scene(cfg.world, i, "train") for i in range(cfg.num_scenes)]
        texts = [training_caption(s, cfg.caption) for s in scenes]
        self.vocab_ids = build_vocab(texts)
        tok = open_clip.tokenizer.SimpleTokenizer()
        self.context_length = min(max(len(tok.encode(t)) for t in texts) + 2, 76)
        self.tokens = encode_texts(texts, self.vocab_ids, self.context_length)
        self.images = images_to_tensor([s.image for s in scenes])
        self.model_cfg = coca_cfg_for(cfg, len(self.vocab_ids), self.context_length)
        model = build_coca(self.model_cfg, cfg.seed).train()
        self.loss_fn = CoCaLoss(
            caption_loss_weight=cfg.caption_loss_weight, clip_loss_weight=cfg.clip_loss_weight, pad_id=0
        )
        self.optim = OptimConfig(  # the toolkit's groups (no decay on norms, biases, embeddings) and schedule
            lr=cfg.lr,
            min_lr=0.0,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            beta1=0.9,
            beta2=0.98,
            eps=1e-8,
            grad_clip_norm=1.0,
        )
        self.state = TrainState(
            model, build_optimizer(param_groups(model, self.optim.weight_decay), self.optim)
        )
        self.state.extra["trajectory"] = _trajectory(cfg)
        self._order_gen = torch.Generator().manual_seed(cfg.seed)
        self._order, self._epoch = torch.randperm(cfg.num_scenes, generator=self._order_gen), 0

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to ``steps`` (resuming from ``<run_dir>/checkpoints/latest``), export ``out``, return the
        summary; raises :class:`Preempted` after checkpointing at ``stop_after_step`` or on a preemption signal."""
        cfg = self.cfg
        self.rd.write_config(cfg)
        seed_rngs(cfg.seed, 0)
        self.resume()
        while self.state.step < cfg.steps:
            self.state.step += 1
            step = self.state.step
            losses, lr = self.train_step(self.batch_indices(step))
            if step % cfg.log_interval == 0 or step == cfg.steps:
                self.log_step(losses, lr)
            if save_or_stop(
                step, cfg.steps, cfg.checkpoint_interval, cfg.stop_after_step, self.preempted, self.save
            ):
                self.log(f"train_coca: checkpointed at step {step} in {self.rd.checkpoints} and stopping")
                raise Preempted(f"train_coca stopped after step {step}")
        return self.finish()

    # ----------------------------------------------------------------------------------- CoCa-specific
    def batch_indices(self, step: int) -> torch.Tensor:
        """Scenes of ``step`` (1-based): epoch-wise permutations from one seeded generator, the remainder of
        each epoch dropped. A pure function of ``(seed, step)``, so the step is the data position."""
        per_epoch = self.cfg.num_scenes // self.cfg.batch_size
        epoch, k = divmod(step - 1, per_epoch)
        assert epoch >= self._epoch, "steps only move forward"
        while self._epoch < epoch:
            self._order, self._epoch = (
                torch.randperm(self.cfg.num_scenes, generator=self._order_gen),
                self._epoch + 1,
            )
        return self._order[k * self.cfg.batch_size : (k + 1) * self.cfg.batch_size]

    def train_step(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        model, opt = self.state.model, self.state.optimizer
        lr = lr_at(self.state.step - 1, self.optim, self.cfg.steps)
        set_lr(opt, lr)
        clip_loss, caption_loss = self.loss_fn(**model(self.images[idx], self.tokens[idx]))
        loss = clip_loss + caption_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_coca: loss became {loss.item()} at step {self.state.step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.optim.grad_clip_norm)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return {
            "loss": loss.detach(),
            "caption_loss": caption_loss.detach(),
            "clip_loss": clip_loss.detach(),
        }, lr

    def log_step(self, losses: dict[str, torch.Tensor], lr: float) -> None:
        values = {k: v.item() for k, v in losses.items()}
        self.rd.log({**values, "lr": lr}, self.state.step)  # unrounded: tests compare curves
        self.log(
            f"train_coca: step {self.state.step} loss {values['loss']:.3f} (caption "
            f"{values['caption_loss']:.3f}, clip {values['clip_loss']:.3f})"
        )

    def preempted(self) -> bool:
        return self.preemption is not None and bool(self.preemption.is_set())

    # ------------------------------------------------------------------------------- save / resume / end
    def save(self) -> None:
        checkpoint.save_state(
            self.rd.checkpoints, self.state.step, self.state.state_dict(), self.cfg.keep_checkpoints
        )

    def resume(self) -> None:
        path = checkpoint.latest_state_file(self.rd.checkpoints)
        if path is None:
            return
        saved = checkpoint.load_state(path)
        trained_with = (saved.get("extra") or {}).get("trajectory")
        if trained_with != self.state.extra["trajectory"]:
            changed = sorted(
                k
                for k in self.state.extra["trajectory"]
                if (trained_with or {}).get(k) != self.state.extra["trajectory"][k]
            )
            raise ValueError(
                f"resume: {path} was trained with other values of {', '.join(changed) or 'the config'}; "
                f"use another run directory or delete {self.rd.path}"
            )
        self.state.load_state_dict(saved)
        self.rd.truncate_metrics_after(self.state.step)
        self.log(f"train_coca: resumed from {path} at step {self.state.step}")

    def finish(self) -> dict[str, Any]:
        """Write the captioner checkpoint ``out`` and ``summary.json``; return the summary."""
        model = self.state.model.eval()
        rows = [r for r in self.rd.read_metrics() if "loss" in r]
        summary = {
            "status": "complete",
            "steps": self.state.step,
            "seconds": round(time.time() - self.started, 2),
            "history": [
                {"step": r["step"], **{k: round(r[k], 4) for k in ("loss", "caption_loss", "clip_loss")}}
                for r in rows
            ],
            "vocab_size": len(self.vocab_ids),
            "context_length": self.context_length,
            "run_dir": str(self.rd.path),
        }
        export = {
            "state_dict": model.state_dict(),
            "model_cfg": self.model_cfg,
            "vocab_ids": self.vocab_ids,
            "train": summary,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_write(str(self.out), "wb") as f:
            torch.save(export, f)
        self.rd.write_summary(summary)
        return summary


def train_coca(
    cfg: TrainCocaConfig,
    out: str,
    log: Callable[[str], None] = print,
    run_dir: str | Path | None = None,
    preemption: Any = None,
) -> dict[str, Any]:
    """Train (resuming from ``<run_dir>/checkpoints/latest``) and save ``{"state_dict", "model_cfg",
    "vocab_ids", "train"}`` to ``out``; returns the summary. ``run_dir`` defaults to ``out`` without its suffix."""
    return CocaTrainer(cfg, out, run_dir, log, preemption).train()

"""Subnetwork search: iterative magnitude pruning (IMP) of the image encoder with a distillation loss only.

    summary = run_prune(PruneJobConfig(), "runs/prune")               # debug CLIP, synthetic world, CPU
    python -m jobs.prune --preset debug --backbone.checkpoint=runs/pretrain/export/final --run_dir=runs/prune
    python -m jobs.finetune --stage segmentation --backbone.checkpoint=... --optim.masks=runs/prune/masks.pt

OpenTrans ("Transferable and principled efficiency for open-vocabulary segmentation") finds a sparse
subnetwork of the CLIP image encoder without task labels ("semantic-agnostic") and then fine-tunes it in any
open-vocabulary segmentation framework. Here, each of ``prune.rounds`` (t) rounds:

1. sets the student's weights: the pretrained ones (``prune.rewind = "pretrained"``, lottery-ticket rewinding
   to the pretrained point, as IMP on pretrained networks does) or those the previous round ended with
   (``"none"``), and applies the current masks (:func:`pipeline.model.sparsity.apply_masks`: masked weights are
   zero and stay zero);
2. trains the masked student for ``prune.steps_per_round`` steps of AdamW (a fresh optimizer each round) on
   the distillation loss alone - towards the frozen, unpruned starting encoder (the teacher) on the same
   images: ``1 - cos`` per patch token of the dense CLIP-space features (``ln_post`` + projection on every
   token) averaged over tokens, plus ``1 - cos`` of the pooled image embeddings. No labels are read;
3. removes the ``prune.ratio`` (p) share of the still-kept prunable weights with the smallest magnitude,
   over all blocks together (``prune.scope = "global"``) or within each weight matrix (``"layer"``).

After t rounds the density is ``(1 - p)^t``. The rewinding rule is my reading of the paper's IMP (the
lottery-ticket procedure for pretrained networks); its text was not available while writing this, so check
``rewind`` against it before a paper-matching run.

Run directory: ``config.toml``; ``metrics.jsonl`` (``round``, ``loss`` per logged step); ``rounds/<r>/masks.pt``
+ ``masks.json`` (sha256, densities) for each finished round, and ``rounds/<r>/visual.pt`` (the masked student
weights) with ``rewind = "none"``; at the end ``masks.pt`` + ``masks.json`` (the final masks) and
``summary.json`` (``per_round`` density and loss, FLOPs of one distillation step dense and at the final
density). A rerun resumes after the last finished round (rounds are the unit: a round cut short is redone
from its start, and its batches are a pure function of ``(train.seed, round, step)``, so the masks come out
the same). Fine-tuning applies the masks with ``optim.masks`` (any stage, :class:`FinetuneTrainer`);
with ``rewind = "pretrained"`` start it from the same pretrained checkpoint, with ``"none"`` from
``<run>/visual.pt``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dist import resolve_device
from pipeline.finetune.common import (
    FinetuneOptimConfig,
    StepBatchSampler,
    build_optimizer,
    sample_seed,
    to_device,
)
from pipeline.finetune.datasets import DataConfig, build_datasets, collate
from pipeline.model.backbone import BackboneConfig, ViTBackbone, build_backbone
from pipeline.model.sparsity import (
    apply_masks,
    density,
    flop_densities,
    full_masks,
    load_masks,
    magnitude_prune,
    save_masks,
)
from pipeline.run_dir import RunDir
from pipeline.train.flops import count_training_flops
from pipeline.train.state import Preempted


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.2
    """p: share of the still-kept prunable weights removed per round."""
    rounds: int = 2
    """t: rounds of train-then-prune; the final density is (1 - p)^t."""
    scope: Literal["global", "layer"] = "global"
    """Rank magnitudes over all prunable matrices together, or within each matrix."""
    rewind: Literal["pretrained", "none"] = "pretrained"
    """Start each round from the pretrained weights (lottery-ticket rewinding) or from the previous round's."""
    steps_per_round: int = 10
    """Distillation steps in each round before pruning."""

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio: must be in (0, 1), got {self.ratio}")
        if self.rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {self.rounds}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope: must be global or layer, got {self.scope!r}")
        if self.rewind not in ("pretrained", "none"):
            raise ValueError(f"rewind: must be pretrained or none, got {self.rewind!r}")
        if self.steps_per_round < 0:
            raise ValueError(f"steps_per_round: must be >= 0, got {self.steps_per_round}")


@dataclass(frozen=True)
class PruneTrainConfig:
    batch_size: int = 8
    """Images per distillation step."""
    seed: int = 0
    """Seed of the data order (per round) and of model-side randomness."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", ..."""
    log_every: int = 5
    """Append the loss to metrics.jsonl every this many steps (and at each round's last step)."""
    stop_after_round: int = 0
    """Stop after this round as if preempted (0 = never); used to test resumption."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class PruneJobConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The pretrained image encoder: the teacher, and the student's starting (and rewinding) point."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """p, t, scope, rewinding, steps per round."""
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train=32, num_val=1))
    """Images (only the images are read; the synthetic world by default)."""
    optim: FinetuneOptimConfig = field(
        default_factory=lambda: FinetuneOptimConfig(lr=1e-4, weight_decay=0.05)
    )
    """AdamW of each round (fresh per round)."""
    train: PruneTrainConfig = field(default_factory=PruneTrainConfig)
    """Batch size, seed, device, logging, stop_after_round."""


class DistillPair(nn.Module):
    """The masked student and the frozen teacher, so one traced forward counts both for the FLOPs."""

    def __init__(self, student: ViTBackbone, teacher: ViTBackbone) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return feature_distill_loss(self.student, self.teacher, images)


def feature_distill_loss(student: ViTBackbone, teacher: ViTBackbone, images: torch.Tensor) -> torch.Tensor:
    """Label-free distillation: mean ``1 - cos`` of the dense CLIP-space tokens plus ``1 - cos`` of the pooled
    image embeddings, student against the frozen teacher on the same images."""
    s = student.forward_all(images)
    with torch.no_grad():
        t = teacher.forward_all(images)
    dense = 1 - F.cosine_similarity(s["dense"], t["dense"], dim=1).mean()
    pooled = 1 - F.cosine_similarity(s["pooled"], t["pooled"], dim=-1).mean()
    return dense + pooled


def finished_rounds(run_dir: Path) -> int:
    """The last round whose masks (written last in a round) are complete, 0 for none."""
    done = [
        int(p.parent.name)
        for p in (run_dir / "rounds").glob("*/masks.json")
        if p.parent.name.isdigit() and (p.parent / "masks.pt").is_file()
    ]
    return max(done, default=0)


def run_prune(cfg: PruneJobConfig, run_dir: str | Path) -> dict[str, Any]:
    """Iterative magnitude pruning (module docstring); returns (and writes) summary.json."""
    rd = RunDir(run_dir)
    done = rd.read_summary()
    if done is not None and done.get("status") == "complete":
        return done
    log = rd.logger("prune")
    rd.write_config(cfg)
    started = time.time()
    pcfg, tcfg = cfg.prune, cfg.train
    device = resolve_device(tcfg.device)
    train_set, _ = build_datasets(cfg.data, "classification")
    student = build_backbone(cfg.backbone).to(device)
    pair = DistillPair(student, copy.deepcopy(student))
    pretrained = {k: v.detach().clone() for k, v in student.state_dict().items()}
    masks = full_masks(student)
    start = finished_rounds(rd.path)
    if start:
        masks = load_masks(rd.path / "rounds" / str(start) / "masks.pt")
        if pcfg.rewind == "none":
            student.visual.load_state_dict(
                torch.load(rd.path / "rounds" / str(start) / "visual.pt", weights_only=True)
            )
        log.info("resuming after round %d (density %.4f)", start, density(masks))
    rd.truncate_metrics_after(start * pcfg.steps_per_round)
    for r in range(start + 1, pcfg.rounds + 1):
        if pcfg.rewind == "pretrained" or r == 1:
            student.load_state_dict(pretrained)
        apply_masks(student, masks)
        losses = train_round(pair, train_set, cfg, r, rd)
        masks = magnitude_prune(student, masks, pcfg.ratio, pcfg.scope)
        folder = rd.path / "rounds" / str(r)
        if pcfg.rewind == "none":
            apply_masks(student, masks)
            save_visual(student, folder / "visual.pt")
        save_masks(masks, folder / "masks.pt", {"round": r, "final_loss": losses[-1] if losses else None})
        log.info("round %d: density %.4f, last loss %s", r, density(masks), losses[-1] if losses else None)
        if r == tcfg.stop_after_round and r < pcfg.rounds:
            raise Preempted(f"prune stopped after round {r}")
    return finish(cfg, rd, pair, masks, train_set, started)


def train_round(pair: DistillPair, train_set: Any, cfg: PruneJobConfig, r: int, rd: RunDir) -> list[float]:
    """``steps_per_round`` AdamW steps of the distillation loss on the masked student; the logged losses."""
    pcfg, tcfg = cfg.prune, cfg.train
    device = next(pair.student.parameters()).device
    optimizer = build_optimizer(pair.student, cfg.optim)
    sampler = StepBatchSampler(
        len(train_set), tcfg.batch_size, sample_seed(tcfg.seed, r, 0), 0, pcfg.steps_per_round
    )
    pair.student.train()
    losses = []
    for step in range(1, pcfg.steps_per_round + 1):
        torch.manual_seed(sample_seed(tcfg.seed, r, step))
        batch = to_device(collate([train_set[k] for k in sampler.batch(step)]), device)
        loss = pair(batch["image"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"prune: loss became {loss.item()} in round {r}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(pair.student.parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        losses.append(loss.item())
        if step % tcfg.log_every == 0 or step == pcfg.steps_per_round:
            rd.log({"round": r, "loss": loss.item()}, (r - 1) * pcfg.steps_per_round + step)
    return losses


def save_visual(student: ViTBackbone, path: Path) -> None:
    """The student's image tower (``visual.*`` keys stripped, the export format ``backbone.checkpoint`` reads)."""
    from pipeline import io

    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(str(path)) as f:
        torch.save({k: v.detach().cpu() for k, v in student.visual.state_dict().items()}, f)


def finish(
    cfg: PruneJobConfig,
    rd: RunDir,
    pair: DistillPair,
    masks: dict[str, torch.Tensor],
    train_set: Any,
    started: float,
) -> dict[str, Any]:
    pcfg = cfg.prune
    rounds = []
    for r in range(1, pcfg.rounds + 1):
        manifest = json.loads((rd.path / "rounds" / str(r) / "masks.json").read_text())
        rounds.append({"round": r, "density": manifest["density"], "final_loss": manifest.get("final_loss")})
    info = {"rounds": pcfg.rounds, "ratio": pcfg.ratio, "scope": pcfg.scope, "rewind": pcfg.rewind}
    sha = save_masks(masks, rd.path / "masks.pt", info)
    if pcfg.rewind == "none":
        save_visual(pair.student, rd.path / "visual.pt")
    # FLOPs of one distillation step: dense, and with the final masks (forward dC, backward (1 + d)C).
    device = next(pair.student.parameters()).device
    images = to_device(
        collate([train_set[(i, None)] for i in range(min(len(train_set), cfg.train.batch_size))]), device
    )
    apply_masks(pair.student, masks)
    sparse = count_training_flops(pair, lambda: pair(images["image"]), densities=flop_densities(pair))
    dense = count_training_flops(pair, lambda: pair(images["image"]))
    pair.zero_grad(set_to_none=True)
    summary = {
        "status": "complete",
        "per_round": rounds,
        "density": density(masks),
        "expected_density": (1 - pcfg.ratio) ** pcfg.rounds,
        "masks": str(rd.path / "masks.pt"),
        "masks_sha256": sha,
        "flops": {"dense": dense, "sparse": sparse},
        "wall_s_last_session": round(time.time() - started, 3),
        **info,
    }
    rd.write_summary(summary)
    return summary

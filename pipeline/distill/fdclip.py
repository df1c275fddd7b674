"""FD-CLIP's pieces: a frozen CLIP teacher, a fresh student image tower, whitened targets, the token loss.

    teacher, model_cfg = build_teacher(TeacherConfig(checkpoint="runs/pretrain/export/final"))
    student = build_student(teacher, model_cfg, StudentConfig(position="shared_rpb"))
    target = teacher_targets(teacher_backbone, images)        # LayerNorm (no affine) of the final tokens
    loss = feature_loss(student(images), target, LossConfig())

Feature distillation (Wei et al. 2022, "Contrastive learning rivals masked image modeling in fine-tuning via
feature distillation", used by FD-CLIP): the student sees the same image as the teacher and regresses the
teacher's *whitened* output tokens, i.e. the final block's tokens (class token and every patch, before
``ln_post`` and the projection) passed through a LayerNorm without affine parameters, so every token has zero
mean and unit variance over channels. The loss is token-level on every token: smooth L1 (FD's choice; ``mse``
is the alternative), averaged over tokens and channels. The student's own final tokens go through a linear
projection head (``student.head``; dropped at export) to the teacher's width.

The student is the teacher's architecture with random weights and one of three position encodings
(``student.position``): ``shared_rpb``, one relative position bias table shared by every block (BEiT; FD's
best), ``rpb``, one table per block, or ``ape``, open_clip's absolute position embedding. With a relative
bias the absolute embedding is zeroed and frozen, so position comes from the bias alone; such a tower is no
longer an open_clip ``VisionTransformer`` (see :func:`open_clip_state_dict`), but every fine-tuning stage
loads it (``pipeline.model.backbone`` installs the bias from the checkpoint's keys).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.backbone import (
    BackboneConfig,
    ViTBackbone,
    build_clip_model,
    install_rel_pos_bias,
    model_config_for,
    resolve_checkpoint,
)

Position = Literal["shared_rpb", "rpb", "ape"]


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    model: str = "debug"
    """open_clip architecture of the teacher (ignored when an ``open_clip_config.json`` lies beside
    ``checkpoint``, as in this project's exports)."""
    checkpoint: str = ""
    """Teacher weights: an export folder of this project (``<run>/export/final``, a distill export, ...) or any
    open_clip CLIP checkpoint file (.pt / .bin / .safetensors). "" with ``pretrained`` "" = random weights
    (tests)."""
    pretrained: str = ""
    """An open_clip pretrained tag for ``model`` (e.g. ``laion2b_s34b_b88k``; downloads from the hub, so only
    where that is allowed). Exclusive with ``checkpoint``. OpenAI's weights need the QuickGELU architecture
    (``model = "ViT-B-16-quickgelu"``, tag ``openai``), so that the exported config matches them."""
    seed: int = 0
    """Seed of the random teacher (both empty)."""

    def __post_init__(self) -> None:
        if self.checkpoint and self.pretrained:
            raise ValueError("checkpoint / pretrained: give one teacher source, not both")


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    position: Position = "shared_rpb"
    """Position encoding of the student: ``shared_rpb`` (one relative position bias shared by all blocks,
    BEiT-style), ``rpb`` (one per block) or ``ape`` (open_clip's absolute position embedding; the only one
    plain open_clip can load)."""
    head: Literal["linear", "none"] = "linear"
    """Projection from the student's final tokens to the teacher's width (FD: a linear layer); ``none``
    regresses the tokens directly."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the student (block i of L drops with rate * i / (L - 1))."""
    seed: int = 1
    """Seed of the student's random initialisation (differs from the random teacher's ``teacher.seed`` = 0,
    whose image tower the same seed would reproduce)."""

    def __post_init__(self) -> None:
        if self.position not in ("shared_rpb", "rpb", "ape"):
            raise ValueError(f"position: must be shared_rpb, rpb or ape, got {self.position!r}")
        if self.head not in ("linear", "none"):
            raise ValueError(f"head: must be linear or none, got {self.head!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: Literal["smooth_l1", "mse"] = "smooth_l1"
    """Token-level regression loss: smooth L1 (FD) or mean squared error."""
    beta: float = 2.0
    """Smooth L1's transition point between the quadratic and the linear part."""

    def __post_init__(self) -> None:
        if self.kind not in ("smooth_l1", "mse"):
            raise ValueError(f"kind: must be smooth_l1 or mse, got {self.kind!r}")
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")


# -------------------------------------------------------------------------------------------- models


def build_teacher(cfg: TeacherConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher CLIP (eval mode, no gradients) and its open_clip ``model_cfg``."""
    if cfg.pretrained:
        model_cfg = open_clip.get_model_config(cfg.model)
        if model_cfg is None:
            raise ValueError(f"teacher.model: unknown open_clip architecture {cfg.model!r}")
        model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained)
    else:
        checkpoint = resolve_checkpoint(cfg.checkpoint, need_text=True) if cfg.checkpoint else ""
        if checkpoint and not Path(checkpoint).is_file():
            raise ValueError(f"teacher.checkpoint: no file at {cfg.checkpoint!r}")
        backbone_cfg = BackboneConfig(model=cfg.model, checkpoint=checkpoint, seed=cfg.seed)
        model_cfg = model_config_for(backbone_cfg)
        model = build_clip_model(backbone_cfg)
    model.eval().requires_grad_(False)
    return model, dict(model_cfg)


def grid_size(visual: nn.Module) -> tuple[int, int]:
    return int(visual.grid_size[0]), int(visual.grid_size[1])


def build_student(teacher: nn.Module, model_cfg: dict[str, Any], cfg: StudentConfig) -> nn.Module:
    """A whole CLIP: the teacher's text tower (a copy) and a freshly initialised image tower of the same
    architecture with ``cfg.position``'s position encoding. Only ``student.visual`` is trained."""
    vision_cfg = open_clip.model.CLIPVisionCfg(**model_cfg["vision_cfg"])
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        visual = open_clip.model._build_vision_tower(
            model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False)
        )
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ValueError(
            "teacher.model: feature distillation needs an open_clip VisionTransformer image tower"
        )
    if cfg.position != "ape":
        install_rel_pos_bias(visual, "shared" if cfg.position == "shared_rpb" else "block", grid_size(visual))
        with torch.no_grad():
            visual.positional_embedding.zero_()
        visual.positional_embedding.requires_grad_(False)
    student.visual = visual.to(next(teacher.parameters()).device)
    student.requires_grad_(False)
    for name, p in visual.named_parameters():
        p.requires_grad_(name != "positional_embedding" or cfg.position == "ape")
    return student


class FDStudent(nn.Module):
    """What distillation trains: the student tower (as a :class:`ViTBackbone`) and the projection head."""

    def __init__(self, visual: nn.Module, teacher_width: int, cfg: StudentConfig) -> None:
        super().__init__()
        self.backbone = ViTBackbone(visual, drop_path_rate=cfg.drop_path_rate)
        width = self.backbone.width
        if cfg.head == "none" and width != teacher_width:
            raise ValueError(
                f"student.head: 'none' needs equal widths (student {width}, teacher {teacher_width}); use 'linear'"
            )
        with torch.random.fork_rng(devices=[]):  # a seeded head: the same start in every process
            torch.manual_seed(cfg.seed)
            self.head = nn.Linear(width, teacher_width) if cfg.head == "linear" else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> the predicted whitened teacher tokens, B x (1 + h*w) x teacher width."""
        tokens, _ = self.backbone._tokens(images, set())
        return self.head(tokens)


@torch.no_grad()
def teacher_targets(teacher: ViTBackbone, images: torch.Tensor) -> torch.Tensor:
    """The teacher's final tokens (class token + every patch), whitened: LayerNorm without affine."""
    tokens, _ = teacher._tokens(images, set())
    return F.layer_norm(tokens.float(), tokens.shape[-1:])


def feature_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Token-level regression of every token and channel (mean)."""
    pred = pred.float()
    if cfg.kind == "mse":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=cfg.beta)


# --------------------------------------------------------------------------------- open_clip export


def open_clip_state_dict(export_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full CLIP state dict of a distill export for plain open_clip (``create_model`` of the export's
    architecture + ``load_state_dict(strict=True)``). A relative-position student cannot be represented by
    open_clip's ``VisionTransformer``: that raises a ValueError naming ``student.position``."""
    import json

    out = Path(export_dir)
    manifest = json.loads((out / "export.json").read_text())
    position = manifest.get("student_position", "ape")
    if position != "ape":
        raise ValueError(
            f"student.position = {position!r}: open_clip's VisionTransformer has no relative position bias, so "
            f"{out} cannot be exported to open_clip; distill with student.position = 'ape' for an "
            "open_clip-loadable student (every fine-tuning stage of this project loads either)"
        )
    return torch.load(out / manifest["weights"], map_location="cpu", weights_only=True)

"""Export trained weights as open_clip checkpoints, plus the image tower alone for fine-tuning.

    <out>/open_clip_pytorch_model.bin   the full CLIP state dict (fp32), what open_clip's loaders read
    <out>/open_clip_config.json         model + preprocessing config (for ``local-dir:<out>``)
    <out>/<model name>.json             the architecture, for ``open_clip.add_model_config``
    <out>/visual.pt                     the image tower's state dict (keys without ``visual.``)
    <out>/export.json                   what is where: model name, files, step, which weights

Loading the export with stock open_clip:

    import open_clip
    open_clip.add_model_config("<out>/debug.json")            # only for architectures open_clip lacks
    model, _, preprocess = open_clip.create_model_and_transforms("debug", pretrained="<out>/open_clip_pytorch_model.bin")
    # or, with no registration at all:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<out>")

The image tower alone: ``open_clip.create_model(name, pretrained_image_path="<out>/visual.pt")`` or
``model.visual.load_state_dict(torch.load("<out>/visual.pt", weights_only=True))``. When the run changed the
image size or context length, the model name gets a suffix (``ViT-B-16-i256-c64``) so that the registered
config is the architecture that was trained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from pipeline import io
from pipeline.model.clip import ModelConfig, open_clip_config

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
VISUAL_FILE = "visual.pt"


def export_name(cfg: ModelConfig) -> str:
    """The open_clip model name the export registers (the architecture name, suffixed when changed)."""
    suffix = (f"-i{cfg.image_size}" if cfg.image_size else "") + (
        f"-c{cfg.context_length}" if cfg.context_length else ""
    )
    return cfg.name + suffix


def _save(obj: Any, path: Path) -> None:
    with io.atomic_write(str(path), "wb") as f:
        torch.save(obj, f)


def export_open_clip(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    preprocess: dict[str, Any],
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``state_dict`` (full CLIP weights, as the trainer's model names them) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    if "logit_scale" in weights:  # stock open_clip models hold a 0-dim logit scale
        weights["logit_scale"] = weights["logit_scale"].reshape(())
    _save(weights, out / WEIGHTS_FILE)
    visual = {k[len("visual.") :]: v for k, v in weights.items() if k.startswith("visual.")}
    _save(visual, out / VISUAL_FILE)
    name = export_name(cfg)
    model_cfg = open_clip_config(dataclasses.replace(cfg, patch_dropout=0.0))  # a training-time regulariser
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()}
    io.write_json(str(out / f"{name}.json"), model_cfg)
    io.write_json(str(out / "open_clip_config.json"), {"model_cfg": model_cfg, "preprocess_cfg": pre})
    manifest = {
        "model_name": name,
        "architecture": cfg.name,
        "weights": WEIGHTS_FILE,
        "image_tower": VISUAL_FILE,
        "model_config": f"{name}.json",
        "params": int(sum(v.numel() for v in weights.values())),
        **(info or {}),
    }
    io.write_json(str(out / "export.json"), manifest)
    return out


def load_export(out_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """An export loaded back through stock open_clip (for checks and downstream jobs): (model, preprocess)."""
    import open_clip

    out = Path(out_dir)
    manifest = json.loads((out / "export.json").read_text())
    open_clip.add_model_config(out / manifest["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        manifest["model_name"], pretrained=str(out / manifest["weights"]), device=device
    )
    return model, preprocess

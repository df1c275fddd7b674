"""The image encoder every fine-tuning stage starts from: an open_clip VisionTransformer with dense outputs.

    backbone = build_backbone(BackboneConfig(model="debug", checkpoint="runs/pretrain/export/visual.pt"))
    maps = backbone.forward_features(images)   # list of B x C x h x w maps, one per ``out_indices`` block
    dense = backbone.forward_dense(images)     # B x D x h x w patch embeddings in the CLIP embedding space

Weights come from (a) an exported image tower (a state dict of ``model.visual``), (b) any open_clip
checkpoint of the whole CLIP (keys ``visual.*``; ``state_dict`` / ``module.`` wrappers and ``.safetensors``
are handled), or (c) a seeded random initialisation (the baseline), chosen by ``BackboneConfig.checkpoint``.
The architecture comes from ``BackboneConfig.model`` (an open_clip name, including our ``debug`` size) or
from an ``open_clip_config.json`` beside the checkpoint. Position embeddings are interpolated when the
fine-tuning resolution differs from the pretraining one.

Stochastic depth (drop-path) is injected into the residual branches of every block with forward hooks, so
parameter names stay those of open_clip and checkpoints load unchanged. :meth:`ViTBackbone.layer_id` gives
each parameter its depth for layer-wise learning-rate decay (patch embedding 0, block ``i`` -> ``i + 1``,
final norm / projection / anything outside the backbone ``num_layers + 1``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

import pipeline.model.clip  # noqa: F401  (registers our architectures, e.g. "debug", with open_clip)


@dataclass(frozen=True)
class BackboneConfig:
    model: str = "debug"
    """open_clip architecture of the image tower (``open_clip.list_models()``; ``debug`` is our tiny 64 px one).
    Ignored when an ``open_clip_config.json`` lies beside ``checkpoint`` (the exporter writes one)."""
    checkpoint: str = ""
    """Weights: a pretraining export folder (``<run>/export/final``), an exported image tower (visual.pt),
    any open_clip CLIP checkpoint (.pt / .bin / .safetensors), or "" for a random initialisation."""
    image_size: int = 0
    """Fine-tuning input resolution in pixels; 0 keeps the architecture's own (position embeddings are
    interpolated when it differs from the checkpoint's)."""
    out_indices: tuple[int, ...] = ()
    """Blocks (0-based, negative counts from the end) whose outputs ``forward_features`` returns; () = four
    evenly spaced blocks ending with the last (ViT-B: 2, 5, 8, 11)."""
    drop_path_rate: float = 0.0
    """Stochastic depth: block ``i`` of ``L`` drops its residual branches with probability rate * i / (L - 1)."""
    seed: int = 0
    """Seed of the random initialisation (used when ``checkpoint`` is empty)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward (less memory, more compute)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")
        if self.image_size < 0:
            raise ValueError(f"image_size: must be >= 0, got {self.image_size}")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``p`` and rescale the rest (stochastic depth)."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class _DropPathHook:
    """Forward hook on a block's ``ls_1`` / ``ls_2`` (the last op of each residual branch)."""

    def __init__(self, block: nn.Module, p: float) -> None:
        self.block = block
        self.p = p

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return drop_path(output, self.p, self.block.training)


def default_out_indices(num_layers: int, num_levels: int = 4) -> tuple[int, ...]:
    """Evenly spaced blocks ending with the last one: 12 -> (2, 5, 8, 11), 4 -> (0, 1, 2, 3), 3 -> (0, 1, 1, 2)."""
    return tuple(max(0, round((k + 1) * num_layers / num_levels) - 1) for k in range(num_levels))


class ViTBackbone(nn.Module):
    """An open_clip ``VisionTransformer`` (kept as ``self.visual``) with multi-level dense outputs."""

    def __init__(
        self, visual: nn.Module, out_indices: tuple[int, ...] = (), drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError("model: only open_clip VisionTransformer image towers are supported")
        self.visual = visual
        self.num_layers = len(visual.transformer.resblocks)
        self.width = visual.transformer.width
        self.patch_size = int(visual.patch_size[0])
        self.embed_dim = int(visual.output_dim)
        indices = out_indices or default_out_indices(self.num_layers)
        resolved = []
        for i in indices:
            j = i + self.num_layers if i < 0 else i
            if not 0 <= j < self.num_layers:
                raise ValueError(f"out_indices: block {i} outside a {self.num_layers}-block tower")
            resolved.append(j)
        self.out_indices = tuple(resolved)
        self.drop_path_rate = drop_path_rate
        self._hooks = []
        if drop_path_rate > 0:
            for i, block in enumerate(visual.transformer.resblocks):
                p = drop_path_rate * i / max(1, self.num_layers - 1)
                for name in ("ls_1", "ls_2"):
                    self._hooks.append(getattr(block, name).register_forward_hook(_DropPathHook(block, p)))

    @property
    def out_channels(self) -> list[int]:
        return [self.width] * len(self.out_indices)

    def _tokens(self, x: torch.Tensor, take: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the tower; return the final token sequence (B x 1+N x C) and the outputs of blocks in ``take``."""
        visual = self.visual
        x = visual._embeds(x)
        saved: dict[int, torch.Tensor] = {}
        for i, block in enumerate(visual.transformer.resblocks):
            if visual.transformer.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                saved[i] = x
        return x, saved

    def _to_map(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, hw[0], hw[1])

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """B x 3 x H x W -> one B x width x H/p x W/p map per entry of ``out_indices``."""
        _, saved = self._tokens(x, set(self.out_indices))
        hw = self.grid(x)
        return [self._to_map(saved[i], hw) for i in self.out_indices]

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens (B x L x C) -> ``ln_post`` and the CLIP projection (B x L x D)."""
        y = self.visual.ln_post(tokens)
        if self.visual.proj is not None:
            y = y @ self.visual.proj
        return y

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings in the CLIP image-text space: B x D x H/p x W/p (ln_post + proj on every token)."""
        tokens, _ = self._tokens(x, set())
        return self._to_map(self.project_tokens(tokens), self.grid(x))

    def forward_all(self, x: torch.Tensor) -> dict[str, Any]:
        """One pass giving ``features`` (multi-level maps), ``dense`` (B x D x h x w) and ``pooled`` (B x D)."""
        tokens, saved = self._tokens(x, set(self.out_indices))
        hw = self.grid(x)
        projected = self.project_tokens(tokens)
        return {
            "features": [self._to_map(saved[i], hw) for i in self.out_indices],
            "dense": self._to_map(projected, hw),
            "pooled": self.pooled_from_tokens(tokens),
        }

    def pooled_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def forward_pooled(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        """The image embedding (B x D), or the pooled pre-projection token (B x width) when ``project=False``."""
        tokens, _ = self._tokens(x, set())
        if project:
            return self.pooled_from_tokens(tokens)
        pooled, _ = self.visual._pool(tokens)
        return pooled

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x)

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` (relative to this module) for layer-wise lr decay."""
        name = name.removeprefix("visual.")
        if name.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")):
            return 0
        if name.startswith("transformer.resblocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1


# ----------------------------------------------------------------------------------------- loading


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``weights_only`` load); unwraps ``state_dict`` / ``model`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint: {str(path)!r} does not hold a state dict of tensors")
    state = _strip(_strip(dict(obj), "module."), "_orig_mod.")
    return state


def visual_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image-tower part of a CLIP state dict (keys ``visual.*``), or the dict itself if it is one."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def resolve_checkpoint(path: str, need_text: bool = False) -> str:
    """A checkpoint file from ``path``: the file itself, or inside an export folder (``export.json``) the
    image tower (``visual.pt``) or, when the text tower is needed too, the full CLIP weights."""
    p = Path(path)
    if not p.is_dir():
        return path
    manifest = json.loads((p / "export.json").read_text()) if (p / "export.json").is_file() else {}
    names = [] if need_text else [manifest.get("image_tower", "visual.pt")]
    names += [manifest.get("weights", "open_clip_pytorch_model.bin"), "open_clip_model.safetensors"]
    for name in names:
        if (p / name).is_file():
            return str(p / name)
    raise ValueError(f"checkpoint: no weights file in folder {path!r} (expected one of {names})")


def model_config_for(cfg: BackboneConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` for ``cfg``: from ``open_clip_config.json`` beside the checkpoint, or by name."""
    if cfg.checkpoint:
        side = Path(cfg.checkpoint).parent / "open_clip_config.json"
        if side.is_file():
            body = json.loads(side.read_text())
            return dict(body.get("model_cfg", body))
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(f"model: unknown open_clip architecture {cfg.model!r}; see open_clip.list_models()")
    return model_cfg


def _resize_pos_embed(state: dict[str, torch.Tensor], visual: nn.Module) -> dict[str, torch.Tensor]:
    wrapped = {"visual." + k: v for k, v in state.items()}
    open_clip.model.resize_pos_embed(wrapped, _VisualHolder(visual))
    return {k[len("visual.") :]: v for k, v in wrapped.items()}


class _VisualHolder:
    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual


def build_clip_model(cfg: BackboneConfig, load_weights: bool = True) -> nn.Module:
    """The whole open_clip CLIP (image + text towers), for stages that need text embeddings."""
    if cfg.checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint, need_text=True))
    model_cfg = model_config_for(cfg)
    if cfg.image_size:
        model_cfg["vision_cfg"] = dict(model_cfg["vision_cfg"], image_size=cfg.image_size)
    cls = open_clip.model.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.model.CLIP
    if "hf_model_name" in model_cfg.get("text_cfg", {}) or "text_cfg" not in model_cfg:
        raise ValueError("model: the text-guided stages need an open_clip CLIP with a built-in text tower")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = cls(**model_cfg)
    if load_weights and cfg.checkpoint:
        state = read_state_dict(cfg.checkpoint)
        if not any(k.startswith("visual.") for k in state):
            raise ValueError(
                f"checkpoint: {cfg.checkpoint!r} holds only an image tower; this stage needs the whole CLIP"
            )
        state = {
            "visual." + k: v for k, v in _resize_pos_embed(visual_state_dict(state), model.visual).items()
        } | {k: v for k, v in state.items() if not k.startswith("visual.")}
        if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "logit_bias"]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint: {cfg.checkpoint!r} does not match architecture {cfg.model!r} "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
    return model


def build_visual(cfg: BackboneConfig) -> nn.Module:
    """The open_clip image tower alone, with weights from ``cfg.checkpoint`` (or random)."""
    if cfg.checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=resolve_checkpoint(cfg.checkpoint))
    model_cfg = model_config_for(cfg)
    vision_cfg = dict(model_cfg["vision_cfg"])
    if cfg.image_size:
        vision_cfg["image_size"] = cfg.image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        visual = open_clip.model._build_vision_tower(
            model_cfg["embed_dim"],
            open_clip.model.CLIPVisionCfg(**vision_cfg),
            model_cfg.get("quick_gelu", False),
        )
    if cfg.checkpoint:
        state = _resize_pos_embed(visual_state_dict(read_state_dict(cfg.checkpoint)), visual)
        missing, unexpected = visual.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint: {cfg.checkpoint!r} does not match architecture {cfg.model!r} "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]}); set backbone.model to its architecture"
            )
    return visual


def build_backbone(cfg: BackboneConfig, visual: nn.Module | None = None) -> ViTBackbone:
    """A :class:`ViTBackbone` from ``cfg`` (or around an already built tower ``visual``)."""
    visual = visual if visual is not None else build_visual(cfg)
    backbone = ViTBackbone(visual, cfg.out_indices, cfg.drop_path_rate)
    if cfg.grad_checkpointing:
        visual.set_grad_checkpointing(True)
    return backbone


def resize_like(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize of a B x C x h x w map (align_corners=False, as mmseg does)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)

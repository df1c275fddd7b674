"""Weight masks of a sparse image-encoder subnetwork: choose them by magnitude, save / load them, hold them.

    masks = magnitude_prune(backbone, masks, ratio=0.2, scope="global")   # one round of magnitude pruning
    save_masks(masks, "runs/prune/masks.pt", info)                       # + masks.json (sha256, densities)
    handle = apply_masks(backbone, load_masks("runs/prune/masks.pt"))     # zero now and during training

The prunable weights are the 2-d weight matrices of the transformer blocks of a
:class:`pipeline.model.backbone.ViTBackbone` (per block: attention ``in_proj_weight`` and ``out_proj.weight``,
MLP ``c_fc.weight`` and ``c_proj.weight``): the linear layers, where the FLOPs are. The patch embedding,
position / class embeddings, norms, biases and the CLIP projection stay dense (lottery-ticket practice for
transformers). Masks are boolean tensors keyed by the parameter's name inside the backbone.

:func:`apply_masks` keeps masked weights at exactly zero while the backbone trains, two ways: each masked
parameter's gradient is multiplied by its mask (a tensor hook, so AdamW's moments of a masked entry stay 0
and its update is 0; decoupled weight decay keeps a 0 at 0), and a forward pre-hook multiplies the weights by
their masks again before every forward of the tower (hooked on its patch embedding), so weights loaded or
changed outside the optimizer are re-masked.

FLOPs: a layer of density ``d`` costs forward ``dC`` and backward ``(1 + d)C`` (:mod:`pipeline.train.flops`);
:func:`flop_densities` gives the trainer's FLOPs count each module's density. The MLP's linear layers are
modules of their own; attention runs its projections inside ``nn.MultiheadAttention``, whose traced FLOPs also
hold the dense attention products, so its density is the FLOP-weighted mean over its parts for the token
count of the last forward (``in_proj`` 6TW^2 at the in-projection's density, ``out_proj`` 2TW^2 at its own,
and the two attention products 4T^2W at 1 where the FLOP counter counts the attention kernel - CUDA's, not
the fused CPU one), which keeps ``dC`` and ``(1 + d)C`` exact for the module's sum.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import io
from pipeline.train.checkpoint import file_sha256

BLOCK_PREFIX = "visual.transformer.resblocks."


def prunable_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of every prunable weight matrix (2-d weights of the transformer blocks)."""
    return {
        name: p for name, p in backbone.named_parameters() if name.startswith(BLOCK_PREFIX) and p.ndim == 2
    }


def full_masks(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """All-true masks (the dense network) for every prunable weight."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in prunable_parameters(backbone).items()}


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the prunable weights kept."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(1, total)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries (ties broken by position: a stable sort)."""
    return torch.sort(scores, stable=True).indices[:k]


@torch.no_grad()
def magnitude_prune(
    backbone: nn.Module,
    masks: Mapping[str, torch.Tensor],
    ratio: float,
    scope: Literal["global", "layer"] = "global",
) -> dict[str, torch.Tensor]:
    """One round of magnitude pruning: of the weights still kept by ``masks``, remove the ``ratio`` share
    with the smallest ``|w|`` - over all prunable matrices together (``global``) or within each matrix
    (``layer``). ``round(ratio * kept)`` weights go (ties broken by position)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio: must be in [0, 1), got {ratio}")
    params = prunable_parameters(backbone)
    if set(masks) != set(params):
        raise ValueError("masks: do not cover the backbone's prunable weights (another architecture?)")
    new = {name: m.clone().bool().cpu() for name, m in masks.items()}
    if scope == "layer":
        for name, p in params.items():
            keep = new[name].flatten()
            alive = torch.nonzero(keep)[:, 0]
            k = round(ratio * len(alive))
            scores = p.detach().abs().flatten().cpu()[alive]
            keep[alive[_smallest(scores, k)]] = False
            new[name] = keep.view_as(new[name])
        return new
    if scope != "global":
        raise ValueError(f"scope: must be global or layer, got {scope!r}")
    names = list(params)
    flat_keep = torch.cat([new[n].flatten() for n in names])
    flat_w = torch.cat([params[n].detach().abs().flatten().cpu().float() for n in names])
    alive = torch.nonzero(flat_keep)[:, 0]
    k = round(ratio * len(alive))
    flat_keep[alive[_smallest(flat_w[alive], k)]] = False
    out, start = {}, 0
    for n in names:
        size = new[n].numel()
        out[n] = flat_keep[start : start + size].view_as(new[n]).clone()
        start += size
    return out


# ---------------------------------------------------------------------------------------- files


def save_masks(
    masks: Mapping[str, torch.Tensor], path: str | Path, info: dict[str, Any] | None = None
) -> str:
    """Write ``masks`` to ``path`` (a torch file of bool tensors, atomic) and ``<stem>.json`` beside it with
    its sha256, the overall and per-matrix densities and ``info``. Returns the sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(str(path)) as f:
        torch.save({k: v.detach().bool().cpu().contiguous() for k, v in masks.items()}, f)
    sha = file_sha256(path)
    manifest = {
        "file": path.name,
        "sha256": sha,
        "density": density(masks),
        "densities": {k: float(v.float().mean()) for k, v in masks.items()},
        **(info or {}),
    }
    io.write_json(str(path.with_suffix(".json")), manifest)
    return sha


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Masks written by :func:`save_masks` (``torch.load(weights_only=True)``); the sha256 in the json beside
    the file is checked when there is one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"masks: no file at {str(path)!r}")
    side = path.with_suffix(".json")
    if side.is_file():
        want = json.loads(side.read_text()).get("sha256")
        if want and file_sha256(path) != want:
            raise ValueError(
                f"masks: {str(path)!r} does not match the sha256 in {side.name} (corrupt or replaced)"
            )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"masks: {str(path)!r} does not hold a dict of tensors")
    return {k: v.bool() for k, v in obj.items()}


# --------------------------------------------------------------------------------------- holding


class MaskHandle:
    """The hooks :func:`apply_masks` installed (``remove()`` takes them off) and the masks on the device."""

    def __init__(self, backbone: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.backbone = backbone
        self.masks = masks
        self.hooks: list[Any] = []
        self.tokens = 0
        """Token count of the last forward (for the attention modules' FLOP-weighted density)."""

    def __deepcopy__(self, memo: dict) -> MaskHandle:  # an EMA / eval copy of the model shares the masks
        return self

    def pairs(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        params = prunable_parameters(self.backbone)
        for name, mask in self.masks.items():
            p = params[name]
            if mask.device != p.device:  # the model moved (e.g. to the GPU) after the masks were applied
                mask = self.masks[name] = mask.to(p.device)
            yield p, mask

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero masked weights that are not zero (only those: an in-place write would bump the version of a
        weight that an earlier forward of the same step saved for its backward)."""
        pairs = list(self.pairs())
        if not pairs:
            return
        dirty = torch.stack([torch.where(mask, 0, p).ne(0).any() for p, mask in pairs]).tolist()  # one sync
        for (p, mask), bad in zip(pairs, dirty):
            if bad:
                p.mul_(mask.to(p.dtype))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def apply_masks(backbone: nn.Module, masks: Mapping[str, torch.Tensor], source: str = "masks") -> MaskHandle:
    """Zero the masked weights of ``backbone`` and keep them zero while it trains (module docstring).
    The handle is also kept as ``backbone.sparsity`` (:func:`flop_densities` reads it)."""
    params = prunable_parameters(backbone)
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"{source}: names not among the backbone's prunable weights: {unknown[:4]}")
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(mask.shape)}, the backbone's weight {tuple(params[name].shape)}"
            )
    previous = getattr(backbone, "sparsity", None)
    if previous is not None:
        previous.remove()
    handle = MaskHandle(backbone, {k: v.bool().to(params[k].device) for k, v in masks.items()})
    handle.reapply()
    for name in handle.masks:
        handle.hooks.append(
            params[name].register_hook(lambda g, name=name: g * handle.masks[name].to(g.dtype))
        )

    patch = int(backbone.visual.patch_size[0])

    def pre_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            handle.tokens = 1 + (x.shape[-2] // patch) * (x.shape[-1] // patch)
        handle.reapply()

    # On the patch embedding, the first module every forward path of the tower calls (the backbone's own
    # forward_* methods are plain calls, which module hooks do not see).
    handle.hooks.append(backbone.visual.conv1.register_forward_pre_hook(pre_forward))
    backbone.sparsity = handle  # a plain attribute: not a module, parameter or buffer
    return handle


def apply_mask_file(backbone: nn.Module, path: str) -> MaskHandle:
    """:func:`apply_masks` with the masks of file ``path`` (errors name ``optim.masks``)."""
    try:
        masks = load_masks(path)
    except ValueError as e:
        raise ValueError(f"optim.{e}") from None
    return apply_masks(backbone, masks, source="optim.masks")


class _Densities(Mapping):
    """Module -> density, resolved when looked up (after the traced forward has recorded the token count)."""

    def __init__(self, model: nn.Module) -> None:
        self.handles = [
            m.sparsity for m in model.modules() if isinstance(getattr(m, "sparsity", None), MaskHandle)
        ]
        self._cached: dict[nn.Module, float] | None = None

    def _table(self) -> dict[nn.Module, float]:
        if self._cached is None:
            self._cached = self._build()
        return self._cached

    def _build(self) -> dict[nn.Module, float]:
        out: dict[nn.Module, float] = {}
        for handle in self.handles:
            for block in handle.backbone.visual.transformer.resblocks:
                prefix = _prefix_of(handle.backbone, block)
                d = {
                    k[len(prefix) :]: float(m.float().mean())
                    for k, m in handle.masks.items()
                    if k.startswith(prefix)
                }
                for name in ("mlp.c_fc", "mlp.c_proj"):
                    if f"{name}.weight" in d:
                        out[block.get_submodule(name)] = d[f"{name}.weight"]
                t, w = max(handle.tokens, 1), block.attn.embed_dim
                parts = [
                    (6 * t * w * w, d.get("attn.in_proj_weight", 1.0)),
                    (2 * t * w * w, d.get("attn.out_proj.weight", 1.0)),
                ]
                if _attention_products_counted(block.attn.in_proj_weight.device):
                    parts.append((4 * t * t * w, 1.0))
                out[block.attn] = sum(c * x for c, x in parts) / sum(c for c, _ in parts)
        return out

    def __getitem__(self, module: nn.Module) -> float:
        return self._table()[module]

    def get(self, module: nn.Module, default: Any = None) -> Any:
        return self._table().get(module, default)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


@functools.cache
def _attention_products_counted(device: torch.device) -> bool:
    """Whether torch's FLOP counter has a formula for the attention kernel this device runs (the CUDA flash /
    memory-efficient kernels: yes; the fused CPU kernel: no), i.e. whether an attention module's traced FLOPs
    hold its two attention products or only its projections."""
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.zeros(1, 1, 4, 8, device=device)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    return counter.get_total_flops() > 0


def _prefix_of(backbone: nn.Module, block: nn.Module) -> str:
    for name, module in backbone.named_modules():
        if module is block:
            return name + "."
    raise AssertionError("block not in backbone")


def flop_densities(model: nn.Module) -> Mapping[nn.Module, float]:
    """Each masked module's weight density for ``pipeline.train.flops.count_training_flops(densities=...)``:
    MLP linears their mask's, attention modules the FLOP-weighted mean (module docstring). Looked up lazily,
    so the token count is that of the traced forward. Empty when nothing in ``model`` is masked."""
    return _Densities(model)

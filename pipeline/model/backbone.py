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

Relative position bias (BEiT; off unless a checkpoint holds one or windowed attention asks for it): a learned
scalar per head for every 2-D offset between two patches (plus three for class-token pairs), added to the
attention logits. :func:`install_rel_pos_bias` adds it to an open_clip tower, either ``shared`` (one table,
``visual.rel_pos_bias.*``, used by every block) or per ``block`` (``transformer.resblocks.<i>.attn.rel_pos_bias.*``);
the attention modules then run through :class:`BiasedSelfAttention` (same parameters, scaled-dot-product
attention with the bias), so ``visual(x)`` and every backbone method honour it. The table is trained at one
grid size and bilinearly interpolated (offset 0 stays at the centre) to any other window or grid. Checkpoints
holding these keys (the FD-CLIP students of ``python -m jobs.distill``) get the bias installed on load.

Windowed attention (ViTDet, Li et al. 2022; ``BackboneConfig.window_size``): every block except
``global_blocks`` attends only within non-overlapping ``window_size`` x ``window_size`` windows of the patch
grid (the grid is zero-padded to a multiple of the window; padded keys are masked out, where ViTDet lets
real tokens attend to the zero padding), and the class token is dropped after the position embedding, as
ViTDet does. A window never exceeds the grid, so a window covering the image is exactly global attention.
Relative position comes from the checkpoint's bias table, or, for a tower without one, from a new
zero-initialised per-block table (ViTDet adds zero-initialised relative positions too).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    window_size: int = 0
    """Windowed attention (ViTDet): blocks outside ``global_blocks`` attend within non-overlapping windows of
    this many patches per side (at most the grid); the class token is dropped. 0 = global attention everywhere."""
    global_blocks: tuple[int, ...] = ()
    """With ``window_size`` > 0: blocks (0-based, negative from the end) that keep global attention;
    () = four evenly spaced ending with the last (ViTDet's 2, 5, 8, 11 of ViT-B's 12)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")
        if self.image_size < 0:
            raise ValueError(f"image_size: must be >= 0, got {self.image_size}")
        if self.window_size < 0:
            raise ValueError(f"window_size: must be >= 0 (0 = global attention), got {self.window_size}")


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


# ------------------------------------------------------------------------ relative position / windows


def _grid_of(size: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(h, w) a ``(heads, 2h - 1, 2w - 1)`` table was trained for."""
    return (int(size[-2]) + 1) // 2, (int(size[-1]) + 1) // 2


@functools.lru_cache(maxsize=16)
def _relative_index(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Flat index into a ``2h-1 x 2w-1`` offset table for every (query, key) pair of an ``h x w`` grid."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ((ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + xs[:, None] - xs[None, :] + w - 1).reshape(-1)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias: ``embedding`` holds one scalar per head for each 2-D offset between two
    patches of an ``h`` x ``w`` grid (``heads x 2h-1 x 2w-1``), ``cls_embedding`` three more per head (class
    token -> patch, patch -> class token, class token -> itself). Zero-initialised, as BEiT's. The names say
    "embedding" so the optimizer toolkit gives them no weight decay (BEiT's ``no_weight_decay``)."""

    def __init__(self, num_heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_heads, 2 * grid[0] - 1, 2 * grid[1] - 1))
        self.cls_embedding = nn.Parameter(torch.zeros(num_heads, 3))

    def forward(self, hw: tuple[int, int], with_cls: bool) -> torch.Tensor:
        """The additive bias (heads x L x L) for an ``hw`` grid of patches (row-major), ``L = h*w (+ 1)``."""
        h, w = hw
        table = self.embedding
        if tuple(table.shape[-2:]) != (2 * h - 1, 2 * w - 1):  # offset 0 stays at the centre
            table = F.interpolate(
                table[None], size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=True
            )[0]
        n = h * w
        bias = table.flatten(1)[:, _relative_index(h, w, table.device)].view(-1, n, n)
        if not with_cls:
            return bias
        heads = bias.shape[0]
        cls = self.cls_embedding
        out = torch.cat([cls[:, 0, None, None].expand(heads, 1, n), bias], dim=1)  # class token queries
        first = torch.cat([cls[:, 2, None, None], cls[:, 1, None, None].expand(heads, n, 1)], dim=1)
        return torch.cat([first, out], dim=2)


class BiasedSelfAttention(nn.MultiheadAttention):
    """open_clip's ``nn.MultiheadAttention`` (same parameters and state-dict keys, batch-first self-attention)
    computed by ``scaled_dot_product_attention`` with an additive float ``attn_mask`` that may broadcast
    (``heads x L x L`` or ``N x heads x L x L``). Without a mask it adds its relative position bias (its own
    ``rel_pos_bias`` or the tower's shared one) for a square grid of patches after a class token, which is
    what ``visual(x)`` feeds it. Installed by :func:`install_rel_pos_bias` (the instance's class is swapped,
    so parameters and their names stay)."""

    def position_bias(self) -> RelativePositionBias:
        own = self._modules.get("rel_pos_bias")
        return own if own is not None else self.__dict__["_shared_rel_pos_bias"]

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or key_padding_mask is not None or need_weights:
            raise ValueError("BiasedSelfAttention: only batch-first self-attention without weights")
        b, n, c = query.shape
        heads = self.num_heads
        if attn_mask is None:
            side = math.isqrt(n - 1)
            if side * side != n - 1:
                raise ValueError(f"relative position bias: {n} tokens are not a class token + a square grid")
            attn_mask = self.position_bias()((side, side), with_cls=True)
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c)), None


RelPosKind = Literal["shared", "block"]


def rel_pos_kind(state: dict[str, torch.Tensor]) -> RelPosKind | None:
    """Which relative position bias an image-tower state dict (keys without ``visual.``) holds, if any."""
    if "rel_pos_bias.embedding" in state:
        return "shared"
    if any(k.endswith("attn.rel_pos_bias.embedding") for k in state):
        return "block"
    return None


def has_rel_pos_bias(visual: nn.Module) -> bool:
    return all(isinstance(b.attn, BiasedSelfAttention) for b in visual.transformer.resblocks)


def install_rel_pos_bias(
    visual: nn.Module, kind: RelPosKind, grids: tuple[int, int] | list[tuple[int, int]]
) -> nn.Module:
    """Add a zero-initialised relative position bias to an open_clip ViT tower (in place; returns it).

    ``shared``: one table ``visual.rel_pos_bias`` sized for ``grids`` (an ``(h, w)``); ``block``: one per block,
    ``grids`` one ``(h, w)`` for all or a list with one per block. Every block's attention becomes a
    :class:`BiasedSelfAttention`; the tower's own absolute position embedding is left as it is."""
    if kind not in ("shared", "block"):
        raise ValueError(f"relative position bias: kind must be 'shared' or 'block', got {kind!r}")
    blocks = visual.transformer.resblocks
    if has_rel_pos_bias(visual):
        raise ValueError("relative position bias: the tower already has one")
    per_block = grids if isinstance(grids, list) else [grids] * len(blocks)
    if len(per_block) != len(blocks):
        raise ValueError(f"relative position bias: {len(per_block)} grids for {len(blocks)} blocks")
    for block in blocks:
        if type(block.attn) is not nn.MultiheadAttention or not block.attn.batch_first:
            raise ValueError(
                "relative position bias: needs open_clip blocks with batch-first nn.MultiheadAttention"
            )
    heads = blocks[0].attn.num_heads
    ref = blocks[0].attn.in_proj_weight
    shared = None
    if kind == "shared":
        shared = RelativePositionBias(heads, per_block[-1]).to(ref.device, ref.dtype)
        visual.rel_pos_bias = shared
    for block, grid in zip(blocks, per_block):
        block.attn.__class__ = BiasedSelfAttention
        if shared is not None:
            block.attn.__dict__["_shared_rel_pos_bias"] = shared  # a reference, not a submodule: one key
        else:
            block.attn.rel_pos_bias = RelativePositionBias(heads, grid).to(ref.device, ref.dtype)
    return visual


def install_rel_pos_bias_for(visual: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Install the relative position bias ``state`` (an image-tower state dict) holds, sized as it is."""
    kind = rel_pos_kind(state)
    if kind == "shared":
        install_rel_pos_bias(visual, kind, _grid_of(state["rel_pos_bias.embedding"].shape))
    elif kind == "block":
        grids = [
            _grid_of(state[f"transformer.resblocks.{i}.attn.rel_pos_bias.embedding"].shape)
            for i in range(len(visual.transformer.resblocks))
        ]
        install_rel_pos_bias(visual, kind, grids)


def window_partition(
    x: torch.Tensor, hw: tuple[int, int], window: tuple[int, int]
) -> tuple[torch.Tensor, int]:
    """B x h*w x C tokens (row-major) -> (B*n) x wh*ww x C windows (zero-padded to a multiple of the window),
    and the number of windows per image ``n``."""
    b, _, c = x.shape
    (h, w), (wh, ww) = hw, window
    ph, pw = -h % wh, -w % ww
    x = F.pad(x.view(b, h, w, c), (0, 0, 0, pw, 0, ph))
    nh, nw = (h + ph) // wh, (w + pw) // ww
    x = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, wh * ww, c)
    return x, nh * nw


def window_unpartition(x: torch.Tensor, hw: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*n) x wh*ww x C -> B x h*w x C (padding cropped)."""
    (h, w), (wh, ww) = hw, window
    nh, nw = -(-h // wh), -(-w // ww)
    c = x.shape[-1]
    b = x.shape[0] // (nh * nw)
    x = x.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * wh, nw * ww, c)
    return x[:, :h, :w].reshape(b, h * w, c)


def windowed_block(
    block: nn.Module, x: torch.Tensor, bias: torch.Tensor, hw: tuple[int, int], window: tuple[int, int]
) -> torch.Tensor:
    """open_clip's residual block with its attention inside windows, as ViTDet's block: ``ln_1``, partition
    (zero padding), attention per window with ``bias``, unpartition and crop, then the residual and the MLP on
    the real tokens only. Every submodule runs as a module (drop-path hooks, FLOP attribution)."""
    y, _ = window_partition(block.ln_1(x), hw, window)
    y = window_unpartition(block.attn(y, y, y, need_weights=False, attn_mask=bias)[0], hw, window)
    x = x + block.ls_1(y)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def window_padding_mask(
    hw: tuple[int, int], window: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """n x 1 x 1 x wh*ww additive mask (-inf on padded keys) of :func:`window_partition`'s windows, or None
    when the grid is a multiple of the window."""
    (h, w), (wh, ww) = hw, window
    if h % wh == 0 and w % ww == 0:
        return None
    real = torch.ones(1, h * w, 1, device=device)
    real, _ = window_partition(real, hw, window)
    return torch.zeros(real.shape[:2], device=device).masked_fill_(real[..., 0] == 0, float("-inf"))[
        :, None, None, :
    ]


class ViTBackbone(nn.Module):
    """An open_clip ``VisionTransformer`` (kept as ``self.visual``) with multi-level dense outputs."""

    def __init__(
        self,
        visual: nn.Module,
        out_indices: tuple[int, ...] = (),
        drop_path_rate: float = 0.0,
        window_size: int = 0,
        global_blocks: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError("model: only open_clip VisionTransformer image towers are supported")
        self.visual = visual
        self.num_layers = len(visual.transformer.resblocks)
        self.width = visual.transformer.width
        self.patch_size = int(visual.patch_size[0])
        self.embed_dim = int(visual.output_dim)
        self.out_indices = self._resolve(out_indices or default_out_indices(self.num_layers), "out_indices")
        self.window_size = window_size
        self.global_blocks = (
            self._resolve(global_blocks or default_out_indices(self.num_layers), "global_blocks")
            if window_size
            else ()
        )
        if window_size and not has_rel_pos_bias(visual):  # ViTDet: zero-initialised relative positions
            grid = tuple(int(g) for g in visual.grid_size)
            window = (min(window_size, grid[0]), min(window_size, grid[1]))
            sizes = [grid if i in self.global_blocks else window for i in range(self.num_layers)]
            install_rel_pos_bias(visual, "block", sizes)
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

    def _resolve(self, indices: tuple[int, ...], field: str) -> tuple[int, ...]:
        resolved = []
        for i in indices:
            j = i + self.num_layers if i < 0 else i
            if not 0 <= j < self.num_layers:
                raise ValueError(f"{field}: block {i} outside a {self.num_layers}-block tower")
            resolved.append(j)
        return tuple(resolved)

    def _tokens(self, x: torch.Tensor, take: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the tower; return the final token sequence (B x 1+N x C; B x N x C with windowed attention,
        which drops the class token) and the outputs of blocks in ``take``."""
        visual = self.visual
        hw = self.grid(x)
        x = visual._embeds(x)
        biased = has_rel_pos_bias(visual)
        window = pad = None  # the windowed blocks' window and padding mask: the same for all of them
        if self.window_size:
            x = x[:, 1:]
            window = (min(self.window_size, hw[0]), min(self.window_size, hw[1]))
            pad = window_padding_mask(hw, window, x.device)
            if pad is not None:
                pad = pad.repeat(x.shape[0], 1, 1, 1)
        biases: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
        saved: dict[int, torch.Tensor] = {}
        for i, block in enumerate(visual.transformer.resblocks):
            if not biased:
                x = self._run(block, x, None)
            elif window is None or i in self.global_blocks:
                x = self._run(block, x, self._bias(block, hw, biases))
            else:
                bias = self._bias(block, window, biases)
                if pad is not None:
                    bias = bias + pad
                if self.visual.transformer.grad_checkpointing and self.training:
                    x = torch.utils.checkpoint.checkpoint(
                        windowed_block, block, x, bias, hw, window, use_reentrant=False
                    )
                else:
                    x = windowed_block(block, x, bias, hw, window)
            if i in take:
                saved[i] = x
        return x, saved

    def _bias(self, block: nn.Module, hw: tuple[int, int], cache: dict) -> torch.Tensor:
        """The block's relative position bias (heads x L x L) for an ``hw`` grid, computed once per table."""
        table = block.attn.position_bias()
        key = (id(table), hw)
        if key not in cache:
            cache[key] = table(hw, with_cls=not self.window_size)
        return cache[key]

    def _run(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.visual.transformer.grad_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, x, None, None, bias, use_reentrant=False)
        return block(x) if bias is None else block(x, attn_mask=bias)

    def _to_map(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = tokens.shape
        return tokens[:, n - hw[0] * hw[1] :].transpose(1, 2).reshape(b, c, hw[0], hw[1])

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
            "pooled": None if self.window_size else self.pooled_from_tokens(tokens),
        }

    def _check_pooled(self) -> None:
        if self.window_size:
            raise ValueError(
                "backbone.window_size: windowed attention drops the class token, so there is no pooled "
                "embedding; set window_size = 0 for a stage that needs one"
            )

    def pooled_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_pooled()
        pooled, _ = self.visual._pool(tokens)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def forward_pooled(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        """The image embedding (B x D), or the pooled pre-projection token (B x width) when ``project=False``."""
        tokens, _ = self._tokens(x, set())
        if project:
            return self.pooled_from_tokens(tokens)
        self._check_pooled()
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
        install_rel_pos_bias_for(model.visual, visual_state_dict(state))
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
        install_rel_pos_bias_for(visual, state)
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
    backbone = ViTBackbone(visual, cfg.out_indices, cfg.drop_path_rate, cfg.window_size, cfg.global_blocks)
    if cfg.grad_checkpointing:
        visual.set_grad_checkpointing(True)
    return backbone


def resize_like(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize of a B x C x h x w map (align_corners=False, as mmseg does)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)

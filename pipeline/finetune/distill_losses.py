"""Text- and vision-guided knowledge distillation (TGKD / VGKD) and the teacher's per-image embedding cache.

    loss = tgkd_loss(student, teacher, text, image)    # region embeddings V, R(I, M), T(Y); image id per region
    loss = vgkd_loss(student, text, image)

From "Transferable and principled efficiency for open-vocabulary segmentation" (OpenTrans). For the ``N``
regions of one image, with ``V_i`` the student's embedding of region ``i``, ``R(I, M_j)`` the frozen CLIP
image encoder's embedding of image ``I`` under mask ``M_j`` and ``T(Y_i)`` the frozen CLIP text encoder's
embedding of region ``i``'s category name:

    L_TGKD = 1/N sum_i sum_j | ||V_i - R(I, M_j)|| - ||T(Y_i) - T(Y_j)|| |
    L_VGKD = 1/N sum_i sum_j | ||V_i - V_j||       - ||T(Y_i) - T(Y_j)|| |

The student's distances to the teacher's regions (TGKD), or among its own regions (VGKD), are pulled to the
distances between the regions' category names in the text space.

Norms and normalisations used here (the formula leaves them open):

* every embedding (``V``, ``R``, ``T``) is first divided by its own L2 norm (CLIP compares directions), so
  each distance is the Euclidean (L2) distance between unit vectors, in ``[0, 2]``;
* the outer ``| . |`` is the absolute value of each pair's difference (an L1 loss over the ``N x N`` pairs),
  summed over ``j`` and divided by ``N`` - a sum over ``j``, not a mean, exactly as the formula writes it;
* the ``N`` regions are those of one image; a batch's loss is the mean of its images' losses over the images
  with at least one region. The ``i = j`` terms of VGKD are zero on both sides and are left out of the
  computation, and a distance of exactly zero gets gradient zero (not NaN): the region stage starts the
  student from the teacher, so ``V_i = R(I, M_i)`` exactly at step 0.

:class:`KDConfig` is the ``kd`` section of the region and segmentation stages (``kd.kind = "none" | "tgkd" |
"vgkd"``, ``kd.weight``); :class:`TeacherCache` keeps the teacher's masked-region embeddings per image (see its
docstring); :func:`masked_crop_embeddings` is the teacher pass itself (CLIPSelf's crops).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

BOX = 0
"""Region kind whose crop keeps its background (every other kind blanks the pixels outside its mask)."""


@dataclass(frozen=True)
class KDConfig:
    kind: Literal["none", "tgkd", "vgkd"] = "none"
    """Which distillation loss to add: text-guided (student-to-teacher-region distances), vision-guided
    (student-to-student distances), or none."""
    weight: float = 1.0
    """Weight of the distillation loss in the stage's total loss."""
    cache: bool = True
    """Keep the teacher's masked-region embeddings per image (computed once under no_grad) in memory."""
    cache_dir: str = ""
    """Keep them on disk in this folder instead of memory (one ``<key>.pt`` per image, atomic writes): flat
    memory on large datasets, and later runs and other processes with the same teacher reuse them."""

    def __post_init__(self) -> None:
        if self.kind not in ("none", "tgkd", "vgkd"):
            raise ValueError(f"kind: must be none, tgkd or vgkd, got {self.kind!r}")
        if self.weight < 0:
            raise ValueError(f"weight: must be >= 0, got {self.weight}")
        if self.cache_dir and not self.cache:
            raise ValueError("cache_dir: set, but cache = false")


# ------------------------------------------------------------------------------------------- losses


def _unit(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` in at least fp32 (bf16 autocast outputs are promoted: distances near 0 need the bits)."""
    return F.normalize(x.to(torch.promote_types(like.dtype, torch.float32)), dim=-1)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|`` for rows of ``a`` (N x D) and ``b`` (M x D), from the differences themselves (not the
    Gram expansion, which cancels badly near zero); exactly 0 with gradient 0 where ``a_i = b_j``."""
    sq = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    positive = sq > 0
    return torch.where(positive, sq.where(positive, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _per_image(image: torch.Tensor, term: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean over the images present in ``image`` (one id per region) of ``term(region indices)``."""
    ids = torch.unique(image)
    return torch.stack([term(torch.nonzero(image == i)[:, 0]) for i in ids]).mean()


def tgkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None
) -> torch.Tensor:
    """L_TGKD (module docstring): ``student`` V, ``teacher`` R(I, M) and ``text`` T(Y) are N x D, row ``i``
    for region ``i``; ``image`` (N ids, default all one image) groups the regions per image."""
    if student.shape != teacher.shape or student.shape[0] != text.shape[0]:
        raise ValueError(f"tgkd: shapes {tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(text.shape)}")
    if len(student) == 0:
        return student.sum() * 0.0
    v, r, t = _unit(student, student), _unit(teacher, student), _unit(text, student)
    image = torch.zeros(len(v), dtype=torch.long, device=v.device) if image is None else image

    def term(idx: torch.Tensor) -> torch.Tensor:
        gap = _distances(v[idx], r[idx]) - _distances(t[idx], t[idx])
        return gap.abs().sum() / len(idx)

    return _per_image(image, term)


def vgkd_loss(student: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """L_VGKD (module docstring): ``student`` V and ``text`` T(Y) are N x D; ``image`` groups the regions."""
    if student.shape[0] != text.shape[0]:
        raise ValueError(f"vgkd: shapes {tuple(student.shape)}, {tuple(text.shape)}")
    if len(student) == 0:
        return student.sum() * 0.0
    v, t = _unit(student, student), _unit(text, student)
    image = torch.zeros(len(v), dtype=torch.long, device=v.device) if image is None else image

    def term(idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        off = ~torch.eye(n, dtype=torch.bool, device=v.device)  # i = j: zero on both sides
        gap = _distances(v[idx], v[idx])[off] - _distances(t[idx], t[idx])[off]
        return gap.abs().sum() / n

    return _per_image(image, term)


def kd_loss(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, image: torch.Tensor
) -> torch.Tensor:
    """``tgkd_loss`` or ``vgkd_loss`` by name (``KDConfig.kind``)."""
    if kind == "tgkd":
        return tgkd_loss(student, teacher, text, image)
    if kind == "vgkd":
        return vgkd_loss(student, text, image)
    raise ValueError(f"kind: no distillation loss {kind!r}")


# ------------------------------------------------------------------------------------ teacher pass


@torch.no_grad()
def masked_crop_embeddings(
    teacher: nn.Module,
    images: torch.Tensor,
    image: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    kind: torch.Tensor,
) -> torch.Tensor:
    """R(I, M): the frozen image encoder (a :class:`pipeline.model.backbone.ViTBackbone`) on each region's
    crop (RoIAlign of its box to the encoder's input size), with the pixels outside the mask blanked to the
    mean colour (0 after CLIP normalisation) unless the region is a ``BOX``. One row per region."""
    x = images[image]
    blank = torch.where((kind == BOX)[:, None, None], torch.ones_like(masks), masks)
    x = x * blank[:, None].to(x.dtype)
    size = teacher.visual.image_size[0]
    rois = torch.cat([torch.arange(len(image), device=x.device)[:, None].to(x.dtype), boxes.to(x.dtype)], 1)
    crops = roi_align(x, rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return teacher.forward_pooled(crops)


def _fingerprint(*tensors: torch.Tensor) -> bytes:
    """Bytes identifying tensors up to a 32 x 32 area-pooled copy of each image-like one (cheap on a GPU)."""
    out = []
    for t in tensors:
        t = t.detach().float()
        if t.ndim >= 2 and t.shape[-1] > 32:
            lead = t.shape[:-2]
            t = F.adaptive_avg_pool2d(t.reshape(-1, 1, *t.shape[-2:]), 32).reshape(*lead, 32, 32)
        out.append(t.cpu().contiguous().numpy().tobytes())
    return b"".join(out)


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names and bytes): the teacher's identity in on-disk cache keys."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """The teacher's masked-region embeddings of each training image, computed once under ``no_grad``.

    Key of an image: sha256 of (the teacher's :func:`module_fingerprint`, the dataset index of the image,
    a 32 x 32 area-pooled copy of the network input and of each region mask, the exact region boxes and
    kinds). The input is part of the key, so an augmented view (a flipped image) is its own entry. Value:
    the ``n_regions x D`` embeddings of that image's regions, in region order, kept on the CPU. Misses are
    computed one image at a time, so an embedding does not depend on what else is in the batch (a cached
    and a recomputed value are the same bits, and a resumed run matches an uninterrupted one).
    With ``directory`` the entries are files ``<directory>/<key>.pt`` instead of memory (temp file + rename;
    read with ``torch.load(weights_only=True)``), so memory stays flat on large datasets. The category text embeddings need no cache: a stage computes them
    once, when it is built.
    """

    def __init__(self, teacher: nn.Module, enabled: bool = True, directory: str = "") -> None:
        self.teacher = teacher
        self.enabled = enabled
        self.directory = Path(directory) if directory else None
        self._teacher_id: str | None = None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __deepcopy__(self, memo: dict) -> TeacherCache:  # an EMA / eval copy of the model shares the cache
        return self

    def key(
        self, index: int, image: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, kind: torch.Tensor
    ) -> str:
        if self._teacher_id is None:
            self._teacher_id = module_fingerprint(self.teacher)
        h = hashlib.sha256(self._teacher_id.encode())
        h.update(str(int(index)).encode())
        h.update(_fingerprint(image, masks))
        h.update(boxes.detach().float().cpu().numpy().tobytes())
        h.update(kind.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def _load(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.directory is not None and (self.directory / f"{key}.pt").is_file():
            return torch.load(self.directory / f"{key}.pt", map_location="cpu", weights_only=True)
        return None

    def _store(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().cpu()
        if self.directory is None:
            self.memory[key] = value
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(value.clone(), buf)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, self.directory / f"{key}.pt")

    @torch.no_grad()
    def embed(
        self,
        images: torch.Tensor,
        indices: torch.Tensor | None,
        image: torch.Tensor,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        kind: torch.Tensor,
    ) -> torch.Tensor:
        """R(I, M_j) for every region (rows in region order; ``image`` = each region's image in the batch,
        ``indices`` = each batch image's dataset index, or None to key by position)."""
        if not self.enabled:
            return masked_crop_embeddings(self.teacher, images, image, boxes, masks, kind)
        out: list[torch.Tensor | None] = [None] * len(image)
        rows_of: dict[int, torch.Tensor] = {}
        for i in torch.unique(image).tolist():
            rows = torch.nonzero(image == i)[:, 0]
            rows_of[i] = rows
            index = int(indices[i]) if indices is not None else i
            key = self.key(index, images[i], boxes[rows], masks[rows], kind[rows])
            value = self._load(key)
            if value is None:
                self.misses += 1
                value = masked_crop_embeddings(
                    self.teacher,
                    images[i : i + 1],
                    torch.zeros_like(rows),
                    boxes[rows],
                    masks[rows],
                    kind[rows],
                )
                self._store(key, value)
            else:
                self.hits += 1
            for r, row in zip(rows.tolist(), value.to(images.device)):
                out[r] = row
        if not out:
            return images.new_zeros(0, int(self.teacher.embed_dim))
        return torch.stack(out)  # type: ignore[arg-type]

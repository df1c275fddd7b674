"""Data for the fine-tuning stages: the synthetic world (built in) and readers of the standard layouts.

Every source yields :class:`Record` s (an RGB image plus whatever labels it has); :class:`TaskDataset`
turns records into training / evaluation samples for one task (resize to ``image_size``, horizontal flip
when training, CLIP normalisation) and is indexed by ``(index, augmentation_seed)`` as the training loop
in :mod:`pipeline.finetune.common` expects. Nothing here downloads anything.

Sources (``DataConfig.source``):

- ``synthetic``: scenes made on the fly by :func:`pipeline.data.synthworld.make_scene` from world splits
  ``finetune`` (training; disjoint from the pretraining pool, world split ``train``) and ``val`` (image class = the
  main object's shape, semantic map over ``SEMANTIC_CLASSES``, depth in metres, thing boxes / masks, stuff
  masks): every task works on it.
- ``imagefolder``: ImageNet-style ``<root>/<split>/<class>/<image>`` (classification); labels follow an
  optional ``<root>/classes.txt``, else the sorted folder names.
- ``coco``: ``<root>/annotations/instances_<split>.json`` with images in ``<root>/<split>/`` (COCO 2017) or
  ``<root>/images/<split>/`` (detection). The region stage also needs stuff: COCO panoptic
  (``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/`` PNGs) when present, else
  COCO-Stuff (``annotations/stuff_<split>.json``, RLE masks; the "other" class is skipped).
- ``ade20k``: ``<root>/images/<training|validation>/*.jpg`` + ``<root>/annotations/<...>/*.png`` with label 0
  = "other" (ignored) and 1..150 the classes (mmseg's ``reduce_zero_label``); class names from an optional
  ``<root>/classes.txt`` (one per line; a first "ignore" / "other" line is the 0 label) or
  ``objectInfo150.csv`` / ``objectInfo.csv``.
- ``nyuv2``: ``<root>/<split>/rgb/*.(png|jpg)`` + ``<root>/<split>/depth/*`` with the same stem (16-bit PNG
  in millimetres, or ``.npy`` in metres); 0 = no measurement.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data import synthworld as sw

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

TaskName = Literal["classification", "segmentation", "depth", "detection", "region", "denseclip"]


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "imagefolder", "coco", "ade20k", "nyuv2"] = "synthetic"
    """Where samples come from: the built-in synthetic world, or a standard dataset layout under ``root``."""
    root: str = ""
    """Dataset root for the file sources (see the module docstring for each layout)."""
    train_split: str = "train"
    """Split name of the training data (ADE20K: train -> training; COCO: e.g. train2017)."""
    val_split: str = "val"
    """Split name of the evaluation data."""
    num_train: int = 64
    """Training samples: synthetic scenes made, or a cap on a file source (0 = all)."""
    num_val: int = 32
    """Evaluation samples (same meaning as num_train)."""
    image_size: int = 64
    """Side of the square network input in pixels (images and labels are resized to it)."""
    hflip: bool = True
    """Random horizontal flips when training."""
    world: sw.WorldConfig = field(default_factory=sw.WorldConfig)
    """Synthetic-world knobs (``world.seed``, ``world.num_shapes``, ...); images are made at world.image_size."""

    def __post_init__(self) -> None:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"root: required for source {self.source!r}")
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("num_train / num_val: must be >= 0")
        if self.source == "synthetic" and (self.num_train < 1 or self.num_val < 1):
            raise ValueError("num_train / num_val: the synthetic world needs >= 1 scene per split")
        if self.image_size < 16:
            raise ValueError(f"image_size: must be >= 16, got {self.image_size}")


@dataclass
class Record:
    """One image with the labels its source has (None where it has none)."""

    image: np.ndarray
    """H x W x 3 uint8 RGB."""
    label: int = -1
    """Image class (classification)."""
    semantic: np.ndarray | None = None
    """H x W int64 class map, IGNORE_INDEX where unlabelled."""
    depth: np.ndarray | None = None
    """H x W float32 metres, 0 where there is no measurement."""
    boxes: np.ndarray | None = None
    """N x 4 float32 (x0, y0, x1, y1), exclusive corner, of the thing instances."""
    labels: np.ndarray | None = None
    """N int64 thing-class indices."""
    masks: np.ndarray | None = None
    """N x H x W bool visible-pixel masks of the thing instances."""
    stuff_masks: np.ndarray | None = None
    """M x H x W bool, one per stuff class present."""
    stuff_labels: np.ndarray | None = None
    """M int64 stuff-class indices."""


@dataclass
class Vocabulary:
    """Class names of a source, per label space."""

    classes: list[str] = field(default_factory=list)
    """Image classes."""
    semantic: list[str] = field(default_factory=list)
    """Classes of the semantic map."""
    things: list[str] = field(default_factory=list)
    stuff: list[str] = field(default_factory=list)
    max_depth: float = 10.0
    """Largest valid depth in metres (NYUv2: 10)."""


# ------------------------------------------------------------------------------------------ sources


class SyntheticSource:
    """Scenes ``0 .. num - 1`` of one split of the synthetic world, made on first use and cached."""

    def __init__(self, world: sw.WorldConfig, split: str, num: int) -> None:
        self.world, self.split, self.num = world, split, num
        self.vocab = Vocabulary(
            classes=list(sw.THING_CLASSES[: world.num_shapes]),
            semantic=list(sw.SEMANTIC_CLASSES),
            things=list(sw.THING_CLASSES),
            stuff=list(sw.STUFF_CLASSES),
            max_depth=float(world.max_depth),
        )

    def __len__(self) -> int:
        return self.num

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (the source lives as long as its dataset)
    def __getitem__(self, i: int) -> Record:
        scene = sw.make_scene(self.world, i, self.split)
        h, w = scene.semantic.shape
        things = scene.things
        stuff = [r for r in sw.regions(scene) if r.kind == "stuff"]
        return Record(
            image=scene.image,
            label=sw.zero_shot_label(scene),
            semantic=scene.semantic.astype(np.int64),
            depth=scene.depth.astype(np.float32),
            boxes=np.array([t.box for t in things], dtype=np.float32).reshape(-1, 4),
            labels=np.array([sw.THING_CLASSES.index(t.shape) for t in things], dtype=np.int64),
            masks=np.stack([t.mask for t in things]) if things else np.zeros((0, h, w), bool),
            stuff_masks=np.stack([r.mask for r in stuff]) if stuff else np.zeros((0, h, w), bool),
            stuff_labels=np.array([sw.STUFF_CLASSES.index(r.label) for r in stuff], dtype=np.int64),
        )


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _cap(items: list[Any], num: int) -> list[Any]:
    return items[:num] if num > 0 else items


class ImageFolderSource:
    """``<root>/<split>/<class>/<image>``; classes are the sorted folder names (torchvision's rule)."""

    def __init__(self, root: str, split: str, num: int = 0) -> None:
        base = Path(root) / split
        if not base.is_dir():
            raise ValueError(f"root: no folder {str(base)!r} (expected <root>/<split>/<class>/<image>)")
        folders = sorted(p.name for p in base.iterdir() if p.is_dir())
        classes = folders
        listed = Path(root) / "classes.txt"
        if listed.is_file():  # a class list fixes the label order (and covers classes absent from a split)
            names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
            if set(folders) <= set(names):
                classes = names
        files = [
            (f, k)
            for k, c in enumerate(classes)
            if (base / c).is_dir()
            for f in sorted((base / c).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        # Spread a capped subset over the classes instead of taking the first folders.
        order = (
            np.random.default_rng(0).permutation(len(files))
            if num and num < len(files)
            else range(len(files))
        )
        self.files = _cap([files[i] for i in order], num)
        self.vocab = Vocabulary(classes=classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Record:
        path, label = self.files[i]
        return Record(image=_load_rgb(path), label=label)


class CocoSource:
    """COCO instances (things: boxes, masks); for ``with_stuff`` also stuff masks from COCO panoptic or
    COCO-Stuff."""

    def __init__(self, root: str, split: str, num: int = 0, with_stuff: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        ann_dir = self.root / "annotations"
        self.panoptic = with_stuff and (ann_dir / f"panoptic_{split}.json").is_file()
        self.stuff_coco = None
        if self.panoptic:
            body = json.loads((ann_dir / f"panoptic_{split}.json").read_text())
            cats = sorted(body["categories"], key=lambda c: c["id"])
            self.thing_ids = [c["id"] for c in cats if c.get("isthing", 1)]
            self.stuff_ids = [c["id"] for c in cats if not c.get("isthing", 1)]
            names = {c["id"]: c["name"] for c in cats}
            self.images = {im["id"]: im for im in body["images"]}
            self.items = _cap(sorted(body["annotations"], key=lambda a: a["image_id"]), num)
            self.vocab = Vocabulary(
                things=[names[i] for i in self.thing_ids], stuff=[names[i] for i in self.stuff_ids]
            )
            return
        self.coco = self._load(ann_dir / f"instances_{split}.json")
        self.thing_ids = sorted(self.coco.getCatIds())
        names = {c["id"]: c["name"] for c in self.coco.loadCats(self.thing_ids)}
        self.items = _cap(sorted(self.coco.getImgIds()), num)
        self.vocab = Vocabulary(things=[names[i] for i in self.thing_ids])
        if with_stuff:
            self.stuff_coco = self._load(
                ann_dir / f"stuff_{split}.json", "panoptic_<split>.json or stuff_<split>"
            )
            cats = self.stuff_coco.loadCats(sorted(self.stuff_coco.getCatIds()))
            cats = [c for c in cats if c["name"] != "other"]
            self.stuff_ids = [c["id"] for c in cats]
            self.vocab.stuff = [c["name"] for c in cats]

    @staticmethod
    def _load(path: Path, what: str = "") -> Any:
        import contextlib
        import io

        from pycocotools.coco import COCO

        if not path.is_file():
            raise ValueError(f"root: no {str(path)!r} (COCO layout: annotations/{what or path.name})")
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, info: dict[str, Any]) -> np.ndarray:
        path = self.root / self.split / info["file_name"]
        if not path.is_file():
            path = self.root / "images" / self.split / info["file_name"]
        return _load_rgb(path)

    def __getitem__(self, i: int) -> Record:
        return self._panoptic(i) if self.panoptic else self._instances(i)

    def _masks(self, coco: Any, image_id: int, ids: list[int], h: int, w: int) -> tuple[list[Any], list[Any]]:
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["category_id"] in ids and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        return anns, [coco.annToMask(a).astype(bool) for a in anns]

    def _instances(self, i: int) -> Record:
        info = self.coco.loadImgs(self.items[i])[0]
        image = self._image(info)
        h, w = image.shape[:2]
        anns, masks = self._masks(self.coco, info["id"], self.thing_ids, h, w)
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)], np.float32)
        rec = Record(
            image=image,
            boxes=boxes.reshape(-1, 4),
            labels=np.array([self.thing_ids.index(a["category_id"]) for a in anns], np.int64),
            masks=np.stack(masks) if masks else np.zeros((0, h, w), bool),
        )
        if self.stuff_coco is not None:
            sanns, smasks = self._masks(self.stuff_coco, info["id"], self.stuff_ids, h, w)
            rec.stuff_masks = np.stack(smasks) if smasks else np.zeros((0, h, w), bool)
            rec.stuff_labels = np.array([self.stuff_ids.index(a["category_id"]) for a in sanns], np.int64)
        return rec

    def _panoptic(self, i: int) -> Record:
        ann = self.items[i]
        info = self.images[ann["image_id"]]
        image = self._image(info)
        png = np.asarray(Image.open(self.root / "annotations" / f"panoptic_{self.split}" / ann["file_name"]))
        ids = png[..., 0].astype(np.int64) + 256 * png[..., 1] + 256 * 256 * png[..., 2]
        boxes, labels, masks, smasks, slabels = [], [], [], [], []
        for seg in ann["segments_info"]:
            m = ids == seg["id"]
            if not m.any() or seg.get("iscrowd", 0):
                continue
            if seg["category_id"] in self.thing_ids:
                ys, xs = np.nonzero(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                labels.append(self.thing_ids.index(seg["category_id"]))
                masks.append(m)
            else:
                smasks.append(m)
                slabels.append(self.stuff_ids.index(seg["category_id"]))
        h, w = ids.shape
        return Record(
            image=image,
            boxes=np.array(boxes, np.float32).reshape(-1, 4),
            labels=np.array(labels, np.int64),
            masks=np.stack(masks) if masks else np.zeros((0, h, w), bool),
            stuff_masks=np.stack(smasks) if smasks else np.zeros((0, h, w), bool),
            stuff_labels=np.array(slabels, np.int64),
        )


class ADE20KSource:
    """ADEChallengeData2016 layout; label 0 ("other") becomes IGNORE_INDEX, 1..K become 0..K-1."""

    SPLITS = {"train": "training", "val": "validation"}

    def __init__(self, root: str, split: str, num: int = 0) -> None:
        base = Path(root)
        folder = self.SPLITS.get(split, split)
        images = base / "images" / folder
        if not images.is_dir():
            raise ValueError(
                f"root: no folder {str(images)!r} (ADE20K layout: images/<split>/, annotations/<split>/)"
            )
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.items = _cap([(f, base / "annotations" / folder / (f.stem + ".png")) for f in files], num)
        self.vocab = Vocabulary(semantic=self._names(base))

    @staticmethod
    def _names(base: Path) -> list[str]:
        if (base / "classes.txt").is_file():
            names = [line.strip() for line in (base / "classes.txt").read_text().splitlines() if line.strip()]
            return (
                names[1:]
                if names and names[0].lower() in ("ignore", "other", "background", "void")
                else names
            )
        for info in ("objectInfo150.csv", "objectInfo.csv"):
            if (base / info).is_file():
                with open(base / info, newline="") as f:
                    return [row["Name"].split(";")[0] for row in csv.DictReader(f)]
        return [f"class_{k}" for k in range(150)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Record:
        image_path, label_path = self.items[i]
        label = np.asarray(Image.open(label_path)).astype(np.int64)
        semantic = np.where(label == 0, IGNORE_INDEX, label - 1)
        return Record(image=_load_rgb(image_path), semantic=semantic)


class NYUv2Source:
    """``<root>/<split>/rgb/<stem>.png|jpg`` + ``<root>/<split>/depth/<stem>.png`` (uint16 mm) or ``.npy`` (m)."""

    def __init__(self, root: str, split: str, num: int = 0, depth_scale: float = 1000.0) -> None:
        base = Path(root) / split
        if not (base / "rgb").is_dir():
            raise ValueError(
                f"root: no folder {str(base / 'rgb')!r} (NYUv2 layout: <split>/rgb, <split>/depth)"
            )
        items = []
        for f in sorted((base / "rgb").iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            for ext in (".png", ".npy"):
                d = base / "depth" / (f.stem + ext)
                if d.is_file():
                    items.append((f, d))
                    break
            else:
                raise ValueError(f"root: no depth map for {str(f)!r} in {str(base / 'depth')!r}")
        self.items = _cap(items, num)
        self.depth_scale = depth_scale
        self.vocab = Vocabulary(max_depth=10.0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Record:
        image_path, depth_path = self.items[i]
        if depth_path.suffix == ".npy":
            depth = np.load(depth_path, allow_pickle=False).astype(np.float32)
        else:
            depth = np.asarray(Image.open(depth_path)).astype(np.float32) / self.depth_scale
        return Record(image=_load_rgb(image_path), depth=depth)


def build_source(cfg: DataConfig, split: str, task: TaskName) -> Any:
    """The record source of ``cfg`` for one split (``split`` is the split *name*, e.g. cfg.val_split)."""
    train = split == cfg.train_split
    num = cfg.num_train if train else cfg.num_val
    if cfg.source == "synthetic":
        # World split "finetune" for training, as the synthetic export's downstream layouts do: the
        # pretraining pool is world split "train", so fine-tuning never sees pretraining images.
        return SyntheticSource(cfg.world, "finetune" if train else "val", num)
    readers = {
        "imagefolder": ("classification",),
        "coco": ("detection", "region"),
        "ade20k": ("segmentation", "denseclip"),
        "nyuv2": ("depth",),
    }
    if task not in readers[cfg.source]:
        raise ValueError(f"source: {cfg.source!r} has no labels for the {task} stage (use one of {readers})")
    if cfg.source == "imagefolder":
        return ImageFolderSource(cfg.root, split, num)
    if cfg.source == "coco":
        return CocoSource(cfg.root, split, num, with_stuff=task == "region")
    if cfg.source == "ade20k":
        return ADE20KSource(cfg.root, split, num)
    return NYUv2Source(cfg.root, split, num)


# ------------------------------------------------------------------------------------ task samples


def normalize(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float, CLIP-normalised."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an H x W (or N x H x W) array to size x size."""
    h, w = arr.shape[-2:]
    if h == size and w == size:
        return arr
    rows = np.minimum((np.arange(size) + 0.5) * h / size, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(size) + 0.5) * w / size, w - 1).astype(np.int64)
    return arr[..., rows[:, None], cols[None, :]]


class TaskDataset(torch.utils.data.Dataset):
    """Samples of one task from a record source; ``dataset[(i, seed)]`` (seed None = no augmentation)."""

    def __init__(self, source: Any, task: TaskName, image_size: int, hflip: bool = True) -> None:
        self.source, self.task, self.size, self.hflip = source, task, image_size, hflip

    @property
    def vocab(self) -> Vocabulary:
        return self.source.vocab

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int | None] | int) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rec = self.source[index]
        flip = bool(self.hflip and seed is not None and np.random.default_rng(seed).random() < 0.5)
        h, w = rec.image.shape[:2]
        s = self.size
        image = _resize_image(rec.image, s)
        if flip:
            image = image[:, ::-1]
        out: dict[str, Any] = {"image": normalize(image), "index": index}
        if seed is not None:  # per-sample randomness inside the model (the detector's sampling) draws from it
            out["seed"] = int(seed)
        task = self.task
        if task == "classification":
            out["label"] = int(rec.label)
        if task in ("segmentation", "denseclip"):
            semantic = _resize_nearest(rec.semantic, s)
            out["semantic"] = torch.from_numpy(np.ascontiguousarray(semantic[:, ::-1] if flip else semantic))
        if task == "depth":
            depth = _resize_nearest(rec.depth, s)
            out["depth"] = torch.from_numpy(np.ascontiguousarray(depth[:, ::-1] if flip else depth))[None]
        if task in ("detection", "region"):
            boxes = rec.boxes.copy() * np.array([s / w, s / h, s / w, s / h], np.float32)
            masks = _resize_nearest(rec.masks, s)
            if flip:
                boxes[:, [0, 2]] = s - boxes[:, [2, 0]]
                masks = masks[:, :, ::-1]
            keep = (
                masks.reshape(len(masks), -1).any(1)
                & (boxes[:, 2] > boxes[:, 0])
                & (boxes[:, 3] > boxes[:, 1])
            )
            out["boxes"] = torch.from_numpy(boxes[keep])
            out["labels"] = torch.from_numpy(rec.labels[keep])
            out["masks"] = torch.from_numpy(np.ascontiguousarray(masks[keep]))
        if task == "region":
            smasks = _resize_nearest(rec.stuff_masks, s)
            if flip:
                smasks = smasks[:, :, ::-1]
            keep = smasks.reshape(len(smasks), -1).any(1)
            out["stuff_masks"] = torch.from_numpy(np.ascontiguousarray(smasks[keep]))
            out["stuff_labels"] = torch.from_numpy(rec.stuff_labels[keep])
        return out


STACKED = ("image", "label", "semantic", "depth", "index")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack fixed-size fields (image, label, semantic, depth, index); keep per-image lists for the rest."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in STACKED:
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
        else:
            out[key] = values
    return out


def build_datasets(cfg: DataConfig, task: TaskName) -> tuple[TaskDataset, TaskDataset]:
    """(train, val) datasets of ``task`` from ``cfg``."""
    train = TaskDataset(build_source(cfg, cfg.train_split, task), task, cfg.image_size, cfg.hflip)
    val = TaskDataset(build_source(cfg, cfg.val_split, task), task, cfg.image_size, hflip=False)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"source: empty split (train {len(train)}, val {len(val)} samples)")
    return train, val


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

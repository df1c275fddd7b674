"""Dense readouts that depend on the representation, and paired intervals on their differences.

    scenes = world_scenes(world, "finetune", 1024, patch=8)        # images + per-patch labels, made once
    encoder = PatchEncoder(build_backbone(BackboneConfig(checkpoint="<run>/export/ema")))
    stats = run_readouts(ReadoutConfig(), encoder, train, val)       # {readout: [seeds, scenes, k] statistics}
    gap = paired_gain([stats_a], [stats_b], "linear-seg")            # a - b, 95% bootstrap interval

Readouts (each trained on scenes drawn from ``train`` with a readout seed, evaluated on every ``val`` scene,
the same draws for every encoder so that encoders are compared on paired data):

- ``linear-seg`` / ``linear-depth``: a linear probe on frozen patch features, fitted in closed form (ridge
  regression in float64 on standardised features; segmentation regresses one-hot classes and predicts the
  argmax), per-patch classes (majority of the patch's pixels) / per-patch mean depth;
- ``knn-seg`` / ``knn-depth``: nonparametric patch retrieval: the ``knn_k`` training patches of highest cosine
  similarity vote (classes) or are averaged (depth);
- ``fewshot-seg-<n>`` / ``fewshot-depth-<n>``: the encoder and a linear patch head fine-tuned together on
  ``n`` labelled scenes (AdamW, ``fewshot_steps`` steps).

Metrics: patch mIoU (percent, classes with a non-empty union) and patch RMSE (metres). Each readout keeps
per-scene sufficient statistics (a confusion matrix, or the sum of squared errors and the patch count), so
that a metric over any reweighting of the held-out scenes is a weighted sum: :func:`paired_gain` bootstraps
over pretraining seeds and held-out scenes jointly (the same scene draws for both sides).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ReadoutConfig:
    tasks: tuple[str, ...] = ("seg", "depth")
    """Dense tasks: ``seg`` (per-patch classes, mIoU) and ``depth`` (per-patch depth, RMSE)."""
    linear: bool = True
    """The closed-form linear probe on frozen patch features."""
    knn: bool = True
    """The cosine k-NN patch retrieval readout."""
    fewshot_scenes: tuple[int, ...] = (16, 64)
    """Few-shot fine-tuning with this many labelled scenes (empty: none)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Readout seeds: which training scenes each readout sees (and the few-shot head's init and batches)."""
    num_train: int = 1024
    """Pool of labelled training scenes (world split ``finetune``) the readouts draw from."""
    num_val: int = 512
    """Held-out scenes (world split ``val``) every readout is evaluated on."""
    probe_scenes: int = 256
    """Training scenes per linear probe."""
    knn_scenes: int = 256
    """Training scenes in the k-NN patch bank."""
    knn_k: int = 10
    """Neighbours per query patch."""
    ridge: float = 1e-2
    """Ridge penalty of the linear probe (on standardised features, per training patch)."""
    layers: tuple[int, ...] = (-1,)
    """Encoder blocks whose patch tokens are the features (concatenated; -1 = the last block)."""
    fewshot_steps: int = 60
    """Optimiser steps of few-shot fine-tuning."""
    fewshot_batch: int = 16
    """Scenes per few-shot step."""
    fewshot_lr: float = 1e-3
    """AdamW learning rate (encoder and head) of few-shot fine-tuning."""

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in ("seg", "depth"):
                raise ValueError(f"tasks: unknown task {task!r} (use 'seg' and/or 'depth')")
        if not self.seeds:
            raise ValueError("seeds: give at least one readout seed")
        for name in (
            "num_train",
            "num_val",
            "probe_scenes",
            "knn_scenes",
            "knn_k",
            "fewshot_steps",
            "fewshot_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for n in (*self.fewshot_scenes, self.probe_scenes, self.knn_scenes):
            if n > self.num_train:
                raise ValueError(f"num_train: {self.num_train} scenes cannot supply a readout of {n} scenes")
        if self.ridge <= 0:
            raise ValueError(f"ridge: must be > 0, got {self.ridge}")

    def names(self) -> list[str]:
        """The readouts this config runs, e.g. ``["linear-seg", "knn-seg", "fewshot-seg-16", ...]``."""
        out = []
        for task in self.tasks:
            out += [f"linear-{task}"] * self.linear + [f"knn-{task}"] * self.knn
            out += [f"fewshot-{task}-{n}" for n in self.fewshot_scenes]
        return out


@dataclass(frozen=True)
class Scenes:
    """Images and per-patch labels of a set of scenes."""

    images: torch.Tensor
    """N x 3 x H x W float (normalised as the encoder expects)."""
    classes: torch.Tensor
    """N x P int64 patch classes in ``0 .. num_classes - 1`` (P = patches per image, row-major)."""
    depth: torch.Tensor
    """N x P float patch depth."""
    num_classes: int

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray) -> Scenes:
        i = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(self, images=self.images[i], classes=self.classes[i], depth=self.depth[i])


def patch_labels(semantic: np.ndarray, depth: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """H x W class map and depth -> (P classes: the majority in each patch; P depths: the patch mean)."""
    h, w = semantic.shape
    gh, gw = h // patch, w // patch
    sem = semantic[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3)
    sem = sem.reshape(gh * gw, patch * patch)
    counts = np.zeros((gh * gw, int(sem.max()) + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(gh * gw), patch * patch), sem.ravel()), 1)
    dep = depth[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).mean(axis=(1, 3)).ravel()
    return counts.argmax(1), dep.astype(np.float64)


def world_scenes(world: Any, split: str, num: int, patch: int) -> Scenes:
    """Scenes ``0 .. num - 1`` of a synthetic-world split, with the world's semantic classes renumbered
    ``0 .. C - 1`` (its stuff classes, then its shapes)."""
    from pipeline.data import synthworld as sw
    from pipeline.finetune.datasets import normalize

    used = list(sw.STUFF_CLASSES[: world.num_stuff_classes]) + list(sw.THING_CLASSES[: world.num_shapes])
    lut = np.full(len(sw.SEMANTIC_CLASSES), -1, np.int64)
    for i, name in enumerate(used):
        lut[sw.SEMANTIC_CLASSES.index(name)] = i
    images, classes, depths = [], [], []
    for index in range(num):
        scene = sw.make_scene(world, index, split)
        c, d = patch_labels(lut[scene.semantic.astype(np.int64)], scene.depth, patch)
        if (c < 0).any():
            raise AssertionError("a scene holds a class outside its world's vocabulary")
        images.append(normalize(scene.image))
        classes.append(torch.from_numpy(c))
        depths.append(torch.from_numpy(d))
    return Scenes(torch.stack(images), torch.stack(classes), torch.stack(depths).float(), len(used))


class PatchEncoder(nn.Module):
    """A ViT backbone seen as ``images -> B x P x D`` patch features (the tokens of ``layers``, concatenated)."""

    def __init__(self, backbone: nn.Module, layers: Sequence[int] = (-1,)) -> None:
        super().__init__()
        self.backbone = backbone
        n = backbone.num_layers
        self.layers = sorted({i + n if i < 0 else i for i in layers})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, saved = self.backbone._tokens(images, set(self.layers))
        return torch.cat([saved[i][:, 1:] for i in self.layers], dim=-1)


# ------------------------------------------------------------------------------------------- statistics


def seg_stats(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """N x P predictions and labels -> N x C*C per-scene confusion counts (row = truth)."""
    n = len(truth)
    flat = (truth * num_classes + pred).astype(np.int64) + (np.arange(n)[:, None] * num_classes**2)
    return (
        np.bincount(flat.ravel(), minlength=n * num_classes**2).reshape(n, num_classes**2).astype(np.float64)
    )


def depth_stats(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """N x P predictions and targets -> N x 2 per-scene (sum of squared errors, patch count)."""
    err = ((np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2).sum(1)
    return np.stack([err, np.full(len(truth), truth.shape[1], np.float64)], 1)


def metric(task: str, stats: np.ndarray) -> np.ndarray:
    """Summed statistics (... x K) -> the task metric (...): mIoU in percent or RMSE."""
    if task == "depth":
        return np.sqrt(stats[..., 0] / np.maximum(stats[..., 1], 1e-12))
    c = math.isqrt(stats.shape[-1])
    conf = stats.reshape(*stats.shape[:-1], c, c)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1e-12), 0.0)
    return 100.0 * iou.sum(-1) / np.maximum((union > 0).sum(-1), 1)


def task_of(readout: str) -> str:
    return readout.split("-")[1]


def higher_is_better(readout: str) -> bool:
    return task_of(readout) == "seg"


# --------------------------------------------------------------------------------------------- readouts


@torch.no_grad()
def extract(encoder: nn.Module, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(images[i : i + batch]) for i in range(0, len(images), batch)]).double()


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def ridge_fit(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """Least squares with an intercept and ``penalty * n`` on the weights (not the intercept), float64."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    reg = torch.eye(x.shape[1], dtype=torch.float64) * penalty * len(x)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(x.T @ x + reg, x.T @ y.double())


def ridge_predict(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w[:-1] + w[-1]


def linear_probe(
    task: str,
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    num_classes: int,
    penalty: float,
) -> np.ndarray:
    """Flattened patch features and labels -> predictions for ``f_val`` patches."""
    a, b = _standardise(f_train, f_val)
    if task == "seg":
        w = ridge_fit(a, F.one_hot(y_train, num_classes).double(), penalty)
        return ridge_predict(b, w).argmax(1).numpy()
    return ridge_predict(b, ridge_fit(a, y_train[:, None], penalty))[:, 0].numpy()


def knn(
    task: str,
    f_bank: torch.Tensor,
    y_bank: torch.Tensor,
    f_query: torch.Tensor,
    num_classes: int,
    k: int,
    chunk: int = 2048,
) -> np.ndarray:
    """Cosine k-NN: majority vote of the ``k`` nearest bank patches (ties: the lowest class), or their mean."""
    bank = F.normalize(f_bank.float(), dim=1)
    out = []
    for i in range(0, len(f_query), chunk):
        q = F.normalize(f_query[i : i + chunk].float(), dim=1)
        idx = (q @ bank.T).topk(min(k, len(bank)), dim=1).indices
        if task == "seg":
            votes = F.one_hot(y_bank[idx], num_classes).sum(1)
            out.append(votes.argmax(1))
        else:
            out.append(y_bank[idx].double().mean(1))
    return torch.cat(out).numpy()


def fewshot(
    task: str, encoder: nn.Module, train: Scenes, val: Scenes, cfg: ReadoutConfig, seed: int
) -> np.ndarray:
    """Fine-tune a copy of ``encoder`` and a linear patch head on ``train``; predictions on ``val``."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(encoder).train()
    with torch.no_grad():
        dim = model(train.images[:1]).shape[-1]
    out = train.num_classes if task == "seg" else 1
    head = nn.Linear(dim, out).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(out, dim, generator=gen, dtype=torch.float64) * dim**-0.5)
        head.bias.zero_()
    norm = nn.LayerNorm(dim, elementwise_affine=False)
    mu, sd = float(train.depth.mean()), float(train.depth.std().clamp_min(1e-6))  # depth trained standardised
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.fewshot_lr, weight_decay=0.0)
    n = len(train)
    for _ in range(cfg.fewshot_steps):
        i = torch.randint(0, n, (min(cfg.fewshot_batch, n),), generator=gen)
        y = head(norm(model(train.images[i])).double())
        if task == "seg":
            loss = F.cross_entropy(y.reshape(-1, out), train.classes[i].reshape(-1))
        else:
            loss = F.mse_loss(y[..., 0], (train.depth[i].double() - mu) / sd)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        y = torch.cat([head(norm(model(val.images[j : j + 128])).double()) for j in range(0, len(val), 128)])
    return y.argmax(-1).numpy() if task == "seg" else (y[..., 0] * sd + mu).numpy()


def draws(cfg: ReadoutConfig, readout: str, seed: int, num_train: int) -> np.ndarray:
    """The training scenes a readout sees under a readout seed (independent of the encoder: paired data)."""
    kind = readout.split("-")[0]
    size = {"linear": cfg.probe_scenes, "knn": cfg.knn_scenes}.get(kind) or int(readout.split("-")[2])
    salt = sum(ord(ch) for ch in readout)
    return np.random.default_rng([seed, salt]).choice(num_train, size=size, replace=False)


def run_readouts(cfg: ReadoutConfig, encoder: nn.Module, train: Scenes, val: Scenes) -> dict[str, np.ndarray]:
    """Every readout of ``cfg`` on ``encoder``: ``{readout: seeds x val scenes x K}`` statistics. Frozen
    features are extracted once (all training scenes, all held-out scenes)."""
    f_train, f_val = extract(encoder, train.images), extract(encoder, val.images)
    d = f_train.shape[-1]
    out: dict[str, np.ndarray] = {}
    for readout in cfg.names():
        kind, task = readout.split("-")[:2]
        per_seed = []
        for seed in cfg.seeds:
            index = draws(cfg, readout, seed, len(train))
            sub = train.take(index)
            y_sub = (sub.classes if task == "seg" else sub.depth.double()).reshape(-1)
            if kind == "fewshot":
                torch.manual_seed(seed)
                pred = fewshot(task, encoder, sub, val, cfg, seed)
            else:  # linear probe or k-NN on the frozen features
                solve, param = (linear_probe, cfg.ridge) if kind == "linear" else (knn, cfg.knn_k)
                pred = solve(
                    task, f_train[index].reshape(-1, d), y_sub, f_val.reshape(-1, d), train.num_classes, param
                )
            pred = pred.reshape(len(val), -1)
            if task == "seg":
                per_seed.append(seg_stats(pred, val.classes.numpy(), val.num_classes))
            else:
                per_seed.append(depth_stats(pred, val.depth.numpy()))
        out[readout] = np.stack(per_seed)
    return out


# ------------------------------------------------------------------------------------ paired intervals


def paired_gain(
    a: Sequence[np.ndarray | Sequence[np.ndarray]],
    b: Sequence[np.ndarray | Sequence[np.ndarray]],
    readout: str,
    level: float = 0.95,
    num_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Gain of ``a`` over ``b`` on one readout (positive = ``a`` better: higher mIoU, lower RMSE), with a
    bootstrap interval over pretraining seeds and held-out scenes jointly.

    ``a[s]`` / ``b[s]``: the statistics (readout seeds x scenes x K) of the encoder of pretraining seed ``s``
    (or a list of such, a group whose metric is their mean), on the same held-out scenes; an encoder's metric
    is the mean over its readout seeds. Each bootstrap draw
    resamples the seeds (pairs stay together) and reweights the scenes (the same weights on both sides)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_gain: give the same number (>= 1) of seeds on both sides")
    task, sign = task_of(readout), (1.0 if higher_is_better(readout) else -1.0)

    def groups(side: Sequence[Any]) -> np.ndarray:  # S x G x R x V x K
        return np.stack([np.stack(list(x)) if isinstance(x, (list, tuple)) else x[None] for x in side])

    a_arr, b_arr = groups(a), groups(b)
    s, v = a_arr.shape[0], a_arr.shape[3]

    def per_seed(weights: np.ndarray) -> np.ndarray:  # weights B x V -> B x S (sign-normalised a - b)
        ma = metric(task, np.einsum("bv,sgrvk->bsgrk", weights, a_arr)).mean((-1, -2))
        mb = metric(task, np.einsum("bv,sgrvk->bsgrk", weights, b_arr)).mean((-1, -2))
        return sign * (ma - mb)

    point = per_seed(np.ones((1, v)))[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(v, np.full(v, 1.0 / v), size=num_boot).astype(np.float64)
    diffs = per_seed(weights)
    pick = rng.integers(0, s, size=(num_boot, s))
    boot = np.take_along_axis(diffs, pick, axis=1).mean(1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return {
        "gain": float(point.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "per_seed": [float(x) for x in point],
        "significant": bool(lo > 0 or hi < 0),
    }


def mean_metric(stats: Sequence[np.ndarray], readout: str) -> float:
    """The metric of a group of encoders (mean over encoders and readout seeds)."""
    return float(np.mean([metric(task_of(readout), x.sum(1)).mean() for x in stats]))


__all__ = [
    "PatchEncoder",
    "ReadoutConfig",
    "Scenes",
    "depth_stats",
    "metric",
    "paired_gain",
    "patch_labels",
    "run_readouts",
    "seg_stats",
    "world_scenes",
]

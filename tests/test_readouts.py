"""Dense readouts of the toy reproduction (pipeline/report/readouts.py) and its readout verdict
(pipeline/report/toy.py): a planted effect is seen by every readout, identical encoders get no "yes"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.report import readouts as R

PATCH = 4
NUM_CLASSES = 3


def planted_scenes(num: int, seed: int) -> R.Scenes:
    """16 x 16 images of 4 x 4 patches: channels 0-2 a noisy one-hot of the patch class, channel 3 noise;
    depth = 1 + class + small noise (so both tasks are decodable from an encoder that sees the class)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, NUM_CLASSES, (num, 16), generator=g)
    depth = 1.0 + classes.float() + 0.1 * torch.randn(num, 16, generator=g)
    onehot = torch.nn.functional.one_hot(classes, 4).float().reshape(num, 4, 4, 4).permute(0, 3, 1, 2)
    pixels = onehot.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    images = pixels + 0.3 * torch.randn(pixels.shape, generator=g)
    return R.Scenes(images, classes, depth, NUM_CLASSES)


class Informative(nn.Module):
    """Patch means (which carry the class) through a trainable linear map: B x 16 x 8."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(4, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(images, PATCH).flatten(2).transpose(1, 2)
        return self.proj(pooled)


class Blind(nn.Module):
    """Features that ignore the image (a trainable per-patch constant plus fresh noise): B x 16 x 8."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)
        self.const = nn.Parameter(torch.randn(16, 8, generator=self.gen))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.const + torch.randn(len(images), 16, 8, generator=self.gen)


CFG = R.ReadoutConfig(
    seeds=(0, 1),
    num_train=96,
    num_val=48,
    probe_scenes=48,
    knn_scenes=48,
    knn_k=5,
    fewshot_scenes=(16,),
    fewshot_steps=40,
    fewshot_batch=8,
    fewshot_lr=1e-2,
)


@pytest.fixture(scope="module")
def planted() -> dict[str, list[dict[str, np.ndarray]]]:
    train, val = planted_scenes(CFG.num_train, 1), planted_scenes(CFG.num_val, 2)
    return {
        "informative": [R.run_readouts(CFG, Informative(s), train, val) for s in (0, 1)],
        "blind": [R.run_readouts(CFG, Blind(s), train, val) for s in (0, 1)],
    }


def test_every_readout_separates_an_encoder_that_carries_the_labels_from_one_that_does_not(planted):
    assert set(planted["informative"][0]) == set(CFG.names())
    for readout in CFG.names():
        a = [x[readout] for x in planted["informative"]]
        b = [x[readout] for x in planted["blind"]]
        gain = R.paired_gain(a, b, readout, num_boot=500)
        assert gain["lo"] > 0, (readout, gain)
        assert R.paired_gain(b, a, readout, num_boot=500)["hi"] < 0, readout


def _point(source: str, size: int, seed: int):
    from pipeline.report.scaling import Point

    name = f"debug-{source}-n{size}-s{seed}"
    return Point(name, "debug", source, f"n{size}", "", size, seed, "")


def _study(seeds: tuple[int, ...]):
    from pipeline.report.scaling import GridConfig, ScalingConfig

    return ScalingConfig(grid=GridConfig(seeds=seeds, caption_sources=("web", "web+syn")))


def _verdict(planted, web: str, syn: str, random: str):
    from pipeline.report.toy import random_label, readout_verdict

    points = [_point(src, n, s) for src in ("web", "web+syn") for n in (32, 64) for s in (0, 1)]
    kind = {"web": web, "web+syn": syn}
    results = {p.name: planted[kind[p.caption_source]][p.seed] for p in points}
    results |= {random_label("debug", s): planted[random][s] for s in (0, 1)}
    return readout_verdict(results, _study((0, 1)), points, tuple(CFG.names()), num_boot=500)


def test_identical_encoders_give_no_yes_or_no_and_say_why(planted):
    v = _verdict(planted, "blind", "blind", "blind")  # pretrained = random init: every gap is exactly zero
    assert {r["transfer"] for r in v["per_readout"].values()} == {"no verdict"}
    assert v["transfer"].startswith("no verdict") and v["data_efficiency"].startswith("no verdict")
    assert all("not significantly positive" in line for line in v["lines"])


def test_identical_caption_sources_that_beat_random_init_are_not_significant(planted):
    v = _verdict(planted, "informative", "informative", "blind")
    assert {r["transfer"] for r in v["per_readout"].values()} == {"not significant"}
    assert v["transfer"] == "not significant"
    assert all(g["lo"] > 0 for g in (r["gap_vs_random"] for r in v["table"]))


def test_a_planted_caption_effect_is_called_yes(planted):
    v = _verdict(planted, "blind", "informative", "blind")  # web = random-like, web+syn carries the labels
    assert {r["transfer"] for r in v["per_readout"].values()} == {"yes"}
    from pipeline.report.toy import readout_table

    head, rows = readout_table(v)
    assert len(rows) == len(CFG.names()) and all(len(r) == len(head) for r in rows)


def test_mean_iou_and_rmse_from_per_scene_statistics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, (10, 16)), rng.integers(0, 4, (10, 16))
    ious = []
    for c in range(4):
        inter = ((pred == c) & (truth == c)).sum()
        union = ((pred == c) | (truth == c)).sum()
        if union:
            ious.append(inter / union)
    assert R.metric("seg", R.seg_stats(pred, truth, 4).sum(0)) == pytest.approx(
        100 * np.mean(ious), rel=1e-12
    )
    y, t = rng.normal(size=(10, 16)), rng.normal(size=(10, 16))
    assert R.metric("depth", R.depth_stats(y, t).sum(0)) == pytest.approx(
        np.sqrt(((y - t) ** 2).mean()), rel=1e-12
    )


def test_the_ridge_probe_matches_float64_least_squares_without_a_penalty():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(200, 2))
    w = R.ridge_fit(torch.from_numpy(x), torch.from_numpy(y), 0.0).numpy()
    ref = np.linalg.lstsq(np.hstack([x, np.ones((200, 1))]), y, rcond=None)[0]
    # float64 normal equations: error ~ cond(X^T X) * eps; X is well conditioned here (cond < 10)
    assert np.abs(w - ref).max() <= 1e3 * np.finfo(np.float64).eps * np.abs(ref).max()


def test_patch_labels_take_the_majority_class_and_the_mean_depth():
    sem = np.zeros((8, 8), np.int64)
    sem[:4, :3] = 2  # 12 of the first patch's 16 pixels
    depth = np.arange(64, dtype=np.float32).reshape(8, 8)
    classes, dep = R.patch_labels(sem, depth, 4)
    assert classes.tolist() == [2, 0, 0, 0]
    assert dep[0] == pytest.approx(depth[:4, :4].mean())


def test_a_readout_config_error_names_the_field():
    with pytest.raises(ValueError, match="tasks"):
        R.ReadoutConfig(tasks=("normals",))
    with pytest.raises(ValueError, match="num_train"):
        R.ReadoutConfig(num_train=8, fewshot_scenes=(16,))

"""The synthetic world closes the loop: a small CoCa trained on precise captions, run through the caption job
on the noisy split, names the objects in the images far more often than the noisy web captions do.

    .venv/bin/pytest tests/test_caption_loop.py -q -m slow
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.caption.loop import LoopConfig, close_the_loop, mention_stats, shape_words
from pipeline.caption.train_coca import TrainCocaConfig
from pipeline.data import synthworld as sw

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shape_mention_stats_compare_caption_words_to_the_ground_truth() -> None:
    world = sw.WorldConfig(min_things=2, max_things=2)
    scene = next(
        sc
        for sc in (sw.make_scene(world, i, "val") for i in range(50))
        if len({t.shape for t in sc.things}) == 2
    )
    a, b = (t.shape for t in scene.things)
    wrong = next(s for s in sw.THING_CLASSES if s not in (a, b))
    assert shape_words(f"A {a.upper()} and two {b}s, {wrong}.") == {a, wrong}
    stats = mention_stats([(scene, [f"a {a} and a {b}", f"a {a} and a {wrong}", "IMG_0001.jpg"])])
    assert stats["recall"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert stats["precision"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert stats["exact"] == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.slow
def test_coca_trained_on_precise_captions_names_noisy_images_objects_far_more_often_than_their_alt_text(
    tmp_path: Path,
) -> None:
    cfg = LoopConfig(
        # defaults: one big object per 64 px scene, 2000 scenes, 250 steps of batch 64
        train=TrainCocaConfig(threads=1),
        num_eval=64,
    )
    report = close_the_loop(cfg, tmp_path, log=lambda s: None)
    generated, noisy = report["generated"], report["noisy"]
    assert report["caption_job"]["captioned"] == 64
    assert generated["captions"] == 64 * 5
    assert generated["recall"] >= noisy["recall"] + 0.25
    assert generated["precision"] >= noisy["precision"] + 0.2
    assert (tmp_path / "loop_report.json").exists()

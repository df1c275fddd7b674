"""Tests of the synthetic world: determinism, label consistency, caption quality, hard negatives.

Run: .venv/bin/pytest -q tests/test_synthworld.py
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest

from pipeline.data.synthworld import (
    CAMERA_HEIGHT_M,
    CORE_RADIUS,
    SEMANTIC_CLASSES,
    SHAPE_MASKS,
    SIZE_METRES,
    STUFF_CLASSES,
    THING_CLASSES,
    Scene,
    WorldConfig,
    caption_mentions,
    main_thing,
    make_scene,
    parse_objects,
    regions,
    shape_necessary_config,
    synthetic_captions,
    zero_shot_label,
    zero_shot_prompts,
)


@lru_cache(maxsize=8)
def scenes(cfg: WorldConfig, n: int, split: str = "train") -> tuple[Scene, ...]:
    return tuple(make_scene(cfg, i, split) for i in range(n))


GROUND = ("grass", "water", "sand", "road", "snow", "gravel")


def full_mask(thing, size: int) -> np.ndarray:
    """The thing's whole shape (before occlusion), rebuilt independently from its centre and radius."""
    c = (np.arange(size) + 0.5 - thing.center[0]) / thing.radius
    r = (np.arange(size) + 0.5 - thing.center[1]) / thing.radius
    inside = (np.abs(c)[None, :] <= 1.0 + 1.5 / thing.radius) & (
        np.abs(r)[:, None] <= 1.0 + 1.5 / thing.radius
    )
    return SHAPE_MASKS[thing.shape](c[None, :], r[:, None]) & inside


def test_same_seed_split_and_index_give_identical_scenes_and_others_differ():
    cfg = WorldConfig(image_size=64, seed=3)
    a, b = make_scene(cfg, 5), make_scene(cfg, 5)
    for name in ("image", "semantic", "instances", "depth"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.precise_caption, a.noisy_caption, a.uid) == (b.precise_caption, b.noisy_caption, b.uid)
    assert not np.array_equal(a.image, make_scene(cfg, 6).image)
    assert not np.array_equal(a.image, make_scene(cfg, 5, "val").image)
    assert not np.array_equal(a.image, make_scene(WorldConfig(image_size=64, seed=4), 5).image)
    # Any index can be made alone: making others first does not change it.
    later = [make_scene(cfg, i) for i in range(3)][-1]
    assert later.uid != a.uid
    np.testing.assert_array_equal(make_scene(cfg, 5).image, a.image)


def test_caption_noise_knobs_do_not_change_the_image():
    clean = make_scene(WorldConfig(drop_object_prob=0.0, unrelated_caption_prob=0.0), 11)
    noisy = make_scene(WorldConfig(drop_object_prob=0.9, unrelated_caption_prob=0.9), 11)
    np.testing.assert_array_equal(clean.image, noisy.image)
    assert clean.precise_caption == noisy.precise_caption


@pytest.mark.parametrize("shape", THING_CLASSES)
def test_every_shape_lies_in_its_square_and_contains_the_core_disc(shape):
    g = np.linspace(-1.5, 1.5, 301)
    u, v = np.meshgrid(g, g)
    m = SHAPE_MASKS[shape](u, v)
    assert m.any()
    assert not m[(np.abs(u) > 1.0) | (np.abs(v) > 1.0)].any(), "shape leaves the unit square"
    assert m[u * u + v * v <= CORE_RADIUS**2].all(), "shape does not contain the core disc"


def test_world_has_the_full_vocabulary():
    assert len(THING_CLASSES) >= 8 and len(STUFF_CLASSES) >= 6
    assert SEMANTIC_CLASSES == STUFF_CLASSES + THING_CLASSES
    seen_shapes, seen_stuff, seen_sizes, seen_colours = set(), set(), set(), set()
    for s in scenes(WorldConfig(image_size=64), 300):
        assert 1 <= len(s.things) <= 4 and 1 <= len(s.stuff) <= 3
        seen_shapes |= {t.shape for t in s.things}
        seen_colours |= {t.colour for t in s.things}
        seen_sizes |= {t.size for t in s.things}
        seen_stuff |= set(s.stuff)
    assert len(seen_shapes) == 8 and len(seen_colours) == 8 and len(seen_sizes) == 3
    assert seen_stuff == set(STUFF_CLASSES)


@pytest.mark.parametrize("size", [64, 160])
def test_masks_boxes_semantic_map_and_depth_agree(size):
    cfg = WorldConfig(image_size=size)
    for s in scenes(cfg, 40 if size == 64 else 10):
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.semantic.dtype == np.uint8 and s.semantic.max() < len(SEMANTIC_CLASSES)
        assert s.depth.dtype == np.float32 and (s.depth > 0).all() and (s.depth <= cfg.max_depth + 1e-4).all()
        for k, t in enumerate(s.things, start=1):
            np.testing.assert_array_equal(t.mask, s.instances == k)
            assert t.area == t.mask.sum() > 0
            x0, y0, x1, y1 = t.box
            assert t.mask[y0:y1, x0:x1].sum() == t.area, "mask leaves its box"
            assert (
                t.mask[y0].any() and t.mask[y1 - 1].any() and t.mask[:, x0].any() and t.mask[:, x1 - 1].any()
            )
            assert (s.semantic[t.mask] == SEMANTIC_CLASSES.index(t.shape)).all()
            np.testing.assert_allclose(s.depth[t.mask], t.depth, rtol=1e-5)
            assert t.radius >= cfg.min_radius * size - 1e-6
        background = s.instances == 0
        assert (s.semantic[background] < len(STUFF_CLASSES)).all()
        for name in s.stuff:
            assert (s.semantic == STUFF_CLASSES.index(name)).any(), f"{name} named but not visible"


def test_occlusion_follows_depth_nearest_thing_is_visible():
    size = 64
    for s in scenes(WorldConfig(image_size=size), 60):
        depths = [t.depth for t in s.things]
        assert depths == sorted(depths, reverse=True), "things are listed far to near"
        nearest = np.zeros((size, size), np.int32)
        best = np.full((size, size), np.inf)
        for k, t in enumerate(s.things, start=1):
            m = full_mask(t, size)
            closer = m & (t.depth < best)
            nearest[closer], best[closer] = k, t.depth
        np.testing.assert_array_equal(s.instances, nearest)


def test_depth_has_visual_evidence_size_with_distance_and_ground_contact():
    size = 128
    for s in scenes(WorldConfig(image_size=size), 30):
        for t in s.things:
            # Apparent radius shrinks with distance: r = f * R / Z (f = image size).
            assert t.radius * t.depth == pytest.approx(size * SIZE_METRES[t.size], rel=1e-4)
            # The thing stands on the ground: its base row is where the ground is at its distance.
            base = t.center[1] + t.radius
            assert size * CAMERA_HEIGHT_M / (base - s.horizon) == pytest.approx(t.depth, rel=1e-4)
        ground = np.isin(s.semantic, [STUFF_CLASSES.index(c) for c in GROUND])
        ys, _ = np.nonzero(ground)
        expected = np.minimum(size * CAMERA_HEIGHT_M / (ys + 0.5 - s.horizon), 20.0)
        np.testing.assert_allclose(s.depth[ground], expected, rtol=1e-4)
    # The horizon moves between scenes, so a row does not fix the depth.
    horizons = {round(s.horizon, 1) for s in scenes(WorldConfig(image_size=size), 30)}
    assert len(horizons) > 10


def test_precise_caption_names_every_visible_thing_with_true_attributes():
    for s in scenes(WorldConfig(image_size=64), 300):
        named = sorted(parse_objects(s.precise_caption))
        assert named == sorted((t.size, t.colour, t.shape) for t in s.things), s.precise_caption
        for name in s.stuff:
            word = {"sky": "sky", "wall": "wall", "road": "road"}.get(name, name)
            assert word in s.precise_caption
        if len(s.things) > 1:
            assert "in front of" in s.precise_caption or "to the left of" in s.precise_caption


def test_noisy_caption_drops_and_perturbs_objects_at_the_configured_rates():
    cfg = WorldConfig(
        image_size=64,
        drop_object_prob=0.3,
        wrong_attribute_prob=0.2,
        unrelated_caption_prob=0.2,
        filename_prob=0.1,
        spam_prob=0.15,
    )
    n = 400
    ss = scenes(cfg, n)
    unrelated = np.mean([s.noise["unrelated"] for s in ss])
    spam = np.mean([s.noise["spam"] for s in ss])
    assert abs(unrelated - 0.2) < 0.07 and abs(spam - 0.15) < 0.07
    described = [s for s in ss if not s.noise["unrelated"]]
    filenames = np.mean([s.noise["filename"] for s in described])
    assert abs(filenames - 0.1) < 0.06
    assert all(re.search(r"\.(jpe?g|png|JPG)\b", s.noisy_caption) for s in described if s.noise["filename"])
    # Measured against the world's ground truth, not the noise record.
    texts = [s for s in described if not s.noise["filename"]]
    things = [(s, t) for s in texts for t in s.things]
    correct = np.mean([caption_mentions(s.noisy_caption, t) for s, t in things])
    assert abs(correct - 0.7 * 0.8) < 0.07
    named = sum(len(parse_objects(s.noisy_caption)) for s in texts) / len(things)
    assert abs(named - 0.7) < 0.07
    wrong = [
        p
        for s in texts
        for p in parse_objects(s.noisy_caption)
        if p not in {(t.size, t.colour, t.shape) for t in s.things}
    ]
    assert abs(len(wrong) / len(things) - 0.7 * 0.2) < 0.06
    # The precise caption of the same scenes names everything.
    assert np.mean([caption_mentions(s.precise_caption, t) for s in ss for t in s.things]) == 1.0


def test_noise_free_web_caption_names_every_thing():
    cfg = WorldConfig(
        drop_object_prob=0.0,
        wrong_attribute_prob=0.0,
        unrelated_caption_prob=0.0,
        filename_prob=0.0,
        spam_prob=0.0,
    )
    for s in scenes(cfg, 50):
        assert sorted(parse_objects(s.noisy_caption)) == sorted((t.size, t.colour, t.shape) for t in s.things)


def test_hard_negative_groups_differ_only_in_shapes():
    cfg = WorldConfig(image_size=64, group_size=4, num_shapes=8)
    shape_words = re.compile(r"\b(" + "|".join(THING_CLASSES) + r")\b")
    for g in range(10):
        group = [make_scene(cfg, 4 * g + j) for j in range(4)]
        skeletons = {shape_words.sub("<shape>", s.precise_caption) for s in group}
        assert len(skeletons) == 1, skeletons
        assert len({s.precise_caption for s in group}) == 4, "members must differ in their shapes"
        first = group[0]
        for s in group[1:]:
            assert s.stuff == first.stuff and s.group == first.group == g
            assert [(t.colour, t.size, t.center, t.radius, t.depth) for t in s.things] == [
                (t.colour, t.size, t.center, t.radius, t.depth) for t in first.things
            ]
            both_background = (s.instances == 0) & (first.instances == 0)
            np.testing.assert_array_equal(s.image[both_background], first.image[both_background])
            np.testing.assert_array_equal(s.depth[both_background], first.depth[both_background])
    # Neighbouring groups are different scenes.
    assert make_scene(cfg, 0).precise_caption != make_scene(cfg, 4).precise_caption


def test_shape_necessary_world_removes_colour_and_size_shortcuts():
    cfg = shape_necessary_config()
    ss = scenes(cfg, 64)
    for s in ss:
        assert len({t.colour for t in s.things}) == 1 and {t.size for t in s.things} == {"medium"}
        assert {t.shape for t in s.things} <= set(THING_CLASSES[:4])
        assert set(s.stuff) <= set(STUFF_CLASSES[:3])
        assert all(t.radius >= 8 for t in s.things)


def test_synthetic_captions_are_diverse_faithful_and_deterministic():
    s = scenes(WorldConfig(image_size=64), 20)[7]
    caps = synthetic_captions(s, 5, seed=0)
    assert len(caps) == 5 and len(set(caps)) == 5
    truth = sorted((t.size, t.colour, t.shape) for t in s.things)
    for c in caps:
        assert sorted(parse_objects(c)) == truth, c
    assert synthetic_captions(s, 5, seed=0) == caps
    assert synthetic_captions(s, 5, seed=1) != caps
    for other in scenes(WorldConfig(image_size=64), 20):
        for c in synthetic_captions(other, 3, seed=2):
            assert sorted(parse_objects(c)) == sorted((t.size, t.colour, t.shape) for t in other.things)


def test_zero_shot_and_region_labels():
    prompts = zero_shot_prompts()
    assert len(prompts) >= 4 and all("{}" in p for p in prompts)
    for s in scenes(WorldConfig(image_size=64), 40):
        label = zero_shot_label(s)
        assert THING_CLASSES[label] == main_thing(s).shape
        assert main_thing(s).radius == max(t.radius for t in s.things)
        regs = regions(s)
        assert [r.label for r in regs if r.kind == "thing"] == [t.shape for t in s.things]
        stuff_regions = {r.label for r in regs if r.kind == "stuff"}
        assert set(s.stuff) <= stuff_regions
        covered = np.zeros(s.semantic.shape, bool)
        for r in regs:
            x0, y0, x1, y1 = r.box
            assert r.mask.sum() == r.mask[y0:y1, x0:x1].sum() > 0
            assert (s.semantic[r.mask] == r.class_id).all()
            covered |= r.mask
        assert covered.all(), "regions cover every pixel"


@pytest.mark.parametrize(
    "field,value",
    [
        ("image_size", 32),
        ("max_things", 9),
        ("num_shapes", 0),
        ("min_radius", 0.5),
        ("drop_object_prob", 1.5),
        ("group_size", 0),
    ],
)
def test_bad_config_values_raise_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**{field: value})

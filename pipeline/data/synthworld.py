"""The synthetic world: procedural image-text scenes with dense labels, deterministic from a seed.

Each scene is a small 3-D world seen by a pinhole camera standing on a ground plane:

* **stuff** (1-3 regions): the ground (grass, water, sand, road, snow, gravel) textured in ground-plane
  coordinates, so its texture gets finer towards the horizon, and above it the sky and/or a brick wall
  standing at a distance (brick size tells how far it is). The horizon moves from scene to scene, so the
  depth of a pixel is not a function of its row.
* **things** (1-4 objects, shapes x colours x sizes): flat cut-outs standing on the ground. A thing of
  physical radius ``R`` at distance ``Z`` has apparent radius ``f*R/Z`` and its base on the ground row
  ``horizon + f*h/Z``: farther things are smaller, higher up, hazier and drawn behind nearer ones.
* labels: precise caption, noisy web caption, instance masks (visible pixels), boxes, a semantic map over
  :data:`SEMANTIC_CLASSES`, per-pixel depth in metres.

Every scene is a pure function of ``(cfg, split, index)``: any index can be made alone (sharding by ranges,
parallel workers). With ``group_size > 1`` the scenes ``index // group_size`` share colours, background and
layout and differ only in their shapes (hard negatives: their captions differ only in shape words).

    from pipeline.data.synthworld import WorldConfig, make_scene
    scene = make_scene(WorldConfig(image_size=128), index=7, split="train")
    scene.image, scene.precise_caption, scene.noisy_caption, scene.semantic, scene.depth

Command line (writes the world out in real data layouts): ``python -m data_prep.synthworld --help``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------- vocabulary

THING_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "diamond",
    "hexagon",
)
"""Shape names (the thing categories). ``num_shapes`` uses the first N (the first 4 are the most distinct)."""

STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "wall", "water", "sand", "road", "snow", "gravel")
"""Background classes. ``num_stuff_classes`` uses the first N; sky and wall sit above the horizon."""

SEMANTIC_CLASSES: tuple[str, ...] = STUFF_CLASSES + THING_CLASSES
"""Semantic maps index into this tuple (every pixel is one stuff or one thing class; there is no void)."""

COLOURS: tuple[str, ...] = ("red", "blue", "yellow", "green", "purple", "orange", "white", "black")
SIZES: tuple[str, ...] = ("small", "medium", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 25),
    "green": (35, 175, 60),
    "purple": (145, 45, 185),
    "orange": (250, 135, 15),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZE_METRES: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.45}
"""Physical radius of a thing (half its height) per size word."""

CAMERA_HEIGHT_M = 1.0
"""Camera height above the ground plane (metres). Fixed, so size follows from apparent size + base row."""

UPPER_STUFF = ("sky", "wall")
STUFF_ID = {name: i for i, name in enumerate(STUFF_CLASSES)}
THING_ID = {name: len(STUFF_CLASSES) + i for i, name in enumerate(THING_CLASSES)}


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the synthetic world (scene content, difficulty, and web-caption noise)."""

    image_size: int = 64
    """Square image side in pixels (64 to 512)."""
    seed: int = 0
    """World seed; a scene is a pure function of (seed, split, index)."""
    min_things: int = 1
    """Fewest thing objects per scene (fewer only when radius and visibility knobs leave no room)."""
    max_things: int = 4
    """Most thing objects per scene (fewer when no non-hidden placement is found)."""
    min_stuff: int = 1
    """Fewest background (stuff) regions per scene."""
    max_stuff: int = 3
    """Most background (stuff) regions per scene (1 to 3)."""
    num_shapes: int = 8
    """How many shapes are used (the first N of THING_CLASSES; 4 = circle, square, triangle, star)."""
    num_colours: int = 8
    """How many colours are used (the first N of COLOURS; 2 = red, blue)."""
    num_sizes: int = 3
    """How many size words are used: 1 = medium only, 2 = small and large, 3 = all."""
    num_stuff_classes: int = 8
    """How many stuff classes are used (the first N of STUFF_CLASSES: sky, grass, wall, water, ...; >= 2)."""
    one_colour_per_scene: bool = False
    """All things of a scene share one colour (so colour cannot tell images of a batch apart)."""
    min_radius: float = 0.125
    """Smallest apparent thing radius as a fraction of the image side (0.125 = 8 px at 64 px)."""
    max_radius: float = 0.25
    """Largest apparent thing radius as a fraction of the image side."""
    min_visible: float = 0.5
    """Least fraction of each thing's central core that must stay unoccluded and inside the image."""
    group_size: int = 1
    """Hard-negative groups: scenes with the same index // group_size share colours, background and
    layout and differ only in shapes. 1 = off."""
    haze: float = 0.35
    """Aerial perspective: how strongly far pixels fade towards the haze colour (0 = off)."""
    noise_std: float = 3.0
    """Standard deviation of per-pixel Gaussian noise (0-255 scale)."""
    max_depth: float = 20.0
    """Depth of the sky and cap of the ground depth, metres."""
    drop_object_prob: float = 0.3
    """Noisy caption: probability that an object is left out."""
    wrong_attribute_prob: float = 0.2
    """Noisy caption: probability that a kept object has one wrong attribute (size, colour or shape)."""
    unrelated_caption_prob: float = 0.2
    """Noisy caption: probability that the alt-text is about something else entirely."""
    filename_prob: float = 0.1
    """Noisy caption: probability that the alt-text is a file name such as IMG_2041.jpg."""
    spam_prob: float = 0.1
    """Noisy caption: probability that spam ("buy now free shipping") is appended."""
    background_in_noisy_prob: float = 0.5
    """Noisy caption: probability that the (described) alt-text also names the background."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {msg}")

        check(64 <= self.image_size <= 512, "image_size", "must be between 64 and 512")
        check(1 <= self.min_things <= 4, "min_things", "must be between 1 and 4")
        check(self.min_things <= self.max_things <= 4, "max_things", "must be between min_things and 4")
        check(1 <= self.min_stuff <= 3, "min_stuff", "must be between 1 and 3")
        check(self.min_stuff <= self.max_stuff <= 3, "max_stuff", "must be between min_stuff and 3")
        check(1 <= self.num_shapes <= len(THING_CLASSES), "num_shapes", f"must be 1..{len(THING_CLASSES)}")
        check(1 <= self.num_colours <= len(COLOURS), "num_colours", f"must be 1..{len(COLOURS)}")
        check(1 <= self.num_sizes <= len(SIZES), "num_sizes", f"must be 1..{len(SIZES)}")
        check(
            2 <= self.num_stuff_classes <= len(STUFF_CLASSES),
            "num_stuff_classes",
            f"must be 2..{len(STUFF_CLASSES)}",
        )
        check(0.03 <= self.min_radius <= 0.45, "min_radius", "must be between 0.03 and 0.45 of the image")
        check(self.min_radius <= self.max_radius <= 0.45, "max_radius", "must be between min_radius and 0.45")
        check(0.0 <= self.min_visible <= 1.0, "min_visible", "must be in [0, 1]")
        check(self.group_size >= 1, "group_size", "must be >= 1")
        check(0.0 <= self.haze <= 1.0, "haze", "must be in [0, 1]")
        check(self.noise_std >= 0.0, "noise_std", "must be >= 0")
        check(self.max_depth > 2.0, "max_depth", "must be > 2 metres")
        for name in (
            "drop_object_prob",
            "wrong_attribute_prob",
            "unrelated_caption_prob",
            "filename_prob",
            "spam_prob",
            "background_in_noisy_prob",
        ):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")

    @property
    def shapes(self) -> tuple[str, ...]:
        return THING_CLASSES[: self.num_shapes]

    @property
    def colours(self) -> tuple[str, ...]:
        return COLOURS[: self.num_colours]

    @property
    def sizes(self) -> tuple[str, ...]:
        return {1: ("medium",), 2: ("small", "large"), 3: SIZES}[self.num_sizes]

    @property
    def stuff_classes(self) -> tuple[str, ...]:
        return STUFF_CLASSES[: self.num_stuff_classes]


def shape_necessary_config(**overrides: Any) -> WorldConfig:
    """A world where shape is needed to match a caption (see docs/synthworld.md): 4 shapes, 2 colours with
    one per scene, one size word, 3 stuff classes, 1-2 things, hard-negative groups of 8."""
    base: dict[str, Any] = dict(
        num_shapes=4,
        num_colours=2,
        one_colour_per_scene=True,
        num_sizes=1,
        num_stuff_classes=3,
        min_things=1,
        max_things=2,
        group_size=8,
    )
    base.update(overrides)
    return WorldConfig(**base)


# ------------------------------------------------------------------------------------------- data types


@dataclass
class Thing:
    """One object. ``box`` and ``mask`` cover its *visible* pixels; ``box`` is (x0, y0, x1, y1), exclusive."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    depth: float
    mask: np.ndarray
    center: tuple[float, float] = (0.0, 0.0)
    """Centre (x, y) of its full extent in pixels."""
    radius: float = 0.0
    """Apparent half-extent in pixels (the full shape lies in the square center +- radius)."""
    area: int = 0
    """Visible pixels."""

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def class_id(self) -> int:
        """Index into SEMANTIC_CLASSES."""
        return THING_ID[self.shape]


@dataclass
class Scene:
    """One image with all its labels. ``instances`` is 0 for background, k for ``things[k-1]``; things are
    listed far to near (drawing order)."""

    index: int
    uid: str
    image: np.ndarray
    precise_caption: str
    noisy_caption: str
    things: list[Thing]
    stuff: list[str]
    semantic: np.ndarray
    instances: np.ndarray
    depth: np.ndarray
    split: str = "train"
    group: int = 0
    horizon: float = 0.0
    """Horizon row in pixels (may be above the image when the camera looks down)."""
    noise: dict[str, Any] = field(default_factory=dict)
    """What the noisy caption did: unrelated / filename / spam / background flags, dropped thing indices,
    and wrong attributes {thing index: [attribute, wrong value]} (ground truth for measuring noise)."""

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


# ------------------------------------------------------------------------------------------------ seeding


def _split_key(split: str) -> int:
    if not split or not isinstance(split, str):
        raise ValueError(f"split={split!r}: must be a non-empty string such as 'train', 'val' or 'test'")
    return zlib.crc32(split.encode("utf-8"))


def _rng(seed: int, split: str, key: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, _split_key(split), key, stream]))


_LAYOUT, _NOISE, _PIXELS, _SYN = 1, 2, 3, 4


def scene_uid(cfg: WorldConfig, index: int, split: str = "train") -> str:
    """Stable sample id, safe as a file name and a WebDataset key (no dots)."""
    return f"{split}-s{cfg.seed}-{index:08d}"


# ----------------------------------------------------------------------------------------------- textures


def _hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic per-cell noise in [0, 1) from integer cell coordinates (vectorised integer hash)."""
    h = a.astype(np.int32).view(np.uint32) * np.uint32(0x9E3779B1)
    h ^= b.astype(np.int32).view(np.uint32) * np.uint32(0x85EBCA77)
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    return h.astype(np.float32) * np.float32(1.0 / 4294967296.0)


def _cells(x: np.ndarray, z: np.ndarray, sx: float, sz: float, salt: int) -> np.ndarray:
    return _hash01(np.floor(x * np.float32(1 / sx)), np.floor(z * np.float32(1 / sz)), salt)


def _mix(c0: tuple[int, int, int], c1: tuple[int, int, int], t: np.ndarray) -> np.ndarray:
    """Colours between ``c0`` (t=0) and ``c1`` (t=1) for a 1-D array ``t``: (n, 3) float32."""
    a = np.asarray(c0, np.float32)
    return a + np.outer(t, np.asarray(c1, np.float32) - a)


def _ground_texture(name: str, x: np.ndarray, z: np.ndarray, salt: int, lane_x: float) -> np.ndarray:
    """Texture of a ground class at ground-plane points (1-D x across, z forward; metres): (n, 3).

    Textures live on the ground plane, so they get finer towards the horizon (a depth cue)."""
    two_pi = np.float32(2 * math.pi)
    if name == "grass":
        t = 0.6 * _cells(x, z, 0.05, 0.2, salt) + 0.4 * _cells(x, z, 0.5, 0.5, salt + 1)
        return _mix((40, 105, 40), (125, 190, 80), t)
    if name == "water":
        t = 0.5 + 0.5 * np.sin(
            two_pi * z / np.float32(0.6) + 1.5 * np.sin(two_pi * x / np.float32(2.0) + salt % 7)
        )
        col = _mix((20, 70, 150), (75, 135, 205), t)
        col[_cells(x, z, 0.05, 0.05, salt) > 0.97] = (200, 220, 240)
        return col
    if name == "sand":
        ripple = 0.5 + 0.5 * np.sin(two_pi * (z + np.float32(0.4) * x) / np.float32(0.35))
        t = 0.5 * _cells(x, z, 0.02, 0.02, salt) + 0.5 * ripple
        return _mix((185, 160, 105), (240, 220, 165), t)
    if name == "road":
        col = _mix((55, 55, 60), (105, 105, 110), _cells(x, z, 0.03, 0.03, salt))
        col[(np.abs(x - lane_x) < 0.07) & (np.mod(z, 2.0) < 1.0)] = (235, 235, 215)
        return col
    if name == "snow":
        t = 0.7 * _cells(x, z, 0.8, 0.8, salt) + 0.3 * _cells(x, z, 0.08, 0.08, salt + 1)
        return _mix((205, 212, 230), (252, 252, 255), t)
    if name == "gravel":
        col = _mix((95, 90, 85), (180, 170, 155), _cells(x, z, 0.08, 0.08, salt))
        col[_cells(x, z, 0.03, 0.03, salt + 1) > 0.85] = (60, 55, 50)
        return col
    raise ValueError(f"unknown ground class {name!r}")


def _sky_texture(rows: np.ndarray, horizon: float) -> np.ndarray:
    """Sky colour for pixels on the given rows (1-D): a gradient that pales towards the horizon."""
    t = np.clip(rows * np.float32(1.0 / max(horizon, 1.0)), 0.0, 1.0)
    return _mix((85, 135, 215), (190, 212, 240), t)


def _wall_texture(xw: np.ndarray, yw: np.ndarray, salt: int) -> np.ndarray:
    """Brick wall at wall-plane points (1-D xw across, yw up; metres): brick size shows the distance."""
    bh, bw = 0.16, 0.34
    rf = yw * np.float32(1 / bh)
    row = np.floor(rf)
    shifted = xw * np.float32(1 / bw) + 0.5 * np.mod(row, 2)
    col_i = np.floor(shifted)
    col = _mix((140, 55, 40), (195, 95, 65), _hash01(col_i, row, salt))
    col[((shifted - col_i) < 0.08) | ((rf - row) < 0.14)] = (200, 195, 185)
    return col


# ------------------------------------------------------------------------------------------------- shapes


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u) + np.pi / 2  # measured from "up" (image v points down)
    seg = 2 * np.pi / 5
    phi = np.mod(theta, seg)
    phi = np.minimum(phi, seg - phi)  # 0 at a tip, seg/2 between tips
    alpha = seg / 2
    inner = 0.5
    boundary = inner * np.sin(alpha) / (np.sin(phi) + inner * np.sin(alpha - phi))
    return rho <= boundary


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x = 1.14 * u
    y = -1.12 * v + 0.12
    a = x * x + y * y - 1.0
    return a * a * a - x * x * y * y * y <= 0.0


SHAPE_MASKS = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
    "triangle": lambda u, v: (v <= 1.0) & (np.abs(u) <= (v + 1.0) * 0.5),
    "star": _star,
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    ),
    "heart": _heart,
    "diamond": lambda u, v: np.abs(u) / 0.75 + np.abs(v) <= 1.0,
    "hexagon": lambda u, v: (np.abs(v) <= 0.866) & (1.732 * np.abs(u) + np.abs(v) <= 1.732),
}
"""Shape masks in unit coordinates (u right, v down, both in [-1, 1]). Every shape lies inside the unit
square and contains the disc of radius CORE_RADIUS (a test checks both), so visibility can be checked
without knowing the shape: this is what lets hard-negative groups swap shapes without changing layout."""
CORE_RADIUS = 0.4

# Sample points of the core disc (unit radius), for the shape-independent visibility test.
_ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
_CORE_POINTS = np.concatenate(
    [np.zeros((1, 2))]
    + [np.stack([rr * np.cos(_ang + rr), rr * np.sin(_ang + rr)], 1) for rr in (0.35, 0.7, 1.0)]
)


# ------------------------------------------------------------------------------------------------ layout


@dataclass
class _Placed:
    slot: int
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    z: float


@dataclass
class _Layout:
    horizon: float
    upper: list[str]
    ground: list[str]
    things: list[_Placed]
    wall_depth: float
    wall_top: float
    split_kind: str
    split_params: tuple[float, ...]
    lane_x: float
    shape_tuples: list[tuple[int, ...]]
    salt: int


def _choose_stuff(cfg: WorldConfig, g: np.random.Generator) -> tuple[list[str], list[str]]:
    enabled = cfg.stuff_classes
    uppers = [s for s in enabled if s in UPPER_STUFF]
    grounds = [s for s in enabled if s not in UPPER_STUFF]
    n = int(g.integers(cfg.min_stuff, cfg.max_stuff + 1))
    if not grounds:  # only sky and wall enabled: impossible with num_stuff_classes >= 2 ordering, be safe
        grounds = ["grass"]
    options: list[tuple[list[str], list[str]]] = []
    if n >= 3:
        if "sky" in uppers and "wall" in uppers:
            options.append((["sky", "wall"], [str(g.choice(grounds))]))
        if uppers and len(grounds) >= 2:
            pair = [str(s) for s in g.choice(grounds, 2, replace=False)]
            options.append(([str(g.choice(uppers))], pair))
        if options:
            return options[int(g.integers(len(options)))]
        n = 2
    if n == 2 and uppers:
        return [str(g.choice(uppers))], [str(g.choice(grounds))]
    if n == 2 and len(grounds) >= 2:
        return [], [str(s) for s in g.choice(grounds, 2, replace=False)]
    return [], [str(g.choice(grounds))]


def _visible_enough(things: list[_Placed], size: int, min_visible: float) -> bool:
    """Shape-independent check: each thing's core disc stays mostly inside the image and outside the
    bounding squares of all nearer things."""
    for t in things:
        pts = t.r * CORE_RADIUS * _CORE_POINTS + np.array([t.cx, t.cy])
        hidden = (pts[:, 0] < 0) | (pts[:, 0] >= size) | (pts[:, 1] < 0) | (pts[:, 1] >= size)
        for o in things:
            if o.z < t.z:
                hidden |= (np.abs(pts[:, 0] - o.cx) <= o.r) & (np.abs(pts[:, 1] - o.cy) <= o.r)
        if hidden.all() or 1.0 - hidden.mean() < min_visible:
            return False
    return True


def _place_thing(
    cfg: WorldConfig, g: np.random.Generator, horizon: float, slot: int, colour: str, placed: list[_Placed]
) -> _Placed | None:
    size_px = cfg.image_size
    f = float(size_px)
    rmin, rmax = cfg.min_radius * size_px, cfg.max_radius * size_px
    for _ in range(30):
        size = str(g.choice(cfg.sizes))
        k = CAMERA_HEIGHT_M / SIZE_METRES[size]  # base row = horizon + k * r
        hi = min(rmax, (size_px - horizon) / (k - 0.25))  # base at most r/4 below the bottom edge
        lo = rmin
        if horizon < 0 and k > 1.75:  # top at most r/4 above the top edge when looking down
            lo = max(lo, -horizon / (k - 1.75))
        if hi < lo:
            continue
        r = float(g.uniform(lo, hi))
        z = f * SIZE_METRES[size] / r
        cy = horizon + k * r - r
        cx = float(g.uniform(r, size_px - r)) if size_px > 2 * r else size_px / 2
        cand = _Placed(slot, colour, size, cx, cy, r, z)
        if _visible_enough(placed + [cand], size_px, cfg.min_visible):
            return cand
    return None


def _make_layout(cfg: WorldConfig, group: int, split: str) -> _Layout:
    g = _rng(cfg.seed, split, group, _LAYOUT)
    size_px = cfg.image_size
    f = float(size_px)
    n_things = int(g.integers(cfg.min_things, cfg.max_things + 1))
    colours = cfg.colours
    scene_colour = str(g.choice(colours))
    best: tuple[list[str], list[str], float, list[_Placed]] | None = None
    for _attempt in range(8):  # a new background and horizon when the things do not all fit
        upper, ground = _choose_stuff(cfg, g)
        if upper:
            horizon = float(g.uniform(0.2, 0.45)) * size_px
        else:
            horizon = float(g.uniform(-0.1, -0.01)) * size_px
        placed: list[_Placed] = []
        for slot in range(n_things):
            colour = scene_colour if cfg.one_colour_per_scene else str(g.choice(colours))
            t = _place_thing(cfg, g, horizon, slot, colour, placed)
            if t is not None:
                placed.append(t)
        if best is None or len(placed) > len(best[3]):
            best = (upper, ground, horizon, placed)
        if len(placed) == n_things:
            break
    assert best is not None
    upper, ground, horizon, placed = best
    if not placed:  # always at least one thing: take the roomiest placement without the visibility test
        size = cfg.sizes[-1]
        r = cfg.min_radius * size_px
        k = CAMERA_HEIGHT_M / SIZE_METRES[size]
        placed.append(
            _Placed(0, scene_colour, size, size_px / 2, horizon + k * r - r, r, f * SIZE_METRES[size] / r)
        )
    # Wall: a frontal plane behind every thing; its base row is where the ground reaches its distance.
    far = max(t.z for t in placed)
    wall_depth = min(cfg.max_depth * 0.9, far * float(g.uniform(1.3, 2.0)))
    wall_base = horizon + f * CAMERA_HEIGHT_M / wall_depth
    wall_top = float(g.uniform(0.15, 0.6)) * min(horizon, wall_base) if upper == ["sky", "wall"] else -1e9
    # Two ground classes: far/near along a wavy shore, or left/right along a line to the vanishing point.
    split_kind, split_params = "none", ()
    if len(ground) == 2:
        top = max(horizon, 0.0, wall_base if "wall" in upper else 0.0)
        if g.random() < 0.5:
            y_s = top + float(g.uniform(0.3, 0.7)) * (size_px - top)
            z_s = f * CAMERA_HEIGHT_M / max(y_s + 0.5 - horizon, 1e-3)
            split_params = (z_s, float(g.uniform(1.5, 4.0)), float(g.uniform(0, 2 * np.pi)))
            split_kind = "far_near"
        else:
            z_bottom = f * CAMERA_HEIGHT_M / max(size_px - horizon, 1e-3)
            slope = float(g.uniform(-0.3, 0.3))
            x_bottom = float(g.uniform(0.3, 0.7)) * size_px
            x0 = ((x_bottom - size_px / 2) / f - slope) * z_bottom
            split_params = (x0, slope)
            split_kind = "left_right"
    shape_tuples = _shape_tuples(g, cfg.num_shapes, len(placed), cfg.group_size)
    return _Layout(
        horizon=horizon,
        upper=upper,
        ground=ground,
        things=placed,
        wall_depth=wall_depth,
        wall_top=wall_top,
        split_kind=split_kind,
        split_params=split_params,
        lane_x=float(g.uniform(-0.5, 0.5)),
        shape_tuples=shape_tuples,
        salt=int(g.integers(0, 2**31)),
    )


def _shape_tuples(g: np.random.Generator, num_shapes: int, n: int, group_size: int) -> list[tuple[int, ...]]:
    """Shapes (indices) of the n things for each member of a hard-negative group: distinct tuples (as many
    as exist), each with distinct shapes within the scene when there are enough shapes."""
    distinct = n <= num_shapes
    count = math.perm(num_shapes, n) if distinct else num_shapes**n
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < min(group_size, count):
        draw = g.choice(num_shapes, n, replace=False) if distinct else g.integers(0, num_shapes, n)
        t = tuple(int(v) for v in draw)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _shape_of(cfg: WorldConfig, layout: _Layout, i: int, member: int) -> str:
    """Shape of thing slot ``i`` for group member ``member`` (members cycle when the group is larger than
    the number of distinct shape tuples)."""
    tuples = layout.shape_tuples
    return cfg.shapes[tuples[member % len(tuples)][i]]


# -------------------------------------------------------------------------------------------- rendering


def _render_background(cfg: WorldConfig, lay: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 HxWx3, stuff index uint8 HxW, depth float32 HxW) of the empty scene."""
    size = cfg.image_size
    f = float(size)
    rows = np.arange(size, dtype=np.float32) + np.float32(0.5)
    cols = np.arange(size, dtype=np.float32) + np.float32(0.5)
    below = rows - np.float32(lay.horizon)
    z_row = np.float32(f * CAMERA_HEIGHT_M) / np.maximum(below, np.float32(1e-3))
    z_row = np.where(below > 1e-3, np.minimum(z_row, np.float32(cfg.max_depth)), np.float32(cfg.max_depth))
    x_col = (cols - np.float32(size / 2)) / np.float32(f)  # ground x = x_col * z
    has_wall = "wall" in lay.upper
    wall_base = lay.horizon + f * CAMERA_HEIGHT_M / lay.wall_depth
    # Row-wise layout: sky above the wall top, the wall down to its base, the ground below.
    if has_wall:
        ground_row = rows > wall_base
        wall_row = (~ground_row) & (rows > lay.wall_top)
    else:
        ground_row = below > 0
        wall_row = np.zeros(size, bool)
    stuff = np.empty((size, size), np.uint8)
    stuff[:] = STUFF_ID["sky"] if "sky" in lay.upper else STUFF_ID[lay.ground[0]]
    stuff[wall_row] = STUFF_ID["wall"]
    g0 = int(np.argmax(ground_row)) if ground_row.any() else size  # first ground row (rows are monotone)
    gz = np.broadcast_to(z_row[g0:, None], (size - g0, size))
    gx = x_col[None, :] * gz
    if len(lay.ground) == 2:
        if lay.split_kind == "far_near":
            z_s, lam, phase = lay.split_params
            first = gz > z_s * (1 + 0.15 * np.sin(np.float32(2 * np.pi / lam) * gx + np.float32(phase)))
        else:
            x0, slope = lay.split_params
            first = gx < x0 + slope * gz
        stuff[g0:] = np.where(first, STUFF_ID[lay.ground[0]], STUFF_ID[lay.ground[1]])
    else:
        stuff[g0:] = STUFF_ID[lay.ground[0]]
    depth = np.full((size, size), cfg.max_depth, np.float32)
    depth[g0:] = gz
    depth[wall_row] = lay.wall_depth
    image = np.empty((size, size, 3), np.float32)
    for name in dict.fromkeys(lay.upper + lay.ground):
        sel = stuff == STUFF_ID[name]
        ys, xs = np.nonzero(sel)
        if len(ys) == 0:
            continue
        if name == "sky":
            top = lay.horizon if not has_wall else min(lay.horizon, max(lay.wall_top, 1.0))
            tex = _sky_texture(rows[ys], top)
        elif name == "wall":
            scale = np.float32(lay.wall_depth / f)
            tex = _wall_texture(
                x_col[xs] * np.float32(lay.wall_depth), (np.float32(wall_base) - rows[ys]) * scale, lay.salt
            )
        else:
            z = z_row[ys]
            tex = _ground_texture(name, x_col[xs] * z, z, lay.salt + STUFF_ID[name], lay.lane_x)
        image[ys, xs] = tex
    return image, stuff, depth


def _outline(m: np.ndarray, width: int) -> np.ndarray:
    er = m.copy()
    for _ in range(width):
        e = er.copy()
        e[1:] &= er[:-1]
        e[:-1] &= er[1:]
        e[:, 1:] &= er[:, :-1]
        e[:, :-1] &= er[:, 1:]
        er = e
    return m & ~er


_NOISE_BANKS: dict[int, np.ndarray] = {}


def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2*size, 2*size, 3) unit-Gaussian tile; scenes take a random window of it (much cheaper
    than drawing fresh noise per image, and still deterministic)."""
    if size not in _NOISE_BANKS:
        r = np.random.default_rng(np.random.SeedSequence([0x5EED, size]))
        _NOISE_BANKS[size] = r.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    return _NOISE_BANKS[size]


def _render(cfg: WorldConfig, lay: _Layout, shapes: list[str], split: str, group: int) -> dict[str, Any]:
    size = cfg.image_size
    image, stuff, depth = _render_background(cfg, lay)
    semantic = stuff.copy()
    instances = np.zeros((size, size), np.int32)
    order = sorted(range(len(lay.things)), key=lambda i: -lay.things[i].z)  # far to near
    outline_w = max(1, round(size / 96))
    boxes = []
    for k, i in enumerate(order, start=1):
        t = lay.things[i]
        x0, x1 = max(0, math.floor(t.cx - t.r)), min(size, math.ceil(t.cx + t.r) + 1)
        y0, y1 = max(0, math.floor(t.cy - t.r)), min(size, math.ceil(t.cy + t.r) + 1)
        boxes.append((x0, y0, x1, y1))
        if x1 <= x0 or y1 <= y0:
            continue
        u = (np.arange(x0, x1, dtype=np.float32) + 0.5 - t.cx) / t.r
        v = (np.arange(y0, y1, dtype=np.float32) + 0.5 - t.cy) / t.r
        m = SHAPE_MASKS[shapes[i]](u[None, :], v[:, None])
        rgb = np.asarray(COLOUR_RGB[t.colour], np.float32)
        dark = rgb * 0.55 if t.colour != "black" else np.full(3, 95, np.float32)
        patch = image[y0:y1, x0:x1]
        patch[m] = rgb
        patch[_outline(m, outline_w)] = dark
        semantic[y0:y1, x0:x1][m] = THING_ID[shapes[i]]
        instances[y0:y1, x0:x1][m] = k
        depth[y0:y1, x0:x1][m] = t.z
    if cfg.haze > 0:
        a = cfg.haze * (1.0 - np.exp(-depth / (0.5 * cfg.max_depth)))
        image += (np.asarray((200, 210, 225), np.float32) - image) * a[..., None]
    if cfg.noise_std > 0:
        pix = _rng(cfg.seed, split, group, _PIXELS)
        bank = _noise_bank(size)
        oy, ox = (int(v) for v in pix.integers(0, size, 2))
        image += bank[oy : oy + size, ox : ox + size] * np.float32(cfg.noise_std)
    img_u8 = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return dict(image=img_u8, semantic=semantic, instances=instances, depth=depth, order=order, boxes=boxes)


# ---------------------------------------------------------------------------------------------- captions

_GROUND_WORDS = {
    "grass": "grass",
    "water": "water",
    "sand": "sand",
    "road": "a road",
    "snow": "snow",
    "gravel": "gravel",
}


def _background_phrase(upper: list[str], ground: list[str]) -> str:
    parts = []
    if ground:
        parts.append("on " + " and ".join(_GROUND_WORDS[g] for g in ground))
    if "wall" in upper:
        parts.append("in front of a brick wall")
    if "sky" in upper:
        parts.append("under the sky")
    return " ".join(parts)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _names(things: list[Thing]) -> list[str]:
    """Short names for relations: 'the red circle', with the size added where that is ambiguous."""
    short = [f"{t.colour} {t.shape}" for t in things]
    return [f"the {t.phrase}" if short.count(s) > 1 else f"the {s}" for t, s in zip(things, short)]


def _relations(things: list[Thing], occludes: dict[tuple[int, int], bool]) -> list[tuple[int, str, int]]:
    """(a, relation, b) for neighbours in left-to-right order: 'in front of' where their extents overlap,
    else 'to the left of'. Indices are into ``things``; relations depend only on the layout."""
    order = sorted(range(len(things)), key=lambda i: things[i].center[0])
    rels = []
    for a, b in zip(order, order[1:]):
        if occludes.get((a, b)) or occludes.get((b, a)):
            near, far = (a, b) if things[a].depth < things[b].depth else (b, a)
            rels.append((near, "in front of", far))
        else:
            rels.append((a, "to the left of", b))
    return rels


def _precise_caption(
    things: list[Thing], rels: list[tuple[int, str, int]], upper: list[str], ground: list[str]
) -> str:
    order = sorted(range(len(things)), key=lambda i: things[i].center[0])
    objects = _join([f"a {things[i].phrase}" for i in order])
    text = f"{objects} {_background_phrase(upper, ground)}".strip()
    text = text[0].upper() + text[1:] + "."
    if rels:
        names = _names(things)
        sentences = [f"{names[a]} is {rel} {names[b]}" for a, rel, b in rels]
        body = "; ".join(sentences)
        text += " " + body[0].upper() + body[1:] + "."
    return text


_STOCK_ALT_TEXT = (
    "Beautiful sunset over the mountains",
    "Men's cotton crew neck t-shirt",
    "Kitchen remodel ideas 2019",
    "Vintage wooden chair for sale",
    "Wedding photography portfolio",
    "Logo design template vector",
    "Cute puppy playing in the park",
    "Best pizza in town",
    "Apartment for rent downtown",
    "Abstract watercolor background",
    "Quarterly earnings report chart",
    "Waterproof hiking boots",
    "Christmas tree decorations",
    "Coffee mug with funny quote",
    "Vacation rental beach house",
    "Smartphone case with card holder",
    "Happy birthday card",
    "Graduation ceremony 2018",
    "Fresh vegetables at the farmers market",
    "Modern living room interior",
)
_SPAM = (
    "buy now free shipping",
    "click here for more",
    "best price guaranteed",
    "limited time offer",
    "shop now",
    "100% free download",
    "sale 50% off",
)


def _filename(r: np.random.Generator) -> str:
    n = int(r.integers(0, 100000))
    kind = int(r.integers(0, 6))
    if kind == 0:
        return f"IMG_{n % 10000:04d}.jpg"
    if kind == 1:
        return f"DSC{n:05d}.JPG"
    if kind == 2:
        return f"image_{n}.png"
    if kind == 3:
        return f"photo-{2010 + n % 15}-{1 + n % 12:02d}-{1 + n % 28:02d}.jpeg"
    if kind == 4:
        return f"screenshot_{n}.png"
    return f"{int(r.integers(0, 2**32)):08x}.jpg"


def _noisy_caption(
    cfg: WorldConfig, r: np.random.Generator, things: list[Thing], upper: list[str], ground: list[str]
) -> tuple[str, dict[str, Any]]:
    """The web alt-text and a record of what noise it got (decisions drawn in a fixed order)."""
    u_unrel, u_file, u_spam, u_bg = r.random(4)
    drops = r.random(len(things)) < cfg.drop_object_prob
    wrongs = r.random(len(things)) < cfg.wrong_attribute_prob
    noise: dict[str, Any] = {
        "unrelated": bool(u_unrel < cfg.unrelated_caption_prob),
        "filename": False,
        "spam": False,
        "background": False,
        "dropped": [],
        "wrong": {},
    }
    if noise["unrelated"]:
        if r.random() < 0.5:
            text = str(_STOCK_ALT_TEXT[int(r.integers(len(_STOCK_ALT_TEXT)))])
        else:  # a description of some other scene (uses the full vocabulary)
            n = int(r.integers(1, 3))
            objs = [f"{r.choice(SIZES)} {r.choice(COLOURS)} {r.choice(THING_CLASSES)}" for _ in range(n)]
            text = " and ".join(objs) + " on " + str(r.choice(list(_GROUND_WORDS.values())))
    elif u_file < cfg.filename_prob:
        noise["filename"] = True
        text = _filename(r)
    else:
        phrases = []
        for i, t in enumerate(things):
            if drops[i]:
                noise["dropped"].append(i)
                continue
            attrs = {"size": t.size, "colour": t.colour, "shape": t.shape}
            if wrongs[i]:
                choices = [
                    (name, vocab)
                    for name, vocab in (("size", cfg.sizes), ("colour", cfg.colours), ("shape", cfg.shapes))
                    if len(vocab) > 1
                ]
                if not choices:  # nothing can be wrong in a one-word vocabulary: fall back to the full one
                    choices = [("size", SIZES), ("colour", COLOURS), ("shape", THING_CLASSES)]
                name, vocab = choices[int(r.integers(len(choices)))]
                wrong = str(r.choice([w for w in vocab if w != attrs[name]]))
                attrs[name] = wrong
                noise["wrong"][i] = [name, wrong]
            phrases.append(f"{attrs['size']} {attrs['colour']} {attrs['shape']}")
        r.shuffle(phrases)
        text = " and ".join(phrases)
        if u_bg < cfg.background_in_noisy_prob or not phrases:
            noise["background"] = True
            text = f"{text} {_background_phrase(upper, ground)}".strip()
    if u_spam < cfg.spam_prob:
        noise["spam"] = True
        text = (
            f"{text}{r.choice([' | ', ' - ', ' '])}{r.choice(_SPAM)}" if text else str(r.choice(_SPAM))
        ).strip()
    return text, noise


# ------------------------------------------------------------------------------------------------- scenes


def make_scene(cfg: WorldConfig, index: int, split: str = "train") -> Scene:
    """Scene ``index`` of ``split``: a pure function of (cfg, split, index)."""
    if index < 0:
        raise ValueError(f"index={index}: must be >= 0")
    group, member = divmod(index, cfg.group_size)
    lay = _make_layout(cfg, group, split)
    shapes = [_shape_of(cfg, lay, i, member) for i in range(len(lay.things))]
    out = _render(cfg, lay, shapes, split, group)
    size = cfg.image_size
    things: list[Thing] = []
    overlap: dict[tuple[int, int], bool] = {}
    order = out["order"]
    for k, i in enumerate(order, start=1):
        t = lay.things[i]
        x0, y0, x1, y1 = out["boxes"][k - 1]
        mask = np.zeros((size, size), bool)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = out["instances"][y0:y1, x0:x1] == k
        ys = np.flatnonzero(mask[y0:y1, x0:x1].any(1))
        xs = np.flatnonzero(mask[y0:y1, x0:x1].any(0))
        if len(ys) == 0:  # fully hidden or outside the image: it left no pixel, so it is not in the scene
            continue
        box = (x0 + int(xs[0]), y0 + int(ys[0]), x0 + int(xs[-1]) + 1, y0 + int(ys[-1]) + 1)
        if len(things) + 1 != k:
            out["instances"][mask] = len(things) + 1
        things.append(
            Thing(
                shape=shapes[i],
                colour=t.colour,
                size=t.size,
                box=box,
                depth=float(t.z),
                mask=mask,
                center=(t.cx, t.cy),
                radius=t.r,
                area=int(mask.sum()),
            )
        )
    # Extents overlap (shape-independent, so hard-negative captions keep the same relations).
    for a in range(len(things)):
        for b in range(len(things)):
            if a != b:
                ta, tb = things[a], things[b]
                overlap[(a, b)] = abs(ta.center[0] - tb.center[0]) < 0.8 * (ta.radius + tb.radius) and abs(
                    ta.center[1] - tb.center[1]
                ) < 0.8 * (ta.radius + tb.radius)
    stuff = _visible_stuff(lay, out["semantic"], things, size)
    upper = [s for s in lay.upper if s in stuff]
    ground = [s for s in lay.ground if s in stuff]
    rels = _relations(things, overlap)
    precise = _precise_caption(things, rels, upper, ground)
    noisy, noise = _noisy_caption(cfg, _rng(cfg.seed, split, index, _NOISE), things, upper, ground)
    return Scene(
        index=index,
        uid=scene_uid(cfg, index, split),
        image=out["image"],
        precise_caption=precise,
        noisy_caption=noisy,
        things=things,
        stuff=stuff,
        semantic=out["semantic"],
        instances=out["instances"],
        depth=out["depth"],
        split=split,
        group=group,
        horizon=lay.horizon,
        noise=noise,
    )


def _visible_stuff(lay: _Layout, semantic: np.ndarray, things: list[Thing], size: int) -> list[str]:
    """Stuff classes named in captions: at least 1% of the image outside every thing's bounding square
    (so the list does not depend on the shapes), top to bottom."""
    free = np.ones((size, size), bool)
    for t in things:
        x0, x1 = max(0, math.floor(t.center[0] - t.radius)), min(size, math.ceil(t.center[0] + t.radius) + 1)
        y0, y1 = max(0, math.floor(t.center[1] - t.radius)), min(size, math.ceil(t.center[1] + t.radius) + 1)
        free[y0:y1, x0:x1] = False
    counts = np.bincount(semantic[free].ravel(), minlength=len(SEMANTIC_CLASSES))
    names = [s for s in lay.upper + lay.ground if counts[STUFF_ID[s]] >= 0.01 * size * size]
    return names


def make_scenes(
    cfg: WorldConfig, split: str = "train", start: int = 0, stop: int | None = None
) -> Iterator[Scene]:
    """Scenes ``start .. stop-1`` of ``split`` (each made independently)."""
    index = start
    while stop is None or index < stop:
        yield make_scene(cfg, index, split)
        index += 1


# -------------------------------------------------------------------------------------- caption helpers

_OBJECT_RE = re.compile(
    r"\b(" + "|".join(SIZES) + r") (" + "|".join(COLOURS) + r") (" + "|".join(THING_CLASSES) + r")\b"
)


def parse_objects(caption: str) -> list[tuple[str, str, str]]:
    """Every "<size> <colour> <shape>" phrase in ``caption`` as (size, colour, shape)."""
    return [tuple(m) for m in _OBJECT_RE.findall(caption.lower())]  # type: ignore[misc]


def caption_mentions(caption: str, thing: Thing) -> bool:
    """Whether ``caption`` names ``thing`` with all three true attributes."""
    return (thing.size, thing.colour, thing.shape) in parse_objects(caption)


_REL_VARIANTS = {
    "in front of": (
        ("in front of", False),
        ("partly covering", False),
        ("closer than", False),
        ("behind", True),
    ),
    "to the left of": (
        ("to the left of", False),
        ("left of", False),
        ("on the left of", False),
        ("to the right of", True),
    ),
}
_OPENERS = (
    "",
    "a photo of ",
    "an image of ",
    "a picture showing ",
    "a rendered scene with ",
    "a simple drawing of ",
    "this image shows ",
    "there is ",
)
_GROUND_VARIANTS = {
    "grass": ("grass", "a lawn", "a grassy field"),
    "water": ("water", "a lake", "calm water"),
    "sand": ("sand", "a sandy beach", "sand dunes"),
    "road": ("a road", "an asphalt road", "a street"),
    "snow": ("snow", "a snowy field", "fresh snow"),
    "gravel": ("gravel", "a gravel path", "loose gravel"),
}
_UPPER_VARIANTS = {
    "sky": ("under the sky", "below a clear sky", "with the sky behind"),
    "wall": ("in front of a brick wall", "against a brick wall", "before a brick wall"),
}
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")


def _one_paraphrase(scene: Scene, r: np.random.Generator) -> str:
    things = scene.things
    order = (
        [int(i) for i in r.permutation(len(things))]
        if r.random() < 0.5
        else sorted(range(len(things)), key=lambda i: things[i].center[0])
    )
    objects = _join([f"a {things[i].phrase}" for i in order])
    if len(things) > 1 and r.random() < 0.3:
        objects = f"{_COUNT_WORDS[len(things)]} shapes: {objects}"
    upper = [s for s in scene.stuff if s in UPPER_STUFF]
    ground = [s for s in scene.stuff if s not in UPPER_STUFF]
    bg = []
    if ground:
        grounds = [str(r.choice(_GROUND_VARIANTS[g])) for g in ground]
        bg.append(str(r.choice(["on ", "standing on ", "resting on "])) + " and ".join(grounds))
    for u in upper:
        bg.append(str(r.choice(_UPPER_VARIANTS[u])))
    if r.random() < 0.5:
        bg = bg[::-1]
    bg_text = " ".join(bg)
    if r.random() < 0.25 and bg_text:
        text = f"{bg_text[0].upper()}{bg_text[1:]}: {objects}"
    else:
        text = f"{r.choice(_OPENERS)}{objects} {bg_text}".strip()
    overlap = {}
    for a in range(len(things)):
        for b in range(len(things)):
            if a != b:
                ta, tb = things[a], things[b]
                lim = 0.8 * (ta.radius + tb.radius)
                overlap[(a, b)] = (
                    abs(ta.center[0] - tb.center[0]) < lim and abs(ta.center[1] - tb.center[1]) < lim
                )
    rels = _relations(things, overlap)
    if rels:
        names = _names(things)
        sentences = []
        for a, rel, b in rels:
            word, flip = _REL_VARIANTS[rel][int(r.integers(len(_REL_VARIANTS[rel])))]
            sentences.append(
                f"{names[b]} is {word} {names[a]}" if flip else f"{names[a]} is {word} {names[b]}"
            )
        text = text.rstrip(".") + ". " + "; ".join(sentences)
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def synthetic_captions(scene: Scene, k: int, seed: int) -> list[str]:
    """``k`` diverse but faithful paraphrases of the precise caption (DataCompDR-style ``syn_text``): each
    names every thing with its true "<size> <colour> <shape>", the named background and the relations."""
    if k < 0:
        raise ValueError(f"k={k}: must be >= 0")
    r = np.random.default_rng(
        np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(scene.uid.encode()), _SYN])
    )
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < k:
        text = _one_paraphrase(scene, r)
        tries += 1
        if text not in seen or tries > 20 * (k + 1):
            seen.add(text)
            out.append(text)
    return out


# -------------------------------------------------------------------------------- evaluation splits


_PROMPTS = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a photo of the {}.",
    "a {} shape.",
    "a {} standing on the ground.",
)


def zero_shot_prompts() -> list[str]:
    """Prompt templates for zero-shot shape classification (fill with a class name from THING_CLASSES)."""
    return list(_PROMPTS)


def zero_shot_classes(cfg: WorldConfig) -> list[str]:
    """The class names a world uses (the first ``num_shapes`` of THING_CLASSES)."""
    return list(cfg.shapes)


def main_thing(scene: Scene) -> Thing:
    """The scene's main object: the one with the largest apparent size (nearest on ties)."""
    return max(scene.things, key=lambda t: (t.radius, -t.depth))


def zero_shot_label(scene: Scene) -> int:
    """Class index (into THING_CLASSES) of the scene's main object: the zero-shot / ImageNet-style label."""
    return THING_CLASSES.index(main_thing(scene).shape)


@dataclass
class Region:
    """One labelled region for region classification: a thing (instance) or a stuff class."""

    kind: str  # "thing" or "stuff"
    label: str
    class_id: int
    """Index into SEMANTIC_CLASSES."""
    box: tuple[int, int, int, int]
    mask: np.ndarray


def regions(scene: Scene, min_pixels: int = 1) -> list[Region]:
    """Boxes and masks with class labels: every visible thing, then every stuff class in the semantic map."""
    out = [Region("thing", t.shape, t.class_id, t.box, t.mask) for t in scene.things if t.area >= min_pixels]
    for name in STUFF_CLASSES:
        m = scene.semantic == STUFF_ID[name]
        if m.sum() < min_pixels:
            continue
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        out.append(
            Region(
                "stuff", name, STUFF_ID[name], (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1), m
            )
        )
    return out


def scene_annotation(scene: Scene) -> dict[str, Any]:
    """JSON-ready labels of a scene (the ``ann.json`` member of a sample)."""
    return {
        "uid": scene.uid,
        "split": scene.split,
        "index": scene.index,
        "group": scene.group,
        "boxes": [list(t.box) for t in scene.things],
        "labels": [THING_CLASSES.index(t.shape) for t in scene.things],
        "shapes": [t.shape for t in scene.things],
        "colours": [t.colour for t in scene.things],
        "sizes": [t.size for t in scene.things],
        "depths": [round(t.depth, 4) for t in scene.things],
        "areas": [t.area for t in scene.things],
        "stuff": list(scene.stuff),
        "main": scene.things.index(main_thing(scene)),
        "zero_shot_label": zero_shot_label(scene),
        "precise_caption": scene.precise_caption,
        "noise": {
            k: (v if k != "wrong" else {str(i): w for i, w in v.items()}) for k, v in scene.noise.items()
        },
    }

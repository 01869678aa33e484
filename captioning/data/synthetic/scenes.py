"""Scenes of the synthetic dataset: objects, their placement and their rendering (the rules: the
package docstring), and reading scenes back from an instances file."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from captioning.console import InvalidValue, OperationFailed

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
MIN_IMAGE_SIZE = 16
SIZE_FRACTION = {"small": 0.16, "large": 0.32}  # box side / image side
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
COLOUR_JITTER = 15
NOISE = 8
MIN_GAP = 2  # px of background between any two boxes
DUPLICATE_PROB = 0.25  # scenes with >= 2 objects: make two of them identical
TRIPLE_PROB = 0.2  # ... and, with three objects, this fraction of those gets a third one
MARGIN_FRACTION = 0.1  # the generator states relations/orders only beyond this * image_size
MAX_PLACEMENTS = 100  # placements of one drawn scene tried before the scene is drawn anew
MAX_SCENE_DRAWS = 100  # scenes drawn before make_scene falls back to a single object

CATEGORIES = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; ``bbox`` is the COCO box ``(x, y, w, h)`` in pixels."""

    size: str
    colour: str
    shape: str
    bbox: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if self.size not in SIZES or self.colour not in COLOURS or self.shape not in SHAPES:
            raise InvalidValue(f"unknown object attributes {self.size!r}, {self.colour!r}, {self.shape!r}")
        if len(self.bbox) != 4:
            raise InvalidValue(f"bbox must be (x, y, w, h), got {self.bbox!r}")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2

    def centre(self, axis: str) -> float:
        return self.cx if axis == "x" else self.cy


def _side(size: str, image_size: int, rng: random.Random) -> int:
    return max(2, round(SIZE_FRACTION[size] * image_size) + rng.randint(-1, 1))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return bx >= ax + aw + MIN_GAP or ax >= bx + bw + MIN_GAP or by >= ay + ah + MIN_GAP or ay >= by + bh + MIN_GAP


def _place(sides: Sequence[int], image_size: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    # Restarting the whole placement (rather than only the failing object) keeps it from getting
    # stuck behind an early box in a bad spot.
    for _ in range(1000):
        boxes: list[tuple[int, int, int, int]] = []
        for side in sides:
            for _ in range(200):
                box = (rng.randint(0, image_size - side), rng.randint(0, image_size - side), side, side)
                if all(_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sides):
            return boxes
    raise OperationFailed(f"could not place objects of sides {list(sides)} in a {image_size} px image")


def _objects(attrs: Sequence[tuple[str, str, str]], boxes: Sequence[tuple[int, int, int, int]]) -> list[SceneObject]:
    return [SceneObject(size, colour, shape, tuple(float(v) for v in box))  # type: ignore[arg-type]
            for (size, colour, shape), box in zip(attrs, boxes)]


def _leftmost(members: Sequence[SceneObject]) -> SceneObject:
    """The member that places a group in the left-to-right order (smallest centre x, then y)."""
    return min(members, key=lambda o: (o.cx, o.cy))


def group_objects(objects: Sequence[SceneObject]) -> dict[tuple[str, str, str], list[SceneObject]]:
    """Objects grouped by (size, colour, shape), groups ordered left to right by their leftmost member."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.key, []).append(obj)

    def order(item: tuple[tuple[str, str, str], list[SceneObject]]) -> tuple:
        key, members = item
        leftmost = _leftmost(members)
        return (leftmost.cx, leftmost.cy, SIZES.index(key[0]), COLOURS.index(key[1]), SHAPES.index(key[2]))

    return dict(sorted(groups.items(), key=order))


def _clearly_ordered(objects: Sequence[SceneObject], image_size: int) -> bool:
    """True iff the centre x of the leftmost members of any two groups differ by at least
    ``MARGIN_FRACTION * image_size`` (and so, for two objects of different kinds, the x of their
    centres: the axis of the canonical relation, language.canonical_caption)."""
    margin = MARGIN_FRACTION * image_size
    groups = group_objects(objects)
    lefts = sorted(_leftmost(members).cx for members in groups.values())
    if any(b - a < margin for a, b in zip(lefts, lefts[1:])):
        return False
    if len(objects) == 2 and len(groups) == 2:
        a, b = objects
        # Implied by the x condition above; kept so the relation's margin does not hinge on it.
        return abs(a.cx - b.cx) >= margin
    return True


def make_scene(rng: random.Random, image_size: int) -> list[SceneObject]:
    """A random scene of 1-3 non-overlapping objects, a function of ``rng``'s state: up to
    :data:`MAX_PLACEMENTS` placements of a drawn scene, up to :data:`MAX_SCENE_DRAWS` drawn scenes,
    then a single object (always valid)."""
    if image_size < MIN_IMAGE_SIZE:
        raise InvalidValue(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    for _ in range(MAX_SCENE_DRAWS):
        count = rng.randint(1, 3)
        attrs = [(rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(count)]
        if count >= 2 and rng.random() < DUPLICATE_PROB:
            attrs[1] = attrs[0]
            if count == 3 and rng.random() < TRIPLE_PROB:
                attrs[2] = attrs[0]
        sides = [_side(size, image_size, rng) for size, _, _ in attrs]
        for _ in range(MAX_PLACEMENTS):
            objects = _objects(attrs, _place(sides, image_size, rng))
            if _clearly_ordered(objects, image_size):
                return objects
    # Unreachable in practice; a single object has no order to get wrong.
    attrs = [(rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES))]
    return _objects(attrs, _place([_side(attrs[0][0], image_size, rng)], image_size, rng))


def _background_colour(rng: random.Random) -> np.ndarray:
    grey = rng.randint(95, 160)
    return np.array([grey + rng.randint(-15, 15) for _ in range(3)], dtype=np.float64)


def render_scene(objects: Sequence[SceneObject], image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``objects`` on a noisy low-saturation gradient; returns an RGB PIL image."""
    start, end = _background_colour(rng), _background_colour(rng)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
    pixels = start * (1.0 - t)[..., None] + end * t[..., None]
    pixels += noise_rng.integers(-NOISE, NOISE + 1, size=(image_size, image_size, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in RGB[obj.colour])
        x, y, w, h = obj.bbox
        # PIL's corners are inclusive pixels; the COCO box [x, x + w) covers pixels x .. x + w - 1.
        x0, y0 = round(x), round(y)
        x1, y1 = x0 + round(w) - 1, y0 + round(h) - 1
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def load_scenes(instances_json: str | Path) -> dict[int, list[SceneObject]]:
    """image_id -> its objects (in annotation-id order; ``[]`` for an image without any), read
    back from an ``instances_{split}.json`` file."""
    data = json.loads(Path(instances_json).read_text())
    shape_of = {cat["id"]: cat["name"] for cat in data["categories"]}
    scenes: dict[int, list[SceneObject]] = {img["id"]: [] for img in data["images"]}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        attributes, bbox = ann["attributes"], tuple(float(v) for v in ann["bbox"])
        obj = SceneObject(attributes["size"], attributes["colour"], shape_of[ann["category_id"]], bbox)  # type: ignore
        scenes.setdefault(ann["image_id"], []).append(obj)
    return scenes

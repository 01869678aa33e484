"""The built-in synthetic captioning dataset: coloured shapes, a small grammar, COCO file formats.

Nothing is downloaded. :func:`generate_synthetic` draws the dataset on first use (a few seconds
for the default :class:`~captioning.config.SyntheticConfig`) and writes it in the *real* COCO
formats, so the one COCO reader serves both datasets. :func:`check_caption` is a strict checker
that decides whether any caption -- a reference or a model's output -- is exactly true of a scene;
:func:`caption_accuracy` turns it into a metric.

Scenes
------
An image is ``image_size`` x ``image_size`` RGB (default 64). The background is a smooth linear
gradient, in a random direction, between two random low-saturation mid-luminance colours, plus
uniform pixel noise of +-8, so the saturated objects always stand out from it. On it lie 1 to 3
objects (about uniformly), each fully inside the image, with bounding boxes at least 2 px apart
(rejection sampling). The placement is also rejected unless the left-to-right order of the groups
(see Language) is clear: the centre x of the leftmost members of any two different groups differ by
at least the margin ``MARGIN_FRACTION * image_size`` (0.1 * image_size); for two objects of
different kinds this makes the x separation of the canonical relation at least the margin too. Members of one group, and everything else about the positions, are unconstrained.
A drawn scene whose placement fails :data:`MAX_PLACEMENTS` times is drawn anew (attributes
included), and after :data:`MAX_SCENE_DRAWS` such draws a single object is placed, so
:func:`make_scene` always ends; at the shipped sizes the redraws practically never happen.
Every object has

* a size: ``small`` (box side about 0.16 * image_size) or ``large`` (about 0.32 * image_size),
  each +-1 px;
* a colour: ``red`` (220, 40, 40), ``green`` (40, 180, 60), ``blue`` (40, 70, 220) or
  ``yellow`` (230, 210, 40), each channel jittered by +-15 per object;
* a shape: ``circle`` (filled ellipse), ``square`` (axis-aligned filled square) or ``triangle``
  (filled isosceles triangle pointing up), each filling its square box.

In a quarter of the scenes with two or more objects two objects are made identical in size,
colour and shape, so that counts ("two small red circles") occur; three identical objects occur
rarely. Images are drawn with PIL and saved as JPEG, quality 95, without chroma subsampling.
Everything is a function of ``seed``: each image has its own generators, seeded from the string
``"synthetic-v<version>/seed=<seed>/<split>/<index>/<purpose>"`` (Python's string seeding hashes with
SHA-512, so it does not depend on ``PYTHONHASHSEED``, the process or the machine). A split's
scenes therefore do not depend on the sizes of the other splits, and the images do not depend on
``captions_per_image``.

Language
--------
Captions are lowercase words separated by single spaces, without punctuation. The vocabulary is
:data:`VOCABULARY`. A *group* is the set of objects sharing (size, colour, shape); the scene's
groups are ordered left to right by the centre x of their leftmost member. The grammar::

    caption  := [prefix] list | [prefix] relation | ordered
    prefix   := "there is" | "there are" | "the image shows" | "an image of" | "this image shows"
    np       := "a" SIZE COLOUR SHAPE | ("two" | "three") SIZE COLOUR SHAPE "s"
    list     := np | np "and" np | np np "and" np
    relation := np ("to the left of" | "to the right of" | "above" | "below") np
    ordered  := ("from left to right" | "from top to bottom") list     (two or more nps)

A caption is *true* of a scene iff

* every np names one group of the scene with its exact size, colour, shape and count ("a" is
  one, "two" two, "three" three), no group is named twice and none is left out;
* a relation is used only for a scene of exactly two objects of different kinds, and holds
  strictly between the centres (``cx``/``cy`` of the COCO box; y grows downwards, so "above"
  means a smaller centre y);
* an ordered body is used only when every group is a single object, and lists them in strictly
  increasing centre x ("from left to right") or centre y ("from top to bottom");
* "there is" is followed by a singular np and "there are" by a plural one.

The order of the nps in a plain list is free. The checker accepts the natural extension of the
list to more nps (``np np ... and np``); the generator never needs it (at most three objects).

References
----------
Each image has ``captions_per_image`` (1 to 5) pairwise distinct references. Reference #1 is the
*canonical* caption (:func:`canonical_caption`): no prefix; one object: its np; exactly two
objects of different kinds: the horizontal relation, leftmost object first -- "A to the left of
B" (placement keeps their centres at least the margin apart in x, so this is never a near-tie;
"A above B" only for centres at the same x, which placement excludes); otherwise the list in left
to right group order. The others are the canonical body behind the prefixes ("there is/are",
"the image shows", "an image of", "this image shows"): with the default 5 references, exactly one
description of the scene under five openings (:func:`reference_captions` explains why). The rest
of the grammar -- other group orders, the reversed relation ("B to the right of A"), the other
axis, "from left to right ..." -- is in :func:`caption_pool` and the checker accepts it; it fills
references only when ``CANONICAL_BODY_REFERENCES`` is lowered. The generator states a relation or an order only when the centres differ
by at least the margin 0.1 * image_size on that axis (the checker itself is strict, without
margin), so every reference is clearly true and no reference is borderline. Scene placement makes
the canonical caption clear as well: its group order, its "from left to right" order and its
relation always hold with at least the margin.

Files
-----
``generate_synthetic(root, cfg)`` writes
``root/synthetic-v{version}-seed{seed}-n{num_train}-{num_val}-{num_test}-s{image_size}-c{captions_per_image}/``::

    train/SYN_train_{image_id:012d}.jpg    (and val/, test/) the images
    annotations/captions_{split}.json     COCO captions, exactly like captions_train2014.json:
        {"info": {...}, "licenses": [],
         "images": [{"id", "file_name", "width", "height"}],
         "annotations": [{"id", "image_id", "caption"}]}
    annotations/instances_{split}.json    COCO instances, the scene of every image:
        {"info", "licenses", "images" (as above),
         "categories": [{"id": 1, "name": "circle", "supercategory": "shape"},
                        {"id": 2, "name": "square", ...}, {"id": 3, "name": "triangle", ...}],
         "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h],
                          "area", "iscrowd": 0, "segmentation": [[x1, y1, x2, y2, ...]],
                          "attributes": {"size": "small" | "large", "colour": "red" | ...}}]}
    manifest.json                         generator version, config, counts, these formats

``{version}`` is :data:`GENERATOR_VERSION`.

Image ids are unique across splits (train 1..N, then val, then test), as are annotation ids.
Boxes follow COCO: floats, ``x, y`` the top-left corner, the box covering ``[x, x + w)``.
Generation is atomic: everything is written into a sibling ``<name>.tmp-<pid>-<host>`` folder
that is renamed into place at the end, so a folder under the final name is always complete.
Leftover temporary folders of dead processes on this host are removed; concurrent generators
(e.g. two DDP ranks) both write, the first rename wins and the other uses its result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from captioning.config import SyntheticConfig
from captioning.files import RunLock, atomic_folder, partial_name

GENERATOR_VERSION = 8  # part of the folder name: bump it whenever the output would change
# v2: placement keeps the leftmost members of different groups >= the margin apart in x

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "val", "test")

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
MAX_CAPTIONS_PER_IMAGE = 5
CANONICAL_BODY_REFERENCES = 4  # references that are the canonical caption behind a prefix
MIN_IMAGE_SIZE = 16
JPEG_QUALITY = 95

COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_COUNT_OF = {word: count for count, word in COUNT_WORDS.items()}
PLURALS = {shape: shape + "s" for shape in SHAPES}
# Each prefix starts with its own word, and none with "a", the first word of most bodies: a greedy
# decoder picks word by word, so prefixes sharing a first word pool their votes against the plain
# body ("a picture of" beat an unsure "a <size>" at word 2 in generator v4, "an image of/showing"
# together rivalled "a" at word 1 in v5), and correct captions then miss every reference.
PREFIXES = ("there is", "there are", "the image shows", "an image of", "this image shows")
_PREFIX_STARTS = tuple(prefix + " " for prefix in PREFIXES)
RELATIONS = {  # phrase -> (axis, sign): true iff sign * (coord(A) - coord(B)) > 0
    "to the left of": ("x", -1),
    "to the right of": ("x", 1),
    "above": ("y", -1),
    "below": ("y", 1),
}
ORDERS = {"from left to right": "x", "from top to bottom": "y"}

CATEGORIES = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]
_CATEGORY_ID = {shape: i + 1 for i, shape in enumerate(SHAPES)}

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(SIZES)
        | set(COLOURS)
        | set(SHAPES)
        | set(PLURALS.values())
        | set(COUNT_WORDS.values())
        | {"and"}
        | {w for phrase in (*PREFIXES, *RELATIONS, *ORDERS) for w in phrase.split()}
    )
)
"""Every word the grammar can produce, sorted."""
_VOCABULARY_SET = frozenset(VOCABULARY)


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
            raise ValueError(f"unknown object attributes {self.size!r}, {self.colour!r}, {self.shape!r}")
        if len(self.bbox) != 4:
            raise ValueError(f"bbox must be (x, y, w, h), got {self.bbox!r}")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2


def _coord(obj: SceneObject, axis: str) -> float:
    return obj.cx if axis == "x" else obj.cy


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
    raise RuntimeError(f"could not place objects of sides {list(sides)} in a {image_size} px image")


def _objects(
    attrs: Sequence[tuple[str, str, str]], boxes: Sequence[tuple[int, int, int, int]]
) -> list[SceneObject]:
    return [
        SceneObject(size, colour, shape, tuple(float(v) for v in box))  # type: ignore[arg-type]
        for (size, colour, shape), box in zip(attrs, boxes)
    ]


def _clearly_ordered(objects: Sequence[SceneObject], image_size: int) -> bool:
    """True iff the canonical caption's orders hold with the margin (see the module docstring).

    The centre x of the leftmost members of any two different groups differ by at least
    ``MARGIN_FRACTION * image_size``; for two objects of different kinds the centres also differ
    by at least the margin on the axis of the canonical relation (always x, see canonical_caption).
    """
    margin = MARGIN_FRACTION * image_size
    groups = _groups(objects)
    lefts = sorted(_leftmost(members).cx for members in groups.values())
    if any(b - a < margin for a, b in zip(lefts, lefts[1:])):
        return False
    if len(objects) == 2 and len(groups) == 2:
        a, b = objects
        # Implied by the x condition above; kept so the relation's margin does not hinge on it.
        return abs(a.cx - b.cx) >= margin
    return True


def make_scene(rng: random.Random, image_size: int) -> list[SceneObject]:
    """A random scene: 1-3 non-overlapping objects (see the module docstring for the rules).

    Rejection sampling with bounded retries: up to :data:`MAX_PLACEMENTS` placements of a drawn
    scene, up to :data:`MAX_SCENE_DRAWS` drawn scenes, then a single object (always valid).
    Everything comes from ``rng``, so the result is a function of its state.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
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
    size = image_size
    start, end = _background_colour(rng), _background_colour(rng)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
    pixels = start * (1.0 - t)[..., None] + end * t[..., None]
    pixels += noise_rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
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


def _segmentation(obj: SceneObject) -> list[list[float]]:
    x, y, w, h = obj.bbox
    if obj.shape == "square":
        points = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif obj.shape == "triangle":
        points = [(x, y + h), (x + w, y + h), (x + w / 2, y)]
    else:
        points = [
            (x + w / 2 + w / 2 * math.cos(2 * math.pi * k / 24), y + h / 2 + h / 2 * math.sin(2 * math.pi * k / 24))
            for k in range(24)
        ]
    return [[round(v, 2) for point in points for v in point]]


def _area(obj: SceneObject) -> float:
    _, _, w, h = obj.bbox
    factor = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[obj.shape]
    return round(factor * w * h, 2)


# --------------------------------------------------------------------------- captions


def _np_text(key: tuple[str, str, str], count: int) -> str:
    size, colour, shape = key
    if count == 1:
        return f"a {size} {colour} {shape}"
    if count not in COUNT_WORDS:
        raise ValueError(f"the grammar has no count word for {count} objects")
    return f"{COUNT_WORDS[count]} {size} {colour} {PLURALS[shape]}"


def _leftmost(members: Sequence[SceneObject]) -> SceneObject:
    """The member that places a group in the left-to-right order (smallest centre x, then y)."""
    return min(members, key=lambda o: (o.cx, o.cy))


def _groups(objects: Sequence[SceneObject]) -> dict[tuple[str, str, str], list[SceneObject]]:
    """Objects grouped by (size, colour, shape), groups ordered left to right by their leftmost member."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.key, []).append(obj)

    def order(item: tuple[tuple[str, str, str], list[SceneObject]]) -> tuple:
        key, members = item
        leftmost = _leftmost(members)
        return (leftmost.cx, leftmost.cy, SIZES.index(key[0]), COLOURS.index(key[1]), SHAPES.index(key[2]))

    return dict(sorted(groups.items(), key=order))


def _list_body(nps: Sequence[str]) -> str:
    if len(nps) == 1:
        return nps[0]
    return " ".join(nps[:-1]) + " and " + nps[-1]


def _first_count(body: str) -> int:
    first = body.split(" ", 1)[0]
    return _COUNT_OF.get(first, 1)


def _prefixed(body: str, first_count: int) -> list[str]:
    there = "there is" if first_count == 1 else "there are"
    return [f"{prefix} {body}" for prefix in (there, "the image shows", "an image of", "this image shows")]


def canonical_caption(objects: Sequence[SceneObject]) -> str:
    """Reference #1: the single phrasing a model should learn (see the module docstring)."""
    if not objects:
        raise ValueError("a scene needs at least one object")
    groups = _groups(objects)
    if len(objects) == 2 and len(groups) == 2:
        a, b = objects
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        # Placement guarantees dx >= margin, so the horizontal relation is never a near-tie;
        # choosing the axis of larger separation instead would be a coin flip when dx ~ dy.
        if max(dx, dy) > 0:  # always for generated scenes; coinciding centres fall back to the list
            if dx > 0:
                first, second = sorted(objects, key=lambda o: o.cx)
                return f"{_np_text(first.key, 1)} to the left of {_np_text(second.key, 1)}"
            first, second = sorted(objects, key=lambda o: o.cy)
            return f"{_np_text(first.key, 1)} above {_np_text(second.key, 1)}"
    return _list_body([_np_text(key, len(members)) for key, members in groups.items()])


def caption_pool(objects: Sequence[SceneObject], image_size: int = SyntheticConfig.image_size) -> list[str]:
    """Every phrasing the generator may produce for a scene; the canonical caption comes first.

    Relations and orders are included only where the centres differ by at least
    ``MARGIN_FRACTION * image_size`` on their axis.
    """
    margin = MARGIN_FRACTION * image_size
    groups = _groups(objects)
    pool: dict[str, None] = {canonical_caption(objects): None}  # a dict keeps order and drops repeats

    def add(body: str, first_count: int, prefixes: bool = True) -> None:
        pool[body] = None
        if prefixes:
            for caption in _prefixed(body, first_count):
                pool[caption] = None

    if len(objects) == 2 and len(groups) == 2:
        for axis, (before, after) in {"x": ("to the left of", "to the right of"), "y": ("above", "below")}.items():
            first, second = sorted(objects, key=lambda o: _coord(o, axis))
            if _coord(second, axis) - _coord(first, axis) >= margin:
                add(f"{_np_text(first.key, 1)} {before} {_np_text(second.key, 1)}", 1)
                add(f"{_np_text(second.key, 1)} {after} {_np_text(first.key, 1)}", 1)
    for order in itertools.permutations(groups.items()):
        add(_list_body([_np_text(key, len(members)) for key, members in order]), len(order[0][1]))
    if len(groups) >= 2 and all(len(members) == 1 for members in groups.values()):
        for phrase, axis in ORDERS.items():
            ordered = sorted(objects, key=lambda o: _coord(o, axis))
            coords = [_coord(o, axis) for o in ordered]
            if all(b - a >= margin for a, b in zip(coords, coords[1:])):
                add(f"{phrase} {_list_body([_np_text(o.key, 1) for o in ordered])}", 1, prefixes=False)
    return list(pool)


def reference_captions(
    objects: Sequence[SceneObject], n: int, rng: random.Random, image_size: int = SyntheticConfig.image_size
) -> list[str]:
    """The canonical caption, then ``n - 1`` distinct others drawn from :func:`caption_pool`.

    Of the others, up to :data:`CANONICAL_BODY_REFERENCES` are the canonical caption behind a
    prefix ("there is ...", "the image shows ..."), the rest other bodies without a prefix where
    the scene has them (another group order, the reversed relation, "from left to right ...").
    Why the canonical body dominates (measured with the default model, 20 epochs): with 2 of 4
    references drawn from the ~40 true phrasings of a 3-object scene, correct captions often
    matched no reference (test BLEU-4 0.876 at caption accuracy 0.80); with 3 prefixed copies a
    beam-searched caption still missed whenever its prefix was the one left out (BLEU-4 0.893 at
    accuracy 0.874). With all four prefixes (the default), BLEU measures correctness, not which of
    equally true phrasings a model prefers -- COCO's references share a modal style in the same way.
    """
    pool = caption_pool(objects, image_size)
    if not 1 <= n <= len(pool):
        raise ValueError(f"asked for {n} references, but this scene has {len(pool)} distinct phrasings")
    canonical = pool[0]
    prefixed = [c for c in _prefixed(canonical, _first_count(canonical)) if c in pool]
    n_prefixed = min(CANONICAL_BODY_REFERENCES, n - 1, len(prefixed))
    chosen = rng.sample(prefixed, n_prefixed)
    # The rest: other bodies without a prefix while the scene has any (a one-object scene has
    # none), so that prefixes stay a minority of first words (see PREFIXES).
    rest = [c for c in pool[1:] if c not in chosen]
    bare = [c for c in rest if not c.startswith(_PREFIX_STARTS)]
    wanted = n - 1 - n_prefixed
    picked = rng.sample(bare, min(wanted, len(bare)))
    picked += rng.sample([c for c in rest if c not in picked], wanted - len(picked))
    references = [canonical, *chosen, *picked]
    assert len(set(references)) == n, references
    return references


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class _NounPhrase:
    count: int
    key: tuple[str, str, str]

    def __str__(self) -> str:
        return _np_text(self.key, self.count)


@dataclass(frozen=True)
class _Parsed:
    prefix: str | None
    form: str  # "list", "relation" or "ordered"
    nps: tuple[_NounPhrase, ...]
    phrase: str | None = None  # the relation or order phrase


class _Ungrammatical(Exception):
    pass


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)

    def match(self, phrase: str) -> bool:
        words = phrase.split()
        if self.tokens[self.pos : self.pos + len(words)] == words:
            self.pos += len(words)
            return True
        return False

    def expect(self, options: Sequence[str], what: str) -> str:
        word = self.peek()
        if word not in options:
            got = "the end" if word is None else repr(word)
            raise _Ungrammatical(f"expected {what} at word {self.pos + 1}, got {got}")
        self.pos += 1
        return word

    def noun_phrase(self) -> _NounPhrase:
        count = _COUNT_OF[self.expect(list(_COUNT_OF), "'a', 'two' or 'three'")]
        size = self.expect(SIZES, "a size")
        colour = self.expect(COLOURS, "a colour")
        if count == 1:
            shape = self.expect(SHAPES, "a singular shape after 'a'")
        else:
            plural = self.expect(list(PLURALS.values()), f"a plural shape after '{COUNT_WORDS[count]}'")
            shape = plural[:-1]
        return _NounPhrase(count, (size, colour, shape))

    def list_body(self) -> tuple[_NounPhrase, ...]:
        nps = [self.noun_phrase()]
        while not self.at_end():
            if self.match("and"):
                nps.append(self.noun_phrase())
                if not self.at_end():
                    raise _Ungrammatical(f"words after the last noun phrase: {' '.join(self.tokens[self.pos:])!r}")
                return tuple(nps)
            nps.append(self.noun_phrase())
        if len(nps) > 1:
            raise _Ungrammatical("missing 'and' before the last noun phrase")
        return tuple(nps)

    def caption(self) -> _Parsed:
        for phrase in ORDERS:
            if self.match(phrase):
                nps = self.list_body()
                if len(nps) < 2:
                    raise _Ungrammatical(f"'{phrase}' needs at least two noun phrases")
                return _Parsed(None, "ordered", nps, phrase)
        if self.peek() == "from":
            raise _Ungrammatical("expected 'from left to right' or 'from top to bottom'")
        prefix = next((p for p in PREFIXES if self.match(p)), None)
        if prefix is not None and self.peek() == "from":
            raise _Ungrammatical(f"'{prefix}' cannot precede an ordered body")
        first_pos = self.pos
        first = self.noun_phrase()
        if prefix == "there is" and first.count != 1:
            raise _Ungrammatical(f"'there is' before the plural '{first}'")
        if prefix == "there are" and first.count == 1:
            raise _Ungrammatical(f"'there are' before the singular '{first}'")
        for phrase in RELATIONS:
            if self.match(phrase):
                second = self.noun_phrase()
                if not self.at_end():
                    raise _Ungrammatical(f"words after the relation: {' '.join(self.tokens[self.pos:])!r}")
                return _Parsed(prefix, "relation", (first, second), phrase)
        self.pos = first_pos
        return _Parsed(prefix, "list", self.list_body())


def _parse(caption: str) -> _Parsed:
    tokens = caption.lower().split()
    if not tokens:
        raise _Ungrammatical("empty caption")
    unknown = [t for t in tokens if t not in _VOCABULARY_SET]
    if unknown:
        raise _Ungrammatical(f"unknown word {unknown[0]!r}")
    return _Parser(tokens).caption()


def _falsity(parsed: _Parsed, objects: Sequence[SceneObject]) -> str | None:
    groups = _groups(objects)
    if parsed.form == "relation":
        a, b = parsed.nps
        if len(objects) != 2 or len(groups) != 2:
            return (
                f"a relation describes exactly two objects of different kinds; the scene has "
                f"{len(objects)} object(s) in {len(groups)} group(s)"
            )
        for np_ in (a, b):
            if np_.count != 1:
                return f"a relation relates single objects, not '{np_}'"
            if np_.key not in groups:
                return f"'{np_}' is not in the scene"
        if a.key == b.key:
            return f"both sides of the relation are '{a}'"
        axis, sign = RELATIONS[parsed.phrase]  # type: ignore[index]
        if sign * (_coord(groups[a.key][0], axis) - _coord(groups[b.key][0], axis)) <= 0:
            return f"'{a}' is not {parsed.phrase} '{b}'"
        return None
    named: set[tuple[str, str, str]] = set()
    for np_ in parsed.nps:
        if np_.key in named:
            return f"'{_np_text(np_.key, 1)}' kind named twice"
        named.add(np_.key)
        members = groups.get(np_.key)
        if members is None:
            return f"'{np_}' is not in the scene"
        if len(members) != np_.count:
            return f"the caption says '{np_}' but the scene has {len(members)}"
    missing = [_np_text(key, len(members)) for key, members in groups.items() if key not in named]
    if missing:
        return "missing: " + ", ".join(f"'{m}'" for m in missing)
    if parsed.form == "ordered":
        if any(np_.count != 1 for np_ in parsed.nps):
            return f"'{parsed.phrase}' is used only when every object is of a different kind"
        axis = ORDERS[parsed.phrase]  # type: ignore[index]
        coords = [_coord(groups[np_.key][0], axis) for np_ in parsed.nps]
        if not all(a < b for a, b in zip(coords, coords[1:])):
            return f"the objects are not listed {parsed.phrase}"
    return None


def explain_caption(caption: str, objects: Sequence[SceneObject]) -> str | None:
    """None if ``caption`` is grammatical and exactly true of the scene, else a short reason."""
    try:
        parsed = _parse(caption)
    except _Ungrammatical as err:
        return f"ungrammatical: {err}"
    reason = _falsity(parsed, objects)
    return None if reason is None else f"false: {reason}"


def check_caption(caption: str, objects: Sequence[SceneObject]) -> bool:
    """True iff the caption parses under the grammar AND is exactly true of the scene.

    Every object must be named with the right size, colour and shape, counts right,
    relations/order right, nothing extra, nothing missing, prefix agreement right. Extra
    whitespace and upper case are tolerated; anything else (an unknown word, punctuation,
    an ungrammatical sequence) makes it False.
    """
    return explain_caption(caption, objects) is None


def load_scenes(instances_json: str | Path) -> dict[int, list[SceneObject]]:
    """image_id -> its objects, read back from an ``instances_{split}.json`` file.

    Every image of the file is a key (an image without annotations maps to ``[]``); objects
    keep the order of their annotation ids.
    """
    data = json.loads(Path(instances_json).read_text())
    shape_of = {cat["id"]: cat["name"] for cat in data["categories"]}
    scenes: dict[int, list[SceneObject]] = {img["id"]: [] for img in data["images"]}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        attributes = ann["attributes"]
        scenes.setdefault(ann["image_id"], []).append(
            SceneObject(
                size=attributes["size"],
                colour=attributes["colour"],
                shape=shape_of[ann["category_id"]],
                bbox=tuple(float(v) for v in ann["bbox"]),  # type: ignore[arg-type]
            )
        )
    return scenes


def caption_accuracy(predictions: Mapping[int, str], scenes: Mapping[int, Sequence[SceneObject]]) -> float:
    """Fraction of predicted captions that :func:`check_caption` accepts (0.0 for no predictions).

    Raises ValueError naming the image ids of predictions that have no scene.
    """
    unknown = [image_id for image_id in predictions if image_id not in scenes]
    if unknown:
        shown = ", ".join(str(i) for i in sorted(unknown, key=str)[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(f"{len(unknown)} prediction(s) have no scene: image ids {shown}{more}")
    if not predictions:
        return 0.0
    correct = sum(check_caption(caption, scenes[image_id]) for image_id, caption in predictions.items())
    return correct / len(predictions)


# --------------------------------------------------------------------------- generation


def _validate(cfg: SyntheticConfig) -> None:
    for name in ("num_train", "num_val", "num_test"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"synthetic.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"synthetic.image_size must be >= {MIN_IMAGE_SIZE}, got {cfg.image_size}")
    if not 1 <= cfg.captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"synthetic.captions_per_image must be in 1..{MAX_CAPTIONS_PER_IMAGE} (a one-object scene has "
            f"only {MAX_CAPTIONS_PER_IMAGE} distinct true captions), got {cfg.captions_per_image}"
        )


def dataset_dir(root: str | Path, cfg: SyntheticConfig) -> Path:
    """The dataset folder for ``cfg`` under ``root`` (whether or not it exists yet)."""
    name = (
        f"synthetic-v{GENERATOR_VERSION}-seed{cfg.seed}-n{cfg.num_train}-{cfg.num_val}-{cfg.num_test}"
        f"-s{cfg.image_size}-c{cfg.captions_per_image}"
    )
    return Path(root) / name


def _image_rng(cfg: SyntheticConfig, split: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"synthetic-v{GENERATOR_VERSION}/seed={cfg.seed}/{split}/{index}/{purpose}")


class _Progress:
    """A line on stderr about once a second: count, rate, ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self.last >= 1.0 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate
            print(
                f"synthetic: {self.done}/{self.total} images, {rate:.0f} images/s, ETA {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )


def _info(split: str) -> dict:
    return {
        "description": f"show-attend-tell synthetic shapes dataset, split {split}",
        "version": str(GENERATOR_VERSION),
        "contributor": "captioning.data.synthetic",
        "url": "",
    }


def _dump(obj: object, path: Path, indent: int | None = None) -> None:
    separators = (",", ":") if indent is None else (",", ": ")
    path.write_text(json.dumps(obj, indent=indent, separators=separators) + "\n")


_FILE_FORMATS = {
    "{split}/SYN_{split}_{image_id:012d}.jpg": "RGB JPEG (quality 95, no chroma subsampling), image_size x image_size",
    "annotations/captions_{split}.json": "COCO captions: {info, licenses, images: [{id, file_name, width, height}], "
    "annotations: [{id, image_id, caption}]}; the first caption of an image is the canonical one",
    "annotations/instances_{split}.json": "COCO instances: {info, licenses, images, categories: [{id, name, "
    "supercategory}], annotations: [{id, image_id, category_id, bbox: [x, y, w, h], area, iscrowd, "
    "segmentation: [[x1, y1, ...]], attributes: {size, colour}}]}",
    "manifest.json": "this file: generator version, config, per-split counts and id ranges, vocabulary",
}


def _write_dataset(out: Path, cfg: SyntheticConfig, progress: bool) -> None:
    (out / "annotations").mkdir(parents=True)
    counts = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    bar = _Progress(sum(counts.values()), progress)
    image_id = caption_id = object_id = 0
    splits_summary = {}
    for split in SPLITS:
        (out / split).mkdir()
        images, captions, instances = [], [], []
        for index in range(counts[split]):
            image_id += 1
            objects = make_scene(_image_rng(cfg, split, index, "scene"), cfg.image_size)
            image = render_scene(objects, cfg.image_size, _image_rng(cfg, split, index, "render"))
            file_name = f"SYN_{split}_{image_id:012d}.jpg"
            image.save(out / split / file_name, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
            images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
            references = reference_captions(
                objects, cfg.captions_per_image, _image_rng(cfg, split, index, "captions"), cfg.image_size
            )
            for caption in references:
                caption_id += 1
                captions.append({"id": caption_id, "image_id": image_id, "caption": caption})
            for obj in objects:
                object_id += 1
                instances.append(
                    {
                        "id": object_id,
                        "image_id": image_id,
                        "category_id": _CATEGORY_ID[obj.shape],
                        "bbox": list(obj.bbox),
                        "area": _area(obj),
                        "iscrowd": 0,
                        "segmentation": _segmentation(obj),
                        "attributes": {"size": obj.size, "colour": obj.colour},
                    }
                )
            bar.update()
        header = {"info": _info(split), "licenses": [], "images": images}
        _dump({**header, "annotations": captions}, out / "annotations" / f"captions_{split}.json")
        _dump(
            {**header, "categories": CATEGORIES, "annotations": instances},
            out / "annotations" / f"instances_{split}.json",
        )
        splits_summary[split] = {
            "images": len(images),
            "captions": len(captions),
            "objects": len(instances),
            "image_ids": [images[0]["id"], images[-1]["id"]] if images else [],
        }
    manifest = {
        "generator": "captioning.data.synthetic",
        "version": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "splits": splits_summary,
        "vocabulary": list(VOCABULARY),
        "files": _FILE_FORMATS,
        "description": "Coloured shapes on a gradient with captions from a small grammar; "
        "see the docstring of captioning.data.synthetic for the scene rules and the grammar.",
    }
    _dump(manifest, out / "manifest.json", indent=2)


_LOCK = threading.Lock()  # threads of one process share a pid, hence a lock file


def generate_synthetic(root: str | Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Generate the dataset for ``cfg`` under ``root`` on first use; return its folder.

    A fast no-op when the folder exists (it is complete by construction: it only appears by an
    atomic rename). ``progress`` prints a line with count, rate and ETA about once a second to
    stderr.
    """
    _validate(cfg)
    final = dataset_dir(root, cfg)
    if final.is_dir():
        return final
    with _LOCK:
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        # One process generates (the other DDP ranks wait for the folder); a dead one's lock is taken over.
        lock = RunLock(final.with_name(final.name + ".lock"), what="generating")
        if not lock.acquire_or_wait(done=final.is_dir, log=lambda m: print(f"synthetic: {m}", file=sys.stderr)):
            return final
        try:
            if final.is_dir():
                return final
            shutil.rmtree(partial_name(final), ignore_errors=True)  # left by a generator that died
            start = time.monotonic()
            if progress:
                print(f"synthetic: generating {final}", file=sys.stderr, flush=True)
            with atomic_folder(final) as tmp:
                _write_dataset(tmp, cfg, progress)
        finally:
            lock.release()
        if progress:
            print(f"synthetic: done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        return final

"""Grounding scores: does the attention of a word that names an object look at that object?

Every generated word naming an object class (see "Words to classes") whose class has a box in the
image is scored against that class's boxes. *Pointing game*: 1 if the attention maximum falls
inside a box of the class, else 0 (Zhang et al., "Top-down neural attention by excitation
backprop", ECCV 2016, without their 15-pixel tolerance). *Mass in box*: the share of the word's
attention weight inside the union of the class's boxes.

Grid to image. The model sees the image resized to a square (aspect not kept,
``captioning.data.transforms.preprocess``) and the feature map is adaptive-average-pooled to a
gh x gw grid, so cell (r, c) stands for an equal share of the original W x H image (its size in
the instances file). Boxes are scaled by (gw / W, gh / H) into grid units, where cell (r, c) is
``[c, c + 1) x [r, r + 1)``. (A cell's receptive field is larger than its share; the share is the
convention of the paper's upsampled attention figures.) The *point* is the centre ``(c + 0.5,
r + 0.5)`` of the maximum cell (on a tie the first in row-major order); boxes are half-open like
COCO's, ``[x, x + w) x [y, y + h)``. For the *mass* each cell's weight is spread uniformly over
the cell: mass = ``sum_rc alpha_rc * cover_rc / sum_rc alpha_rc``, ``cover_rc`` the exact share
of the cell inside the union of the boxes (overlaps counted once).

Which attention: the one the decoder used (``mode``, recorded with every number). ``"expected"``
(soft attention, and hard attention decoded with the expected context sum_i alpha_i a_i, the
authors' default): alpha. ``"argmax"`` (hard): one-hot on the argmax of alpha, so the mass is that
cell's cover. ``"sample"`` (hard): one-hot on a location drawn from alpha, which the decoder does
not keep, so the word is scored in expectation over the draw: mass = sum alpha * cover, pointing
game = the alpha weight on cells whose centre lies in a box (the probability that the draw hits).

Averaging: ``pointing_game`` and ``mass_in_box`` are means over all scored words of the split;
``*_per_image`` average each image's words first, then the images with a scored word. A naming
word whose class has no box in the image is excluded and counted (``absent_words``); an image
missing from the instances file is counted (``images_without_boxes``). With no scored word every
score is None, never 0. For scale the report gives what a uniform map scores on the same words
(the share of cells whose centre is in a box; the boxes' share of the image).

Word kinds. Which step of "a large red circle" is scored decides the verdict (a model may look at
the object at "large" and "red" and elsewhere at "circle"), so three kinds are scored, each
against the named class's boxes and with its own uniform reference (``uniform_*``):
*nouns* (``pointing_game``, ``mass_in_box``), the naming word itself; *attribute words*
(``*_attribute``), those of the matcher's ``attributes`` (sizes and colours for the synthetic
dataset; none for COCO) directly before the noun, each on its own map; *the whole object phrase*
(``*_phrase``), the mean of the maps used at the attribute words and the noun, scored as one map
(argmax: the mean of the one-hot maps; its maximum is the point). A bare noun is its own phrase.

Words to classes. Synthetic: the shape nouns, singular and plural (``circle``/``circles``, ...).
COCO: :data:`COCO_SYNONYMS` (one word -> one of the 80 categories, written for this project) and
:data:`COCO_PHRASES` (two-word names: "traffic light", "hot dog", "teddy bear"; the head noun is
scored and the first word is then not matched alone, so "hot dog" is no dog). Words mostly meaning
something else in captions are left out: "orange" (only "oranges" is the fruit), "glass"
(windows), "bag", "meter", "baseball" (the game), "screen". Another dataset: each category name
and its name + "s" (two-word names as phrases).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from captioning.config import HARD_MODES
from captioning.console import CaptioningError, InvalidValue
from captioning.data.coco import read_instances

#: How the decoder attended, per hard mode (see the module docstring, "Which attention").
MODE_DESCRIPTIONS = {
    "expected": "alpha (the expected context the decoder used)",
    "argmax": "one-hot on argmax alpha (the location the decoder used)",
    "sample": "one-hot on a location drawn from alpha, scored in expectation over the draw",
}

Box = tuple[float, float, float, float]  # COCO (x, y, w, h) in image pixels

# ------------------------------------------------------------------------------ words to classes

# The tables are data: coco_synonyms.json beside this module (package data).
_TABLES = json.loads(resources.files("captioning.evaluation").joinpath("coco_synonyms.json").read_text("utf-8"))

#: COCO category -> the single words that name it in captions (singular and plural).
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {name: tuple(words) for name, words in _TABLES["synonyms"].items()}

#: (first word, head noun) -> COCO category; the head noun is the scored word.
COCO_PHRASES: dict[tuple[str, str], str] = {
    (first, head): name for first, heads, name in _TABLES["phrases"] for head in heads}


@dataclass(frozen=True)
class WordMatcher:
    """Finds the naming words of a caption: word -> category, plus two-word phrases."""

    words: Mapping[str, str]
    phrases: Mapping[tuple[str, str], str] = field(default_factory=dict)
    name: str = "category names"  # which list: "synthetic shapes", "COCO synonyms", ...
    attributes: frozenset[str] = frozenset()  # words that describe the object before its noun (Word kinds)

    def attribute_run(self, words: Sequence[str], noun: int) -> list[int]:
        """Positions of the attribute words directly before position ``noun`` (a contiguous run)."""
        start = noun
        while start > 0 and words[start - 1].lower() in self.attributes:
            start -= 1
        return list(range(start, noun))

    def match(self, words: Sequence[str]) -> list[tuple[int, str]]:
        """[(position of the scored word, category)] in caption order.

        A phrase match scores its second word and consumes the first (see COCO_PHRASES).
        """
        lowered = [w.lower() for w in words]
        out: list[tuple[int, str]] = []
        i = 0
        while i < len(lowered):
            if i + 1 < len(lowered) and (lowered[i], lowered[i + 1]) in self.phrases:
                out.append((i + 1, self.phrases[(lowered[i], lowered[i + 1])]))
                i += 2
                continue
            category = self.words.get(lowered[i])
            if category is not None:
                out.append((i, category))
            i += 1
        return out


def matcher_for(categories: Iterable[str]) -> WordMatcher:
    """The word list for a dataset, chosen by its category names (see the module docstring)."""
    from captioning.data.synthetic import COLOURS, PLURALS, SHAPES, SIZES

    names = list(dict.fromkeys(categories))
    if names and set(names) <= set(SHAPES):
        words = {w: shape for shape in names for w in (shape, PLURALS[shape])}
        return WordMatcher(words, {}, "synthetic shapes", frozenset(SIZES + COLOURS))
    known = [n for n in names if n in COCO_SYNONYMS]
    words: dict[str, str] = {w: n for n in known for w in COCO_SYNONYMS[n]}
    phrases = {k: v for k, v in COCO_PHRASES.items() if v in known}
    for name in names:
        if name in COCO_SYNONYMS:
            continue
        parts = name.lower().split()  # another dataset's category: its own name and its plain plural
        if len(parts) == 1:
            words.setdefault(parts[0], name)
            words.setdefault(parts[0] + "s", name)
        elif len(parts) == 2:  # a phrase; longer names are not matched (no caption word stands for them)
            phrases.setdefault((parts[0], parts[1]), name)
            phrases.setdefault((parts[0], parts[1] + "s"), name)
    label = "COCO synonyms" if known and len(known) == len(names) else (
        "COCO synonyms + category names" if known else "category names")
    return WordMatcher(words, phrases, label)


# ------------------------------------------------------------------------------ boxes


class InstancesError(CaptioningError, ValueError):
    """An instances file is missing or does not follow the COCO instances schema."""


@dataclass(frozen=True)
class Instances:
    """Boxes by image and class, read from a COCO ``instances_*.json`` file."""

    path: str
    categories: tuple[str, ...]
    sizes: dict[int, tuple[float, float]]  # image_id -> (width, height) in pixels
    boxes: dict[int, dict[str, list[Box]]]  # image_id -> category name -> COCO boxes

    def matcher(self) -> WordMatcher:
        return matcher_for(self.categories)


def load_instances(path: str | Path) -> Instances:
    """Read a COCO instances file with pycocotools. Crowd boxes (iscrowd 1) are kept: a word such
    as "people" may well point into one. Raises InstancesError naming the file and the fix."""
    path = Path(path)
    coco = read_instances(path, InstancesError, sizes=True)  # checked: every box has its image and category
    names = {cat_id: cat["name"] for cat_id, cat in coco.cats.items()}
    sizes = {img_id: (float(img["width"]), float(img["height"])) for img_id, img in coco.imgs.items()}
    boxes: dict[int, dict[str, list[Box]]] = {img_id: {} for img_id in coco.imgs}
    for ann in coco.dataset["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes[ann["image_id"]].setdefault(names[ann["category_id"]], []).append((x, y, w, h))
    return Instances(str(path), tuple(names[i] for i in sorted(names)), sizes, boxes)


def boxes_to_grid(boxes: Sequence[Box], width: float, height: float, gh: int, gw: int) -> np.ndarray:
    """COCO boxes in pixels of a W x H image -> [N, 4] (x0, y0, x1, y1) in grid units."""
    if width <= 0 or height <= 0:
        raise InvalidValue(f"image size must be positive, got {width} x {height}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = gw / width, gh / height
    return np.stack([b[:, 0] * sx, b[:, 1] * sy, (b[:, 0] + b[:, 2]) * sx, (b[:, 1] + b[:, 3]) * sy], axis=1)


def cell_coverage(grid_boxes: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """[gh, gw]: the exact fraction of each cell's area inside the union of the boxes.

    grid_boxes: [N, 4] (x0, y0, x1, y1) in grid units. Exact by coordinate compression: the cell
    edges and box edges cut the grid into rectangles that are each wholly inside or outside every
    box, so overlapping boxes are counted once.
    """
    cover = np.zeros((gh, gw))
    b = np.asarray(grid_boxes, dtype=np.float64).reshape(-1, 4)
    b = np.stack([b[:, 0].clip(0, gw), b[:, 1].clip(0, gh), b[:, 2].clip(0, gw), b[:, 3].clip(0, gh)], axis=1)
    xs = np.unique(np.concatenate([np.arange(gw + 1, dtype=np.float64), b[:, 0], b[:, 2]]))
    ys = np.unique(np.concatenate([np.arange(gh + 1, dtype=np.float64), b[:, 1], b[:, 3]]))
    mx, my = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # pieces' midpoints
    inside_x = (b[:, 0, None] <= mx) & (mx < b[:, 2, None])  # (N, nx)
    inside_y = (b[:, 1, None] <= my) & (my < b[:, 3, None])  # (N, ny)
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(axis=0)  # (ny, nx)
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :] * covered  # (ny, nx), cell area is 1
    rows = np.floor(my).astype(int).clip(0, gh - 1)
    cols = np.floor(mx).astype(int).clip(0, gw - 1)
    np.add.at(cover, (rows[:, None].repeat(len(cols), 1), cols[None, :].repeat(len(rows), 0)), area)
    return cover


def centre_inside(grid_boxes: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """[gh, gw] bool: the cell's centre lies inside a box (half-open [x0, x1) x [y0, y1))."""
    b = np.asarray(grid_boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy = np.arange(gw) + 0.5, np.arange(gh) + 0.5
    in_x = (b[:, 0, None] <= cx) & (cx < b[:, 2, None])  # (N, gw)
    in_y = (b[:, 1, None] <= cy) & (cy < b[:, 3, None])  # (N, gh)
    return (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)


class WordScore(NamedTuple):
    pointing: float | None  # 0 or 1 (in [0, 1] for mode "sample": the hit probability); None: no word
    mass: float | None  # in [0, 1]


def score_word(attention: np.ndarray, grid_boxes: np.ndarray, mode: str = "expected") -> WordScore:
    """Pointing game and mass in box of one word's attention map [gh, gw] against boxes in grid
    units (see :func:`boxes_to_grid`); ``mode`` is how the decoder attended (module docstring)."""
    if mode not in HARD_MODES:
        raise InvalidValue(f"mode must be one of {', '.join(HARD_MODES)}, got {mode!r}")
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 2:
        raise InvalidValue(f"attention must be a [gh, gw] map, got shape {a.shape}")
    total = float(a.sum())
    if not math.isfinite(total) or total <= 0 or (a < 0).any():
        raise InvalidValue(f"attention must be non-negative weights with a positive sum, got sum {total}")
    gh, gw = a.shape
    cover = cell_coverage(grid_boxes, gh, gw)
    inside = centre_inside(grid_boxes, gh, gw)
    if mode == "sample":
        return WordScore(float((a * inside).sum() / total), float((a * cover).sum() / total))
    r, c = divmod(int(a.argmax()), gw)  # first maximum in row-major order
    mass = float(cover[r, c]) if mode == "argmax" else float((a * cover).sum() / total)
    return WordScore(float(inside[r, c]), mass)


# ------------------------------------------------------------------------------ a split


class NamedWord(NamedTuple):
    """A generated word that names an object class, with the attention it was emitted with."""

    index: int  # position in the caption
    word: str
    category: str
    attention: np.ndarray  # [gh, gw]
    attribute_maps: tuple[np.ndarray, ...] = ()  # [gh, gw] each: the attribute words before it (Word kinds)


def named_words(words: Sequence[str], attention: np.ndarray, matcher: WordMatcher) -> list[NamedWord]:
    """The naming words of one caption: words [n], attention [n, gh, gw] -> NamedWords."""
    attention = np.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] != len(words):
        raise InvalidValue(f"attention must be [{len(words)}, gh, gw] for {len(words)} words, "
                           f"got shape {attention.shape}")
    return [NamedWord(i, words[i], category, attention[i].astype(np.float32, copy=True),
                      tuple(attention[j].astype(np.float32, copy=True) for j in matcher.attribute_run(words, i)))
            for i, category in matcher.match(words)]


@dataclass(frozen=True)
class GroundingReport:
    """Grounding of a split; scores on the 0-1 scale, None when no word was scored."""

    mode: str
    words: int  # scored naming words
    images: int  # images with at least one scored word
    absent_words: int  # naming words whose class has no box in the image (excluded)
    images_without_boxes: int  # images not in the instances file (not scored)
    pointing_game: float | None  # mean over words
    mass_in_box: float | None
    pointing_game_per_image: float | None  # mean over images of each image's word mean
    mass_in_box_per_image: float | None
    per_category: dict[str, dict] = field(default_factory=dict)  # name -> words, pointing_game, mass_in_box
    # What a uniform attention map would score on the same words (the share of cells whose centre
    # is in a box; the boxes' share of the image): the level that means "not looking at all".
    chance_pointing_game: float | None = None
    chance_mass_in_box: float | None = None
    # The other word kinds (module docstring, "Word kinds"): kind -> {"words", "pointing_game",
    # "mass_in_box", "uniform_pointing_game", "uniform_mass_in_box"}, means over that kind's words.
    kinds: dict[str, dict] = field(default_factory=dict)

    def metrics(self) -> dict[str, float | int | None]:
        """The keys evaluate.py adds to its metrics (scores 0-1 here; grounding_words* counts)."""
        out = {"pointing_game": self.pointing_game, "mass_in_box": self.mass_in_box,
               "pointing_game_per_image": self.pointing_game_per_image,
               "mass_in_box_per_image": self.mass_in_box_per_image, "grounding_words": self.words,
               "uniform_pointing_game": self.chance_pointing_game, "uniform_mass_in_box": self.chance_mass_in_box}
        for kind, row in self.kinds.items():
            out.update({f"{key}_{kind}": value for key, value in row.items() if key != "words"})
            out[f"grounding_words_{kind}"] = row["words"]
        return out

    def describe(self, scale: float = 1.0) -> dict:
        """How the numbers were computed, for the metrics JSON; per-category scores x ``scale``."""
        def scaled(value: float | None) -> float | None:
            return None if value is None else value * scale

        per_category = {name: {k: v if k == "words" else scaled(v) for k, v in row.items()}
                        for name, row in self.per_category.items()}
        return {
            "averaged": "pointing_game, mass_in_box: mean over scored words; *_per_image: mean over "
                        "images of each image's mean over its scored words",
            "point": "centre of the maximum grid cell; each cell covers an equal share of the image",
            "attention": MODE_DESCRIPTIONS[self.mode], "mode": self.mode,
            "words": self.words, "images": self.images, "absent_class_words_excluded": self.absent_words,
            "images_without_boxes": self.images_without_boxes, "per_category": per_category,
            "uniform_attention": {
                "pointing_game": scaled(self.chance_pointing_game), "mass_in_box": scaled(self.chance_mass_in_box),
                "what": "a uniform map on the same words: share of cells whose centre is in a box; boxes' share "
                        "of the image"},
        }

    def notes(self) -> list[str]:
        if not self.words:
            lines = ["grounding: no generated word names an object present in its image: scores n/a"]
        else:
            lines = [f"grounding: {self.words} words naming an object in {self.images} images, averaged over words "
                     f"(per image: pointing game {100 * self.pointing_game_per_image:.2f}, mass in box "
                     f"{100 * self.mass_in_box_per_image:.2f}); attention scored: {MODE_DESCRIPTIONS[self.mode]}",
                     f"grounding: a uniform attention map would score pointing game {100 * self.chance_pointing_game:.2f}"
                     f", mass in box {100 * self.chance_mass_in_box:.2f} on these words"]
        for kind, row in self.kinds.items():
            if row["words"]:
                lines.append(f"grounding, {KIND_NAMES[kind]} ({row['words']}): pointing game "
                             f"{100 * row['pointing_game']:.2f} (uniform {100 * row['uniform_pointing_game']:.2f}), "
                             f"mass in box {100 * row['mass_in_box']:.2f} (uniform {100 * row['uniform_mass_in_box']:.2f})")
        if self.absent_words:
            lines.append(f"grounding: {self.absent_words} naming words excluded: their class has no box in the image")
        if self.images_without_boxes:
            lines.append(f"grounding: {self.images_without_boxes} images have no entry in the instances file")
        return lines


#: The word kinds beyond the nouns (module docstring, "Word kinds"): metric key suffix -> name.
KIND_NAMES = {"attribute": "attribute words", "phrase": "whole object phrase"}


def _used_map(attention: np.ndarray, mode: str) -> np.ndarray:
    """The map the decoder attended with: argmax mode one-hot on the maximum, otherwise alpha."""
    if mode != "argmax":
        return np.asarray(attention, dtype=np.float64)
    out = np.zeros(np.shape(attention))
    out.flat[int(np.argmax(attention))] = 1.0
    return out


def _average(scores: Sequence[WordScore]) -> WordScore:
    """The mean pointing game and mass in box of ``scores`` (None each when there are none)."""
    if not scores:
        return WordScore(None, None)
    return WordScore(float(np.mean([s.pointing for s in scores])), float(np.mean([s.mass for s in scores])))


def _row(scores: Sequence[WordScore], chance: Sequence[WordScore] | None = None) -> dict:
    """A table row: the words, their mean scores, and a uniform map's on the same words (``chance``)."""
    row = {"words": len(scores), **dict(zip(("pointing_game", "mass_in_box"), _average(scores)))}
    if chance is not None:
        row.update(zip(("uniform_pointing_game", "uniform_mass_in_box"), _average(chance)))
    return row


def score_grounding(named: Mapping[int, Sequence[NamedWord]], instances: Instances,
                    mode: str = "expected") -> GroundingReport:
    """Score every image's naming words (``named``: image_id -> its NamedWords, every decoded image
    a key, [] when its caption names nothing) against the instances' boxes."""
    word_scores: list[WordScore] = []
    chance: list[WordScore] = []
    image_means: list[WordScore] = []
    by_category: dict[str, list[WordScore]] = {}
    kind_scores: dict[str, tuple[list[WordScore], list[WordScore]]] = {kind: ([], []) for kind in KIND_NAMES}
    absent = missing = 0
    for image_id, items in named.items():
        if image_id not in instances.sizes:
            missing += 1
            continue
        width, height = instances.sizes[image_id]
        classes = instances.boxes.get(image_id, {})
        scores = []
        for item in items:
            boxes = classes.get(item.category)
            if not boxes:
                absent += 1
                continue
            gh, gw = item.attention.shape
            grid_boxes = boxes_to_grid(boxes, width, height, gh, gw)
            score = score_word(item.attention, grid_boxes, mode)
            uniform = score_word(np.ones((gh, gw)), grid_boxes, "sample")
            chance.append(uniform)
            scores.append(score)
            for attribute in item.attribute_maps:
                kind_scores["attribute"][0].append(score_word(attribute, grid_boxes, mode))
                kind_scores["attribute"][1].append(uniform)
            phrase = np.mean([_used_map(m, mode) for m in (*item.attribute_maps, item.attention)], axis=0)
            kind_scores["phrase"][0].append(score_word(phrase, grid_boxes, "sample" if mode == "sample" else "expected"))
            kind_scores["phrase"][1].append(uniform)
            by_category.setdefault(item.category, []).append(score)
        word_scores += scores
        if scores:
            image_means.append(_average(scores))
    (pointing, mass), per_image, uniform = _average(word_scores), _average(image_means), _average(chance)
    return GroundingReport(
        mode=mode, words=len(word_scores), images=len(image_means), absent_words=absent, images_without_boxes=missing,
        pointing_game=pointing, mass_in_box=mass, pointing_game_per_image=per_image.pointing,
        mass_in_box_per_image=per_image.mass, per_category={name: _row(s) for name, s in sorted(by_category.items())},
        chance_pointing_game=uniform.pointing, chance_mass_in_box=uniform.mass,
        kinds={kind: _row(*pair) for kind, pair in kind_scores.items()})

"""The captions of the synthetic dataset: the grammar's words, canonical captions, the pool of
true captions and the references (the package docstring and docs/synthetic.md state the rules)."""

from __future__ import annotations

import itertools
import random
from typing import Sequence

from captioning.console import InvalidValue
from captioning.config import SyntheticConfig
from captioning.data.synthetic.scenes import COLOURS, MARGIN_FRACTION, SHAPES, SIZES, SceneObject, group_objects

MAX_CAPTIONS_PER_IMAGE = 5
CANONICAL_BODY_REFERENCES = 4  # references that are the canonical caption behind a prefix
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
COUNT_OF = {word: count for count, word in COUNT_WORDS.items()}
PLURALS = {shape: shape + "s" for shape in SHAPES}
# Each prefix starts with its own word, and none with "a", the first word of most bodies: a greedy
# decoder picks word by word, so prefixes sharing a first word pool their votes against the plain
# body, and correct captions then miss every reference.
PREFIXES = ("there is", "there are", "the image shows", "an image of", "this image shows")
_PREFIX_STARTS = tuple(prefix + " " for prefix in PREFIXES)
# phrase -> (axis, sign): "A phrase B" is true iff sign * (coord(A) - coord(B)) > 0
RELATIONS = {"to the left of": ("x", -1), "to the right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
ORDERS = {"from left to right": "x", "from top to bottom": "y"}

#: Every word the grammar can produce, sorted.
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {*SIZES, *COLOURS, *SHAPES, *PLURALS.values(), *COUNT_WORDS.values(), "and"}
    | {w for phrase in (*PREFIXES, *RELATIONS, *ORDERS) for w in phrase.split()}))


# --------------------------------------------------------------------------- captions


def noun_phrase_text(key: tuple[str, str, str], count: int) -> str:
    size, colour, shape = key
    if count == 1:
        return f"a {size} {colour} {shape}"
    if count not in COUNT_WORDS:
        raise InvalidValue(f"the grammar has no count word for {count} objects")
    return f"{COUNT_WORDS[count]} {size} {colour} {PLURALS[shape]}"


def _list_body(nps: Sequence[str]) -> str:
    return nps[0] if len(nps) == 1 else " ".join(nps[:-1]) + " and " + nps[-1]


def _prefixed(body: str, first_count: int) -> list[str]:
    there = "there is" if first_count == 1 else "there are"
    return [f"{prefix} {body}" for prefix in (there, "the image shows", "an image of", "this image shows")]


def canonical_caption(objects: Sequence[SceneObject]) -> str:
    """Reference #1: the single phrasing a model should learn (see the module docstring)."""
    if not objects:
        raise InvalidValue("a scene needs at least one object")
    groups = group_objects(objects)
    if len(objects) == 2 and len(groups) == 2:
        a, b = objects
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        # Placement guarantees dx >= margin, so the horizontal relation is never a near-tie;
        # choosing the axis of larger separation instead would be a coin flip when dx ~ dy.
        if dx > 0:  # always for generated scenes
            first, second = sorted(objects, key=lambda o: o.cx)
            return f"{noun_phrase_text(first.key, 1)} to the left of {noun_phrase_text(second.key, 1)}"
        if dy > 0:  # coinciding centres fall back to the list
            first, second = sorted(objects, key=lambda o: o.cy)
            return f"{noun_phrase_text(first.key, 1)} above {noun_phrase_text(second.key, 1)}"
    return _list_body([noun_phrase_text(key, len(members)) for key, members in groups.items()])


def caption_pool(objects: Sequence[SceneObject], image_size: int = SyntheticConfig.image_size) -> list[str]:
    """Every phrasing the generator may produce for a scene, the canonical caption first; relations
    and orders only where the centres differ by at least ``MARGIN_FRACTION * image_size``."""
    margin = MARGIN_FRACTION * image_size
    groups = group_objects(objects)
    pool: dict[str, None] = {canonical_caption(objects): None}  # a dict keeps order and drops repeats

    def add(body: str, first_count: int, prefixes: bool = True) -> None:
        pool[body] = None
        if prefixes:
            for caption in _prefixed(body, first_count):
                pool[caption] = None

    if len(objects) == 2 and len(groups) == 2:
        for axis, (before, after) in {"x": ("to the left of", "to the right of"), "y": ("above", "below")}.items():
            first, second = sorted(objects, key=lambda o: o.centre(axis))
            if second.centre(axis) - first.centre(axis) >= margin:
                add(f"{noun_phrase_text(first.key, 1)} {before} {noun_phrase_text(second.key, 1)}", 1)
                add(f"{noun_phrase_text(second.key, 1)} {after} {noun_phrase_text(first.key, 1)}", 1)
    for order in itertools.permutations(groups.items()):
        add(_list_body([noun_phrase_text(key, len(members)) for key, members in order]), len(order[0][1]))
    if len(groups) >= 2 and all(len(members) == 1 for members in groups.values()):
        for phrase, axis in ORDERS.items():
            ordered = sorted(objects, key=lambda o: o.centre(axis))
            coords = [o.centre(axis) for o in ordered]
            if all(b - a >= margin for a, b in zip(coords, coords[1:])):
                add(f"{phrase} {_list_body([noun_phrase_text(o.key, 1) for o in ordered])}", 1, prefixes=False)
    return list(pool)


def reference_captions(objects: Sequence[SceneObject], n: int, rng: random.Random,
                       image_size: int = SyntheticConfig.image_size) -> list[str]:
    """The canonical caption, then ``n - 1`` distinct others drawn from :func:`caption_pool`.

    Of the others, up to :data:`CANONICAL_BODY_REFERENCES` are the canonical caption behind a
    prefix ("there is ...", "the image shows ..."), the rest other bodies without a prefix where
    the scene has them (another group order, the reversed relation, "from left to right ...").
    With all four prefixes (the default), BLEU measures correctness, not which of equally true
    phrasings a model prefers -- COCO's references share a modal style in the same way (what the
    other choices scored: docs/synthetic.md, References).
    """
    pool = caption_pool(objects, image_size)
    if not 1 <= n <= len(pool):
        raise InvalidValue(f"asked for {n} references, but this scene has {len(pool)} distinct phrasings")
    canonical = pool[0]
    prefixed = [c for c in _prefixed(canonical, COUNT_OF.get(canonical.split(" ", 1)[0], 1)) if c in pool]
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

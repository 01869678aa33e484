"""The strict caption checker of the synthetic dataset: does a caption -- a reference or a
model's output -- parse under the dataset's grammar and say exactly what the scene shows? And
caption accuracy, the fraction of predictions it accepts (a metric of captioning evaluate).
The grammar and the truth conditions are stated in :mod:`captioning.data.synthetic`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from captioning.console import InvalidValue
from captioning.data.synthetic.language import (COUNT_OF, COUNT_WORDS, ORDERS, PLURALS, PREFIXES, RELATIONS, VOCABULARY,
                                                noun_phrase_text)
from captioning.data.synthetic.scenes import COLOURS, SHAPES, SIZES, SceneObject, group_objects


@dataclass(frozen=True)
class _NounPhrase:
    count: int
    key: tuple[str, str, str]

    def __str__(self) -> str:
        return noun_phrase_text(self.key, self.count)


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
        count = COUNT_OF[self.expect(list(COUNT_OF), "'a', 'two' or 'three'")]
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
    unknown = [t for t in tokens if t not in VOCABULARY]
    if unknown:
        raise _Ungrammatical(f"unknown word {unknown[0]!r}")
    return _Parser(tokens).caption()


def _falsity(parsed: _Parsed, objects: Sequence[SceneObject]) -> str | None:
    groups = group_objects(objects)
    if parsed.form == "relation":
        a, b = parsed.nps
        if len(objects) != 2 or len(groups) != 2:
            return (f"a relation describes exactly two objects of different kinds; the scene has "
                    f"{len(objects)} object(s) in {len(groups)} group(s)")
        for np_ in (a, b):
            if np_.count != 1:
                return f"a relation relates single objects, not '{np_}'"
            if np_.key not in groups:
                return f"'{np_}' is not in the scene"
        if a.key == b.key:
            return f"both sides of the relation are '{a}'"
        axis, sign = RELATIONS[parsed.phrase]  # type: ignore[index]
        if sign * (groups[a.key][0].centre(axis) - groups[b.key][0].centre(axis)) <= 0:
            return f"'{a}' is not {parsed.phrase} '{b}'"
        return None
    named: set[tuple[str, str, str]] = set()
    for np_ in parsed.nps:
        if np_.key in named:
            return f"'{noun_phrase_text(np_.key, 1)}' kind named twice"
        named.add(np_.key)
        members = groups.get(np_.key)
        if members is None:
            return f"'{np_}' is not in the scene"
        if len(members) != np_.count:
            return f"the caption says '{np_}' but the scene has {len(members)}"
    missing = [noun_phrase_text(key, len(members)) for key, members in groups.items() if key not in named]
    if missing:
        return "missing: " + ", ".join(f"'{m}'" for m in missing)
    if parsed.form == "ordered":
        if any(np_.count != 1 for np_ in parsed.nps):
            return f"'{parsed.phrase}' is used only when every object is of a different kind"
        axis = ORDERS[parsed.phrase]  # type: ignore[index]
        coords = [groups[np_.key][0].centre(axis) for np_ in parsed.nps]
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
    """True iff the caption parses under the grammar AND is exactly true of the scene: every object
    named with its size, colour and shape, counts, relations, order and prefix agreement right,
    nothing extra or missing. Extra whitespace and upper case are tolerated, nothing else."""
    return explain_caption(caption, objects) is None


def caption_accuracy(predictions: Mapping[int, str], scenes: Mapping[int, Sequence[SceneObject]]) -> float:
    """Fraction of predicted captions that :func:`check_caption` accepts (0.0 for no predictions);
    ValueError naming the image ids of predictions that have no scene."""
    unknown = [image_id for image_id in predictions if image_id not in scenes]
    if unknown:
        shown = ", ".join(str(i) for i in sorted(unknown, key=str)[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise InvalidValue(f"{len(unknown)} prediction(s) have no scene: image ids {shown}{more}")
    if not predictions:
        return 0.0
    correct = sum(check_caption(caption, scenes[image_id]) for image_id, caption in predictions.items())
    return correct / len(predictions)

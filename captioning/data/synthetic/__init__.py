"""The built-in synthetic captioning dataset: coloured shapes, a small grammar, COCO file formats.

docs/synthetic.md describes the scenes, the grammar, the references and the files in full; this
is their contract in short. Modules: :mod:`.scenes` (objects, placement, rendering),
:mod:`.language` (the grammar, canonical captions, references), :mod:`.write` (the atomic writer);
the checker that decides whether a caption is true of a scene is
:mod:`captioning.evaluation.caption_check`.

Scenes: 1 to 3 objects on a noisy low-saturation gradient, each a ``small`` (box side ~0.16 x
image_size) or ``large`` (~0.32) ``red``/``green``/``blue``/``yellow`` ``circle``/``square``/
``triangle`` filling its square box, boxes at least 2 px apart; a quarter of the scenes with two or
more objects repeat one object (counts). A *group* is the objects sharing (size, colour, shape);
groups are ordered left to right by the centre x of their leftmost member, and placement is
rejected unless those centres differ by at least the margin ``MARGIN_FRACTION * image_size``. A
scene whose placement fails :data:`~.scenes.MAX_PLACEMENTS` times is drawn anew, and after
:data:`~.scenes.MAX_SCENE_DRAWS` draws one object is placed, so :func:`make_scene` always ends.
Each image has its own generators, seeded from ``"synthetic-v<version>/seed=<seed>/<split>/<index>/
<purpose>"`` (string seeding hashes with SHA-512: the same on every process and machine).

Language::

    caption  := [prefix] list | [prefix] relation | ordered
    prefix   := "there is" | "there are" | "the image shows" | "an image of" | "this image shows"
    np       := "a" SIZE COLOUR SHAPE | ("two" | "three") SIZE COLOUR SHAPE "s"
    list     := np | np "and" np | np np "and" np
    relation := np ("to the left of" | "to the right of" | "above" | "below") np
    ordered  := ("from left to right" | "from top to bottom") list     (two or more nps)

A caption is true of a scene iff its nps name every group once with its exact size, colour, shape
and count; a relation is used only for exactly two objects of different kinds and holds strictly
between the box centres (y grows downwards); an ordered body only when every group is one object,
in strictly increasing centre x or y; "there is" takes a singular np, "there are" a plural one.
Reference #1 is the canonical caption (:func:`canonical_caption`), the others its body under the
prefixes (:func:`reference_captions`); a relation or order is stated only beyond the margin.

Files: :func:`generate_synthetic` writes ``root/`` :func:`dataset_dir` ``/`` with ``{split}/`` images,
``annotations/captions_{split}.json`` and ``instances_{split}.json`` (COCO formats, image and
annotation ids unique across splits) and ``manifest.json``, into a partial folder renamed into
place when complete.
"""

from __future__ import annotations

from captioning.data.synthetic.language import PLURALS, VOCABULARY, canonical_caption, reference_captions
from captioning.data.synthetic.scenes import (COLOURS, SHAPES, SIZES, SceneObject, load_scenes, make_scene,
                                              render_scene)
from captioning.data.synthetic.write import GENERATOR_VERSION, dataset_dir, generate_synthetic

__all__ = ["COLOURS", "GENERATOR_VERSION", "PLURALS", "SHAPES", "SIZES", "SceneObject", "VOCABULARY",
           "canonical_caption", "dataset_dir", "generate_synthetic", "load_scenes", "make_scene",
           "reference_captions", "render_scene"]

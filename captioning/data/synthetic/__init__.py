"""The built-in synthetic captioning dataset: coloured shapes, a small grammar, COCO file formats.

Modules: :mod:`.scenes` (objects, placement, rendering), :mod:`.language` (the grammar, canonical
captions and references), :mod:`.write` (the atomic writer of the dataset files); the caption
checker lives beside the evaluation code, :mod:`captioning.evaluation.caption_check`. The names
other code uses are importable from this package (``__all__``); the rest stay in their module.

Nothing is downloaded. :func:`generate_synthetic` draws the dataset on first use (a few seconds
for the default :class:`~captioning.config.SyntheticConfig`) and writes it in the *real* COCO
formats, so the one COCO reader serves both datasets.
:func:`captioning.evaluation.caption_check.check_caption` is a strict checker that decides whether
any caption -- a reference or a model's output -- is exactly true of a scene;
:func:`~captioning.evaluation.caption_check.caption_accuracy` turns it into a metric.

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

from captioning.data.synthetic.language import PLURALS, VOCABULARY, canonical_caption, reference_captions
from captioning.data.synthetic.scenes import (COLOURS, SHAPES, SIZES, SceneObject, load_scenes, make_scene,
                                              render_scene)
from captioning.data.synthetic.write import GENERATOR_VERSION, dataset_dir, generate_synthetic

__all__ = ["COLOURS", "GENERATOR_VERSION", "PLURALS", "SHAPES", "SIZES", "SceneObject", "VOCABULARY",
           "canonical_caption", "dataset_dir", "generate_synthetic", "load_scenes", "make_scene",
           "reference_captions", "render_scene"]

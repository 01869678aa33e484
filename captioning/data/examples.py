"""A small generated dataset in the real caption-file formats, to try and benchmark preparation.

Image ``id`` is a JPEG whose average colour is :func:`id_colour` (a smooth pattern plus pixel
noise around it, so files are photo-sized rather than flat), and each of its captions names the
id ("... image 17 ..."). A caption paired with the wrong image is therefore visible in the
pixels and in the words; tests/test_prepare_data.py relies on it.

    captioning prepare --make-example data/example --num-images 500 --example-size 256
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from captioning.console import InvalidValue
from captioning.data.formats import FORMATS

WORDS = ("red", "small", "large", "bright", "dark", "round", "square", "old", "new", "busy")
NOUNS = ("dog", "cat", "car", "tree", "house", "boat", "bird", "table", "street", "man")


def id_colour(image_id: int) -> tuple[int, int, int]:
    """A colour per id; consecutive ids differ by at least 53 levels in every channel."""
    return (28 + image_id * 53 % 200, 28 + image_id * 97 % 200, 28 + image_id * 151 % 200)


def example_image(image_id: int, size: int, noise: int = 12) -> Image.Image:
    """An RGB image averaging id_colour(image_id), with a +-noise pattern (0: flat colour)."""
    rng = np.random.default_rng(image_id)
    base = np.array(id_colour(image_id), dtype=np.float64)
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    if noise:
        pixels += rng.uniform(-noise, noise, size=(size, size, 3))
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")


def example_captions(image_id: int, count: int = 5) -> list[str]:
    rng = random.Random(image_id)
    return [f"{rng.choice(('a', 'the', 'one'))} {rng.choice(WORDS)} {rng.choice(NOUNS)} in image {image_id}"
            for _ in range(count)]


def write_example_dataset(root: str | Path, num_images: int, *, image_size: int = 256, fmt: str = "karpathy",
                          val: int | None = None, test: int | None = None, noise: int = 12) -> tuple[Path, Path]:
    """Write ``root/images/img_<id>.jpg`` (ids 1..num_images; ``val`` and ``test`` images: 10% each
    by default) and captions in ``fmt`` (its Format's ``write_example``: karpathy, coco, flickr8k);
    -> (captions file, images root)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    val = max(1, num_images // 10) if val is None else val
    test = max(1, num_images // 10) if test is None else test
    ids = list(range(1, num_images + 1))
    split_of = {i: "val" if n < val else "test" if n < val + test else "train" for n, i in enumerate(ids)}
    writers = [name for name, f in FORMATS.items() if hasattr(f, "write_example")]
    if fmt not in writers:
        raise InvalidValue(f"unknown example format {fmt!r}: {', '.join(writers[:-1])} or {writers[-1]}")
    for i in ids:
        example_image(i, image_size, noise).save(root / "images" / f"img_{i}.jpg", quality=90)
    return FORMATS[fmt].write_example(root, {i: example_captions(i) for i in ids}, split_of)

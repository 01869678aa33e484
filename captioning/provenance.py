"""What a model was trained on, and how every command says it.

A model knows only its training data: one trained on the built-in synthetic set (coloured shapes
on a plain background, docs/synthetic.md) names coloured shapes in any photo it is given. So every
checkpoint (``hyper_parameters["training_data"]``) and model folder (config.json
``"training_data"``) records the data it was trained on, and ``caption``, the Python API's repr,
the demo's header, ``evaluate`` and the model card state it::

    {"dataset": "synthetic" | "coco" | "prepared",   # config data.dataset
     "name": str,                                   # the dataset folder's name
     "vocab_size": int,                             # words the model can say
     "train_images": int | None}                    # images of the training split (None: unknown)

A checkpoint or folder written before the record existed gets one inferred from its config
(:func:`checked`): the synthetic set's size is in its config, a COCO folder's is unknown.
Torch-free, so that the ONNX engine reads it too.
"""

from __future__ import annotations

import re
from pathlib import Path

from captioning.config import Config
from captioning.data.sources import is_generated, source_for

#: The one line a synthetic-trained model prints when it captions images that are not from its set.
SYNTHETIC_NOTE = ("note: this model was trained on the built-in synthetic set (coloured shapes on a plain "
                  "background): it describes every image as coloured shapes, whatever the image shows")
#: The synthetic dataset's folder name (captioning/data/synthetic/write.py dataset_dir).
_SYNTHETIC_FOLDER = re.compile(r"synthetic-v[0-9]+-seed")


def record(cfg: Config, vocab_size: int, train_images: int | None, name: str) -> dict:
    """The training data's record (see above), as training writes it into a checkpoint."""
    return {"dataset": cfg.data.dataset, "name": name, "vocab_size": int(vocab_size),
            "train_images": None if train_images is None else int(train_images)}


def checked(found, cfg: Config, vocab_size: int) -> dict:
    """``found`` (a checkpoint's or folder's record, or None) if it is one, else the record of a
    model saved before records were kept: what its config says (the synthetic set's size is its
    data.synthetic.num_train; another dataset's is unknown, None)."""
    if (isinstance(found, dict) and isinstance(found.get("dataset"), str) and isinstance(found.get("name"), str)
            and isinstance(found.get("vocab_size"), int)
            and (found.get("train_images") is None or isinstance(found.get("train_images"), int))):
        return {key: found.get(key) for key in ("dataset", "name", "vocab_size", "train_images")}
    source = source_for(cfg.data)
    return record(cfg, vocab_size, source.known_train_images, source.root.name or str(cfg.data.root))


def is_synthetic(data: dict) -> bool:
    """Whether the record ``data`` names a dataset the project generates (the synthetic set)."""
    return is_generated(data.get("dataset"))


def describe(data: dict) -> str:
    """One phrase: 'the built-in synthetic shapes (synthetic-v3-..., 10,000 training images, 31 words)'."""
    images = data.get("train_images")
    count = f"{images:,} training images" if isinstance(images, int) else "training images: unknown"
    what = "the built-in synthetic shapes" if is_synthetic(data) else f"{data.get('dataset')} data"
    return f"{what} ({data.get('name') or 'unknown'}, {count}, {data.get('vocab_size')} words)"


def note(data: dict, sources: list[str]) -> str | None:
    """:data:`SYNTHETIC_NOTE` when a synthetic-trained model captions ``sources`` (paths, or
    "<PIL image>", "<array>", ...) of which one is not a file of a synthetic set; else None."""
    if not is_synthetic(data) or all(not s.startswith("<") and from_synthetic_set(s) for s in sources):
        return None
    return SYNTHETIC_NOTE


def from_synthetic_set(path: str | Path) -> bool:
    """Whether an image file lies in a synthetic dataset folder (one the generator wrote)."""
    try:
        parts = Path(path).resolve().parts
    except (OSError, RuntimeError):
        parts = Path(path).parts
    return any(_SYNTHETIC_FOLDER.match(part) for part in parts)

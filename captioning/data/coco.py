"""Reading captions in the official COCO captions format (``captions_train2014.json``).

    {"images": [{"id": int, "file_name": str, ...}],
     "annotations": [{"id": int, "image_id": int, "caption": str}]}

Read with pycocotools; the built-in synthetic dataset is written in this same format.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO


class AnnotationError(ValueError):
    """An annotation file is missing or does not follow the expected schema."""


class EmptySplitError(AnnotationError):
    """A well-formed captions file with no captioned image (a split that is empty)."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...]


def read_json(path: Path, what: str, error: type[Exception]) -> Any:
    """The parsed contents of the JSON file ``path``, or ``error`` with a one-line message that
    names the file (``what``: e.g. "captions file") when it is missing or not valid JSON."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} is not valid JSON: {err}") from None


def load_coco_captions(captions_json: str | Path, image_dir: str | Path) -> list[ImageRecord]:
    """One record per image that has at least one non-empty caption, sorted by image id."""
    captions_json, image_dir = Path(captions_json), Path(image_dir)
    data = read_json(captions_json, "captions file", AnnotationError)
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise AnnotationError(
            f"{captions_json} is not a COCO captions file: it needs top-level 'images' and "
            "'annotations' lists (like captions_train2014.json)"
        )
    for ann in data["annotations"][:1]:
        if not {"image_id", "caption"} <= set(ann):
            raise AnnotationError(
                f"{captions_json}: annotations need 'image_id' and 'caption' (is this an "
                "instances_*.json file? pass the captions_*.json file instead)"
            )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    records = []
    for image_id in sorted(coco.imgs):
        captions = tuple(
            ann["caption"].strip() for ann in coco.imgToAnns.get(image_id, []) if ann["caption"].strip()
        )
        if captions:
            records.append(ImageRecord(image_id, image_dir / coco.imgs[image_id]["file_name"], captions))
    if not records:
        raise EmptySplitError(f"{captions_json} holds no image with a non-empty caption")
    return records

"""Every COCO JSON file the project reads or writes, and the one caption-text normalisation.

The three COCO formats (the built-in synthetic dataset and every prepared folder use them too):

captions (``captions_train2014.json``)::

    {"images": [{"id": int, "file_name": str, ...}],
     "annotations": [{"id": int, "image_id": int, "caption": str}]}

instances (``instances_train2014.json``; boxes in source-image pixels)::

    {"images": [{"id": int, "width": int, "height": int, ...}],
     "annotations": [{"id": int, "image_id": int, "category_id": int, "bbox": [x, y, w, h], ...}],
     "categories": [{"id": int, "name": str}]}

results (what a captioning system outputs, what the official evaluation scores)::

    [{"image_id": int, "caption": str}, ...]

Captions and instances are indexed with pycocotools. Every reader checks the schema first and
raises a one-line error naming the file and the fix; a reader's caller picks the error class
(``AnnotationError`` by default), so each command reports it in its own terms.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from captioning.console import CaptioningError
from captioning.files import atomic_write_json

#: The splits of every dataset, in this order.
SPLITS = ("train", "val", "test")


class AnnotationError(CaptioningError, ValueError):
    """An annotation file is missing or does not follow the expected schema."""


class EmptySplitError(AnnotationError):
    """A well-formed captions file with no captioned image (a split that is empty)."""


class ResultsError(CaptioningError, ValueError):
    """A results file is missing or is not in the COCO results format."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...]


# ------------------------------------------------------------------------------ JSON


def read_json(path: str | Path, what: str, error: type[Exception] = AnnotationError) -> Any:
    """The parsed contents of the JSON file ``path``, or ``error`` with a one-line message that
    names the file (``what``: e.g. "captions file") when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} is not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{what} {path} is not a {what}: its JSON is nested too deeply") from None


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    """Write atomically (captioning.files); ``indent`` None: the compact form (no spaces)."""
    atomic_write_json(path, obj, indent=indent, separators=(",", ":") if indent is None else (",", ": "))


def coco_index(data: dict):
    """A pycocotools ``COCO`` index of already-parsed (and checked) captions or instances data."""
    from pycocotools.coco import COCO

    if any("id" not in ann for ann in data["annotations"]):  # a user's own file: pycocotools indexes by id
        data["annotations"] = [{**ann, "id": ann.get("id", i)} for i, ann in enumerate(data["annotations"])]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


# ------------------------------------------------------------------------------ caption text

# Typographic characters NFKD leaves alone, mapped to their ASCII forms.
_ASCII_FORMS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
})


def normalize_caption(text: str) -> tuple[str, bool]:
    """-> (ASCII caption, whether non-ASCII text was changed); the one caption normalisation
    (preparation, the COCO-folder reader, the evaluation's references). NFKD, combining marks
    dropped (``café`` -> ``cafe``), typographic quotes and dashes to ASCII, any other non-ASCII
    character to a space, whitespace collapsed. Case and ASCII punctuation stay (the references
    keep them; tokenisation drops them)."""
    if text.isascii():
        return " ".join(text.split()), False
    decomposed = unicodedata.normalize("NFKD", text).translate(_ASCII_FORMS)
    kept = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    ascii_text = "".join(ch if ch.isascii() else " " for ch in kept)
    return " ".join(ascii_text.split()), True


# ------------------------------------------------------------------------------ captions


def is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def is_whole_number(value: Any) -> bool:
    """An int of JSON (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON's NaN and Infinity are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_captions(path: str | Path, what: str = "captions file", error: type[Exception] = AnnotationError):
    """The one reader of COCO captions files, checked and indexed: -> (pycocotools ``COCO``, the
    parsed data). Checked: every image has an ``id`` (number or string) and a ``file_name``, every
    annotation an ``image_id`` and a ``caption`` (not a string: empty); a Karpathy split file or an
    instances file given by mistake is named as such."""
    path = Path(path)
    data = read_json(path, what, error)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
            and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        raise error(f"{path} is a Karpathy split file, not a COCO captions file; use --format karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise error(f"{path} is not a COCO captions file: it needs top-level 'images' and 'annotations' lists "
                    "(like captions_train2014.json)")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise error(f"{path}: images[{i}] needs an 'id' (a number) and a 'file_name' string (COCO captions "
                        f"schema), got {img!r:.80}")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not is_id(ann.get("image_id")) or "caption" not in ann:
            hint = (" (this is an instances_*.json file: pass it with --instances, and the captions_*.json file "
                    "as the captions)"
                    if isinstance(ann, dict) and "bbox" in ann else "")
            raise error(f"{path}: annotations[{i}] needs an 'image_id' (a number) and a 'caption'{hint}, "
                        f"got {ann!r:.80}")
    return coco_index(data), data


def load_coco_captions(captions_json: str | Path, image_dir: str | Path) -> list[ImageRecord]:
    """One record per image with at least one non-empty caption (normalised), sorted by image id.
    Raises EmptySplitError when there is none."""
    captions_json, image_dir = Path(captions_json), Path(image_dir)
    coco, _ = read_captions(captions_json)
    records = []
    for image_id in sorted(coco.imgs, key=lambda i: (isinstance(i, str), i)):
        cleaned = (normalize_caption(ann["caption"] if isinstance(ann["caption"], str) else "")[0]
                   for ann in coco.imgToAnns.get(image_id, []))
        captions = tuple(c for c in cleaned if c)
        if captions:
            records.append(ImageRecord(image_id, image_dir / coco.imgs[image_id]["file_name"], captions))
    if not records:
        raise EmptySplitError(f"{captions_json} holds no image with a non-empty caption")
    return records


# ------------------------------------------------------------------------------ instances


def read_instances(path: str | Path, error: type[Exception] = AnnotationError, sizes: bool = False):
    """A COCO instances file, checked and indexed (pycocotools ``COCO``): every annotation has an
    ``image_id`` and a ``category_id`` that are listed (whole numbers), and a ``bbox`` of 4 finite
    numbers with width and height >= 0; every category an integer ``id`` and a ``name`` string;
    every image an integer ``id`` and, with ``sizes`` (or where given), a positive ``width`` and
    ``height``. Crowd boxes are kept; a captions file is named as such."""
    path = Path(path)
    data = read_json(path, "instances file", error)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "caption" in anns[0]:
        raise error(f"{path} is a COCO captions file, not an instances file: pass it with --captions")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise error(f"{path} is not a COCO instances file: it needs top-level 'images', 'annotations' and "
                    "'categories' lists (like instances_val2014.json)")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or (sizes and not {"width", "height"} <= img.keys()):
            needs = "'id', 'width' and 'height'" if sizes else "an 'id'"
            raise error(f"{path}: every image needs {needs} (got {img!r:.80})")
        # Sizes scale the boxes: where given (a prepared folder stores them for evaluation), they must be usable.
        given = [img[k] for k in ("width", "height") if k in img]
        if not is_whole_number(img["id"]) or not all(_is_number(size) and size > 0 for size in given):
            raise error(f"{path}: images[{i}] needs a whole-number 'id' and a positive 'width' and 'height' in pixels "
                        f"(got {img!r:.80}); fix or drop that entry")
        image_ids.add(img["id"])
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_whole_number(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise error(f"{path}: categories[{i}] needs a whole-number 'id' and a 'name' string (got {cat!r:.80})")
    category_ids = {cat["id"] for cat in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and {"image_id", "category_id"} <= ann.keys()):
            raise error(f"{path}: annotations[{i}] needs 'image_id', 'category_id' and a 'bbox' [x, y, w, h] "
                        f"(got {ann!r:.80})")
        if not (is_whole_number(ann["image_id"]) and is_whole_number(ann["category_id"]) and all(map(_is_number, bbox))
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise error(f"{path}: annotations[{i}] needs whole-number 'image_id' and 'category_id' and a 'bbox' of "
                        f"four numbers [x, y, w, h] with w, h >= 0 (got {ann!r:.80}); fix or drop that entry")
        if ann["category_id"] not in category_ids:
            raise error(f"{path}: annotation {ann.get('id', i)} has category_id {ann['category_id']}, "
                        "which is not in 'categories'")
        if ann["image_id"] not in image_ids:
            raise error(f"{path}: annotation {ann.get('id', i)} names image {ann['image_id']}, "
                        "which is not in 'images'")
    return coco_index(data)


def read_boxes(path: str | Path, error: type[Exception] = AnnotationError) -> dict[int, list[tuple[str, list[float]]]]:
    """COCO instances file -> {image_id: [(category name, [x, y, w, h]), ...]}; every image a key,
    boxes in annotation-id order."""
    coco = read_instances(path, error)
    names = {cat_id: cat["name"] for cat_id, cat in coco.cats.items()}
    boxes: dict[int, list[tuple[str, list[float]]]] = {img_id: [] for img_id in coco.imgs}
    for ann in sorted(coco.dataset["annotations"], key=lambda a: (a["image_id"], a["id"])):
        boxes[ann["image_id"]].append((names[ann["category_id"]], [float(v) for v in ann["bbox"]]))
    return boxes


# ------------------------------------------------------------------------------ results


def write_results(path: str | Path, predictions: Mapping[int, str]) -> None:
    """Captions by image id -> a COCO results file, sorted by image id (written atomically)."""
    write_json(path, [{"image_id": i, "caption": c} for i, c in sorted(predictions.items())], indent=1)


def load_results(path: str | Path) -> dict[int, str]:
    """A COCO results file ``[{"image_id": int, "caption": str}, ...]`` -> {image_id: caption}
    (other keys ignored). Raises ResultsError naming the file, the entry and the fix, also for an
    image id given twice: which caption to score would be a guess (the official evaluation refuses it)."""
    path = Path(path)
    data = read_json(path, "results file", ResultsError)
    if not isinstance(data, list):
        hint = " (this looks like a captions file: pass it as --annotations)" if (
            isinstance(data, dict) and "annotations" in data) else ""
        raise ResultsError(f"{path} is not a COCO results file: it must be a JSON list of "
                           f'{{"image_id": int, "caption": str}} objects, got a {type(data).__name__}{hint}')
    if not data:
        raise ResultsError(f"results file {path} is an empty list: nothing to score")
    results: dict[int, str] = {}
    counts: dict[int, int] = {}
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or not {"image_id", "caption"} <= entry.keys():
            raise ResultsError(f"{path}: entry {n} is not an object with 'image_id' and 'caption': {entry!r:.80}")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ResultsError(f"{path}: entry {n} has image_id {image_id!r}; image ids must be integers")
        if not isinstance(caption, str):
            raise ResultsError(f"{path}: entry {n} (image {image_id}) has a caption of type "
                               f"{type(caption).__name__}; captions must be strings")
        counts[image_id] = counts.get(image_id, 0) + 1
        results.setdefault(image_id, caption)
    duplicated = sorted(i for i, c in counts.items() if c > 1)
    if duplicated:
        shown = ", ".join(f"{i} ({counts[i]}x)" for i in duplicated[:5]) + (", ..." if len(duplicated) > 5 else "")
        raise ResultsError(f"{path}: {len(duplicated)} image id(s) occur more than once ({shown}); give one "
                           "caption per image (the official COCO evaluation refuses duplicates too)")
    return results

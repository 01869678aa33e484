"""Readers for the caption datasets users bring, into one in-memory form for preparation.

Formats (``--format`` of captioning prepare; ``auto`` tells them apart by content):

``karpathy``  Karpathy's split files ``dataset_coco.json`` / ``dataset_flickr8k.json`` /
    ``dataset_flickr30k.json``::

        {"images": [{"filepath"?: "val2014", "filename": "...jpg", "imgid": int, "cocoid"?: int,
                     "split": "train"|"restval"|"val"|"test",
                     "sentences": [{"raw": str, "tokens": [str], ...}]}], "dataset": "coco"}

    The image file is ``IMAGES/filepath/filename`` (``IMAGES/filename`` without ``filepath``).
    Image id: ``cocoid`` when every image has one (so ids are COCO's and instances files match),
    else ``imgid``. ``restval`` joins ``train`` (the usual 113,287 training images). The caption
    is ``raw`` (``tokens`` joined by spaces when ``raw`` is absent).

``coco``  Official COCO captions files (``captions_train2014.json``), read with pycocotools::

        {"images": [{"id": int, "file_name": str}], "annotations": [{"image_id": int, "caption": str}]}

    Either several files pooled and then split (a split-list file per split, or a seeded
    5,000 / 5,000 / rest split), or one file per split given as ``SPLIT=FILE``. The image file is
    the first of ``IMAGES/file_name``, ``IMAGES/<tag>/file_name`` (``<tag>`` from the file's name,
    ``captions_val2014.json`` -> ``val2014``) and, for ``SPLIT=FILE``, ``IMAGES/<split>/file_name``
    that exists.

``flickr8k``  ``Flickr8k.token.txt`` (also Flickr30k's ``results_20130124.token``): lines
    ``<file name>#<n><TAB><caption>``, with the split lists ``Flickr_8k.trainImages.txt``,
    ``Flickr_8k.devImages.txt`` (-> val), ``Flickr_8k.testImages.txt``: one file name per line.
    Image ids are the positions of the file names in sorted order (0, 1, ...); the file name is
    kept beside the id in the prepared folder.

A user's own dataset is a folder of images with a captions file in any of these formats.

Split lists (``--splits val=FILE``): one image id or file name per line; a split not listed
takes, for ``train``, every image listed nowhere else, and is empty otherwise. Without lists
(pooled ``coco``, or a token file without split lists) a seeded split is drawn: the images sorted
by id, shuffled with ``random.Random(seed)``, the first ``val_size`` to val, the next
``test_size`` to test, the rest to train.

Caption text is normalised here, once (:func:`normalize_caption`); records that cannot be used
are not dropped silently but returned as :class:`Skip` items with a reason.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from captioning.data.coco import AnnotationError, read_json
from captioning.vocab import tokenize

SPLITS = ("train", "val", "test")
FORMATS = ("karpathy", "coco", "flickr8k")

# Skip reasons (the summary counts items by these exact strings).
EMPTY_CAPTION = "empty caption"  # empty, whitespace, or no word left after normalisation
NO_CAPTIONS = "image without captions"
DUPLICATE_ID = "duplicate image id"  # one id for two different files: which captions are whose?
DUPLICATE_FILE = "image file listed twice"  # one file under two ids (or twice in a token file)
NOT_IN_SPLIT = "image in no split"
TWO_SPLITS = "image in two splits"
UNKNOWN_IMAGE = "caption for an unknown image"  # a COCO annotation whose image_id has no image entry

# Typographic characters NFKD leaves alone, mapped to their ASCII forms.
_ASCII_FORMS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
})


@dataclass
class SourceImage:
    """One image of the source dataset with its (normalised, non-empty) captions."""

    image_id: int
    path: Path  # where the file is expected (it may be missing: decoding decides)
    file_name: str  # path relative to the images root, as stored in the prepared folder
    split: str | None  # train / val / test; None until assigned
    captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    """A record left out, and why. ``item`` names it: an image id, a file name, a line."""

    reason: str
    item: str


@dataclass
class SourceDataset:
    """What a reader found: images (split assigned), the files read, and what it left out."""

    format: str
    images_root: Path
    images: list[SourceImage]
    files: list[tuple[str, Path]]  # (role, path) of every annotation/list file read
    skipped: list[Skip] = field(default_factory=list)
    normalised_captions: int = 0  # captions whose non-ASCII text was normalised
    split_rule: str = ""  # how splits were assigned, for the manifest


# ------------------------------------------------------------------------------------ captions


def normalize_caption(text: str) -> tuple[str, bool]:
    """-> (ASCII caption, whether non-ASCII text was changed).

    Unicode NFKD (ligatures and full-width forms to ASCII, accents split off), combining marks
    dropped (``café`` -> ``cafe``), typographic quotes and dashes to ASCII (``’`` -> ``'``), any
    other non-ASCII character replaced by a space; then whitespace collapsed. Case and ASCII
    punctuation are kept: the references keep them, tokenisation lowercases and drops them.
    """
    if text.isascii():
        return " ".join(text.split()), False
    decomposed = unicodedata.normalize("NFKD", text).translate(_ASCII_FORMS)
    kept = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    ascii_text = "".join(ch if ch.isascii() else " " for ch in kept)
    return " ".join(ascii_text.split()), True


def _clean_captions(raw: Iterable[Any], item: str, dataset: SourceDataset) -> list[str]:
    """Normalised captions with at least one word; the others become Skip(EMPTY_CAPTION)."""
    kept = []
    for caption in raw:
        text, changed = normalize_caption(caption if isinstance(caption, str) else "")
        if not tokenize(text):
            dataset.skipped.append(Skip(EMPTY_CAPTION, item))
            continue
        dataset.normalised_captions += changed
        kept.append(text)
    return kept


# ------------------------------------------------------------------------------------ helpers


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what, AnnotationError)


def detect_format(path: Path) -> str:
    """``karpathy``, ``coco`` or ``flickr8k`` by the file's content, or a one-line AnnotationError."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"captions file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace")
    if not head.lstrip().startswith("{"):
        if re.match(r"[^\t\n]+#\d+\t", head):
            return "flickr8k"
        raise AnnotationError(
            f"cannot tell the format of {path}: not JSON and not 'image.jpg#N<TAB>caption' lines; "
            "pass --format karpathy|coco|flickr8k with the right file")
    data = _read_json(path, "captions file")
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        return "karpathy"
    if isinstance(data, dict) and "annotations" in data:
        return "coco"
    raise AnnotationError(
        f"cannot tell the format of {path}: neither a Karpathy split file (images with 'sentences') nor "
        "a COCO captions file ('images' and 'annotations'); pass --format with the right file")


def _dedupe_ids(images: list[SourceImage], dataset: SourceDataset) -> list[SourceImage]:
    """Drop every image whose id is shared by a different file, or whose file has two ids.

    Neither can be paired safely: which captions belong to which file is unknowable. Entries
    repeating the same (id, file) are merged (their captions joined).
    """
    by_id: dict[int, list[SourceImage]] = defaultdict(list)
    by_file: dict[Path, set[int]] = defaultdict(set)
    for img in images:
        by_id[img.image_id].append(img)
        by_file[img.path].add(img.image_id)
    kept = []
    for image_id, entries in by_id.items():
        if len({e.path for e in entries}) > 1:
            dataset.skipped.extend(Skip(DUPLICATE_ID, f"id {image_id}: {e.file_name}") for e in entries)
            continue
        first = entries[0]
        if len(by_file[first.path]) > 1:
            dataset.skipped.append(Skip(DUPLICATE_FILE, f"{first.file_name} (id {image_id})"))
            continue
        if len({e.split for e in entries}) > 1:
            dataset.skipped.append(Skip(TWO_SPLITS, f"{first.file_name} (id {image_id})"))
            continue
        for other in entries[1:]:
            first.captions.extend(other.captions)
        kept.append(first)
    return kept


def _drop_captionless(dataset: SourceDataset) -> None:
    kept = []
    for img in dataset.images:
        if img.captions:
            kept.append(img)
        else:
            dataset.skipped.append(Skip(NO_CAPTIONS, f"{img.file_name} (id {img.image_id})"))
    dataset.images = kept


def read_split_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a split-list file (image ids or file names)."""
    if not Path(path).is_file():
        raise AnnotationError(f"split list {path} does not exist")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def assign_splits(dataset: SourceDataset, lists: Mapping[str, Path] | None, seed: int,
                  val_size: int, test_size: int) -> None:
    """Set ``split`` on every image from split lists (ids or file names) or a seeded draw."""
    images = dataset.images
    if lists:
        for split in lists:
            if split not in SPLITS:
                raise AnnotationError(f"unknown split '{split}' in --splits; use train=, val= or test=")
        names: dict[str, set[str]] = {}
        for split, path in lists.items():
            names[split] = set(read_split_list(path))
            dataset.files.append((f"split list {split}", Path(path)))
        membership: dict[int, list[str]] = defaultdict(list)
        for img in images:
            keys = {str(img.image_id), img.file_name, Path(img.file_name).name}
            membership[id(img)] = [s for s in SPLITS if s in names and keys & names[s]]
        kept = []
        for img in images:
            found = membership[id(img)]
            if len(found) > 1:
                dataset.skipped.append(Skip(TWO_SPLITS, f"{img.file_name} ({', '.join(found)})"))
                continue
            if not found and "train" not in names:
                found = ["train"]
            if not found:
                dataset.skipped.append(Skip(NOT_IN_SPLIT, img.file_name))
                continue
            img.split = found[0]
            kept.append(img)
        dataset.images = kept
        rest = "" if "train" in names else "; train: every image listed nowhere else"
        dataset.split_rule = "split lists " + ", ".join(f"{s}={lists[s]}" for s in lists) + rest
        return
    if val_size + test_size >= len(images):
        raise AnnotationError(
            f"a seeded split of {len(images)} images into {val_size} val + {test_size} test leaves no "
            "training image; pass smaller --val-size/--test-size (or --splits lists)")
    order = sorted(images, key=lambda img: img.image_id)
    random.Random(seed).shuffle(order)
    for i, img in enumerate(order):
        img.split = "val" if i < val_size else "test" if i < val_size + test_size else "train"
    dataset.split_rule = (f"seeded: images sorted by id, shuffled with random.Random({seed}); first {val_size} "
                          f"val, next {test_size} test, rest train")


# ------------------------------------------------------------------------------------ readers


def read_karpathy(path: Path, images_root: Path) -> SourceDataset:
    """Karpathy's ``dataset_*.json``: splits come from the file (restval joins train)."""
    path, images_root = Path(path), Path(images_root)
    data = _read_json(path, "Karpathy split file")
    if isinstance(data, dict) and "annotations" in data:
        raise AnnotationError(f"{path} is an official COCO annotations file, not a Karpathy split file; "
                              "use --format coco")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path} is not a Karpathy split file: it needs {{'images': [{{'filename', "
                              "'split', 'sentences'}]}} like dataset_coco.json")
    entries = data["images"]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"filename", "split", "sentences"} <= entry.keys() \
                or not isinstance(entry["sentences"], list) or ("imgid" not in entry and "cocoid" not in entry):
            raise AnnotationError(f"{path}: images[{i}] lacks 'filename', 'split', 'sentences' or 'imgid'; "
                                  "pass Karpathy's dataset_coco/flickr8k/flickr30k.json")
        if entry["split"] not in ("train", "restval", "val", "test"):
            raise AnnotationError(f"{path}: images[{i}] has split {entry['split']!r}; Karpathy files use "
                                  "train, restval, val or test")
    id_key = "cocoid" if entries and all("cocoid" in e for e in entries) else "imgid"
    dataset = SourceDataset("karpathy", images_root, [], [("captions", path)])
    images = []
    for entry in entries:
        rel = str(Path(entry.get("filepath") or "") / entry["filename"])
        raw = [s.get("raw", " ".join(s.get("tokens", []))) if isinstance(s, dict) else "" for s in entry["sentences"]]
        split = "train" if entry["split"] == "restval" else entry["split"]
        images.append(SourceImage(int(entry[id_key]), images_root / rel, rel, split,
                                  _clean_captions(raw, rel, dataset)))
    dataset.images = _dedupe_ids(images, dataset)
    _drop_captionless(dataset)
    dataset.split_rule = f"from {path.name}: restval joins train; image id = '{id_key}'"
    return dataset


def _coco_index(path: Path):
    """A pycocotools COCO index of a captions file, after checking its schema."""
    from pycocotools.coco import COCO

    data = _read_json(path, "COCO captions file")
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
            and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        raise AnnotationError(f"{path} is a Karpathy split file, not a COCO captions file; use --format karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"{path} is not a COCO captions file: it needs top-level 'images' and "
                              "'annotations' lists (like captions_train2014.json)")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name"} <= img.keys():
            raise AnnotationError(f"{path}: images[{i}] needs 'id' and 'file_name' (COCO captions schema)")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "caption"} <= ann.keys():
            hint = (" (this is an instances_*.json file: pass it with --instances, and the captions_*.json "
                    "file with --captions)") if isinstance(ann, dict) and "bbox" in ann else ""
            raise AnnotationError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'{hint}")
    _index_annotations(data)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco, data


def _index_annotations(data: dict) -> None:
    """Give annotations without an 'id' (a user's own file) one: pycocotools indexes by it."""
    if any("id" not in ann for ann in data["annotations"]):
        data["annotations"] = [{**ann, "id": ann.get("id", i)} for i, ann in enumerate(data["annotations"])]


def read_coco(captions: Sequence[tuple[str | None, Path]], images_root: Path) -> SourceDataset:
    """Official COCO captions files; ``(split, path)`` pairs, split None for pooled files."""
    images_root = Path(images_root)
    dataset = SourceDataset("coco", images_root, [], [])
    images: list[SourceImage] = []
    for split, path in captions:
        path = Path(path)
        coco, data = _coco_index(path)
        dataset.files.append((f"captions {split}" if split else "captions", path))
        tag = path.stem[len("captions_"):] if path.stem.startswith("captions_") else None
        folders = [images_root] + [images_root / t for t in (tag, split) if t]
        # An image id listed twice in one file: pycocotools keeps the last entry; we see both.
        entries_by_id: dict[int, list[dict]] = defaultdict(list)
        for img in data["images"]:
            entries_by_id[int(img["id"])].append(img)
        for ann in data["annotations"]:
            if ann["image_id"] not in coco.imgs:
                dataset.skipped.append(Skip(UNKNOWN_IMAGE, f"{path.name}: annotation {ann.get('id')} "
                                                           f"-> image_id {ann['image_id']}"))
        for image_id in sorted(entries_by_id):
            anns = coco.imgToAnns.get(image_id, [])
            for entry in entries_by_id[image_id]:
                name = str(entry["file_name"])
                folder = next((f for f in folders if (f / name).is_file()), folders[-1])
                rel = str((folder / name).relative_to(images_root))
                caps = _clean_captions([a["caption"] for a in anns], rel, dataset) if entry is entries_by_id[image_id][0] else []
                images.append(SourceImage(image_id, folder / name, rel, split, caps))
    dataset.images = _dedupe_ids(images, dataset)
    _drop_captionless(dataset)
    if all(split for split, _ in captions):
        dataset.split_rule = "one captions file per split: " + ", ".join(f"{s}={p}" for s, p in captions)
    return dataset


_TOKEN_LINE = re.compile(r"^(?P<name>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def read_flickr8k(path: Path, images_root: Path) -> SourceDataset:
    """``Flickr8k.token.txt``-style lines; splits are assigned afterwards (:func:`assign_splits`)."""
    path, images_root = Path(path), Path(images_root)
    if not path.is_file():
        raise AnnotationError(f"token file {path} does not exist")
    dataset = SourceDataset("flickr8k", images_root, [], [("captions", path)])
    captions: dict[str, dict[int, str]] = defaultdict(dict)
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _TOKEN_LINE.match(line)
        if match is None:
            raise AnnotationError(f"{path} line {number} is not '<image file>#<n><TAB><caption>' "
                                  "(Flickr8k.token.txt format); pass the token file, or --format for another format")
        name, n = match["name"].strip(), int(match["n"])
        if n in captions[name]:
            dataset.skipped.append(Skip(DUPLICATE_FILE, f"{name}#{n} (line {number}: caption number repeated)"))
            continue
        captions[name][n] = match["caption"]
    for image_id, name in enumerate(sorted(captions)):
        caps = _clean_captions([captions[name][n] for n in sorted(captions[name])], name, dataset)
        dataset.images.append(SourceImage(image_id, images_root / name, name, None, caps))
    _drop_captionless(dataset)
    return dataset


def default_flickr8k_lists(token_file: Path) -> dict[str, Path] | None:
    """Flickr_8k.{train,dev,test}Images.txt beside the token file, if all three are there."""
    folder = Path(token_file).parent
    lists = {"train": folder / "Flickr_8k.trainImages.txt", "val": folder / "Flickr_8k.devImages.txt",
             "test": folder / "Flickr_8k.testImages.txt"}
    return lists if all(p.is_file() for p in lists.values()) else None


# ------------------------------------------------------------------------------------ instances


def read_instances(paths: Sequence[Path]) -> tuple[list[dict], list[dict], dict[int, dict]]:
    """COCO ``instances_*.json`` files pooled, read with pycocotools.

    -> (categories, annotations without 'segmentation', image entries by id). Segmentations are
    dropped on purpose: grounding metrics need boxes, and they are most of COCO's 450 MB.
    """
    from pycocotools.coco import COCO

    categories: dict[int, dict] = {}
    annotations: list[dict] = []
    images: dict[int, dict] = {}
    for path in paths:
        path = Path(path)
        data = _read_json(path, "instances file")
        anns = data.get("annotations") if isinstance(data, dict) else None
        if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "caption" in anns[0]:
            raise AnnotationError(f"{path} is a COCO captions file, not an instances file: pass it with --captions")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise AnnotationError(f"{path} is not a COCO instances file: it needs 'images', 'annotations' and "
                                  "'categories' lists (like instances_train2014.json)")
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not {"image_id", "bbox", "category_id"} <= ann.keys():
                hint = " (this is a captions file: pass it with --captions)" if isinstance(ann, dict) and "caption" in ann else ""
                raise AnnotationError(f"{path}: annotations[{i}] needs 'image_id', 'bbox' and 'category_id'{hint}")
        _index_annotations(data)
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        for cat_id, cat in coco.cats.items():
            if cat_id in categories and categories[cat_id].get("name") != cat.get("name"):
                raise AnnotationError(f"{path}: category {cat_id} is '{cat.get('name')}' here but "
                                      f"'{categories[cat_id].get('name')}' in an earlier instances file")
            categories[cat_id] = cat
        images.update(coco.imgs)
        for image_id in sorted(coco.imgToAnns):
            annotations.extend({k: v for k, v in ann.items() if k != "segmentation"} for ann in coco.imgToAnns[image_id])
    return sorted(categories.values(), key=lambda c: c["id"]), annotations, images

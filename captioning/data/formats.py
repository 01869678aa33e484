"""Readers for the caption datasets users bring, into one in-memory form for preparation.

Each ``--format`` of captioning prepare is one :class:`Format` subclass in :data:`FORMATS`
(``auto`` asks each in turn whether the file is its own); its docstring describes its files. A
user's own dataset is a folder of images with a captions file in any of these formats.

Split lists (``--splits val=FILE``): one image id or file name per line; a split not listed
takes, for ``train``, every image listed nowhere else, and is empty otherwise. Without lists
(pooled ``coco``, or a token file without split lists) a seeded split is drawn: the images sorted
by id, shuffled with ``random.Random(seed)``, the first ``val_size`` to val, the next
``test_size`` to test, the rest to train.

Caption text is normalised here, once (``coco.normalize_caption``); records that cannot be used
are not dropped silently but returned as :class:`Skip` items with a reason.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from captioning.data.coco import (SPLITS, AnnotationError, normalize_caption, read_captions, read_instances, read_json,
                                  write_json)
from captioning.files import atomic_write
from captioning.vocab import tokenize

# Skip reasons (the summary counts items by these exact strings).
EMPTY_CAPTION = "empty caption"  # empty, whitespace, or no word left after normalisation
NO_CAPTIONS = "image without captions"
DUPLICATE_ID = "duplicate image id"  # one id for two different files: which captions are whose?
DUPLICATE_FILE = "image file listed twice"  # one file under two ids (or twice in a token file)
NOT_IN_SPLIT = "image in no split"
TWO_SPLITS = "image in two splits"
UNKNOWN_IMAGE = "caption for an unknown image"  # a COCO annotation whose image_id has no image entry
OUTSIDE_IMAGES = "image path outside --images"  # absolute, or climbing out with '..': never opened
NOT_UTF8 = "caption line not UTF-8"  # a token-file line that does not decode: skipped, never mangled


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


# ------------------------------------------------------------------------------------ helpers


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


def inside_images(rel: str) -> bool:
    """Whether a captions file's image path stays inside the images folder: relative, and no
    '..' part (a file outside --images is never opened, whatever the captions file says)."""
    path = PurePosixPath(rel.replace("\\", "/"))  # a Windows path's separators count too
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts and path.parts[0][1:2] != ":"


def detect_format(path: Path) -> str:
    """The name of the first format in FORMATS that claims the file, or a one-line AnnotationError."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"captions file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="replace")  # -sig: a byte-order mark is not text
    data = read_json(path, "captions file") if head.lstrip().startswith("{") else None
    found = next((name for name, fmt in FORMATS.items() if fmt.detect(head, data)), None)
    if found is not None:
        return found
    if data is None:
        raise AnnotationError(
            f"cannot tell the format of {path}: not JSON and not 'image.jpg#N<TAB>caption' lines; "
            f"pass --format {'|'.join(FORMATS)} with the right file")
    raise AnnotationError(
        f"cannot tell the format of {path}: neither a Karpathy split file (images with 'sentences') nor "
        "a COCO captions file ('images' and 'annotations'); pass --format with the right file")


def _dedupe_ids(images: list[SourceImage], dataset: SourceDataset) -> list[SourceImage]:
    """Drop every image whose id is shared by a different file, or whose file has two ids (which
    captions are whose is unknowable); entries repeating the same (id, file) are merged."""
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
    dataset.skipped += [Skip(NO_CAPTIONS, f"{img.file_name} (id {img.image_id})") for img in dataset.images
                        if not img.captions]
    dataset.images = [img for img in dataset.images if img.captions]


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
        kept = []
        for img in images:
            keys = {str(img.image_id), img.file_name, Path(img.file_name).name}
            found = [s for s in SPLITS if s in names and keys & names[s]]
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


def _sentence_text(sentence: Any) -> str:
    """A Karpathy sentence's text: ``raw``, else its ``tokens`` joined; "" (an empty caption) if neither is text."""
    if not isinstance(sentence, dict):
        return ""
    if isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    tokens = sentence.get("tokens")
    return " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else ""


def read_karpathy(path: Path, images_root: Path) -> SourceDataset:
    """Karpathy's ``dataset_*.json``: splits come from the file (restval joins train)."""
    path, images_root = Path(path), Path(images_root)
    data = read_json(path, "Karpathy split file")
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
    for i, entry in enumerate(entries):
        if isinstance(entry.get(id_key), bool) or not isinstance(entry.get(id_key), int) \
                or not isinstance(entry["filename"], str):
            raise AnnotationError(f"{path}: images[{i}] needs a whole-number '{id_key}' and a 'filename' string, got "
                                  f"{entry.get(id_key)!r} and {entry['filename']!r:.60}")
    dataset = SourceDataset("karpathy", images_root, [], [("captions", path)])
    images = []
    for entry in entries:
        rel = str(Path(str(entry.get("filepath") or "")) / str(entry["filename"]))
        if not inside_images(rel):
            dataset.skipped.append(Skip(OUTSIDE_IMAGES, rel))
            continue
        raw = [_sentence_text(s) for s in entry["sentences"]]
        split = "train" if entry["split"] == "restval" else entry["split"]
        images.append(SourceImage(int(entry[id_key]), images_root / rel, rel, split,
                                  _clean_captions(raw, rel, dataset)))
    dataset.images = _dedupe_ids(images, dataset)
    _drop_captionless(dataset)
    dataset.split_rule = f"from {path.name}: restval joins train; image id = '{id_key}'"
    return dataset


def read_coco(captions: Sequence[tuple[str | None, Path]], images_root: Path) -> SourceDataset:
    """Official COCO captions files; ``(split, path)`` pairs, split None for pooled files."""
    images_root = Path(images_root)
    dataset = SourceDataset("coco", images_root, [], [])
    images: list[SourceImage] = []
    for split, path in captions:
        path = Path(path)
        coco, data = read_captions(path, "COCO captions file")
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
                if not inside_images(name):
                    dataset.skipped.append(Skip(OUTSIDE_IMAGES, f"{path.name}: image {image_id}: {name}"))
                    continue
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
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            dataset.skipped.append(Skip(NOT_UTF8, f"{path.name} line {number}: byte 0x{raw[err.start]:02x} (convert the "
                                                  "file to UTF-8, e.g. iconv -f latin1 -t utf-8)"))
            continue
        if not line.strip():
            continue
        match = _TOKEN_LINE.match(line)
        if match is None:
            raise AnnotationError(f"{path} line {number} is not '<image file>#<n><TAB><caption>' "
                                  "(Flickr8k.token.txt format); pass the token file, or --format for another format")
        name, n = match["name"].strip(), int(match["n"])
        if not inside_images(name):
            dataset.skipped.append(Skip(OUTSIDE_IMAGES, f"{path.name} line {number}: {name}"))
            continue
        if n in captions[name]:
            dataset.skipped.append(Skip(DUPLICATE_FILE, f"{name}#{n} (line {number}: caption number repeated)"))
            continue
        captions[name][n] = match["caption"]
    for image_id, name in enumerate(sorted(captions)):
        caps = _clean_captions([captions[name][n] for n in sorted(captions[name])], name, dataset)
        dataset.images.append(SourceImage(image_id, images_root / name, name, None, caps))
    _drop_captionless(dataset)
    return dataset


#: Flickr8k's split lists, found beside its token file (its "dev" list is our val split).
FLICKR8K_SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}


def default_flickr8k_lists(token_file: Path) -> dict[str, Path] | None:
    """Flickr_8k.{train,dev,test}Images.txt beside the token file, if all three are there."""
    folder = Path(token_file).parent
    lists = {split: folder / name for split, name in FLICKR8K_SPLIT_LISTS.items()}
    return lists if all(p.is_file() for p in lists.values()) else None


# ------------------------------------------------------------------------------------ formats


class Format:
    """One ``--format`` of captioning prepare, added to FORMATS by :func:`register`. It names itself
    (``name``; ``help``: its files), tells its files apart (``detect(head, data)``: the file's first
    64 KiB and its JSON, None when not JSON), reads them (``read(files, lists, args)``: --captions as
    ``(split or None, path)`` pairs, --splits, the other options -> a SourceDataset with splits) and
    may write --make-example's captions for ``root/images/img_<id>.jpg`` (``write_example(root,
    captions, split_of)`` -> (captions file, images root); ``example_files``: the names it writes in
    root, which --make-example refuses to write through a link)."""

    example_files: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {}  # by name, in --format auto's order of asking


def register(fmt: type[Format]) -> type[Format]:
    """Class decorator: ``fmt`` becomes a --format choice, a detected format and a --make-example format."""
    FORMATS[fmt.name] = fmt()
    return fmt


@register
class Karpathy(Format):
    """Karpathy's split files ``dataset_coco.json`` / ``dataset_flickr8k.json`` /
    ``dataset_flickr30k.json``::

        {"images": [{"filepath"?: "val2014", "filename": "...jpg", "imgid": int, "cocoid"?: int,
                     "split": "train"|"restval"|"val"|"test",
                     "sentences": [{"raw": str, "tokens": [str], ...}]}], "dataset": "coco"}

    The image file is ``IMAGES/filepath/filename`` (``IMAGES/filename`` without ``filepath``).
    Image id: ``cocoid`` when every image has one (so ids are COCO's and instances files match),
    else ``imgid``. ``restval`` joins ``train`` (the usual 113,287 training images). The caption
    is ``raw`` (``tokens`` joined by spaces when ``raw`` is absent).
    """

    name, help = "karpathy", "dataset_*.json"
    example_files = ("dataset_example.json",)

    def detect(self, head: str, data: Any) -> bool:
        images = data.get("images") if isinstance(data, dict) else None
        return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]

    def read(self, files: list[tuple[str | None, Path]], lists: dict[str, Path], args: Any) -> SourceDataset:
        if files[0][0] or len(files) != 1 or lists:
            raise AnnotationError("--format karpathy takes one dataset_*.json, which carries its own splits "
                                  "(no SPLIT=FILE, no --splits)")
        return read_karpathy(files[0][1], args.images)

    def write_example(self, root: Path, captions: dict[int, list[str]], split_of: dict[int, str]) -> tuple[Path, Path]:
        images = [{"filepath": "images", "filename": f"img_{i}.jpg", "imgid": i - 1, "cocoid": i, "split": split_of[i],
                   "sentences": [{"raw": c, "tokens": c.split(), "imgid": i - 1} for c in caps]}
                  for i, caps in captions.items()]
        write_json(root / self.example_files[0], {"images": images, "dataset": "example"})
        return root / self.example_files[0], root


@register
class Coco(Format):
    """Official COCO captions files (``captions_train2014.json``), read with pycocotools::

        {"images": [{"id": int, "file_name": str}], "annotations": [{"image_id": int, "caption": str}]}

    Either several files pooled and then split (a split-list file per split, or a seeded
    5,000 / 5,000 / rest split), or one file per split given as ``SPLIT=FILE``. The image file is
    the first of ``IMAGES/file_name``, ``IMAGES/<tag>/file_name`` (``<tag>`` from the file's name,
    ``captions_val2014.json`` -> ``val2014``) and, for ``SPLIT=FILE``, ``IMAGES/<split>/file_name``
    that exists.
    """

    name, help = "coco", "official captions_*.json"
    example_files = ("captions_example.json",)

    def detect(self, head: str, data: Any) -> bool:
        return isinstance(data, dict) and "annotations" in data

    def read(self, files: list[tuple[str | None, Path]], lists: dict[str, Path], args: Any) -> SourceDataset:
        dataset = read_coco(files, args.images)
        if not files[0][0]:
            assign_splits(dataset, lists, args.split_seed, args.val_size, args.test_size)
        elif lists:
            raise AnnotationError("--splits does not go with SPLIT=FILE captions files: they already name the splits")
        return dataset

    def write_example(self, root: Path, captions: dict[int, list[str]], split_of: dict[int, str]) -> tuple[Path, Path]:
        anns = [{"id": n, "image_id": i, "caption": c}
                for n, (i, c) in enumerate(((i, c) for i, caps in captions.items() for c in caps), 1)]
        images = [{"id": i, "file_name": f"images/img_{i}.jpg"} for i in captions]
        write_json(root / self.example_files[0], {"images": images, "annotations": anns})
        return root / self.example_files[0], root


@register
class Flickr8k(Format):
    """``Flickr8k.token.txt`` (also Flickr30k's ``results_20130124.token``): lines
    ``<file name>#<n><TAB><caption>``, with the split lists ``Flickr_8k.trainImages.txt``,
    ``Flickr_8k.devImages.txt`` (-> val), ``Flickr_8k.testImages.txt``: one file name per line.
    Image ids are the positions of the file names in sorted order (0, 1, ...); the file name is
    kept beside the id in the prepared folder.
    """

    name, help = "flickr8k", "token file"
    example_files = ("Flickr8k.token.txt", *FLICKR8K_SPLIT_LISTS.values())

    def detect(self, head: str, data: Any) -> bool:
        return data is None and re.match(r"[^\t\n]+#\d+\t", head) is not None

    def read(self, files: list[tuple[str | None, Path]], lists: dict[str, Path], args: Any) -> SourceDataset:
        if files[0][0] or len(files) != 1:
            raise AnnotationError("--format flickr8k takes one token file; give the split lists with --splits")
        dataset = read_flickr8k(files[0][1], args.images)
        assign_splits(dataset, lists or default_flickr8k_lists(files[0][1]), args.split_seed, args.val_size,
                      args.test_size)
        return dataset

    def write_example(self, root: Path, captions: dict[int, list[str]], split_of: dict[int, str]) -> tuple[Path, Path]:
        path = root / self.example_files[0]
        lines = [f"img_{i}.jpg#{n}\t{c}\n" for i, caps in captions.items() for n, c in enumerate(caps)]
        atomic_write(path, "".join(lines))
        for split, name in FLICKR8K_SPLIT_LISTS.items():
            atomic_write(root / name, "".join(f"img_{i}.jpg\n" for i in captions if split_of[i] == split))
        return path, root / "images"


# ------------------------------------------------------------------------------------ instances


def pool_instances(paths: Sequence[Path]) -> tuple[list[dict], list[dict], dict[int, dict]]:
    """COCO ``instances_*.json`` files pooled (each read and checked by ``coco.read_instances``).

    -> (categories, annotations without 'segmentation', image entries by id). Segmentations are
    dropped on purpose: grounding metrics need boxes, and they are most of COCO's 450 MB.
    """
    categories: dict[int, dict] = {}
    annotations: list[dict] = []
    images: dict[int, dict] = {}
    for path in paths:
        index = read_instances(path)
        for cat_id, cat in index.cats.items():
            if cat_id in categories and categories[cat_id].get("name") != cat.get("name"):
                raise AnnotationError(f"{path}: category {cat_id} is '{cat.get('name')}' here but "
                                      f"'{categories[cat_id].get('name')}' in an earlier instances file")
            categories[cat_id] = cat
        images.update(index.imgs)
        for image_id in sorted(index.imgToAnns):
            annotations.extend({k: v for k, v in ann.items() if k != "segmentation"} for ann in index.imgToAnns[image_id])
    return sorted(categories.values(), key=lambda c: c["id"]), annotations, images

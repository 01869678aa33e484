"""Reading a prepared folder (captioning/data/prepare.py): records, vocabulary, the image store.

A split's images are one uint8 ``.npy`` of [rows, S, S, 3] that every process (each DataLoader
worker, each DDP rank) maps read-only on first use and pickling drops, so any number of workers
share the page cache (a public port's HDF5 file allowed one worker only). Pixels go through
``transforms.preprocess``, whose resize is then a no-op.
"""

from __future__ import annotations

import os
import random
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from captioning.console import CaptioningError, one_line
from captioning.data.coco import ImageRecord, is_id, is_whole_number, read_boxes, read_json
from captioning.data.prepare import FORMAT_VERSION
from captioning.data.transforms import preprocess
from captioning.files import partial_name
from captioning.vocab import Vocabulary


class PreparedDataError(CaptioningError, ValueError):
    """A prepared folder is missing, unfinished, from another version, or does not fit the config."""


class LazyArray:
    """A .npy file memory-mapped read-only on first use in each process; never pickled."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._array: np.ndarray | None = None
        self._pid = -1

    @property
    def array(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            self._array = np.load(self.path, mmap_mode="r")
            self._pid = os.getpid()
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_pid": -1}


class StoreImages:
    """Image i of a split (in record order) -> preprocessed tensor [3, S, S], like ImageSource."""

    def __init__(self, path: Path, rows: np.ndarray, image_size: int) -> None:
        self.store = LazyArray(path)
        self.rows = rows
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, index: int) -> np.ndarray:
        """The stored uint8 [S, S, 3] RGB image (a copy out of the mapping)."""
        return np.array(self.store.array[self.rows[index]])

    def __getitem__(self, index: int) -> torch.Tensor:
        return preprocess(Image.fromarray(self.pixels(index)), self.image_size)


def damaged(path: Path, problem: str) -> PreparedDataError:
    return PreparedDataError(f"{path} is damaged ({problem}): the prepared folder cannot be read; prepare it again")


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    """A .npy file of a prepared folder (memory-mapped read-only with ``mmap``); a missing, cut-short
    or otherwise unreadable one is a PreparedDataError, not numpy's exception."""
    if not path.is_file():
        raise PreparedDataError(f"{path} is missing: the prepared folder is incomplete; prepare it again")
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as err:  # a truncated file: "mmap length is greater than file size"
        raise damaged(path, one_line(err, 120)) from None


class PreparedSplit:
    """One split: its records (references by image id), store rows and encoded captions. The captions
    file's schema and the sizes of the split's .npy files are checked here, so a damaged folder is
    one PreparedDataError when it is opened, not a KeyError or an mmap error half-way through a run."""

    def __init__(self, root: Path, split: str, images_root: Path) -> None:
        path = root / f"captions_{split}.json"
        if not path.is_file():
            raise PreparedDataError(f"{path} is missing: the prepared folder is incomplete; prepare it again")
        data = read_json(path, "prepared captions file", PreparedDataError)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise damaged(path, "no 'images' and 'annotations' lists")
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or not is_id(img.get("id")) or not is_whole_number(img.get("row")) \
                    or img["row"] < 0 or not isinstance(img.get("file_name"), str):
                raise damaged(path, f"images[{i}] needs an 'id', a 'row' and a 'file_name', got {img!r:.60}")
        self.image_ids = [img["id"] for img in data["images"]]
        self.rows = np.asarray([img["row"] for img in data["images"]], dtype=np.int64)
        self.file_names = [img["file_name"] for img in data["images"]]
        position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        captions: list[list[str]] = [[] for _ in self.image_ids]
        owner = np.empty(len(data["annotations"]), dtype=np.int64)
        for j, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not is_id(ann.get("image_id")) \
                    or ann["image_id"] not in position or not isinstance(ann.get("caption"), str):
                raise damaged(path, f"annotations[{j}] needs the 'image_id' of one of its images and a 'caption', "
                                    f"got {ann!r:.60}")
            owner[j] = position[ann["image_id"]]
            captions[owner[j]].append(ann["caption"])
        if np.any(np.diff(owner) < 0):
            raise PreparedDataError(f"{path}: annotations are not grouped by image; prepare the folder again")
        # offsets[i]:offsets[i+1] are image i's rows in tokens/lengths (= its annotations).
        self.offsets = np.zeros(len(self.image_ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=len(self.image_ids)), out=self.offsets[1:])
        self.records = [ImageRecord(i, images_root / name, tuple(caps))
                        for i, name, caps in zip(self.image_ids, self.file_names, captions)]
        self.tokens = LazyArray(root / f"tokens_{split}.npy")
        self.lengths = load_npy(root / f"lengths_{split}.npy", mmap=False)
        if self.lengths.ndim != 1 or len(self.lengths) != len(owner) \
                or load_npy(self.tokens.path, mmap=True).shape[0] != len(owner):
            raise PreparedDataError(f"{root}: tokens/lengths of {split} do not match {path.name}; prepare it again")
        self.store_path = root / f"images_{split}.npy"
        store = load_npy(self.store_path, mmap=True)
        if store.ndim != 4 or (len(self.rows) and self.rows.max() >= store.shape[0]):
            raise damaged(self.store_path, f"{store.shape[0] if store.ndim else 0} rows of shape {store.shape[1:]}, "
                                           f"but {path.name} uses row {self.rows.max() if len(self.rows) else 0}")
        self.store_shape = store.shape
        del store

    def encoded(self, index: int) -> list[list[int]]:
        """Training captions of image i as id lists (<start> .. <end>, no padding)."""
        lo, hi = self.offsets[index], self.offsets[index + 1]
        tokens = self.tokens.array
        return [tokens[r, : self.lengths[r]].tolist() for r in range(lo, hi) if self.lengths[r] > 0]


class PreparedFolder:
    """A folder written by captioning prepare; see captioning/data/prepare.py for its files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            partial = partial_name(self.root)
            if partial.is_dir():
                raise PreparedDataError(f"the preparation of {self.root} did not finish ({partial} is there): run the "
                                        "same captioning prepare command again to resume it")
            raise PreparedDataError(f"{self.root} is not a prepared folder (no manifest.json): make it with "
                                    f"captioning prepare ... --out {self.root}")
        self.manifest = read_json(manifest, "prepared folder manifest", PreparedDataError)
        if not isinstance(self.manifest, dict):
            raise damaged(manifest, "not a JSON object")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise PreparedDataError(f"{self.root} has prepared-folder format {self.manifest.get('format_version')}, "
                                    f"this code reads {FORMAT_VERSION}: prepare it again")
        options, source = self.manifest.get("options"), self.manifest.get("source")
        if not isinstance(options, dict) or not is_whole_number(options.get("image_size")) \
                or options["image_size"] < 1 or not isinstance(source, dict) \
                or not isinstance(source.get("images_root"), str):
            raise damaged(manifest, "it needs 'options' with an 'image_size' and 'source' with an 'images_root'")
        self.image_size: int = options["image_size"]
        self.images_root = Path(source["images_root"])
        self._splits: dict[str, PreparedSplit] = {}

    @cached_property
    def vocab(self) -> Vocabulary:
        path = self.root / "vocab.json"
        stored = read_json(path, "prepared vocabulary", PreparedDataError)
        try:
            return Vocabulary(stored.get("words") if isinstance(stored, dict) else stored)
        except ValueError as err:
            raise PreparedDataError(f"prepared vocabulary {path} is damaged ({err}): prepare the folder again") \
                from None

    def split(self, split: str) -> PreparedSplit:
        if split not in self._splits:
            self._splits[split] = PreparedSplit(self.root, split, self.images_root)
        return self._splits[split]

    def records(self, split: str) -> list[ImageRecord]:
        """Image id, source file path (for captioning the originals) and all references."""
        return self.split(split).records

    def images(self, split: str) -> StoreImages:
        part = self.split(split)
        if part.store_shape[1:] != (self.image_size, self.image_size, 3):
            raise damaged(part.store_path, f"images of shape {part.store_shape[1:]}, but the manifest says "
                                           f"{self.image_size}x{self.image_size} RGB")
        return StoreImages(part.store_path, part.rows, self.image_size)

    def check_image_size(self, image_size: int) -> None:
        if image_size != self.image_size:
            raise PreparedDataError(
                f"{self.root} stores {self.image_size}x{self.image_size} images but data.image_size is {image_size}: "
                f"set data.image_size={self.image_size} (or prepare again with --image-size {image_size})")

    def check_vocab(self, vocab: Vocabulary) -> None:
        if vocab != self.vocab:
            raise PreparedDataError(
                f"the model's vocabulary ({len(vocab)} words) is not {self.root / 'vocab.json'} ({len(self.vocab)} "
                "words), so the stored caption ids would be wrong: resume or fine-tune on the folder it was trained on")

    def train_dataset(self, vocab: Vocabulary, captions_per_image: int, max_caption_len: int) -> "StoreTrainDataset":
        self.check_vocab(vocab)
        return StoreTrainDataset(self.split("train"), self.images("train"), captions_per_image, max_caption_len)

    def boxes(self, split: str) -> dict[int, list[tuple[str, list[float]]]] | None:
        path = self.root / f"instances_{split}.json"
        return read_boxes(path, PreparedDataError) if path.is_file() else None


def draw_captions(options: list[list[int]], k: int) -> list[list[int]]:
    """``k`` of an image's encoded captions, drawn anew without replacement each time (fewer than
    k: each once, then repeats, so every image has k rows)."""
    if len(options) >= k:
        return random.sample(options, k)
    return [options[j % len(options)] for j in range(k)]


class StoreTrainDataset(Dataset):
    """Item i: (image i [3, S, S], k of its captions as id lists (:func:`draw_captions`), image id),
    as TrainDataset; captions longer than ``max_caption_len`` words truncated as Vocabulary.encode does."""

    def __init__(self, part: PreparedSplit, images: StoreImages, captions_per_image: int, max_caption_len: int) -> None:
        self.part, self.images = part, images
        self.k, self.max_len = captions_per_image, max_caption_len
        trainable = np.concatenate([[0], np.cumsum(part.lengths > 0)])
        usable = trainable[part.offsets[1:]] - trainable[part.offsets[:-1]]  # training captions per image
        # Images whose captions were all dropped (long-caption rule) cannot be trained on.
        self.indices = np.flatnonzero(usable > 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        i = int(self.indices[index])
        chosen = draw_captions(self.part.encoded(i), self.k)
        chosen = [ids if len(ids) <= self.max_len + 2 else ids[: self.max_len + 1] + [Vocabulary.end_id] for ids in chosen]
        return self.images[i], chosen, self.part.image_ids[i]

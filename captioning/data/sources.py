"""The kinds of dataset (config data.dataset), one class each in :data:`SOURCES`: where its data
lives, how it is made and read, what a model trained on it can describe. Every question about
the kind is asked of its class (:func:`source_for`), never by comparing data.dataset with a name.
Torch-free, so that a model's provenance and card are read without torch."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Sequence

from captioning.config import DataConfig
from captioning.console import InvalidValue
from captioning.data.coco import AnnotationError, EmptySplitError, ImageRecord, load_coco_captions, read_boxes
from captioning.vocab import Vocabulary


class FolderSource:
    """data.dataset "coco": COCO-format files under data.root (the layout in datamodule.py); the
    DataModule asks its source for records, images, the vocabulary, boxes and one-line errors."""

    #: Made by the project on first use (the synthetic set): a model trained on it describes only such images.
    generated = False
    #: The dataset's name on model hubs (the model card's ``datasets``); None: the data folder's name.
    hub_name: str | None = "coco"

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def folder_at(self, root: str | Path) -> Path:
        """The folder that holds the data when data.root is ``root``."""
        return Path(root)

    @property
    def root(self) -> Path:
        return self.folder_at(self.cfg.root)

    @property
    def known_train_images(self) -> int | None:
        """The training split's size as the config alone says it (None: only the data knows)."""
        return None

    def prepare_data(self) -> None:
        """Make the dataset where it is made on first use (the synthetic set); others are only read."""

    def check_trained(self) -> None:
        """Before a command other than training reads a model's training data: refuse (ValueError, one
        line with the fix) what would go wrong. Read-only datasets: a missing one is a read error."""

    def records(self, split: str) -> list[ImageRecord]:
        try:
            return load_coco_captions(self.root / "annotations" / f"captions_{split}.json", self.root / split)
        except EmptySplitError:
            return []  # setup refuses an empty train/val split; callers skip an empty test

    def vocabulary(self, vocab: Vocabulary | None, stage: str | None) -> Vocabulary | None:
        """The vocabulary to use: ``vocab``, or None to build one from the training captions."""
        return vocab

    def empty_split_error(self, split: str):
        raise AnnotationError(f"the {split} split of {self.root} has no image "
                              f"({self.root / 'annotations' / f'captions_{split}.json'}): check the dataset")

    def images(self, split: str, records: Sequence[ImageRecord], cache: bool):
        from captioning.data.datamodule import ImageSource  # torch, imported on use

        return ImageSource(records, self.cfg.image_size, cache)

    def train_dataset(self, records: Sequence[ImageRecord], images, vocab: Vocabulary):
        from captioning.data.datamodule import TrainDataset

        return TrainDataset(records, images, vocab, self.cfg.captions_per_image, self.cfg.max_caption_len)

    def scenes(self, split: str):
        """Synthetic ground truth (objects with boxes) by image id, or None for other datasets."""
        return None

    def instances(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def boxes(self, split: str) -> dict[int, list[tuple[str, list[float]]]] | None:
        return read_boxes(self.instances(split)) if self.instances(split).is_file() else None


class SyntheticSource(FolderSource):
    """data.dataset "synthetic": generated on first use into a folder under data.root named by its settings."""

    generated = True
    hub_name = "show-attend-tell-synthetic"

    def folder_at(self, root: str | Path) -> Path:
        from captioning.data.synthetic.write import dataset_dir  # no torch: the generator is PIL only

        return dataset_dir(root, self.cfg.synthetic)

    @property
    def known_train_images(self) -> int | None:
        return self.cfg.synthetic.num_train

    def prepare_data(self) -> None:
        from captioning.data.synthetic import generate_synthetic

        generate_synthetic(self.cfg.root, self.cfg.synthetic)

    def check_trained(self) -> None:
        """Refuse to generate the synthetic set anywhere but the training's own data folder. A
        checkpoint records the folder its training ran in, so a relative data.root arrives here
        made absolute (captioning/checkpoint.py ``at_workdir``); a relative one (a model folder, or
        a checkpoint from before that record) would be generated in the current folder instead."""
        folder, root = self.root, Path(self.cfg.root)
        if folder.is_dir():
            return
        fix = f"pass --data-root DIR, the folder that holds (or will hold) {folder.name}"
        if not root.is_absolute():
            raise InvalidValue(f"the model's synthetic dataset {folder} is not in the current folder and the "
                               f"model does not record the folder it was trained in: run from that folder, or {fix}")
        if not root.parent.is_dir():
            raise InvalidValue(f"the model's synthetic dataset {folder} is not on this machine (its training ran in "
                               f"{root.parent}): {fix}")

    def scenes(self, split: str):
        from captioning.data.synthetic import load_scenes

        return load_scenes(self.instances(split))


class PreparedSource(FolderSource):
    """data.dataset "prepared": a folder written by captioning prepare (formats in
    captioning/data/prepare.py; read by captioning/data/store.py)."""

    hub_name = None

    @cached_property
    def folder(self):
        from captioning.data.store import PreparedFolder

        folder = PreparedFolder(self.cfg.root)
        folder.check_image_size(self.cfg.image_size)
        return folder

    def records(self, split: str) -> list[ImageRecord]:
        return self.folder.records(split)  # record paths: the source files

    def vocabulary(self, vocab: Vocabulary | None, stage: str | None) -> Vocabulary:
        vocab = self.folder.vocab if vocab is None else vocab  # built at preparation, from the train split
        if stage == "fit":
            self.folder.check_vocab(vocab)  # the stored caption ids are in the folder's vocabulary
        return vocab

    def empty_split_error(self, split: str):
        from captioning.data.store import PreparedDataError

        raise PreparedDataError(f"the {split} split of the prepared folder {self.root} has no image: prepare it "
                                "again from a source whose images and split lists are found")

    def images(self, split: str, records: Sequence[ImageRecord], cache: bool):
        return self.folder.images(split)  # memory-mapped, no decoding

    def train_dataset(self, records: Sequence[ImageRecord], images, vocab: Vocabulary):
        dataset = self.folder.train_dataset(vocab, self.cfg.captions_per_image, self.cfg.max_caption_len)
        dataset.images = images  # the store's, or cached grids of the same images, in record order
        return dataset  # captions encoded at preparation, read from the folder

    def instances(self, split: str) -> Path:
        return self.root / f"instances_{split}.json"  # at the folder's top level

    def boxes(self, split: str) -> dict[int, list[tuple[str, list[float]]]] | None:
        return self.folder.boxes(split)


SOURCES: dict[str, type[FolderSource]] = {"synthetic": SyntheticSource, "coco": FolderSource, "prepared": PreparedSource}


def source_for(cfg: DataConfig) -> FolderSource:
    """The source of ``cfg``'s kind of dataset (:data:`SOURCES`), on ``cfg``."""
    return SOURCES[cfg.dataset](cfg)


def is_generated(kind: object) -> bool:
    """Whether ``kind`` (a data.dataset value as a file records it; anything else: False) names
    a dataset the project generates (:attr:`FolderSource.generated`)."""
    return isinstance(kind, str) and kind in SOURCES and SOURCES[kind].generated

"""Datasets and the LightningDataModule: images + encoded captions, per-device batches.

Folder layout read (the synthetic generator writes it; a COCO-format folder uses the same):

    ROOT/annotations/captions_{train,val,test}.json   COCO captions format (see data/coco.py)
    ROOT/annotations/instances_{split}.json           optional: boxes (grounding, synthetic checks)
    ROOT/{train,val,test}/<file_name>                 the images

or, with data.dataset "prepared", a folder written by captioning prepare (PreparedSource below).
"""

from __future__ import annotations

import random
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from captioning.console import InvalidValue
from captioning.config import DataConfig
from captioning.data.coco import SPLITS, AnnotationError, EmptySplitError, ImageRecord, load_coco_captions, read_boxes
from captioning.data.transforms import load_image, preprocess
from captioning.vocab import Vocabulary



class ImageSource:
    """Preprocessed images by index, decoded on demand or all at once into memory."""

    def __init__(self, records: Sequence[ImageRecord], image_size: int, cache: bool) -> None:
        self.paths = [r.path for r in records]
        self.image_size = image_size
        self.cache = torch.stack([self.load(i) for i in range(len(records))]) if cache else None

    def load(self, index: int) -> torch.Tensor:
        return preprocess(load_image(self.paths[index]), self.image_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.cache[index] if self.cache is not None else self.load(index)


class TrainDataset(Dataset):
    """Item i: image i and k of its captions (drawn without replacement each time)."""

    def __init__(self, records: Sequence[ImageRecord], images: ImageSource, vocab: Vocabulary,
                 captions_per_image: int, max_caption_len: int) -> None:
        self.images = images
        self.k = captions_per_image
        self.encoded = [[vocab.encode(c, max_caption_len) for c in r.captions] for r in records]
        self.image_ids = [r.image_id for r in records]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int):
        options = self.encoded[index]
        if len(options) >= self.k:
            chosen = random.sample(options, self.k)
        else:  # fewer captions than k: each once, then repeats, so every image has k rows
            chosen = [options[j % len(options)] for j in range(self.k)]
        return self.images[index], chosen, self.image_ids[index]


class EvalDataset(Dataset):
    """Item i: image i and its id (references stay in the DataModule, by id); with ``vocab``, also
    every reference caption encoded (the validation NLL of train.monitor "nll")."""

    def __init__(self, records: Sequence[ImageRecord], images: ImageSource, vocab: Vocabulary | None = None,
                 max_caption_len: int = 0) -> None:
        self.images = images
        self.image_ids = [r.image_id for r in records]
        self.encoded = None if vocab is None else [[vocab.encode(c, max_caption_len) for c in r.captions]
                                                   for r in records]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        if self.encoded is None:
            return self.images[index], self.image_ids[index]
        return self.images[index], self.image_ids[index], self.encoded[index]


def collate_train(batch) -> dict[str, torch.Tensor]:
    """-> images [B, 3, S, S], captions [B*k, T+1] padded with <pad>=0, image_ids [B].

    With one caption per image (the COCO configs) the images come longest caption first (stable):
    the decoder's fused teacher-forced pass runs its captions in that order, and a batch that
    already has it is used without copying its grids into another order
    (captioning/models/decoder.py). With several captions per image that pass reorders the
    captions anyway, so the batch is left as it comes. The order of a minibatch changes no loss
    term (each is a mean over its captions), only which dropout mask meets which caption."""
    if all(len(item[1]) == 1 for item in batch):
        batch = sorted(batch, key=lambda item: -len(item[1][0]))
    images = torch.stack([item[0] for item in batch])
    captions = _pad([ids for item in batch for ids in item[1]])
    return {"images": images, "captions": captions, "image_ids": torch.tensor([item[2] for item in batch])}


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Token-id lists -> [N, T+1] long, padded with <pad>."""
    width = max(len(ids) for ids in rows)
    captions = torch.full((len(rows), width), Vocabulary.pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        captions[i, : len(ids)] = torch.tensor(ids)
    return captions


def collate_eval(batch) -> dict[str, torch.Tensor]:
    """-> images, image_ids [B]; items with references also give captions [N, T+1] (every
    reference of every image) and caption_rows [N] (the image of each)."""
    out = {"images": torch.stack([item[0] for item in batch]), "image_ids": torch.tensor([item[1] for item in batch])}
    if len(batch[0]) > 2:
        out["captions"] = _pad([ids for item in batch for ids in item[2]])
        out["caption_rows"] = torch.tensor([i for i, item in enumerate(batch) for _ in item[2]])
    return out


# ------------------------------------------------------------------------------------ dataset kinds


class FolderSource:
    """data.dataset "coco": COCO-format files under data.root (the layout above). Each kind of
    dataset is one class in SOURCES, chosen by data.dataset; CaptionDataModule asks it for
    records, images, the vocabulary, boxes and its one-line errors."""

    #: The dataset's name on model hubs (a model card's metadata); None: the folder's name.
    hub_name: str | None = "coco"

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

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

    def images(self, split: str, records: Sequence[ImageRecord], cache: bool) -> ImageSource:
        return ImageSource(records, self.cfg.image_size, cache)

    def train_dataset(self, records: Sequence[ImageRecord], images: ImageSource, vocab: Vocabulary) -> Dataset:
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

    hub_name = "show-attend-tell-synthetic"

    @property
    def root(self) -> Path:
        from captioning.data.synthetic import dataset_dir

        return dataset_dir(self.cfg.root, self.cfg.synthetic)

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

    def train_dataset(self, records: Sequence[ImageRecord], images, vocab: Vocabulary) -> Dataset:
        dataset = self.folder.train_dataset(vocab, self.cfg.captions_per_image, self.cfg.max_caption_len)
        dataset.images = images  # the store's, or cached grids of the same images, in record order
        return dataset  # captions encoded at preparation, read from the folder

    def instances(self, split: str) -> Path:
        return self.root / f"instances_{split}.json"  # at the folder's top level

    def boxes(self, split: str) -> dict[int, list[tuple[str, list[float]]]] | None:
        return self.folder.boxes(split)


SOURCES: dict[str, type[FolderSource]] = {"synthetic": SyntheticSource, "coco": FolderSource, "prepared": PreparedSource}


class CaptionDataModule(pl.LightningDataModule):
    """Owns the data: its kind's source (SOURCES), the vocabulary (built from training captions
    unless given or the folder's), references and scenes by image id, and the per-device batch arithmetic."""

    def __init__(self, cfg: DataConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab
        self.source = SOURCES[cfg.dataset](cfg)
        self.records: dict[str, list[ImageRecord]] = {}
        self._images: dict[str, Any] = {}
        # Set by captioning.data.feature_cache.attach_feature_cache: every split's annotation grids
        # [L, D] (fp16) replace its images, so batch["images"] is then [B, L, D] (model.encode
        # passes grids through).
        self.feature_cache = None
        # Validation batches carry every reference caption encoded (train.monitor "nll").
        self.val_captions = False

    @property
    def root(self) -> Path:
        return self.source.root

    def prepare_data(self) -> None:
        # Runs on one process per node before the others set up: generation happens once.
        self.source.prepare_data()

    def load_split(self, split: str) -> list[ImageRecord]:
        if split not in self.records:
            self.records[split] = self.source.records(split)
        return self.records[split]

    def setup(self, stage: str | None = None) -> None:
        self.vocab = self.source.vocabulary(self.vocab, stage)
        if self.vocab is None:
            self.vocab = Vocabulary.build(
                (c for r in self.load_split("train") for c in r.captions), self.cfg.min_word_count
            )
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, SPLITS)
        for split in needed:
            if not self.load_split(split) and split != "test":  # an empty test split is skipped by its callers
                self.source.empty_split_error(split)

    def images(self, split: str) -> ImageSource:
        if self.feature_cache is not None:
            return self.feature_cache.split(split)
        if split not in self._images:
            self._images[split] = self.source.images(split, self.load_split(split), self.cfg.cache_images)
        return self._images[split]

    def references(self, split: str) -> dict[int, list[str]]:
        return {r.image_id: list(r.captions) for r in self.load_split(split)}

    def scenes(self, split: str):
        return self.source.scenes(split)

    def boxes(self, split: str) -> dict[int, list[tuple[str, list[float]]]] | None:
        """{image_id: [(category name, [x, y, w, h]), ...]} in source-image pixels, from the split's
        COCO instances file (synthetic: always; coco: annotations/instances_{split}.json; prepared:
        when prepared with --instances), or None where the dataset has none."""
        return self.source.boxes(split)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, collate) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
            num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(), drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.source.train_dataset(self.load_split("train"), self.images("train"), self.vocab)
        return self._loader(dataset, self.cfg.batch_size, True, collate_train)

    def eval_dataloader(self, split: str, captions: bool = False) -> DataLoader:
        vocab = self.vocab if captions else None
        dataset = EvalDataset(self.load_split(split), self.images(split), vocab, self.cfg.max_caption_len)
        return self._loader(dataset, self.cfg.eval_batch_size, False, collate_eval)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val", captions=self.val_captions)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")


# ------------------------------------------------------------------------------------ loader speed


def benchmark_loader(root: str | Path, workers: Sequence[int], *, batch_size: int = 32, captions_per_image: int = 5,
                     seconds: float = 10.0, source: str = "store", progress: bool = True) -> list[dict[str, Any]]:
    """Images/s of the training DataLoader alone (no model), for each worker count.

    ``source="store"`` reads the prepared store; ``"files"`` decodes and resizes the source image
    files every time (the unprepared path), for comparison. Each measurement iterates the
    loader for about ``seconds`` (whole epochs if the split is small) after one warm-up batch
    (worker start-up, reported separately). The model's input size is the folder's image size.
    """
    from captioning.data.store import PreparedFolder

    folder = PreparedFolder(root)
    results = []
    for n in workers:
        cfg = DataConfig(dataset="prepared", root=str(root), image_size=folder.image_size, batch_size=batch_size,
                         captions_per_image=captions_per_image, num_workers=n, cache_images=False)
        data = CaptionDataModule(cfg)
        data.setup("fit")
        loader = data.train_dataloader()
        if source == "files":
            records = data.load_split("train")
            dataset = TrainDataset(records, ImageSource(records, folder.image_size, cache=False), data.vocab,
                                   captions_per_image, cfg.max_caption_len)
            loader = data._loader(dataset, batch_size, True, collate_train)
        started = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        startup = time.perf_counter() - started
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for batch in iterator:
                images += batch["images"].shape[0]
                if time.perf_counter() - t0 >= seconds:
                    break
            else:
                iterator = iter(loader)
        elapsed = time.perf_counter() - t0
        del iterator, loader
        row = {"source": source, "workers": n, "batch_size": batch_size, "image_size": folder.image_size,
               "images": images, "seconds": round(elapsed, 2), "images_per_s": round(images / elapsed, 1),
               "startup_s": round(startup, 2)}
        if progress:
            print(f"loader benchmark: {source}, {n} workers: {row['images_per_s']} images/s "
                  f"({images} images in {elapsed:.1f}s; first batch after {startup:.2f}s)", flush=True)
        results.append(row)
    return results

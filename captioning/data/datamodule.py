"""Datasets and the LightningDataModule: images + encoded captions, per-device batches.

Folder layout read (the synthetic generator writes it; a COCO-format folder uses the same):

    ROOT/annotations/captions_{train,val,test}.json   COCO captions format (see data/coco.py)
    ROOT/annotations/instances_{split}.json           optional: boxes (grounding, synthetic checks)
    ROOT/{train,val,test}/<file_name>                 the images

or, with data.dataset "prepared", a folder written by captioning prepare. Each kind of dataset is one
class in captioning/data/sources.py SOURCES.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from captioning.config import DataConfig
from captioning.data.coco import SPLITS, ImageRecord
from captioning.data.sources import source_for
from captioning.data.store import PreparedFolder, draw_captions
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
        self.encoded = _encoded(records, vocab, max_caption_len)
        self.image_ids = [r.image_id for r in records]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int):
        return self.images[index], draw_captions(self.encoded[index], self.k), self.image_ids[index]


def _encoded(records: Sequence[ImageRecord], vocab: Vocabulary, max_caption_len: int) -> list[list[list[int]]]:
    return [[vocab.encode(c, max_caption_len) for c in r.captions] for r in records]


class EvalDataset(Dataset):
    """Item i: image i and its id (references stay in the DataModule, by id); with ``vocab``, also
    every reference caption encoded (the validation NLL of train.monitor "nll")."""

    def __init__(self, records: Sequence[ImageRecord], images: ImageSource, vocab: Vocabulary | None = None,
                 max_caption_len: int = 0) -> None:
        self.images = images
        self.image_ids = [r.image_id for r in records]
        self.encoded = None if vocab is None else _encoded(records, vocab, max_caption_len)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        if self.encoded is None:
            return self.images[index], self.image_ids[index]
        return self.images[index], self.image_ids[index], self.encoded[index]


def collate_train(batch) -> dict[str, torch.Tensor]:
    """-> images [B, 3, S, S], captions [B*k, T+1] padded with <pad>=0, image_ids [B].

    With one caption per image (the COCO configs) the images come longest caption first (stable):
    the decoder's fused teacher-forced pass runs its captions in that order, so the batch is used
    without copying its grids into another order (captioning/models/decoder.py); with several,
    that pass reorders them anyway. The order changes no loss term (each a mean over captions)."""
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


class CaptionDataModule(pl.LightningDataModule):
    """Owns the data: its kind's source (SOURCES), the vocabulary (built from training captions
    unless given or the folder's), references and scenes by image id, and the per-device batch arithmetic."""

    def __init__(self, cfg: DataConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab
        self.source = source_for(cfg)
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
    """Images/s of the training DataLoader alone (no model) on the prepared folder ``root``, for
    each worker count: ``source="store"`` reads its store, ``"files"`` decodes and resizes the
    source files (the unprepared path). Each measurement iterates the loader for about ``seconds``
    after one warm-up batch (worker start-up, reported separately)."""
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

"""Frozen-encoder feature cache: every image's annotation grid computed once, read memory-mapped.

With a frozen encoder (``model.encoder.fine_tune_from: null``) the annotations a_i of an image
never change, so running the CNN at every step of every epoch repeats the same work. With
``data.feature_cache: DIR`` (``captioning train --feature-cache DIR``) each split's grids are
computed once and the decoder trains from them; the encoder is still in the model (and its
checkpoint), so captioning new images needs nothing else.

Files, per split (train, val, test), in ``DIR``::

    {split}.npy    float16 [N, L, D], image i of the split in record order (sorted by image id,
                   as the DataModule reads them), read with np.load(mmap_mode="r")
    {split}.json   {"format", "shape", "dtype", "image_ids", "fingerprint", "seconds"}

The ``.json`` is written last, so a split without it is unfinished and is built again. The
fingerprint says what made the grids: the encoder config, a SHA-256 of the encoder's weights and
buffers, the image size, the preprocessing (a hash of the source of ``transforms.load_image``,
``to_rgb``, ``resize_square`` and ``preprocess``, the normalisation constants and the Pillow
version) and the split's identity (dataset kind, image ids, file names and file sizes). A cache
whose fingerprint differs from the current one is refused, never silently rebuilt or reused.

Storage: L x D x 2 bytes per image -- 14x14x2048 (ResNet conv5 at 224 px) is 784 KiB, 96 GB for
COCO's 123,287 images; grid_size 7 or a VGG backbone (512 channels) cut that by 4. fp16 keeps
about 3 significant digits; the loss from cached grids matches the encoder's to ~1e-3 relative
(tests/test_feature_cache.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL
import torch
from torch.utils.data import DataLoader, Subset

from captioning.console import CaptioningError
from captioning.config import ModelConfig
from captioning.data import transforms
from captioning.data.coco import SPLITS, ImageRecord
from captioning.data.store import LazyArray
from captioning.files import (MARKER, TMP_PREFIX, ForeignFolderError, RunLock, as_write_error, atomic_path,
                              atomic_write_json, check_no_links, claim_folder, mark_folder)
from captioning.models.encoder import Encoder
from captioning.progress import Progress

CACHE_FORMAT = 1
COCO_IMAGES = 123_287  # train2014 + val2014, the Karpathy splits' total


class FeatureCacheError(CaptioningError, ValueError):
    """The cache directory holds grids made by another encoder, preprocessing or dataset, or lacks room."""


# ------------------------------------------------------------------------------ fingerprint


def preprocessing_hash() -> str:
    """Changes whenever the path from an image file to the encoder's input tensor may change."""
    functions = (transforms.load_image, transforms.to_rgb, transforms.preprocess, transforms.resize_square)
    parts = [*map(inspect.getsource, functions), repr(transforms.MEAN), repr(transforms.STD), PIL.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes, values), device-independent."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def split_identity(dataset: str, records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Which images, in which order: ids, file names and sizes (not paths: a moved folder is fine)."""
    digest = hashlib.sha256()
    for r in records:
        size = r.path.stat().st_size if r.path.is_file() else -1
        digest.update(f"{r.image_id}\t{r.path.name}\t{size}\n".encode())
    return {"dataset": dataset, "num_images": len(records), "images_sha256": digest.hexdigest()[:16]}


def fingerprint(model_cfg: ModelConfig, encoder_hash: str, image_size: int, dataset: str,
                records: Sequence[ImageRecord]) -> dict[str, Any]:
    enc = model_cfg.encoder
    encoder_cfg = {"backbone": enc.backbone, "stage": enc.stage, "grid_size": enc.grid_size, "weights": enc.weights}
    return {"encoder": encoder_cfg, "encoder_weights_sha256": encoder_hash,
            "image_size": image_size, "preprocessing": preprocessing_hash(), "split": split_identity(dataset, records)}


def _differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} cached, {b!r} now)")
    return out


# ------------------------------------------------------------------------------ sizes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def size_report(grid_size: int, channels: int, counts: dict[str, int]) -> str:
    """The lines printed before a cache is built: per image, per split, and COCO for scale."""
    per_image = grid_size * grid_size * channels * 2
    splits = ", ".join(f"{s} {n:,} images = {format_bytes(n * per_image)}" for s, n in counts.items())
    total = sum(counts.values()) * per_image
    half = max(1, grid_size // 2)  # the smaller grid on offer, and VGG's 512 channels
    coco = (f"for scale: COCO's {COCO_IMAGES:,} images at this size = {format_bytes(COCO_IMAGES * per_image)}"
            f" (grid_size {half}: {format_bytes(COCO_IMAGES * half * half * channels * 2)}"
            f"; 512 channels, as VGG's conv5: {format_bytes(COCO_IMAGES * grid_size * grid_size * 512 * 2)})")
    return (f"feature cache: {grid_size}x{grid_size}x{channels} fp16 = {format_bytes(per_image)} per image; "
            f"{splits}; total {format_bytes(total)}\n{coco}")


# ------------------------------------------------------------------------------ reading


class CachedFeatures(LazyArray):
    """Image i of a split -> its annotation grid, float16 tensor [L, D] (like ImageSource's images),
    mapped per process and never pickled (LazyArray), so workers share the page cache."""

    def __init__(self, path: Path, shape: Sequence[int]) -> None:
        super().__init__(Path(path))
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index]))  # a copy out of the mapping


class FeatureCache:
    """The opened cache: split name -> CachedFeatures."""

    def __init__(self, directory: Path, splits: dict[str, CachedFeatures]) -> None:
        self.directory = directory
        self.splits = splits

    def split(self, split: str) -> CachedFeatures:
        if split not in self.splits:
            raise FeatureCacheError(f"the feature cache in {self.directory} has no '{split}' split "
                                    f"(it holds {', '.join(self.splits)})")
        return self.splits[split]


# ------------------------------------------------------------------------------ building


def build_split(path: Path, encoder: Encoder, images: Any, n: int, *, batch_size: int, num_workers: int,
                device: torch.device, split: str, progress: bool) -> None:
    """Run the frozen encoder over ``n`` images (``images[i]`` -> [3, S, S]) into ``path`` (fp16
    [n, L, D] .npy, written beside it and renamed when complete)."""
    L, D = encoder.grid_size ** 2, encoder.out_channels
    loader = DataLoader(Subset(images, range(n)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    was_training, home = encoder.training, next(encoder.parameters()).device
    encoder.to(device).eval()
    bar = Progress(n, f"feature cache {split}", enabled=progress, interval=2.0)
    try:
        with atomic_path(path) as partial:
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, L, D))
            done = 0
            for batch in loader:
                half = encoder(batch.to(device, non_blocking=True))[0].to(torch.float16)  # (B, L, D)
                if not bool(torch.isfinite(half).all()):
                    raise FeatureCacheError(f"annotation grids of {split} overflow fp16 (|a| > 65504): this encoder's "
                                            "activations are too large to cache; train without data.feature_cache")
                out[done: done + len(batch)] = half.cpu().numpy()
                done += len(batch)
                bar.update(len(batch))
            out.flush()
            del out
    finally:
        bar.close()
        encoder.to(home).train(was_training)


def claim_cache_folder(directory: Path) -> None:
    """Refuse (FeatureCacheError) before anything is written a folder that is not the cache's own:
    new, empty, marked as a feature cache (captioning/files.py), or holding nothing but a cache's
    files (written before folders were marked, or by another process of the same training: marked
    now). Nothing is written through a link in it."""
    own = {f"{split}.{ext}" for split in SPLITS for ext in ("json", "npy", "lock")}
    try:
        if directory.is_dir() and not (directory / MARKER).exists() and not directory.is_symlink():
            names = [p.name for p in directory.iterdir()]
            if names and all(n in own or n.startswith(TMP_PREFIX) for n in names) and _cache_files(directory, names):
                mark_folder(directory, "features")
        claim_folder(directory, "features", "data.feature_cache", "write the feature cache")
        check_no_links(directory, sorted(own), "data.feature_cache")
    except ForeignFolderError as err:
        raise FeatureCacheError(str(err)) from None
    except OSError as err:
        raise FeatureCacheError(str(as_write_error(err) or err)) from None


def _record(path: Path) -> dict:
    """A split's record (its .json); OSError, ValueError or RecursionError when the file is not one."""
    meta = json.loads(path.read_bytes())
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not a mapping")
    return meta


def _cache_files(directory: Path, names: list[str]) -> bool:
    """Whether ``names`` are what a cache writes: every .json a cache's record, every .npy beside one."""
    for name in names:
        if name.endswith(".npy") and name[:-4] + ".json" not in names:
            return False
        if name.endswith(".json"):
            try:
                if _record(directory / name).get("format") != CACHE_FORMAT:
                    return False
            except (OSError, ValueError, RecursionError):
                return False
    return True


def prepare_feature_cache(directory: str | Path, model_cfg: ModelConfig, encoder: Encoder, image_size: int,
                          dataset: str, records: dict[str, Sequence[ImageRecord]], image_sources: dict[str, Any], *,
                          device: str | torch.device = "cpu", batch_size: int = 64, num_workers: int = 0,
                          log: Callable[[str], None] = print, progress: bool = True) -> FeatureCache:
    """Open the cache in ``directory``, building the splits that are missing. ``records[split]``:
    the split's records in the DataModule's order; ``image_sources[split][i]``: preprocessed image
    i. Refuses (FeatureCacheError) a split whose stored fingerprint differs from this encoder's, or
    a build the disk has no room for."""
    directory = Path(directory)
    claim_cache_folder(directory)
    device = torch.device(device)
    encoder_hash = weights_hash(encoder)
    grid, channels = encoder.grid_size, encoder.out_channels
    log(size_report(grid, channels, {s: len(r) for s, r in records.items()}))

    prints = {split: fingerprint(model_cfg, encoder_hash, image_size, dataset, recs)
              for split, recs in records.items()}
    to_build = [split for split in records if not (directory / f"{split}.json").is_file()]
    opened = {split: _open_split(directory, split, prints[split], records[split])
              for split in records if split not in to_build}

    missing = sum(len(records[s]) for s in to_build) * grid * grid * channels * 2
    if missing:
        free = shutil.disk_usage(directory).free
        if missing > free:
            raise FeatureCacheError(
                f"the feature cache needs {format_bytes(missing)} but {directory} has {format_bytes(free)} free: "
                "choose another data.feature_cache directory or a smaller model.encoder.grid_size")
    for split in to_build:
        recs = records[split]
        meta_path = directory / f"{split}.json"
        lock = RunLock(directory / f"{split}.lock", what=f"building the {split} features of")
        if lock.acquire_or_wait(done=meta_path.is_file, log=log):
            try:
                if not meta_path.is_file():  # another process may have finished just before
                    log(f"feature cache: computing {split} ({len(recs):,} images) into {directory / (split + '.npy')}")
                    started = time.perf_counter()
                    build_split(directory / f"{split}.npy", encoder, image_sources[split], len(recs),
                                batch_size=batch_size, num_workers=num_workers, device=device, split=split,
                                progress=progress)
                    atomic_write_json(meta_path, {"format": CACHE_FORMAT, "shape": [len(recs), grid * grid, channels],
                                                  "dtype": "float16", "image_ids": [r.image_id for r in recs],
                                                  "fingerprint": prints[split],
                                                  "seconds": round(time.perf_counter() - started, 1)}, indent=None)
            finally:
                lock.release()
        opened[split] = _open_split(directory, split, prints[split], recs)
    return FeatureCache(directory, {s: opened[s] for s in records})


def _open_split(directory: Path, split: str, current: dict, records: Sequence[ImageRecord]) -> CachedFeatures:
    meta_path, npy = directory / f"{split}.json", directory / f"{split}.npy"
    rebuild = f"delete {directory / split}.* to rebuild it"
    try:
        meta = _record(meta_path)
    except (OSError, ValueError, RecursionError) as err:
        raise FeatureCacheError(f"{meta_path} is unreadable ({err}): {rebuild}") from None
    if meta.get("format") != CACHE_FORMAT:
        raise FeatureCacheError(f"{meta_path} has cache format {meta.get('format')}, this code reads {CACHE_FORMAT}: "
                                f"{rebuild}")
    diff = _differences(meta.get("fingerprint", {}), current)
    if diff:
        raise FeatureCacheError(f"the feature cache {npy} was made for something else -- {'; '.join(diff)} -- so its "
                                f"grids are not this encoder's: {rebuild}, or choose another data.feature_cache")
    if meta.get("image_ids") != [r.image_id for r in records] or not npy.is_file():
        raise FeatureCacheError(f"{npy} does not hold this split's images in order: {rebuild}")
    features = CachedFeatures(npy, meta["shape"])
    if tuple(features.array.shape) != tuple(meta["shape"]) or features.array.dtype != np.float16:
        raise FeatureCacheError(f"{npy} is {features.array.dtype} {features.array.shape}, its {meta_path.name} says "
                                f"float16 {tuple(meta['shape'])}: {rebuild}")
    return features


def attach_feature_cache(data: Any, cfg: Any, encoder: Encoder, device: str | torch.device = "cpu",
                         log: Callable[[str], None] = print, progress: bool = True) -> FeatureCache:
    """Open (building what is missing) the cache ``cfg.data.feature_cache`` for every split of the
    CaptionDataModule ``data`` (set up, vocabulary built) and attach it: from then on
    ``data.images(split)`` serves annotation grids. ``encoder`` must be the model's own (frozen)
    encoder -- its weights are part of the fingerprint."""
    if cfg.model.encoder.fine_tune_from is not None:
        raise FeatureCacheError("data.feature_cache needs a frozen encoder: set model.encoder.fine_tune_from=null")
    records = {split: data.load_split(split) for split in SPLITS}
    # A prepared store's memory-mapped pixels, or image files decoded on demand (never all at once into memory).
    sources = {split: data.source.images(split, records[split], cache=False) for split in SPLITS}
    data.feature_cache = prepare_feature_cache(
        cfg.data.feature_cache, cfg.model, encoder, data.cfg.image_size, data.cfg.dataset, records, sources,
        device=device, batch_size=data.cfg.eval_batch_size, num_workers=data.cfg.num_workers, log=log,
        progress=progress)
    return data.feature_cache

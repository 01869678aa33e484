"""Writing the synthetic dataset: COCO-format files under a folder named after the config,
atomically (the package docstring, "Files")."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import threading
import time
from pathlib import Path

from captioning.console import InvalidValue
from captioning.config import SyntheticConfig
from captioning.data.coco import SPLITS
from captioning.files import RunLock, atomic_folder, partial_name
from captioning.progress import Progress
from captioning.data.synthetic.language import MAX_CAPTIONS_PER_IMAGE, VOCABULARY, reference_captions
from captioning.data.synthetic.scenes import CATEGORIES, MIN_IMAGE_SIZE, SHAPES, SceneObject, make_scene, render_scene

GENERATOR_VERSION = 8  # part of the folder name: bump it whenever the output would change
JPEG_QUALITY = 95


# --------------------------------------------------------------------------- generation


def _validate(cfg: SyntheticConfig) -> None:
    for name in ("num_train", "num_val", "num_test"):
        if getattr(cfg, name) < 0:
            raise InvalidValue(f"synthetic.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise InvalidValue(f"synthetic.image_size must be >= {MIN_IMAGE_SIZE}, got {cfg.image_size}")
    if not 1 <= cfg.captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
        raise InvalidValue(f"synthetic.captions_per_image must be in 1..{MAX_CAPTIONS_PER_IMAGE} (a one-object scene "
                           f"has only {MAX_CAPTIONS_PER_IMAGE} distinct true captions), got {cfg.captions_per_image}")


def dataset_dir(root: str | Path, cfg: SyntheticConfig) -> Path:
    """The dataset folder for ``cfg`` under ``root`` (whether or not it exists yet)."""
    return Path(root) / (f"synthetic-v{GENERATOR_VERSION}-seed{cfg.seed}-n{cfg.num_train}-{cfg.num_val}-"
                         f"{cfg.num_test}-s{cfg.image_size}-c{cfg.captions_per_image}")


def _image_rng(cfg: SyntheticConfig, split: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"synthetic-v{GENERATOR_VERSION}/seed={cfg.seed}/{split}/{index}/{purpose}")


def _dump(obj: object, path: Path, indent: int | None = None) -> None:
    separators = (",", ":") if indent is None else (",", ": ")
    path.write_text(json.dumps(obj, indent=indent, separators=separators) + "\n")


def _segmentation(obj: SceneObject) -> list[list[float]]:
    x, y, w, h = obj.bbox
    if obj.shape == "square":
        points = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif obj.shape == "triangle":
        points = [(x, y + h), (x + w, y + h), (x + w / 2, y)]
    else:
        angles = [2 * math.pi * k / 24 for k in range(24)]
        points = [(x + w / 2 + w / 2 * math.cos(a), y + h / 2 + h / 2 * math.sin(a)) for a in angles]
    return [[round(v, 2) for point in points for v in point]]


def _area(obj: SceneObject) -> float:
    _, _, w, h = obj.bbox
    factor = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[obj.shape]
    return round(factor * w * h, 2)


_FILE_FORMATS = {
    "{split}/SYN_{split}_{image_id:012d}.jpg": "RGB JPEG (quality 95, no chroma subsampling), image_size x image_size",
    "annotations/captions_{split}.json": "COCO captions: {info, licenses, images: [{id, file_name, width, height}], "
    "annotations: [{id, image_id, caption}]}; the first caption of an image is the canonical one",
    "annotations/instances_{split}.json": "COCO instances: {info, licenses, images, categories: [{id, name, "
    "supercategory}], annotations: [{id, image_id, category_id, bbox: [x, y, w, h], area, iscrowd, "
    "segmentation: [[x1, y1, ...]], attributes: {size, colour}}]}",
    "manifest.json": "this file: generator version, config, per-split counts and id ranges, vocabulary",
}


def _write_dataset(out: Path, cfg: SyntheticConfig, progress: bool) -> None:
    (out / "annotations").mkdir(parents=True)
    counts = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    bar = Progress(sum(counts.values()), "synthetic", enabled=progress, interval=1.0)
    image_id = caption_id = object_id = 0
    splits_summary = {}
    for split in SPLITS:
        (out / split).mkdir()
        images, captions, instances = [], [], []
        for index in range(counts[split]):
            image_id += 1
            objects = make_scene(_image_rng(cfg, split, index, "scene"), cfg.image_size)
            image = render_scene(objects, cfg.image_size, _image_rng(cfg, split, index, "render"))
            file_name = f"SYN_{split}_{image_id:012d}.jpg"
            image.save(out / split / file_name, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
            images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
            rng = _image_rng(cfg, split, index, "captions")
            for caption in reference_captions(objects, cfg.captions_per_image, rng, cfg.image_size):
                caption_id += 1
                captions.append({"id": caption_id, "image_id": image_id, "caption": caption})
            for obj in objects:
                object_id += 1
                instances.append({"id": object_id, "image_id": image_id,
                                  "category_id": SHAPES.index(obj.shape) + 1,  # the ids of CATEGORIES
                                  "bbox": list(obj.bbox), "area": _area(obj), "iscrowd": 0,
                                  "segmentation": _segmentation(obj),
                                  "attributes": {"size": obj.size, "colour": obj.colour}})
            bar.update(1)
        info = {"description": f"show-attend-tell synthetic shapes dataset, split {split}",
                "version": str(GENERATOR_VERSION), "contributor": "captioning.data.synthetic", "url": ""}
        header = {"info": info, "licenses": [], "images": images}
        _dump({**header, "annotations": captions}, out / "annotations" / f"captions_{split}.json")
        _dump({**header, "categories": CATEGORIES, "annotations": instances},
              out / "annotations" / f"instances_{split}.json")
        splits_summary[split] = {"images": len(images), "captions": len(captions), "objects": len(instances),
                                 "image_ids": [images[0]["id"], images[-1]["id"]] if images else []}
    bar.close()
    manifest = {"generator": "captioning.data.synthetic", "version": GENERATOR_VERSION,
                "config": dataclasses.asdict(cfg), "splits": splits_summary, "vocabulary": list(VOCABULARY),
                "files": _FILE_FORMATS,
                "description": "Coloured shapes on a gradient with captions from a small grammar; "
                               "see the docstring of captioning.data.synthetic for the scene rules and the grammar."}
    _dump(manifest, out / "manifest.json", indent=2)


_LOCK = threading.Lock()  # threads of one process share a pid, hence a lock file


def generate_synthetic(root: str | Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Generate the dataset for ``cfg`` under ``root`` on first use; -> its folder. A no-op when the
    folder exists (complete: it appears only by an atomic rename). ``progress``: count, rate and ETA
    on stderr."""
    _validate(cfg)
    final = dataset_dir(root, cfg)
    if final.is_dir():
        return final
    with _LOCK:
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        # One process generates (the other DDP ranks wait for the folder); a dead one's lock is taken over.
        lock = RunLock(final.with_name(final.name + ".lock"), what="generating")
        if not lock.acquire_or_wait(done=final.is_dir, log=lambda m: print(f"synthetic: {m}", file=sys.stderr)):
            return final
        try:
            if final.is_dir():
                return final
            shutil.rmtree(partial_name(final), ignore_errors=True)  # left by a generator that died
            start = time.monotonic()
            if progress:
                print(f"synthetic: generating {final}", file=sys.stderr, flush=True)
            with atomic_folder(final) as tmp:
                _write_dataset(tmp, cfg, progress)
        finally:
            lock.release()
        if progress:
            print(f"synthetic: done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        return final

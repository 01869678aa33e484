"""Preparation: a source dataset (captioning/data/formats.py) -> a prepared folder, once.

Every core decodes and resizes the images (a multiprocessing Pool over chunks of images), with
progress, rate and ETA on stderr. The folder is written as ``OUT.partial/`` and renamed to
``OUT`` only when complete, so a folder named ``OUT`` is always whole. An interrupted run leaves
``OUT.partial/`` with one done-marker per finished chunk; the same command run again decodes the
unfinished chunks only (a changed command or changed source files start over).

The prepared folder's files are :data:`FILE_FORMATS` (``manifest.json`` repeats it under
``"files"``). Image i of ``captions_{split}.json`` is row ``images[i]["row"]`` of
``images_{split}.npy`` (read with ``np.load(mmap_mode="r")``; the rows of skipped images stay zero
and are never referenced); row j of ``tokens_``/``lengths_{split}.npy`` is ``annotations[j]``, and
length 0 marks a caption not used for training (``--long-captions drop``). ``instances_{split}.json``
is written with ``--instances`` (always for the synthetic dataset).

Images go through ``transforms.load_image`` then ``transforms.resize_square``, the geometric part
of ``transforms.preprocess``, so training from the store gives the same tensors as preprocessing
the file; captions through ``coco.normalize_caption`` and ``vocab.tokenize``, longer than
``max_len`` words truncated or (``--long-captions drop``) kept as references only. The manifest's
``"preprocessing"`` says it in full.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from captioning.console import CaptioningError, one_line
from captioning.data.coco import SPLITS, write_json
from captioning.data.formats import Skip, SourceDataset, pool_instances
from captioning.data.transforms import ImageLoadError, load_image, resize_square
from captioning.files import (MARKER, ForeignFolderError, LockedError, RunLock, atomic_path, check_folder,
                              claim_folder, partial_name, publish_folder, remove_leftovers)
from captioning.progress import Progress
from captioning.vocab import Vocabulary, tokenize

FORMAT_VERSION = 1

MISSING_FILE = "missing image file"
UNREADABLE = "unreadable image"  # truncated, corrupt, not an image, decompression bomb
NO_TRAINING_CAPTION = "every caption longer than max_len (drop rule)"

FILE_FORMATS = {
    "manifest.json": "this file",
    "vocab.json": '{"words": [...], "min_count": int, "counts": {word: train count}}; id = position; '
                  "<pad>=0 <start>=1 <end>=2 <unk>=3",
    "captions_{split}.json": 'COCO captions: {"info", "images": [{"id", "file_name", "row", "width", "height", '
                             '"bytes", "sha256"}], "annotations": [{"id", "image_id", "caption"}]}; annotations '
                             "grouped by image in image order; file_name relative to source.images_root",
    "tokens_{split}.npy": "int32 [captions, max_len + 2]: <start> words <end> <pad>...; row i = annotations[i]",
    "lengths_{split}.npy": "int32 [captions]: ids used incl. <start>/<end>; 0 = not used for training",
    "images_{split}.npy": "uint8 [rows, S, S, 3] RGB after load_image + resize_square; image i is row images[i].row",
    "instances_{split}.json": "COCO instances of the split's images without 'segmentation' (optional)",
    "skipped.json": '[{"reason", "item"}] for every record left out',
}


class PrepareError(CaptioningError, RuntimeError):
    """Preparation cannot go on (a --strict skip, an occupied output folder, another run)."""


@dataclass
class PrepareOptions:
    image_size: int = 224  # stored S x S; data.image_size must equal it to train
    min_word_count: int = 5  # vocabulary: train-split words seen at least this often
    max_len: int = 30  # words per training caption, <start>/<end> excluded
    long_captions: Literal["truncate", "drop"] = "truncate"
    workers: int = 0  # 0: every core (os.cpu_count())
    chunk_size: int = 64  # images per task and per resume marker
    strict: bool = False  # fail on the first skipped record
    overwrite: bool = False  # replace an existing prepared folder
    progress: bool = True

    def check(self) -> None:
        for name in ("image_size", "min_word_count", "max_len", "chunk_size"):
            if getattr(self, name) < 1:
                raise PrepareError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.long_captions not in ("truncate", "drop"):
            raise PrepareError(f"--long-captions must be truncate or drop, got {self.long_captions!r}")


# ------------------------------------------------------------------------------------ helpers


def available_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(Path(path).resolve()), "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------ decoding


def _conversions(data: bytes) -> list[str]:
    """What load_image will convert, read from the header (for the summary only)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            mode = probe.mode
            orientation = probe.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- unreadable files are load_image's to report
        return []
    kinds = {"L": "grayscale", "1": "grayscale", "CMYK": "CMYK", "P": "palette", "RGBA": "alpha",
             "LA": "alpha", "PA": "alpha", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit",
             "I": "16-bit", "F": "float"}
    found = [kinds[mode]] if mode in kinds else ([] if mode == "RGB" else [f"mode {mode}"])
    if orientation not in (1, None):
        found.append("EXIF-rotated")
    return found


def _decode_one(path: Path, size: int, store: np.ndarray, row: int) -> dict[str, Any]:
    if not path.is_file():
        return {"status": MISSING_FILE}
    data = path.read_bytes()
    try:
        img = load_image(path)  # the one loader: training, evaluation and captioning use it too
    except ImageLoadError as err:
        return {"status": UNREADABLE, "error": one_line(err)}
    store[row] = np.asarray(resize_square(img, size))
    return {"status": "ok", "width": img.width, "height": img.height, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "converted": _conversions(data)}


def _preallocate(path: Path) -> None:
    """Give the memory-mapped store every block it will need now. open_memmap makes a sparse
    file, and a write through a memory map into a block the full disk cannot give is a SIGBUS
    that kills the process (mmap(2)); allocated first, a full disk is an ENOSPC here, which
    atomic_path turns into one line. posix_fallocate writes zeros where the file system cannot
    allocate otherwise."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # No fallocate here: write the zeros ourselves.
        size, block = os.fstat(fd).st_size, bytes(1 << 20)
        done = min(size, 4096)  # the first block holds the .npy header, written (so allocated) already
        while done < size:
            done += os.pwrite(fd, block[:min(len(block), size - done)], done)
    finally:
        os.close(fd)


def _decode_chunk(task: tuple[str, int, int, list[str], int, str]) -> tuple[str, int, list[dict]]:
    """Worker: decode a chunk of images straight into the memory-mapped store (no pickled pixels).

    task = (split, chunk index, first row, image paths, size, store path)."""
    split, index, first_row, paths, size, store_path = task
    store = np.load(store_path, mmap_mode="r+")
    results = [_decode_one(Path(p), size, store, first_row + i) for i, p in enumerate(paths)]
    store.flush()  # the rows are in the file before the chunk's done-marker is written
    del store
    return split, index, results


# ------------------------------------------------------------------------------------ the run


def _plan(dataset: SourceDataset, options: PrepareOptions, sources: list[dict]) -> dict[str, Any]:
    """Everything the decoded chunks depend on; a resumed run must match it exactly."""
    return {
        "format_version": FORMAT_VERSION,
        "options": {"image_size": options.image_size, "chunk_size": options.chunk_size},
        "sources": [s["sha256"] for s in sources],
        "images": {split: [[img.image_id, str(img.path)] for img in dataset.images if img.split == split]
                   for split in SPLITS},
    }


def _take_lock(partial: Path) -> RunLock:
    lock = RunLock(partial / "lock", what="preparing")
    try:
        return lock.acquire()
    except LockedError as err:
        raise PrepareError(str(err)) from None


def _open_partial(out: Path, plan: dict[str, Any], progress: bool) -> tuple[Path, RunLock]:
    """OUT.partial/ ready for this plan (reused if it was started with the same plan), and its lock."""
    partial = partial_name(out)
    plan_file = partial / "plan.json"
    try:
        # OUT.partial/ of someone else's is never removed; ours names OUT, which it becomes.
        ours = check_folder(partial, "prepared", "--out", name_as=out)
    except ForeignFolderError as err:
        raise PrepareError(f"{err} (the resumable part of --out {out})") from None
    if ours:
        try:
            same = json.loads(plan_file.read_text()) == json.loads(json.dumps(plan))
        except (OSError, ValueError):
            same = False
        if same:
            lock = _take_lock(partial)
            done = len(list((partial / "chunks").glob("*.json")))
            if progress:
                print(f"prepare: resuming {partial} ({done} chunks already done)", file=sys.stderr, flush=True)
            return partial, lock
        _take_lock(partial).release()
        if progress:
            print(f"prepare: {partial} was started with other options or sources: starting over",
                  file=sys.stderr, flush=True)
        shutil.rmtree(partial)
    claim_folder(partial, "prepared", "--out", name_as=out)
    (partial / "chunks").mkdir()
    lock = _take_lock(partial)
    write_json(plan_file, plan)
    return partial, lock


#: Every name a preparation writes into its folder: FILE_FORMATS for each split, and the marker.
OWN_NAMES = frozenset([MARKER, *(pattern.format(split=split) for pattern in FILE_FORMATS for split in SPLITS)])


def _check_out(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or (with --overwrite) a prepared folder holding only what a
    preparation writes: it is replaced whole, so a file of anyone else's in it is refused first."""
    try:
        ours = check_folder(out, "prepared", "--out")
    except ForeignFolderError as err:
        raise PrepareError(err) from None
    # The old or new folder a replacement killed half-way left beside OUT (its own files only).
    remove_leftovers(out, [*OWN_NAMES, "chunks", "plan.json", "lock"])
    if not ours:
        if out.is_dir():
            out.rmdir()  # empty: the finished folder is renamed into its place
        return
    if not overwrite:
        raise PrepareError(f"{out} is already a prepared folder; pass --overwrite to prepare it again")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_NAMES)  # a user's captions_mine.json
    if foreign:
        raise PrepareError(f"{out} holds files a preparation does not write ({', '.join(foreign[:4])}): move them "
                           "out of the folder, then run again (--overwrite replaces the whole folder)")


def _decode_images(dataset: SourceDataset, partial: Path, options: PrepareOptions) -> dict[str, list[dict]]:
    """Decode every image into images_{split}.npy; -> per split, one result dict per image."""
    size, chunk = options.image_size, options.chunk_size
    tasks, results = [], {}
    done_count = 0
    for split in SPLITS:
        images = [img for img in dataset.images if img.split == split]
        store_path = partial / f"images_{split}.npy"
        if not store_path.is_file():
            for stale in (partial / "chunks").glob(f"{split}-*.json"):  # markers without their rows
                stale.unlink()
            with atomic_path(store_path) as tmp:
                # Writes the header and sizes the file; the map itself is dropped at once.
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), size, size, 3))
                _preallocate(tmp)
        results[split] = [None] * len(images)
        for index, start in enumerate(range(0, len(images), chunk)):
            marker = partial / "chunks" / f"{split}-{index:06d}.json"
            if marker.is_file():
                done = json.loads(marker.read_text())
                # A chunk with a missing or unreadable image is decoded again: the file may be fixed by now.
                if all(r["status"] == "ok" for r in done):
                    results[split][start:start + chunk] = done
                    done_count += len(images[start:start + chunk])
                    continue
            paths = [str(img.path) for img in images[start:start + chunk]]
            tasks.append((split, index, start, paths, size, str(store_path)))
    total = sum(len(r) for r in results.values())
    bar = Progress(total, "prepare", enabled=options.progress, interval=1.0, initial=done_count)
    workers = options.workers or available_cores()
    workers = max(1, min(workers, len(tasks)))

    def finish(split: str, index: int, chunk_results: list[dict]) -> None:
        for offset, result in enumerate(chunk_results):
            if options.strict and result["status"] != "ok":
                img = [i for i in dataset.images if i.split == split][index * chunk + offset]
                raise PrepareError(f"--strict: {result['status']}: {result.get('error', img.path)}")
        write_json(partial / "chunks" / f"{split}-{index:06d}.json", chunk_results)
        results[split][index * chunk:index * chunk + len(chunk_results)] = chunk_results
        bar.update(len(chunk_results))

    if options.progress:
        print(f"prepare: decoding {total - done_count} images at {size}x{size} with {workers} "
              f"process{'es' if workers > 1 else ''}", file=sys.stderr, flush=True)
    if workers == 1:
        for task in tasks:
            finish(*_decode_chunk(task))
    elif tasks:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        # Workers ignore Ctrl-C: the main process handles it (one line, resumable), not N tracebacks.
        with context.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            for split, index, chunk_results in pool.imap_unordered(_decode_chunk, tasks):
                finish(split, index, chunk_results)
    bar.close()
    return results


def _histogram(lengths: Counter) -> list[tuple[str, int]]:
    bins = [(1, 5), (6, 10), (11, 15), (16, 20), (21, 25), (26, 30), (31, 40), (41, 60)]
    rows = [(f"{lo}-{hi}", sum(c for n, c in lengths.items() if lo <= n <= hi)) for lo, hi in bins]
    rows.append(("61+", sum(c for n, c in lengths.items() if n > 60)))
    return rows


def prepare(dataset: SourceDataset, out: str | Path, options: PrepareOptions,
            instances: Sequence[Path] = (), command: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the prepared folder ``out`` from ``dataset``; -> its manifest (with the summary)."""
    options.check()
    _check_out(Path(out), options.overwrite)  # before resolving: a link to nothing is refused, not followed
    out = Path(out).resolve()
    if options.strict and dataset.skipped:
        first = dataset.skipped[0]
        raise PrepareError(f"--strict: {first.reason}: {first.item}")
    for split in SPLITS:
        if split != "test" and not any(img.split == split for img in dataset.images):
            raise PrepareError(f"the {split} split has no image with a caption; check the split lists or files")
    if not any(Path(img.path).is_file() for img in dataset.images):  # stops at the first image found
        raise PrepareError(f"no image file of the dataset is in {dataset.images_root} (e.g. "
                           f"{dataset.images[0].path} does not exist): point --images at the folder holding them")
    if not any(img.split == "test" for img in dataset.images):
        print(f"warning: the source has no test split ({dataset.split_rule}); the prepared folder will have an "
              "empty test split, so evaluation must use --split val", file=sys.stderr, flush=True)
    pooled = _read_instances(instances, dataset)  # before decoding: a wrong file fails in seconds
    started = time.perf_counter()
    sources = [{"role": role, **file_digest(path)} for role, path in dataset.files]
    sources += [{"role": "instances", **file_digest(path)} for path in instances]
    partial, lock = _open_partial(out, _plan(dataset, options, sources), options.progress)
    try:
        manifest = _prepare_into(partial, dataset, options, pooled, sources, command, started)
    finally:
        lock.release()  # interrupted or failed: the next run resumes
    _finish(partial, out)
    return manifest


def _prepare_into(partial: Path, dataset: SourceDataset, options: PrepareOptions, instances: tuple | None,
                  sources: list[dict], command: Sequence[str] | None, started: float) -> dict[str, Any]:
    """Decode (resumably), then write every file of the folder into ``partial``."""
    results = _decode_images(dataset, partial, options)
    skipped: list[Skip] = list(dataset.skipped)
    converted: Counter = Counter()
    kept: dict[str, list[tuple[Any, dict, int]]] = {}
    for split in SPLITS:
        kept[split] = []
        images = [img for img in dataset.images if img.split == split]
        for row, (img, result) in enumerate(zip(images, results[split])):
            if result["status"] != "ok":
                skipped.append(Skip(result["status"], f"{img.file_name}" + (f": {result['error']}" if "error" in result else "")))
                continue
            converted.update(result["converted"])
            kept[split].append((img, result, row))

    # Vocabulary: the training split only (the decoded images' captions).
    train_captions = [c for img, _, _ in kept["train"] for c in img.captions]
    counts = Counter(tok for c in train_captions for tok in tokenize(c))
    vocab = Vocabulary.build(train_captions, options.min_word_count)

    width = options.max_len + 2
    split_counts, unknown, lengths, too_long = {}, {}, Counter(), Counter()
    for split in SPLITS:
        entries = kept[split]
        if split == "train" and options.long_captions == "drop":
            trainable = [any(len(tokenize(c)) <= options.max_len for c in e[0].captions) for e in entries]
            skipped.extend(Skip(NO_TRAINING_CAPTION, e[0].file_name) for e, ok in zip(entries, trainable) if not ok)
            entries = kept[split] = [e for e, ok in zip(entries, trainable) if ok]
            if not entries:
                raise PrepareError(f"no training caption has at most {options.max_len} words: raise --max-len "
                                   "or use --long-captions truncate")
        total = sum(len(img.captions) for img, _, _ in entries)
        tokens = np.zeros((total, width), dtype=np.int32)  # <pad> = 0
        used = np.zeros(total, dtype=np.int32)
        images_json, annotations = [], []
        unk = total_words = 0
        for img, result, row in entries:
            images_json.append({"id": img.image_id, "file_name": img.file_name, "row": row, "width": result["width"],
                                "height": result["height"], "bytes": result["bytes"], "sha256": result["sha256"]})
            for caption in img.captions:
                j = len(annotations)
                annotations.append({"id": j + 1, "image_id": img.image_id, "caption": caption})
                words = tokenize(caption)
                lengths[len(words)] += 1
                unk += sum(w not in vocab.index for w in words)
                total_words += len(words)
                too_long[split] += len(words) > options.max_len
                if len(words) <= options.max_len or options.long_captions == "truncate":
                    encoded = vocab.encode(caption, options.max_len)  # the one encoder (truncates)
                    tokens[j, :len(encoded)] = encoded
                    used[j] = len(encoded)
        np.save(partial / f"tokens_{split}.npy", tokens)
        np.save(partial / f"lengths_{split}.npy", used)
        write_json(partial / f"captions_{split}.json",
                   {"info": {"description": f"prepared {dataset.format} dataset, split {split}"},
                    "images": images_json, "annotations": annotations})
        unknown[split] = round(100.0 * unk / max(total_words, 1), 3)
        split_counts[split] = {"images": len(images_json), "captions": len(annotations),
                               "training_captions": int((used > 0).sum()), "longer_than_max_len": too_long[split],
                               "store_rows": len(results[split])}

    boxes = _write_instances(instances, partial, {s: [e[0].image_id for e in kept[s]] for s in SPLITS})
    write_json(partial / "vocab.json", {"words": vocab.words, "min_count": options.min_word_count,
                                        "counts": {w: counts[w] for w in vocab.words[4:]}})
    write_json(partial / "skipped.json", [{"reason": s.reason, "item": s.item} for s in skipped], indent=1)

    by_reason = Counter(s.reason for s in skipped)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(command) if command is not None else None,
        "source": {"format": dataset.format, "images_root": str(Path(dataset.images_root).resolve()),
                   "files": sources, "split_rule": dataset.split_rule,
                   "images": {split: _image_set_digest([e[1] for e in kept[split]]) for split in SPLITS}},
        "options": {k: v for k, v in asdict(options).items() if k not in ("progress", "overwrite")},
        "preprocessing": {
            "image": "captioning.data.transforms.load_image (EXIF orientation applied; grayscale, CMYK, palette, "
                     "alpha composited on white, 16-bit -> 8-bit RGB), then transforms.resize_square: bicubic "
                     f"resize to {options.image_size}x{options.image_size}, aspect ratio not kept; stored uint8. "
                     "Training applies transforms.preprocess to the stored image (its resize is then a no-op): "
                     "to_tensor and ImageNet mean/std normalisation",
            "captions": "non-ASCII normalised (NFKD, accents dropped, typographic quotes/dashes to ASCII, other "
                        "non-ASCII characters to spaces), whitespace collapsed; tokens: lowercase [a-z0-9]+('[a-z]+)? "
                        f"(captioning.vocab.tokenize); longer than {options.max_len} words: "
                        + ("truncated" if options.long_captions == "truncate" else "not used for training (kept as references)"),
        },
        "files": FILE_FORMATS,
        "counts": split_counts,
        "summary": {
            "images": sum(c["images"] for c in split_counts.values()),
            "captions": sum(c["captions"] for c in split_counts.values()),
            "vocabulary_size": len(vocab),
            "unknown_token_percent": unknown,
            "caption_length_histogram": _histogram(lengths),
            "caption_lengths": {str(n): c for n, c in sorted(lengths.items())},
            "skipped": dict(sorted(by_reason.items())),
            "converted": dict(sorted(converted.items())),
            "normalised_non_ascii_captions": dataset.normalised_captions,
            "images_with_boxes": boxes,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "versions": _versions(),
    }
    write_json(partial / "manifest.json", manifest, indent=2)
    return manifest


def _image_set_digest(results: list[dict]) -> dict[str, Any]:
    """Count, bytes and one sha256 over the images' own sha256s (per-image ones are in captions_*.json)."""
    digest = hashlib.sha256("".join(r["sha256"] for r in results).encode())
    return {"count": len(results), "bytes": sum(r["bytes"] for r in results), "sha256": digest.hexdigest()}


def _read_instances(paths: Sequence[Path], dataset: SourceDataset) -> tuple | None:
    """The --instances files pooled (formats.pool_instances), None without any. Boxes are stored by
    image id, so an instances image whose file name is not that of the dataset's image with its id is
    refused: the two files number the images differently, and the boxes would land on other images."""
    if not paths:
        return None
    pooled = pool_instances(paths)
    images = pooled[2]
    for img in dataset.images:
        name = images.get(img.image_id, {}).get("file_name")
        if isinstance(name, str) and PurePosixPath(name.replace("\\", "/")).name != Path(img.file_name).name:
            raise PrepareError(f"--instances {' '.join(map(str, paths))}: image {img.image_id} is {name} there but "
                               f"{img.file_name} in the captions ({dataset.split_rule}), so its boxes belong to "
                               "another image: pass instances files whose image ids are the captions' (a Karpathy "
                               "file needs 'cocoid' on every image)")
    return pooled


def _write_instances(pooled: tuple | None, partial: Path, ids: dict[str, list[int]]) -> dict[str, int] | None:
    if pooled is None:
        return None
    categories, annotations, images = pooled
    with_boxes = {}
    for split in SPLITS:
        wanted = set(ids[split])
        anns = [a for a in annotations if a["image_id"] in wanted]
        write_json(partial / f"instances_{split}.json",
                   {"images": [images[i] for i in ids[split] if i in images], "annotations": anns,
                    "categories": categories})
        with_boxes[split] = len({a["image_id"] for a in anns})
    return with_boxes


def _versions() -> dict[str, str]:
    import PIL

    versions = {"python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__}
    with contextlib.suppress(Exception):  # not installed as a distribution: no version of ours
        versions["show-attend-tell"] = importlib.metadata.version("show-attend-tell")
    return versions


def _finish(partial: Path, out: Path) -> None:
    """Drop the resume state, then make the folder appear under its name in one rename."""
    shutil.rmtree(partial / "chunks")
    for name in ("plan.json", "lock"):
        (partial / name).unlink(missing_ok=True)
    publish_folder(partial, out)  # replaces a folder given with --overwrite (checked before we started)


# ------------------------------------------------------------------------------------ summary


def format_summary(manifest: dict[str, Any], out: Path | str) -> str:
    """The human-readable summary printed at the end of a preparation."""
    s = manifest["summary"]
    lines = [f"prepared {out} ({manifest['source']['format']} format, {manifest['options']['image_size']}px, "
             f"{s['seconds']}s)",
             f"{'split':<6} {'images':>8} {'captions':>9} {'training':>9} {'>max_len':>9} {'unk %':>6}"]
    for split, c in manifest["counts"].items():
        lines.append(f"{split:<6} {c['images']:>8} {c['captions']:>9} {c['training_captions']:>9} "
                     f"{c['longer_than_max_len']:>9} {s['unknown_token_percent'][split]:>6.2f}")
    lines.append(f"vocabulary: {s['vocabulary_size']} ids (words with count >= {manifest['options']['min_word_count']} "
                 "in train, plus <pad> <start> <end> <unk>)")
    lines.append(f"caption length in words (max_len {manifest['options']['max_len']}, "
                 f"{manifest['options']['long_captions']}):")
    peak = max((n for _, n in s["caption_length_histogram"]), default=1) or 1
    for label, n in s["caption_length_histogram"]:
        lines.append(f"  {label:>6} {n:>8} {'#' * round(40 * n / peak)}")
    skipped = s["skipped"]
    lines.append("skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "nothing")
                 + (" (each one in skipped.json)" if skipped else ""))
    if s["converted"]:
        lines.append("converted to RGB: " + ", ".join(f"{k} {v}" for k, v in s["converted"].items()))
    if s["normalised_non_ascii_captions"]:
        lines.append(f"captions with non-ASCII text normalised: {s['normalised_non_ascii_captions']}")
    if s["images_with_boxes"] is not None:
        lines.append("images with boxes: " + ", ".join(f"{k} {v}" for k, v in s["images_with_boxes"].items()))
    return "\n".join(lines)

"""``captioning caption``: caption images with a trained checkpoint (also ``scripts/caption.py``).

    captioning caption --checkpoint runs/soft/best.ckpt photo.jpg photos/ "shots/*.png"
    captioning caption --checkpoint runs/soft/best.ckpt photos/ --json --heatmaps figures/
    captioning caption --checkpoint runs/soft/best.ckpt --from-split test --limit 4

Prints ``path<TAB>caption`` per image (``--json``: one JSON object per line). A file that cannot
be read is reported on stderr as one ``error: <path>: <reason>`` line and the others are still
captioned; the exit status is then 1. A missing or invalid checkpoint, or no image at all, is a
one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from captioning.console import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, UsageError, one_line, print_error, positive_int
from captioning.progress import Progress

#: File name endings taken from folders and globs (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and _is_image_name(p)), key=lambda p: p.name)


def expand_inputs(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Paths, folders (their image files, sorted) and globs -> (image paths, error messages).

    A file named explicitly is kept whatever its suffix (reading it decides); folders and globs
    contribute files with an image suffix (see IMAGE_EXTENSIONS). Duplicates are dropped.
    """
    paths: list[Path] = []
    errors: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                errors.append(f"{item}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif path.exists():
            paths.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            found = []
            for match in map(Path, matches):
                if match.is_dir():
                    found += _folder_images(match)
                elif match.is_file() and _is_image_name(match):
                    found.append(match)
            if not found:
                why = "matches no image files" if matches else "matches nothing"
                errors.append(f"{item}: {why}")
            paths += found
        else:
            errors.append(f"{item}: no such file or folder")
    return _unique(paths), errors


def _unique(paths: Sequence[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def image_error_reason(err: BaseException, path: Path | str) -> str:
    """A short reason for a file that could not be read (the path is printed separately)."""
    from captioning.data.transforms import ImageLoadError

    msg = one_line(err) or type(err).__name__
    prefix = f"cannot read image {path}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):] or "unreadable"
    elif msg == f"image file {path} does not exist":
        msg = "no such file"
    if not isinstance(err, ImageLoadError):
        msg = f"{type(err).__name__}: {msg}"
    return msg


def heatmap_path(folder: Path, source: Path | str, used: set[str]) -> Path:
    """``folder/<stem>.png``, with ``_2``, ``_3``... appended when the stem was used already."""
    stem = Path(source).stem or "image"
    name, n = stem, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name.lower())
    return folder / f"{name}.png"


def load_captioner(checkpoint: Path, device: str | None):
    """Captioner.from_checkpoint, with every failure turned into a UsageError."""
    from captioning.api import Captioner
    from captioning.checkpoint import CheckpointError

    try:
        return Captioner.from_checkpoint(checkpoint, device=device)
    except CheckpointError as err:
        raise UsageError(err) from None
    except ValueError as err:  # unavailable device
        raise UsageError(err) from None
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from None


def captioner_and_settings(args: argparse.Namespace):
    """The checkpoint's Captioner and the decoding settings of --max-len, --hard-mode, --beam-size."""
    captioner = load_captioner(args.checkpoint, args.device)
    try:
        return captioner, captioner.decode_settings(args.max_len, args.hard_mode, args.beam_size)
    except ValueError as err:
        raise UsageError(err) from None


def data_config(captioner, data_root: str | None):
    """The checkpoint's data config, with its root replaced if --data-root was given."""
    import dataclasses

    cfg = captioner.config.data
    return dataclasses.replace(cfg, root=str(data_root)) if data_root is not None else cfg


# ------------------------------------------------------------------------------------ caption


def caption_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Caption images with a trained Show, Attend and Tell checkpoint (greedy or beam search).",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE",
                   help="image files, folders (their image files, sorted) or globs such as 'shots/*.png'")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="best.ckpt or last.ckpt written by captioning train")
    p.add_argument("--heatmaps", type=Path, metavar="DIR",
                   help="write one attention figure (PNG) per image into DIR")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: path, caption, score, words, settings")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images decoded together (default: 32)")
    p.add_argument("--beam-size", type=positive_int, metavar="N",
                   help="beam width; 1 = greedy (default: the checkpoint's decode.beam_size)")
    p.add_argument("--max-len", type=positive_int, metavar="N",
                   help="most words per caption (default: the checkpoint's decode.max_len)")
    p.add_argument("--hard-mode", choices=["expected", "argmax", "sample"],
                   help="how a hard-attention model attends (default: the checkpoint's decode.hard_mode)")
    p.add_argument("--from-split", choices=["train", "val", "test"], metavar="SPLIT",
                   help="also caption images of this split of the checkpoint's dataset")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="with --from-split: only the first N images of the split")
    p.add_argument("--data-root", metavar="DIR",
                   help="with --from-split: dataset root instead of the checkpoint's data.root")
    return p


def split_paths(captioner, split: str, limit: int | None, data_root: str | None) -> list[Path]:
    """Image files of a split of the checkpoint's dataset (generated first if synthetic)."""
    from captioning.data.coco import AnnotationError
    from captioning.data.datamodule import CaptionDataModule

    try:
        data = CaptionDataModule(data_config(captioner, data_root), captioner.vocab)
        data.prepare_data()
        records = data.load_split(split)
    except (AnnotationError, ValueError, OSError) as err:
        raise UsageError(f"cannot read the {split} split of the checkpoint's dataset: {err}") from None
    return [Path(r.path) for r in records[:limit]]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the caption command; returns the exit status (0 ok, 1 some images failed, 2 nothing done)."""
    parser = caption_parser(prog)
    args = parser.parse_args(argv)
    if args.limit is not None and args.from_split is None:
        parser.error("--limit needs --from-split")
    if args.data_root is not None and args.from_split is None:
        parser.error("--data-root needs --from-split")
    try:
        return _run_caption(args)
    except UsageError as err:
        print_error(err)
        return EXIT_USAGE


def _run_caption(args: argparse.Namespace) -> int:
    import torch

    captioner, settings = captioner_and_settings(args)

    paths, input_errors = expand_inputs(args.inputs)
    for message in input_errors:
        print_error(message)
    if args.from_split:
        paths = _unique(paths + split_paths(captioner, args.from_split, args.limit, args.data_root))
    if not paths:
        raise UsageError("no images to caption (give image files, folders or globs, or --from-split)")

    from captioning.visualization import save_attention_figure

    failed = len(input_errors)
    used_names: set[str] = set()
    progress = Progress(len(paths), "caption", enabled=len(paths) > args.batch_size)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        loaded = []  # (path, original RGB image, tensor)
        for path in chunk:
            try:
                image = captioner.open(path)
                loaded.append((path, image, captioner.preprocess(image)))
            except Exception as err:  # one bad file never stops the others
                print_error(f"{path}: {image_error_reason(err, path)}")
                failed += 1
        if loaded:
            captions = captioner.caption_tensors(
                torch.stack([t for _, _, t in loaded]), [str(p) for p, _, _ in loaded],
                settings["max_len"], settings["hard_mode"], settings["beam_size"],
            )
            for (path, image, _), cap in zip(loaded, captions):
                if args.json:
                    print(json.dumps({"path": cap.source, "caption": cap.text, "score": cap.score,
                                      "words": cap.words, "settings": settings}))
                else:
                    print(f"{cap.source}\t{cap.text}")
                if args.heatmaps is not None:
                    target = heatmap_path(args.heatmaps, path, used_names)
                    try:
                        save_attention_figure(target, image, cap.words, cap.attention, title=cap.text)
                    except (OSError, ValueError) as err:
                        print_error(f"{path}: cannot write attention figure {target}: {one_line(err)}")
                        failed += 1
            sys.stdout.flush()
        progress.update(len(chunk))
    progress.close()
    if failed and progress.enabled:  # many images: the error lines may have scrolled away
        print(f"caption: {failed} input(s) failed; see the error lines above", file=sys.stderr, flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


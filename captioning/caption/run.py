"""``captioning caption``: caption images with a trained checkpoint (also ``scripts/caption.py``).

    captioning caption --checkpoint runs/soft/best.ckpt photo.jpg photos/ "shots/*.png"
    captioning caption --checkpoint runs/soft/best.ckpt photos/ --json --heatmaps figures/
    captioning caption --checkpoint runs/soft/best.ckpt --from-split test --limit 4
    captioning caption --checkpoint runs/soft/best.ckpt photo.jpg --beam-size 5 --n-best 3 --json
    captioning caption --checkpoint runs/soft/best.ckpt photo.jpg --temperature 0.8 --top-k 10 --seed 0
    captioning caption --model exported/soft photo.jpg                  # a model folder (PyTorch)
    captioning caption --engine onnx --model exported/soft photo.jpg    # ONNX Runtime, no torch

Prints ``path<TAB>caption`` per image (``--n-best K``: K lines ``path<TAB>caption<TAB>score``, best
first, the others' captions indented by two spaces; ``--json``: one JSON object per line,
``--with-attention`` adds each word's attention); a caption cut at ``--max-len`` words gets one
more field, ``(cut at --max-len N)`` (JSON: ``"cut": true``). One line on stderr says what the
model was trained on: a model trained on the synthetic set says that it describes every image as
coloured shapes, unless every image is from that set. A tab, newline or backslash in a path is
written as ``\\t``, ``\\n``, ``\\\\``, so each image is one line. An image smaller than 16 pixels on
a side gets a note on stderr: upscaled, it shows too little for its caption to mean much. A file
that cannot be read is reported on stderr as one ``error: <path>: <reason>`` line and the others
are still captioned; the exit status is then 1. A missing or invalid checkpoint, or no image at
all, is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from captioning.config import HARD_MODES
from captioning.console import EXIT_OK, EXIT_SOME_FAILED, UsageError, main_of, one_line, positive_int, print_error
from captioning.data.coco import SPLITS
from captioning.progress import Progress

#: File name endings taken from folders and globs (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_images(folder: Path, errors: list[str]) -> list[Path]:
    """The image files of ``folder``, sorted; every entry with an image suffix that is not a
    readable file (a link to nothing, a FIFO, a socket, a device, a folder) is named in ``errors``."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as err:
        errors.append(f"{folder}: cannot list the folder ({err.strerror or err})")
        return []
    found: list[Path] = []
    for path in entries:
        if _is_image_name(path):
            _keep(path, found, errors)
    return found


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, or None when it is a regular file."""
    import stat

    from captioning.files import kind_of

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a link to nothing" if path.is_symlink() else "no such file"
    except OSError as err:
        return err.strerror or str(err)
    return None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not an image file"


def expand_inputs(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Paths, folders (their image files, sorted) and globs -> (image paths, error messages).

    A file named explicitly is kept whatever its suffix (reading it decides); folders and globs
    contribute files with an image suffix (see IMAGE_EXTENSIONS). Duplicates are dropped.
    """
    paths: list[Path] = []
    errors: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir() or (not path.exists() and any(ch in item for ch in "*?[")):
            matches = [path] if path.is_dir() else list(map(Path, sorted(glob.glob(item, recursive=True))))
            found, bad = [], []
            for match in matches:
                if match.is_dir():
                    found += _folder_images(match, bad)
                elif _is_image_name(match):
                    _keep(match, found, bad)
            paths += found
            errors += bad
            if found or bad:
                continue
            if path.is_dir():
                errors.append(f"{item}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            else:
                errors.append(f"{item}: {'matches no image files' if matches else 'matches nothing'}")
        elif path.exists():
            _keep(path, paths, errors, item)
        else:
            errors.append(f"{item}: no such file or folder")
    return _unique(paths), errors


def _keep(path: Path, found: list[Path], errors: list[str], name: str | None = None) -> None:
    """``path`` into ``found`` when it is a regular file, else why not into ``errors``."""
    why = _not_a_file(path)
    if why is None:
        found.append(path)
    else:
        errors.append(f"{name or path}: {why}")


def _unique(paths: Sequence[Path]) -> list[Path]:
    first: dict[str, Path] = {}
    for path in paths:
        first.setdefault(os.path.normcase(os.path.abspath(path)), path)
    return list(first.values())


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


def claim_figure_folder(folder: Path) -> None:
    """--heatmaps writes only into a new or empty folder, or one it marked before: the figures
    are named after the images, so a folder holding the images themselves would lose them."""
    from captioning.files import ForeignFolderError, claim_folder

    try:
        claim_folder(folder, "figures", "--heatmaps", "write attention figures")
    except (ForeignFolderError, OSError) as err:  # OSError: FileWriteError, one line
        raise UsageError(str(err)) from None


def load_captioner(checkpoint: Path, device: str | None):
    """Captioner.load (a checkpoint or a model folder), with every failure turned into a UsageError."""
    from captioning.api import Captioner

    try:
        return Captioner.load(checkpoint, device=device)
    except ValueError as err:  # a CheckpointError, or an unavailable device
        raise UsageError(err) from None
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {err}") from None


def decoding_options(args: argparse.Namespace) -> dict:
    """--beam-size, --max-len, --hard-mode, --n-best, --temperature, --top-k, --min-len and --no-unk
    as the keyword arguments of an engine's ``options`` (checked there: captioning.search.DecodeOptions)."""
    return {"beam_size": args.beam_size, "max_len": args.max_len, "hard_mode": args.hard_mode,
            "n_best": getattr(args, "n_best", 1), "temperature": args.temperature, "top_k": args.top_k,
            "min_len": args.min_len, "no_unk": args.no_unk}


def add_decoding_options(p: argparse.ArgumentParser, n_best: bool = True) -> None:
    """The decoding options shared by caption and evaluate (captioning/search.py); evaluate
    scores one caption per image, so it has no --n-best."""
    p.add_argument("--beam-size", type=positive_int, metavar="N",
                   help="beam width; 1 = greedy (default: the checkpoint's decode.beam_size)")
    p.add_argument("--max-len", type=positive_int, metavar="N",
                   help="most words per caption (default: the checkpoint's decode.max_len)")
    p.add_argument("--hard-mode", choices=HARD_MODES,
                   help="how a hard-attention model attends (default: the checkpoint's decode.hard_mode)")
    if n_best:
        p.add_argument("--n-best", type=positive_int, default=1, metavar="K",
                       help="the K best captions of each image (beam search widens to K; with sampling, K draws)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sample each word from softmax(logits / T), T from 0.01 to 100, instead of searching "
                        "(beam size 1)")
    p.add_argument("--top-k", type=positive_int, metavar="K", help="sample among the K most likely words only")
    p.add_argument("--min-len", type=int, default=0, metavar="N", help="no <end> before N words (default: 0)")
    p.add_argument("--no-unk", action="store_true", help="never emit <unk>")


def captioner_and_options(args: argparse.Namespace):
    """The checkpoint's Captioner and the DecodeOptions of the command line's decoding flags."""
    captioner = load_captioner(args.checkpoint, args.device)
    try:
        return captioner, captioner.options(**decoding_options(args))
    except ValueError as err:
        raise UsageError(err) from None


def data_config(captioner, data_root: str | None):
    """The checkpoint's data config, with its root replaced if --data-root was given. Without it,
    the root is the training's own (relative to the folder it ran in): the synthetic set is never
    generated in the current folder (captioning/data/sources.py SyntheticSource.check_trained)."""
    import dataclasses

    from captioning.data.sources import source_for

    cfg = captioner.config.data
    if data_root is not None:
        return dataclasses.replace(cfg, root=str(data_root))
    try:
        source_for(cfg).check_trained()
    except ValueError as err:
        raise UsageError(err) from None
    return cfg


# ------------------------------------------------------------------------------------ caption


def seed_number(text: str) -> int:
    """--seed: a whole number both engines take (captioning.engine.SEED_RANGE)."""
    from captioning.engine import SEED_RANGE, checked_seed

    try:
        return checked_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, "
                                         f"got {text!r}") from None


def caption_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Caption images with a trained Show, Attend and Tell checkpoint (greedy or beam search).")
    p.add_argument("inputs", nargs="*", metavar="IMAGE",
                   help="image files, folders (their image files, sorted) or globs such as 'shots/*.png'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="best.ckpt or last.ckpt written by captioning train (or a model folder)")
    source.add_argument("--model", type=Path, metavar="DIR",
                        help="a model folder written by captioning export (or Captioner.save_pretrained)")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="torch (default), or onnx: the folder's ONNX graphs under ONNX Runtime, without "
                        "PyTorch (needs --model DIR written by 'captioning export --format onnx')")
    p.add_argument("--heatmaps", type=Path, metavar="DIR",
                   help="write one attention figure (PNG) per image into DIR")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: path, caption, score, words, cut (true when the caption "
                        "reached --max-len without ending), settings, training_data")
    p.add_argument("--with-attention", action="store_true",
                   help="with --json: each caption's attention too, one grid per word ([words][grid][grid])")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu); --engine torch "
                                    "only")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images decoded together (default: 32)")
    add_decoding_options(p)
    p.add_argument("--seed", type=seed_number, metavar="S",
                   help="make sampling (words, and hard attention's sample mode) repeatable; S from 0 to "
                        "4294967295")
    p.add_argument("--from-split", choices=SPLITS, metavar="SPLIT",
                   help="also caption images of this split of the checkpoint's dataset")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="with --from-split: only the first N images of the split")
    p.add_argument("--data-root", metavar="DIR",
                   help="with --from-split: dataset root instead of the checkpoint's data.root")
    return p


def split_paths(captioner, split: str, limit: int | None, data_root: str | None) -> list[Path]:
    """Image files of a split of the checkpoint's dataset (the synthetic set generated first, in the
    training's data folder, if missing)."""
    from captioning.data.datamodule import CaptionDataModule

    try:
        data = CaptionDataModule(data_config(captioner, data_root), captioner.vocab)
        data.prepare_data()
        records = data.load_split(split)
    except (ValueError, OSError) as err:  # an AnnotationError too
        raise UsageError(f"cannot read the {split} split of the checkpoint's dataset: {err}") from None
    return [Path(r.path) for r in records[:limit]]


TINY_SIDE = 16  # pixels; a smaller image is mostly interpolation once resized to the model's input


def tsv_field(text: str) -> str:
    """``text`` with backslash, tab, newline and carriage return escaped: one field of one line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def cut_mark(cap, max_len: int) -> str:
    """The plain output's last field for a caption cut at the length limit, else nothing: the
    caption's own field stays the caption's words."""
    return "" if cap.ended else f"\t(cut at --max-len {max_len})"


def caption_fields(cap, with_attention: bool) -> dict:
    """One caption's JSON fields; ``cut`` is true when it reached max_len words without <end>."""
    fields = {"caption": cap.text, "score": cap.score, "words": cap.words, "cut": not cap.ended}
    if with_attention:  # [words][grid][grid], 5 decimals: a float32's noise beyond them says nothing
        fields["attention"] = [[[round(float(v), 5) for v in row] for row in grid] for grid in cap.attention]
    return fields


def fewer_reason(found: int, options) -> str:
    """Why fewer captions than --n-best came back for an image (captioning/search.py search)."""
    if options.method == "sample":
        return (f"{found} distinct caption(s) of the {options.n_best} asked: the other draws repeated a caption "
                "already drawn, and repeats are dropped (a higher --temperature varies them more)")
    return (f"{found} caption(s) of the {options.n_best} asked: the beam search found no more that end within "
            f"--max-len {options.max_len} words (a wider --beam-size or a larger --max-len finds more)")


def onnx_engine_and_options(args: argparse.Namespace):
    """The ONNX engine of --model and the DecodeOptions of the decoding flags (imports no torch)."""
    from captioning.export.runtime import OnnxCaptioner

    try:
        engine = OnnxCaptioner(args.model)
        return engine, engine.options(**decoding_options(args))
    except ValueError as err:  # an OnnxModelError too
        raise UsageError(err) from None


def run(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``captioning caption`` with ``argv``; -> 0, or 1 when some images failed. Raises UsageError (nothing done)."""
    parser = caption_parser(prog)
    args = parser.parse_args(argv)
    onnx = args.engine == "onnx"
    for wrong, message in (
            (args.limit is not None and args.from_split is None, "--limit needs --from-split"),
            (args.data_root is not None and args.from_split is None, "--data-root needs --from-split"),
            (args.with_attention and not args.json,
             "--with-attention adds the attention to --json lines: give --json too"),
            (onnx and args.model is None,
             "--engine onnx needs --model DIR (written by 'captioning export --format onnx')"),
            (onnx and args.from_split, "--from-split reads the checkpoint's dataset with PyTorch's loader: it needs "
                                       "--engine torch"),
            (onnx and args.device is not None, "--device places PyTorch's model: it needs --engine torch (the ONNX "
                                               "engine runs on the CPU)")):
        if wrong:
            parser.error(message)
    args.checkpoint = args.checkpoint or args.model
    captioner, options = (onnx_engine_and_options if onnx else captioner_and_options)(args)
    settings = captioner.record(options)

    paths, input_errors = expand_inputs(args.inputs)
    for message in input_errors:
        print_error(message)
    if args.from_split:
        paths = _unique(paths + split_paths(captioner, args.from_split, args.limit, args.data_root))
    if not paths:
        raise UsageError("no images to caption (give image files, folders or globs, or --from-split)")

    from captioning.engine import batch_seed
    from captioning.visualization import save_attention_figure

    if args.heatmaps is not None:
        claim_figure_folder(args.heatmaps)
    # What the model knows, said once: a synthetic-trained model names shapes in any photo.
    note = captioner.note_for([str(p) for p in paths])
    print(note or f"model: trained on {captioner.trained_on}", file=sys.stderr, flush=True)
    failed = len(input_errors)
    used_names: set[str] = set()
    progress = Progress(len(paths), "caption", enabled=len(paths) > args.batch_size)
    for i, start in enumerate(range(0, len(paths), args.batch_size)):
        chunk = paths[start:start + args.batch_size]
        loaded = []  # (path, original RGB image, tensor)
        for path in chunk:
            try:
                image = captioner.open(path)
                loaded.append((path, image, captioner.preprocess(image)))
                if min(image.size) < TINY_SIDE:
                    print(f"note: {path} is {image.width}x{image.height} pixels, upscaled to {captioner.image_size}x"
                          f"{captioner.image_size}: its caption says little about it", file=sys.stderr, flush=True)
            except Exception as err:  # one bad file never stops the others
                print_error(f"{path}: {image_error_reason(err, path)}")
                failed += 1
        if loaded:
            # Each batch draws with its own seed, seed + its number, as Captioner.caption seeds them.
            captions = captioner.caption_tensors(captioner.stack([t for _, _, t in loaded]),
                                                 [str(p) for p, _, _ in loaded], options,
                                                 seed=batch_seed(args.seed, i))
            for (path, image, _), cap in zip(loaded, captions):
                shown = [cap, *cap.alternatives]
                if args.json:
                    row = {"path": cap.source, **caption_fields(cap, args.with_attention), "settings": settings,
                           "training_data": captioner.training_data}
                    if cap.alternatives:
                        row["alternatives"] = [caption_fields(a, args.with_attention) for a in cap.alternatives]
                    print(json.dumps(row))
                elif options.n_best > 1:  # every caption with its score, best first, the others indented
                    for i, alt in enumerate(shown):
                        print(f"{tsv_field(cap.source)}\t{'  ' if i else ''}{alt.text}\t{alt.score:.4f}"
                              f"{cut_mark(alt, options.max_len)}")
                else:
                    print(f"{tsv_field(cap.source)}\t{cap.text}{cut_mark(cap, options.max_len)}")
                if len(shown) < options.n_best:
                    print(f"note: {path}: {fewer_reason(len(shown), options)}", file=sys.stderr, flush=True)
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


main = main_of(run)

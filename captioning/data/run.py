"""Prepare a caption dataset once into a folder that training reads fast; benchmark its loader.

    # COCO with Karpathy's splits (dataset_coco.json; images in /data/coco/{train2014,val2014}/)
    captioning prepare --format karpathy --captions dataset_coco.json --images /data/coco \\
        --instances instances_train2014.json instances_val2014.json --out prepared/coco
    # COCO official captions, Karpathy-style split: seeded 5,000 val / 5,000 test / rest train ...
    captioning prepare --format coco --captions captions_train2014.json captions_val2014.json \\
        --images /data/coco --out prepared/coco-official
    # ... or from files of image ids (one per line; images listed nowhere else go to train)
    captioning prepare --format coco --captions captions_train2014.json captions_val2014.json \\
        --images /data/coco --splits val=val_ids.txt test=test_ids.txt --out prepared/coco-official
    # one COCO-format captions file per split (a user's own dataset, or the synthetic folder)
    captioning prepare --format coco --captions train=a/train.json val=a/val.json test=a/test.json \\
        --images a --out prepared/mine
    # Flickr8k (Flickr_8k.{train,dev,test}Images.txt are found beside the token file) / Flickr30k
    captioning prepare --format flickr8k --captions Flickr8k.token.txt --images Flicker8k_Dataset \\
        --out prepared/flickr8k
    captioning prepare --format karpathy --captions dataset_flickr30k.json \\
        --images flickr30k-images --out prepared/flickr30k

    # then: captioning train --config configs/coco_soft.yaml --data prepared/coco
    captioning prepare --benchmark prepared/coco --workers 0 1 4   # training loader, images/s
    captioning prepare --make-example data/example --num-images 500  # a generated dataset

The folder's files and formats are described in captioning/data/prepare.py (and in its own
manifest.json); the input formats in captioning/data/formats.py. Progress (rate, ETA) goes to
stderr, the summary to stdout. An interrupted run resumes when run again with the same command.
Exit status 2 with one ``error:`` line when the input is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from captioning.console import (CaptioningError, UsageError, as_flag, interruptible, main_of, option_set_outside,
                                positive_int, positive_number, whole_number)
from captioning.data.coco import SPLITS, AnnotationError
from captioning.data.formats import FORMATS, SourceDataset, detect_format
from captioning.data.prepare import PrepareError, PrepareOptions, available_cores, format_summary, prepare
from captioning.files import atomic_write_json, partial_name, result_file_problem


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("what to do (default: prepare)")
    mode.add_argument("--benchmark", type=Path, metavar="PREPARED_DIR",
                      help="measure the training DataLoader alone on a prepared folder, in images/s")
    mode.add_argument("--make-example", type=Path, metavar="DIR",
                      help="write a generated dataset (JPEGs + a captions file) to DIR, to try preparation on")
    src = p.add_argument_group("source")
    src.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                     help=", ".join(f"{n} ({f.help})" for n, f in FORMATS.items()) + "; default: told apart by content")
    src.add_argument("--captions", nargs="+", metavar="FILE",
                     help="captions file(s); coco also takes SPLIT=FILE, one per split")
    src.add_argument("--images", type=Path, metavar="DIR", help="images root (see formats.py for each format's layout)")
    src.add_argument("--instances", nargs="+", type=Path, default=[], metavar="FILE",
                     help="COCO instances_*.json: boxes of the kept images are stored for grounding metrics")
    src.add_argument("--splits", nargs="+", default=[], metavar="SPLIT=FILE",
                     help="split lists (image ids or file names, one per line); without train=, train is "
                          "every image listed nowhere else")
    src.add_argument("--split-seed", type=int, default=0, help="seeded split when there are no lists (default 0)")
    src.add_argument("--val-size", type=whole_number(0), default=5000, help="seeded split: val images (default 5000)")
    src.add_argument("--test-size", type=whole_number(0), default=5000, help="seeded split: test images (default 5000)")
    out = p.add_argument_group("preparation")
    out.add_argument("--out", type=Path, metavar="DIR", help="the prepared folder to write")
    out.add_argument("--image-size", type=int, default=224, help="stored S x S; data.image_size must equal it (224)")
    out.add_argument("--min-word-count", type=int, default=5, help="vocabulary: train-split words seen this often (5)")
    out.add_argument("--max-len", type=int, default=30, help="words per training caption (30)")
    out.add_argument("--long-captions", choices=("truncate", "drop"), default="truncate",
                     help="captions over --max-len: truncate (default) or drop from training (kept as references)")
    out.add_argument("--workers", type=whole_number(0), nargs="+", metavar="N",
                     help="preparation: processes (default: every core); --benchmark: DataLoader worker "
                          "counts to measure (default: 0 1 <cores>)")
    out.add_argument("--chunk-size", type=int, default=64, help="images per task and resume marker (64)")
    out.add_argument("--strict", action="store_true", help="fail on the first skipped record")
    out.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    out.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    bench = p.add_argument_group("--benchmark")
    bench.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (32)")
    bench.add_argument("--captions-per-image", type=positive_int, default=1,
                       help="captions per image (1, configs/coco_*.yaml)")
    bench.add_argument("--seconds", type=positive_number, default=10.0, help="seconds per measurement (10)")
    bench.add_argument("--compare-files", action="store_true",
                       help="also measure decoding the source image files every time (no prepared store)")
    bench.add_argument("--threads", type=positive_int, metavar="N",
                       help="torch intra-op threads of the main process, which does the work with 0 workers "
                            "(default: torch's own; workers always use 1)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the measurements as JSON")
    ex = p.add_argument_group("--make-example")
    ex.add_argument("--num-images", type=positive_int, default=500)
    ex.add_argument("--example-size", type=positive_int, default=256, help="side of the generated JPEGs (256)")
    ex.add_argument("--example-format", choices=list(FORMATS), default="karpathy")
    return p.parse_args(argv)


#: The options each mode reads; any other one given is refused (check_mode), not silently ignored.
MODE_OPTIONS = {
    "--benchmark": {"benchmark", "workers", "batch_size", "captions_per_image", "seconds", "compare_files", "threads",
                    "json", "no_progress"},
    "--make-example": {"make_example", "num_images", "example_size", "example_format"},
    "prepare": {"format", "captions", "images", "instances", "splits", "split_seed", "val_size", "test_size", "out",
                "image_size", "min_word_count", "max_len", "long_captions", "workers", "chunk_size", "strict",
                "overwrite", "no_progress"},
}


def check_mode(args: argparse.Namespace) -> str:
    """'--benchmark', '--make-example' or 'prepare'; an option the mode does not read is a UsageError."""
    modes = [flag for flag, value in (("--benchmark", args.benchmark), ("--make-example", args.make_example))
             if value is not None]
    if len(modes) > 1:
        raise UsageError("--benchmark and --make-example are alternatives: run them one at a time")
    mode = modes[0] if modes else "prepare"
    given = option_set_outside(args, parse_args([]), MODE_OPTIONS[mode])
    if given:
        owner = next((m for m, names in MODE_OPTIONS.items() if given in names), "prepare")
        what = "preparing (no --benchmark or --make-example)" if owner == "prepare" else owner
        raise UsageError(f"{as_flag(given)} applies to {what} only; {'preparing' if mode == 'prepare' else mode} "
                         "does not read it: leave it out")
    return mode


def _split_items(items: list[str], what: str) -> dict[str, Path]:
    pairs = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or split not in SPLITS:
            raise AnnotationError(f"{what} entry '{item}' must look like train=FILE, val=FILE or test=FILE")
        if split in pairs:  # one would be dropped: which the user meant is a guess
            raise AnnotationError(f"{what} names the {split} split twice ({split}={pairs[split]} and {item}): "
                                  "give one file per split")
        pairs[split] = Path(path)
    return pairs


def read_source(args: argparse.Namespace) -> SourceDataset:
    """The --format reader (formats.FORMATS) on --captions/--images, with splits assigned."""
    if not args.captions or args.images is None:
        raise AnnotationError("preparing needs --captions FILE and --images DIR (and --out DIR)")
    if not args.images.is_dir():
        raise AnnotationError(f"images folder {args.images} does not exist; pass the folder the captions file's "
                              "image paths are relative to")
    per_split = all("=" in c for c in args.captions)
    if any("=" in c for c in args.captions) and not per_split:
        raise AnnotationError("--captions takes either plain files or SPLIT=FILE entries, not both")
    files = list(_split_items(args.captions, "--captions").items()) if per_split else [(None, Path(c)) for c in args.captions]
    seen: dict[Path, Path] = {}
    for _, path in files:  # read twice, every caption of the file would be a reference twice
        if path.resolve() in seen:
            raise AnnotationError(f"--captions gives {seen[path.resolve()]} twice (as {path}): give each captions "
                                  "file once")
        seen[path.resolve()] = path
    fmt = args.format if args.format != "auto" else detect_format(files[0][1])
    return FORMATS[fmt].read(files, _split_items(args.splits, "--splits"), args)


def run_prepare(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    if args.out is None:
        raise AnnotationError("preparing needs --out DIR, the prepared folder to write")
    if args.workers is not None and len(args.workers) != 1:
        raise AnnotationError("--workers takes one number when preparing (processes; 0 = every core)")
    if not args.no_progress:
        print(f"prepare: reading {', '.join(args.captions)}", file=sys.stderr, flush=True)
    dataset = read_source(args)
    if not args.no_progress:
        sizes = {s: sum(img.split == s for img in dataset.images) for s in SPLITS}
        print(f"prepare: {dataset.format} format, {len(dataset.images)} images with captions "
              f"({', '.join(f'{s} {n}' for s, n in sizes.items())}), {len(dataset.skipped)} records skipped "
              f"so far; splits: {dataset.split_rule}", file=sys.stderr, flush=True)
    options = PrepareOptions(image_size=args.image_size, min_word_count=args.min_word_count, max_len=args.max_len,
                             long_captions=args.long_captions, workers=(args.workers or [0])[0],
                             chunk_size=args.chunk_size, strict=args.strict, overwrite=args.overwrite,
                             progress=not args.no_progress)
    command = ["captioning", "prepare", *(argv if argv is not None else sys.argv[1:])]
    manifest = prepare(dataset, args.out, options, args.instances, command=command)
    print(format_summary(manifest, args.out))
    return manifest


def json_file_problem(path: Path) -> str | None:
    """Why --json ``path`` may not be written (files.result_file_problem, or a missing folder), or None."""
    if not path.is_symlink() and not path.parent.is_dir():
        return f"--json {path}: the folder {path.parent} does not exist; create it or choose another --json"
    return result_file_problem(path, "--json", lambda data: isinstance(data, list) and bool(data) and all(
        isinstance(r, dict) and "images_per_s" in r for r in data), "a loader benchmark written by captioning prepare",
        "loader.json")


def run_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.json is not None and (problem := json_file_problem(args.json)):
        raise PrepareError(problem)  # before the measurements, which take a while
    import torch

    from captioning.data.datamodule import benchmark_loader

    workers = args.workers or [0, 1, available_cores()]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"loader benchmark on {args.benchmark}: batch {args.batch_size} images x {args.captions_per_image} "
          f"captions, {args.seconds:.0f}s per setting, {available_cores()} CPU cores, main process "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", flush=True)
    settings = dict(batch_size=args.batch_size, captions_per_image=args.captions_per_image, seconds=args.seconds,
                    progress=not args.no_progress)
    rows = benchmark_loader(args.benchmark, workers, **settings)
    if args.compare_files:
        rows += benchmark_loader(args.benchmark, workers, **settings, source="files")
    print("\n| source | workers | images/s | first batch after |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['workers']} | {r['images_per_s']:.0f} | {r['startup_s']:.2f} s |")
    if args.json:
        atomic_write_json(args.json, rows)
    return rows


def make_example(args: argparse.Namespace) -> Path:
    """--make-example: the generated dataset, in a folder of its own (a folder of the user's files is
    never written into: its images/img_1.jpg kept)."""
    from captioning.data.examples import write_example_dataset
    from captioning.files import check_no_links, claim_folder

    claim_folder(args.make_example, "example", "--make-example", "write the example dataset")
    check_no_links(args.make_example, ["images", *FORMATS[args.example_format].example_files], "--make-example")
    captions, images = write_example_dataset(args.make_example, args.num_images, image_size=args.example_size,
                                             fmt=args.example_format)
    print(f"wrote {args.num_images} images and {captions}; prepare them with:\n  captioning prepare "
          f"--format {args.example_format} --captions {captions} --images {images} --out prepared/example")
    return captions


def run(argv: list[str] | None = None, prog: str | None = None) -> Any:
    """``captioning prepare`` with ``argv``; -> what it wrote. Raises a CaptioningError (bad input: status
    2), or Interrupted saying that <out>.partial keeps the finished chunks."""
    args = parse_args(argv, prog)
    if args.out is not None and args.out.name in ("", ".", ".."):  # the folder itself is replaced, so it needs a name
        raise UsageError(f"--out {args.out} names no folder of its own: give the prepared folder's name, such as "
                         f"{args.out / 'prepared'}")
    left = None if args.out is None else \
        f"{partial_name(args.out)} keeps the finished chunks: run the same command again to resume"
    with interruptible(left):
        try:
            mode = check_mode(args)
            if mode == "--benchmark":
                return run_benchmark(args)
            if mode == "--make-example":
                return make_example(args)
            return run_prepare(args, argv)
        except CaptioningError:
            raise
        except (ValueError, OSError) as err:  # raised by code that is not ours: one line too
            raise PrepareError(err) from None


main = main_of(run)

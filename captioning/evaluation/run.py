"""Score a trained checkpoint on a split of its dataset, or another system's results file, with the
COCO caption metrics (and attention grounding where the dataset has boxes).

    captioning evaluate --checkpoint runs/soft/best.ckpt --split test --beam-size 5
    captioning evaluate --checkpoint runs/hard/best.ckpt --split val --hard-mode argmax
    captioning evaluate --checkpoint runs/soft/best.ckpt --devices 2     # 2 processes
    captioning evaluate --checkpoint runs/soft/best.ckpt --metrics bleu   # fast: no METEOR
    captioning evaluate --results their_results.json --annotations captions_val2014.json

Checkpoint mode: the model and the dataset's location come from the checkpoint alone. Each image
of the split is decoded once (batched; over --devices N processes, gathered and de-duplicated by
image id) and scored against all of its references, plus caption_accuracy on the synthetic
dataset and grounding (pointing_game, mass_in_box, grounding_words) whenever the dataset has boxes
(annotations/instances_<split>.json, or --instances FILE). Writes predictions_<split>.json (COCO
results format) and metrics_<split>.json to --out-dir (default: <checkpoint folder>/eval).

Results mode: scores [{"image_id", "caption"}] against a COCO captions file (no decoding, no
grounding: a results file has no attention); writes metrics_<results name>.json to --out-dir
(default: the results file's folder if an evaluation wrote it, else its eval/ subfolder).
--out-dir must be new, empty, or a folder an evaluation wrote: anyone else's is refused. Every score is on the 0-100 scale ("scale": "0-100").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from captioning.caption.run import add_decoding_options, captioner_and_options, data_config
from captioning.console import UsageError, as_flag, interruptible, main_of, one_line, option_set_outside, positive_int
from captioning.files import ForeignFolderError, atomic_write_json, claim_folder, folder_kind
from captioning.data.coco import SPLITS, write_results
from captioning.evaluation import metrics
from captioning.progress import format_duration

#: The options scoring a results file reads; every other one is refused there (check_mode).
RESULTS_OPTIONS = ("checkpoint", "results", "annotations", "out_dir", "metrics", "tokenizer")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, metavar="CKPT",
                   help="best.ckpt or last.ckpt written by captioning train")
    p.add_argument("--results", type=Path, metavar="FILE",
                   help='instead of a checkpoint: captions to score, [{"image_id": int, "caption": str}, ...]')
    p.add_argument("--annotations", type=Path, metavar="FILE",
                   help="with --results: the COCO captions file holding the references (captions_*.json)")
    p.add_argument("--split", choices=SPLITS, help="default: test")
    p.add_argument("--out-dir", type=Path,
                   help="a new or empty folder, or one an evaluation wrote (default: <checkpoint folder>/eval, "
                        "or the results file's eval/ subfolder)")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="images decoded together (default: the checkpoint's data.eval_batch_size)")
    p.add_argument("--metrics", nargs="+", choices=list(metrics.SCORERS), default=list(metrics.DEFAULT_METRICS),
                   help="default: bleu meteor rouge cider (METEOR starts Java, ~10 s)")
    add_decoding_options(p, n_best=False)
    p.add_argument("--tokenizer", choices=["auto", "ptb", "simple"], default="auto",
                   help="caption tokenizer for scoring: ptb (official, Java), simple, or auto (default)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--devices", type=positive_int, default=1, metavar="N",
                   help="decode in N processes (CPU processes, or GPUs 0..N-1 with cuda); default 1")
    p.add_argument("--data-root", metavar="DIR", help="dataset root instead of the checkpoint's data.root")
    p.add_argument("--instances", type=Path, metavar="FILE",
                   help="COCO instances file with the split's boxes for grounding (default: "
                        "<data root>/annotations/instances_<split>.json, or a prepared folder's, if it exists)")
    return p.parse_args(argv)


def check_mode(args: argparse.Namespace) -> str:
    """'checkpoint' or 'results'; a wrong combination of options is a UsageError."""
    if args.checkpoint is not None and args.results is not None:
        raise UsageError("--checkpoint and --results are alternatives: decode and score a split, "
                         "or score an existing results file")
    if args.results is not None:
        if args.annotations is None:
            raise UsageError("--results needs --annotations FILE, the COCO captions file with the references "
                             "(e.g. captions_val2014.json)")
        given = option_set_outside(args, parse_args([]), RESULTS_OPTIONS)
        if given:
            raise UsageError(f"{as_flag(given)} applies to --checkpoint only: a results file is scored as it is")
        return "results"
    if args.annotations is not None:
        raise UsageError("--annotations goes with --results FILE (scoring an existing results file); "
                         "a checkpoint takes its references from its own dataset")
    if args.checkpoint is None:
        raise UsageError("give --checkpoint CKPT (decode and score a split) or --results FILE --annotations FILE "
                         "(score existing captions)")
    return "checkpoint"


def _writable(out_dir: Path, chosen: bool = False) -> Path:
    """--out-dir as an evaluation folder: new, empty, or one an evaluation wrote (its marker);
    anyone else's folder is refused before any work. ``chosen``: the folder is the default, not
    one the user named, so a link there (eval/ of a run folder) leads somewhere nobody chose."""
    if chosen and out_dir.is_symlink():
        raise UsageError(f"{out_dir} is a link ({os.readlink(out_dir)}): show-attend-tell writes nothing through a "
                         "link; pass --out-dir to name the folder to write")
    try:
        return claim_folder(out_dir, "evaluation", "--out-dir", "write results")
    except (ForeignFolderError, OSError) as err:
        raise UsageError(err) from None


def _write(write, path: Path, obj) -> None:
    """``write(path, obj)``; an OSError (a missing folder, a full disk) is a UsageError."""
    try:
        write(path, obj)
    except OSError as err:
        raise UsageError(err) from None


def _reason(err: BaseException) -> str:
    """One line; a DataLoader worker's error keeps only the original exception's last line."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else type(err).__name__
    return one_line(text) or type(err).__name__


def _score(predictions: dict[int, str], references: dict, scenes, args: argparse.Namespace):
    from captioning.evaluation.evaluator import evaluate_predictions

    print(f"evaluate: scoring {len(predictions)} captions ({', '.join(args.metrics)})", file=sys.stderr, flush=True)
    try:
        return evaluate_predictions(predictions, references, scenes, args.metrics, args.tokenizer)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"scoring failed: {_reason(err)}") from None


def _device_type(args: argparse.Namespace, captioner) -> str:
    """The device kind each of --devices N processes decodes on."""
    kind = captioner.device.type
    if args.devices > 1:
        if kind not in ("cpu", "cuda"):
            raise UsageError(f"--devices {args.devices} runs on CPU processes or CUDA GPUs, not {kind}")
        if kind == "cuda":
            import torch

            if args.device not in (None, "cuda"):
                raise UsageError(f"--device {args.device} names one GPU; with --devices N pass --device cuda "
                                 "(processes use GPUs 0..N-1) or --device cpu")
            if torch.cuda.device_count() < args.devices:
                raise UsageError(f"--devices {args.devices} needs {args.devices} GPUs, found "
                                 f"{torch.cuda.device_count()}; pass --device cpu for CPU processes")
    return kind


def _load_grounding(args: argparse.Namespace, data, split: str, image_ids: list[int]):
    """The split's boxes (Instances) or None when the dataset has none."""
    from captioning.evaluation.grounding import load_instances

    path = args.instances or data.source.instances(split)
    if args.instances is None and not path.is_file():
        return None
    instances = load_instances(path)
    if not any(i in instances.sizes for i in image_ids):
        raise UsageError(f"{path} holds none of the {len(image_ids)} images of the {split} split: "
                         "pass the instances file of this split with --instances FILE")
    return instances


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    from captioning.data.datamodule import CaptionDataModule
    from captioning.data.transforms import ImageLoadError
    from captioning.evaluation.evaluator import decode_distributed, decode_split, score_record
    from captioning.evaluation.grounding import score_grounding

    captioner, options = captioner_and_options(args)
    settings = captioner.record(options)
    device_type = _device_type(args, captioner)
    split = args.split or "test"
    cfg = data_config(captioner, args.data_root)
    # Decode on demand (no in-memory cache of the whole split), batch size as asked.
    cfg = dataclasses.replace(cfg, cache_images=False, eval_batch_size=args.batch_size or cfg.eval_batch_size)
    try:
        data = CaptionDataModule(cfg, captioner.vocab)
        data.prepare_data()
        records = data.load_split(split)
        references = data.references(split)
        scenes = data.scenes(split)
    except (ValueError, OSError) as err:  # an AnnotationError too
        raise UsageError(f"cannot read the {split} split of the checkpoint's dataset: {_reason(err)}") from None
    if not records:
        raise UsageError(f"the {split} split of {data.root} has no images: nothing to evaluate"
                         + (" (try --split val)" if split == "test" else ""))
    out_dir = _writable(args.out_dir or args.checkpoint.parent / "eval", args.out_dir is None)  # before the decoding
    instances = _load_grounding(args, data, split, [r.image_id for r in records])
    matcher = instances.matcher() if instances is not None else None

    print(f"evaluate: {args.checkpoint}, {split} split of {data.root}: {len(records)} images, "
          f"{settings['attention']} attention, {settings['method']} (beam {settings['beam_size']}), max_len {settings['max_len']}"
          + (f", hard_mode {settings['hard_mode']}" if settings["hard_mode"] else "")
          + (f", {args.devices} {device_type} processes" if args.devices > 1 else "")
          + f"; trained on {captioner.trained_on}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    duplicates = 0
    try:
        if args.devices > 1:
            decoded, duplicates = decode_distributed(args.checkpoint, device_type, data, split, options,
                                                     matcher=matcher, world=args.devices)
        else:
            decoded = decode_split(captioner, data, split, options, matcher=matcher)
    except (ImageLoadError, OSError, RuntimeError) as err:
        raise UsageError(_reason(err)) from None
    decode_seconds = time.perf_counter() - started
    predictions = {image_id: item.caption for image_id, item in decoded.items()}
    print(f"decoded: {len(predictions)} images, one caption each (the {split} split has {len(records)})"
          + (f"; {duplicates} duplicate decodes dropped" if duplicates else ""))
    if set(predictions) != set(references) or len(predictions) != len(records):
        raise UsageError(f"{split}: decoded {len(predictions)} images but the split has {len(records)}")

    values, report = _score(predictions, references, scenes, args)
    grounding = None
    if instances is not None:
        grounding = score_grounding({i: item.named for i, item in decoded.items()}, instances,
                                    options.hard_mode or "expected")
        values.update(grounding.metrics())
    for line in summary_lines(values, f"{split} split, {len(predictions)} images", captioner.trained_on):
        print(line)
    print(metrics.format_metrics_table(values, title="the full table:"))
    for note in report.notes() + (grounding.notes() if grounding else ["grounding: not computed (no boxes: "
                                                                        "the dataset has no instances file)"]):
        print(note)
    predictions_file = out_dir / f"predictions_{split}.json"
    metrics_file = out_dir / f"metrics_{split}.json"
    _write(write_results, predictions_file, predictions)
    results = {
        "split": split, **score_record(values, report, len(predictions), percent=True), "decode": settings,
        "grounding": ({**grounding.describe(scale=100.0), "instances": instances.path,
                       "words_to_classes": matcher.name} if grounding else None),
        "devices": args.devices, "checkpoint": str(args.checkpoint), "training_data": captioner.training_data,
    }
    _write(atomic_write_json, metrics_file, results)
    print(f"decoded in {format_duration(decode_seconds)} ({len(predictions) / max(decode_seconds, 1e-9):.1f} "
          f"images/s), scored in {format_duration(report.seconds)}")
    print(f"wrote {predictions_file} and {metrics_file}")
    return results


def _results_out_dir(results: Path) -> Path:
    """The default --out-dir of results mode: the results file's folder when an evaluation wrote it,
    else its eval/ subfolder (the project writes into no folder of anyone else's)."""
    try:
        ours = folder_kind(results.parent) == "evaluation"
    except ForeignFolderError:  # a marker that is not the project's own: not an evaluation folder
        ours = False
    return results.parent if ours else results.parent / "eval"


#: The caption metrics the summary leads with (x100), before the full table.
SUMMARY_METRICS = (("bleu_4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"),
                   ("caption_accuracy", "caption accuracy"))


def summary_lines(values: dict, title: str, trained_on: str | None = None) -> list[str]:
    """The few lines evaluate leads with: the caption metrics, then grounding by word kind, each
    beside what a uniform attention map scores on the same words (the reference that says whether
    a number is good: a pointing game of 2 is poor against a uniform 9, 70 is strong)."""
    def x100(key: str) -> str:
        value = values.get(key)
        return "n/a" if not isinstance(value, (int, float)) or value != value else f"{100 * value:.2f}"

    shown = [f"{name} {x100(key)}" for key, name in SUMMARY_METRICS if key in values]
    lines = [f"summary: {title}" + (f"; the model was trained on {trained_on}" if trained_on else ""),
             f"  captions (x100): {', '.join(shown)}"]
    if "grounding_words" not in values:
        return lines + ["  grounding: not computed (no boxes)"]
    from captioning.evaluation.grounding import KIND_NAMES

    lines.append("  grounding (x100), the model vs a uniform attention map on the same words:")
    for suffix, name in (("", "object nouns"), *((f"_{k}", v) for k, v in KIND_NAMES.items())):
        words = values.get(f"grounding_words{suffix}") or 0
        if not words:
            lines.append(f"    {name} (0 words): n/a")
            continue
        lines.append(f"    {name} ({words} words): pointing game {x100('pointing_game' + suffix)} vs "
                     f"{x100('uniform_pointing_game' + suffix)}, mass in box {x100('mass_in_box' + suffix)} vs "
                     f"{x100('uniform_mass_in_box' + suffix)}")
    return lines


def evaluate_results(args: argparse.Namespace) -> dict:
    from captioning.data.coco import load_coco_captions, load_results
    from captioning.evaluation.evaluator import score_record

    predictions = load_results(args.results)
    records = load_coco_captions(args.annotations, args.annotations.parent)  # image files are not read
    references = {r.image_id: list(r.captions) for r in records}
    out_dir = _writable(args.out_dir or _results_out_dir(args.results), args.out_dir is None)
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise UsageError(f"{len(unknown)} image id(s) of {args.results} have no reference caption in "
                         f"{args.annotations} ({shown}): is this the captions file of the same split?")
    print(f"results: {len(predictions)} images, one caption each, of the {len(references)} images with "
          f"captions in {args.annotations}")
    if len(predictions) < len(references):
        print(f"warning: {args.results} covers {len(predictions)} of the {len(references)} images; the scores "
              f"(CIDEr's document frequencies too) are over those {len(predictions)} only", file=sys.stderr)
    values, report = _score(predictions, {i: references[i] for i in predictions}, None, args)
    for line in summary_lines(values, f"{args.results.name}, {len(predictions)} images"):
        print(line)
    print(metrics.format_metrics_table(values, title="the full table:"))
    for note in report.notes() + ["grounding: not computed (a results file has no attention maps)"]:
        print(note)
    metrics_file = out_dir / f"metrics_{args.results.stem}.json"
    results = {
        "results": str(args.results), "annotations": str(args.annotations),
        "num_annotated_images": len(references), **score_record(values, report, len(predictions), percent=True),
    }
    _write(atomic_write_json, metrics_file, results)
    print(f"wrote {metrics_file}")
    return results


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``captioning evaluate`` with ``argv``; -> what it wrote, as a dict. Raises UsageError, or Interrupted."""
    args = parse_args(argv, prog)
    started = time.perf_counter()
    with interruptible("files already written are whole"):
        results = evaluate_checkpoint(args) if check_mode(args) == "checkpoint" else evaluate_results(args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


main = main_of(run)

#!/usr/bin/env python
"""Score a trained checkpoint on a split of its dataset with the COCO caption metrics.

    python scripts/evaluate.py --checkpoint runs/soft/best.ckpt --split test
    python scripts/evaluate.py --checkpoint runs/hard/best.ckpt --split val --hard-mode argmax
    python scripts/evaluate.py --checkpoint runs/soft/best.ckpt --metrics bleu    # fast: no METEOR

The model and the dataset's location come from the checkpoint alone. Each image of the split is
greedy-decoded once (batched) and scored against all of its references (plus caption_accuracy on
the synthetic dataset). Writes predictions_{split}.json (COCO results format) and
metrics_{split}.json (0-1 scale) to --out-dir (default: <checkpoint folder>/eval).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from captioning.cli import (EXIT_USAGE, Progress, UsageError, data_config, format_duration, load_captioner,
                            one_line, positive_int, print_error)

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="best.ckpt or last.ckpt written by scripts/train.py")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    p.add_argument("--out-dir", type=Path, help="default: <checkpoint folder>/eval")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="images decoded together (default: the checkpoint's data.eval_batch_size)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=["bleu", "meteor", "rouge", "cider"],
                   help="default: bleu meteor rouge cider (METEOR starts Java, ~10 s)")
    p.add_argument("--hard-mode", choices=["expected", "argmax", "sample"],
                   help="how a hard-attention model attends (default: the checkpoint's decode.hard_mode)")
    p.add_argument("--beam-size", type=positive_int, metavar="N",
                   help="beam width; 1 = greedy (default: the checkpoint's decode.beam_size)")
    p.add_argument("--max-len", type=positive_int, metavar="N",
                   help="most words per caption (default: the checkpoint's decode.max_len)")
    p.add_argument("--tokenizer", choices=["auto", "ptb", "simple"], default="auto",
                   help="caption tokenizer for scoring: ptb (official, Java), simple, or auto (default)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--data-root", metavar="DIR", help="dataset root instead of the checkpoint's data.root")
    return p.parse_args(argv)


def _reason(err: BaseException) -> str:
    """One line; a DataLoader worker's error keeps only the original exception's last line."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else type(err).__name__
    return one_line(text) or type(err).__name__


def evaluate(args: argparse.Namespace) -> dict:
    from captioning.data.coco import AnnotationError
    from captioning.data.datamodule import CaptionDataModule
    from captioning.data.transforms import ImageLoadError
    from captioning.evaluation.evaluator import evaluate_predictions
    from captioning.evaluation.metrics import format_metrics_table

    captioner = load_captioner(args.checkpoint, args.device)
    try:
        settings = captioner.decode_settings(args.max_len, args.hard_mode, args.beam_size)
    except ValueError as err:
        raise UsageError(err) from None
    split = args.split
    cfg = data_config(captioner, args.data_root)
    # Decode on demand (no in-memory cache of the whole split), batch size as asked.
    cfg = dataclasses.replace(cfg, cache_images=False, eval_batch_size=args.batch_size or cfg.eval_batch_size)
    try:
        data = CaptionDataModule(cfg, captioner.vocab)
        data.prepare_data()
        records = data.load_split(split)
        references = data.references(split)
        scenes = data.scenes(split)
    except (AnnotationError, ValueError, OSError) as err:
        raise UsageError(f"cannot read the {split} split of the checkpoint's dataset: {_reason(err)}") from None
    if not records:
        raise UsageError(f"the {split} split of {data.root} has no images")

    print(f"evaluate: {args.checkpoint}, {split} split of {data.root}: {len(records)} images, "
          f"{settings['attention']} attention, {settings['method']} (beam {settings['beam_size']}), max_len {settings['max_len']}"
          + (f", hard_mode {settings['hard_mode']}" if settings["hard_mode"] else ""), file=sys.stderr, flush=True)
    predictions: dict[int, str] = {}
    progress = Progress(len(records), f"evaluate {split}")
    try:
        for batch in data.eval_dataloader(split):  # one item per image of the split
            captions = captioner.caption_tensors(batch["images"], None, settings["max_len"], settings["hard_mode"],
                                                settings["beam_size"])
            for image_id, cap in zip(batch["image_ids"].tolist(), captions):
                predictions[image_id] = cap.text
            progress.update(len(captions))
    except (ImageLoadError, OSError) as err:
        raise UsageError(_reason(err)) from None
    decode_seconds = progress.elapsed
    if set(predictions) != set(references) or len(predictions) != len(records):
        raise UsageError(f"{split}: decoded {len(predictions)} images but the split has {len(records)}")

    print(f"evaluate: scoring {len(predictions)} captions ({', '.join(args.metrics)})", file=sys.stderr, flush=True)
    try:
        values, report = evaluate_predictions(predictions, references, scenes, args.metrics, args.tokenizer)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"scoring failed: {_reason(err)}") from None

    print(format_metrics_table(values, title=f"{split} split, {len(predictions)} images"))
    for note in report.notes():
        print(note)
    out_dir = args.out_dir or args.checkpoint.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_file = out_dir / f"predictions_{split}.json"
    metrics_file = out_dir / f"metrics_{split}.json"
    predictions_file.write_text(json.dumps(
        [{"image_id": image_id, "caption": caption} for image_id, caption in sorted(predictions.items())], indent=1))
    results = {
        "split": split, "num_images": len(predictions), "scale": "0-1", "tokenizer": report.tokenizer,
        "skipped": dict(report.skipped), "decode": settings, "metrics": values,
        "checkpoint": str(args.checkpoint),
    }
    metrics_file.write_text(json.dumps(results, indent=2))
    print(f"decoded in {format_duration(decode_seconds)} ({len(predictions) / max(decode_seconds, 1e-9):.1f} "
          f"images/s), scored in {format_duration(report.seconds)}")
    print(f"wrote {predictions_file} and {metrics_file}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        results = evaluate(args)
    except UsageError as err:
        print_error(err)
        raise SystemExit(EXIT_USAGE) from None
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


if __name__ == "__main__":
    main()

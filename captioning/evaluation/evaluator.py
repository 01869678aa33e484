"""Evaluating captions: decoding a split (in one process or N), the official metrics, the synthetic
checker, grounding, and the 0-100 reporting scale.

Over N processes (``decode_distributed``, a Lightning Trainer's ``predict`` under DDP) each process
decodes every N-th image, and the captions are gathered and de-duplicated by image id (first rank
wins, :func:`gather_by_image_id`, as the test split's at the end of training) before any corpus
metric; the caller checks that their count equals the split's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

from captioning.console import OperationFailed, one_line
from captioning.evaluation.grounding import NamedWord, WordMatcher, named_words
from captioning.evaluation.metrics import COUNT_KEYS, ScoreReport, score_details

if TYPE_CHECKING:
    from captioning.api import Captioner
    from captioning.data.datamodule import CaptionDataModule
    from captioning.search import DecodeOptions

#: What evaluate.py's metrics JSON says of its 0-100 scale.
SCALE_NOTE = ("every score x100 (CIDEr-D is natively 0-10, so x100 it can exceed 100, as on the COCO "
              "leaderboard); grounding_words is a count")


def evaluate_predictions(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    scenes: Mapping | None = None,
    metrics: Sequence[str] = ("bleu",),
    tokenizer: str = "auto",
) -> tuple[dict[str, float], ScoreReport]:
    """-> ({metric: value on the 0-1 scale}, how it was computed); with synthetic ``scenes`` also
    ``caption_accuracy``, the share of captions the generator's checker finds exactly true."""
    report = score_details(predictions, references, metrics, tokenizer)
    values = dict(report.scores)
    if scenes is not None:
        from captioning.evaluation.caption_check import caption_accuracy

        values["caption_accuracy"] = caption_accuracy(predictions, scenes)
    return values, report


# ------------------------------------------------------------------------------ reporting


def score_record(values: Mapping[str, float | int | None], report: ScoreReport, num_images: int,
                 percent: bool) -> dict:
    """The part of every results record that says what was scored and how, on the 0-100 scale of
    the printed tables (``percent``, captioning evaluate: every score x100, CIDEr-D too; counts and
    None as they are) or the 0-1 scale of the training logs."""
    scale = {"scale": "0-100", "scale_note": SCALE_NOTE} if percent else {"scale": "0-1"}
    return {"num_images": num_images, **scale, "tokenizer": report.tokenizer, "skipped": dict(report.skipped),
            "metrics": {k: float(v) * 100.0 if percent and k not in COUNT_KEYS and v is not None else v
                        for k, v in values.items()}}


# ------------------------------------------------------------------------------ decoding


class DecodedImage(NamedTuple):
    caption: str
    named: list[NamedWord]  # its words that name an object class, with their attention ([] if none)


def decode_batch(captioner: "Captioner", batch: dict, options: "DecodeOptions",
                 matcher: WordMatcher | None) -> dict[int, DecodedImage]:
    """One batch of a split's loader: image_id -> caption and its naming words' attention
    (``matcher`` None skips the naming words)."""
    captions = captioner.caption_tensors(batch["images"], None, options)
    return {image_id: DecodedImage(cap.text, [] if matcher is None else named_words(cap.words, cap.attention, matcher))
            for image_id, cap in zip(batch["image_ids"].tolist(), captions)}


def decode_split(captioner: "Captioner", data: "CaptionDataModule", split: str, options: "DecodeOptions", *,
                 matcher: WordMatcher | None = None) -> dict[int, DecodedImage]:
    """Decode a split in this process: image_id -> caption and its naming words' attention
    (``options`` from ``Captioner.options``; ``matcher`` None skips the naming words)."""
    from captioning.progress import Progress

    loader = data.eval_dataloader(split)  # one item per image of the split
    bar = Progress(len(loader.dataset), f"evaluate {split}")
    decoded: dict[int, DecodedImage] = {}
    for batch in loader:
        decoded.update(decode_batch(captioner, batch, options, matcher))
        bar.update(len(batch["image_ids"]))
    bar.close()
    return decoded


def gather_by_image_id(local: Mapping[int, object]) -> tuple[dict[int, object], int]:
    """Every rank's ``image_id -> item``, gathered to all ranks and de-duplicated by image id
    (a DistributedSampler pads the last batch with repeats): -> (merged, duplicates dropped).
    Outside a process group (one process) the local items themselves."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(local), 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(local))
    merged: dict[int, object] = {}
    for part in parts:  # rank order: the first rank's item wins
        for image_id, item in part.items():
            merged.setdefault(image_id, item)
    return merged, sum(len(part) for part in parts) - len(merged)


def decode_distributed(checkpoint: str | Path, device_type: str, data: "CaptionDataModule", split: str,
                       options: "DecodeOptions", *, matcher: WordMatcher | None,
                       world: int) -> tuple[dict[int, DecodedImage], int]:
    """Decode a split in ``world`` processes, a Lightning Trainer's ``predict`` under DDP
    (captioning/training/module.py SplitDecoding; process r uses cuda:r with ``device_type``
    "cuda"): -> (predictions de-duplicated by image id, duplicates dropped). Raises RuntimeError
    with the first failing process's error."""
    import pickle
    import tempfile

    from pytorch_lightning.strategies import DDPStrategy

    from captioning.training.module import SplitDecoding
    from captioning.training.trainer import Trainer, quiet_lightning

    with tempfile.TemporaryDirectory(prefix="evaluate-ddp-") as tmp, quiet_lightning():
        out_path = Path(tmp) / "gathered.pkl"
        try:
            # gloo on GPUs too: only Python objects travel, and spawned processes run from any caller.
            strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo")
            trainer = Trainer(accelerator=device_type, devices=world, strategy=strategy, logger=False,
                              use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False)
            trainer.predict(SplitDecoding(str(checkpoint), data, split, options, matcher, str(out_path)),
                            return_predictions=False)
        except Exception as err:  # a process died (killed, crashed)
            # Once process 0 has written the gather, every process had given its part: a process
            # that dies after it (a C++ destructor can abort at the interpreter's exit) loses nothing.
            if not out_path.is_file():
                raise OperationFailed(f"a decoding process failed: {one_line(err)[-300:]}") from None
        error, gathered = pickle.loads(out_path.read_bytes())  # written by our own process 0 just now
    if error is not None:
        raise OperationFailed(error)
    return gathered

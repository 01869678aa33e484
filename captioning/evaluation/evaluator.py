"""Evaluating captions: decoding a split (in one process or N), the official metrics, the synthetic
checker, grounding, results files of other systems, and the 0-100 reporting scale.

Decoding over N processes (``decode_distributed``): each process takes every N-th image of the
split (disjoint shards, so no padding and no image decoded twice), decodes its shard, and the
shards are gathered with ``torch.distributed.all_gather_object`` (gloo, also for GPUs: only
Python objects travel). The merged predictions are de-duplicated by image id (first rank wins)
before any corpus metric, and the caller checks that their count equals the split's.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

from captioning.evaluation.grounding import NamedWord, WordMatcher, named_words
from captioning.evaluation.metrics import COUNT_KEYS, ScoreReport, score_details

if TYPE_CHECKING:
    from captioning.api import Captioner
    from captioning.config import DataConfig
    from captioning.data.datamodule import CaptionDataModule
    from captioning.search import DecodeOptions

#: The reporting scale of evaluate.py's metrics JSON and table.
SCALE = "0-100"
SCALE_NOTE = ("every score x100 (CIDEr-D is natively 0-10, so x100 it can exceed 100, as on the COCO "
              "leaderboard); grounding_words is a count")
def evaluate_predictions(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    scenes: Mapping | None = None,
    metrics: Sequence[str] = ("bleu",),
    tokenizer: str = "auto",
) -> tuple[dict[str, float], ScoreReport]:
    """-> ({metric: value on the 0-1 scale}, how it was computed).

    ``caption_accuracy`` is added when synthetic ``scenes`` are given: the fraction of captions
    the generator's own checker finds exactly true of the scene.
    """
    report = score_details(predictions, references, metrics, tokenizer)
    values = dict(report.scores)
    if scenes is not None:
        from captioning.evaluation.caption_check import caption_accuracy

        values["caption_accuracy"] = caption_accuracy(predictions, scenes)
    return values, report


# ------------------------------------------------------------------------------ reporting


def to_percent(values: Mapping[str, float | int | None]) -> dict[str, float | int | None]:
    """0-1 scores -> the 0-100 scale (CIDEr-D x100 too); counts and None stay as they are."""
    return {k: v if k in COUNT_KEYS or v is None else float(v) * 100.0 for k, v in values.items()}


def score_record(values: Mapping[str, float | int | None], report: ScoreReport, num_images: int,
                 percent: bool) -> dict:
    """The part of every results record that says what was scored and how: validation and test
    during training keep the 0-1 scale of the training logs (``percent`` False); the metrics files
    of ``captioning evaluate`` the 0-100 scale of the printed tables (``percent`` True)."""
    scale = {"scale": SCALE, "scale_note": SCALE_NOTE} if percent else {"scale": "0-1"}
    return {"num_images": num_images, **scale, "tokenizer": report.tokenizer, "skipped": dict(report.skipped),
            "metrics": to_percent(values) if percent else dict(values)}


# ------------------------------------------------------------------------------ results files


# ------------------------------------------------------------------------------ decoding


class DecodedImage(NamedTuple):
    caption: str
    named: list[NamedWord]  # its words that name an object class, with their attention ([] if none)


def shard_indices(count: int, rank: int, world: int) -> list[int]:
    """Every world-th index from rank: disjoint shards covering 0..count-1 exactly once."""
    return list(range(rank, count, world))


def decode_split(captioner: "Captioner", data: "CaptionDataModule", split: str, options: "DecodeOptions", *,
                 matcher: WordMatcher | None = None, rank: int = 0, world: int = 1,
                 progress: bool = True) -> dict[int, DecodedImage]:
    """Decode this rank's shard of a split: image_id -> caption and its naming words' attention.

    ``options``: from ``Captioner.options``; ``matcher`` None skips the naming words.
    """
    from torch.utils.data import DataLoader, Subset

    from captioning.progress import Progress

    loader = data.eval_dataloader(split)  # one item per image of the split
    if world > 1:
        indices = shard_indices(len(loader.dataset), rank, world)
        loader = DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size, shuffle=False,
                            collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    total = len(loader.dataset)
    label = f"evaluate {split}" + (f" (rank 0 of {world}, its shard)" if world > 1 else "")
    bar = Progress(total, label, enabled=progress)
    decoded: dict[int, DecodedImage] = {}
    for batch in loader:
        captions = captioner.caption_tensors(batch["images"], None, options)
        for image_id, cap in zip(batch["image_ids"].tolist(), captions):
            named = named_words(cap.words, cap.attention, matcher) if matcher is not None else []
            decoded[image_id] = DecodedImage(cap.text, named)
        bar.update(len(captions))
    bar.close()
    return decoded


def merge_shards(parts: Sequence[Mapping[int, DecodedImage]]) -> tuple[dict[int, DecodedImage], int]:
    """Gathered shards -> (one entry per image id, the first rank's; number of duplicates dropped)."""
    merged: dict[int, DecodedImage] = {}
    dropped = 0
    for part in parts:
        for image_id, item in part.items():
            if image_id in merged:
                dropped += 1
            else:
                merged[image_id] = item
    return merged, dropped


def gather_by_image_id(local: Mapping[int, object]) -> tuple[dict[int, object], int]:
    """Every rank's ``image_id -> item``, gathered to all ranks and de-duplicated by image id
    (a DistributedSampler pads the last batch with repeats): -> (merged, duplicates dropped).
    Outside a process group (one process) the local items themselves."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(local), 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(local))
    return merge_shards(parts)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode_worker(rank: int, world: int, port: int, checkpoint: str, device_type: str, data_cfg: "DataConfig",
                   split: str, options: "DecodeOptions", matcher: WordMatcher | None, out_path: str) -> None:
    """One process of :func:`decode_distributed`. Errors travel through the gather, so no rank is
    left waiting in a collective for a rank that failed."""
    import torch
    import torch.distributed as dist

    if device_type == "cpu":  # N processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=60))
    try:
        try:
            from captioning.api import Captioner
            from captioning.data.datamodule import CaptionDataModule

            device = f"cuda:{rank}" if device_type == "cuda" else device_type
            captioner = Captioner.from_checkpoint(checkpoint, device=device)
            data = CaptionDataModule(data_cfg, captioner.vocab)  # the parent prepared the data
            part: tuple = ("ok", decode_split(captioner, data, split, options, matcher=matcher, rank=rank, world=world,
                                              progress=rank == 0))
        except Exception as err:  # reported by the parent as one line
            part = ("error", f"rank {rank}: {type(err).__name__}: {' '.join(str(err).split())}")
        parts: list = [None] * world
        dist.all_gather_object(parts, part)
        if rank == 0:
            Path(out_path).write_bytes(pickle.dumps(parts))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: a C++ destructor there can abort the process
    # ("terminate called without an active exception", no Python frame left) after the results
    # were written, and the parent would report a failed evaluation. Everything is written above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def decode_distributed(checkpoint: str | Path, device_type: str, data_cfg: "DataConfig", split: str,
                       options: "DecodeOptions", *, matcher: WordMatcher | None,
                       world: int) -> tuple[dict[int, DecodedImage], int]:
    """Decode a split in ``world`` processes (torch.multiprocessing spawn, gloo process group):
    -> (predictions de-duplicated by image id, duplicates dropped). ``device_type`` "cpu" or
    "cuda" (process r uses cuda:r). Raises RuntimeError with the first failing rank's error."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="evaluate-ddp-") as tmp:
        out_path = Path(tmp) / "gathered.pkl"
        try:
            mp.spawn(_decode_worker, nprocs=world, join=True,
                     args=(world, _free_port(), str(checkpoint), device_type, data_cfg, split, options, matcher,
                           str(out_path)))
        except Exception as err:  # a process died outside the gather (killed, crashed)
            raise RuntimeError(f"a decoding process failed: {' '.join(str(err).split())[-300:]}") from None
        parts = pickle.loads(out_path.read_bytes())  # written by our own rank 0 just now
    errors = [message for status, message in parts if status == "error"]
    if errors:
        raise RuntimeError(errors[0])
    return merge_shards([shard for _, shard in parts])

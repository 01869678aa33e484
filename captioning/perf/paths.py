"""The teacher-forced training paths timed side by side in one process, alternating step by step:
the reference loop (captioning/models/decoder.py), the fused pass (captioning/fast.py), and the
fused pass without each of its tricks (docs/performance.md)::

    python -m captioning.perf.paths --attention soft --batch 32 --reps 10
    python -m captioning.perf.paths --attention soft --variants reference fast --port SG_DIR

``--port DIR`` adds the training step of the most-used public PyTorch port (DIR holds the
``models.py`` of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, not part of this project) on the
same grids and captions. A step is :func:`captioning.perf.benchmark.training_setup`'s at COCO sizes;
the variants share one model and optimizer and take turns, so a shared machine's load falls on all
alike. Medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from captioning import fast
from captioning.console import InvalidValue
from captioning.perf.benchmark import COCO, QUICK, Sizes, training_setup
from captioning.vocab import Vocabulary


# Trick -> the fused pass's arguments that leave it out (same maths, autograd's way).
TRICKS: dict[str, dict[str, Any]] = {"additive_by_hand": {"additive_by_hand": False}}
VARIANTS = ("reference", "fast", *(f"fast-without-{name}" for name in TRICKS))


@contextlib.contextmanager
def variant(module, name: str) -> Iterator[None]:
    """Within the block ``module`` trains on the path ``name`` (one of VARIANTS): its fused pass is
    swapped for the model's own loop ("reference"), or runs with a trick left out."""
    if name not in VARIANTS:
        raise InvalidValue(f"unknown variant '{name}'; choose one of {', '.join(VARIANTS)}")
    without = TRICKS[name.removeprefix("fast-without-")] if name.startswith("fast-without-") else {}
    fused = module.fused
    module.fused = None if name == "reference" else fast.FusedTrainingPass(module.model, **without)
    try:
        yield
    finally:
        module.fused = fused


def training_step_runner(sizes: Sizes, attention: str, batch: int):
    """-> (module, run, data): ``run()`` is one training step of ``module`` on ``data`` (grids and
    captions), in seconds."""
    module, data, _, optimise = training_setup(sizes, attention, batch, torch.device("cpu"))

    def run() -> float:
        start = time.perf_counter()
        module.training_loss(data)[0].loss.backward()
        optimise()
        return time.perf_counter() - start

    return module, run, data


def port_step_runner(port: Path, sizes: Sizes, data: dict) -> Callable[[], float]:
    """-> ``run()``: one training step, in seconds, of the port's ``DecoderWithAttention`` (from
    ``port``/models.py) as its train.py takes one -- forward, ``pack_padded_sequence`` and
    cross-entropy, the doubly stochastic term (alpha_c 1), gradients clamped to +-5, Adam -- on
    ``data``'s grids (as its [B, 14, 14, D] encoder output) and captions, at ``sizes``."""
    from torch.nn.utils.rnn import pack_padded_sequence

    spec = importlib.util.spec_from_file_location("port_models", Path(port) / "models.py")
    if spec is None or not (Path(port) / "models.py").is_file():
        raise InvalidValue(f"{port} holds no models.py (clone the port and pass its folder)")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(sizes.attention_dim, sizes.embed_dim, sizes.hidden_dim, sizes.vocab_size,
                                          sizes.feature_dim, sizes.dropout).train()
    optimizer = torch.optim.Adam(decoder.parameters())
    captions = data["captions"]
    lengths = (captions != Vocabulary.pad_id).sum(1, keepdim=True)  # <start> .. <end>
    side = int(sizes.locations ** 0.5)
    grids = data["images"].view(captions.shape[0], side, side, sizes.feature_dim)

    def run() -> float:
        start = time.perf_counter()
        scores, sorted_captions, decode_lengths, alphas, _ = decoder(grids, captions, lengths)
        scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
        targets = pack_padded_sequence(sorted_captions[:, 1:], decode_lengths, batch_first=True).data
        loss = torch.nn.functional.cross_entropy(scores, targets) + ((1.0 - alphas.sum(dim=1)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        for p in decoder.parameters():
            if p.grad is not None:
                p.grad.clamp_(-5.0, 5.0)
        optimizer.step()
        return time.perf_counter() - start

    return run


def compare(attention: str = "soft", batch: int = 32, reps: int = 10, variants: tuple[str, ...] = VARIANTS,
            sizes: Sizes = COCO, port: Path | None = None) -> dict[str, Any]:
    """Median captions/s of each variant (and the port's step, given its folder) over ``reps``
    alternating steps, after one warm-up each."""
    module, run, data = training_step_runner(sizes, attention, batch)
    runs = {name: run for name in variants}
    if port is not None:
        runs["port"] = port_step_runner(port, sizes, data)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 1):
        for name, step in runs.items():
            with variant(module, name) if name != "port" else contextlib.nullcontext():
                t = step()
            if rep:  # the first round warms every path up
                times[name].append(t)
    rates = {name: batch / statistics.median(ts) for name, ts in times.items()}
    result = {"attention": attention, "batch": batch, "reps": reps, "threads": torch.get_num_threads(),
              "captions_per_s": {name: round(r, 1) for name, r in rates.items()}}
    if "fast" in rates:
        result["fast_over"] = {name: round(rates["fast"] / r, 3) for name, r in rates.items() if name != "fast"}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", choices=["soft", "hard"], default="soft")
    p.add_argument("--batch", type=int, default=32, help="captions per step (one per image)")
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant, after one warm-up")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), to check the command")
    p.add_argument("--port", type=Path, metavar="DIR",
                   help="also time sgrvinod's port: DIR holds its models.py (soft attention only)")
    args = p.parse_args(argv)
    if args.port is not None and args.attention != "soft":
        p.error("--port: the port has soft attention only")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare(args.attention, args.batch, args.reps, tuple(args.variants), QUICK if args.quick else COCO,
                     args.port)
    if "port" in result["captions_per_s"]:
        result["over_port"] = {name: round(r / result["captions_per_s"]["port"], 2)
                               for name, r in result["captions_per_s"].items() if name != "port"}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from captioning.console import guarded  # its one-line errors and exit statuses, as every command's

    sys.exit(guarded(main))

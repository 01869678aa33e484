"""The teacher-forced training paths timed side by side, in one process, alternating step by step:
the reference loop (captioning/models/decoder.py), the fused pass (captioning/fast.py), and the
fused pass without each of its tricks (what each one buys, docs/performance.md)::

    python -m captioning.perf.paths --attention soft --batch 32 --reps 10

One training step is ``CaptioningModule.training_loss`` + backward + gradient clipping + the
module's Adam, from random annotation grids at COCO sizes (``benchmark.COCO``). The variants share
one model and optimizer and run in turn, so a shared machine's load falls on all of them alike;
the medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Iterator

import torch

from captioning import fast
from captioning.perf.benchmark import COCO, QUICK, Sizes, random_captions, training_module


# Trick -> the fast module's attributes that, replaced so, leave it out (same maths, autograd's way).
TRICKS: dict[str, dict[str, Any]] = {
    "additive_by_hand": {"_step_scorer": lambda score, keys: score.from_query},
}
VARIANTS = ("reference", "fast", *(f"fast-without-{name}" for name in TRICKS))


@contextlib.contextmanager
def variant(module, name: str) -> Iterator[None]:
    """Within the block ``module`` trains on the path ``name`` (one of VARIANTS): its fused pass is
    swapped for the model's own loop ("reference"), or runs with a trick left out."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant '{name}'; choose one of {', '.join(VARIANTS)}")
    patches = TRICKS[name.removeprefix("fast-without-")] if name.startswith("fast-without-") else {}
    saved = {attr: getattr(fast, attr) for attr in patches}
    fused = module.fused
    module.fused = None if name == "reference" else fast.FusedTrainingPass(module.model)
    try:
        for attr, value in patches.items():
            setattr(fast, attr, value)
        yield
    finally:
        for attr, value in saved.items():
            setattr(fast, attr, value)
        module.fused = fused


def training_step_runner(sizes: Sizes, attention: str, batch: int, seed: int = 0):
    """-> (module, run): ``run()`` is one training step of ``module``, in seconds."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    module = training_module(sizes, attention)
    module.model.encoder.stages = torch.nn.Sequential()  # grids are the input
    module.train()
    params = list(module.model.decoder.parameters())
    optimizer = module.configure_optimizers()
    data = {"images": torch.randn(batch, sizes.locations, sizes.feature_dim, generator=gen),
            "captions": random_captions(batch, sizes.vocab_size, sizes.min_tokens, sizes.max_tokens, gen)[0]}

    def run() -> float:
        start = time.perf_counter()
        module.training_loss(data)[0].loss.backward()
        torch.nn.utils.clip_grad_norm_(params, module.cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return module, run


def compare(attention: str = "soft", batch: int = 32, reps: int = 10, variants: tuple[str, ...] = VARIANTS,
            sizes: Sizes = COCO) -> dict[str, Any]:
    """Median captions/s of each variant over ``reps`` alternating steps (after one warm-up each)."""
    module, run = training_step_runner(sizes, attention, batch)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps + 1):
        for name in variants:
            with variant(module, name):
                t = run()
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare(args.attention, args.batch, args.reps, tuple(args.variants), QUICK if args.quick else COCO)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

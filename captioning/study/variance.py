"""The hard-attention estimator's gradient variance, measured directly, at checkpoints of one run.

    python -m captioning.study.variance RUN_DIR [--samples 4] [--draws 32] [--out FILE]

RUN_DIR is a hard-attention training folder trained with ``train.save_every_epoch`` (the study's
runs are): its fresh initialisation (its config and seed), ``epochs/epoch<N>.ckpt`` after the
first epoch, the middle one and the last. At each, one fixed training minibatch (the first of the
training split in file order: data.batch_size images, data.captions_per_image captions each) is
put through the training loss ``draws`` times with freshly sampled locations, every caption
sampling (no 0.5 substitution) and dropout off, so that the location draws are the only noise.
For each draw the gradient g of the whole loss (NLL, REINFORCE and entropy) over every trained
parameter is taken; the measure is the total variance sum_i Var(g_i) over draws (the trace of the
estimator's covariance), beside the squared norm of the mean gradient.

Two estimators on the same weights: one location sequence per caption with the moving-average
baseline b the checkpoint holds (the paper's), and ``--samples K`` sequences per caption with the
leave-one-out baseline (``loss.samples``). K independent one-draw estimates averaged have 1/K the
one-draw variance for K times the decoder work, so "variance ratio" > 1 means leave-one-out buys
more than the same compute spent on independent draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from captioning.config import merge
from captioning.files import atomic_write
from captioning.progress import Progress
from captioning.study.runs import StudyError


def _minibatch(cfg, vocab) -> dict:
    from captioning.data.datamodule import CaptionDataModule, collate_train

    data = CaptionDataModule(cfg.data, vocab)
    data.prepare_data()
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    torch.manual_seed(0)  # which captions of each image are drawn
    return collate_train([dataset[i] for i in range(cfg.data.batch_size)])


def _module(run_dir: Path, checkpoint: Path | None, samples: int):
    """The run's training module with ``checkpoint``'s weights and baseline (None: its initialisation)."""
    from captioning.checkpoint import checkpoint_config, read_checkpoint
    from captioning.config import to_dict
    from captioning.training.module import CaptioningModule

    source = read_checkpoint(checkpoint or run_dir / "best.ckpt")
    cfg, vocab = checkpoint_config(source, checkpoint or run_dir / "best.ckpt")
    if cfg.model.attention != "hard":
        raise StudyError(f"{run_dir} is a {cfg.model.attention}-attention run; the estimator is hard attention's")
    cfg = merge(cfg, {"loss": {"samples": samples}, "model": {"encoder": {"weights": "none"}}})
    torch.manual_seed(cfg.train.seed)  # the initialisation Lightning's seed_everything gives the run
    module = CaptioningModule(to_dict(cfg), list(vocab.words))
    if checkpoint is not None:
        module.load_state_dict(source["state_dict"])
    module.train()
    for layer in module.modules():  # the location draws alone make the noise
        if isinstance(layer, torch.nn.Dropout):
            layer.eval()
    return module, cfg, vocab, source.get("global_step", 0) if checkpoint else 0


def measure(module, batch: dict, samples: int, draws: int) -> dict:
    """Total variance and mean-gradient norm of the loss's gradient over ``draws`` location draws."""
    from captioning.models.attention import TrainingPlan

    params = [p for p in module.parameters() if p.requires_grad]
    plan = TrainingPlan("sample", None, samples)
    mean = M2 = None
    seconds = 0.0
    for r in range(draws):
        torch.manual_seed(r)
        start = time.perf_counter()
        terms, _ = module.training_loss(batch, plan)
        grads = torch.autograd.grad(terms.loss, params)
        seconds += time.perf_counter() - start
        g = torch.cat([x.reshape(-1) for x in grads]).double()
        if mean is None:  # Welford's update, per coordinate
            mean, M2 = g.clone(), torch.zeros_like(g)
        else:
            delta = g - mean
            mean += delta / (r + 1)
            M2 += delta * (g - mean)
    return {"variance": float(M2.sum() / (draws - 1)), "mean_gradient_sq_norm": float((mean ** 2).sum()),
            "seconds": seconds / draws}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m captioning.study.variance", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a hard-attention run folder with epochs/ (train.save_every_epoch)")
    p.add_argument("--samples", type=int, default=4, help="location sequences per caption of the leave-one-out "
                                                           "estimator (default 4)")
    p.add_argument("--draws", type=int, default=32, help="repeated draws per estimator and checkpoint (default 32)")
    p.add_argument("--out", type=Path, help="write the measurement as JSON here (e.g. docs/results/variance.json)")
    args = p.parse_args(argv)
    epochs = sorted((args.run_dir / "epochs").glob("epoch*.ckpt"), key=lambda q: int(q.stem[5:]))
    if not epochs:
        raise StudyError(f"{args.run_dir / 'epochs'} holds no epoch checkpoints; train the run with "
                         "--set train.save_every_epoch=true")
    if args.samples < 2 or args.draws < 2:
        raise StudyError("--samples and --draws must be at least 2")
    chosen = [None, epochs[0], epochs[(len(epochs) - 1) // 2], epochs[-1]]
    points = []
    progress = Progress(len(chosen) * 2, "variance", unit="estimates")
    batch = None
    for checkpoint in chosen:
        point = {"estimators": {}}
        for samples in (1, args.samples):
            module, cfg, vocab, step = _module(args.run_dir, checkpoint, samples)
            batch = batch or _minibatch(cfg, vocab)
            point["estimators"][str(samples)] = measure(module, batch, samples, args.draws)
            progress.update(1)
        point["step"] = step
        point["checkpoint"] = "initialisation (step 0)" if checkpoint is None else \
            f"after epoch {int(checkpoint.stem[5:]) + 1} (step {step})"
        point["baseline"] = float(module.baseline.value) if module.baseline is not None else None
        points.append(point)
    progress.close()
    result = {"run": args.run_dir.name, "samples": args.samples, "draws": args.draws,
              "batch": {"images": cfg.data.batch_size, "captions_per_image": cfg.data.captions_per_image},
              "threads": torch.get_num_threads(), "points": points}
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    from captioning.console import guarded  # its one-line errors and exit statuses, as every command's

    sys.exit(guarded(main))

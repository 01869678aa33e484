"""Train Show, Attend and Tell with soft or hard attention, then score the test split.

    captioning train --attention soft                 # built-in synthetic dataset
    captioning train --attention hard --devices 2     # DDP on 2 devices (CPU or GPU)
    captioning train --config configs/x.yaml --set optim.lr=4e-4 --set data.batch_size=16
    captioning train --resume runs/soft/last.ckpt     # continue: same step, optimiser, baseline
    captioning train --config configs/coco_soft.yaml --data prepared/coco  # captioning prepare's folder

Writes to --out-dir: best.ckpt (best validation BLEU-4), last.ckpt, config.yaml (as run),
metrics.json (test split, 0-1 scale), test_predictions.json (COCO results format), logs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from captioning.checkpoint import checkpoint_config, read_checkpoint
from captioning.config import ConfigError, build_config, merge, parse_override, save_yaml, validate
from captioning.data.coco import AnnotationError
from captioning.data.datamodule import CaptionDataModule
from captioning.data.feature_cache import FeatureCacheError, attach_feature_cache
from captioning.data.store import PreparedDataError
from captioning.device import peak_rss_mib
from captioning.evaluation.metrics import format_metrics_table
from captioning.training.module import CaptioningModule
from captioning.training.trainer import build_trainer


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", choices=["soft", "hard", "none"],
                   help="attention mechanism (default: soft; none: the no-attention control)")
    p.add_argument("--config", type=Path, help="YAML file holding differences from the defaults")
    p.add_argument("--data", type=Path, metavar="PREPARED_DIR",
                   help="train on a folder written by captioning prepare (sets data.dataset=prepared, data.root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=0.0004 (repeatable)")
    p.add_argument("--devices", type=int, help="devices per node; >1 trains with DDP")
    p.add_argument("--num-nodes", type=int, help="nodes (with torchrun or SLURM)")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out-dir", type=Path, help="default: runs/<attention>")
    p.add_argument("--resume", type=Path, metavar="CKPT", help="continue training from last.ckpt")
    p.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--feature-cache", type=Path, metavar="DIR",
                   help="frozen encoder: compute the annotation grids once into DIR and train the decoder from "
                        "them (sets data.feature_cache; needs model.encoder.fine_tune_from=null)")
    p.add_argument("--no-test", action="store_true",
                   help="skip scoring the test split at the end (captioning compare scores with evaluate.py)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace):
    """Defaults <- --config <- --set <- the named flags; or, with --resume, the checkpoint's config.
    -> (config, vocabulary or None, the resumed checkpoint's global step or None)."""
    overrides = list(args.set)
    flags = {"model.attention": args.attention, "train.devices": args.devices, "train.num_nodes": args.num_nodes,
             "train.max_epochs": args.max_epochs, "train.seed": args.seed}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.fast_dev_run:
        overrides.append("train.fast_dev_run=true")
    if args.feature_cache is not None:
        overrides.append(f"data.feature_cache={json.dumps(str(args.feature_cache))}")
    if args.data is not None:  # the path JSON-quoted, so YAML reads it as a string whatever it looks like
        overrides += ["data.dataset=prepared", f"data.root={json.dumps(str(args.data))}"]
    if args.resume is None:
        return build_config(args.config, overrides), None, None
    ckpt = read_checkpoint(args.resume)
    cfg, vocab = checkpoint_config(ckpt, args.resume)
    if args.config is not None:
        raise ConfigError("--resume takes its config from the checkpoint; pass changes with --set, not --config")
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return validate(cfg), vocab, int(ckpt.get("global_step", 0))


@rank_zero_only
def write_outputs(out_dir: Path, module: CaptioningModule, extra: dict, tested: bool = True) -> None:
    if not tested:  # module.eval_results holds the last validation's, not the test split's
        (out_dir / "metrics.json").write_text(json.dumps({"test": "skipped (--no-test)", **extra}, indent=2))
        print(f"wrote {out_dir / 'metrics.json'} (test split not scored: --no-test)")
        return
    results = dict(module.eval_results or {})
    predictions = results.pop("predictions", {})
    (out_dir / "test_predictions.json").write_text(
        json.dumps([{"image_id": i, "caption": c} for i, c in sorted(predictions.items())], indent=1)
    )
    (out_dir / "metrics.json").write_text(json.dumps({**results, **extra}, indent=2))
    print(format_metrics_table(results.get("metrics", {}), title=f"test split, {results.get('num_images')} images"))
    print(f"wrote {out_dir / 'metrics.json'}")


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``captioning train`` with ``argv``; -> what it wrote, as a dict (bad input: SystemExit, one line)."""
    args = parse_args(argv, prog)
    try:
        cfg, vocab, resume_step = make_config(args)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    out_dir = args.out_dir or Path("runs") / cfg.model.attention
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        save_yaml(cfg, out_dir / "config.yaml")
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)

    started = time.perf_counter()
    data = CaptionDataModule(cfg.data, vocab)
    try:
        data.prepare_data()  # the vocabulary is needed to build the model, so the data comes first
        data.setup("fit")
    except (AnnotationError, PreparedDataError) as err:  # a missing/unfinished/mismatched data folder
        sys.exit(f"error: {err}")
    module = CaptioningModule.create(cfg, data.vocab)
    if cfg.data.feature_cache is not None:  # annotation grids computed once, by the model's own frozen encoder
        gpu = cfg.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        try:
            attach_feature_cache(data, cfg, module.model.encoder, "cuda" if gpu else "cpu", log=rank_zero_info,
                                 progress=not args.no_progress)
        except FeatureCacheError as err:
            sys.exit(f"error: {err}")
    rank_zero_info(f"{cfg.model.attention} attention, {len(data.vocab)} words, "
                   f"{sum(p.numel() for p in module.parameters() if p.requires_grad):,} trained parameters")

    # A resumed run keeps its log rows from before the checkpoint's step (logs/metrics.csv).
    trainer = build_trainer(cfg, out_dir, progress_bar=not args.no_progress, resume_step=resume_step)
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    train_seconds = time.perf_counter() - started
    best = None if cfg.train.fast_dev_run else "best"
    if not args.no_test:
        trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)

    extra = {
        "attention": cfg.model.attention,
        "checkpoint": str(out_dir / "best.ckpt") if best else None,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": peak_rss_mib(),  # None where the platform cannot measure it
    }
    write_outputs(out_dir, module, extra, tested=not args.no_test)
    if args.no_test:
        return extra
    return {**(module.eval_results or {}), **extra}



def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``captioning train``: exit status 0 (bad input exits with a one-line error)."""
    run(None if argv is None else list(argv), prog)
    return 0

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
import time
from pathlib import Path

from captioning.config import (ATTENTIONS, LOGGERS, ConfigError, build_config, flatten, merge, parse_override,
                               to_dict, validate)
from captioning.console import CaptioningError, CommandFailed, command_line, interruptible, main_of, positive_int
from captioning.data.coco import AnnotationError, write_results
from captioning.files import FileWriteError, as_write_error, atomic_write_json, remove_own
from captioning.training.run_folder import (check_out_dir, choose_out_dir, launched_as_rank_zero,
                                            take_folder)

# torch, Lightning and the data pipeline are imported where a run needs them, after the arguments
# are parsed: --help and a bad flag answer at once.

#: What a resume's restored optimiser state decides: its learning rates and weight decay (Adam's
#: parameter groups, and the schedule's base rates), its update rule and the parameters it trains.
#: A --set changing one would be undone silently, or fail as the state is loaded.
FIXED_ON_RESUME = ("optim.lr", "optim.encoder_lr", "optim.weight_decay", "optim.adam_bias_correction",
                   "model.encoder.fine_tune_from")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", choices=ATTENTIONS,
                   help="attention mechanism (default: soft; none: the no-attention control)")
    p.add_argument("--config", type=Path, help="YAML file holding differences from the defaults")
    p.add_argument("--data", type=Path, metavar="PREPARED_DIR",
                   help="train on a folder written by captioning prepare (sets data.dataset=prepared, data.root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=0.0004 (repeatable)")
    p.add_argument("--devices", type=int, help="devices per node; >1 trains with DDP")
    p.add_argument("--num-nodes", type=int, help="nodes (with torchrun or SLURM)")
    p.add_argument("--max-epochs", type=positive_int, metavar="N")
    p.add_argument("--seed", type=int)
    p.add_argument("--out-dir", type=Path,
                   help="default: runs/<attention>, or with --resume the checkpoint's own run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out-dir (otherwise such a folder is refused)")
    p.add_argument("--resume", type=Path, metavar="CKPT",
                   help="continue training from last.ckpt (in its own folder unless --out-dir); see docs/resume.md")
    p.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--feature-cache", type=Path, metavar="DIR",
                   help="frozen encoder: compute the annotation grids once into DIR and train the decoder from "
                        "them (sets data.feature_cache; needs model.encoder.fine_tune_from=null)")
    p.add_argument("--logger", choices=LOGGERS, default="csv",
                   help="csv: logs/metrics.csv (default); tensorboard: also TensorBoard event files in "
                        "logs/tensorboard, with the attention heatmaps as images (the tensorboard extra)")
    p.add_argument("--no-heatmaps", action="store_true",
                   help="no attention figures of fixed validation images at each validation (<out-dir>/attention/)")
    p.add_argument("--no-test", action="store_true",
                   help="skip scoring the test split at the end (captioning compare scores with evaluate.py)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace):
    """Defaults <- --config <- --set <- the named flags; or, with --resume, the checkpoint's config.
    -> (config, vocabulary or None, the resumed checkpoint or None)."""
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
    from captioning.checkpoint import check_resumable, checkpoint_config, read_checkpoint

    if args.config is not None:
        raise ConfigError("--resume takes its config from the checkpoint; pass changes with --set, not --config")
    ckpt = read_checkpoint(args.resume)
    cfg, vocab = checkpoint_config(ckpt, args.resume)
    check_resumable(ckpt, args.resume)
    saved = flatten(to_dict(cfg))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    cfg = validate(cfg)
    changed = flatten(to_dict(cfg))
    for key in FIXED_ON_RESUME:
        if changed[key] != saved[key]:
            raise ConfigError(f"--resume cannot change {key} ({json.dumps(saved[key])} in the checkpoint): the "
                              f"restored optimiser state decides it; leave out --set {key}, or start a new training "
                              "with it")
    return cfg, vocab, ckpt


def config_writer_for(cfg, path: Path):
    """A callback writing ``cfg`` to config.yaml once, at the latest when training starts: after a
    resume's checkpoint is restored, so a resume that Lightning refuses (its optimiser state, a data
    setting) leaves the folder's config.yaml as it was. ``write()`` writes it now (once)."""
    import pytorch_lightning as pl

    from captioning.config import save_yaml

    class Writer(pl.Callback):
        written = False

        def write(self) -> None:
            if not self.written:
                save_yaml(cfg, path)
                self.written = True

        def on_train_start(self, trainer, pl_module) -> None:
            self.write()

    return Writer()


def own_checkpoint(trainer, out_dir: Path) -> Path | None:
    """The checkpoint of the run folder that the test split is scored with and metrics.json names: the
    monitored best, else last.ckpt; None where the folder holds neither (the weights in memory are
    scored then). Lightning restores best_model_path from a checkpoint resumed from another folder,
    even where this run wrote no best.ckpt: a file elsewhere is not this run's."""
    best = trainer.checkpoint_callback.best_model_path
    for path in ([Path(best)] if best else []) + [out_dir / "last.ckpt"]:
        if path.is_file() and path.resolve().parent == out_dir.resolve():
            return out_dir / path.name
    return None


def write_outputs(out_dir: Path, module, extra: dict, skipped: str | None = None) -> None:
    """metrics.json (and test_predictions.json) of a finished run; rank 0 calls it."""
    from captioning.evaluation.metrics import format_metrics_table

    try:
        if skipped is not None:  # module.eval_results holds the last validation's, not the test split's
            atomic_write_json(out_dir / "metrics.json", {"test": f"skipped ({skipped})", **extra})
            remove_own(out_dir, ["test_predictions.json"])  # an earlier run's, of other weights
            print(f"wrote {out_dir / 'metrics.json'} (test split not scored: {skipped})")
            return
        results = dict(module.eval_results or {})
        predictions = results.pop("predictions", {})
        write_results(out_dir / "test_predictions.json", predictions)
        atomic_write_json(out_dir / "metrics.json", {**results, **extra})
        print(format_metrics_table(results.get("metrics", {}), title=f"test split, {results.get('num_images')} images"))
        print(f"wrote {out_dir / 'metrics.json'}")
    except FileWriteError as err:  # a full disk at the very end: the checkpoints are whole, say how to score them
        best = extra.get("checkpoint") or out_dir / "last.ckpt"
        raise FileWriteError(err.errno, f"{err}; the checkpoints are saved, and 'captioning evaluate --checkpoint "
                                        f"{best} --split test' computes the test scores again") from None


def run(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``captioning train`` with ``argv``; -> what it wrote, as a dict. Raises CommandFailed (bad input, a
    failed write), TrainingStopped (a non-finite loss, SIGTERM, Ctrl-C in a stage: status 1, 143, 130) or
    Interrupted (Ctrl-C outside the stages: before training, or while writing results)."""
    args = parse_args(argv, prog)
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from captioning.training.trainer import TrainingStopped

    with interruptible("files already written are whole"):
        try:
            return train(args, prog or "captioning train", argv)
        except TrainingStopped:
            raise
        except (CaptioningError, MisconfigurationException) as err:
            raise CommandFailed(err) from None
        except OSError as err:  # a full disk or a permission, met by Lightning's own writers (logs)
            failure = as_write_error(err)
            if failure is None:
                raise
            raise CommandFailed(failure) from None


def train(args: argparse.Namespace, prog: str, argv: list[str] | None = None) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_info

    from captioning import provenance
    from captioning.checkpoint import check_state_dict
    from captioning.data.datamodule import CaptionDataModule
    from captioning.data.feature_cache import attach_feature_cache
    from captioning.device import peak_rss_mib
    from captioning.training.module import CaptioningModule
    from captioning.training.trainer import build_trainer, run_guarded, trains_on_gpu

    cfg, vocab, ckpt = make_config(args)
    resume_step = int(ckpt.get("global_step", 0)) if ckpt is not None else None
    resume_id = ckpt.get("run_folder_id") if ckpt is not None else None
    resume_id = resume_id if isinstance(resume_id, str) else None
    out_dir = choose_out_dir(args.out_dir, cfg.model.attention, args.resume)
    rank_zero = launched_as_rank_zero()
    if rank_zero:  # before any long work: a folder holding another run is refused now
        check_out_dir(out_dir, args.overwrite, args.resume, resume_id)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)

    started = time.perf_counter()
    data = CaptionDataModule(cfg.data, vocab)
    data.val_captions = cfg.train.monitor == "nll"
    data.prepare_data()  # the vocabulary is needed to build the model, so the data comes first
    data.setup("fit")
    trained_on = provenance.record(cfg, len(data.vocab), len(data.load_split("train")), data.root.name)
    module = CaptioningModule.create(cfg, data.vocab, trained_on)
    if ckpt is not None:  # a mismatch is refused here, before the run folder changes
        check_state_dict(module.state_dict(), ckpt["state_dict"], args.resume)
        del ckpt
    if cfg.data.feature_cache is not None:  # annotation grids computed once, by the model's own frozen encoder
        device = "cuda" if trains_on_gpu(cfg) else "cpu"
        attach_feature_cache(data, cfg, module.model.encoder, device, log=rank_zero_info, progress=not args.no_progress)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    rank_zero_info(f"{cfg.model.attention} attention, {len(data.vocab)} words, {trained:,} trained parameters"
                   + (f", {frozen:,} frozen" if frozen else ""))

    skipped = "--no-test" if args.no_test else None
    if skipped is None:
        try:  # read before training: a missing test file fails now, not after it
            test_records = data.load_split("test")
        except AnnotationError as err:
            raise AnnotationError(f"{err} (pass --no-test to train without scoring a test split)") from None
        if not test_records:
            skipped = "the test split is empty"
            rank_zero_info(f"test: the test split of {data.root} has no image, so it will not be scored "
                           "(evaluate the checkpoints with --split val)")

    lock = take_folder(out_dir, args.overwrite, args.resume, resume_id=resume_id) if rank_zero else None
    try:
        config_writer = config_writer_for(cfg, out_dir / "config.yaml") if rank_zero else None
        if config_writer is not None and args.resume is None:
            config_writer.write()
        # A resumed run keeps its log rows from before the checkpoint's step (logs/metrics.csv).
        try:
            trainer = build_trainer(cfg, out_dir, progress_bar=not args.no_progress, resume_step=resume_step,
                                    logger=args.logger, heatmaps=not args.no_heatmaps)
        except ValueError as err:  # --logger tensorboard without the tensorboard package
            raise ConfigError(str(err)) from None
        if config_writer is not None:
            trainer.callbacks.append(config_writer)
        run_guarded(trainer, lambda: trainer.fit(module, datamodule=data, ckpt_path=args.resume), out_dir, prog)
        if config_writer is not None:  # a resume with no epoch left to train never starts training
            config_writer.write()
        train_seconds = time.perf_counter() - started
        best = None if cfg.train.fast_dev_run else own_checkpoint(trainer, out_dir)
        if skipped is None:
            # The checkpoint's own path: "best" would make Lightning warn that it picks the first of the
            # two ModelCheckpoint callbacks, and take a best_model_path of another folder (below).
            ckpt_path = str(best) if best is not None else None
            run_guarded(trainer, lambda: trainer.test(module, datamodule=data, ckpt_path=ckpt_path, verbose=False),
                        out_dir, prog)

        extra = {
            # The command that made the run (a model folder's card quotes it: captioning export).
            "command": command_line(prog, argv),
            "attention": cfg.model.attention,
            "checkpoint": str(best) if best is not None else None,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": peak_rss_mib(),  # None where the platform cannot measure it
        }
        if trainer.is_global_zero:
            write_outputs(out_dir, module, extra, skipped)
    finally:
        if lock is not None:
            lock.release()
    if skipped is not None:
        return extra
    return {**(module.eval_results or {}), **extra}


main = main_of(run)

"""The Lightning Trainer as this project uses it: callbacks, logger, devices and precision."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment

from captioning.config import Config

MONITOR = "val/bleu_4"  # from real greedy decoding of the whole validation split


def resolve_precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    gpu = cfg.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu else "32-true"


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so a resumed run
    would lose the log of everything before the resume. This one keeps the rows logged before
    ``keep_before_step`` (the resumed checkpoint's global step) and appends after them."""

    def __init__(self, *args, keep_before_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        rows: list[dict[str, str]] = []
        keys: list[str] = []
        if self._keep_before_step is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) < self._keep_before_step]
        writer = super().experiment  # removes the old file
        if rows:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=keys)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = sorted(keys)
        return writer


#: Loggers ``build_trainer`` knows; the CSV log (logs/metrics.csv) is always written.
LOGGERS = ("csv", "tensorboard")


def build_loggers(out_dir: Path, logger: str = "csv", resume_step: int | None = None) -> list:
    """logs/metrics.csv always (rows before ``resume_step`` kept); with "tensorboard" also
    TensorBoard event files in logs/tensorboard. Raises ValueError for an unknown logger or a
    missing tensorboard package."""
    if logger not in LOGGERS:
        raise ValueError(f"unknown logger {logger!r}; choose {' or '.join(LOGGERS)}")
    loggers = [ResumableCSVLogger(out_dir, name="logs", version="", keep_before_step=resume_step)]
    if logger == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        try:
            import tensorboard  # noqa: F401  (Lightning falls back to tensorboardX otherwise)
        except ImportError:
            raise ValueError("--logger tensorboard needs the tensorboard package: "
                             "pip install 'show-attend-tell[tensorboard]'") from None
        loggers.append(TensorBoardLogger(out_dir, name="logs", version="tensorboard", default_hp_metric=False))
    return loggers


def build_trainer(
    cfg: Config, out_dir: str | Path, progress_bar: bool = True, resume_step: int | None = None,
    logger: str = "csv", heatmaps: bool = True,
) -> pl.Trainer:
    """``resume_step``: the global step of the checkpoint being resumed, whose earlier log rows are
    kept. ``logger``: "csv" or "tensorboard" (see build_loggers). ``heatmaps``: attention figures
    of a few fixed validation images at every validation (captioning/training/heatmaps.py)."""
    from captioning.training.heatmaps import AttentionHeatmaps

    out_dir = Path(out_dir)
    loggers = build_loggers(out_dir, logger, resume_step)
    t = cfg.train
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=out_dir, filename="best", monitor=MONITOR, mode="max", save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        # A second callback without a monitor keeps last.ckpt current after every epoch: Lightning
        # 2.6's save_last only writes it in epochs where the best checkpoint also improved.
        ModelCheckpoint(dirpath=out_dir, filename="last", save_top_k=1, enable_version_counter=False),
        EarlyStopping(monitor=MONITOR, mode="max", patience=t.patience),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if heatmaps and not t.fast_dev_run:
        callbacks.append(AttentionHeatmaps(out_dir))
    if progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    multi = t.devices * t.num_nodes > 1
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        # Every parameter is used in every step (the mechanism is chosen at construction), so DDP
        # needs no find_unused_parameters search.
        strategy="ddp" if multi else "auto",
        precision=resolve_precision(cfg),
        max_epochs=t.max_epochs,
        max_time=timedelta(minutes=t.max_time_minutes) if t.max_time_minutes > 0 else None,
        check_val_every_n_epoch=t.val_every,
        log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip or None,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        fast_dev_run=t.fast_dev_run,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=progress_bar,
        default_root_dir=out_dir,
        deterministic=False,
    )

"""The Lightning Trainer as this project uses it: callbacks, logger, devices and precision."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import math
import os
import random
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from captioning.console import CaptioningError, InvalidType, InvalidValue
from captioning.config import LOGGERS, Config
from captioning.files import ForeignFolderError, atomic_write, folder_id
from captioning.progress import Progress

#: train.monitor -> (logged key, mode). BLEU-4 from real greedy decoding of the whole validation
#: split; NLL of its reference captions under teacher forcing (capgen's criterion).
MONITORS = {"bleu_4": ("val/bleu_4", "max"), "nll": ("val/nll", "min")}


def trains_on_gpu(cfg: Config) -> bool:
    """Whether Lightning will put this run on a CUDA device (train.accelerator auto picks one when present)."""
    return cfg.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if trains_on_gpu(cfg) else "32-true"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically in their own folder (captioning/files.py): Lightning's own save
    moves a file from $TMPDIR, a copy across file systems that a kill can leave half-done."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise InvalidType(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first, then written by Python: a full disk is then an OSError
        # (ENOSPC) that names the folder, not torch's C++ writer's "unexpected pos".
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getbuffer())


class NonFiniteLossError(CaptioningError, RuntimeError):
    """The training loss became NaN or infinite: training stopped before any checkpoint held it."""


class RunGuard(pl.Callback):
    """Stops training on a non-finite loss before a checkpoint can hold the damaged weights, checked
    every ``check_every`` steps (reading it synchronises a GPU), before validation and at each
    epoch's end, where the checkpoints are written; records an interruption (SIGTERM, Ctrl-C), which
    Lightning turns into a ``SystemExit`` (status 0 for SIGTERM), so the entry point can exit non-zero
    and say so."""

    def __init__(self, check_every: int) -> None:
        self.check_every = check_every  # train.log_every, at least 1
        self.interrupted: str | None = None  # "SIGTERM" or "SIGINT" once interrupted
        self.saved: tuple[int, int] | None = None  # (finished epochs, global step) of the last checkpoint
        self._loss: torch.Tensor | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        self.saved = (trainer.current_epoch + 1, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._loss = loss.detach()
        if trainer.global_step % self.check_every == 0:
            self._check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        if self._loss is None or trainer.sanity_checking:
            return
        loss, self._loss = self._loss, None
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError(
                f"the training loss is {float(loss)} at step {trainer.global_step} (epoch {trainer.current_epoch}): "
                "training stopped, no checkpoint holds these weights; lower optim.lr or check the data")

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.interrupted = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            self.interrupted = "SIGINT"


class RunPlace(pl.Callback):
    """Records in every checkpoint the folder the training ran in (``checkpoint["workdir"]``), which
    the config's relative paths are relative to (captioning/checkpoint.py ``at_workdir``), and the
    run folder marker's id (``checkpoint["run_folder_id"]``): --resume continues in place only in
    the folder whose marker carries it."""

    def __init__(self, out_dir: Path) -> None:
        self.workdir = os.getcwd()
        try:
            self.run_folder_id = folder_id(out_dir)
        except ForeignFolderError:
            self.run_folder_id = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["workdir"] = self.workdir
        if self.run_folder_id is not None:
            checkpoint["run_folder_id"] = self.run_folder_id


class ConfiguredEarlyStopping(EarlyStopping):
    """Early stopping whose patience is the config's also after --resume (Lightning's restores the
    checkpoint's, ignoring ``--set train.patience=N``); its progress is restored as saved."""

    def load_state_dict(self, state_dict: dict) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience


class TrainingProgress(ProgressBar):
    """Training, validation and test progress through captioning/progress.py (a bar on a terminal,
    lines at most every 30 seconds elsewhere); a line of scores after each validation,
    and one before the test captions are scored (the Java tokenizer and METEOR take a while)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self._bar: Progress | None = None

    def disable(self) -> None:  # Lightning disables the bar on every rank but global rank 0
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _start(self, total: int | float, label: str) -> None:
        self._close()
        if self.enabled and math.isfinite(total) and total > 0:
            self._bar = Progress(int(total), label, unit="batches", interval=30.0)

    def _step(self, note: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1, note)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _epoch(self, trainer: pl.Trainer) -> str:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch + 1}{total}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._start(self.total_train_batches, self._epoch(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = trainer.progress_bar_metrics.get("train/loss")
        self._step(None if loss is None else f"loss {float(loss):.3f}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._close()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._start(self.total_val_batches, f"{self._epoch(trainer)} validation")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._step()

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._close()
        if not self.enabled or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        names = {"val/bleu_4": "BLEU-4", "val/caption_accuracy": "caption accuracy"}
        parts = [f"{name} {100 * float(metrics[key]):.1f}" for key, name in names.items() if key in metrics]
        text = f"(greedy, x100): {', '.join(parts)}" if parts else ""
        if "val/nll" in metrics:  # train.monitor "nll"
            text += f"{'; ' if parts else ': '}NLL {float(metrics['val/nll']):.3f}"
        if text:
            print(f"{self._epoch(trainer)} validation {text}", file=sys.stderr, flush=True)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._start(sum(trainer.num_test_batches), "test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._step()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        # Called before the module's own on_test_epoch_end, which scores the captions.
        self._close()
        if self.enabled:
            print("test: scoring the captions with the COCO metrics ...", file=sys.stderr, flush=True)


#: Messages that tell a user nothing: Lightning's cloud advert, its note that it loads the training
#: data to count steps, a pytree deprecation inside it, and its warnings that the run folder and
#: logs/ are not empty (run_folder.py has already refused another run's files, and
#: ResumableCSVLogger keeps the rows the second warning says are deleted).
_NOISE_LOGGED = ("💡 Tip: For seamless cloud logging", "Loading `train_dataloader` to estimate number of stepping")
_NOISE_WARNED = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                 r"Checkpoint directory .* exists and is not empty",
                 r"Experiment logs directory .* exists and is not empty")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE_LOGGED)


@contextlib.contextmanager
def _quiet_dependencies():
    """While the block runs the dependency messages above are dropped, nothing else."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    logger.addFilter(_not_noise)  # a logging filter may be a function (Python 3.2+)
    try:
        with warnings.catch_warnings():
            for message in _NOISE_WARNED:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(_not_noise)


def silence_lightning() -> None:
    """From here on in this process, Lightning's info lines and warnings are dropped:
    ``captioning evaluate --devices N`` says itself what it runs."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric")


@contextlib.contextmanager
def quiet_lightning():
    """:func:`silence_lightning` while the block runs; the loggers' levels and the warning filters
    are restored after it."""
    levels = {name: logging.getLogger(name).level for name in ("pytorch_lightning", "lightning_fabric")}
    try:
        with warnings.catch_warnings():
            silence_lightning()
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _quietly(method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        with _quiet_dependencies():
            return method(*args, **kwargs)
    return run


class Trainer(pl.Trainer):
    """Lightning's Trainer, quiet about its dependencies' noise while it is built and while it runs
    (see _quiet_dependencies); otherwise the same."""

    __init__ = _quietly(pl.Trainer.__init__)
    fit = _quietly(pl.Trainer.fit)
    validate = _quietly(pl.Trainer.validate)
    test = _quietly(pl.Trainer.test)


class TrainingStopped(CaptioningError):
    """A training or test stage ended early: ``exit_status`` is the command's exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_status = status


EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it


def run_guarded(trainer: pl.Trainer, stage, out_dir: str | Path, resume_command: str):
    """Run ``stage()`` (trainer.fit or trainer.test); a non-finite loss, SIGTERM or Ctrl-C becomes
    :class:`TrainingStopped` saying what was saved and how to continue (Lightning's SystemExit(0)
    on SIGTERM would let ``train && evaluate`` carry on)."""
    guard = next(c for c in trainer.callbacks if isinstance(c, RunGuard))
    last = Path(out_dir) / "last.ckpt"
    # What holds the work if this stage saves nothing (the stage's own saves are in guard.saved).
    saved = f"{last} is unchanged" if last.is_file() else "no checkpoint was saved (no epoch finished)"
    try:
        return stage()
    except NonFiniteLossError as err:
        raise TrainingStopped(f"{err}; {_saved(guard, last, saved)}", 1) from None
    except (SystemExit, KeyboardInterrupt):
        if guard.interrupted is None and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise
        signal_name = guard.interrupted or "SIGINT"
        hint = f"; continue with: {resume_command} --resume {last}" if last.is_file() else ""
        raise TrainingStopped(f"stopped by {signal_name}: {_saved(guard, last, saved)}{hint}",
                              EXIT_STATUS[signal_name]) from None


def _saved(guard: RunGuard, last: Path, before: str) -> str:
    if guard.saved is not None:
        return f"{last} holds {guard.saved[0]} finished epoch(s), step {guard.saved[1]}"
    return before


class RNGState(pl.Callback):
    """The random generators (Python, NumPy, torch CPU and CUDA) in every checkpoint, as plain types
    and tensors, restored on resume: the resumed epochs draw as the uninterrupted run would have."""

    def state_dict(self) -> dict:
        version, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": [version, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        # Called before the resumed epoch's shuffle is drawn and before CaptioningModule.on_fit_start
        # (which, with DDP, seeds each rank anew: only rank 0's states are saved).
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        torch.set_rng_state(state["torch"])
        version, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((version, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that keeps the rows of ``metrics.csv`` logged before ``keep_before_step`` (the
    resumed checkpoint's step): Lightning's deletes the file when it starts."""

    def __init__(self, *args, keep_before_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        keys, rows = _read_csv(path) if self._keep_before_step is not None and path.is_file() else ([], [])
        rows = [r for r in rows if r.get("step") and int(float(r["step"])) < self._keep_before_step]
        writer = super().experiment  # removes the old file
        writer._rewrite_with_new_header = lambda fieldnames: _write_csv(path, fieldnames, _read_csv(path)[1])
        if rows:
            _write_csv(path, keys, rows)
            writer.metrics_keys = sorted(keys)
        return writer


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """-> (the header's column names, the rows)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_csv(path: Path, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
    """The whole log rewritten (a new column appeared, or a resume trimmed it) without a moment
    where metrics.csv is half-written: Lightning's own rewrite truncates it in place."""
    def write(f) -> None:
        out = csv.DictWriter(f, fieldnames=fieldnames)
        out.writeheader()
        out.writerows(rows)

    atomic_write(path, write)


def build_loggers(out_dir: Path, logger: str = "csv", resume_step: int | None = None) -> list:
    """logs/metrics.csv always (rows before ``resume_step`` kept); with "tensorboard" also
    TensorBoard event files in logs/tensorboard. Raises ValueError for an unknown logger or a
    missing tensorboard package."""
    if logger not in LOGGERS:
        raise InvalidValue(f"unknown logger {logger!r}; choose {' or '.join(LOGGERS)}")
    loggers = [ResumableCSVLogger(out_dir, name="logs", version="", keep_before_step=resume_step)]
    if logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (Lightning falls back to tensorboardX otherwise)
        except ImportError:
            raise InvalidValue("--logger tensorboard needs the tensorboard package: "
                               "pip install 'show-attend-tell[tensorboard]'") from None
        loggers.append(TensorBoardLogger(out_dir, name="logs", version="tensorboard", default_hp_metric=False))
    return loggers


def build_trainer(
    cfg: Config, out_dir: str | Path, progress_bar: bool = True, resume_step: int | None = None,
    logger: str = "csv", heatmaps: bool = True,
) -> pl.Trainer:
    """``resume_step``: the resumed checkpoint's step (build_loggers). ``heatmaps``: attention figures
    at every validation (captioning/training/heatmaps.py)."""
    from captioning.training.heatmaps import AttentionHeatmaps

    out_dir = Path(out_dir)
    loggers = build_loggers(out_dir, logger, resume_step)
    t = cfg.train
    monitor, mode = MONITORS[t.monitor]
    checkpoint = functools.partial(ModelCheckpoint, enable_version_counter=False, auto_insert_metric_name=False)
    callbacks: list[pl.Callback] = [
        checkpoint(dirpath=out_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1),
        # A second callback without a monitor keeps last.ckpt current after every epoch: Lightning
        # 2.6's save_last only writes it in epochs where the best checkpoint also improved. At the
        # training epoch's end, since with train.val_every > 1 a validation's end skips epochs.
        checkpoint(dirpath=out_dir, filename="last", save_top_k=1, save_on_train_epoch_end=True),
        ConfiguredEarlyStopping(monitor=monitor, mode=mode, patience=t.patience),
        LearningRateMonitor(logging_interval="epoch"),
        RunGuard(check_every=t.log_every),
        RNGState(),
        RunPlace(out_dir),
    ]
    if t.save_every_epoch:
        # monitor="epoch" only gives this callback a state key of its own beside last.ckpt's.
        callbacks.append(checkpoint(dirpath=out_dir / "epochs", filename="epoch{epoch}", monitor="epoch", mode="max",
                                    save_top_k=-1, save_on_train_epoch_end=True))
    if heatmaps and not t.fast_dev_run:
        callbacks.append(AttentionHeatmaps(out_dir))
    if progress_bar:
        callbacks.append(TrainingProgress())
    multi = t.devices * t.num_nodes > 1
    return Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        # Every parameter is used in every step (the mechanism is chosen at construction), so DDP
        # needs no find_unused_parameters search.
        strategy="ddp" if multi else "auto",
        precision=resolve_precision(cfg),
        max_epochs=t.max_epochs, max_time=timedelta(minutes=t.max_time_minutes) if t.max_time_minutes > 0 else None,
        check_val_every_n_epoch=t.val_every, log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip or None,
        # None when 1.0 (all batches): the same, without Lightning's note saying so.
        limit_train_batches=t.limit_train_batches if t.limit_train_batches != 1.0 else None,
        limit_val_batches=t.limit_val_batches if t.limit_val_batches != 1.0 else None,
        fast_dev_run=t.fast_dev_run, num_sanity_val_steps=0,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], logger=loggers, enable_progress_bar=progress_bar,
        enable_model_summary=False,  # captioning train prints the trained parameter count itself
        default_root_dir=out_dir, deterministic=False,
    )

"""An output folder belongs to one run: which folder a training writes, and what it may replace
(:func:`check_out_dir`). A start refused before any checkpoint leaves nothing that blocks the same
command once fixed: a marked folder without results is taken as it is. While a training runs, a
lock file in the folder (captioning/files.py RunLock) refuses a second live process."""

from __future__ import annotations

import os
import re
from pathlib import Path

from captioning.console import CaptioningError
from captioning.files import (MARKER, ForeignFolderError, LockedError, RunLock, check_folder, check_no_links,
                              check_writable, folder_id, mark_folder, remove_own, remove_temporaries)

#: What a training writes into its folder (and evaluate's default eval/): all that --overwrite removes.
RUN_FILES = ("config.yaml", "best.ckpt", "last.ckpt", "metrics.json", "test_predictions.json", "logs", "epochs",
             "attention", "eval")
#: The files that make a folder hold a run: without them, what a refused start left is replaced freely.
RESULT_FILES = ("best.ckpt", "last.ckpt", "metrics.json", "test_predictions.json")
LOCK_NAME = "train.lock"


class RunFolderError(CaptioningError, ValueError):
    """The output folder cannot be used as asked (another run's files, or not writable)."""


def launched_as_rank_zero() -> bool:
    """Before the Trainer exists: is this process global rank 0? From the variables torchrun,
    SLURM and Lightning's own launchers set (RANK; else NODE_RANK and LOCAL_RANK). Only rank 0
    checks, locks and writes the run folder; the other ranks (other nodes too) share it."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]) == 0
    node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    local = os.environ.get("LOCAL_RANK") or "0"
    return int(node) == 0 and int(local) == 0


def choose_out_dir(out_dir: Path | None, attention: str, resume: Path | None) -> Path:
    """--out-dir if given; else the resumed checkpoint's own run folder; else runs/<attention>."""
    if out_dir is not None:
        return Path(out_dir)
    if resume is not None:
        return run_folder_of(resume)
    return Path("runs") / attention


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: its own folder, or RUN for RUN/epochs/epoch<N>.ckpt
    (train.save_every_epoch)."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "epochs" and re.fullmatch(r"epoch\d+\.ckpt", checkpoint.name):
        return checkpoint.parent.parent
    return checkpoint.parent


def _continuing(out_dir: Path, resume: Path | None) -> bool:
    return resume is not None and Path(out_dir).resolve() == run_folder_of(Path(resume).resolve())


def _among_run_files(out_dir: Path, path: Path) -> bool:
    """Whether ``path`` is, or lies in, one of the entries of ``out_dir`` that a new run there removes."""
    path = Path(path).resolve()
    entries = [(Path(out_dir) / name).resolve() for name in RUN_FILES]
    return any(path == entry or entry in path.parents for entry in entries)


def check_out_dir(out_dir: Path, overwrite: bool = False, resume: Path | None = None,
                  resume_id: str | None = None) -> None:
    """Refuse (RunFolderError, one line saying what to pass) a folder that is not a run folder of
    this project (files of someone else's, even with --overwrite), or that holds another run's
    results without --overwrite. A resume continues in the checkpoint's own folder only if it
    carries the project's marker with the id the checkpoint recorded (``resume_id``); else only in
    a new --out-dir. --overwrite is refused with a resume that continues in its own folder, and
    wherever it would remove the checkpoint resumed. Nothing is written through a link in the
    folder. A new or empty folder is created and marked; nothing else is written here but a probe
    proving it writable."""
    out_dir = Path(out_dir)
    continuing = _continuing(out_dir, resume)
    try:
        ours = check_folder(out_dir, "run", "--out-dir")
        if continuing:
            if not ours:
                raise ForeignFolderError(
                    f"{out_dir} is not a run folder of show-attend-tell (no {MARKER} of its own), so --resume writes "
                    f"nothing there: pass --out-dir NEW_FOLDER to continue {resume} in a new folder")
            if resume_id is not None and resume_id != folder_id(out_dir):
                raise ForeignFolderError(
                    f"{resume} was not written by the run of {out_dir} (its run id is not the folder's), so --resume "
                    f"writes nothing there: pass --out-dir NEW_FOLDER to continue it in a new folder")
            check_no_links(out_dir, RUN_FILES, "--out-dir")
    except ForeignFolderError as err:
        raise RunFolderError(str(err)) from None
    found = [name for name in RESULT_FILES if (out_dir / name).exists()] if ours else []
    if overwrite and continuing:  # otherwise silently ignored: a continuation replaces nothing
        raise RunFolderError(f"--overwrite does not apply when --resume continues {resume} in its own run folder "
                             f"{out_dir}: leave it out to continue there, or pass --out-dir NEW_FOLDER")
    if resume is not None and not continuing and (overwrite or not found) and _among_run_files(out_dir, resume):
        clearing = "--overwrite" if overwrite else f"a new run in {out_dir}"
        raise RunFolderError(f"{clearing} would remove {resume}, the checkpoint resumed: pass --out-dir NEW_FOLDER, "
                             "or move the checkpoint out of that folder first")
    if found and not continuing and not overwrite:
        hint = f"--resume {out_dir / 'last.ckpt'} to continue it, " if (out_dir / "last.ckpt").is_file() else ""
        present = ", ".join(name for name in RUN_FILES if (out_dir / name).exists())
        raise RunFolderError(f"{out_dir} holds another run ({present}): pass --overwrite to "
                             f"replace it, {hint}or --out-dir to write elsewhere")
    try:
        check_writable(out_dir, "write the run")
        if not ours:
            mark_folder(out_dir, "run")
    except OSError as err:
        raise RunFolderError(str(err)) from None


def take_folder(out_dir: Path, overwrite: bool = False, resume: Path | None = None,
                command: str | None = None, resume_id: str | None = None) -> RunLock:
    """Check the folder, lock it against a second live training, clear what a dead process left
    half-written, and (with --overwrite) remove the previous run's files. -> the held lock."""
    check_out_dir(out_dir, overwrite, resume, resume_id)
    lock = RunLock(Path(out_dir) / LOCK_NAME, command=command, what="training")
    try:
        lock.acquire()
    except (LockedError, OSError) as err:  # another live training, or a folder refusing the lock file
        raise RunFolderError(str(err)) from None
    remove_temporaries(out_dir)
    continuing = _continuing(out_dir, resume)
    if not continuing and (overwrite or not any((Path(out_dir) / name).exists() for name in RESULT_FILES)):
        remove_own(out_dir, RUN_FILES)  # the previous run's files, or what a refused start left; nothing else
    return lock

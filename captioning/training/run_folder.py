"""An output folder belongs to one run: which folder a training writes, and what it may replace.

A fresh training refuses a folder that holds another run's files unless ``--overwrite`` says to
replace them; ``--resume CKPT`` continues in the checkpoint's own folder unless ``--out-dir``
names another. While a training runs, a lock file in the folder (captioning/files.py RunLock)
refuses a second live process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from captioning.files import LockedError, RunLock, check_writable, remove_temporaries

#: What a training writes into its folder; a folder holding any of them holds a run.
RUN_FILES = ("config.yaml", "best.ckpt", "last.ckpt", "metrics.json", "test_predictions.json", "logs")
LOCK_NAME = "train.lock"


class RunFolderError(ValueError):
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
    """--out-dir if given; else the resumed checkpoint's own folder; else runs/<attention>."""
    if out_dir is not None:
        return Path(out_dir)
    if resume is not None:
        return Path(resume).parent
    return Path("runs") / attention


def run_files(out_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def check_out_dir(out_dir: Path, overwrite: bool = False, resume: Path | None = None) -> None:
    """Refuse (RunFolderError, one line saying what to pass) a folder holding another run's files.

    A resume into the checkpoint's own folder continues that run, so its files are expected there.
    Nothing is written here except a probe proving the folder is writable.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"--out-dir {out_dir} is a file, not a folder: choose another --out-dir")
    continuing = resume is not None and out_dir.resolve() == Path(resume).resolve().parent
    found = run_files(out_dir) if out_dir.is_dir() else []
    if found and not continuing and not overwrite:
        hint = f"--resume {out_dir / 'last.ckpt'} to continue it, " if (out_dir / "last.ckpt").is_file() else ""
        raise RunFolderError(f"{out_dir} holds another run ({', '.join(found)}): pass --overwrite to replace it, "
                             f"{hint}or --out-dir to write elsewhere")
    try:
        check_writable(out_dir, "write the run")
    except OSError as err:
        raise RunFolderError(str(err)) from None


def take_folder(out_dir: Path, overwrite: bool = False, resume: Path | None = None,
                command: str | None = None) -> RunLock:
    """Check the folder, lock it against a second live training, clear what a dead process left
    half-written, and (with --overwrite) remove the previous run's files. -> the held lock."""
    check_out_dir(out_dir, overwrite, resume)
    lock = RunLock(Path(out_dir) / LOCK_NAME, command=command, what="training")
    try:
        lock.acquire()
    except (LockedError, OSError) as err:  # another live training, or a folder refusing the lock file
        raise RunFolderError(str(err)) from None
    remove_temporaries(out_dir)
    continuing = resume is not None and Path(out_dir).resolve() == Path(resume).resolve().parent
    if overwrite and not continuing:
        for name in run_files(Path(out_dir)):
            path = Path(out_dir) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


def resume_hint(out_dir: Path) -> str:
    """What an interrupted training leaves, and the command that continues it."""
    last = Path(out_dir) / "last.ckpt"
    if not last.is_file():
        return f"no checkpoint was saved yet (the first epoch did not finish); nothing to resume in {out_dir}"
    return f"{last} holds the last finished epoch; continue with: --resume {last}"

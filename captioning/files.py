"""Files that are never half-written, folders that appear whole, and one run per folder.

Every file the project writes (checkpoints, metrics, predictions, configs, prepared data,
caches) goes through :func:`atomic_write` or :func:`atomic_path`: the bytes go to a temporary
file in the *same* folder, are flushed and fsync'ed, then ``os.replace`` puts them under the
final name. A rename within one folder is atomic on POSIX file systems, so a reader (or the next
run after a kill -9 or a full disk) sees the old file or the new one, never a mixture. A
temporary file in ``$TMPDIR`` would not do: moving it onto another file system is a copy, which
can be interrupted half-way.

:func:`atomic_folder` does the same for a whole folder (``NAME.partial/``, renamed when
complete); :class:`RunLock` is a lock file holding pid, host and command, so a second live
process writing the same folder is refused with a message naming the first, and the lock of a
dead process is taken over.

:func:`claim_folder` decides whose a folder is: the project writes only into a new or empty
folder, which it marks (:data:`MARKER`, naming the kind: a run, a model, a prepared dataset, an
evaluation), or into a folder carrying the marker of that kind; :func:`remove_own` removes from a
marked folder only the names the project writes there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

#: Prefix of the temporary siblings of files being written: ``.tmp-<pid>-<n>-NAME`` (hidden, and
#: ending in NAME so writers that add a suffix, such as ``np.save``, keep the name as given).
TMP_PREFIX = ".tmp-"

_counter = iter(range(1 << 62))
_counter_lock = threading.Lock()


class FileWriteError(OSError):
    """A write failed for a reason the user must fix (full disk, no permission, read-only)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def write_error(err: OSError, folder: str | Path, what: str = "write") -> FileWriteError:
    """One line naming the folder and the cause: 'cannot write into runs/x: no space left ...'."""
    reason = _REASONS.get(err.errno or 0, err.strerror or type(err).__name__)
    hint = {errno.ENOSPC: "; free some space or choose another --out-dir",
            errno.EDQUOT: "; free some space or choose another --out-dir",
            errno.EROFS: "; choose another --out-dir"}.get(err.errno or 0, "")
    if err.errno in (errno.EACCES, errno.EPERM):
        hint = "; fix its permissions or choose another --out-dir"
    return FileWriteError(err.errno or 0, f"cannot {what} into {folder}: {reason}{hint}")


def as_write_error(err: OSError) -> FileWriteError | None:
    """``err`` as a :class:`FileWriteError` naming its file's folder when it is a full disk, a
    missing permission or a read-only file system (raised by code that is not ours); else None."""
    if isinstance(err, FileWriteError):
        return err
    if err.errno not in _REASONS:
        return None
    return write_error(err, Path(err.filename).parent if err.filename else Path.cwd())


def _tmp_sibling(path: Path) -> Path:
    with _counter_lock:
        n = next(_counter)
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{n}-{path.name}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it must not undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask (0644 under umask 022)."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then put it back
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed to ``path``.

    For writers that need a file name (``np.save``, ``torch.save``, ``open_memmap``). On any
    failure the temporary file is removed and ``path`` is untouched; ENOSPC, EACCES, EPERM and
    EROFS become a :class:`FileWriteError` naming the folder. The file gets the mode a plain
    ``open()`` gives (the umask respected): some writers, such as safetensors', create theirs
    readable by the owner alone, and a model folder is meant to be shared.
    """
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, FileWriteError) and err.errno in _REASONS:
            raise write_error(err, path.parent) from None
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | Path, data: str | bytes | memoryview | Callable[[Any], None], mode: str = "w") -> Path:
    """Write ``data`` (text, bytes, or a function given the open file) to ``path`` atomically."""
    path = Path(path)
    binary = isinstance(data, (bytes, bytearray, memoryview)) or "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **kwargs: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, **kwargs) + ("\n" if indent is not None else ""))


def remove_temporaries(folder: str | Path) -> int:
    """Remove ``.tmp-<pid>-<n>-NAME`` files that dead processes of this host left in ``folder``."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        pid = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def check_writable(folder: str | Path, what: str = "write") -> Path:
    """Create ``folder`` and prove a file can be written there (before long work starts)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _tmp_sibling(folder / "write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise FileWriteError(errno.EEXIST, f"cannot {what} into {folder}: it exists and is not a folder") from None
    except NotADirectoryError:
        raise FileWriteError(errno.ENOTDIR, f"cannot {what} into {folder}: a part of the path is a file") from None
    except OSError as err:
        raise write_error(err, folder, what) from None
    return folder


# ------------------------------------------------------------------------------ folders


def partial_name(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".partial")


def publish_folder(partial: str | Path, final: str | Path) -> Path:
    """Rename a completed ``partial`` folder to ``final``, replacing an existing ``final`` with the
    shortest window possible (old moved aside, new renamed in, old removed)."""
    partial, final = Path(partial), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync_folder(final.parent)
    return final


@contextlib.contextmanager
def atomic_folder(final: str | Path, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield ``final.partial/`` to write into; renamed to ``final`` when the block completes.

    On an exception the partial folder is removed, unless ``keep_on_error`` (for work that can
    resume from what the partial folder holds). A folder appears under its final name only whole.
    """
    final = Path(final)
    partial = partial_name(final)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_folder(partial, final)


# ------------------------------------------------------------------------------ locks


def host_name() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


class LockedError(RuntimeError):
    """Another live process holds the lock."""


class RunLock:
    """A lock file (``path``) holding ``{"pid", "host", "command"}`` of the process that owns a folder.

    :meth:`acquire` creates it with O_EXCL. If it exists and its process is alive (or runs on
    another host, where it cannot be checked), :class:`LockedError` says who holds it; if its
    process is dead the lock is stale and taken over. Use as a context manager.
    """

    def __init__(self, path: str | Path, command: str | None = None, what: str = "writing") -> None:
        self.path = Path(path)
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.what = what
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The holder's record, {} if unreadable (being written), None if there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else {}
        except ValueError:
            parts = text.split()  # the older "host pid" form
            if len(parts) == 2 and parts[1].isdigit():
                return {"host": parts[0], "pid": int(parts[1])}
            return {}

    def live_holder(self) -> dict[str, Any] | None:
        """The record of the live process that holds the lock, or None (no lock, or a stale one)."""
        info = self.holder()
        return info if info and self._holder_alive(info) else None

    def _holder_alive(self, info: dict[str, Any]) -> bool:
        pid = info.get("pid")
        if not isinstance(pid, int):
            return False  # unreadable or damaged: nobody can be shown to hold it
        if info.get("host") != host_name():
            return True  # another machine's process: cannot check, trust it
        return pid == os.getpid() or pid_alive(pid)

    def describe(self, info: dict[str, Any]) -> str:
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
        if info.get("command"):
            who += f" ({info['command']})"
        return who

    def try_acquire(self) -> bool:
        """True: the lock is ours. False: a live process holds it (see :meth:`holder`)."""
        record = json.dumps({"pid": os.getpid(), "host": host_name(), "command": self.command})
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue  # released meanwhile
                if info.get("pid") == os.getpid() and info.get("host") == host_name():
                    self.held = True  # re-entered by the same process
                    return True
                if info == {} or self._holder_alive(info):
                    if info == {} and self._stale_unreadable():
                        self.path.unlink(missing_ok=True)
                        continue
                    return False
                self.path.unlink(missing_ok=True)  # stale: its process died
                continue
            except OSError as err:
                raise write_error(err, self.path.parent, "take the lock") from None
            try:
                os.write(fd, record.encode())
            finally:
                os.close(fd)
            self.held = True
            return True
        return False

    def _stale_unreadable(self) -> bool:
        """An empty or damaged lock older than a few seconds belongs to nobody."""
        import time

        try:
            return time.time() - self.path.stat().st_mtime > 5.0
        except OSError:
            return False

    def acquire(self) -> "RunLock":
        if not self.try_acquire():
            info = self.holder() or {}
            raise LockedError(f"{self.path.parent} is in use by another process: {self.describe(info)} is "
                              f"{self.what} there (lock file {self.path}); wait for it or stop it")
        return self

    def acquire_or_wait(self, done: Callable[[], bool], log: Callable[[str], None] | None = None,
                        poll: float = 1.0) -> bool:
        """For work one process does for all (a shared cache, a generated dataset): True when the
        lock is ours and we must do the work; False when ``done()`` says another process did it
        while we waited. Waits while a live holder works; takes over a dead holder's lock."""
        import time

        waited = 0
        while True:
            if done():
                return False
            if self.try_acquire():
                return True
            if log is not None and waited % 30 == 0:
                log(f"waiting for {self.describe(self.holder() or {})} to finish {self.what} {self.path.parent}")
            time.sleep(poll)
            waited += 1

    def release(self) -> None:
        if self.held:
            info = self.holder()
            if info and info.get("pid") == os.getpid() and info.get("host") == host_name():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------ ownership
#
# A folder is the project's only if it carries the project's marker: a small JSON file that the
# project writes into every folder it creates for a run, a model, a prepared dataset or an
# evaluation. A folder without it that holds anything is someone else's: it is refused, never
# written into, and --overwrite removes only files that the project writes in a folder of that
# kind, never the rest.

#: The marker's name (hidden, so listings of a folder's files leave it out).
MARKER = ".show-attend-tell.json"
#: What each kind of folder is called in messages.
FOLDER_KINDS = {"run": "training run folder", "model": "model folder", "prepared": "prepared dataset folder",
                "evaluation": "evaluation folder", "study": "study folder", "benchmark": "benchmark folder"}


class ForeignFolderError(ValueError):
    """A folder holds files the project did not write, or is another kind of the project's folders."""


def folder_kind(folder: str | Path) -> str | None:
    """The kind named by ``folder``'s marker ("run", "model", "prepared", "evaluation", "study",
    "benchmark"), or None
    when the folder carries no readable marker (it is then not the project's)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if kind in FOLDER_KINDS else None


def mark_folder(folder: str | Path, kind: str) -> None:
    """Write ``folder``'s marker (the folder exists): from now on the project may write there."""
    from captioning import __version__

    atomic_write_json(Path(folder) / MARKER, {"kind": kind, "written_by": "show-attend-tell",
                                              "version": __version__})


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_folder(folder: str | Path, kind: str, option: str | None = None) -> bool:
    """Refuse (ForeignFolderError, one line with the fix) a ``folder`` the project may not write as
    a folder of ``kind``: a file, a folder of another kind, or a non-empty folder without the
    marker. ``option`` names the command-line option that gave the folder, for the fix.
    -> whether the folder is already ours (False: missing or empty). Writes nothing."""
    folder = Path(folder)
    other = f"choose another {option}" if option else "choose another folder"
    if folder.exists() and not folder.is_dir():
        raise ForeignFolderError(f"{folder} is a file, not a folder: {other}")
    found = folder_kind(folder)
    if found == kind:
        return True
    if found is not None:
        raise ForeignFolderError(f"{folder} is a {FOLDER_KINDS[found]} of show-attend-tell, not a "
                                 f"{FOLDER_KINDS[kind]}: {other}")
    try:
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    except OSError as err:
        raise write_error(err, folder) from None
    if entries:
        raise ForeignFolderError(
            f"{folder} is not empty and was not written by show-attend-tell (it holds {_shown(entries)}, and no "
            f"{MARKER}): nothing was written; {other}, new or empty")
    return False


def claim_folder(folder: str | Path, kind: str, option: str | None = None, what: str = "write") -> Path:
    """:func:`check_folder`, then create ``folder`` if needed (proving it writable: FileWriteError
    'cannot ``what`` into ...') and mark it as a folder of ``kind``."""
    folder = Path(folder)
    if not check_folder(folder, kind, option):
        check_writable(folder, what)
        try:
            mark_folder(folder, kind)
        except OSError as err:
            raise write_error(err, folder, what) from None
    return folder


def remove_own(folder: str | Path, names: Iterable[str]) -> list[str]:
    """Remove the entries of ``names`` (files or folders the project writes) from ``folder``, which
    must carry the marker; nothing else in it is touched. -> the names removed."""
    folder = Path(folder)
    if folder_kind(folder) is None:
        raise ForeignFolderError(f"{folder} carries no {MARKER} marker: the project removes nothing there")
    removed = []
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed

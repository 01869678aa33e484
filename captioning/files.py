"""Files that are never half-written, folders that appear whole, and one run per folder.

Every file the project writes goes through :func:`atomic_write` or :func:`atomic_path`: the bytes
go to a temporary file in the *same* folder, are fsync'ed, then ``os.replace`` puts them under the
final name, an atomic rename on POSIX file systems, so a reader (or the run after a kill -9 or a
full disk) sees the old file or the new one. A temporary file in ``$TMPDIR`` would not do: moving
it to another file system is a copy, which can be interrupted half-way. :func:`atomic_folder` and
:func:`replacing_folder` do the same for folders; :class:`RunLock` is a lock the kernel holds
(flock). A folder is the project's only if it carries its marker (:data:`MARKER`,
:func:`claim_folder`), and files it takes as its own are opened without following a link or
blocking on a FIFO (:func:`open_regular`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from captioning.console import CaptioningError, InvalidValue

#: Prefix of the temporary siblings of files being written: ``.tmp-<pid>-<n>-NAME`` (hidden, and
#: ending in NAME so writers that add a suffix, such as ``np.save``, keep the name as given).
TMP_PREFIX = ".tmp-"

_counter = iter(range(1 << 62))
_counter_lock = threading.Lock()


class _OneLineOSError(CaptioningError, OSError):
    """An OSError the user must fix, shown as its one-line message."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


class FileWriteError(_OneLineOSError):
    """A write failed for a reason the user must fix (full disk, no permission, read-only)."""


_FREE_SPACE = "; free some space or choose another --out-dir"
_PERMISSIONS = ("permission denied", "; fix its permissions or choose another --out-dir")
#: errno -> (the cause, the fix) of the write errors a user must fix.
_REASONS = {
    errno.ENOSPC: ("no space left on the device", _FREE_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _FREE_SPACE),
    errno.EACCES: _PERMISSIONS,
    errno.EPERM: _PERMISSIONS,
    errno.EROFS: ("read-only file system", "; choose another --out-dir"),
}


def write_error(err: OSError, folder: str | Path, what: str = "write") -> FileWriteError:
    """One line naming the folder and the cause: 'cannot write into runs/x: no space left ...'."""
    reason, hint = _REASONS.get(err.errno or 0, (err.strerror or type(err).__name__, ""))
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
    with contextlib.suppress(OSError):  # some file systems refuse fsync on folders; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
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
    """Yield a temporary path beside ``path`` for writers that need a file name (``np.save``,
    ``torch.save``); on success it is fsync'ed and renamed to ``path``. On any failure it is removed
    and ``path`` is untouched; the errors of :data:`_REASONS` become a :class:`FileWriteError`. The
    file gets the mode a plain ``open()`` gives: some writers (safetensors) make theirs owner-only."""
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


def atomic_write(path: str | Path, data: str | bytes | memoryview | Callable[[Any], None]) -> Path:
    """Write ``data`` (text, bytes, or a function given the open text file) to ``path`` atomically."""
    path = Path(path)
    binary = isinstance(data, (bytes, bytearray, memoryview))
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **kwargs: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, **kwargs) + ("\n" if indent is not None else ""))


def remove_temporaries(folder: str | Path) -> int:
    """Remove ``.tmp-<pid>-<n>-NAME`` files that dead processes of this host left in ``folder``."""
    removed = 0
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*"):  # nothing for a missing folder
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


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield ``final.partial/`` to write into; renamed to ``final`` when the block completes. On an
    exception it is removed."""
    final = Path(final)
    partial = partial_name(final)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_folder(partial, final)


# ------------------------------------------------------------------------------ locks


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # exists, owned by someone else
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


class LockedError(CaptioningError, RuntimeError):
    """Another live process holds the lock."""


class NotARegularFileError(_OneLineOSError):
    """A path the project reads or writes as its own file is a link, a FIFO, a device or a folder."""


def kind_of(mode: int) -> str:
    """What a path of this ``st_mode`` is, said as a message says it: "a folder", "a FIFO", ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, flags: int = os.O_RDONLY, follow_links: bool = False) -> int:
    """``os.open`` that refuses (NotARegularFileError, one line) anything but a regular file -> the
    descriptor. O_NOFOLLOW fails on a link (ELOOP), O_NONBLOCK opens a FIFO without waiting for a
    writer (open(2)); fstat then tells what was opened, with no window between check and use.
    ``follow_links``: a link is followed (a user's image may be one); a FIFO is still refused."""
    path = Path(path)
    nofollow = 0 if follow_links else os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotARegularFileError(errno.ELOOP, f"{path} is a link, not a regular file") from None
        if err.errno == errno.EISDIR:
            raise NotARegularFileError(errno.EISDIR, f"{path} is a folder, not a regular file") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotARegularFileError(errno.EINVAL, f"{path} is {kind_of(info.st_mode)}, not a regular file")
    return fd


def read_regular(path: str | Path, limit: int = 1 << 20) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`), at most ``limit`` of them
    (a larger file is refused with ValueError: none of the project's small records is that big)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidValue(f"{path} is larger than {limit} bytes")
    return data


def result_file_problem(path: Path, option: str, ours: Callable[[Any], bool], what: str,
                        example: str) -> str | None:
    """Why the JSON result file ``path``, given as ``option``, may not be written, or None: a link, a
    folder (``example``: a file name to suggest in it), not a file, or a file whose parsed contents
    ``ours`` does not recognise as ``what`` (the project never overwrites a file of someone else's)."""
    if path.is_symlink():
        return f"{option} {path} is a link: show-attend-tell writes nothing through a link; choose another {option}"
    if not path.exists():
        return None
    if path.is_dir():
        return f"{option} {path} is a folder: name the JSON file to write, such as {path / example}"
    if not path.is_file():
        return f"{option} {path} is not a file: choose another {option}"
    try:
        data = json.loads(read_regular(path, 1 << 24))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        data = None
    return None if ours(data) else f"{option} {path} exists and is not {what}: choose another {option}"


#: (device, inode) of the lock files this process holds -> their descriptors: a second RunLock
#: of the same file in the same process re-enters instead of refusing its own process.
_held_here: dict[tuple[int, int], int] = {}


def _forget_locks_in_child() -> None:
    """A forked child (a worker of a pool, a data loader) shares the parent's lock: flock belongs
    to the open file, which fork shares (flock(2)). Its copy is closed, so a child that outlives
    a killed parent does not keep the folder locked."""
    for fd in _held_here.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_here.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _file_key(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _flock(fd: int, exclusive: bool) -> bool:
    """flock(2) without waiting -> False when another open file holds the lock."""
    import fcntl  # POSIX only: imported where a lock is taken, not with the module

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class RunLock:
    """A lock on ``path`` that the kernel holds for the process (flock(2)), with a record of
    ``{"pid", "host", "command"}`` in the file for messages. The kernel releases it when its
    process ends, however it ends, so no pid is ever guessed alive or dead. A lock path that is
    not a regular file is refused (:func:`open_regular`). Use as a context manager."""

    def __init__(self, path: str | Path, command: str | None = None, what: str = "writing") -> None:
        self.path = Path(path)
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.what = what
        self.held = False
        self._fd: int | None = None
        self._pid = os.getpid()

    def holder(self) -> dict[str, Any] | None:
        """The record in the lock file, {} if unreadable (being written), None if there is no lock."""
        try:
            info = json.loads(read_regular(self.path, 1 << 16).decode("utf-8", "replace"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def live_holder(self) -> dict[str, Any] | None:
        """The record of the live process that holds the lock, or None (nobody else holds it)."""
        if self.held:
            return None
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return {}  # not a regular file: nobody can be shown not to hold it
        try:
            if _file_key(fd) in _held_here or _flock(fd, exclusive=False):
                return None  # this process holds it, or nobody does
            return self.holder() or {}
        finally:
            os.close(fd)  # closing drops the shared lock taken to look

    def _is_at_path(self, fd: int) -> bool:
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def describe(self, info: dict[str, Any]) -> str:
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
        if info.get("command"):
            who += f" ({info['command']})"
        return who

    def try_acquire(self) -> bool:
        """True: the lock is ours. False: a live process holds it (see :meth:`holder`).
        Raises NotARegularFileError for a lock path that is a link, FIFO or device."""
        if self.held:
            return True
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}).encode()
        for _ in range(100):
            try:
                fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
            except NotARegularFileError:
                raise
            except OSError as err:
                raise write_error(err, self.path.parent, "take the lock") from None
            if not _flock(fd, exclusive=True):
                key = _file_key(fd)
                os.close(fd)
                self.held = key in _held_here  # re-entered by this process, whose first holder releases it
                return self.held
            # A holder that released the lock unlinks its file first: if ours is no longer the file
            # at the path, another process may be locking a new one; start again on that.
            if not self._is_at_path(fd):
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, record)
            except OSError as err:
                os.close(fd)
                raise write_error(err, self.path.parent, "take the lock") from None
            _held_here[_file_key(fd)] = fd
            self._fd, self._pid = fd, os.getpid()
            self.held = True
            return True
        return False

    def acquire(self) -> "RunLock":
        try:
            taken = self.try_acquire()
        except NotARegularFileError as err:
            raise LockedError(f"{err}: the lock file of {self.path.parent} must be a regular file; remove it if it "
                              "is not yours to keep, then run again") from None
        if not taken:
            raise LockedError(f"{self.path.parent} is in use by another process: {self.describe(self.holder() or {})} "
                              f"is {self.what} there (lock file {self.path}); wait for it or stop it")
        return self

    def acquire_or_wait(self, done: Callable[[], bool], log: Callable[[str], None] | None = None) -> bool:
        """For work one process does for all (a shared cache, a generated dataset): True when the
        lock is ours and we must do the work; False when ``done()`` says another process did it
        while we waited. Waits while a live holder works, looking again each second."""
        import time

        waited = 0
        while True:
            if done():
                return False
            try:
                if self.try_acquire():
                    return True
            except NotARegularFileError as err:
                raise LockedError(f"{err}: remove it, then run again") from None
            if log is not None and waited % 30 == 0:
                log(f"waiting for {self.describe(self.holder() or {})} to finish {self.what} {self.path.parent}")
            time.sleep(1.0)
            waited += 1

    def release(self) -> None:
        if self.held and self._fd is not None and self._pid == os.getpid():  # not in a forked child
            # Unlinked while still locked, so no other process can lock this file after us and
            # believe it holds the path (see try_acquire).
            with contextlib.suppress(OSError):
                if self._is_at_path(self._fd):
                    self.path.unlink()
            _held_here.pop(_file_key(self._fd), None)
            os.close(self._fd)
        self._fd = None
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------ ownership
#
# A folder without the project's marker that holds anything is someone else's: it is refused,
# and --overwrite removes only the files the project writes in a folder of that kind.

#: The marker's name (hidden, so listings of a folder's files leave it out).
MARKER = ".show-attend-tell.json"
#: What each kind of folder is called in messages.
FOLDER_KINDS = {"run": "training run folder", "model": "model folder", "prepared": "prepared dataset folder",
                "evaluation": "evaluation folder", "study": "study folder", "benchmark": "benchmark folder",
                "figures": "attention figure folder", "example": "example dataset folder",
                "features": "feature cache folder"}


class ForeignFolderError(CaptioningError, ValueError):
    """A folder holds files the project did not write, or is another kind of the project's folders."""


def _marker_record(folder: Path) -> dict | None:
    """The marker of ``folder`` as written, or None when there is none. A marker that is a link,
    FIFO or device, or not a JSON mapping, is refused (ForeignFolderError, one line)."""
    path = folder / MARKER
    try:
        data = json.loads(read_regular(path, 1 << 16))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except NotARegularFileError as err:
        raise ForeignFolderError(f"{err}: {folder} is not a folder show-attend-tell made; nothing was written") \
            from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise ForeignFolderError(f"{path} is not a marker show-attend-tell wrote (unreadable or not JSON): {folder} "
                                 "is not a folder it made; nothing was written") from None
    if not isinstance(data, dict):
        raise ForeignFolderError(f"{path} is not a marker show-attend-tell wrote: {folder} is not a folder it made")
    return data


def read_marker(folder: str | Path, name_as: str | Path | None = None) -> dict | None:
    """``folder``'s marker (a regular file of a known kind naming this folder's real path and a
    random id), or None when there is none; one not ours (a link, a FIFO, a copy from another
    folder, an older version's) raises ForeignFolderError. ``name_as``: the folder the marker
    must name, when ``folder`` is a staged copy of it."""
    folder = Path(folder)
    data = _marker_record(folder)
    if data is None:
        return None
    kind, named, ident = data.get("kind"), data.get("folder"), data.get("id")
    if kind not in FOLDER_KINDS or not isinstance(named, str) or not isinstance(ident, str) or not ident:
        raise ForeignFolderError(f"{folder / MARKER} does not name its folder and id (copied, edited or written by an "
                                 f"older version): {folder} is not taken as show-attend-tell's; nothing was written; "
                                 "use a new folder")
    if named != os.path.realpath(name_as if name_as is not None else folder):
        raise ForeignFolderError(f"{folder / MARKER} was written for {named}, not for this folder (copied or moved): "
                                 f"{folder} is not taken as show-attend-tell's; nothing was written; use a new folder")
    return data


def folder_kind(folder: str | Path, name_as: str | Path | None = None) -> str | None:
    """The kind (:data:`FOLDER_KINDS`) named by ``folder``'s marker, or None without one
    (:func:`read_marker`)."""
    data = read_marker(folder, name_as)
    return data["kind"] if data else None


def folder_id(folder: str | Path) -> str | None:
    """The random id of ``folder``'s marker (our files in it record it too), or None."""
    data = read_marker(folder)
    return data["id"] if data else None


def mark_folder(folder: str | Path, kind: str, name_as: str | Path | None = None) -> str:
    """Write ``folder``'s marker, naming its real path (``name_as``'s, for a staged folder renamed to
    it) and a new random id. -> the id."""
    import uuid

    from captioning import __version__

    ident = uuid.uuid4().hex
    atomic_write_json(Path(folder) / MARKER, {"kind": kind, "written_by": "show-attend-tell", "version": __version__,
                                              "folder": os.path.realpath(name_as if name_as is not None else folder),
                                              "id": ident})
    return ident


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_folder(folder: str | Path, kind: str, option: str | None = None, name_as: str | Path | None = None) -> bool:
    """Refuse (ForeignFolderError, one line with the fix) a ``folder`` the project may not write as
    a folder of ``kind``: a file, a dangling link, a folder of another kind or with a marker not
    ours, a non-empty folder without the marker. ``option``: the command-line option that gave
    it. -> whether the folder is already ours (False: missing or empty). Writes nothing."""
    folder = Path(folder)
    other = f"choose another {option}" if option else "choose another folder"
    if folder.is_symlink() and not folder.exists():
        raise ForeignFolderError(f"{folder} is a link to nothing ({os.readlink(folder)}): {other}")
    if folder.exists() and not folder.is_dir():
        raise ForeignFolderError(f"{folder} is a file, not a folder: {other}")
    try:
        found = folder_kind(folder, name_as)
    except ForeignFolderError as err:
        raise ForeignFolderError(f"{err} ({other})") from None
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


def claim_folder(folder: str | Path, kind: str, option: str | None = None, what: str = "write",
                 name_as: str | Path | None = None) -> Path:
    """:func:`check_folder`, then create ``folder`` if needed (proving it writable: FileWriteError
    'cannot ``what`` into ...') and mark it as a folder of ``kind``."""
    folder = Path(folder)
    if not check_folder(folder, kind, option, name_as):
        check_writable(folder, what)
        try:
            mark_folder(folder, kind, name_as)
        except OSError as err:
            raise write_error(err, folder, what) from None
    return folder


def check_no_links(folder: str | Path, names: Iterable[str], option: str | None = None) -> None:
    """Refuse (ForeignFolderError) a ``folder`` where one of ``names`` (what a command writes
    there) is a link: the project writes nothing through a link, into a place it did not choose."""
    folder = Path(folder)
    links = [name for name in names if (folder / name).is_symlink()]
    if links:
        other = f", or choose another {option}" if option else ""
        raise ForeignFolderError(f"{folder / links[0]} is a link ({os.readlink(folder / links[0])}): show-attend-tell "
                                 f"writes nothing through a link; move it out of {folder}{other}")


def remove_own(folder: str | Path, names: Iterable[str]) -> None:
    """Remove the entries of ``names`` (what the project writes) from ``folder``, which must carry
    the project's marker; nothing else is touched."""
    folder = Path(folder)
    if folder_kind(folder) is None:
        raise ForeignFolderError(f"{folder} carries no {MARKER} marker: the project removes nothing there")
    for name in names:
        if (folder / name).exists() or (folder / name).is_symlink():
            _remove(folder / name)


def _remove(path: Path) -> None:
    """Remove a file, a folder, or a link itself (never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ------------------------------------------------------------------------------ replacing folders


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). -> False where the
    system or the file system cannot (the caller then renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h> AT_FDCWD, <linux/fs.h> RENAME_EXCHANGE
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _staged_name(final: Path, role: str) -> Path:
    return final.with_name(f".{final.name}.{role}-{os.getpid()}")


def remove_leftovers(final: str | Path, own_names: Iterable[str]) -> None:
    """Remove what a killed replacement of ``final`` left beside it: ``own_names`` from the
    ``.NAME.new-PID`` and ``.NAME.old-PID`` folders of dead processes whose marker names ``final``,
    then each folder if that emptied it."""
    final = Path(final)
    for path in final.parent.glob(f".{glob.escape(final.name)}.*-*"):  # nothing for a missing folder
        role, _, pid = path.name[len(final.name) + 2:].rpartition("-")
        if role not in ("new", "old") or not pid.isdigit() or pid_alive(int(pid)) or path.is_symlink() \
                or not path.is_dir():
            continue
        try:
            if read_marker(path, name_as=final) is None:
                continue
        except ForeignFolderError:
            continue
        _remove_staged(path, own_names)


def _remove_staged(folder: Path, own_names: Iterable[str]) -> None:
    """Remove ``own_names`` and the marker from ``folder``, then the folder if that emptied it."""
    for name in [*own_names, MARKER]:
        with contextlib.suppress(OSError):
            _remove(folder / name)
    with contextlib.suppress(OSError):  # not empty: a file of someone else's is kept
        folder.rmdir()


def _put_in_place(staged: Path, final: Path) -> Path | None:
    """Rename ``staged`` to ``final``. An existing ``final`` is exchanged with it in one atomic
    step where the system can (a reader, or a kill, sees the old folder or the new, whole), else
    moved aside first. -> where the old folder now is, or None when there was none."""
    if not (final.exists() or final.is_symlink()):
        os.replace(staged, final)
        return None
    if _exchange(staged, final):
        return staged
    old = _staged_name(final, "old")
    os.replace(final, old)
    os.replace(staged, final)
    return old


def publish_folder(staged: str | Path, final: str | Path) -> None:
    """Put the complete folder ``staged`` at ``final`` (:func:`_put_in_place`); the old folder is
    removed last."""
    staged, final = Path(staged), Path(final)
    old = _put_in_place(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(final.parent)


@contextlib.contextmanager
def replacing_folder(final: str | Path, kind: str, own_names: Iterable[str], option: str | None = None,
                     what: str = "write") -> Iterator[Path]:
    """Yield a new, marked folder beside ``final`` to write whole; on success it replaces ``final``
    (:func:`_put_in_place`), which holds the old folder, intact, until then. ``final`` must be new,
    empty, or a folder of ``kind`` (:func:`check_folder`); ``own_names``: what the command writes
    there. A file of anyone else's in the old folder is moved into the new one. On an exception
    the new folder is removed and ``final`` is as it was."""
    final = Path(final)
    own = [*own_names]
    ours = check_folder(final, kind, option)
    remove_leftovers(final, own)
    check_writable(final.parent, what)
    staged = _staged_name(final, "new")
    if staged.exists():
        shutil.rmtree(staged)
    try:
        staged.mkdir()
        mark_folder(staged, kind, name_as=final)
    except OSError as err:
        shutil.rmtree(staged, ignore_errors=True)
        raise write_error(err, final.parent, what) from None
    try:
        yield staged
        for path in staged.iterdir():  # on disk before the folder is renamed into place
            if path.is_file() and not path.is_symlink():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        if final.is_dir() and not ours and not any(final.iterdir()):
            final.rmdir()  # an empty folder of the user's becomes the new folder
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    old = _put_in_place(staged, final)
    if old is not None:
        keep = set(own) | {MARKER}
        for path in old.iterdir():  # a file of the user's beside the model stays beside it
            if path.name not in keep and not (final / path.name).exists():
                with contextlib.suppress(OSError):
                    os.replace(path, final / path.name)
        _remove_staged(old, own)
    _fsync_folder(final.parent)

"""Files never half-written (kill -9, full disk), folders that appear whole, one process per folder."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from captioning import files
from captioning.files import FileWriteError, LockedError, RunLock, atomic_folder, atomic_write, atomic_write_json
from captioning.training.trainer import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 1 MiB file system: a real tmpfs when running as root where mount works, else a simulated
    ENOSPC once 1 MiB has been written by one file. -> (folder, simulated)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    if not mounted:
        real_open = open

        class Full:
            def __init__(self, f):
                self.f, self.n = f, 0

            def write(self, data):
                self.n += len(data)
                if self.n > 1 << 20:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def small_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return Full(f) if "w" in mode and str(path).startswith(str(folder)) else f

        monkeypatch.setattr("builtins.open", small_open)
    yield folder, not mounted
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


# ------------------------------------------------------------------------------ atomic files


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"bleu": 1})
    assert json.loads(path.read_text()) == {"bleu": 1}

    def half_then_fail(f):
        f.write('{"bleu": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"bleu": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left


def test_full_disk_is_one_line_naming_the_folder(small_disk):
    folder, _ = small_disk
    path = folder / "predictions.json"
    atomic_write(path, "good")
    with pytest.raises(FileWriteError) as info:
        atomic_write(path, b"x" * (2 << 20))
    message = str(info.value)
    assert "no space left" in message and str(folder) in message and "\n" not in message
    assert path.read_text() == "good"
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.json"]


def test_check_writable_names_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileWriteError, match="a part of the path is a file"):
        files.check_writable(blocker / "out")
    assert files.check_writable(tmp_path / "new" / "out").is_dir()
    assert list((tmp_path / "new" / "out").iterdir()) == []


def test_remove_temporaries_only_of_dead_processes(tmp_path):
    dead = tmp_path / f".tmp-{_dead_pid()}-0-last.ckpt"
    live = tmp_path / f".tmp-{os.getpid()}-0-best.ckpt"
    for path in (dead, live):
        path.write_bytes(b"half")
    assert files.remove_temporaries(tmp_path) == 1
    assert not dead.exists() and live.exists()


def test_atomic_folder(tmp_path):
    final = tmp_path / "prepared"
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as partial:
            (partial / "a.npy").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(final) as partial:
        assert partial.name == "prepared.partial"
        (partial / "a.npy").write_bytes(b"whole")
    assert (final / "a.npy").read_bytes() == b"whole" and not partial.exists()


# ------------------------------------------------------------------------------ locks


_HOLDER = textwrap.dedent("""
    import sys, time
    from captioning.files import RunLock
    lock = RunLock(sys.argv[1], command="train.py --seed 7").acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def _holder(path: Path) -> subprocess.Popen:
    """A process that holds the lock ``path`` (the kernel's) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_live_holder_and_names_it(tmp_path):
    other = _holder(tmp_path / "lock")
    try:
        with pytest.raises(LockedError) as info:
            RunLock(tmp_path / "lock", what="training").acquire()
        assert RunLock(tmp_path / "lock").live_holder()["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
    message = str(info.value)
    assert f"pid {other.pid}" in message and "train.py --seed 7" in message and "training" in message
    assert "\n" not in message


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    path = tmp_path / "lock"
    other = _holder(path)
    other.kill()
    other.wait()
    assert path.exists() and RunLock(path).live_holder() is None  # left behind, but nobody holds it
    with RunLock(path, command="train.py") as lock:
        assert lock.holder() == {"pid": os.getpid(), "host": socket.gethostname(), "command": "train.py"}
    assert not path.exists()


_FORKER = textwrap.dedent("""
    import os, sys, time
    from captioning.files import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    if os.fork() == 0:  # a pool worker or data loader, which outlives its killed parent here
        open(sys.argv[1] + ".child", "w").close()  # after the fork handlers ran in the child
        time.sleep(60)
        os._exit(0)
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_forked_child_does_not_keep_a_killed_parents_lock(tmp_path):
    """flock belongs to the open file, which fork shares: the child's copy is closed at fork."""
    path = tmp_path / "lock"
    proc = subprocess.Popen([sys.executable, "-c", _FORKER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        deadline = time.monotonic() + 60
        while not path.with_name("lock.child").exists():
            assert time.monotonic() < deadline, "the forked child never ran"
            time.sleep(0.05)
        assert not RunLock(path).try_acquire()
        proc.kill()
        proc.wait()
        with RunLock(path):  # the child still runs, the lock is free
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # the child, in the session started for it


def test_a_lock_record_naming_a_live_process_is_not_a_lock(tmp_path):
    path = tmp_path / "lock"  # a file that says a live process holds it, while no process holds the kernel lock
    path.write_text(json.dumps({"pid": 1, "host": "some-other-node", "command": "x"}))
    with RunLock(path):
        assert RunLock(path).live_holder() is None  # the same process re-enters
    assert not path.exists()


@pytest.mark.parametrize("kind", ["fifo", "link to a file", "link to /dev/zero", "dangling link", "folder"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path, kind):
    path, target = tmp_path / "train.lock", tmp_path / "someone's file"
    target.write_text("keep")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to({"link to a file": target, "link to /dev/zero": Path("/dev/zero"),
                         "dangling link": tmp_path / "nothing"}[kind])
    started = time.monotonic()
    with pytest.raises(LockedError, match="must be a regular file") as info:
        RunLock(path).acquire()
    assert time.monotonic() - started < 10 and "\n" not in str(info.value)
    assert target.read_text() == "keep" and not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------------------ checkpoints


_SAVER = textwrap.dedent("""
    import sys, torch
    from captioning.training.trainer import AtomicCheckpointIO
    from pytorch_lightning.plugins.io import TorchCheckpointIO
    io = AtomicCheckpointIO() if sys.argv[2] == "atomic" else TorchCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "epoch": 1}, sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(48 << 20, dtype=torch.uint8)}, "epoch": 2}, sys.argv[1])
    print("saved", flush=True)
""")


def _kill_during_save(out: Path, tmpdir: Path, kind: str) -> bool:
    """Start a second save of out/best.ckpt and SIGKILL the process as soon as bytes of it appear
    anywhere (the folder or $TMPDIR). -> whether the kill came before the save finished."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(out / "best.ckpt"), kind], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    before = (out / "best.ckpt").stat()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        now = (out / "best.ckpt").stat() if (out / "best.ckpt").exists() else None
        others = [p for folder in (out, tmpdir) for p in folder.iterdir() if p.name != "best.ckpt"]
        if any(p.is_file() and p.stat().st_size > 0 for p in others) or now is None or \
                (now.st_mtime_ns, now.st_size) != (before.st_mtime_ns, before.st_size):
            proc.kill()
            break
    proc.wait()
    return proc.returncode == -9


def test_kill_9_during_a_checkpoint_save_keeps_the_old_one(tmp_path):
    out, tmpdir = tmp_path / "run", tmp_path / "tmp"
    out.mkdir()
    tmpdir.mkdir()
    assert _kill_during_save(out, tmpdir, "atomic")
    ckpt = torch.load(out / "best.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(4))
    assert list(tmpdir.iterdir()) == []  # nothing leaks into $TMPDIR
    files.remove_temporaries(out)  # the next run clears the dead process's half-written temporary
    assert [p.name for p in out.iterdir()] == ["best.ckpt"]


def test_full_disk_during_a_checkpoint_save_keeps_the_old_one(small_disk):
    folder, _ = small_disk
    path = folder / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "epoch": 1}, path)
    big = {"state_dict": {"w": torch.zeros(2 << 20, dtype=torch.uint8)}, "epoch": 2}
    with pytest.raises(FileWriteError, match=f"cannot write into {folder}: no space left"):
        io.save_checkpoint(big, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]

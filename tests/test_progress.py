"""The one progress helper, the device helper's peak memory, and the package's import layering
and boundaries."""

from __future__ import annotations

import ast
import io
import sys
from pathlib import Path
from types import SimpleNamespace

from captioning import device
from captioning.progress import Progress, format_duration

PACKAGE = Path(__file__).resolve().parents[1] / "captioning"


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()  # not a tty: no bar, plain lines
    bar = Progress(5, "caption", stream=stream)
    bar.update(2)
    bar.update(3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[-1].startswith("caption: 5/5 images (100%), ") and "images/s" in lines[-1] and "ETA 0s" in lines[-1]


def test_interval_thins_lines_but_keeps_the_last():
    stream = io.StringIO()
    bar = Progress(100, "prepare", stream=stream, interval=3600.0, initial=40)
    for _ in range(6):
        bar.update(10)
    lines = stream.getvalue().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("prepare: 100/100 images (100%)")


def test_a_note_follows_the_counts_on_lines_and_on_a_bar():
    stream = io.StringIO()
    bar = Progress(4, "epoch 1/6", unit="batches", stream=stream)
    bar.update(2, "loss 3.250")
    bar.update(2)  # the note stays until another replaces it
    assert all(line.endswith(", loss 3.250") for line in stream.getvalue().splitlines())

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(4, "epoch 1/6", unit="batches", stream=screen)
    bar.update(4, "loss 2.500")
    assert "epoch 1/6" in screen.getvalue() and "loss 2.500" in screen.getvalue() and "\r" in screen.getvalue()


def test_disabled_prints_nothing():
    stream = io.StringIO()
    Progress(3, "x", enabled=False, stream=stream).update(3)
    assert stream.getvalue() == ""


def test_format_duration():
    assert [format_duration(s) for s in (4.6, 187, 7500)] == ["5s", "3m07s", "2h05m"]


def _fake_resource(maxrss: int) -> SimpleNamespace:
    usage = SimpleNamespace(ru_maxrss=maxrss)
    return SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: usage)


def test_peak_memory_units_per_platform(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", _fake_resource(3 * 2**20))
    monkeypatch.setattr(device.sys, "platform", "linux")
    assert device.peak_rss_mib() == 3072.0  # KiB on Linux
    monkeypatch.setattr(device.sys, "platform", "darwin")
    assert device.peak_rss_mib() == 3.0  # bytes on macOS


def test_peak_memory_without_resource_or_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: importing it fails
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert device.peak_rss_mib() is None


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_the_cli_or_a_posix_only_module_at_top():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__main__.py":
            assert "captioning.cli" not in _imports(path), path
        top = {alias.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.Import)
               for alias in node.names}
        assert not top & {"resource", "fcntl", "termios", "pwd", "grp"}, path


def test_store_does_not_import_the_datamodule():
    assert not any(name.startswith("captioning.data.datamodule") for name in _imports(PACKAGE / "data" / "store.py"))


def test_no_module_uses_another_modules_private_names():
    """A name with a leading underscore is its module's own: no `from captioning.x import _y`, and
    no `x._y` where x names a module or an object imported from the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("captioning"):
                found += [f"{path}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
                imported.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("captioning"))
        found += [f"{path}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and _private(node.attr) and _root(node.value) in imported]
    assert not found, found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None

"""Every error the package raises to its users has one home: console.CaptioningError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import captioning
from captioning import cli
from captioning.console import CaptioningError


def _package_exceptions() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(captioning.__path__, "captioning."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            # A private class is a module's own control flow (a parser's backtracking), never shown.
            public = not name.startswith("_")
            if public and inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_class_of_the_package_derives_from_the_one_base():
    found = _package_exceptions()
    assert len(found) >= 20  # the walk saw the package's error classes
    assert [name for name, cls in found.items() if not issubclass(cls, CaptioningError)] == []


def test_an_error_keeps_its_builtin_base_and_is_one_line():
    from captioning.config import ConfigError
    from captioning.files import FileWriteError

    assert issubclass(ConfigError, ValueError) and issubclass(FileWriteError, OSError)
    assert str(ConfigError("a\n  b")) == "a b"
    err = FileWriteError(28, "no space left on the device: /x is full")
    assert isinstance(err, OSError) and err.errno == 28 and str(err) == "no space left on the device: /x is full"


def test_the_command_line_prints_an_escaped_error_once_with_its_exit_status(monkeypatch, capsys):
    class Refused(CaptioningError):
        exit_status = 3

    def workflow(argv, prog=None):
        raise Refused("cannot do that;\n do this instead")

    monkeypatch.setattr(cli, "workflow", lambda command: workflow)
    assert cli.main(["train"]) == 3
    assert capsys.readouterr().err == "error: cannot do that; do this instead\n"


@pytest.mark.parametrize("module", ["captioning.data.run", "captioning.study.run"])
def test_commands_exit_with_the_one_usage_status(module):
    from captioning.console import EXIT_USAGE

    assert EXIT_USAGE == 2 and not hasattr(importlib.import_module(module), "EXIT_ERROR")

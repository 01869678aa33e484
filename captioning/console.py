"""What every workflow's command line shares: exit statuses, one-line errors, argument types."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by it


def one_line(text: object, limit: int | None = None) -> str:
    """Collapse whitespace (newlines included) so a message stays on one line; at most ``limit`` characters."""
    return " ".join(str(text).split())[:limit]


class CaptioningError(Exception):
    """The base of every error the package raises to its users: the message names the problem and
    the fix, on one line; ``exit_status`` is what a command exits with when it ends on it. Each
    subclass keeps the built-in class it refines (ValueError, OSError, ...) as its second base, so
    ``except ValueError`` still catches what it caught."""

    exit_status = EXIT_USAGE

    def __str__(self) -> str:
        return one_line(super().__str__())


class InvalidValue(CaptioningError, ValueError):
    """An argument, option or file value the package cannot take."""


class InvalidType(CaptioningError, TypeError):
    """An argument of a type the package cannot take."""


class OperationFailed(CaptioningError, RuntimeError):
    """Work that could not be done (a scorer's Java process, a decoding process, a scene layout)."""


class UsageError(CaptioningError):
    """Nothing can be done (bad checkpoint, no images, bad settings): exit status 2."""


class CommandFailed(CaptioningError):
    """An error of the commands whose errors exit with status 1 (train, benchmark)."""

    exit_status = EXIT_SOME_FAILED


class Interrupted(CaptioningError):
    """Ctrl-C: "interrupted (Ctrl-C)", then what the interrupted work leaves behind, if it says."""

    exit_status = EXIT_INTERRUPTED

    def __init__(self, left: str | None = None) -> None:
        super().__init__("interrupted (Ctrl-C)" + (f"; {left}" if left else ""))


@contextlib.contextmanager
def interruptible(left: str | None = None) -> Iterator[None]:
    """Ctrl-C inside the block raises :class:`Interrupted` saying ``left``."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(left) from None


def print_error(message: object) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value

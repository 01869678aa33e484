"""What every workflow's command line shares: exit statuses, one-line errors, argument types."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Iterable, Iterator, Sequence

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process that wrote to a closed pipe


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


def whole_number(low: int, high: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (to ``high``); ``what`` names it in the error."""
    what = what or (f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = whole_number(1, what="a positive integer")


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """What a run records as the command that made it: ``prog`` and the arguments (this process's
    when ``argv`` is None), each quoted as a shell needs, so that the line can be run again."""
    return " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def option_set_outside(args: argparse.Namespace, defaults: argparse.Namespace, allowed: Iterable[str]) -> str | None:
    """The first option (its ``dest``, in the parser's order) that ``args`` sets away from its value in
    ``defaults`` (the parser's, ``parse_args([])``) and that is not ``allowed``, or None: what a mode
    that would ignore it refuses (an option silently ignored is a wrong answer)."""
    allowed, base = set(allowed), vars(defaults)
    return next((name for name, value in vars(args).items() if name not in allowed and value != base[name]), None)


def as_flag(dest: str) -> str:
    """An argparse ``dest`` as its command line writes it: "max_len" -> "--max-len"."""
    return "--" + dest.replace("_", "-")


def main_of(run: Callable[[list[str] | None, str | None], object]) -> Callable[..., int]:
    """A workflow's ``main(argv=None, prog=None)``: its ``run`` through :func:`guarded`."""
    def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        return guarded(lambda: run(None if argv is None else list(argv), prog))
    return main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT: KeyboardInterrupt, as Python's own handler raises it, but never in the middle of an
    import. Interrupted there, a C++ extension aborts the process ("terminate called after throwing
    ... KeyboardInterrupt") and a half-imported package (numpy) fails later with a traceback; so the
    signal is sent again a moment later, until it arrives outside every import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def guarded(work: Callable[[], object]) -> int:
    """``work()``'s exit status: the int it returns (caption: 1 when some images failed), else 0. A
    CaptioningError or Ctrl-C is printed as one ``error:`` line and gives its ``exit_status``."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
        signal.signal(signal.SIGINT, _interrupt)
    try:
        status = work()
        return status if isinstance(status, int) else EXIT_OK
    except BrokenPipeError:
        # The reader of our output went away (``captioning caption ... | head``): no traceback.
        # stdout is pointed at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (CaptioningError, KeyboardInterrupt) as err:
        # A bare Ctrl-C comes from where no workflow says what it leaves (the seconds of imports).
        error = err if isinstance(err, CaptioningError) else Interrupted()
        print_error(error)
        return error.exit_status

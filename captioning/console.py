"""What every workflow's command line shares: exit statuses, one-line errors, argument types."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Nothing can be done (bad checkpoint, no images, bad settings): exit status 2."""


def one_line(text: object) -> str:
    """Collapse whitespace (newlines included) so a message stays on one line."""
    return " ".join(str(text).split())


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

"""The console script ``captioning COMMAND [ARGS...]``: a table of workflows, each a package ``main``.

Each entry is ``name -> ("module:function", one-line summary)``; the module is imported only when
its command runs, so ``captioning --help`` stays quick. ``scripts/<name>.py`` call the same functions.

A workflow's ``run(argv, prog)`` returns what it did and raises a CaptioningError (Ctrl-C: Interrupted);
its ``main(argv, prog)`` is ``run`` through console.guarded, the one printer of errors: -> the exit status.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from captioning.console import EXIT_OK, EXIT_USAGE, guarded, print_error

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("captioning.training.run:main", "train soft or hard attention, then score the test split"),
    "evaluate": ("captioning.evaluation.run:main", "score a checkpoint (or a results file) with the COCO metrics"),
    "prepare": ("captioning.data.run:main", "prepare a COCO / Flickr / own dataset into a fast folder"),
    "caption": ("captioning.caption.run:main", "caption images with a trained checkpoint"),
    "compare": ("captioning.study.run:main", "the study: no attention, soft and hard, trained and evaluated alike, a report"),
    "benchmark": ("captioning.perf.run:main", "measure training, encoding, decoding and loading speed"),
    "export": ("captioning.export.run:main", "write a model folder (safetensors, model card), optionally ONNX graphs"),
    "demo": ("captioning.serve.run:main", "a browser demo: caption an image, see each word's attention"),
}


def workflow(name: str) -> Callable[..., int]:
    """The ``main`` of a command in :data:`COMMANDS` (imported now)."""
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def usage() -> str:
    lines = ["usage: captioning COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'captioning COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``captioning COMMAND ...``: run the command; returns its exit status."""
    return guarded(lambda: _dispatch(argv))


def script(command: str) -> int:
    """``python scripts/<name>.py ARGS``: the workflow of ``command`` on this process's arguments."""
    return guarded(lambda: workflow(command)(sys.argv[1:]))


def _dispatch(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        from captioning import __version__

        print(f"captioning {__version__}")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print_error(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
        return EXIT_USAGE
    return workflow(command)(rest, prog=f"captioning {command}")


if __name__ == "__main__":
    sys.exit(main())

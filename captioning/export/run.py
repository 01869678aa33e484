"""Write a checkpoint as a shareable model folder, optionally with ONNX graphs.

    captioning export --checkpoint runs/soft/best.ckpt --out exported/soft               # model folder
    captioning export --checkpoint runs/soft/best.ckpt --out exported/soft --format onnx # + ONNX graphs

The folder, what --out may be, and the ONNX graphs (captioning/export/onnx.py): docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioning.console import UsageError, command_line, main_of


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="best.ckpt or last.ckpt written by captioning train (or a model folder)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the folder to write")
    p.add_argument("--format", choices=["folder", "onnx"], default="folder",
                   help="folder: weights as safetensors (default); onnx: also the ONNX graphs")
    p.add_argument("--hard-mode", choices=["expected", "argmax"],
                   help="with --format onnx: hard attention in the ONNX step (default: the checkpoint's "
                        "decode.hard_mode)")
    return p


def run(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """``captioning export`` with ``argv``; -> the folder written. Raises a CaptioningError (status 2)."""
    args = parser(prog).parse_args(argv)
    command = command_line(prog or "captioning export", argv)
    if args.hard_mode is not None and args.format != "onnx":  # a folder's weights attend in every mode
        raise UsageError("--hard-mode chooses the ONNX step's mode: give --format onnx")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UsageError("--format onnx needs the export extra: pip install 'show-attend-tell[export]'") from None
    from captioning.export.onnx import export_checkpoint
    from captioning.files import as_write_error

    try:
        folder = export_checkpoint(args.checkpoint, args.out, args.format, args.hard_mode, command=command)
    except OSError as err:  # a read-only file system, a full disk: the folder and the cause, in words
        raise as_write_error(err) or UsageError(f"cannot write {args.out}: {err.strerror or err}") from None
    files = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")))
    print(f"wrote {folder}: {files}")
    return folder


main = main_of(run)


if __name__ == "__main__":
    sys.exit(main())

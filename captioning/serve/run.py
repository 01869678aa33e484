"""Serve the browser demo of a checkpoint: caption an image, see each word's attention.

    captioning demo --checkpoint runs/soft/best.ckpt                 # http://127.0.0.1:8000
    captioning demo --checkpoint exported/soft --port 8080 --examples photos/

Serves on 127.0.0.1 (this machine only) unless --host says otherwise; Ctrl-C stops it. The
server and its page: captioning/serve/server.py.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from captioning.console import UsageError, main_of, whole_number


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="best.ckpt or last.ckpt written by captioning train, or a model folder")
    p.add_argument("--port", type=whole_number(0, 65535, "a port from 0 to 65535"), default=8000,
                   help="port to listen on (default: 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--examples", type=Path, metavar="DIR",
                   help="example images to offer (default: the first images of the checkpoint's test split, if on disk)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    return p


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """``captioning demo`` with ``argv``: serves until Ctrl-C. Raises UsageError (nothing served)."""
    args = parser(prog).parse_args(argv)
    from captioning.caption.run import expand_inputs, load_captioner
    from captioning.serve.server import make_server, split_examples

    captioner = load_captioner(args.checkpoint, args.device)
    if args.examples is not None:
        examples, errors = expand_inputs([str(args.examples)])
        if errors:
            raise UsageError(errors[0])
    else:
        examples = split_examples(captioner)
    try:
        server = make_server(captioner, args.host, args.port, examples)
    except OSError as err:
        fix = "choose another --port" if err.errno == errno.EADDRINUSE else \
            "give a --host of this machine (127.0.0.1, 0.0.0.0) and a free --port"
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); {fix}") from None
    host, port = server.server_address[:2]
    print(f"demo of {args.checkpoint} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # how the demo is stopped: a normal end, status 0
        pass
    finally:
        server.server_close()


main = main_of(run)


if __name__ == "__main__":
    sys.exit(main())

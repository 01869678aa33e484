"""Serve the browser demo of a checkpoint: caption an image, see each word's attention.

    captioning demo --checkpoint runs/soft/best.ckpt                 # http://127.0.0.1:8000
    captioning demo --checkpoint exported/soft --port 8080 --examples photos/

Serves on 127.0.0.1 (this machine only) unless --host says otherwise; Ctrl-C stops it. The
server and its page: captioning/serve/server.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from captioning.console import EXIT_OK, EXIT_USAGE, UsageError, print_error


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="best.ckpt or last.ckpt written by captioning train, or a model folder")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--examples", type=Path, metavar="DIR",
                   help="example images to offer (default: the first images of the checkpoint's test split, if on disk)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog).parse_args(argv)
    from captioning.caption.run import expand_inputs, load_captioner
    from captioning.serve.server import MAX_EXAMPLES, make_server, split_examples

    try:
        captioner = load_captioner(args.checkpoint, args.device)
        if args.examples is not None:
            examples, errors = expand_inputs([str(args.examples)])
            if errors:
                raise UsageError(errors[0])
        else:
            examples = split_examples(captioner)
        try:
            server = make_server(captioner, args.host, args.port, examples[:MAX_EXAMPLES])
        except OSError as err:
            raise UsageError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
                             "choose another --port") from None
    except UsageError as err:
        print_error(err)
        return EXIT_USAGE
    host, port = server.server_address[:2]
    print(f"demo of {args.checkpoint} at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

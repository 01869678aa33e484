"""The browser demo: one HTML page and a JSON endpoint on the standard library's HTTP server.

    captioning demo --checkpoint runs/soft/best.ckpt            # http://127.0.0.1:8000
    captioning demo --checkpoint exported/soft --port 8080      # a model folder works too

Nothing is fetched from the network and nothing leaves the machine: the page (page.html, beside
this file) has no external scripts, and the server listens on 127.0.0.1 unless told otherwise.

    GET  /                   the page
    GET  /api/info           the model: attention, grid, decoding defaults, example images
    GET  /api/example/<i>    example image i (the checkpoint's test split, or --examples DIR)
    POST /api/caption?...    body: an image file (or empty with example=<i>); query: method
                             (beam | greedy | sample), beam_size, n_best, temperature, top_k,
                             min_len, no_unk, hard_mode, seed
                             -> {"captions": [{"text", "words", "score", "ended", "attention"}], ...}

A bad upload (not an image, truncated, too large, an image too many pixels) gets a 4xx answer
with a one-line ``error`` the page shows; the server keeps serving.
"""

from __future__ import annotations

import json
import mimetypes
import os
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlparse

from captioning.data.transforms import ImageLoadError

PAGE = Path(__file__).with_name("page.html")
#: Uploads larger than this are refused before they are read.
MAX_UPLOAD_BYTES = 10 * 2**20
#: A refused upload is read away up to this size before the answer (see Handler._discard).
DISCARD_BYTES = 64 * 2**20
#: Example images offered by the page.
MAX_EXAMPLES = 8


class RequestError(Exception):
    """A request the demo cannot answer: the status and a one-line message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _int(query: dict, name: str, default: int | None, low: int = 1, high: int = 100) -> int | None:
    text = query.get(name, [""])[0].strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(query: dict, name: str) -> float | None:
    text = query.get(name, [""])[0].strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a number, got {text!r}") from None


class Demo:
    """What the handler needs: the captioner (one request decodes at a time), the examples."""

    def __init__(self, captioner, examples: Sequence[Path] = ()) -> None:
        self.captioner = captioner
        self.examples = [Path(p) for p in examples][:MAX_EXAMPLES]
        self.lock = threading.Lock()

    def info(self) -> dict:
        c = self.captioner
        return {"attention": c.config.model.attention, "grid": c.grid_size, "image_size": c.image_size,
                "vocab_size": len(c.vocab), "defaults": c.settings, "source": Path(c.source).name if c.source else None,
                "examples": [p.name for p in self.examples], "max_upload_bytes": MAX_UPLOAD_BYTES}

    def options(self, query: dict) -> dict:
        """The query string -> Captioner.caption keyword arguments (checked there too)."""
        method = query.get("method", ["beam"])[0]
        if method not in ("beam", "greedy", "sample"):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"method must be beam, greedy or sample, got {method!r}")
        options = {"max_len": _int(query, "max_len", None, 1, 100), "min_len": _int(query, "min_len", 0, 0, 100),
                   "no_unk": query.get("no_unk", ["0"])[0] in ("1", "true", "on"),
                   "hard_mode": query.get("hard_mode", [""])[0] or None,
                   "n_best": _int(query, "n_best", 1, 1, 10)}
        if method == "beam":
            options["beam_size"] = max(_int(query, "beam_size", self.captioner.config.decode.beam_size, 1, 20),
                                       options["n_best"])
        elif method == "greedy":
            options["beam_size"], options["n_best"] = 1, 1
        else:
            options["temperature"] = _float(query, "temperature") or 1.0
            options["top_k"] = _int(query, "top_k", None, 1, 100000)
            options["seed"] = _int(query, "seed", None, 0, 2**31 - 1)
        return options

    def caption(self, image_path: Path, query: dict) -> dict:
        options = self.options(query)
        try:
            with self.lock:
                captions = self.captioner.caption(image_path, **options)
        except ImageLoadError as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, _image_message(err, image_path)) from None
        except ValueError as err:  # bad decoding options
            raise RequestError(HTTPStatus.BAD_REQUEST, " ".join(str(err).split())) from None
        best = captions[0]
        return {"captions": [_as_json(c) for c in [best, *best.alternatives]], "grid": self.captioner.grid_size,
                "settings": {k: v for k, v in options.items() if v is not None}}


def _image_message(err: Exception, path: Path) -> str:
    message = " ".join(str(err).split())
    message = message.replace(f"cannot read image {path}: ", "").replace(str(path), "the upload")
    return f"this file cannot be read as an image ({message})"


def _as_json(cap) -> dict:
    return {"text": cap.text, "words": cap.words, "score": round(float(cap.score), 4), "ended": cap.ended,
            "locations": cap.locations,
            "attention": [[[round(float(v), 5) for v in row] for row in grid] for grid in cap.attention]}


class Handler(BaseHTTPRequestHandler):
    demo: Demo  # set on the subclass made by make_server
    server_version = "show-attend-tell-demo"

    def log_message(self, format: str, *args) -> None:  # quiet: one line per error only
        if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
            super().log_message(format, *args)

    def send_json(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, path: Path, content_type: str | None = None) -> None:
        body = path.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        try:
            if url.path in ("/", "/index.html"):
                return self.send_file(PAGE, "text/html; charset=utf-8")
            if url.path == "/api/info":
                return self.send_json(HTTPStatus.OK, self.demo.info())
            if url.path.startswith("/api/example/"):
                return self.send_file(self._example(url.path.rsplit("/", 1)[1]))
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")
        except RequestError as err:
            self.send_json(err.status, {"error": str(err)})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        try:
            if url.path != "/api/caption":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD_BYTES:
                self._discard(length)
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the file is {length / 2**20:.1f} MiB; the demo takes images up to "
                                   f"{MAX_UPLOAD_BYTES // 2**20} MiB")
            body = self.rfile.read(length) if length else b""
            if not body:
                if "example" not in query:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "no image: upload a file or pick an example")
                return self.send_json(HTTPStatus.OK, self.demo.caption(self._example(query["example"][0]), query))
            with tempfile.TemporaryDirectory(prefix="sat-demo-") as tmp:
                path = Path(tmp) / "upload"
                path.write_bytes(body)
                return self.send_json(HTTPStatus.OK, self.demo.caption(path, query))
        except RequestError as err:
            self.send_json(err.status, {"error": str(err)})
        except Exception as err:  # never let one request take the server down
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": f"the model failed on this request ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:200]})"})

    def _discard(self, length: int) -> None:
        """Read a refused body away (up to DISCARD_BYTES), so that the client, still sending, gets
        the answer instead of a broken connection; beyond that the connection is closed."""
        self.close_connection = True
        left = min(length, DISCARD_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 2**20))
            if not chunk:
                break
            left -= len(chunk)

    def _example(self, index: str) -> Path:
        if index.isdigit() and int(index) < len(self.demo.examples):
            return self.demo.examples[int(index)]
        raise RequestError(HTTPStatus.NOT_FOUND, f"no example image {index!r}")


def make_server(captioner, host: str = "127.0.0.1", port: int = 8000,
                examples: Sequence[Path] = ()) -> ThreadingHTTPServer:
    """A server (not yet serving) for ``captioner``; port 0 picks a free port (server.server_port)."""
    handler = type("DemoHandler", (Handler,), {"demo": Demo(captioner, examples)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def split_examples(captioner, split: str = "test", limit: int = MAX_EXAMPLES) -> list[Path]:
    """The first images of the checkpoint's dataset split that exist on disk (none if it is not
    there: the demo never generates or downloads a dataset)."""
    from captioning.data.datamodule import CaptionDataModule

    try:
        records = CaptionDataModule(captioner.config.data, captioner.vocab).load_split(split)
    except Exception:  # any missing or unreadable dataset: no examples, the upload still works
        return []
    return [Path(r.path) for r in records[:limit] if os.path.isfile(r.path)]

"""The browser demo: one HTML page and a JSON endpoint on the standard library's HTTP server.

    captioning demo --checkpoint runs/soft/best.ckpt            # http://127.0.0.1:8000
    captioning demo --checkpoint exported/soft --port 8080      # a model folder works too

Nothing is fetched from the network and nothing leaves the machine: the page (page.html, beside
this file) has no external scripts, and the server listens on 127.0.0.1 unless told otherwise.

    GET  /                   the page
    GET  /api/info           the model: attention, grid, decoding defaults, example images
    GET  /api/example/<i>    example image i (the checkpoint's test split, or --examples DIR)
    POST /api/caption?...    body: an image file, raw (curl --data-binary @photo.jpg) or as the
                             multipart/form-data field "file" (curl -F file=@photo.jpg, HTML forms,
                             requests); or empty with example=<i>; query: method (beam | greedy |
                             sample), beam_size, n_best, temperature, top_k, min_len, no_unk,
                             hard_mode, seed (ranges: NUMBERS)
                             -> {"captions": [{"text", "words", "score", "ended", "attention"}], ...};
                             the page sends the header X-Demo-Client: page, and its messages then
                             speak of "the chosen file" without the hints for curl

Every answer is JSON, errors too: ``{"error": one line}`` with a 4xx status for a bad request
(not an image, truncated, too large, too many pixels, a missing or malformed Content-Length, a
number out of range) and 500 for a failure of the model, logged as one line; the server keeps
serving. It is built to stay up on a shared machine: a request body is read only up to
MAX_UPLOAD_BYTES and only with a Content-Length; a connection silent for TIMEOUT seconds is
closed; WORKERS threads answer, QUEUE more connections wait, any beyond get 503 at once; the
listen backlog is BACKLOG; a client that goes away is forgotten without a traceback.

Why the standard library and not a web framework: the demo takes one kind of request, so
http.server with the bounds above is short, and a multipart upload is parsed by the standard
library's email parser, the replacement for the ``cgi`` module that Python 3.13 removed
(docs/demo.md says more).
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import parse_qs, urlparse

from captioning.data.transforms import ImageLoadError

PAGE = Path(__file__).with_name("page.html")
#: Uploads larger than this are refused before they are read.
MAX_UPLOAD_BYTES = 10 * 2**20
#: A refused upload is read away up to this size before the answer (see Handler._discard).
DISCARD_BYTES = 64 * 2**20
#: Example images offered by the page.
MAX_EXAMPLES = 8
#: Seconds a connection may stay silent (before its request line, a header or a piece of its
#: body) before it is closed: a half-open connection holds a worker this long at most.
TIMEOUT = 30.0
#: Connections answered at once (one caption decodes at a time; the others read, wait or send).
WORKERS = 8
#: Connections accepted while every worker is busy; beyond them, 503 at once.
QUEUE = 64
#: The listen backlog: connections the kernel holds before they are accepted (socketserver: 5).
BACKLOG = 128
#: The query's numbers, checked here before any decoding: name -> (type, lowest, highest).
#: A temperature below 0.01 divides the scores into infinities.
NUMBERS: dict[str, tuple[type, float, float]] = {
    "beam_size": (int, 1, 20), "n_best": (int, 1, 10), "max_len": (int, 1, 100), "min_len": (int, 0, 100),
    "top_k": (int, 1, 100000), "seed": (int, 0, 2**31 - 1), "temperature": (float, 0.01, 100.0),
}
_INT = re.compile(r"[+-]?[0-9]{1,12}", re.ASCII)
_FLOAT = re.compile(r"[+-]?([0-9]{1,12}(\.[0-9]{0,12})?|\.[0-9]{1,12})([eE][+-]?[0-9]{1,3})?", re.ASCII)


class RequestError(Exception):
    """A request the demo cannot answer: the status and a one-line message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def number(query: dict, name: str, default: int | float | None = None) -> int | float | None:
    """The query's ``name`` as :data:`NUMBERS` types and bounds it, or ``default`` when absent;
    anything else is a 400 naming the parameter and its range."""
    kind, low, high = NUMBERS[name]
    text = query.get(name, [""])[0].strip()
    if not text:
        return default
    pattern, what = (_INT, "a whole number") if kind is int else (_FLOAT, "a number")
    bounds = f"from {low:g} to {high:g}" if kind is float else f"from {int(low)} to {int(high)}"
    if not pattern.fullmatch(text):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be {what} {bounds}, got {text[:40]!r}")
    value = kind(text)
    if not low <= value <= high:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be {what} {bounds}, got {text[:40]}")
    return value


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]


class Demo:
    """What the handler needs: the captioner (one request decodes at a time), the examples."""

    def __init__(self, captioner, examples: Sequence[Path] = ()) -> None:
        self.captioner = captioner
        self.examples = [Path(p) for p in examples][:MAX_EXAMPLES]
        self.lock = threading.Lock()

    def info(self) -> dict:
        c = self.captioner
        from captioning import provenance

        note = provenance.SYNTHETIC_NOTE[len("note: "):] if provenance.is_synthetic(c.training_data) else None
        return {"attention": c.config.model.attention, "grid": c.grid_size, "image_size": c.image_size,
                "vocab_size": len(c.vocab), "defaults": c.settings, "source": Path(c.source).name if c.source else None,
                "training_data": c.training_data, "trained_on": c.trained_on,
                "note": note and note[0].upper() + note[1:] + ".",
                "examples": [p.name for p in self.examples], "max_upload_bytes": MAX_UPLOAD_BYTES}

    def options(self, query: dict) -> dict:
        """The query string -> Captioner.caption keyword arguments (checked there too)."""
        method = query.get("method", ["beam"])[0]
        if method not in ("beam", "greedy", "sample"):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"method must be beam, greedy or sample, got {method[:40]!r}")
        options = {"max_len": number(query, "max_len"), "min_len": number(query, "min_len", 0),
                   "no_unk": query.get("no_unk", ["0"])[0] in ("1", "true", "on"),
                   "hard_mode": query.get("hard_mode", [""])[0] or None,
                   "n_best": number(query, "n_best", 1)}
        if method == "beam":
            options["beam_size"] = max(number(query, "beam_size", self.captioner.config.decode.beam_size),
                                       options["n_best"])
        elif method == "greedy":
            options["beam_size"], options["n_best"] = 1, 1
        else:
            options["temperature"] = number(query, "temperature", 1.0)
            options["top_k"] = number(query, "top_k")
            options["seed"] = number(query, "seed")
        return options

    def example(self, index: str) -> Path:
        """Example image ``index`` (as the URL or the query gives it), or a 404."""
        if re.fullmatch(r"[0-9]{1,3}", index, re.ASCII) and int(index) < len(self.examples):
            return self.examples[int(index)]
        raise RequestError(HTTPStatus.NOT_FOUND, f"no example image {index[:40]!r}")

    def caption(self, image_path: Path, query: dict, what: str = "the upload") -> dict:
        """Caption the image at ``image_path``; ``what`` names it in messages (which field, or the body)."""
        options = self.options(query)
        seed = options.pop("seed", None)
        try:
            decode = self.captioner.options(**options)  # checked once, before the image is read
            with self.lock, warnings.catch_warnings():
                # The page's header says what the model was trained on (info "note"): the API's
                # once-per-captioner warning would only repeat it in the server's log.
                warnings.simplefilter("ignore", UserWarning)
                captions = self.captioner.caption(image_path, decode, seed=seed)
        except ImageLoadError as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, _image_message(err, image_path, what)) from None
        except ValueError as err:  # bad decoding options
            raise RequestError(HTTPStatus.BAD_REQUEST, " ".join(str(err).split())) from None
        best = captions[0]
        settings = {k: v for k, v in {**self.captioner.record(decode), "seed": seed}.items() if v is not None}
        return {"captions": [_as_json(c) for c in [best, *best.alternatives]], "grid": self.captioner.grid_size,
                "settings": settings}


def _image_message(err: Exception, path: Path, what: str) -> str:
    message = " ".join(str(err).split())
    message = message.replace(f"cannot read image {path}: ", "").replace(str(path), "the upload")
    hint = ("; send an image file as the body, or as the multipart/form-data field 'file' "
            "(curl -F file=@photo.jpg)") if what.startswith("the request body") else ""
    return f"{what} cannot be read as an image ({message}){hint}"


def form_file(content_type: str, body: bytes) -> tuple[bytes, str]:
    """The file of a multipart/form-data body (the field "file" or "image", else the first field
    holding a file) -> (its bytes, what it is, for messages). Parsed by the standard library's
    email parser (the MIME format is the same); a body without a file is a 400 naming its fields."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.get_boundary() is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the multipart/form-data body cannot be parsed (no boundary, or "
                                                   "no part): send the image as the field 'file' (curl -F file=@photo.jpg)")
    parts = [part for part in message.iter_parts() if part.get_param("name", header="content-disposition")]
    names = [str(part.get_param("name", header="content-disposition")) for part in parts]
    files = [part for part in parts if part.get_filename()]
    chosen = next((part for part, name in zip(parts, names) if name in ("file", "image")), files[0] if files else None)
    if chosen is None:
        shown = ", ".join(repr(n[:40]) for n in names[:5]) or "none"
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the multipart/form-data upload holds no file (fields: {shown}): "
                                                   "send the image as the field 'file' (curl -F file=@photo.jpg)")
    data = chosen.get_payload(decode=True) or b""
    name = str(chosen.get_param("name", header="content-disposition"))[:40]
    filename = str(chosen.get_filename() or "")[:80]
    what = f"the file {filename!r} of the multipart/form-data field {name!r}" if filename else \
        f"the multipart/form-data field {name!r}"
    if not data:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{what} is empty: no image was chosen")
    return data, what


def _as_json(cap) -> dict:
    return {"text": cap.text, "words": cap.words, "score": round(float(cap.score), 4), "ended": cap.ended,
            "locations": cap.locations,
            "attention": [[[round(float(v), 5) for v in row] for row in grid] for grid in cap.attention]}


class Handler(BaseHTTPRequestHandler):
    demo: Demo  # set on the subclass made by make_server
    server_version = "show-attend-tell-demo"
    timeout = TIMEOUT  # socket timeout of every read and write (StreamRequestHandler.setup)
    cause = ""  # why a request failed, for its one log line
    unread = 0  # bytes of a refused body still to read away after the answer

    # ------------------------------------------------------------------------------ logging

    def log_message(self, format: str, *args) -> None:
        """Quiet: the standard library's own notes (timeouts and the like) are not logged."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per failed request (status 4xx or 5xx), with its cause for a 500; none else."""
        if str(code)[:1] in ("4", "5"):
            line = " ".join(str(getattr(self, "requestline", "")).split())[:200]
            cause = f" ({self.cause})" if self.cause else ""
            sys.stderr.write(f"demo: {self.address_string()} {line!r} {code}{cause}\n")

    # ------------------------------------------------------------------------------ answers

    def send_json(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, an unsupported method,
        headers too long or too many) answer in JSON as ours do."""
        self.close_connection = True
        self.request_version = "HTTP/1.0"  # a request line too broken to name one still gets a status line
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method without a do_ handler: the client's mistake
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"the demo answers GET and POST, not {self.command[:20]!r}"
        status = HTTPStatus(code)
        self.send_json(status, {"error": " ".join(str(message or status.phrase).split())[:200]})

    def send_file(self, path: Path, content_type: str | None = None) -> None:
        body = path.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError):  # the client went away or fell silent: nothing to answer
            self.close_connection = True

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Callable[[], None]) -> None:
        """Run ``route``; whatever it raises becomes a JSON answer (4xx for the client's mistakes,
        500 with one log line for ours), except a client that went away, which gets none."""
        try:
            route()
        except RequestError as err:
            self.send_json(err.status, {"error": str(err)})
            if self.unread:
                self._discard(self.unread)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as err:  # never let one request take the server down
            self.cause = f"{type(err).__name__}: {_one_line(err)}"
            self.close_connection = True
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": f"the model failed on this request ({self.cause})"})

    # ------------------------------------------------------------------------------ routes

    def _get(self) -> None:
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            return self.send_file(PAGE, "text/html; charset=utf-8")
        if url.path == "/api/info":
            return self.send_json(HTTPStatus.OK, self.demo.info())
        if url.path.startswith("/api/example/"):
            return self.send_file(self.demo.example(url.path.rsplit("/", 1)[1]))
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {url.path[:100]}")

    def _post(self) -> None:
        url = urlparse(self.path)
        if url.path != "/api/caption":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path[:100]}")
        try:
            query = parse_qs(url.query, max_num_fields=50)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "too many query parameters") from None
        body = self._body()
        if not body:
            if "example" not in query:
                raise RequestError(HTTPStatus.BAD_REQUEST, "no image: upload a file or pick an example")
            return self.send_json(HTTPStatus.OK, self.demo.caption(self.demo.example(query["example"][0]), query))
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() == "multipart/form-data":
            data, what = form_file(content_type, body)
        elif self.headers.get("X-Demo-Client") == "page":  # the page sends the chosen file as the body
            data, what = body, "the chosen file"
        else:
            data, what = body, f"the request body ({content_type.split(';')[0].strip()[:60] or 'no Content-Type'})"
            if body.startswith(b"--") and b"content-disposition: form-data" in body[:4096].lower():
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is multipart/form-data but its Content-Type "
                                                           f"is {content_type[:60] or 'missing'}: send it as "
                                                           "multipart/form-data with its boundary (curl -F file=@photo.jpg)")
        with tempfile.TemporaryDirectory(prefix="sat-demo-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            return self.send_json(HTTPStatus.OK, self.demo.caption(path, query, what))

    def _body(self) -> bytes:
        """The request body, read only up to its Content-Length, which must be there and be a
        whole number of bytes up to MAX_UPLOAD_BYTES (a larger body is refused before it is read)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not in chunks "
                                                           "(curl -F file=@photo.jpg does)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length: send the image with "
                                                           "one (curl -F file=@photo.jpg does; an empty body: 0)")
        text = values[0].strip()
        if len(set(v.strip() for v in values)) > 1 or not re.fullmatch(r"[0-9]{1,15}", text, re.ASCII):
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a whole number of bytes, got "
                                                       f"{', '.join(v[:20] for v in values)!r}")
        length = int(text)
        if length > MAX_UPLOAD_BYTES:
            self.unread = length  # read away after the answer (see _discard)
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the file is {length / 2**20:.1f} MiB; the demo takes images up to "
                               f"{MAX_UPLOAD_BYTES // 2**20} MiB")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _discard(self, length: int) -> None:
        """Read a refused body away after the answer (up to DISCARD_BYTES, each read bounded by the
        timeout), so that a client still sending reads the answer instead of a reset connection;
        beyond that the connection is closed."""
        self.close_connection = True
        left = min(length, DISCARD_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 2**20))
            if not chunk:
                break
            left -= len(chunk)


class DemoServer(HTTPServer):
    """An HTTP server with a bounded pool: WORKERS threads answer, QUEUE more connections wait,
    and any beyond get a 503 at once; the listen backlog is BACKLOG. (socketserver's threading
    server starts a thread per connection, without bound, and listens with a backlog of 5.)"""

    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: type, workers: int = WORKERS, queue: int = QUEUE) -> None:
        super().__init__(address, handler)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="demo")
        self.slots = threading.BoundedSemaphore(workers + queue)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            return self._busy(request)
        try:
            self.pool.submit(self._serve, request, client_address)
        except RuntimeError:  # the pool was shut down: the server is closing
            self.slots.release()
            self.shutdown_request(request)

    def _serve(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def _busy(self, request) -> None:
        body = json.dumps({"error": "the demo is busy; try again in a moment"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """One line, never a traceback; nothing for a client that went away."""
        err = sys.exc_info()[1]
        if err is not None and not isinstance(err, (ConnectionError, TimeoutError)):
            sys.stderr.write(f"demo: {client_address[0]}: {type(err).__name__}: {_one_line(err)}\n")

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(captioner, host: str = "127.0.0.1", port: int = 8000, examples: Sequence[Path] = (),
                timeout: float = TIMEOUT, workers: int = WORKERS, queue: int = QUEUE) -> DemoServer:
    """A server (not yet serving) for ``captioner``; port 0 picks a free port (server.server_port)."""
    handler = type("DemoHandler", (Handler,), {"demo": Demo(captioner, examples), "timeout": timeout})
    return DemoServer((host, port), handler, workers, queue)


def split_examples(captioner, split: str = "test", limit: int = MAX_EXAMPLES) -> list[Path]:
    """The first images of the checkpoint's dataset split that exist on disk (none if it is not
    there: the demo never generates or downloads a dataset)."""
    from captioning.data.datamodule import CaptionDataModule

    try:
        records = CaptionDataModule(captioner.config.data, captioner.vocab).load_split(split)
    except Exception:  # any missing or unreadable dataset: no examples, the upload still works
        return []
    return [Path(r.path) for r in records[:limit] if os.path.isfile(r.path)]

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
                             requests); or empty with example=<i>; query: method (beam:
                             beam_size, n_best | greedy | sample: n_best, temperature, top_k, seed),
                             max_len, min_len, no_unk (1 or 0), hard_mode, seed with hard_mode=sample
                             (ranges: NUMBERS); an unknown key, one given twice, one the method
                             does not use or one sent as a form field is a 400 (METHOD_KEYS)
                             -> {"captions": [{"text", "words", "score", "ended", "attention"}], ...};
                             the page sends the header X-Demo-Client: page, and its messages then
                             speak of "the chosen file" without the hints for curl

Every answer is JSON, errors too: ``{"error": one line}``, 4xx for a bad request (not an image,
truncated, too large, too many pixels, a missing or malformed Content-Length, a number out of
range), 500 for a failure of the model, logged as one line; the server keeps serving. Built to
stay up on a shared machine: a body is read only with a Content-Length up to MAX_UPLOAD_BYTES;
one thread (Reception) reads every request whole before a worker sees it and closes one not
whole TIMEOUT seconds after its connection was accepted, so idle or trickling clients hold no
worker; WORKERS threads answer, QUEUE more complete requests wait, any beyond get 503 at once;
the listen backlog is BACKLOG; a client that goes away is forgotten without a traceback; a
multipart upload is parsed in one pass whose cost grows with the body's size only (form_file).
The standard library, not a web framework: the demo takes one kind of request (docs/demo.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import mimetypes
import os
import re
import selectors
import socket
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import parse_qs, urlparse

from captioning.console import CaptioningError, one_line
from captioning.data.transforms import ImageLoadError
from captioning.engine import SEED_RANGE
from captioning.search import TEMPERATURE_RANGE

PAGE = Path(__file__).with_name("page.html")
#: Uploads larger than this are refused before they are read.
MAX_UPLOAD_BYTES = 10 * 2**20
#: A refused upload is read away up to this size before the answer (see Handler._discard).
DISCARD_BYTES = 64 * 2**20
#: Example images offered by the page.
MAX_EXAMPLES = 8
#: Seconds a request has to arrive whole (request line, headers and body) from its connection's
#: acceptance: a deadline, not a limit on each read, so a client sending a byte now and then
#: cannot keep it open; until then it holds no worker (Reception), only its bytes so far.
TIMEOUT = 30.0
#: Requests answered at once (one caption decodes at a time; the others wait or send).
WORKERS = 8
#: Whole requests accepted while every worker is busy; beyond them, 503 at once.
QUEUE = 64
#: Connections whose request is still arriving; beyond them the one that has waited longest is
#: closed, so idle sockets can never lock the others out.
MAX_ARRIVING = 512
#: Bytes held for requests still arriving, all together; beyond it the request is refused (503).
MAX_ARRIVING_BYTES = 256 * 2**20
#: The request line and headers of one request, at most (http.server's limits apply after it).
MAX_HEAD_BYTES = 64 * 2**10
#: Parts of a multipart/form-data body, at most (the page sends one; curl -F, one per field).
MAX_PARTS = 32
#: The headers of one multipart part, at most.
MAX_PART_HEAD_BYTES = 8 * 2**10
#: The listen backlog: connections the kernel holds before they are accepted (socketserver: 5).
BACKLOG = 128
#: The query's numbers, checked here before any decoding: name -> (type, lowest, highest). The
#: seed and the temperature take what every engine takes (captioning/engine.py, captioning/search.py).
NUMBERS: dict[str, tuple[type, float, float]] = {
    "beam_size": (int, 1, 20), "n_best": (int, 1, 10), "max_len": (int, 1, 100), "min_len": (int, 0, 100),
    "top_k": (int, 1, 100000), "seed": (int, *SEED_RANGE), "temperature": (float, *TEMPERATURE_RANGE),
}
#: The query's keys: those of every request, and those of each method; "seed" is sampling's, of
#: method=sample or of hard attention's hard_mode=sample. A key a request would not use is refused.
COMMON_KEYS = ("method", "example", "max_len", "min_len", "no_unk", "hard_mode", "seed")
METHOD_KEYS = {"beam": ("beam_size", "n_best"), "greedy": (), "sample": ("n_best", "temperature", "top_k")}
QUERY_KEYS = COMMON_KEYS + ("beam_size", "n_best", "temperature", "top_k")
#: The values of a flag (no_unk), as HTML forms and people write them.
FLAGS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}
_INT = re.compile(r"[+-]?[0-9]{1,12}", re.ASCII)
_FLOAT = re.compile(r"[+-]?([0-9]{1,12}(\.[0-9]{0,12})?|\.[0-9]{1,12})([eE][+-]?[0-9]{1,3})?", re.ASCII)


class RequestError(CaptioningError):
    """A request the demo cannot answer: the status and a one-line message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def number(query: dict, name: str, default: int | float | None = None) -> int | float | None:
    """The query's ``name`` typed and bounded by :data:`NUMBERS`, or ``default`` when absent; else a 400."""
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
        """The query -> Captioner.caption keyword arguments (checked there too), with "seed"; a 400
        for a key that is unknown, given twice, or not used by the request's method."""
        unknown = [key for key in query if key not in QUERY_KEYS]
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown query option{'s' if len(unknown) > 1 else ''} "
                                                       f"{', '.join(repr(k[:40]) for k in unknown[:5])}; the demo "
                                                       f"takes {', '.join(QUERY_KEYS)}")
        repeated = next((key for key, values in query.items() if len(values) > 1), None)
        if repeated:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"{repeated} is given {len(query[repeated])} times; give it once")
        method = query.get("method", ["beam"])[0]
        if method not in METHOD_KEYS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"method must be beam, greedy or sample, got {method[:40]!r}")
        unused = [key for key in QUERY_KEYS[len(COMMON_KEYS):] if key in query and key not in METHOD_KEYS[method]]
        if unused:
            takes = (*METHOD_KEYS[method], "max_len", "min_len", "no_unk", "hard_mode",
                     *(("seed",) if method == "sample" else ()))
            raise RequestError(HTTPStatus.BAD_REQUEST, f"method={method} does not use {', '.join(unused)}; it takes "
                                                       f"{', '.join(takes)}")
        flag = query.get("no_unk", ["0"])[0].strip().lower()
        if flag not in FLAGS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"no_unk must be 1 or 0 (or true/false, on/off, yes/no), "
                                                       f"got {flag[:40]!r}")
        options = {"max_len": number(query, "max_len"), "min_len": number(query, "min_len", 0), "no_unk": FLAGS[flag],
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
        options["seed"] = number(query, "seed")  # also hard_mode=sample's: refused in caption when nothing samples
        return options

    def example(self, index: str) -> tuple[Path, str]:
        """Example image ``index`` (as the URL or the query gives it) -> its path and its name for
        messages; a 404 for no such example, or one that is no longer a file (removed after the start)."""
        if re.fullmatch(r"[0-9]{1,3}", index, re.ASCII) and int(index) < len(self.examples):
            path = self.examples[int(index)]
            what = f"example image {int(index)} ({path.name[:80]})"
            if not path.is_file():
                raise RequestError(HTTPStatus.NOT_FOUND, f"{what} is no longer a readable file")
            return path, what
        raise RequestError(HTTPStatus.NOT_FOUND, f"no example image {index[:40]!r}")

    def caption(self, image_path: Path, query: dict, what: str = "the upload",
                unreadable: HTTPStatus = HTTPStatus.BAD_REQUEST) -> dict:
        """Caption the image at ``image_path``; ``what`` names it in messages, and an image that
        cannot be read is answered ``unreadable`` (the client's upload: 400; an example: 404)."""
        options = self.options(query)
        seed = options.pop("seed", None)
        try:
            decode = self.captioner.options(**options)  # checked once, before the image is read
            if seed is not None and decode.method != "sample" and decode.hard_mode != "sample":
                raise RequestError(HTTPStatus.BAD_REQUEST, "seed is used by method=sample or hard_mode=sample only")
            with self.lock, warnings.catch_warnings():
                # The page's header says what the model was trained on (info "note"): the API's
                # once-per-captioner warning would only repeat it in the server's log.
                warnings.simplefilter("ignore", UserWarning)
                captions = self.captioner.caption(image_path, decode, seed=seed)
        except ImageLoadError as err:
            raise RequestError(unreadable, _image_message(err, image_path, what)) from None
        except ValueError as err:  # bad decoding options
            raise RequestError(HTTPStatus.BAD_REQUEST, one_line(err)) from None
        best = captions[0]
        settings = {k: v for k, v in {**self.captioner.record(decode), "seed": seed}.items() if v is not None}
        return {"captions": [_as_json(c) for c in [best, *best.alternatives]], "grid": self.captioner.grid_size,
                "settings": settings}


def _image_message(err: Exception, path: Path, what: str) -> str:
    message = one_line(err)
    # An upload's path is the server's temporary file; an example's name is public (/api/info).
    shown = path.name if what.startswith("example image") else "the upload"
    message = message.replace(f"cannot read image {path}: ", "").replace(str(path), shown)
    hint = ("; send an image file as the body, or as the multipart/form-data field 'file' "
            "(curl -F file=@photo.jpg)") if what.startswith("the request body") else ""
    return f"{what} cannot be read as an image ({message}){hint}"


_AS_FILE = "send the image as the field 'file' (curl -F file=@photo.jpg)"
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rb";\s*(" + _TOKEN + rb")\s*=\s*(\"(?:[^\"\\]|\\.){0,1000}\"|[^;\s]{0,1000})", re.ASCII)


def _params(value: bytes) -> tuple[str, dict[str, str]]:
    """A header value ``type; key=value; key="quoted"`` -> (type, {key: value}), keys lowercased, in
    one regular-expression pass. An RFC 2231 ``key*`` is one value (charset''percent-encoded); its
    continuations (``key*0``, ``key*1``...) are not joined, so they cannot make the cost grow."""
    head, _, rest = value.partition(b";")
    found: dict[str, str] = {}
    for key, raw in _PARAM.findall(b";" + rest):
        name = key.decode("ascii").lower()
        text = raw[1:-1].replace(b'\\"', b'"') if raw.startswith(b'"') else raw
        if name.endswith("*") and b"''" in text:  # RFC 5987 / 2231: charset'lang'percent-encoded
            from urllib.parse import unquote_to_bytes

            charset, _, encoded = text.decode("latin-1").partition("'")
            encoded = encoded.partition("'")[2]
            try:
                found.setdefault(name[:-1], unquote_to_bytes(encoded).decode(charset or "utf-8", "replace"))
            except LookupError:
                found.setdefault(name[:-1], encoded)
        elif not name.endswith("*") and not re.search(r"\*[0-9]+\*?$", name):
            found.setdefault(name, text.decode("utf-8", "replace"))
    return head.strip().decode("latin-1").lower(), found


def _part_headers(head: bytes) -> dict[str, bytes]:
    headers: dict[str, bytes] = {}
    for line in head.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep:
            headers.setdefault(key.strip().lower().decode("latin-1"), value.strip())
    return headers


def form_file(content_type: str, body: bytes) -> tuple[bytes, str]:
    """The file of a multipart/form-data body (the field "file" or "image", else the first field
    holding a file) -> (its bytes, what it is, for messages); without a file, a 400 naming the fields.

    One pass over the body (RFC 7578: split at the boundary, each part's few headers read), so the
    cost grows with the body's size only: at most MAX_PARTS parts, heads of at most
    MAX_PART_HEAD_BYTES, a nested multipart part refused. (The standard library's email parser
    recursed into nested parts without bound and joined RFC 2231 continuations at a cost that
    grew faster than the body.)"""
    bad = "the multipart/form-data body cannot be parsed ({}): " + _AS_FILE
    _, params = _params(content_type.encode("latin-1", "replace"))
    boundary = params.get("boundary", "").encode("latin-1", "replace")
    if not boundary or len(boundary) > 200:
        raise RequestError(HTTPStatus.BAD_REQUEST, bad.format("no boundary, or no part"))
    delimiter = b"\r\n--" + boundary
    if body.count(delimiter) > MAX_PARTS + 1:  # before splitting: a 180,000-part form costs one count
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the multipart/form-data body holds more than {MAX_PARTS} parts: "
                                                   "send the image as the one field 'file' (curl -F file=@photo.jpg)")
    pieces = (b"\r\n" + body).split(delimiter)
    fields = []  # (name, filename, headers, content)
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # the close delimiter; what follows is the epilogue
        line_end = piece.find(b"\r\n")
        if line_end < 0 or piece[:line_end].strip(b" \t"):
            raise RequestError(HTTPStatus.BAD_REQUEST, bad.format("a boundary line is malformed"))
        head_end = piece.find(b"\r\n\r\n", line_end)
        if head_end < 0 or head_end - line_end > MAX_PART_HEAD_BYTES:
            raise RequestError(HTTPStatus.BAD_REQUEST, bad.format("a part's headers are missing or too long"))
        headers = _part_headers(piece[line_end + 2:head_end])
        kind, _ = _params(headers.get("content-type", b"text/plain"))
        if kind.startswith("multipart/"):
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               "a multipart/form-data part that is itself multipart is not accepted: " + _AS_FILE)
        _, disposition = _params(headers.get("content-disposition", b""))
        if "name" in disposition:
            fields.append((disposition["name"], disposition.get("filename", ""), piece[head_end + 4:]))
    if not fields:
        raise RequestError(HTTPStatus.BAD_REQUEST, bad.format("no boundary, or no part"))
    chosen = next((f for f in fields if f[0] in ("file", "image")), next((f for f in fields if f[1]), None))
    if chosen is None:
        shown = ", ".join(repr(f[0][:40]) for f in fields[:5]) or "none"
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the multipart/form-data upload holds no file (fields: {shown}): "
                                                   + _AS_FILE)
    options = [f for f in fields if f is not chosen and f[0] in QUERY_KEYS]
    if options:  # read from the query only: a form field would be silently ignored
        from urllib.parse import quote

        given = "&".join(f"{f[0]}={quote(f[2][:40].decode('utf-8', 'replace'))}" for f in options[:5])
        raise RequestError(HTTPStatus.BAD_REQUEST, f"options go in the query, not in multipart/form-data fields "
                                                   f"({', '.join(repr(f[0]) for f in options[:5])}): send the file "
                                                   f"as the field 'file' to /api/caption?{given}")
    name, filename, data = chosen[0][:40], chosen[1][:80], chosen[2]
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
    timeout = TIMEOUT  # socket timeout of each write of the answer (StreamRequestHandler.setup)
    cause = ""  # why a request failed, for its one log line
    unread = 0  # bytes of a refused body still to read away after the answer

    def log_message(self, format: str, *args) -> None:
        """Quiet: the standard library's own notes (timeouts and the like) are not logged."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per failed request (status 4xx or 5xx), with its cause for a 500; none else."""
        if str(code)[:1] in ("4", "5"):
            line = one_line(getattr(self, "requestline", ""), 200)
            cause = f" ({self.cause})" if self.cause else ""
            sys.stderr.write(f"demo: {self.address_string()} {line!r} {code}{cause}\n")

    def send_json(self, status: HTTPStatus, payload: dict) -> None:
        self.send_body(status, json.dumps(payload).encode(), "application/json", ("Cache-Control", "no-store"))

    def send_file(self, path: Path, content_type: str | None = None) -> None:
        self.send_body(HTTPStatus.OK, path.read_bytes(),
                       content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    def send_body(self, status: HTTPStatus, body: bytes, content_type: str, *headers: tuple[str, str]) -> None:
        self.send_response(status)
        for key, value in (("Content-Type", content_type), ("Content-Length", str(len(body))), *headers):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, an unsupported method,
        headers too long or too many) answer in JSON as ours do."""
        self.request_version = "HTTP/1.0"  # a request line too broken to name one still gets a status line
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method without a do_ handler: the client's mistake
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"the demo answers GET and POST, not {self.command[:20]!r}"
        status = HTTPStatus(code)
        self.send_json(status, {"error": one_line(message or status.phrase, 200)})

    def __init__(self, request, client_address, server, received: bytes = b"") -> None:
        self.received = received  # the whole request, as the reception read it
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_BufferedSocketReader(self.received, self.connection))

    def handle(self) -> None:
        """One request per connection: the reception read it whole, the answer closes it."""
        try:
            self.handle_one_request()
        except (ConnectionError, TimeoutError):  # the client went away or fell silent: nothing to answer
            pass

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
            self.cause = f"{type(err).__name__}: {one_line(err, 200)}"
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": f"the model failed on this request ({self.cause})"})

    def _get(self) -> None:
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            return self.send_file(PAGE, "text/html; charset=utf-8")
        if url.path == "/api/info":
            return self.send_json(HTTPStatus.OK, self.demo.info())
        if url.path.startswith("/api/example/"):
            path, what = self.demo.example(url.path.rsplit("/", 1)[1])
            try:
                data = path.read_bytes()
            except OSError as err:  # removed or made unreadable since: the example's fault, not the server's
                raise RequestError(HTTPStatus.NOT_FOUND, f"{what} is no longer a readable file "
                                                         f"({err.strerror or type(err).__name__})") from None
            return self.send_body(HTTPStatus.OK, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream")
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
            path, what = self.demo.example(query["example"][0])
            return self.send_json(HTTPStatus.OK, self.demo.caption(path, query, what, HTTPStatus.NOT_FOUND))
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
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not in chunks "
                                                           "(curl -F file=@photo.jpg does)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length: send the image with "
                                                           "one (curl -F file=@photo.jpg does; an empty body: 0)")
        text = values[0].strip()
        if len(set(v.strip() for v in values)) > 1 or not re.fullmatch(r"[0-9]{1,15}", text, re.ASCII):
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
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _discard(self, length: int) -> None:
        """Read a refused body away after the answer (up to DISCARD_BYTES within the timeout, all reads
        together), so that a client still sending reads the answer, not a reset connection."""
        left = min(length, DISCARD_BYTES)
        deadline = time.monotonic() + self.timeout  # for all of it, not for each read
        while left > 0 and time.monotonic() < deadline:
            self.connection.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.rfile.read1(min(left, 2**20))
            if not chunk:
                break
            left -= len(chunk)


class _BufferedSocketReader(io.RawIOBase):
    """The handler's rfile: the bytes the reception read first, then the socket itself (only to
    read away a refused body, each read bounded by the socket's timeout)."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self.head = memoryview(head)
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.sock.recv_into(buffer)


@dataclass(slots=True, eq=False)  # compared and hashed by identity, as any connection
class _Arriving:
    """A connection whose request is still arriving: its bytes so far and its deadline."""

    sock: socket.socket
    address: tuple
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    needed: int | None = None  # the request's whole length, once its head has arrived


def _request_length(head: bytes) -> int | None:
    """The length of the request whose head (through the blank line) is ``head``: plus a valid
    Content-Length up to MAX_UPLOAD_BYTES, else the head alone (the handler refuses the request
    without reading its body)."""
    lengths = re.findall(rb"(?im)^content-length[ \t]*:[ \t]*([^\r\n]*)", head)
    chunked = re.search(rb"(?im)^transfer-encoding[ \t]*:", head)
    if chunked or len(set(v.strip() for v in lengths)) != 1:
        return len(head)
    text = lengths[0].strip()
    if not re.fullmatch(rb"[0-9]{1,15}", text) or int(text) > MAX_UPLOAD_BYTES:
        return len(head)
    return len(head) + int(text)


class Reception(threading.Thread):
    """Reads every connection's request whole in one thread (a selector) before a worker sees it, so
    idle sockets and trickling clients hold no worker. Each request must arrive within ``timeout``
    of its connection's acceptance; at most MAX_ARRIVING connections wait (the longest-waiting one
    closed when a new one comes), with at most MAX_ARRIVING_BYTES together."""

    def __init__(self, server: "DemoServer", timeout: float) -> None:
        super().__init__(name="demo-reception", daemon=True)
        self.server, self.timeout = server, timeout
        self.selector = selectors.DefaultSelector()
        self.arriving: dict[int, _Arriving] = {}
        self.incoming: list[tuple[socket.socket, tuple]] = []
        self.incoming_lock = threading.Lock()
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.selector.register(self.wake_read, selectors.EVENT_READ)
        self.held_bytes = 0
        self.stopping = False

    def add(self, sock: socket.socket, address) -> None:
        with self.incoming_lock:
            self.incoming.append((sock, address))
        self._wake()

    def stop(self) -> None:
        self.stopping = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the wake-up buffer is full: the thread is awake anyway
            self.wake_write.send(b"\0")

    def run(self) -> None:
        while not self.stopping:
            try:
                self._turn()
            except Exception as err:  # one bad connection never stops the reception of the others
                sys.stderr.write(f"demo: reception: {type(err).__name__}: {one_line(err, 200)}\n")
        for arriving in list(self.arriving.values()):
            self._drop(arriving)
        self.selector.close()
        self.wake_read.close()
        self.wake_write.close()

    def _turn(self) -> None:
        """Read what arrived, take new connections, close those past their deadline."""
        now = time.monotonic()
        next_deadline = min((a.deadline for a in self.arriving.values()), default=now + 1.0)
        for key, _ in self.selector.select(max(0.0, min(1.0, next_deadline - now))):
            if key.fileobj is self.wake_read:
                with contextlib.suppress(OSError):
                    while self.wake_read.recv(4096):
                        pass
            else:
                self._read(self.arriving.get(key.fileobj.fileno()))
        self._take_incoming()
        now = time.monotonic()
        for arriving in [a for a in self.arriving.values() if a.deadline <= now]:
            self._drop(arriving)  # the request did not arrive in time: closed without an answer

    def _take_incoming(self) -> None:
        with self.incoming_lock:
            incoming, self.incoming = self.incoming, []
        for sock, address in incoming:
            if len(self.arriving) >= MAX_ARRIVING:  # the longest-waiting connection makes room
                self._drop(min(self.arriving.values(), key=lambda a: a.deadline))
            sock.setblocking(False)
            arriving = _Arriving(sock, address, time.monotonic() + self.timeout)
            self.arriving[sock.fileno()] = arriving
            self.selector.register(sock, selectors.EVENT_READ)
            self._read(arriving)  # what a fast client sent already

    def _read(self, arriving: _Arriving | None) -> None:
        if arriving is None:
            return
        want = (arriving.needed or MAX_HEAD_BYTES + 4) - len(arriving.data)
        try:
            chunk = arriving.sock.recv(max(1, min(want, 1 << 20)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._drop(arriving)
        if not chunk:
            return self._drop(arriving)  # the client went away (or half-closed before finishing)
        if self.held_bytes + len(chunk) > MAX_ARRIVING_BYTES:
            self._release(arriving)
            return self.server.busy(arriving.sock)
        arriving.data += chunk
        self.held_bytes += len(chunk)
        if arriving.needed is None:
            end = arriving.data.find(b"\r\n\r\n")
            if end < 0 and not arriving.data.startswith(b"\n") and len(arriving.data) <= MAX_HEAD_BYTES:
                if b"\n\n" not in arriving.data:
                    return
                end = arriving.data.find(b"\n\n") - 2  # bare LF line ends: http.server accepts them
            if end < 0:  # a head larger than MAX_HEAD_BYTES: the handler refuses it
                arriving.needed = len(arriving.data)
            else:
                arriving.needed = _request_length(bytes(arriving.data[:end + 4]))
        if len(arriving.data) >= arriving.needed:
            self._release(arriving)
            self.server.hand_over(arriving.sock, arriving.address, bytes(arriving.data))

    def _release(self, arriving: _Arriving) -> None:
        self.arriving.pop(arriving.sock.fileno(), None)
        self.held_bytes -= len(arriving.data)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(arriving.sock)

    def _drop(self, arriving: _Arriving) -> None:
        self._release(arriving)
        self.server.shutdown_request(arriving.sock)


class DemoServer(HTTPServer):
    """An HTTP server with a bounded pool (socketserver's threading server starts a thread per
    connection without bound, with a backlog of 5): a Reception reads each request whole, WORKERS
    threads answer, QUEUE more wait, any beyond get a 503 at once. One request per connection."""

    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: type, workers: int, queue: int, timeout: float) -> None:
        super().__init__(address, handler)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="demo")
        self.slots = threading.BoundedSemaphore(workers + queue)
        self.reception = Reception(self, timeout)
        self.reception.start()

    def process_request(self, request, client_address) -> None:
        self.reception.add(request, client_address)

    def hand_over(self, request, client_address, data: bytes) -> None:
        """A complete request (``data``) from the reception: to a worker, or 503 if all are taken."""
        if not self.slots.acquire(blocking=False):
            return self.busy(request)
        try:
            self.pool.submit(self._serve, request, client_address, data)
        except RuntimeError:  # the pool was shut down: the server is closing
            self.slots.release()
            self.shutdown_request(request)

    def _serve(self, request, client_address, data: bytes) -> None:
        try:
            request.setblocking(True)
            self.RequestHandlerClass(request, client_address, self, data)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def busy(self, request) -> None:
        body = json.dumps({"error": "the demo is busy; try again in a moment"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(OSError):  # best effort, never waiting on the client
            request.setblocking(False)
            request.send(head + body)
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """One line, never a traceback; nothing for a client that went away."""
        err = sys.exc_info()[1]
        if err is not None and not isinstance(err, (ConnectionError, TimeoutError)):
            sys.stderr.write(f"demo: {client_address[0]}: {type(err).__name__}: {one_line(err, 200)}\n")

    def server_close(self) -> None:
        # HTTPServer.__init__ calls this when it cannot bind, before the reception and the pool
        # exist; its OSError must then reach the caller (demo: "cannot listen on ...").
        if hasattr(self, "reception"):
            self.reception.stop()
        super().server_close()
        if hasattr(self, "pool"):
            self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(captioner, host: str = "127.0.0.1", port: int = 8000, examples: Sequence[Path] = (),
                timeout: float = TIMEOUT, workers: int = WORKERS, queue: int = QUEUE) -> DemoServer:
    """A server (not yet serving) for ``captioner``; port 0 picks a free port (server.server_port)."""
    handler = type("DemoHandler", (Handler,), {"demo": Demo(captioner, examples), "timeout": timeout})
    return DemoServer((host, port), handler, workers, queue, timeout)


def split_examples(captioner) -> list[Path]:
    """The first images of the checkpoint's test split that exist on disk (the demo never
    generates or downloads a dataset)."""
    from captioning.data.datamodule import CaptionDataModule

    try:
        records = CaptionDataModule(captioner.config.data, captioner.vocab).load_split("test")
    except Exception:  # any missing or unreadable dataset: no examples, the upload still works
        return []
    return [Path(r.path) for r in records[:MAX_EXAMPLES] if os.path.isfile(r.path)]

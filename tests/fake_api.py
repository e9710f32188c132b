"""A fake withoutBG API server speaking real HTTP/1.1 on 127.0.0.1.

Used by the test-suite and by the benchmark scripts in ``bench/``::

    from tests.fake_api import FakeWithoutBG

    with FakeWithoutBG(rate_limit=7, rate_period=60.0) as api:
        httpx.post(f"{api.url}/v1.0/image-without-background",
                   headers={"X-API-Key": "test-key"}, files={"file": jpeg_bytes})

or as a process (prints its base URL on the first stdout line, runs until SIGTERM/SIGINT)::

    python -m tests.fake_api --port 0 --rate-limit 7 --rate-period 6 --latency 0.5 --api-key K

Stdlib plus Pillow only.  ``ThreadingHTTPServer`` with keep-alive (``HTTP/1.1``, every
response carries ``Content-Length``), one daemon thread per connection, TCP_NODELAY.

Routes
------
``POST /v1.0/image-without-background``
    multipart/form-data with a ``file`` part -> 200 ``image/png``: an RGBA PNG of the
    input's width and height whose alpha is a centred filled ellipse (deterministic).
``POST /v1.0/alpha-channel``
    same checks -> 200 ``image/png``: the one-channel ("L") ellipse matte, 255 = opaque.
``GET /available-credit``
    -> 200 ``{"credit": <credit>, "expiration_date": "2027-09-05 23:59:59"}`` (a date in the
    past while ``expired`` is set); 401 on a bad key.  Never rate limited, never costs credit.
    With a right key, faults queued with ``credit=True`` (or ``bad_encoding_credit_next``)
    answer instead, in their own queue.
Any other path -> 404 ``{"detail": "Not Found"}``; a known path with the wrong method -> 405
``{"detail": "Method Not Allowed"}`` (with an ``Allow`` header).

Check order for the POST routes (first match answers)
-----------------------------------------------------
0. ``redirect_all(url)`` is set          -> 301 (or the status given) ``Location: url+path``,
   for every request to any path, the credit route included
1. ``X-API-Key`` missing/wrong           -> 401 ``Invalid API Key``
2. ``expired``                           -> 403 ``Credits Expired. ...``
   ``credit <= 0``                       -> 402 ``Insufficient credit. ...``
3. sliding-window rate limit             -> 429 ``Rate limit (7 request/minute) exceeded``
4. injected faults, in the order queued by the ``*_next`` methods: ``fail_next`` (an error
   status), ``drop_next`` (no answer), ``truncate_next`` (half the body), ``garbage_next``
   (JSON as image/png), ``bad_encoding_next`` (claims gzip, is not), ``answer_next`` (any
   status and body), ``bad_png_next`` (a PNG with valid CRCs that is no usable cut-out:
   IEND only, broken IDAT, 1×1, RGB, wrong size; see ``bad_png``), ``huge_next`` (the PNG
   padded to any size, optionally gzip-encoded or without Content-Length),
   ``trickle_next`` (the body a byte at a time), ``redirect_next`` (3xx with a Location),
   ``echo_key_next`` (an error whose detail quotes the X-API-Key received)
5. body checks: 413 (request or ``file`` part over ``max_bytes``), 422 (not multipart or no
   ``file`` part, FastAPI list form), 415 (magic bytes not JPEG/PNG/WebP/TIFF/BMP/GIF),
   422 ``Validation Error`` (Pillow cannot fully decode it)
6. 200, costing one credit.

Steps 1-3 are decided from the headers alone, atomically under one lock, at the moment the
request arrives (``RequestRecord.arrived``, taken inside that lock), so decisions are taken in
arrival order even when uploads overlap.  The body is always read afterwards (so the
connection stays usable, and so records carry the upload's sha256 even for rejected requests).
With ``admit_after_body=True`` the same admission happens instead once the whole body has been
received (as a server whose limiter runs after form parsing would do); ``arrived`` is then
that moment.

Rate-limit accounting (strict sliding window)
---------------------------------------------
A POST arriving at ``t`` is answered 429 when ``rate_limit`` or more *counted* POSTs arrived
in ``(t - rate_period, t]``.  Counted are all POSTs that got past steps 1-2 and were not
answered 429 -- that includes those that later get an injected fault (5xx, drop, truncate,
garbage), a 413, 415 or 422.  Not counted: 401, 402 and 403 answers, and 429 answers unless
``count_rejected=True``.  The 429 text reads ``Rate limit (<rate_limit> request/<unit>)
exceeded`` where unit is ``minute`` for a 60 s period, ``second`` for 1 s, ``hour`` for
3600 s, else ``<period> seconds``.

Credit
------
A POST that passes step 2 reserves one credit at once (so concurrent requests can never
produce more 200s than there were credits); the reservation is kept only by a real 200 and
refunded for every other outcome, injected ``truncate``/``garbage`` 200s included.
``GET /available-credit`` reports the balance net of reservations in flight.

``latency`` is slept after the body has been read, for every POST that passed step 3,
before the answer is written; ``stop()`` cuts the sleep short and the request is then
dropped without an answer.

Caveat: ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is process-global; if code in the same
process sets it, truncated images are no longer answered 422 by this in-process fake.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import email.parser
import email.policy
import hashlib
import io
import json
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal

from PIL import Image, ImageDraw

__all__ = [
    "ALPHA_PATH",
    "BAD_PNG_KINDS",
    "CREDIT_PATH",
    "CUTOUT_PATH",
    "BadPng",
    "FakeWithoutBG",
    "RequestRecord",
    "bad_png",
    "main",
]

CUTOUT_PATH = "/v1.0/image-without-background"
ALPHA_PATH = "/v1.0/alpha-channel"
CREDIT_PATH = "/available-credit"

EXPIRATION_DATE = "2027-09-05 23:59:59"
EXPIRED_DATE = "2024-09-05 23:59:59"

MSG_INVALID_KEY = "Invalid API Key"
MSG_NO_CREDIT = "Insufficient credit. Please top up API credits."
MSG_EXPIRED = (
    "Credits Expired. Please top up API credits. If you have existing credits, they will be reactivated."
)
MSG_UNSUPPORTED = "Unsupported Media Type. Supported formats are: JPEG, PNG, WebP, TIFF, BMP, GIF."
MSG_VALIDATION = "Validation Error"
MSG_SERVER_ERROR = "Internal Server Error. Please contact support: contact@withoutbg.com"
MISSING_FILE_DETAIL: list[dict[str, Any]] = [
    {"loc": ["body", "file"], "msg": "field required", "type": "value_error.missing"}
]

_MIB = 1024 * 1024
_READ_CHUNK = 256 * 1024
# Bodies announced above this are not even drained: answer 413 and close the connection.
_HARD_DRAIN_CAP = 256 * _MIB
_CACHE_ENTRIES = 64
_CACHE_BYTES = 128 * _MIB

FaultKind = Literal[
    "fail",
    "drop",
    "truncate",
    "garbage",
    "bad_encoding",
    "answer",
    "bad_png",
    "huge",
    "trickle",
    "redirect",
    "echo_key",
]
BadPng = Literal["iend_only", "broken_idat", "tiny", "rgb", "wrong_size"]
BAD_PNG_KINDS: tuple[BadPng, ...] = ("iend_only", "broken_idat", "tiny", "rgb", "wrong_size")


@dataclass(frozen=True)
class RequestRecord:
    """One POST as seen by the fake server (records are ordered by arrival).

    ``arrived`` is ``time.time()`` right after the request line and headers were parsed (the
    same instant the rate window was checked; with ``admit_after_body`` the instant the body
    was complete).  ``seq`` is the arrival rank.  ``status`` is the status sent, or 0 when the
    connection was dropped without an answer (``drop_next``).  ``sha256``/``filename``/
    ``size`` describe the multipart ``file`` part (None if there was none or the body was
    not parsed because it was too large), ``image_size``/``image_format`` the image in it
    (from its header; None when it is none).  ``injected`` names the fault used, if any (the
    name of the ``*_next`` method without ``_next``: ``"fail"``, ``"drop"``, ``"truncate"``,
    ``"garbage"``, ``"bad_encoding"``, ``"answer"``, ``"bad_png"``, ``"huge"``,
    ``"trickle"``, ``"redirect"``, ``"echo_key"``), or ``"redirect_all"``.
    """

    arrived: float
    path: str
    status: int
    sha256: str | None
    filename: str | None
    size: int | None
    api_key_ok: bool
    rate_limited: bool
    injected: str | None = None
    seq: int = 0
    image_size: tuple[int, int] | None = None  # (width, height) of the uploaded image
    image_format: str | None = None  # Pillow's format name of the uploaded image


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind
    status: int = 500
    retry_after: str | None = None
    body: bytes = b""  # answer
    content_type: str = "image/png"  # answer
    headers: tuple[tuple[str, str], ...] = ()  # answer; redirect (its Location)
    png: BadPng = "iend_only"  # bad_png
    size: int = 0  # huge: bytes of the body before any Content-Encoding
    gzip: bool = False  # huge: sent with Content-Encoding: gzip
    announce: bool = True  # huge: send Content-Length (else close-delimited)
    interval: float = 0.05  # trickle: seconds between pieces
    piece: int = 1  # trickle: bytes a piece


@dataclass
class _Admission:
    """Decision taken atomically when a POST arrives."""

    arrived: float
    seq: int
    api_key_ok: bool
    status: int | None  # None: accepted into the window, go on
    detail: Any = None
    rate_limited: bool = False
    reserved_credit: bool = False
    fault: _Fault | None = None


@dataclass
class _Upload:
    """What could be learned from a request body."""

    too_large: bool = False  # request or file part over the limit
    data: bytes | None = None  # the `file` part
    filename: str | None = None
    sha256: str | None = None  # of data


@dataclass
class _Reply:
    """An answer, fully decided before anything is written."""

    status: int  # 0 when nothing is sent
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    kind: Literal["normal", "drop", "truncate", "trickle", "stream"] = "normal"
    # stream: the body comes from ``chunks()`` (else ``body``); ``length`` is the
    # Content-Length to announce (None: none, the connection is closed after the body).
    chunks: Callable[[], Iterator[bytes]] | None = None
    length: int | None = None
    interval: float = 0.0  # trickle: seconds between pieces of ``piece`` bytes
    piece: int = 1


def _bad_encoding_reply(content_type: str) -> _Reply:
    return _Reply(200, b"this is not gzip at all", content_type, headers={"Content-Encoding": "gzip"})


def _json_reply(status: int, detail: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps({"detail": detail}).encode(), headers=headers or {})


def _detect_format(data: bytes) -> str | None:
    """Image format from magic bytes, or None when not a supported one."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _image_fields(data: bytes | None) -> dict[str, Any]:
    """``image_size`` and ``image_format`` of an upload, from its header (for records)."""
    if not data:
        return {}
    try:
        with Image.open(io.BytesIO(data)) as im:
            return {"image_size": im.size, "image_format": im.format}
    except Exception:
        return {}


def _decode(data: bytes) -> Image.Image | None:
    """Fully decode with Pillow; None when the image is corrupt or truncated."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception:
        return None
    return im


def _ellipse_matte(size: tuple[int, int]) -> Image.Image:
    width, height = size
    matte = Image.new("L", size, 0)
    ImageDraw.Draw(matte).ellipse((0, 0, width - 1, height - 1), fill=255)
    return matte


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render(im: Image.Image, alpha_only: bool) -> bytes:
    """The fake model: RGBA cut-out (or L matte) at the input's size."""
    matte = _ellipse_matte(im.size)
    if alpha_only:
        return _png(matte)
    try:
        rgba = im.convert("RGBA")
    except Exception:  # exotic modes (e.g. some 16-bit TIFFs)
        rgba = Image.new("RGBA", im.size, (128, 128, 128, 255))
    rgba.putalpha(matte)
    return _png(rgba)


def _chunks(png: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a well-formed PNG."""
    pos = 8
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        yield png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        pos += 12 + length


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def bad_png(kind: BadPng, size: tuple[int, int]) -> bytes:
    """A PNG body that a careful client must refuse as the cut-out of a ``size`` =
    (width, height) pixel input, though every chunk CRC is valid:

    ``iend_only``   the signature and an IEND chunk, nothing else (20 bytes)
    ``broken_idat`` the right RGBA image, but its IDAT data is not a valid zlib stream
    ``tiny``        a whole 1×1 RGBA image
    ``rgb``         a whole RGB image of ``size`` (no alpha)
    ``wrong_size``  a whole RGBA image one pixel wider than ``size``
    """
    width, height = size
    if kind == "iend_only":
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IEND", b"")
    if kind == "tiny":
        return _png(Image.new("RGBA", (1, 1), (10, 20, 30, 255)))
    if kind == "rgb":
        return _png(Image.new("RGB", size, (10, 20, 30)))
    if kind == "wrong_size":
        return _png(Image.new("RGBA", (width + 1, height), (10, 20, 30, 255)))
    if kind == "broken_idat":
        good = _png(Image.new("RGBA", size, (10, 20, 30, 255)))
        out = [good[:8]]
        for ctype, data in _chunks(good):
            if ctype == b"IDAT":  # keep the zlib header; 0xff... is an invalid block type
                data = data[:2] + b"\xff" * (len(data) - 2)
            out.append(_chunk(ctype, data))
        return b"".join(out)
    raise ValueError(f"unknown bad PNG kind {kind!r}")


def _padded(head: bytes, size: int, pad: bytes) -> Iterator[bytes]:
    """``head`` then ``pad`` bytes up to ``size`` bytes in all, in pieces of 256 KiB."""
    yield head
    left = size - len(head)
    block = pad * _READ_CHUNK
    while left > 0:
        piece = block[: min(left, len(block))]
        left -= len(piece)
        yield piece


def _gzipped(pieces: Iterator[bytes]) -> bytes:
    """One gzip member of everything ``pieces`` yields (kept small: the padding is uniform)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    out = [comp.compress(piece) for piece in pieces]
    out.append(comp.flush())
    return b"".join(out)


def _placeholder_png() -> bytes:
    im = Image.new("RGBA", (64, 64), (200, 100, 50, 255))
    im.putalpha(_ellipse_matte(im.size))
    return _png(im)


def _period_unit(period: float) -> str:
    if period == 60:
        return "minute"
    if period == 1:
        return "second"
    if period == 3600:
        return "hour"
    return f"{period:g} seconds"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], fake: FakeWithoutBG) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds on machines without a resolver.  Skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.fake._track(request, add=True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.fake._track(request, add=False)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Client resets, sockets closed by stop(): not worth a traceback on stderr.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        super().handle_error(request, client_address)


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-withoutbg/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    server: _Server

    # ---- plumbing -------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def version_string(self) -> str:
        return self.server_version

    @property
    def fake(self) -> FakeWithoutBG:
        return self.server.fake

    def _emit(self, reply: _Reply, *, close: bool, head: bool = False) -> None:
        """Write ``reply``; ``close`` when the request body could not be drained."""
        if reply.kind == "drop":  # no answer at all, just hang up
            self.close_connection = True
            return
        length = reply.length if reply.kind == "stream" else len(reply.body)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if close or length is None:  # (no length: the end of the body is the end of the connection)
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        stopping = self.fake._stopping
        if reply.kind == "truncate":
            self.wfile.write(reply.body[: len(reply.body) // 2])
            self.close_connection = True
        elif reply.kind == "stream":
            for piece in reply.chunks() if reply.chunks is not None else [reply.body]:
                if stopping.is_set():
                    self.close_connection = True
                    return
                self.wfile.write(piece)  # a client that hung up ends this with an OSError
        elif reply.kind == "trickle":
            for pos in range(0, len(reply.body), reply.piece):
                if stopping.wait(reply.interval):  # stop() ends a trickle at once
                    self.close_connection = True
                    return
                self.wfile.write(reply.body[pos : pos + reply.piece])
        else:
            self.wfile.write(reply.body)

    def _read_body(self, limit: int) -> tuple[bytes | None, bool]:
        """Read the request body (Content-Length or chunked).

        Returns ``(body, ok)``: body is None when it exceeded ``limit`` (it was drained and
        discarded); ok is False when the connection must be closed (body not drained).
        """
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            return self._read_chunked(limit)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b"", True
        try:
            length = int(raw_length)
        except ValueError as exc:
            raise _BadRequest("bad Content-Length") from exc
        if length < 0:
            raise _BadRequest("bad Content-Length")
        if length > limit:
            if length > _HARD_DRAIN_CAP:
                return None, False
            self._drain(length)
            return None, True
        body = self.rfile.read(length)
        if len(body) != length:
            raise _BadRequest("short body")
        return body, True

    def _drain(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(_READ_CHUNK, remaining))
            if not chunk:
                raise _BadRequest("short body")
            remaining -= len(chunk)

    def _read_chunked(self, limit: int) -> tuple[bytes | None, bool]:
        parts: list[bytes] = []
        total = 0
        over = False
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise _BadRequest("bad chunk header")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BadRequest("bad chunk size") from exc
            if size < 0:
                raise _BadRequest("bad chunk size")
            if size == 0:
                break
            total += size
            if total > _HARD_DRAIN_CAP:
                return None, False
            if over or total > limit:
                over = True
                parts.clear()
                self._drain(size)
            else:
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise _BadRequest("short chunk")
                parts.append(chunk)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BadRequest("missing chunk terminator")
        while True:  # trailers
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
        return (None if over else b"".join(parts)), True

    def _parse_upload(self, body: bytes | None) -> _Upload:
        if body is None:
            return _Upload(too_large=True)
        ctype = self.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return _Upload()
        try:
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body
            )
        except Exception:
            return _Upload()
        if not msg.is_multipart():
            return _Upload()
        upload = _Upload()
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") != "file":
                continue
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                upload.data = payload
                upload.sha256 = hashlib.sha256(payload).hexdigest()
                upload.filename = part.get_filename()
                upload.too_large = len(payload) > self.fake.max_bytes
                break
        return upload

    # ---- dispatch -------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        redirect = self.fake._redirect_for(self.path)
        if redirect is not None:
            self._redirect(method, path, *redirect)
            return
        if method == "POST" and path in (CUTOUT_PATH, ALPHA_PATH):
            self._handle_process(alpha_only=path == ALPHA_PATH)
            return
        arrived, seq = self.fake._arrive() if method == "POST" else (0.0, 0)
        try:
            _, drained = self._read_body(0)  # a body here is unusual; drain it anyway
            if method == "GET" and path == CREDIT_PATH:
                reply = self._credit_reply()
            elif path in (CUTOUT_PATH, ALPHA_PATH, CREDIT_PATH):
                allow = "GET" if path == CREDIT_PATH else "POST"
                reply = _json_reply(405, "Method Not Allowed", {"Allow": allow})
            else:
                reply = _json_reply(404, "Not Found")
        except _BadRequest as exc:
            reply, drained = _json_reply(400, str(exc)), False
        if method == "POST":  # every POST is recorded, even to a wrong path
            self.fake._record(
                RequestRecord(
                    arrived=arrived,
                    path=self.path,
                    status=reply.status,
                    sha256=None,
                    filename=None,
                    size=None,
                    api_key_ok=self.headers.get("X-API-Key") == self.fake.api_key,
                    rate_limited=False,
                    seq=seq,
                )
            )
        self._emit(reply, close=not drained, head=method == "HEAD")

    def _redirect(self, method: str, path: str, status: int, location: str) -> None:
        """Step 0 (``redirect_all``): every request, any path, is answered ``status`` with
        ``Location``; nothing is admitted, nothing costs credit or counts in the window."""
        fake = self.fake
        arrived, seq = fake._arrive() if method == "POST" else (0.0, 0)
        try:
            _, drained = self._read_body(0)  # drained and discarded
        except _BadRequest:
            drained = False
        if method == "GET" and path == CREDIT_PATH:
            with fake._lock:
                fake._credit_checks += 1
        reply = _Reply(status, b"", "text/html", {"Location": location})
        if method == "POST":
            fake._record(
                RequestRecord(
                    arrived=arrived,
                    path=self.path,
                    status=status,
                    sha256=None,
                    filename=None,
                    size=None,
                    api_key_ok=self.headers.get("X-API-Key") == fake.api_key,
                    rate_limited=False,
                    injected="redirect_all",
                    seq=seq,
                )
            )
        self._emit(reply, close=not drained, head=method == "HEAD")

    def _credit_reply(self) -> _Reply:
        fake = self.fake
        key_ok = self.headers.get("X-API-Key") == fake.api_key
        with fake._lock:
            fake._credit_checks += 1
            credit = fake._credit
            expired = fake._expired
        if not key_ok:
            return _json_reply(401, MSG_INVALID_KEY)
        payload = {
            "credit": credit,
            "expiration_date": EXPIRED_DATE if expired else EXPIRATION_DATE,
        }
        good = _Reply(200, json.dumps(payload).encode())
        with fake._lock:
            fault = fake._credit_faults.popleft() if fake._credit_faults else None
        if fault is not None:
            return self._fault_reply(fault, good, (64, 64), pad=b" ")
        return good

    def _handle_process(self, *, alpha_only: bool) -> None:
        fake = self.fake
        key = self.headers.get("X-API-Key")
        # Admission (auth, credit, rate window) at header time, or once the body is in.
        adm = None if fake.admit_after_body else fake._admit(key)
        upload = _Upload()
        drained = False
        try:
            body, drained = self._read_body(fake.max_bytes + _MIB)
            if adm is None:
                adm = fake._admit(key)
            upload = self._parse_upload(body)
            if adm.status is not None:
                reply = _json_reply(adm.status, adm.detail)
            else:
                fake._sleep_latency()
                if fake._stopping.is_set():  # stop() during the latency: hang up
                    reply = _Reply(0, kind="drop")
                elif adm.fault is not None:
                    reply = self._upload_fault_reply(adm.fault, upload, alpha_only)
                else:
                    reply = self._upload_reply(upload, alpha_only)
        except _BadRequest as exc:
            reply, drained = _json_reply(400, str(exc)), False
        except OSError:  # the client went away mid-request
            reply = _Reply(0, kind="drop")
        except Exception:  # a bug in the fake: make it loud, but answer like the real API
            traceback.print_exc()
            reply, drained = _json_reply(500, MSG_SERVER_ERROR), False
        if adm is None:  # the body could not be read: recorded, but never admitted
            arrived, seq = fake._arrive()
            adm = _Admission(arrived, seq, key is not None and key == fake.api_key, reply.status)
        # Book-keeping before answering, so a client never sees an answer whose record or
        # credit change is not visible yet.
        if reply.status != 200 or adm.fault is not None:
            fake._refund(adm)  # only a real 200 costs a credit
        data = upload.data
        fake._record(
            RequestRecord(
                arrived=adm.arrived,
                path=self.path,
                status=reply.status,
                sha256=upload.sha256,
                filename=upload.filename,
                size=len(data) if data is not None else None,
                api_key_ok=adm.api_key_ok,
                rate_limited=adm.rate_limited,
                injected=adm.fault.kind if adm.fault else None,
                seq=adm.seq,
                **_image_fields(data),
            )
        )
        self._emit(reply, close=not drained)

    def _upload_fault_reply(self, fault: _Fault, upload: _Upload, alpha_only: bool) -> _Reply:
        im = _decode(upload.data) if upload.data and not upload.too_large else None
        png = self.fake._rendered(upload, im, alpha_only) if im is not None else _placeholder_png()
        size = im.size if im is not None else (64, 64)
        return self._fault_reply(fault, _Reply(200, png, "image/png"), size, pad=b"\0")

    def _fault_reply(self, fault: _Fault, good: _Reply, size: tuple[int, int], *, pad: bytes) -> _Reply:
        """The answer ``fault`` makes of ``good`` (what the route would have answered) for an
        input of ``size`` = (width, height) pixels; ``pad`` fills the body of ``huge``."""
        if fault.kind == "fail":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return _json_reply(fault.status, self.fake._detail_for(fault.status), extra)
        if fault.kind == "drop":
            return _Reply(0, kind="drop")
        if fault.kind == "garbage":
            return _Reply(200, json.dumps({"detail": "this is not a PNG"}).encode(), "image/png")
        if fault.kind == "bad_encoding":
            return _bad_encoding_reply(good.content_type)
        if fault.kind == "answer":
            return _Reply(fault.status, fault.body, fault.content_type, dict(fault.headers))
        if fault.kind == "bad_png":
            return _Reply(200, bad_png(fault.png, size), "image/png")
        if fault.kind == "redirect":
            return _Reply(fault.status, b"", "text/html", dict(fault.headers))
        if fault.kind == "echo_key":
            detail = f"{self.fake._detail_for(fault.status)}: got X-API-Key {self.headers.get('X-API-Key')}"
            return _json_reply(fault.status, detail)
        if fault.kind == "trickle":
            return dataclasses.replace(good, kind="trickle", interval=fault.interval, piece=fault.piece)
        if fault.kind == "huge" and fault.gzip:
            packed = _gzipped(_padded(good.body, fault.size, pad))
            return _Reply(
                200,
                packed,
                good.content_type,
                {**good.headers, "Content-Encoding": "gzip"},
                kind="stream",
                length=len(packed) if fault.announce else None,
            )
        if fault.kind == "huge":
            head, size = good.body, fault.size
            return _Reply(
                200,
                content_type=good.content_type,
                headers=dict(good.headers),
                kind="stream",
                chunks=lambda: _padded(head, size, pad),
                length=size if fault.announce else None,
            )
        # truncate: promise the whole body, send half of it, hang up.
        return dataclasses.replace(good, kind="truncate")

    def _upload_reply(self, upload: _Upload, alpha_only: bool) -> _Reply:
        if upload.too_large:
            return _json_reply(413, self.fake._too_large_text())
        if upload.data is None:
            return _json_reply(422, MISSING_FILE_DETAIL)
        if _detect_format(upload.data) is None:
            return _json_reply(415, MSG_UNSUPPORTED)
        im = _decode(upload.data)
        if im is None:
            return _json_reply(422, MSG_VALIDATION)
        return _Reply(200, self.fake._rendered(upload, im, alpha_only), "image/png")


class FakeWithoutBG:
    """In-process fake of the withoutBG API; see the module docstring for the contract.

    All knobs (``latency``, ``credit``, ``expired``, ``rate_limit``, ``rate_period``) are
    thread-safe properties that may be changed while the server runs; so may
    ``redirect_all`` and the fault queues (``*_next``).
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        rate_limit: int = 7,
        rate_period: float = 60.0,
        max_bytes: int = 10 * 1024 * 1024,
        latency: float = 0.0,
        credit: int = 1000,
        count_rejected: bool = False,
        admit_after_body: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.count_rejected = count_rejected
        self.admit_after_body = admit_after_body
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._rate_limit = rate_limit
        self._rate_period = rate_period
        self._latency = latency
        self._credit = credit
        self._expired = False
        self._window: list[float] = []  # arrival times of counted POSTs, sorted
        self._faults: deque[_Fault] = deque()
        self._cache: OrderedDict[tuple[str, bool], bytes] = OrderedDict()
        self._cache_bytes = 0
        self._records: list[RequestRecord] = []
        self._seq = 0
        self._credit_checks = 0
        self._credit_faults: deque[_Fault] = deque()  # for GET /available-credit
        self._redirect_all: tuple[int, str] | None = None  # (status, base URL)
        self._connections = 0
        self._open_sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> FakeWithoutBG:
        """Bind (port 0 = any free port) and serve in a background daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeWithoutBG already started")
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-withoutbg:{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open client connection (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets = list(self._open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeWithoutBG:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeWithoutBG not started")
        return self._server.server_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        return f"http://{self._host}:{self.port}"

    # ---- knobs ----------------------------------------------------------------------
    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        with self._lock:
            self._latency = value

    @property
    def credit(self) -> int:
        with self._lock:
            return self._credit

    @credit.setter
    def credit(self, value: int) -> None:
        with self._lock:
            self._credit = value

    @property
    def expired(self) -> bool:
        with self._lock:
            return self._expired

    @expired.setter
    def expired(self, value: bool) -> None:
        with self._lock:
            self._expired = value

    @property
    def rate_limit(self) -> int:
        with self._lock:
            return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: int) -> None:
        with self._lock:
            self._rate_limit = value

    @property
    def rate_period(self) -> float:
        with self._lock:
            return self._rate_period

    @rate_period.setter
    def rate_period(self, value: float) -> None:
        with self._lock:
            self._rate_period = value

    def fail_next(self, n: int, status: int = 500, retry_after: str | None = None) -> None:
        """The next ``n`` POSTs that pass auth, credit and rate checks get ``status`` with a
        JSON ``detail`` (plus ``Retry-After: retry_after`` when given)."""
        self._queue(_Fault("fail", status, retry_after), n)

    def drop_next(self, n: int) -> None:
        """The next ``n`` admitted POSTs: read the request, close without any response."""
        self._queue(_Fault("drop"), n)

    def truncate_next(self, n: int) -> None:
        """The next ``n`` admitted POSTs: 200 image/png headers with the full PNG's
        Content-Length, but only half the body, then close."""
        self._queue(_Fault("truncate"), n)

    def garbage_next(self, n: int) -> None:
        """The next ``n`` admitted POSTs: 200 ``image/png`` whose body is JSON, not a PNG."""
        self._queue(_Fault("garbage"), n)

    def bad_encoding_next(self, n: int) -> None:
        """The next ``n`` admitted POSTs: 200 ``image/png`` that claims ``Content-Encoding:
        gzip`` but is not gzip (a client cannot decode it)."""
        self._queue(_Fault("bad_encoding"), n)

    def bad_encoding_credit_next(self, n: int) -> None:
        """The next ``n`` ``GET /available-credit`` answers: 200 with a body that claims
        ``Content-Encoding: gzip`` but is not gzip."""
        self._queue(_Fault("bad_encoding"), n, credit=True)

    # The faults below take ``credit=True`` to apply to the next ``GET /available-credit``
    # answers (with a right key) instead of the next admitted POSTs; the two queues are
    # independent.

    def answer_next(
        self,
        n: int,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "image/png",
        headers: dict[str, str] | None = None,
        credit: bool = False,
    ) -> None:
        """The next ``n`` answers are exactly ``status`` with ``body`` (and ``headers``)."""
        fault = _Fault("answer", status, body=body, content_type=content_type)
        self._queue(dataclasses.replace(fault, headers=tuple((headers or {}).items())), n, credit=credit)

    def bad_png_next(self, n: int, kind: BadPng) -> None:
        """The next ``n`` admitted POSTs: 200 ``image/png`` with ``bad_png(kind, size)``, where
        size is the uploaded image's (64×64 when it does not decode): valid chunk CRCs, but
        no usable cut-out (see :func:`bad_png`)."""
        self._queue(_Fault("bad_png", png=kind), n)

    def huge_next(
        self, n: int, size: int, *, gzip: bool = False, announce: bool = True, credit: bool = False
    ) -> None:
        """The next ``n`` answers: 200 whose body is the right answer (the PNG, the credit
        JSON) padded to ``size`` bytes (NUL bytes after a PNG's IEND, spaces after the JSON),
        streamed in 256 KiB pieces.  ``gzip``: sent gzip-compressed (``Content-Encoding:
        gzip``; the wire body is about ``size / 1000`` bytes).  ``announce=False``: no
        Content-Length, the body ends when the connection closes."""
        self._queue(_Fault("huge", size=size, gzip=gzip, announce=announce), n, credit=credit)

    def trickle_next(self, n: int, *, interval: float = 0.05, piece: int = 1, credit: bool = False) -> None:
        """The next ``n`` answers: the right answer's status, headers and Content-Length at
        once, then its body ``piece`` bytes every ``interval`` seconds.  The trickle ends with
        the body, when the client hangs up, or at once on :meth:`stop`."""
        self._queue(_Fault("trickle", interval=interval, piece=piece), n, credit=credit)

    def redirect_next(
        self,
        n: int,
        status: int = 302,
        location: str = "https://api.example.invalid/v1.0/image-without-background",
        *,
        credit: bool = False,
    ) -> None:
        """The next ``n`` answers: ``status`` (301, 302, 307, 308...) with ``Location:
        location`` and an empty body."""
        self._queue(_Fault("redirect", status, headers=(("Location", location),)), n, credit=credit)

    def echo_key_next(self, n: int, status: int = 401, *, credit: bool = False) -> None:
        """The next ``n`` answers: ``status`` with a JSON ``detail`` that quotes the
        ``X-API-Key`` header received (as careless servers do)."""
        self._queue(_Fault("echo_key", status), n, credit=credit)

    def redirect_all(self, base_url: str | None, status: int = 301) -> None:
        """Step 0 of the check order, for every request to any path while set: answer
        ``status`` with ``Location: <base_url><path>`` (a moved service, an http:// URL of an
        https:// one).  Nothing is admitted or costs credit; POSTs are recorded with
        ``injected="redirect_all"``.  ``None`` turns it off."""
        with self._lock:
            self._redirect_all = None if base_url is None else (status, base_url.rstrip("/"))

    def _redirect_for(self, path: str) -> tuple[int, str] | None:
        with self._lock:
            redirect = self._redirect_all
        return None if redirect is None else (redirect[0], redirect[1] + path)

    def _queue(self, fault: _Fault, n: int, *, credit: bool = False) -> None:
        with self._lock:
            (self._credit_faults if credit else self._faults).extend([fault] * n)

    def reset(self) -> None:
        """Forget records, counters, the rate window and queued faults (knobs, and
        ``redirect_all``, are kept)."""
        with self._lock:
            self._window.clear()
            self._faults.clear()
            self._credit_faults.clear()
            self._records.clear()
            self._credit_checks = 0

    # ---- records --------------------------------------------------------------------
    def records(self) -> list[RequestRecord]:
        """Snapshot of completed POSTs, in arrival order."""
        with self._lock:
            return sorted(self._records, key=lambda r: r.seq)

    @property
    def requests(self) -> list[RequestRecord]:
        """Same as :meth:`records` (a fresh copy on every access)."""
        return self.records()

    @property
    def credit_checks(self) -> int:
        """Number of ``GET /available-credit`` requests received."""
        with self._lock:
            return self._credit_checks

    @property
    def connection_count(self) -> int:
        """Number of TCP connections accepted so far (to observe keep-alive)."""
        with self._lock:
            return self._connections

    def window_count(self, at: float | None = None) -> int:
        """Counted POSTs in ``(at - rate_period, at]`` (``at`` defaults to now)."""
        t = time.time() if at is None else at
        with self._lock:
            lo = bisect.bisect_right(self._window, t - self._rate_period)
            return bisect.bisect_right(self._window, t) - lo

    def wait_for(self, predicate: Callable[[FakeWithoutBG], bool], timeout: float) -> bool:
        """Poll ``predicate(self)`` until it is true or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bool(predicate(self))
            time.sleep(min(0.005, remaining))

    # ---- used by the handler ----------------------------------------------------------
    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections += 1
                self._open_sockets.add(sock)
            else:
                self._open_sockets.discard(sock)

    def _arrive(self) -> tuple[float, int]:
        with self._lock:
            self._seq += 1
            return time.time(), self._seq

    def _admit(self, key: str | None) -> _Admission:
        """Steps 1-4 of the check order, atomically, at arrival time."""
        key_ok = key is not None and key == self.api_key
        with self._lock:
            now = time.time()
            self._seq += 1
            adm = _Admission(arrived=now, seq=self._seq, api_key_ok=key_ok, status=None)
            if not key_ok:
                adm.status, adm.detail = 401, MSG_INVALID_KEY
                return adm
            if self._expired:
                adm.status, adm.detail = 403, MSG_EXPIRED
                return adm
            if self._credit <= 0:
                adm.status, adm.detail = 402, MSG_NO_CREDIT
                return adm
            window = self._window
            # Drop entries that can never count again (clock assumed non-decreasing).
            del window[: bisect.bisect_right(window, now - self._rate_period)]
            in_window = bisect.bisect_right(window, now)
            if in_window >= self._rate_limit:
                adm.status, adm.detail = 429, self._rate_text()
                adm.rate_limited = True
                if self.count_rejected:
                    bisect.insort(window, now)
                return adm
            bisect.insort(window, now)
            self._credit -= 1
            adm.reserved_credit = True
            if self._faults:
                adm.fault = self._faults.popleft()
            return adm

    def _rendered(self, upload: _Upload, im: Image.Image, alpha_only: bool) -> bytes:
        """``_render`` with a small LRU cache keyed by the upload's sha256 (benchmarks resend
        the same photos; PNG encoding is most of the fake's CPU time)."""
        key = (upload.sha256 or "", alpha_only)
        with self._lock:
            png = self._cache.get(key)
            if png is not None:
                self._cache.move_to_end(key)
                return png
        png = _render(im, alpha_only)
        with self._lock:
            self._cache[key] = png
            self._cache_bytes += len(png)
            while self._cache_bytes > _CACHE_BYTES or len(self._cache) > _CACHE_ENTRIES:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)
        return png

    def _refund(self, adm: _Admission) -> None:
        if adm.reserved_credit:
            with self._lock:
                self._credit += 1
            adm.reserved_credit = False

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _sleep_latency(self) -> None:
        delay = self.latency
        if delay > 0:
            self._stopping.wait(delay)

    def _rate_text(self) -> str:
        return f"Rate limit ({self._rate_limit} request/{_period_unit(self._rate_period)}) exceeded"

    def _too_large_text(self) -> str:
        return f"File size too large. Maximum file size is {self.max_bytes / _MIB:.1f} MB"

    def _detail_for(self, status: int) -> Any:
        if status >= 500:
            return MSG_SERVER_ERROR
        with self._lock:
            rate_text = self._rate_text()
        known: dict[int, Any] = {
            401: MSG_INVALID_KEY,
            402: MSG_NO_CREDIT,
            403: MSG_EXPIRED,
            413: self._too_large_text(),
            415: MSG_UNSUPPORTED,
            422: MSG_VALIDATION,
            429: rate_text,
        }
        if status in known:
            return known[status]
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "Error"


def main(argv: list[str] | None = None) -> int:
    """Run the fake in the foreground; print its URL first; stop on SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_api", description="Fake withoutBG API server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--rate-limit", type=int, default=7)
    parser.add_argument("--rate-period", type=float, default=60.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--credit", type=int, default=1000)
    parser.add_argument("--max-bytes", type=int, default=10 * _MIB)
    parser.add_argument("--count-rejected", action="store_true")
    parser.add_argument("--admit-after-body", action="store_true")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fake = FakeWithoutBG(
        api_key=args.api_key,
        rate_limit=args.rate_limit,
        rate_period=args.rate_period,
        max_bytes=args.max_bytes,
        latency=args.latency,
        credit=args.credit,
        count_rejected=args.count_rejected,
        admit_after_body=args.admit_after_body,
        host=args.host,
        port=args.port,
    )
    with fake:
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

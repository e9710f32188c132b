"""The withoutBG endpoints over httpx.

Uploads stream from the spool file; answers stream into a file on the outbox's file
system. Every call returns a :class:`~dropcut.judge.Outcome` (never raises for HTTP or
transport trouble), so the judge decides what it means. The API key is sent only in the
``X-API-Key`` header and never formatted into text: whatever the client turns into
``Outcome.detail`` or ``Outcome.location`` (an error body that echoes the key, an
exception's text) has every key this client ever used replaced by ``[redacted]``.

Nothing read from the network is unbounded:

* the whole request (upload, wait, download) has one deadline, the ``timeout`` given to
  the client (``request_timeout_seconds``), besides httpx's per-operation timeouts, so a
  server that trickles its answer cannot hold a request for ever;
* a 200 answer may be at most :func:`answer_limit` bytes *after* Content-Encoding is
  undone (refused at once when Content-Length announces more, else counted while written;
  gzip and deflate are inflated here, 64 KiB at a time, never a whole body at once);
* any other body (error JSON, a redirect, ``/available-credit``) is read up to
  :data:`SMALL_BODY_LIMIT` bytes;
* a 200 answer is accepted only when :func:`check_answer` finds it whole: a PNG that
  decodes completely, of the input's (width, height), with the expected channels.

The multipart body is encoded here rather than by httpx: we need the moment the last byte
of the upload was handed to the socket, because that bounds when the server counted the
request in its rate-limit window (see :mod:`dropcut.pace`). It is the standard
``multipart/form-data`` framing with one part, ``file``, and an exact Content-Length.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import struct
import time
import urllib.parse
import warnings
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic import SecretStr

from dropcut import __version__
from dropcut.decode import DecodeFailure, check_decodes
from dropcut.judge import BodyProblem, Outcome, TransportError, flatten_detail, transport_error_kind

REMOVE_PATH = "/v1.0/image-without-background"
ALPHA_PATH = "/v1.0/alpha-channel"
CREDIT_PATH = "/available-credit"
CHUNK = 64 * 1024
MIB = 1024 * 1024
# Error JSON, redirect bodies and /available-credit answers are read up to this many
# (decoded) bytes; the API's largest error text is about 120 bytes.
SMALL_BODY_LIMIT = 8 * 1024
# Allowance in a 200 answer for ancillary PNG chunks: ICC profile, EXIF, XMP, text.
ANSWER_METADATA_BYTES = 1 * MIB
# The pixel count assumed when the caller does not say how large the input is
# (the default of ``max_pixels``).
DEFAULT_MAX_PIXELS = 100_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REDACTED = "[redacted]"

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "GIF": "image/gif",
}


@dataclass(frozen=True)
class Credit:
    """What ``GET /available-credit`` said; ``outcome`` is set when it failed."""

    credit: int | None = None
    expiration_date: str | None = None
    outcome: Outcome | None = None

    @property
    def usable(self) -> bool:
        return self.outcome is None and (self.credit or 0) > 0


def answer_limit(size: tuple[int, int] | None) -> int:
    """The most bytes (decoded, after Content-Encoding) a 200 answer may have for an input
    of ``size`` = (width, height) in pixels.

    Generous on purpose: the largest PNG an honest server could send for that image is one
    with 16 bits a channel RGBA (8 bytes a pixel) plus one filter byte a row, stored without
    any compression (deflate's stored blocks and the IDAT chunk framing add about 0.1 %;
    1 % is allowed), plus :data:`ANSWER_METADATA_BYTES` (1 MiB) of ancillary chunks::

        ceil((8 * width + 1) * height * 1.01) + 1 MiB

    A 64×48 input gives 1,073,447 bytes; a 4000×3000 photo about 98 MB. ``None`` (size
    unknown) gives the bound for an image of :data:`DEFAULT_MAX_PIXELS` pixels (~809 MB).
    """
    width, height = size if size is not None else (DEFAULT_MAX_PIXELS, 1)
    raw = (8 * width + 1) * height
    return raw + (raw + 99) // 100 + ANSWER_METADATA_BYTES


class AnswerKind(StrEnum):
    """Which endpoint's answer :func:`check_answer` judges, i.e. which modes it accepts."""

    CUTOUT = "cutout"  # /v1.0/image-without-background: RGBA
    MATTE = "matte"  # /v1.0/alpha-channel: L (or the alpha of LA / RGBA)


_ACCEPTED_MODES: dict[AnswerKind, tuple[str, ...]] = {
    AnswerKind.CUTOUT: ("RGBA",),
    AnswerKind.MATTE: ("L", "LA", "RGBA"),
}


@dataclass(frozen=True)
class AnswerProblem:
    """Why a 200 body is not a usable answer: the kind, and a line saying what was found."""

    problem: BodyProblem
    detail: str | None = None


def check_answer(
    path: Path,
    expected_size: tuple[int, int] | None,
    expected: AnswerKind = AnswerKind.CUTOUT,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> AnswerProblem | None:
    """Is the file at ``path`` a usable answer? None when it is, else what is wrong.

    Usable means: one whole PNG (:func:`png_problem`: chunks and CRCs up to IEND), whose
    header says ``expected_size`` = (width, height) in pixels (when None: at most
    ``max_pixels`` pixels), whose mode is one ``expected`` accepts (RGBA for a cut-out; L,
    LA or RGBA for a matte) and which Pillow then decodes completely. Size and mode are
    read from the header before any pixel is decoded; the decode itself holds at most
    ``max_decode_bytes`` (:func:`dropcut.decode.check_decodes`: a larger PNG is checked by
    inflating its image data piece by piece), and takes at most its time budget. Blocking
    (reads and decodes the file): call it in a thread from async code.
    """
    structural = png_problem(path)
    if structural is not None:
        return AnswerProblem(structural)
    accepted = _ACCEPTED_MODES[expected]
    try:
        # A DecompressionBombWarning must not become an error (e.g. under -W error); the
        # size checks below bound the decode already.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with path.open("rb") as fp, Image.open(fp, formats=["PNG"]) as img:
                width, height = img.size
                if expected_size is not None and (width, height) != tuple(expected_size):
                    want_w, want_h = expected_size
                    return AnswerProblem(
                        BodyProblem.WRONG_SIZE, f"{width}×{height} px, expected {want_w}×{want_h} px"
                    )
                if expected_size is None and width * height > max_pixels:
                    return AnswerProblem(
                        BodyProblem.WRONG_SIZE, f"{width}×{height} px, more than {max_pixels} pixels"
                    )
                if img.mode not in accepted:
                    return AnswerProblem(
                        BodyProblem.WRONG_MODE, f"mode {img.mode}, expected {' or '.join(accepted)}"
                    )
        # Decoded completely, in bounded memory: a large answer has its image data
        # inflated piece by piece and checked (dropcut.decode), not held whole.
        decoded = check_decodes(path, "PNG", max_pixels)
        if isinstance(decoded, DecodeFailure):
            return AnswerProblem(BodyProblem.UNDECODABLE, decoded.detail[:200])
    except Image.DecompressionBombError as err:
        return AnswerProblem(BodyProblem.WRONG_SIZE, str(err)[:200])
    except UnidentifiedImageError:  # its message names the staging file
        return AnswerProblem(BodyProblem.UNDECODABLE, "Pillow cannot read it as a PNG image")
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        return AnswerProblem(BodyProblem.UNDECODABLE, (str(err) or type(err).__name__)[:200])
    return None


def _as_l_matte(path: Path) -> None:
    """Rewrite a checked matte answer that came as LA or RGBA as its alpha channel, an
    8-bit L PNG (fsynced); an L answer is left as it is."""
    with Image.open(path) as img:
        if img.mode == "L":
            return
        alpha = img.getchannel("A")
    tmp = path.with_name(path.name + ".l")
    with tmp.open("wb") as fh:
        alpha.save(fh, format="PNG")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def png_problem(path: Path) -> BodyProblem | None:
    """Is this file one whole PNG? Walks the chunks to IEND and checks every CRC."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if not head:
                return BodyProblem.EMPTY
            if head != PNG_SIGNATURE:
                return BodyProblem.TRUNCATED if PNG_SIGNATURE.startswith(head) else BodyProblem.NOT_PNG
            while True:
                header = fh.read(8)
                if len(header) < 8:
                    return BodyProblem.TRUNCATED
                length, ctype = struct.unpack(">I4s", header)
                data = fh.read(length)
                crc = fh.read(4)
                if len(data) < length or len(crc) < 4:
                    return BodyProblem.TRUNCATED
                if zlib.crc32(ctype + data) != struct.unpack(">I", crc)[0]:
                    return BodyProblem.UNDECODABLE
                if ctype == b"IEND":
                    return None
    except OSError:
        return BodyProblem.TRUNCATED


def _quote(filename: str) -> str:
    # RFC 7578: percent-encode what would break the header; keep the rest.
    safe = filename.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D")
    return safe.replace("\n", "%0A")


class MultipartUpload:
    """A one-part ``multipart/form-data`` body streamed from a file."""

    def __init__(self, source: Path, filename: str, content_type: str) -> None:
        self.source = source
        self.boundary = secrets.token_hex(16)
        self._head = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{_quote(filename)}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.sent_at: float | None = None

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def content_length(self) -> int:
        return len(self._head) + self.source.stat().st_size + len(self._tail)

    async def stream(self, on_sent: Callable[[float], None]) -> AsyncIterator[bytes]:
        yield self._head
        with self.source.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield self._tail
        # Resumed after the transport wrote the tail: the whole request has left us.
        self.sent_at = time.time()
        on_sent(self.sent_at)


class WithoutBG:
    """A typed client for the endpoints dropcut uses. Hand it a transport in tests.

    ``timeout`` (seconds) bounds each whole request, upload to last byte of the answer,
    and each single connect, read or write in it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout: float,
        max_connections: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self._deadline = timeout
        self._secrets: list[str] = []
        self._remember(api_key)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # Only what _BoundedDecoder can inflate (httpx would add br/zstd when installed).
            headers={"User-Agent": f"dropcut/{__version__}", "Accept-Encoding": "gzip, deflate"},
            transport=transport,
            follow_redirects=False,
        )

    def set_api_key(self, api_key: SecretStr) -> None:
        """Use ``api_key`` from now on. Earlier keys stay redacted from details (a request
        still in flight was sent with one)."""
        self._api_key = api_key
        self._remember(api_key)

    def _remember(self, api_key: SecretStr) -> None:
        key = api_key.get_secret_value()
        forms = {key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key), json.dumps(key)[1:-1]}
        self._secrets = sorted({*self._secrets, *(f for f in forms if f)}, key=len, reverse=True)

    def redact(self, text: str | None) -> str | None:
        """``text`` with every API key this client has used replaced by ``[redacted]``."""
        if text is None:
            return None
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _scrub(self, outcome: Outcome) -> Outcome:
        return dataclasses.replace(
            outcome, detail=self.redact(outcome.detail), location=self.redact(outcome.location)
        )

    def _describe(self, exc: BaseException) -> str:
        # Redacted before it is cut short, so no prefix of a key survives the cut.
        text = str(exc) or type(exc).__name__
        return (self.redact(f"{type(exc).__name__}: {text}") or "")[:300]

    def _transport_outcome(self, exc: httpx.HTTPError) -> Outcome:
        return Outcome(transport_error=transport_error_kind(exc), detail=self._describe(exc))

    def _deadline_outcome(self) -> Outcome:
        return Outcome(
            transport_error=TransportError.DEADLINE,
            detail=f"no complete answer within {self._deadline:g} s (request_timeout_seconds)",
        )

    def _auth(self) -> dict[str, str]:
        return {"X-API-Key": self._api_key.get_secret_value()}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def remove_background(
        self,
        source: Path,
        *,
        filename: str,
        image_format: str,
        dest: Path,
        on_sent: Callable[[float], None],
        expected_size: tuple[int, int] | None = None,
    ) -> Outcome:
        """Upload ``source``; on 200 stream the PNG into ``dest`` (fsynced) and check it.

        ``expected_size`` is the input's (width, height) in pixels as stored (what
        ``PIL.Image.open(source).size`` gives): the answer must be an RGBA PNG of exactly
        that size (:func:`check_answer`) and at most :func:`answer_limit` bytes. None (or a
        size that is not positive) means unknown: any size up to :data:`DEFAULT_MAX_PIXELS`
        pixels is accepted. A 200 answer that is not usable comes back with
        ``body_problem`` set and ``dest`` removed.

        ``on_sent`` is called once with the time the upload finished leaving us; when the
        request fails before that it is not called (the caller counts the slot anyway).
        The whole call, answer included, is bounded by the client's ``timeout``; after it
        the outcome is a :attr:`TransportError.DEADLINE`.
        """
        return await self._post_image(
            REMOVE_PATH,
            AnswerKind.CUTOUT,
            source,
            filename=filename,
            image_format=image_format,
            dest=dest,
            on_sent=on_sent,
            expected_size=expected_size,
        )

    async def alpha_channel(
        self,
        source: Path,
        *,
        filename: str,
        image_format: str,
        dest: Path,
        on_sent: Callable[[float], None],
        expected_size: tuple[int, int],
    ) -> Outcome:
        """Upload the proxy ``source`` to ``POST /v1.0/alpha-channel``; on 200 the answer is
        the alpha matte, an 8-bit one-channel PNG (255 = opaque) that must have the proxy's
        ``expected_size`` = (width, height) in pixels. An L answer is kept as it is; the
        alpha of an LA or RGBA answer is taken (``dest`` is rewritten as L). Everything else
        as :meth:`remove_background`. Source of the contract: the API page
        (``../shared/seeds/withoutbg-binary-endpoint.txt``) and its SDK."""
        outcome = await self._post_image(
            ALPHA_PATH,
            AnswerKind.MATTE,
            source,
            filename=filename,
            image_format=image_format,
            dest=dest,
            on_sent=on_sent,
            expected_size=expected_size,
        )
        if outcome.status == 200 and outcome.body_problem is None:
            await asyncio.to_thread(_as_l_matte, dest)
        return outcome

    async def _post_image(
        self,
        path: str,
        kind: AnswerKind,
        source: Path,
        *,
        filename: str,
        image_format: str,
        dest: Path,
        on_sent: Callable[[float], None],
        expected_size: tuple[int, int] | None,
    ) -> Outcome:
        if expected_size is not None and min(expected_size) <= 0:
            expected_size = None
        outcome = await self._post(
            path,
            kind,
            source,
            filename=filename,
            image_format=image_format,
            dest=dest,
            on_sent=on_sent,
            expected_size=expected_size,
        )
        if outcome.body_problem is not None:
            dest.unlink(missing_ok=True)
        return self._scrub(outcome)

    async def _post(
        self,
        path: str,
        kind: AnswerKind,
        source: Path,
        *,
        filename: str,
        image_format: str,
        dest: Path,
        on_sent: Callable[[float], None],
        expected_size: tuple[int, int] | None,
    ) -> Outcome:
        body = MultipartUpload(source, filename, CONTENT_TYPES.get(image_format, "application/octet-stream"))
        headers = {
            **self._auth(),
            "Content-Type": body.content_type,
            "Content-Length": str(body.content_length()),
            "Accept": "image/png, application/json",
        }
        limit = answer_limit(expected_size)
        deadline = asyncio.timeout(self._deadline)
        try:
            async with (
                deadline,
                self._http.stream("POST", path, content=body.stream(on_sent), headers=headers) as response,
            ):
                if response.status_code != 200:
                    return await self._error_outcome(response)
                announced = _content_length(response)
                if announced is not None and announced > limit:
                    return Outcome(
                        status=200,
                        body_problem=BodyProblem.TOO_LARGE,
                        detail=_too_large_text(f"Content-Length announces {announced} bytes", limit),
                    )
                await _save(response, dest, limit)
        except _TooLarge:
            return Outcome(
                status=200,
                body_problem=BodyProblem.TOO_LARGE,
                detail=_too_large_text("the body went on past the limit", limit),
            )
        except httpx.HTTPError as exc:  # transport errors, and bodies we cannot decode
            return self._transport_outcome(exc)
        except TimeoutError:
            dest.unlink(missing_ok=True)
            if deadline.expired():
                return self._deadline_outcome()
            raise
        except OSError:
            dest.unlink(missing_ok=True)
            raise
        bad = await asyncio.to_thread(check_answer, dest, expected_size, kind)
        if bad is None:
            return Outcome(status=200)
        return Outcome(status=200, body_problem=bad.problem, detail=bad.detail)

    async def available_credit(self) -> Credit:
        """``GET /available-credit``: the credit, or the failed request's outcome. The body
        is read up to :data:`SMALL_BODY_LIMIT` bytes; the whole call is bounded by the
        client's ``timeout``."""
        credit = await self._available_credit()
        if credit.outcome is not None:
            return dataclasses.replace(credit, outcome=self._scrub(credit.outcome))
        return credit

    async def _available_credit(self) -> Credit:
        deadline = asyncio.timeout(self._deadline)
        try:
            async with deadline, self._http.stream("GET", CREDIT_PATH, headers=self._auth()) as response:
                if response.status_code != 200:
                    return Credit(outcome=await self._error_outcome(response))
                body, over = await _read_small(response)
        except httpx.HTTPError as exc:
            return Credit(outcome=self._transport_outcome(exc))
        except TimeoutError:
            if deadline.expired():
                return Credit(outcome=self._deadline_outcome())
            raise
        if over:
            return Credit(
                outcome=Outcome(
                    status=200,
                    body_problem=BodyProblem.TOO_LARGE,
                    detail=f"/available-credit answer longer than {SMALL_BODY_LIMIT} bytes",
                )
            )
        try:
            data = json.loads(body)
            credit = int(data["credit"])
        except (ValueError, KeyError, TypeError):
            return Credit(outcome=Outcome(status=200, detail="unreadable /available-credit answer"))
        expiry = data.get("expiration_date")
        # (stored and shown: an answer echoing the key must not carry it there)
        return Credit(credit=credit, expiration_date=self.redact(str(expiry)) if expiry is not None else None)

    async def _error_outcome(self, response: httpx.Response) -> Outcome:
        """The outcome of a non-200 answer: its status counts even when its body cannot be
        read (an encoding we do not inflate: the detail is then the status's own text)."""
        try:
            body, _ = await _read_small(response)
        except (httpx.DecodingError, zlib.error):
            body = b""
        return self._outcome_from_body(response, body)

    def _outcome_from_body(self, response: httpx.Response, body: bytes) -> Outcome:
        """The outcome of a non-200 answer whose (capped) body is ``body``: the detail and
        Location redacted, then cut short."""
        try:
            detail = self.redact(flatten_detail(json.loads(body)))
        except ValueError:
            detail = None
        if detail is None and body:
            text = self.redact(body.decode("utf-8", "replace")) or ""
            detail = text[:200].strip() or None
        location = self.redact(response.headers.get("Location"))
        return Outcome(
            status=response.status_code,
            detail=detail,
            retry_after=response.headers.get("Retry-After"),
            location=location[:500] if location is not None else None,
        )


class _TooLarge(Exception):
    """A body went past its limit (decoded bytes)."""


def _too_large_text(what: str, limit: int) -> str:
    return f"{what}; an answer for this image is at most {limit} bytes"


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("Content-Length")
    try:
        value = int(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


class _BoundedDecoder:
    """Undo a Content-Encoding (identity, gzip, deflate) piece by piece: each piece handed
    out is at most :data:`CHUNK` bytes, whatever the compression ratio, so a small gzip
    body that inflates to gigabytes costs no memory and can be stopped at any count."""

    def __init__(self, content_encoding: str | None) -> None:
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        self._raw_deflate_fallback = False
        self._obj: zlib._Decompress | None = None
        if not codings:
            return
        if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
            raise httpx.DecodingError(f"unsupported Content-Encoding {content_encoding!r}")
        if codings[0] == "deflate":
            self._obj = zlib.decompressobj()
            self._raw_deflate_fallback = True  # some servers send raw deflate (as httpx)
        else:
            self._obj = zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes) -> Iterator[bytes]:
        obj = self._obj
        if obj is None:
            yield data
            return
        pending = data
        while pending and not obj.eof:
            try:
                out = obj.decompress(pending, CHUNK)
            except zlib.error as exc:
                if not self._raw_deflate_fallback:
                    raise httpx.DecodingError(str(exc)) from exc
                self._raw_deflate_fallback = False
                obj = self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._raw_deflate_fallback = False
            pending = obj.unconsumed_tail
            if out:
                yield out
        yield from self.finish_pending()

    def finish_pending(self) -> Iterator[bytes]:
        """Output zlib still holds after all input was taken (when a piece hit CHUNK)."""
        obj = self._obj
        while obj is not None and not obj.eof:
            try:
                out = obj.decompress(b"", CHUNK)
            except zlib.error as exc:
                raise httpx.DecodingError(str(exc)) from exc
            if not out:
                break
            yield out


async def _decoded(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body with its Content-Encoding undone, in pieces of at most :data:`CHUNK`."""
    decoder = _BoundedDecoder(response.headers.get("Content-Encoding"))
    async for chunk in response.aiter_raw(CHUNK):
        for piece in decoder.feed(chunk):
            yield piece


async def _read_small(response: httpx.Response, limit: int = SMALL_BODY_LIMIT) -> tuple[bytes, bool]:
    """At most ``limit`` decoded bytes of the body, and whether there was more (the rest is
    not read: leaving the stream early closes the connection)."""
    body = bytearray()
    async for piece in _decoded(response):
        body += piece
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


async def _save(response: httpx.Response, dest: Path, limit: int) -> None:
    """Stream the decoded body into ``dest`` and fsync it; raise :class:`_TooLarge` (with
    ``dest`` removed) once more than ``limit`` bytes came."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    total = 0
    try:
        async for piece in _decoded(response):
            total += len(piece)
            if total > limit:
                raise _TooLarge(total)
            view = memoryview(piece)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd)

"""The withoutBG endpoints over httpx.

Uploads stream from the spool file; answers stream into a file on the outbox's file
system. Every call returns a :class:`~dropcut.judge.Outcome` (never raises for HTTP or
transport trouble), so the judge decides what it means. The API key lives only in the
client's default headers and is never formatted into text.

The multipart body is encoded here rather than by httpx: we need the moment the last byte
of the upload was handed to the socket, because that bounds when the server counted the
request in its rate-limit window (see :mod:`dropcut.pace`). It is the standard
``multipart/form-data`` framing with one part, ``file``, and an exact Content-Length.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import SecretStr

from dropcut import __version__
from dropcut.judge import BodyProblem, Outcome, flatten_detail, transport_error_kind

REMOVE_PATH = "/v1.0/image-without-background"
CREDIT_PATH = "/available-credit"
CHUNK = 64 * 1024
ERROR_BODY_LIMIT = 64 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
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
    """A typed client for the endpoints dropcut uses. Hand it a transport in tests."""

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
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"User-Agent": f"dropcut/{__version__}"},
            transport=transport,
            follow_redirects=False,
        )

    def set_api_key(self, api_key: SecretStr) -> None:
        self._api_key = api_key

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
    ) -> Outcome:
        """Upload ``source``; on 200 stream the PNG into ``dest`` (fsynced) and check it.

        ``on_sent`` is called once with the time the upload finished leaving us; when the
        request fails before that it is not called (the caller counts the slot anyway).
        """
        body = MultipartUpload(source, filename, CONTENT_TYPES.get(image_format, "application/octet-stream"))
        headers = {
            **self._auth(),
            "Content-Type": body.content_type,
            "Content-Length": str(body.content_length()),
            "Accept": "image/png, application/json",
        }
        try:
            async with self._http.stream(
                "POST", REMOVE_PATH, content=body.stream(on_sent), headers=headers
            ) as response:
                if response.status_code != 200:
                    return await _error_outcome(response)
                await _save(response, dest)
        except httpx.HTTPError as exc:  # transport errors, and bodies httpx cannot decode
            return Outcome(transport_error=transport_error_kind(exc), detail=_describe(exc))
        except OSError:
            dest.unlink(missing_ok=True)
            raise
        problem = png_problem(dest)
        return Outcome(status=200, body_problem=problem)

    async def available_credit(self) -> Credit:
        try:
            response = await self._http.get(CREDIT_PATH, headers=self._auth())
        except httpx.HTTPError as exc:
            return Credit(outcome=Outcome(transport_error=transport_error_kind(exc), detail=_describe(exc)))
        if response.status_code != 200:
            return Credit(outcome=_outcome_from_body(response, response.content))
        try:
            data = response.json()
            credit = int(data["credit"])
        except (ValueError, KeyError, TypeError):
            return Credit(outcome=Outcome(status=200, detail="unreadable /available-credit answer"))
        expiry = data.get("expiration_date")
        return Credit(credit=credit, expiration_date=str(expiry) if expiry is not None else None)


async def _save(response: httpx.Response, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        async for chunk in response.aiter_raw(CHUNK) if _identity(response) else response.aiter_bytes(CHUNK):
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd)


def _identity(response: httpx.Response) -> bool:
    return str(response.headers.get("Content-Encoding", "identity")) == "identity"


async def _error_outcome(response: httpx.Response) -> Outcome:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > ERROR_BODY_LIMIT:
            break
    return _outcome_from_body(response, body)


def _outcome_from_body(response: httpx.Response, body: bytes) -> Outcome:
    try:
        detail = flatten_detail(json.loads(body))
    except ValueError:
        detail = None
    if detail is None and body:
        detail = body[:200].decode("utf-8", "replace").strip() or None
    return Outcome(
        status=response.status_code,
        detail=detail,
        retry_after=response.headers.get("Retry-After"),
    )


def _describe(exc: httpx.HTTPError) -> str:
    # The URL is ours and harmless; headers (the key) are never part of httpx's messages.
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]

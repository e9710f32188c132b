"""What does this HTTP answer mean for this file?

Everything here is pure: no I/O, no clock reads, no randomness. The caller passes the
time (``now``) and the jitter (a number in ``[0, 1]``, e.g. ``random.random()``).

The decision for one outcome is one of:

* :class:`Publish` -- a 200 with a usable PNG body.
* :class:`Retry` -- a transient problem (rate limit, server error, network trouble, a
  damaged 200 body); try the same file again after ``delay`` seconds.
* :class:`Refuse` -- the file itself is the problem (too large, wrong format, corrupt)
  or the retry budget is spent; quarantine the file.
* :class:`Pause` -- the account or the configuration is the problem (bad key, no
  credit, expired credit, wrong endpoint, a redirect: ``api_url`` points at the wrong
  place); pause the whole queue, quarantine nothing.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from http import HTTPStatus
from types import MappingProxyType
from typing import TypeAlias

import httpx

__all__ = [
    "BodyProblem",
    "Code",
    "Decision",
    "Outcome",
    "Pause",
    "Publish",
    "Refuse",
    "Retry",
    "RetryPolicy",
    "TransportError",
    "backoff_delay",
    "flatten_detail",
    "judge",
    "parse_retry_after",
    "transport_error_kind",
]


class TransportError(StrEnum):
    """Why no HTTP response arrived."""

    CONNECT = "connect"
    DNS = "dns"
    TLS = "tls"
    CONNECT_TIMEOUT = "connect_timeout"
    READ_TIMEOUT = "read_timeout"
    WRITE_TIMEOUT = "write_timeout"
    POOL_TIMEOUT = "pool_timeout"
    RESET = "reset"  # connection reset / closed without a response / RemoteProtocolError
    PROTOCOL = "protocol"  # we or the server spoke broken HTTP (LocalProtocolError, decoding)
    OTHER = "other"
    # The whole request (upload, wait, download) outlasted the client's deadline
    # (``request_timeout_seconds``), e.g. a server that trickles its answer byte by byte.
    DEADLINE = "deadline"


class BodyProblem(StrEnum):
    """What is wrong with the body of a 200 answer (found by the client's answer check)."""

    EMPTY = "empty"  # zero bytes
    NOT_PNG = "not_png"  # does not start with the PNG signature (e.g. JSON or HTML)
    TRUNCATED = "truncated"  # PNG signature, but shorter than Content-Length or no IEND
    UNDECODABLE = "undecodable"  # looks complete, but the image decoder rejects it
    WRONG_SIZE = "wrong_size"  # decodes, but its (width, height) is not the input's
    WRONG_MODE = "wrong_mode"  # decodes, but not the channels asked for (e.g. RGB, no alpha)
    TOO_LARGE = "too_large"  # more bytes (announced or decoded) than such an answer can need


class Code(StrEnum):
    """The ``code`` of a :class:`Retry`, :class:`Refuse` or :class:`Pause`."""

    # Pause
    INVALID_API_KEY = "invalid_api_key"
    INSUFFICIENT_CREDIT = "insufficient_credit"
    CREDITS_EXPIRED = "credits_expired"
    ENDPOINT_NOT_FOUND = "endpoint_not_found"
    ENDPOINT_REDIRECTED = "endpoint_redirected"
    # Refuse
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INVALID_IMAGE = "invalid_image"
    BAD_REQUEST = "bad_request"
    RETRIES_EXHAUSTED = "retries_exhausted"
    # Retry
    BAD_RESPONSE = "bad_response"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    UNEXPECTED_STATUS = "unexpected_status"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"


@dataclass(frozen=True)
class Outcome:
    """What one request produced."""

    status: int | None = None  # None when no HTTP response arrived
    detail: str | None = None  # the error body's detail, already flattened to text
    retry_after: str | None = None  # raw Retry-After header value, if any
    transport_error: TransportError | None = None
    body_problem: BodyProblem | None = None  # only meaningful for status 200
    location: str | None = None  # the Location header of a 3xx answer (key redacted)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 12  # attempt budget for transient errors (>= 8 enforced elsewhere)
    base_delay: float = 2.0  # seconds
    max_delay: float = 300.0  # cap on the exponential part
    max_retry_after: float = 3600.0  # a Retry-After larger than this is clamped

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts}")
        for name in ("base_delay", "max_delay", "max_retry_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


@dataclass(frozen=True)
class Publish:
    pass


@dataclass(frozen=True)
class Retry:
    delay: float  # seconds from now
    status: int | None
    code: str
    detail: str


@dataclass(frozen=True)
class Refuse:
    """Quarantine the file."""

    status: int  # 0 when the last attempt got no HTTP response
    code: str
    detail: str


@dataclass(frozen=True)
class Pause:
    """Account or configuration problem: pause the whole queue, quarantine nothing.

    ``location`` is where a redirect (``endpoint_redirected``) pointed, else None.
    """

    status: int
    code: str
    detail: str
    location: str | None = None


Decision: TypeAlias = Publish | Retry | Refuse | Pause


# The seed's error table: the server's text for each status, used when the body had none.
_SEED_DETAIL: Mapping[int, str] = MappingProxyType(
    {
        401: "Invalid API Key",
        402: "Insufficient credit. Please top up API credits.",
        403: (
            "Credits Expired. Please top up API credits. "
            "If you have existing credits, they will be reactivated."
        ),
        413: "File size too large. Maximum file size is 10.0 MB",
        415: "Unsupported Media Type. Supported formats are: JPEG, PNG, WebP, TIFF, BMP, GIF.",
        422: "Validation Error",
        429: "Rate limit (7 request/minute) exceeded",
        500: "Internal Server Error. Please contact support: contact@withoutbg.com",
    }
)

_PAUSE_CODES: Mapping[int, Code] = MappingProxyType(
    {
        401: Code.INVALID_API_KEY,
        402: Code.INSUFFICIENT_CREDIT,
        403: Code.CREDITS_EXPIRED,
        404: Code.ENDPOINT_NOT_FOUND,
        405: Code.ENDPOINT_NOT_FOUND,
    }
)

_REFUSE_CODES: Mapping[int, Code] = MappingProxyType(
    {
        400: Code.BAD_REQUEST,
        413: Code.TOO_LARGE,
        415: Code.UNSUPPORTED_FORMAT,
        422: Code.INVALID_IMAGE,
    }
)

_BODY_PROBLEM_TEXT: Mapping[BodyProblem, str] = MappingProxyType(
    {
        BodyProblem.EMPTY: "HTTP 200 with an empty body",
        BodyProblem.NOT_PNG: "HTTP 200 but the body is not a PNG",
        BodyProblem.TRUNCATED: "HTTP 200 but the PNG body is cut short",
        BodyProblem.UNDECODABLE: "HTTP 200 but the PNG body does not decode",
        BodyProblem.WRONG_SIZE: "HTTP 200 but the image is not the size of the input",
        BodyProblem.WRONG_MODE: "HTTP 200 but the image does not have the expected channels",
        BodyProblem.TOO_LARGE: "HTTP 200 but the body is larger than any answer for this image can be",
    }
)

_TRANSPORT_TEXT: Mapping[TransportError, str] = MappingProxyType(
    {
        TransportError.CONNECT: "could not connect to the server",
        TransportError.DNS: "DNS name resolution failed",
        TransportError.TLS: "TLS handshake or certificate check failed",
        TransportError.CONNECT_TIMEOUT: "timed out connecting to the server",
        TransportError.READ_TIMEOUT: "timed out waiting for the response",
        TransportError.WRITE_TIMEOUT: "timed out sending the request",
        TransportError.POOL_TIMEOUT: "timed out waiting for a free connection",
        TransportError.RESET: "connection reset or closed without a complete response",
        TransportError.PROTOCOL: "HTTP protocol error",
        TransportError.OTHER: "transport error",
        TransportError.DEADLINE: "no complete answer within the request deadline",
    }
)

_TIMEOUT_KINDS = frozenset(
    {
        TransportError.CONNECT_TIMEOUT,
        TransportError.READ_TIMEOUT,
        TransportError.WRITE_TIMEOUT,
        TransportError.POOL_TIMEOUT,
        TransportError.DEADLINE,
    }
)


def judge(outcome: Outcome, *, attempt: int, policy: RetryPolicy, now: datetime, jitter: float) -> Decision:
    """Decide what to do after attempt number ``attempt`` (1-based) produced ``outcome``.

    ``now`` is only used to read a Retry-After given as an HTTP date; ``jitter`` in
    ``[0, 1]`` scales the exponential backoff (full jitter).
    """
    verdict = _classify(outcome)
    if not isinstance(verdict, _Transient):
        return verdict
    if attempt >= policy.max_attempts:
        return Refuse(
            status=outcome.status or 0,
            code=Code.RETRIES_EXHAUSTED,
            detail=(f"gave up after {attempt} attempts; last problem: {verdict.code}: {verdict.detail}"),
        )
    delay = backoff_delay(attempt, policy, jitter)
    asked = parse_retry_after(outcome.retry_after, now)
    if asked is not None:
        delay = max(delay, min(asked, policy.max_retry_after))
    return Retry(delay=delay, status=outcome.status, code=verdict.code, detail=verdict.detail)


@dataclass(frozen=True)
class _Transient:
    code: Code
    detail: str


def _classify(outcome: Outcome) -> Publish | Refuse | Pause | _Transient:
    status = outcome.status
    if status is None:
        # No response. An Outcome with neither a status nor a transport error is a
        # caller bug; treat it as an unknown transport problem rather than crash.
        kind = outcome.transport_error or TransportError.OTHER
        code = Code.TIMEOUT if kind in _TIMEOUT_KINDS else Code.CONNECTION_ERROR
        text = f"{_TRANSPORT_TEXT[kind]} [{kind}]"
        if outcome.detail:
            text = f"{text}: {outcome.detail}"
        return _Transient(code, text)
    if status == 200:
        if outcome.body_problem is None:
            return Publish()
        text = f"{_BODY_PROBLEM_TEXT[outcome.body_problem]} [{outcome.body_problem}]"
        if outcome.detail:
            text = f"{text}: {outcome.detail}"
        return _Transient(Code.BAD_RESPONSE, text)
    if 300 <= status <= 399:
        # We never follow redirects: a 3xx means api_url points at the wrong place (an
        # http:// URL of an https:// service, a moved host). No file is to blame.
        return Pause(
            status=status,
            code=Code.ENDPOINT_REDIRECTED,
            detail=_redirect_detail(status, outcome.location),
            location=outcome.location,
        )
    detail = outcome.detail or _default_detail(status)
    if status in _PAUSE_CODES:
        return Pause(status=status, code=_PAUSE_CODES[status], detail=detail)
    if status in _REFUSE_CODES:
        return Refuse(status=status, code=_REFUSE_CODES[status], detail=detail)
    if status == 429:
        return _Transient(Code.RATE_LIMITED, detail)
    if 500 <= status <= 599:
        return _Transient(Code.SERVER_ERROR, detail)
    return _Transient(Code.UNEXPECTED_STATUS, detail)


def _redirect_detail(status: int, location: str | None) -> str:
    where = f"redirects to {location}" if location else "is a redirect without a Location"
    return f"{_default_detail(status)}: the API {where}; check api_url (dropcut does not follow redirects)"


def _default_detail(status: int) -> str:
    if status in _SEED_DETAIL:
        return _SEED_DETAIL[status]
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def backoff_delay(attempt: int, policy: RetryPolicy, jitter: float) -> float:
    """Full-jitter exponential backoff after attempt number ``attempt`` (1-based).

    ``jitter * min(max_delay, base_delay * 2**(attempt-1))``; ``jitter`` must be in [0, 1].
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, not {attempt}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], not {jitter!r}")
    exponent = min(attempt - 1, 1000)  # 2.0**1000 is finite; avoids float overflow
    return jitter * min(policy.max_delay, policy.base_delay * 2.0**exponent)


_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait according to a raw Retry-After header value.

    Accepts delta-seconds (leniently also with a fraction, e.g. ``"1.5"``) or an HTTP
    date. A date in the past gives 0. Missing, empty, negative or unparsable -> None.
    A naive ``now`` (or a date without a zone) is taken as UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def flatten_detail(body: object) -> str | None:
    """Turn a parsed JSON error body into one line of text.

    ``{"detail": "x"}`` -> ``"x"``; FastAPI's list form
    ``{"detail": [{"loc": ["body", "file"], "msg": "field required", ...}]}`` ->
    ``"body.file: field required"`` (several entries are joined with ``"; "``).
    Anything else (no ``detail``, an empty one, another shape) -> None.
    """
    if not isinstance(body, dict):
        return None
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail.strip() or None
    if not isinstance(detail, list):
        return None
    parts = [part for part in map(_flatten_entry, detail) if part]
    return "; ".join(parts) or None


def _flatten_entry(entry: object) -> str | None:
    if isinstance(entry, str):
        return entry.strip() or None
    if not isinstance(entry, dict):
        return None
    msg = entry.get("msg")
    if not isinstance(msg, str) or not msg.strip():
        return None
    loc = entry.get("loc")
    if isinstance(loc, list | tuple) and loc:
        where = ".".join(str(part) for part in loc)
        return f"{where}: {msg.strip()}"
    return msg.strip()


# --- classifying exceptions ---------------------------------------------------------

_DNS_TEXT = re.compile(
    r"name or service not known|nodename nor servname|temporary failure in name resolution"
    r"|getaddrinfo failed|no address associated with hostname|name resolution",
    re.IGNORECASE,
)
_TLS_TEXT = re.compile(r"\bSSL|\bTLS|certificate", re.IGNORECASE)


def transport_error_kind(exc: BaseException) -> TransportError:
    """Classify an exception raised while sending a request (httpx or builtin)."""
    match exc:
        case httpx.ConnectTimeout():
            return TransportError.CONNECT_TIMEOUT
        case httpx.ReadTimeout():
            return TransportError.READ_TIMEOUT
        case httpx.WriteTimeout():
            return TransportError.WRITE_TIMEOUT
        case httpx.PoolTimeout():
            return TransportError.POOL_TIMEOUT
        case httpx.TimeoutException():
            # A timeout of unknown phase (httpx's base class): most of a request's
            # time is spent waiting for the answer.
            return TransportError.READ_TIMEOUT
        case httpx.ConnectError():
            if _looks_like_dns(exc):
                return TransportError.DNS
            if _looks_like_tls(exc):
                return TransportError.TLS
            return TransportError.CONNECT
        case httpx.RemoteProtocolError() | httpx.ReadError() | httpx.WriteError():
            return TransportError.RESET
        case httpx.ProtocolError() | httpx.DecodingError():
            return TransportError.PROTOCOL
        case httpx.TransportError():
            return TransportError.OTHER
    for link in _chain(exc):
        kind = _builtin_kind(link)
        if kind is not None:
            return kind
    return TransportError.OTHER


def _builtin_kind(exc: BaseException) -> TransportError | None:
    match exc:
        case socket.gaierror():
            return TransportError.DNS
        case ssl.SSLError():
            return TransportError.TLS
        case ConnectionResetError() | ConnectionAbortedError() | BrokenPipeError():
            return TransportError.RESET
        case ConnectionRefusedError():
            return TransportError.CONNECT
        case TimeoutError():
            return TransportError.READ_TIMEOUT
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts, each once."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _looks_like_dns(exc: BaseException) -> bool:
    return any(isinstance(link, socket.gaierror) or _DNS_TEXT.search(str(link)) for link in _chain(exc))


def _looks_like_tls(exc: BaseException) -> bool:
    return any(isinstance(link, ssl.SSLError) or _TLS_TEXT.search(str(link)) for link in _chain(exc))

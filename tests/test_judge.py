"""Table-driven tests for dropcut.judge: what an HTTP answer means for a file."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import pytest

from dropcut.judge import (
    BodyProblem,
    Decision,
    Outcome,
    Pause,
    Publish,
    Refuse,
    Retry,
    RetryPolicy,
    TransportError,
    backoff_delay,
    flatten_detail,
    judge,
    parse_retry_after,
    transport_error_kind,
)

NOW = datetime(2026, 1, 10, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy()  # 12 attempts, base 2 s, cap 300 s, Retry-After clamp 3600 s
JITTER = 0.5  # attempt 1 -> 0.5 * 2 s = 1.0 s; attempt 3 -> 0.5 * 8 s = 4.0 s

SEED_401 = "Invalid API Key"
SEED_402 = "Insufficient credit. Please top up API credits."
SEED_403 = (
    "Credits Expired. Please top up API credits. If you have existing credits, they will be reactivated."
)
SEED_413 = "File size too large. Maximum file size is 10.0 MB"
SEED_415 = "Unsupported Media Type. Supported formats are: JPEG, PNG, WebP, TIFF, BMP, GIF."
SEED_422 = "Validation Error"
SEED_429 = "Rate limit (7 request/minute) exceeded"
SEED_5XX = "Internal Server Error. Please contact support: contact@withoutbg.com"


# --- judge: HTTP answers ------------------------------------------------------------

HTTP_CASES: list[tuple[str, Outcome, int, Decision]] = [
    # (id, outcome, attempt, expected decision)
    ("200-png", Outcome(status=200), 1, Publish()),
    ("200-png-last-attempt", Outcome(status=200), 12, Publish()),
    (
        "200-json-body",
        Outcome(status=200, body_problem=BodyProblem.NOT_PNG, detail="Invalid API Key"),
        1,
        Retry(
            1.0,
            200,
            "bad_response",
            "HTTP 200 but the body is not a PNG [not_png]: Invalid API Key",
        ),
    ),
    (
        "200-cut-short",
        Outcome(status=200, body_problem=BodyProblem.TRUNCATED),
        1,
        Retry(1.0, 200, "bad_response", "HTTP 200 but the PNG body is cut short [truncated]"),
    ),
    (
        "200-empty",
        Outcome(status=200, body_problem=BodyProblem.EMPTY),
        3,
        Retry(4.0, 200, "bad_response", "HTTP 200 with an empty body [empty]"),
    ),
    (
        "200-undecodable",
        Outcome(status=200, body_problem=BodyProblem.UNDECODABLE),
        1,
        Retry(1.0, 200, "bad_response", "HTTP 200 but the PNG body does not decode [undecodable]"),
    ),
    (
        "200-wrong-size",
        Outcome(status=200, body_problem=BodyProblem.WRONG_SIZE, detail="1×1 px, expected 64×48 px"),
        1,
        Retry(
            1.0,
            200,
            "bad_response",
            "HTTP 200 but the image is not the size of the input [wrong_size]: 1×1 px, expected 64×48 px",
        ),
    ),
    (
        "200-wrong-mode",
        Outcome(status=200, body_problem=BodyProblem.WRONG_MODE, detail="mode RGB, expected RGBA"),
        3,
        Retry(
            4.0,
            200,
            "bad_response",
            "HTTP 200 but the image does not have the expected channels [wrong_mode]: "
            "mode RGB, expected RGBA",
        ),
    ),
    (
        "200-too-large",
        Outcome(status=200, body_problem=BodyProblem.TOO_LARGE),
        1,
        Retry(
            1.0,
            200,
            "bad_response",
            "HTTP 200 but the body is larger than any answer for this image can be [too_large]",
        ),
    ),
    (
        "200-wrong-size-budget-spent",
        Outcome(status=200, body_problem=BodyProblem.WRONG_SIZE),
        12,
        Refuse(
            200,
            "retries_exhausted",
            "gave up after 12 attempts; last problem: bad_response: "
            "HTTP 200 but the image is not the size of the input [wrong_size]",
        ),
    ),
    # account problems pause the queue, whatever the attempt number
    ("401", Outcome(status=401, detail=SEED_401), 1, Pause(401, "invalid_api_key", SEED_401)),
    ("401-no-detail", Outcome(status=401), 1, Pause(401, "invalid_api_key", SEED_401)),
    ("401-budget-spent", Outcome(status=401), 12, Pause(401, "invalid_api_key", SEED_401)),
    ("402", Outcome(status=402, detail=SEED_402), 1, Pause(402, "insufficient_credit", SEED_402)),
    ("402-no-detail", Outcome(status=402), 1, Pause(402, "insufficient_credit", SEED_402)),
    ("403", Outcome(status=403, detail=SEED_403), 1, Pause(403, "credits_expired", SEED_403)),
    ("403-no-detail", Outcome(status=403), 5, Pause(403, "credits_expired", SEED_403)),
    (
        "404",
        Outcome(status=404, detail="Not Found"),
        1,
        Pause(404, "endpoint_not_found", "Not Found"),
    ),
    (
        "405-no-detail",
        Outcome(status=405),
        1,
        Pause(405, "endpoint_not_found", "HTTP 405 Method Not Allowed"),
    ),
    # the file is the problem: quarantine it
    ("413", Outcome(status=413, detail=SEED_413), 1, Refuse(413, "too_large", SEED_413)),
    ("413-no-detail", Outcome(status=413), 1, Refuse(413, "too_large", SEED_413)),
    ("415", Outcome(status=415, detail=SEED_415), 1, Refuse(415, "unsupported_format", SEED_415)),
    ("415-no-detail", Outcome(status=415), 1, Refuse(415, "unsupported_format", SEED_415)),
    ("422", Outcome(status=422, detail=SEED_422), 1, Refuse(422, "invalid_image", SEED_422)),
    (
        "422-fastapi-list-form",
        Outcome(status=422, detail="body.file: field required"),
        1,
        Refuse(422, "invalid_image", "body.file: field required"),
    ),
    ("422-no-detail", Outcome(status=422), 1, Refuse(422, "invalid_image", SEED_422)),
    ("422-budget-spent", Outcome(status=422), 12, Refuse(422, "invalid_image", SEED_422)),
    (
        "400",
        Outcome(status=400, detail="Could not read image"),
        1,
        Refuse(400, "bad_request", "Could not read image"),
    ),
    ("400-no-detail", Outcome(status=400), 1, Refuse(400, "bad_request", "HTTP 400 Bad Request")),
    # transient: retry later
    ("429", Outcome(status=429, detail=SEED_429), 1, Retry(1.0, 429, "rate_limited", SEED_429)),
    ("429-no-detail", Outcome(status=429), 3, Retry(4.0, 429, "rate_limited", SEED_429)),
    ("500", Outcome(status=500, detail=SEED_5XX), 1, Retry(1.0, 500, "server_error", SEED_5XX)),
    ("500-no-detail", Outcome(status=500), 1, Retry(1.0, 500, "server_error", SEED_5XX)),
    (
        "502-no-detail",
        Outcome(status=502),
        1,
        Retry(1.0, 502, "server_error", "HTTP 502 Bad Gateway"),
    ),
    (
        "503",
        Outcome(status=503, detail="Service Unavailable"),
        1,
        Retry(1.0, 503, "server_error", "Service Unavailable"),
    ),
    (
        "504-no-detail",
        Outcome(status=504),
        1,
        Retry(1.0, 504, "server_error", "HTTP 504 Gateway Timeout"),
    ),
    ("599-no-detail", Outcome(status=599), 1, Retry(1.0, 599, "server_error", "HTTP 599")),
    (
        "408",
        Outcome(status=408),
        1,
        Retry(1.0, 408, "unexpected_status", "HTTP 408 Request Timeout"),
    ),
    ("409", Outcome(status=409), 1, Retry(1.0, 409, "unexpected_status", "HTTP 409 Conflict")),
    ("425", Outcome(status=425), 1, Retry(1.0, 425, "unexpected_status", "HTTP 425 Too Early")),
    (
        "418-with-detail",
        Outcome(status=418, detail="teapot"),
        1,
        Retry(1.0, 418, "unexpected_status", "teapot"),
    ),
    (
        "204",
        Outcome(status=204),
        1,
        Retry(1.0, 204, "unexpected_status", "HTTP 204 No Content"),
    ),
    # a redirect: api_url is wrong; pause, whatever the attempt, and say where it points
    (
        "301-with-location",
        Outcome(status=301, location="https://api.withoutbg.com/v1.0/image-without-background"),
        1,
        Pause(
            301,
            "endpoint_redirected",
            "HTTP 301 Moved Permanently: the API redirects to "
            "https://api.withoutbg.com/v1.0/image-without-background; "
            "check api_url (dropcut does not follow redirects)",
            location="https://api.withoutbg.com/v1.0/image-without-background",
        ),
    ),
    (
        "302-budget-spent",
        Outcome(status=302, detail="Found", location="/elsewhere"),
        12,
        Pause(
            302,
            "endpoint_redirected",
            "HTTP 302 Found: the API redirects to /elsewhere; "
            "check api_url (dropcut does not follow redirects)",
            location="/elsewhere",
        ),
    ),
    (
        "307-no-location",
        Outcome(status=307),
        1,
        Pause(
            307,
            "endpoint_redirected",
            "HTTP 307 Temporary Redirect: the API is a redirect without a Location; "
            "check api_url (dropcut does not follow redirects)",
        ),
    ),
    (
        "308",
        Outcome(status=308, location="https://x.example/"),
        3,
        Pause(
            308,
            "endpoint_redirected",
            "HTTP 308 Permanent Redirect: the API redirects to https://x.example/; "
            "check api_url (dropcut does not follow redirects)",
            location="https://x.example/",
        ),
    ),
    (
        "300-no-location",
        Outcome(status=300),
        1,
        Pause(
            300,
            "endpoint_redirected",
            "HTTP 300 Multiple Choices: the API is a redirect without a Location; "
            "check api_url (dropcut does not follow redirects)",
        ),
    ),
    ("999-unknown", Outcome(status=999), 1, Retry(1.0, 999, "unexpected_status", "HTTP 999")),
    # the attempt budget
    (
        "503-attempt-11-of-12",
        Outcome(status=503),
        11,
        Retry(150.0, 503, "server_error", "HTTP 503 Service Unavailable"),
    ),
    (
        "503-budget-spent",
        Outcome(status=503),
        12,
        Refuse(
            503,
            "retries_exhausted",
            "gave up after 12 attempts; last problem: server_error: HTTP 503 Service Unavailable",
        ),
    ),
    (
        "429-budget-overspent",
        Outcome(status=429, detail=SEED_429),
        13,
        Refuse(
            429,
            "retries_exhausted",
            f"gave up after 13 attempts; last problem: rate_limited: {SEED_429}",
        ),
    ),
    (
        "200-bad-body-budget-spent",
        Outcome(status=200, body_problem=BodyProblem.TRUNCATED),
        12,
        Refuse(
            200,
            "retries_exhausted",
            "gave up after 12 attempts; last problem: bad_response: "
            "HTTP 200 but the PNG body is cut short [truncated]",
        ),
    ),
    (
        "reset-budget-spent",
        Outcome(transport_error=TransportError.RESET),
        12,
        Refuse(
            0,
            "retries_exhausted",
            "gave up after 12 attempts; last problem: connection_error: "
            "connection reset or closed without a complete response [reset]",
        ),
    ),
]


@pytest.mark.parametrize(
    ("outcome", "attempt", "expected"),
    [pytest.param(o, a, e, id=i) for i, o, a, e in HTTP_CASES],
)
def test_judge_http(outcome: Outcome, attempt: int, expected: Decision) -> None:
    assert judge(outcome, attempt=attempt, policy=POLICY, now=NOW, jitter=JITTER) == expected


# --- judge: no HTTP response ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        pytest.param(TransportError.RESET, "connection_error", id="reset"),
        pytest.param(TransportError.READ_TIMEOUT, "timeout", id="read-timeout"),
        pytest.param(TransportError.CONNECT_TIMEOUT, "timeout", id="connect-timeout"),
        pytest.param(TransportError.WRITE_TIMEOUT, "timeout", id="write-timeout"),
        pytest.param(TransportError.POOL_TIMEOUT, "timeout", id="pool-timeout"),
        pytest.param(TransportError.DEADLINE, "timeout", id="whole-request-deadline"),
        pytest.param(TransportError.DNS, "connection_error", id="dns"),
        pytest.param(TransportError.TLS, "connection_error", id="tls"),
        pytest.param(TransportError.CONNECT, "connection_error", id="connect"),
        pytest.param(TransportError.PROTOCOL, "connection_error", id="protocol"),
        pytest.param(TransportError.OTHER, "connection_error", id="other"),
    ],
)
def test_judge_transport(kind: TransportError, code: str) -> None:
    outcome = Outcome(transport_error=kind, detail="[Errno -2] boom")
    decision = judge(outcome, attempt=1, policy=POLICY, now=NOW, jitter=JITTER)
    assert isinstance(decision, Retry)
    assert (decision.delay, decision.status, decision.code) == (1.0, None, code)
    assert f"[{kind.value}]" in decision.detail
    assert decision.detail.endswith(": [Errno -2] boom")


def test_every_body_problem_and_transport_error_has_a_text() -> None:
    """A new member without a text would crash the judge (KeyError) on its first use."""
    for problem in BodyProblem:
        outcome = Outcome(status=200, body_problem=problem)
        decision = judge(outcome, attempt=1, policy=POLICY, now=NOW, jitter=1)
        assert isinstance(decision, Retry) and decision.detail.endswith(f"[{problem.value}]")
    for kind in TransportError:
        decision = judge(Outcome(transport_error=kind), attempt=1, policy=POLICY, now=NOW, jitter=1)
        assert isinstance(decision, Retry) and decision.detail.endswith(f"[{kind.value}]")


def test_judge_outcome_without_status_or_transport_error_is_an_unknown_transport_error() -> None:
    decision = judge(Outcome(), attempt=1, policy=POLICY, now=NOW, jitter=JITTER)
    assert decision == Retry(1.0, None, "connection_error", "transport error [other]")


# --- judge: Retry-After ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "attempt", "jitter", "delay"),
    [
        pytest.param(None, 1, 0.5, 1.0, id="absent-backoff"),
        pytest.param("30", 1, 0.5, 30.0, id="seconds-longer-than-backoff"),
        pytest.param(" 30 ", 1, 0.5, 30.0, id="seconds-with-spaces"),
        pytest.param("2.5", 1, 0.5, 2.5, id="fractional-seconds"),
        pytest.param("10", 5, 1.0, 32.0, id="seconds-shorter-than-backoff"),
        pytest.param("0", 1, 0.5, 1.0, id="zero-seconds"),
        pytest.param("7200", 1, 0.5, 3600.0, id="seconds-clamped"),
        pytest.param("7200", 12 - 1, 0.0, 3600.0, id="clamped-even-with-zero-jitter"),
        pytest.param("Sat, 10 Jan 2026 12:01:30 GMT", 1, 0.5, 90.0, id="http-date-future"),
        pytest.param("Sat, 10 Jan 2026 17:00:00 GMT", 1, 0.5, 3600.0, id="http-date-clamped"),
        pytest.param("Fri, 09 Jan 2026 12:00:00 GMT", 1, 0.5, 1.0, id="http-date-past"),
        pytest.param("soon", 1, 0.5, 1.0, id="garbage"),
        pytest.param("-5", 1, 0.5, 1.0, id="negative-seconds"),
        pytest.param("", 3, 0.5, 4.0, id="empty"),
    ],
)
def test_judge_retry_after(retry_after: str | None, attempt: int, jitter: float, delay: float) -> None:
    outcome = Outcome(status=429, retry_after=retry_after)
    decision = judge(outcome, attempt=attempt, policy=POLICY, now=NOW, jitter=jitter)
    assert decision == Retry(delay, 429, "rate_limited", SEED_429)


def test_judge_retry_after_on_503() -> None:
    outcome = Outcome(status=503, retry_after="120")
    decision = judge(outcome, attempt=1, policy=POLICY, now=NOW, jitter=0.0)
    assert isinstance(decision, Retry)
    assert decision.delay == 120.0


def test_judge_small_policy_budget() -> None:
    policy = RetryPolicy(max_attempts=1)
    decision = judge(Outcome(status=500), attempt=1, policy=policy, now=NOW, jitter=0.5)
    assert isinstance(decision, Refuse)
    assert (decision.status, decision.code) == (500, "retries_exhausted")


# --- parse_retry_after ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        pytest.param(None, NOW, None, id="none"),
        pytest.param("", NOW, None, id="empty"),
        pytest.param("   ", NOW, None, id="blank"),
        pytest.param("120", NOW, 120.0, id="seconds"),
        pytest.param("0", NOW, 0.0, id="zero"),
        pytest.param(" 7 ", NOW, 7.0, id="padded"),
        pytest.param("1.5", NOW, 1.5, id="fraction"),
        pytest.param("-5", NOW, None, id="negative"),
        pytest.param("1e3", NOW, None, id="exponent"),
        pytest.param("inf", NOW, None, id="inf"),
        pytest.param("nan", NOW, None, id="nan"),
        pytest.param("soon", NOW, None, id="word"),
        pytest.param("Sat, 10 Jan 2026 12:01:30 GMT", NOW, 90.0, id="date-future"),
        pytest.param("Sat, 10 Jan 2026 12:00:00 GMT", NOW, 0.0, id="date-now"),
        pytest.param("Fri, 09 Jan 2026 12:00:00 GMT", NOW, 0.0, id="date-past"),
        pytest.param("Sat, 10 Jan 2026 13:01:30 +0100", NOW, 90.0, id="date-with-offset"),
        pytest.param("Sat, 10 Jan 2026 12:01:30", NOW, 90.0, id="date-without-zone-is-utc"),
        pytest.param(
            "Sat, 10 Jan 2026 12:01:30 GMT",
            NOW.replace(tzinfo=None),
            90.0,
            id="naive-now-is-utc",
        ),
        pytest.param("Wed, 99 Foo 2015 07:28:00 GMT", NOW, None, id="date-garbage"),
        pytest.param("Sat, 10 Jan 2026 25:01:30 GMT", NOW, None, id="date-bad-hour"),
    ],
)
def test_parse_retry_after(value: str | None, now: datetime, expected: float | None) -> None:
    assert parse_retry_after(value, now) == expected


# --- backoff_delay --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [
        pytest.param(1, 1.0, 2.0, id="a1"),
        pytest.param(2, 1.0, 4.0, id="a2"),
        pytest.param(3, 1.0, 8.0, id="a3"),
        pytest.param(4, 1.0, 16.0, id="a4"),
        pytest.param(5, 1.0, 32.0, id="a5"),
        pytest.param(6, 1.0, 64.0, id="a6"),
        pytest.param(7, 1.0, 128.0, id="a7"),
        pytest.param(8, 1.0, 256.0, id="a8"),
        pytest.param(9, 1.0, 300.0, id="a9-capped"),
        pytest.param(12, 1.0, 300.0, id="a12-capped"),
        pytest.param(5000, 1.0, 300.0, id="huge-attempt-no-overflow"),
        pytest.param(3, 0.25, 2.0, id="jitter-quarter"),
        pytest.param(9, 0.5, 150.0, id="jitter-half-of-cap"),
        pytest.param(4, 0.0, 0.0, id="jitter-zero"),
    ],
)
def test_backoff_delay(attempt: int, jitter: float, expected: float) -> None:
    assert backoff_delay(attempt, POLICY, jitter) == expected


def test_backoff_delay_follows_policy() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0)
    assert [backoff_delay(a, policy, 1.0) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("attempt", "jitter"),
    [
        pytest.param(0, 0.5, id="attempt-zero"),
        pytest.param(-1, 0.5, id="attempt-negative"),
        pytest.param(1, 1.5, id="jitter-above-one"),
        pytest.param(1, -0.1, id="jitter-negative"),
        pytest.param(1, float("nan"), id="jitter-nan"),
    ],
)
def test_backoff_delay_rejects(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, POLICY, jitter)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_attempts": 0}, id="no-attempts"),
        pytest.param({"base_delay": -1.0}, id="negative-base"),
        pytest.param({"max_delay": float("inf")}, id="infinite-cap"),
        pytest.param({"max_retry_after": float("nan")}, id="nan-clamp"),
    ],
)
def test_retry_policy_rejects(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- flatten_detail -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"detail": "Invalid API Key"}, "Invalid API Key", id="string"),
        pytest.param({"detail": "  padded  "}, "padded", id="string-stripped"),
        pytest.param(
            {
                "detail": [
                    {
                        "loc": ["body", "file"],
                        "msg": "field required",
                        "type": "value_error.missing",
                    }
                ]
            },
            "body.file: field required",
            id="fastapi-list",
        ),
        pytest.param(
            {
                "detail": [
                    {"loc": ["body", "file"], "msg": "field required"},
                    {"loc": ["header", "x-api-key"], "msg": "field required"},
                ]
            },
            "body.file: field required; header.x-api-key: field required",
            id="fastapi-list-two",
        ),
        pytest.param(
            {"detail": [{"loc": ["body", "files", 0], "msg": "not an image"}]},
            "body.files.0: not an image",
            id="fastapi-list-int-loc",
        ),
        pytest.param({"detail": [{"msg": "bad"}]}, "bad", id="list-without-loc"),
        pytest.param({"detail": [{"loc": [], "msg": "bad"}]}, "bad", id="list-empty-loc"),
        pytest.param({"detail": ["plain text"]}, "plain text", id="list-of-strings"),
        pytest.param({"detail": [{"loc": ["body"]}]}, None, id="list-without-msg"),
        pytest.param({"detail": [42, None]}, None, id="list-of-junk"),
        pytest.param({"detail": []}, None, id="empty-list"),
        pytest.param({"detail": ""}, None, id="empty-string"),
        pytest.param({"detail": None}, None, id="null"),
        pytest.param({"detail": {"message": "x"}}, None, id="object"),
        pytest.param({"detail": 402}, None, id="number"),
        pytest.param({"message": "x"}, None, id="no-detail-key"),
        pytest.param({}, None, id="empty-object"),
        pytest.param([{"detail": "x"}], None, id="top-level-list"),
        pytest.param("Invalid API Key", None, id="top-level-string"),
        pytest.param(None, None, id="none"),
    ],
)
def test_flatten_detail(body: object, expected: str | None) -> None:
    assert flatten_detail(body) == expected


# --- transport_error_kind on exception instances --------------------------------------


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


def _in_context(exc: BaseException, context: BaseException) -> BaseException:
    exc.__context__ = context
    return exc


def _cyclic() -> BaseException:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    return a


CERT_FAILED = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"

KIND_CASES: list[tuple[str, BaseException, TransportError]] = [
    (
        "dns-message-linux",
        httpx.ConnectError("[Errno -2] Name or service not known"),
        TransportError.DNS,
    ),
    (
        "dns-message-macos",
        httpx.ConnectError("[Errno 8] nodename nor servname provided, or not known"),
        TransportError.DNS,
    ),
    (
        "dns-message-temporary",
        httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
        TransportError.DNS,
    ),
    (
        "dns-gaierror-cause",
        _caused(
            httpx.ConnectError("connect failed"),
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        ),
        TransportError.DNS,
    ),
    (
        "dns-gaierror-context",
        _in_context(httpx.ConnectError("x"), socket.gaierror(-3, "whatever")),
        TransportError.DNS,
    ),
    (
        "tls-cert-cause",
        _caused(httpx.ConnectError(CERT_FAILED), ssl.SSLCertVerificationError(1, CERT_FAILED)),
        TransportError.TLS,
    ),
    (
        "tls-message-only",
        httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)"),
        TransportError.TLS,
    ),
    (
        "tls-certificate-word",
        httpx.ConnectError("hostname mismatch, certificate is not valid for 'x'"),
        TransportError.TLS,
    ),
    (
        "connect-refused",
        httpx.ConnectError("[Errno 111] Connection refused"),
        TransportError.CONNECT,
    ),
    (
        "connect-all-failed",
        httpx.ConnectError("All connection attempts failed"),
        TransportError.CONNECT,
    ),
    (
        "connect-refused-cause",
        _caused(httpx.ConnectError(""), ConnectionRefusedError(111, "Connection refused")),
        TransportError.CONNECT,
    ),
    ("connect-timeout", httpx.ConnectTimeout("timed out"), TransportError.CONNECT_TIMEOUT),
    ("read-timeout", httpx.ReadTimeout("timed out"), TransportError.READ_TIMEOUT),
    (
        "read-timeout-ssl-word",
        httpx.ReadTimeout("The read operation timed out (SSL)"),
        TransportError.READ_TIMEOUT,
    ),
    ("write-timeout", httpx.WriteTimeout("timed out"), TransportError.WRITE_TIMEOUT),
    ("pool-timeout", httpx.PoolTimeout("timed out"), TransportError.POOL_TIMEOUT),
    ("timeout-base-class", httpx.TimeoutException("timed out"), TransportError.READ_TIMEOUT),
    (
        "reset-server-disconnected",
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        TransportError.RESET,
    ),
    (
        "reset-peer-closed",
        httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body (received 100 bytes, expected 2000)"
        ),
        TransportError.RESET,
    ),
    (
        "reset-read-error",
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        TransportError.RESET,
    ),
    ("reset-write-error", httpx.WriteError("[Errno 32] Broken pipe"), TransportError.RESET),
    (
        "reset-read-error-ssl-eof",
        _caused(httpx.ReadError("EOF"), ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        TransportError.RESET,
    ),
    ("protocol-local", httpx.LocalProtocolError("Illegal header value"), TransportError.PROTOCOL),
    (
        "protocol-decoding",
        httpx.DecodingError("Error -3 while decompressing"),
        TransportError.PROTOCOL,
    ),
    ("other-proxy", httpx.ProxyError("407 Proxy Authentication Required"), TransportError.OTHER),
    ("other-unsupported-protocol", httpx.UnsupportedProtocol("ftp://"), TransportError.OTHER),
    ("other-close-error", httpx.CloseError("close failed"), TransportError.OTHER),
    (
        "builtin-connection-reset",
        ConnectionResetError(104, "Connection reset by peer"),
        TransportError.RESET,
    ),
    ("builtin-broken-pipe", BrokenPipeError(32, "Broken pipe"), TransportError.RESET),
    ("builtin-connection-aborted", ConnectionAbortedError(), TransportError.RESET),
    ("builtin-connection-refused", ConnectionRefusedError(), TransportError.CONNECT),
    ("builtin-gaierror", socket.gaierror(-2, "Name or service not known"), TransportError.DNS),
    ("builtin-ssl-error", ssl.SSLError(1, "handshake failure"), TransportError.TLS),
    ("builtin-timeout", TimeoutError(), TransportError.READ_TIMEOUT),
    ("wrapped-reset", _caused(RuntimeError("x"), ConnectionResetError()), TransportError.RESET),
    ("unknown", ValueError("what"), TransportError.OTHER),
    ("cyclic-chain", _cyclic(), TransportError.OTHER),
]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [pytest.param(e, k, id=i) for i, e, k in KIND_CASES],
)
def test_transport_error_kind(exc: BaseException, expected: TransportError) -> None:
    assert transport_error_kind(exc) == expected


# --- transport_error_kind on exceptions httpx raises itself (loopback only) -----------


@contextmanager
def _server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection TCP server on 127.0.0.1; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        listener.close()
        thread.join(timeout=5)


def _close_after_request(conn: socket.socket) -> None:
    conn.recv(65536)


def _plain_garbage(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"this is not TLS\r\n" * 20)


def _silent(conn: socket.socket) -> None:
    conn.recv(65536)
    time.sleep(1.0)  # longer than the client's 0.5 s timeout


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("handler", "scheme", "expected"),
    [
        pytest.param(_close_after_request, "http", TransportError.RESET, id="closed-no-response"),
        pytest.param(_plain_garbage, "https", TransportError.TLS, id="tls-to-plain-server"),
        pytest.param(_silent, "http", TransportError.READ_TIMEOUT, id="server-never-answers"),
        pytest.param(None, "http", TransportError.CONNECT, id="nothing-listening"),
    ],
)
def test_transport_error_kind_from_real_httpx(
    handler: Callable[[socket.socket], None] | None, scheme: str, expected: TransportError
) -> None:
    def request(port: int) -> BaseException:
        with pytest.raises(httpx.TransportError) as info:
            httpx.post(f"{scheme}://127.0.0.1:{port}/v1.0/x", content=b"x", timeout=0.5)
        return info.value

    if handler is None:
        exc = request(_closed_port())
    else:
        with _server(handler) as port:
            exc = request(port)
    assert transport_error_kind(exc) == expected

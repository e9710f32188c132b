"""Tests for the fake withoutBG server (real HTTP over 127.0.0.1, via httpx)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, UnidentifiedImageError

from tests.fake_api import (
    ALPHA_PATH,
    BAD_PNG_KINDS,
    CREDIT_PATH,
    CUTOUT_PATH,
    MSG_EXPIRED,
    MSG_NO_CREDIT,
    MSG_SERVER_ERROR,
    MSG_UNSUPPORTED,
    BadPng,
    FakeWithoutBG,
    bad_png,
)

KEY = "test-key"
ROOT = Path(__file__).resolve().parent.parent
MISSING = [{"loc": ["body", "file"], "msg": "field required", "type": "value_error.missing"}]

MakeApi = Callable[..., FakeWithoutBG]


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    im = Image.new(mode, size, "orange")
    im.putpixel((1, 1), (0, 0, 255) if mode == "RGB" else 3)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


JPEG = image_bytes()


@pytest.fixture
def make_api() -> Iterator[MakeApi]:
    """Factory for started servers with custom settings; all are stopped afterwards."""
    started: list[FakeWithoutBG] = []

    def make(**kwargs: object) -> FakeWithoutBG:
        api = FakeWithoutBG(**kwargs).start()  # type: ignore[arg-type]
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


def client(api: FakeWithoutBG, key: str | None = KEY) -> httpx.Client:
    headers = {"X-API-Key": key} if key is not None else {}
    # verify=False: plain HTTP anyway, and it skips loading the CA bundle (~50 ms a client).
    return httpx.Client(base_url=api.url, headers=headers, timeout=10, verify=False)


def upload(
    c: httpx.Client, data: bytes = JPEG, name: str = "a.jpg", path: str = CUTOUT_PATH
) -> httpx.Response:
    return c.post(path, files={"file": (name, data, "application/octet-stream")})


# ---- auth and credit -------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_401_missing_or_wrong_key(fake_api: FakeWithoutBG, key: str | None) -> None:
    with client(fake_api, key) as c:
        r = upload(c)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"detail": "Invalid API Key"}
        assert "retry-after" not in r.headers
        assert c.get(CREDIT_PATH).status_code == 401
    (rec,) = fake_api.records()
    assert not rec.api_key_ok and rec.status == 401 and not rec.rate_limited
    assert rec.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert fake_api.window_count() == 0  # 401s do not count toward the rate window
    assert fake_api.credit == 1000


def test_403_expired_and_402_no_credit(make_api: MakeApi) -> None:
    api = make_api(credit=1, rate_limit=100)
    with client(api) as c:
        api.expired = True
        r = upload(c)
        assert (r.status_code, r.json()) == (403, {"detail": MSG_EXPIRED})
        credit = c.get(CREDIT_PATH).json()
        assert credit["credit"] == 1 and credit["expiration_date"] < "2025"
        api.expired = False
        assert c.get(CREDIT_PATH).json() == {
            "credit": 1,
            "expiration_date": "2027-09-05 23:59:59",
        }
        assert upload(c).status_code == 200  # costs the last credit
        assert api.credit == 0
        r = upload(c)
        assert (r.status_code, r.json()) == (402, {"detail": MSG_NO_CREDIT})
        assert c.get(CREDIT_PATH).json()["credit"] == 0
    assert api.credit_checks == 3
    assert [rec.status for rec in api.records()] == [403, 200, 402]
    assert api.window_count() == 1  # 402/403 do not count


def test_only_real_200s_cost_credit(make_api: MakeApi) -> None:
    api = make_api(credit=10, rate_limit=100)
    api.fail_next(1, 503)
    api.garbage_next(1)
    with client(api) as c:
        assert upload(c).status_code == 503
        assert upload(c).status_code == 200  # garbage
        assert upload(c, b"not an image").status_code == 415
        assert upload(c).status_code == 200
    assert api.credit == 9


# ---- body checks -----------------------------------------------------------------------


def test_413_file_part_too_large(make_api: MakeApi) -> None:
    api = make_api(max_bytes=200_000)
    big = b"\xff\xd8\xff" + os.urandom(200_000)
    with client(api) as c:
        r = upload(c, big)
        assert r.status_code == 413
        assert r.json() == {"detail": "File size too large. Maximum file size is 0.2 MB"}
        assert upload(c).status_code == 200  # connection still usable
    rec = api.records()[0]
    assert rec.size == len(big) and rec.sha256 == hashlib.sha256(big).hexdigest()
    assert api.window_count() == 2  # a 413 passed auth and counts


def test_413_default_limit_text(fake_api: FakeWithoutBG) -> None:
    with client(fake_api) as c:
        r = upload(c, b"\xff\xd8\xff" + bytes(10 * 1024 * 1024))
    assert r.status_code == 413
    assert r.json() == {"detail": "File size too large. Maximum file size is 10.0 MB"}


def test_413_whole_request_over_limit_is_not_parsed(make_api: MakeApi) -> None:
    api = make_api(max_bytes=1000)
    with client(api) as c:
        r = upload(c, bytes(1024 * 1024 + 5000))
        assert r.status_code == 413
        assert upload(c, image_bytes(size=(4, 4))).status_code == 200
    rec = api.records()[0]
    assert rec.status == 413 and rec.sha256 is None and rec.size is None
    assert api.connection_count == 1


def test_415_unsupported_format(fake_api: FakeWithoutBG) -> None:
    with client(fake_api) as c:
        for data in (b"hello, not an image at all", b"%PDF-1.4\n", b""):
            r = upload(c, data, "a.txt")
            assert (r.status_code, r.json()) == (415, {"detail": MSG_UNSUPPORTED})


def test_422_missing_file_field(fake_api: FakeWithoutBG) -> None:
    with client(fake_api) as c:
        r = c.post(CUTOUT_PATH, files={"image": ("a.jpg", JPEG, "image/jpeg")})
        assert (r.status_code, r.json()) == (422, {"detail": MISSING})
        r = c.post(CUTOUT_PATH, content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert (r.status_code, r.json()) == (422, {"detail": MISSING})
        r = c.post(CUTOUT_PATH, data={"file": "just text"})  # urlencoded, not multipart
        assert (r.status_code, r.json()) == (422, {"detail": MISSING})
        r = c.post(CUTOUT_PATH)
        assert (r.status_code, r.json()) == (422, {"detail": MISSING})
        assert r.headers["content-type"] == "application/json"
    assert all(rec.sha256 is None for rec in fake_api.records())


@pytest.mark.parametrize(
    "data",
    [JPEG[: len(JPEG) // 2], image_bytes("PNG")[:60], b"\x89PNG\r\n\x1a\n" + b"junk" * 50],
    ids=["truncated-jpeg", "truncated-png", "corrupt-png"],
)
def test_422_corrupt_image(fake_api: FakeWithoutBG, data: bytes) -> None:
    with client(fake_api) as c:
        r = upload(c, data)
    assert (r.status_code, r.json()) == (422, {"detail": "Validation Error"})


# ---- success ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("PNG", "RGB"),
        ("WEBP", "RGB"),
        ("TIFF", "RGB"),
        ("BMP", "RGB"),
        ("GIF", "P"),
    ],
)
def test_200_rgba_png_of_input_size(fake_api: FakeWithoutBG, fmt: str, mode: str) -> None:
    data = image_bytes(fmt, (37, 23), mode)
    with client(fake_api) as c:
        r = upload(c, data, f"pic.{fmt.lower()}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert int(r.headers["content-length"]) == len(r.content)
    out = Image.open(io.BytesIO(r.content))
    assert (out.format, out.mode, out.size) == ("PNG", "RGBA", (37, 23))
    alpha = out.getchannel("A")
    assert alpha.getpixel((18, 11)) == 255 and alpha.getpixel((0, 0)) == 0
    (rec,) = fake_api.records()
    assert rec.status == 200 and rec.api_key_ok and rec.filename == f"pic.{fmt.lower()}"
    assert rec.sha256 == hashlib.sha256(data).hexdigest() and rec.size == len(data)
    assert rec.path == CUTOUT_PATH and fake_api.credit == 999


def test_alpha_channel_returns_l_matte(fake_api: FakeWithoutBG) -> None:
    with client(fake_api) as c:
        r = upload(c, image_bytes("PNG", (50, 30)), path=ALPHA_PATH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(r.content))
    assert (out.mode, out.size) == ("L", (50, 30))
    assert out.getpixel((25, 15)) == 255 and out.getpixel((0, 0)) == 0
    assert fake_api.records()[0].path == ALPHA_PATH


def test_latency_is_applied_after_arrival(make_api: MakeApi) -> None:
    api = make_api(latency=0.3)
    with client(api) as c:
        t0 = time.time()
        assert upload(c).status_code == 200
        elapsed = time.time() - t0
        api.latency = 0.0
        t1 = time.monotonic()
        assert upload(c).status_code == 200
        assert time.monotonic() - t1 < 0.25
    assert elapsed >= 0.3
    assert api.records()[0].arrived - t0 < 0.2


# ---- rate limit ------------------------------------------------------------------------


def test_strict_sliding_window(make_api: MakeApi) -> None:
    api = make_api(rate_limit=3, rate_period=1.0)
    with client(api) as c:
        assert upload(c).status_code == 200  # r1 at t0
        time.sleep(0.4)
        assert upload(c).status_code == 200  # r2, r3 at ~t0+0.4
        assert upload(c).status_code == 200
        for _ in range(3):
            r = upload(c)
            assert (r.status_code, r.json()) == (
                429,
                {"detail": "Rate limit (3 request/second) exceeded"},
            )
        t0 = api.records()[0].arrived
        time.sleep(max(0.0, t0 + 1.05 - time.time()))  # let r1 (only r1) leave the window
        assert upload(c).status_code == 200  # 429s did not count, r2 and r3 still in window
        assert upload(c).status_code == 429  # not a fixed window: r2, r3, r5 still count
    recs = api.records()
    assert [r.status for r in recs] == [200, 200, 200, 429, 429, 429, 200, 429]
    assert [r.rate_limited for r in recs] == [s == 429 for s in [r.status for r in recs]]
    accepted = [r.arrived for r in recs if r.status == 200]
    assert all(b - a >= 1.0 for a, b in zip(accepted, accepted[3:], strict=False))


def test_count_rejected_makes_429s_count(make_api: MakeApi) -> None:
    api = make_api(rate_limit=1, rate_period=0.5, count_rejected=True)
    with client(api) as c:
        assert upload(c).status_code == 200
        time.sleep(0.3)
        assert upload(c).status_code == 429  # counted, keeps the window full
        t0 = api.records()[0].arrived
        time.sleep(max(0.0, t0 + 0.55 - time.time()))
        assert upload(c).status_code == 429


def test_rate_text_uses_configured_numbers() -> None:
    assert FakeWithoutBG()._rate_text() == "Rate limit (7 request/minute) exceeded"
    assert FakeWithoutBG(rate_limit=5, rate_period=6)._rate_text() == (
        "Rate limit (5 request/6 seconds) exceeded"
    )


def test_injected_failures_and_body_errors_count_toward_window(make_api: MakeApi) -> None:
    api = make_api(rate_limit=3, rate_period=30.0)
    api.fail_next(1)
    with client(api) as c:
        assert upload(c).status_code == 500
        assert upload(c, b"nope").status_code == 415
        assert upload(c, JPEG[:100]).status_code == 422
        assert upload(c).status_code == 429


def test_concurrent_requests_never_exceed_limit_or_credit(make_api: MakeApi) -> None:
    api = make_api(rate_limit=3, rate_period=30.0, credit=100)
    poor = make_api(rate_limit=100, credit=2)

    def burst(target: FakeWithoutBG) -> list[int]:
        with client(target) as c, ThreadPoolExecutor(8) as pool:
            return sorted(pool.map(lambda _: upload(c).status_code, range(8)))

    assert burst(api) == [200] * 3 + [429] * 5
    assert burst(poor) == [200] * 2 + [402] * 6
    assert poor.credit == 0


def slow_body(data: bytes, pause: float) -> tuple[Iterator[bytes], str]:
    boundary = "slowBoundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.jpg"\r\n\r\n').encode()

    def pieces() -> Iterator[bytes]:
        yield head
        time.sleep(pause)  # the upload is slow: that is what is under test
        yield data + f"\r\n--{boundary}--\r\n".encode()

    return pieces(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("after_body", [False, True])
def test_arrival_stamp_at_headers_or_after_body(make_api: MakeApi, after_body: bool) -> None:
    api = make_api(admit_after_body=after_body)
    content, ctype = slow_body(JPEG, 0.2)
    with client(api) as c:
        t0 = time.time()
        r = c.post(CUTOUT_PATH, content=content, headers={"Content-Type": ctype})
    assert r.status_code == 200
    delay = api.records()[0].arrived - t0
    assert (delay >= 0.2) if after_body else (delay < 0.15)


# ---- injected faults -------------------------------------------------------------------


def test_fail_next_with_retry_after(fake_api: FakeWithoutBG) -> None:
    fake_api.fail_next(2, 503, retry_after="1")
    with client(fake_api) as c:
        for _ in range(2):
            r = upload(c)
            assert (r.status_code, r.json()) == (503, {"detail": MSG_SERVER_ERROR})
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"] == "application/json"
        r = upload(c)
        assert r.status_code == 200 and "retry-after" not in r.headers
    assert [(rec.status, rec.injected) for rec in fake_api.records()] == [
        (503, "fail"),
        (503, "fail"),
        (200, None),
    ]


def test_fail_next_applies_after_auth(fake_api: FakeWithoutBG) -> None:
    fake_api.fail_next(1, 429)
    with client(fake_api, "bad") as bad:
        assert upload(bad).status_code == 401  # does not consume the fault
    with client(fake_api) as c:
        r = upload(c)
        assert r.status_code == 429 and "retry-after" not in r.headers
        assert r.json() == {"detail": "Rate limit (7 request/minute) exceeded"}
        assert upload(c).status_code == 200
    assert not fake_api.records()[1].rate_limited


def test_drop_next(fake_api: FakeWithoutBG) -> None:
    fake_api.drop_next(1)
    with client(fake_api) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            upload(c)
        assert upload(c).status_code == 200
    first = fake_api.records()[0]
    assert first.status == 0 and first.injected == "drop" and first.sha256 is not None


def test_truncate_next(fake_api: FakeWithoutBG) -> None:
    fake_api.truncate_next(1)
    with client(fake_api) as c:
        with c.stream("POST", CUTOUT_PATH, files={"file": ("a.jpg", JPEG)}) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            promised = int(r.headers["content-length"])
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
        r = upload(c)
        assert r.status_code == 200 and len(r.content) == promised
    assert fake_api.records()[0].injected == "truncate"


def test_garbage_next(fake_api: FakeWithoutBG) -> None:
    fake_api.garbage_next(1)
    with client(fake_api) as c:
        r = upload(c)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert not r.content.startswith(b"\x89PNG")
        r.json()  # it is JSON
        with pytest.raises(UnidentifiedImageError):
            Image.open(io.BytesIO(r.content))
        assert upload(c).content.startswith(b"\x89PNG")


def test_faults_are_served_in_queue_order(fake_api: FakeWithoutBG) -> None:
    fake_api.fail_next(1, 502)
    fake_api.garbage_next(1)
    fake_api.fail_next(1, 504)
    with client(fake_api) as c:
        statuses = [upload(c).status_code for _ in range(4)]
    assert statuses == [502, 200, 504, 200]
    assert [r.injected for r in fake_api.records()] == ["fail", "garbage", "fail", None]


# ---- transport -------------------------------------------------------------------------


def test_chunked_upload_accepted(fake_api: FakeWithoutBG) -> None:
    data = image_bytes("PNG", (300, 200))
    boundary = "xYzBoundary42"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="chunky.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 333):
            yield body[i : i + 333]

    with client(fake_api) as c:
        request = c.build_request(
            "POST",
            CUTOUT_PATH,
            content=pieces(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert request.headers["transfer-encoding"] == "chunked"
        r = c.send(request)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (300, 200)
    rec = fake_api.records()[0]
    assert rec.sha256 == hashlib.sha256(data).hexdigest() and rec.filename == "chunky.png"


def test_binary_payload_round_trips_exactly(fake_api: FakeWithoutBG) -> None:
    payload = b"\xff\xd8\xff" + b"\r\n\r\r\n--\n" * 50 + os.urandom(50_000) + b"\r\n"
    with client(fake_api) as c:
        assert upload(c, payload).status_code == 422
    rec = fake_api.records()[0]
    assert rec.sha256 == hashlib.sha256(payload).hexdigest() and rec.size == len(payload)


def test_keep_alive_many_requests_one_connection(fake_api: FakeWithoutBG) -> None:
    with client(fake_api) as c:
        statuses = [upload(c).status_code for _ in range(5)]
        statuses.append(upload(c, b"nope").status_code)
        statuses.append(c.get(CREDIT_PATH).status_code)
        statuses.append(c.get("/nothing-here").status_code)
        statuses.append(c.post(CUTOUT_PATH).status_code)
        statuses.append(upload(c).status_code)
    assert statuses == [200] * 5 + [415, 200, 404, 422, 429]
    assert fake_api.connection_count == 1


def test_404_and_405(fake_api: FakeWithoutBG) -> None:
    with client(fake_api) as c:
        r = c.get("/v1.0/other")
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
        r = c.post("/v1.0/image-without-background-base64", json={"image_base64": "x"})
        assert r.status_code == 404
        r = c.get(CUTOUT_PATH)
        assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
        assert r.headers["allow"] == "POST"
        assert c.post(CREDIT_PATH).status_code == 405
        assert c.delete(ALPHA_PATH).status_code == 405
        assert c.put("/x", content=b"abc").status_code == 404
        assert upload(c).status_code == 200
    assert [r.status for r in fake_api.records()] == [404, 405, 200]
    assert fake_api.connection_count == 1


def test_wait_for(fake_api: FakeWithoutBG) -> None:
    assert not fake_api.wait_for(lambda api: len(api.requests) > 0, timeout=0.05)
    with client(fake_api) as c:
        upload(c)
    assert fake_api.wait_for(lambda api: len(api.requests) == 1, timeout=1.0)


def test_stop_closes_idle_keep_alive_connections(make_api: MakeApi) -> None:
    api = make_api()
    with client(api) as c:
        assert upload(c).status_code == 200
        api.stop()
        with pytest.raises(httpx.TransportError):
            upload(c)


def test_stop_cuts_latency_short_and_restart_works(make_api: MakeApi) -> None:
    api = make_api(latency=30.0)
    errors: list[BaseException] = []

    def call() -> None:
        with client(api) as c:
            try:
                upload(c)
            except httpx.TransportError as exc:
                errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    assert api.wait_for(lambda a: a.window_count() == 1, timeout=5)
    t0 = time.monotonic()
    api.stop()
    worker.join(timeout=5)
    assert not worker.is_alive() and time.monotonic() - t0 < 2 and errors
    api.latency = 0.0
    api.start()
    with client(api) as c:
        assert upload(c).status_code == 200


def test_reset_forgets_records_window_and_faults(fake_api: FakeWithoutBG) -> None:
    fake_api.fail_next(5)
    with client(fake_api) as c:
        assert upload(c).status_code == 500
        c.get(CREDIT_PATH)
        fake_api.reset()
        assert fake_api.records() == [] and fake_api.credit_checks == 0
        assert fake_api.window_count() == 0
        assert upload(c).status_code == 200


def test_cli_runs_until_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fake_api",
            "--port",
            "0",
            "--rate-limit",
            "2",
            "--rate-period",
            "6",
            "--latency",
            "0",
            "--api-key",
            "K",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, headers={"X-API-Key": "K"}, verify=False) as c:
            assert c.get(CREDIT_PATH).json()["credit"] == 1000
            assert [upload(c).status_code for _ in range(3)] == [200, 200, 429]
            assert upload(c).json() == {"detail": "Rate limit (2 request/6 seconds) exceeded"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- misbehaving on demand (answers a careful client must refuse) ----------------------


def test_answer_next_sends_exactly_what_it_is_given(fake_api: FakeWithoutBG) -> None:
    fake_api.answer_next(1, b"\x00\x01", status=418, content_type="x/y", headers={"X-Extra": "1"})
    with client(fake_api) as c:
        r = upload(c)
        assert (r.status_code, r.content, r.headers["content-type"], r.headers["x-extra"]) == (
            418,
            b"\x00\x01",
            "x/y",
            "1",
        )
        assert upload(c).status_code == 200
    assert [r.injected for r in fake_api.records()] == ["answer", None]
    assert fake_api.credit == 999  # only the real 200 cost a credit


@pytest.mark.parametrize("kind", BAD_PNG_KINDS)
def test_bad_png_next_has_valid_crcs_but_no_usable_cutout(fake_api: FakeWithoutBG, kind: BadPng) -> None:
    fake_api.bad_png_next(1, kind)
    with client(fake_api) as c:
        body = upload(c, image_bytes(size=(64, 48))).content
    assert body == bad_png(kind, (64, 48))
    pos = 8
    while pos < len(body):  # every chunk's CRC is right, up to IEND
        (length,) = struct.unpack(">I", body[pos : pos + 4])
        ctype, data = body[pos + 4 : pos + 8], body[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", body[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(ctype + data)
        pos += 12 + length
    assert ctype == b"IEND" and pos == len(body)
    try:
        with Image.open(io.BytesIO(body)) as im:
            im.load()
            usable = (im.size, im.mode) == ((64, 48), "RGBA")
    except Exception:
        usable = False
    assert not usable


@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.parametrize("announce", [True, False])
def test_huge_next_pads_the_real_answer(fake_api: FakeWithoutBG, gzip: bool, announce: bool) -> None:
    size = 3 * 1024 * 1024
    fake_api.huge_next(1, size, gzip=gzip, announce=announce)
    with client(fake_api) as c:
        r = upload(c)
        normal = upload(c).content
    assert r.status_code == 200
    assert ("content-length" in r.headers) == announce
    assert (r.headers.get("content-encoding") == "gzip") == gzip
    if gzip:
        assert int(r.headers.get("content-length", 0)) < size // 100 or not announce
    assert len(r.content) == size  # (httpx inflates it)
    assert r.content.startswith(normal) and r.content[len(normal) :].strip(b"\0") == b""


def test_huge_credit_answer_is_valid_json(fake_api: FakeWithoutBG) -> None:
    fake_api.huge_next(1, 100_000, credit=True)
    with client(fake_api) as c:
        r = c.get(CREDIT_PATH)
        assert len(r.content) == 100_000 and r.json()["credit"] == 1000
        assert len(c.get(CREDIT_PATH).content) < 100  # the fault is used up


def test_trickle_next_is_slow_and_ends_when_the_server_stops(make_api: MakeApi) -> None:
    api = make_api()
    api.trickle_next(1, interval=0.05)
    got = bytearray()
    with client(api) as c, c.stream("POST", CUTOUT_PATH, files={"file": ("a.jpg", JPEG)}) as r:
        assert r.status_code == 200
        promised = int(r.headers["content-length"])
        started = time.monotonic()
        stopper = threading.Timer(0.5, api.stop)
        stopper.start()
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in r.iter_raw():
                got += piece
        elapsed = time.monotonic() - started
        stopper.join()
    assert 4 <= len(got) <= 15 < promised  # about one byte each 0.05 s
    assert 0.4 <= elapsed < 2.0  # stop() ended the trickle at once


def test_redirect_next_and_redirect_all(fake_api: FakeWithoutBG) -> None:
    fake_api.redirect_next(1, 307, "https://x.example/here")
    with client(fake_api) as c:
        r = upload(c)
        assert (r.status_code, r.headers["location"]) == (307, "https://x.example/here")
        fake_api.redirect_all("https://moved.example/", status=308)
        r = upload(c)
        assert (r.status_code, r.headers["location"]) == (308, "https://moved.example" + CUTOUT_PATH)
        r = c.get(CREDIT_PATH)
        assert (r.status_code, r.headers["location"]) == (308, "https://moved.example" + CREDIT_PATH)
        fake_api.redirect_all(None)
        assert upload(c).status_code == 200
    assert [(r.status, r.injected) for r in fake_api.records()] == [
        (307, "redirect"),
        (308, "redirect_all"),
        (200, None),
    ]
    assert fake_api.credit_checks == 1 and fake_api.credit == 999


def test_echo_key_next_quotes_the_key_received(fake_api: FakeWithoutBG) -> None:
    fake_api.echo_key_next(1, 422)
    fake_api.echo_key_next(1, 401, credit=True)
    with client(fake_api) as c:
        r = upload(c)
        assert r.status_code == 422 and KEY in r.json()["detail"]
        r = c.get(CREDIT_PATH)
        assert r.status_code == 401 and KEY in r.json()["detail"]


def test_credit_faults_have_their_own_queue(fake_api: FakeWithoutBG) -> None:
    fake_api.fail_next(1, 502)
    fake_api.answer_next(1, b"{}", status=503, content_type="application/json", credit=True)
    with client(fake_api) as c:
        assert c.get(CREDIT_PATH).status_code == 503
        assert c.get(CREDIT_PATH).status_code == 200
        assert upload(c).status_code == 502
        fake_api.huge_next(1, 10_000, credit=True)
        fake_api.reset()  # forgets the credit queue too
        assert len(c.get(CREDIT_PATH).content) < 100

"""The client: is a 200 body one whole, usable PNG? is the upload framed right? and, against
the fake server on loopback, are bad answers, huge or trickled bodies, redirects and
echoed keys turned into the right outcomes?"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from dropcut.client import (
    PNG_SIGNATURE,
    AnswerKind,
    Credit,
    MultipartUpload,
    WithoutBG,
    answer_limit,
    check_answer,
    png_problem,
)
from dropcut.judge import BodyProblem, Outcome, TransportError
from tests.fake_api import BadPng, FakeWithoutBG, bad_png
from tests.support import image_bytes


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_crc(data: bytes) -> bytes:
    # flip one byte inside the IHDR chunk's data, leaving its CRC as it was
    return data[:20] + bytes([data[20] ^ 0xFF]) + data[21:]


def _extra_chunk_after_iend(data: bytes) -> bytes:
    body = b"tEXtk\x00v"
    return data + struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))


GOOD = _png()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(GOOD, None, id="whole-png"),
        pytest.param(b"", BodyProblem.EMPTY, id="empty"),
        pytest.param(b'{"detail": "Validation Error"}', BodyProblem.NOT_PNG, id="json"),
        pytest.param(b"<html>bad gateway</html>", BodyProblem.NOT_PNG, id="html"),
        pytest.param(GOOD[:5], BodyProblem.TRUNCATED, id="cut-in-signature"),
        pytest.param(GOOD[: len(GOOD) // 2], BodyProblem.TRUNCATED, id="cut-in-half"),
        pytest.param(GOOD[:-12], BodyProblem.TRUNCATED, id="no-iend"),
        pytest.param(GOOD[:-1], BodyProblem.TRUNCATED, id="iend-crc-cut"),
        pytest.param(_bad_crc(GOOD), BodyProblem.UNDECODABLE, id="corrupt-crc"),
        pytest.param(_extra_chunk_after_iend(GOOD), None, id="trailing-bytes-after-iend"),
    ],
)
def test_png_problem(tmp_path: Path, body: bytes, expected: BodyProblem | None) -> None:
    path = tmp_path / "answer.png"
    path.write_bytes(body)
    assert png_problem(path) == expected


@pytest.mark.parametrize(
    "filename",
    ["a.jpg", "with space.jpg", 'quote".jpg', "new\nline.jpg", "café.jpg"],
)
def test_multipart_body_is_one_file_part_with_exact_length(tmp_path: Path, filename: str) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    upload = MultipartUpload(source, filename, "image/jpeg")
    sent: list[float] = []

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in upload.stream(sent.append)])

    body = asyncio.run(collect())
    assert len(body) == upload.content_length()
    assert len(sent) == 1 and upload.sent_at == sent[0]
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {upload.content_type}\r\n\r\n".encode() + body
    )
    (part,) = message.iter_parts()
    assert part.get_param("name", header="content-disposition") == "file"
    assert part.get_payload(decode=True) == source.read_bytes()
    assert "\n" not in part.get_filename()


# --- check_answer: a 200 body is usable only when it decodes completely -----------------


def _png_of(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _header_only_png(size: tuple[int, int]) -> bytes:
    """A PNG whose IHDR claims ``size`` (RGBA, 8 bit) but whose IDAT holds almost nothing:
    decoding it would allocate 4 bytes a claimed pixel."""

    def chunk(ctype: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))

    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


SIZE = (64, 48)
CUT = AnswerKind.CUTOUT


@pytest.mark.parametrize(
    ("body", "expected_size", "kind", "problem"),
    [
        pytest.param(_png_of("RGBA", SIZE), SIZE, CUT, None, id="rgba-right-size"),
        pytest.param(_png_of("RGBA", SIZE), None, CUT, None, id="rgba-size-unknown"),
        pytest.param(bad_png("iend_only", SIZE), SIZE, CUT, BodyProblem.UNDECODABLE, id="iend-only"),
        pytest.param(bad_png("broken_idat", SIZE), SIZE, CUT, BodyProblem.UNDECODABLE, id="broken-idat"),
        pytest.param(bad_png("tiny", SIZE), SIZE, CUT, BodyProblem.WRONG_SIZE, id="1x1"),
        pytest.param(bad_png("wrong_size", SIZE), SIZE, CUT, BodyProblem.WRONG_SIZE, id="65x48"),
        pytest.param(_png_of("RGBA", (48, 64)), SIZE, CUT, BodyProblem.WRONG_SIZE, id="rotated"),
        pytest.param(bad_png("rgb", SIZE), SIZE, CUT, BodyProblem.WRONG_MODE, id="rgb-no-alpha"),
        pytest.param(_png_of("LA", SIZE), SIZE, CUT, BodyProblem.WRONG_MODE, id="la-cutout"),
        pytest.param(_png_of("P", SIZE), SIZE, CUT, BodyProblem.WRONG_MODE, id="palette"),
        pytest.param(_png_of("L", SIZE), SIZE, CUT, BodyProblem.WRONG_MODE, id="l-cutout"),
        pytest.param(b"", SIZE, CUT, BodyProblem.EMPTY, id="empty"),
        pytest.param(GOOD[:-12], (20, 10), CUT, BodyProblem.TRUNCATED, id="no-iend"),
        # the matte endpoint (not wired yet): one channel, or the alpha of LA / RGBA
        pytest.param(_png_of("L", SIZE), SIZE, AnswerKind.MATTE, None, id="matte-l"),
        pytest.param(_png_of("LA", SIZE), SIZE, AnswerKind.MATTE, None, id="matte-la"),
        pytest.param(_png_of("RGBA", SIZE), SIZE, AnswerKind.MATTE, None, id="matte-rgba"),
        pytest.param(_png_of("RGB", SIZE), SIZE, AnswerKind.MATTE, BodyProblem.WRONG_MODE, id="matte-rgb"),
        pytest.param(_png_of("L", (1, 1)), SIZE, AnswerKind.MATTE, BodyProblem.WRONG_SIZE, id="matte-1x1"),
    ],
)
def test_check_answer(
    tmp_path: Path,
    body: bytes,
    expected_size: tuple[int, int] | None,
    kind: AnswerKind,
    problem: BodyProblem | None,
) -> None:
    path = tmp_path / "answer.png"
    path.write_bytes(body)
    found = check_answer(path, expected_size, kind)
    assert (found.problem if found else None) == problem
    if found is not None and problem in (BodyProblem.WRONG_SIZE, BodyProblem.WRONG_MODE):
        assert found.detail  # says what was found and what was expected


@pytest.mark.parametrize(
    ("expected_size", "max_pixels"),
    [pytest.param(SIZE, 100_000_000, id="expected-size"), pytest.param(None, 1_000_000, id="size-unknown")],
)
def test_check_answer_refuses_a_huge_header_before_decoding(
    tmp_path: Path, expected_size: tuple[int, int] | None, max_pixels: int
) -> None:
    """A 12000×12000 header would cost 576 MB to decode: refused from the header alone."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_header_only_png((12_000, 12_000)))
    started = time.monotonic()
    found = check_answer(path, expected_size, max_pixels=max_pixels)
    assert found is not None and found.problem == BodyProblem.WRONG_SIZE
    assert "12000×12000" in (found.detail or "")
    assert time.monotonic() - started < 1.0


def test_answer_limit() -> None:
    # room for an uncompressed 16-bit RGBA PNG of the input plus 1 MiB of metadata
    assert answer_limit((64, 48)) == 1_073_447
    assert answer_limit((64, 48)) >= (8 * 64 + 1) * 48 + 1024 * 1024
    assert answer_limit((4000, 3000)) < 100_000_000
    assert answer_limit(None) == answer_limit((100_000_000, 1))


# --- the client against the fake server on loopback ----------------------------------

KEY = "test-key"


@pytest.fixture
def server() -> Iterator[FakeWithoutBG]:
    with FakeWithoutBG(api_key=KEY, rate_limit=1000, rate_period=1.0) as api:
        yield api


@dataclass
class Sent:
    outcome: Outcome
    dest: Path
    seconds: float


def send(
    api: FakeWithoutBG,
    tmp_path: Path,
    *,
    timeout: float = 5.0,
    expected_size: tuple[int, int] | None = SIZE,
    key: str = KEY,
    transport: httpx.AsyncBaseTransport | None = None,
    rekey: str | None = None,
) -> Sent:
    """One remove_background call of a 64×48 JPEG (``rekey``: set_api_key before it)."""
    source = tmp_path / "input.jpg"
    source.write_bytes(image_bytes(size=SIZE, seed=7))
    dest = tmp_path / "answer.part"

    async def run() -> Outcome:
        client = WithoutBG(api.url, SecretStr(key), timeout=timeout, transport=transport)
        if rekey is not None:
            client.set_api_key(SecretStr(rekey))
        try:
            return await client.remove_background(
                source,
                filename="a.jpg",
                image_format="JPEG",
                dest=dest,
                on_sent=lambda _: None,
                expected_size=expected_size,
            )
        finally:
            await client.aclose()

    started = time.monotonic()
    outcome = asyncio.run(run())
    return Sent(outcome, dest, time.monotonic() - started)


def credit(api: FakeWithoutBG, *, timeout: float = 5.0, key: str = KEY) -> Credit:
    async def run() -> Credit:
        client = WithoutBG(api.url, SecretStr(key), timeout=timeout)
        try:
            return await client.available_credit()
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_good_answer_is_accepted(server: FakeWithoutBG, tmp_path: Path) -> None:
    sent = send(server, tmp_path)
    assert sent.outcome == Outcome(status=200)
    with Image.open(sent.dest) as img:
        assert (img.size, img.mode) == (SIZE, "RGBA")


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        pytest.param("iend_only", BodyProblem.UNDECODABLE, id="iend-only"),
        pytest.param("broken_idat", BodyProblem.UNDECODABLE, id="broken-idat"),
        pytest.param("tiny", BodyProblem.WRONG_SIZE, id="1x1"),
        pytest.param("rgb", BodyProblem.WRONG_MODE, id="rgb-no-alpha"),
        pytest.param("wrong_size", BodyProblem.WRONG_SIZE, id="wrong-size"),
    ],
)
def test_a_png_that_is_no_usable_cutout_is_a_bad_answer(
    server: FakeWithoutBG, tmp_path: Path, kind: BadPng, problem: BodyProblem
) -> None:
    server.bad_png_next(1, kind)
    sent = send(server, tmp_path)
    assert (sent.outcome.status, sent.outcome.body_problem) == (200, problem)
    assert not sent.dest.exists()


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({}, id="content-length-announces-it"),
        pytest.param({"announce": False}, id="close-delimited"),
        pytest.param({"gzip": True}, id="gzip-bomb"),
        pytest.param({"gzip": True, "announce": False}, id="gzip-close-delimited"),
    ],
)
def test_an_answer_larger_than_the_image_allows_is_refused(
    server: FakeWithoutBG, tmp_path: Path, how: dict[str, bool]
) -> None:
    """A whole PNG of the right size followed by 16 MiB of padding (the check walks PNG
    chunks up to IEND only, so the padding alone is no PNG problem)."""
    server.huge_next(1, 16 * 1024 * 1024, **how)
    sent = send(server, tmp_path)
    assert (sent.outcome.status, sent.outcome.body_problem) == (200, BodyProblem.TOO_LARGE)
    assert str(answer_limit(SIZE)) in (sent.outcome.detail or "")
    assert not sent.dest.exists()
    assert send(server, tmp_path).outcome == Outcome(status=200)  # the connection pool is fine


def test_a_large_answer_within_the_limit_is_kept(server: FakeWithoutBG, tmp_path: Path) -> None:
    server.huge_next(1, answer_limit(SIZE), gzip=True)
    sent = send(server, tmp_path)
    assert sent.outcome == Outcome(status=200)
    assert sent.dest.stat().st_size == answer_limit(SIZE)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw", "identity"])
def test_encoded_answers_are_inflated(server: FakeWithoutBG, tmp_path: Path, encoding: str) -> None:
    png = Image.new("RGBA", SIZE, (1, 2, 3, 4))
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    raw = buf.getvalue()
    wbits = {"gzip": 31, "deflate": 15, "deflate-raw": -15, "identity": 0}[encoding]
    if wbits:
        comp = zlib.compressobj(6, zlib.DEFLATED, wbits)
        body = comp.compress(raw) + comp.flush()
    else:
        body = raw
    server.answer_next(1, body, headers={"Content-Encoding": encoding.removesuffix("-raw")})
    sent = send(server, tmp_path)
    assert sent.outcome == Outcome(status=200)
    assert sent.dest.read_bytes() == raw


def test_a_trickled_answer_ends_at_the_whole_request_deadline(server: FakeWithoutBG, tmp_path: Path) -> None:
    server.trickle_next(1, interval=0.02)  # far quicker than httpx's per-read timeout
    sent = send(server, tmp_path, timeout=0.5)
    assert sent.outcome.transport_error == TransportError.DEADLINE
    assert sent.outcome.status is None and "0.5 s" in (sent.outcome.detail or "")
    assert 0.4 < sent.seconds < 3.0
    assert not sent.dest.exists()


def test_a_trickled_credit_answer_ends_at_the_deadline(server: FakeWithoutBG) -> None:
    server.trickle_next(1, interval=0.05, credit=True)
    started = time.monotonic()
    answer = credit(server, timeout=0.5)
    assert answer.outcome is not None and answer.outcome.transport_error == TransportError.DEADLINE
    assert time.monotonic() - started < 3.0


def test_a_credit_answer_is_read_only_up_to_a_few_kilobytes(server: FakeWithoutBG) -> None:
    """Valid JSON padded with 4 MiB of spaces: parsing it would need it whole."""
    server.huge_next(1, 4 * 1024 * 1024, credit=True)
    answer = credit(server)
    assert answer.outcome is not None and answer.outcome.body_problem == BodyProblem.TOO_LARGE
    assert credit(server).credit == 1000  # the next one is fine


def test_an_error_body_is_read_only_up_to_a_few_kilobytes(server: FakeWithoutBG, tmp_path: Path) -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = comp.compress(b"x" * (16 * 1024 * 1024)) + comp.flush()  # ~16 KiB on the wire
    server.answer_next(1, bomb, status=500, content_type="text/plain", headers={"Content-Encoding": "gzip"})
    sent = send(server, tmp_path)
    assert sent.outcome.status == 500 and sent.outcome.detail == "x" * 200
    assert sent.seconds < 2.0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_carries_its_location(server: FakeWithoutBG, tmp_path: Path, status: int) -> None:
    server.redirect_next(1, status, "https://elsewhere.example/v1.0/image-without-background")
    sent = send(server, tmp_path)
    assert sent.outcome.status == status
    assert sent.outcome.location == "https://elsewhere.example/v1.0/image-without-background"
    assert len(server.records()) == 1  # not followed


def test_a_redirected_credit_check_carries_its_location(server: FakeWithoutBG) -> None:
    server.redirect_all("https://moved.example", status=308)
    answer = credit(server)
    assert answer.outcome is not None and answer.outcome.status == 308
    assert answer.outcome.location == "https://moved.example/available-credit"


SECRET = "sk-live-0123456789abcdef"


def test_an_error_body_echoing_the_key_is_redacted(tmp_path: Path) -> None:
    with FakeWithoutBG(api_key=SECRET, rate_limit=1000, rate_period=1.0) as api:
        api.echo_key_next(1, 422)
        sent = send(api, tmp_path, key=SECRET)
        api.echo_key_next(1, 401, credit=True)
        answer = credit(api, key=SECRET)
        api.redirect_all(f"https://moved.example/{SECRET}")
        moved = send(api, tmp_path, key=SECRET)
    assert sent.outcome.status == 422 and sent.outcome.detail is not None
    assert SECRET not in sent.outcome.detail and "[redacted]" in sent.outcome.detail
    assert answer.outcome is not None and answer.outcome.detail is not None
    assert SECRET not in answer.outcome.detail and "[redacted]" in answer.outcome.detail
    assert moved.outcome.location == "https://moved.example/[redacted]/v1.0/image-without-background"


def test_keys_stay_redacted_after_set_api_key(tmp_path: Path) -> None:
    new = "sk-live-fedcba9876543210"
    with FakeWithoutBG(api_key=new, rate_limit=1000, rate_period=1.0) as api:
        api.echo_key_next(1, 400)
        echoed = send(api, tmp_path, key=SECRET, rekey=new)
        # a request sent with the old key may still answer after the change
        api.answer_next(1, json.dumps({"detail": f"key {SECRET} revoked"}).encode(), status=500)
        old = send(api, tmp_path, key=SECRET, rekey=new)
    assert echoed.outcome.detail is not None and new not in echoed.outcome.detail
    assert "[redacted]" in echoed.outcome.detail
    assert old.outcome.detail == "key [redacted] revoked"


@pytest.mark.parametrize("pad", [0, 190, 195, 199, 290, 295])
def test_no_prefix_of_the_key_survives_a_cut(server: FakeWithoutBG, tmp_path: Path, pad: int) -> None:
    """Detail texts are cut short (200 characters of a body, 300 of an exception): the key
    is redacted before the cut, so no part of it is left at the edge."""
    server.answer_next(1, b"y" * pad + SECRET.encode() + b" z", status=500, content_type="text/plain")
    body = send(server, tmp_path, key=SECRET)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("e" * pad + f" key={SECRET}")

    raised = send(server, tmp_path, key=SECRET, transport=httpx.MockTransport(refuse))
    for outcome in (body.outcome, raised.outcome):
        assert outcome.detail is not None
        assert not any(SECRET[:n] in outcome.detail for n in range(4, len(SECRET) + 1))
    assert raised.outcome.transport_error == TransportError.CONNECT


@pytest.mark.parametrize("status", [413, 401, 503])
def test_an_error_whose_body_cannot_be_inflated_keeps_its_status(
    server: FakeWithoutBG, tmp_path: Path, status: int
) -> None:
    """An error body in an encoding the client does not inflate (br) is not read, but the
    status still decides: a 413 quarantines, a 401 pauses, a 503 retries (before, every
    such answer became a service-wide connection error)."""
    server.answer_next(
        1,
        b"\x1b\x07\x00\xf8\xa5\x40",
        status=status,
        content_type="application/json",
        headers={"Content-Encoding": "br"},
    )
    outcome = send(server, tmp_path).outcome
    assert outcome.status == status and outcome.transport_error is None


def test_a_credit_answer_echoing_the_key_stores_no_key(server: FakeWithoutBG) -> None:
    """Issue 9 item 10: whatever a credit answer says is kept (the queue database) and
    shown (status): the key is redacted from it too."""
    body = json.dumps({"credit": 5, "expiration_date": f"2027-01-01 for {KEY}"}).encode()
    server.answer_next(1, body, content_type="application/json", credit=True)
    got = credit(server)
    assert got.credit == 5 and got.expiration_date is not None and KEY not in got.expiration_date
    assert "[redacted]" in got.expiration_date

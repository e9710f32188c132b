"""The client's pure-ish parts: is a 200 body one whole PNG? is the upload framed right?"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest
from PIL import Image

from dropcut.client import MultipartUpload, png_problem
from dropcut.judge import BodyProblem


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

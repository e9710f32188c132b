"""Decoding an image with a budget: does this file decode completely, as the format its
content announces, within a time and a memory budget?

The check behind local refusals (:mod:`dropcut.inspect` calls :func:`check_decodes` on
each spooled file): a file that would be refused by the API (415, 422) never costs a
request. Every check is bounded:

* in pixels: more than ``max_pixels`` is refused from the header, before any decode;
* in time: Pillow's decoders are fed from Python a block at a time, through a reader that
  stops the decode once ``timeout`` seconds have passed (``decode_too_slow``); a JPEG of
  more than :data:`MAX_JPEG_SCANS` scans is refused before it is decoded
  (``too_many_scans``);
* in memory: an image whose decode would hold more than ``max_decode_bytes`` is checked
  by reading its complete stream instead (a PNG's zlib stream inflated piece by piece,
  its length and row filters checked; a multi-scan JPEG's markers to EOI; the strips,
  chunks or blocks of TIFF, WebP, GIF and BMP).

Pillow has no way to decode in strips or to count a JPEG's scans, so those stream checks
are written here (standard library only: zlib, struct).
"""

from __future__ import annotations

import os
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_DECODE_TIMEOUT_SECONDS",
    "DEFAULT_MAX_DECODE_BYTES",
    "MAX_JPEG_SCANS",
    "SUPPORTED_FORMATS",
    "Budget",
    "DecodeFailure",
    "RefusalCode",
    "check_decodes",
]

SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
"""What the API accepts, as returned by :func:`sniff_format` and in ``Inspected.format``."""

# Pillow format names that belong to each sniffed family (a multi-picture JPEG opens as MPO).
_PILLOW_FAMILY: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"JPEG", "MPO"}),
    "PNG": frozenset({"PNG"}),
    "WEBP": frozenset({"WEBP"}),
    "TIFF": frozenset({"TIFF"}),
    "BMP": frozenset({"BMP"}),
    "GIF": frozenset({"GIF"}),
}

DEFAULT_DECODE_TIMEOUT_SECONDS = 10.0
"""Default budget (seconds of wall time) for the decode check of one file."""

DEFAULT_MAX_DECODE_BYTES = 32 * 1024 * 1024
"""Default cap (bytes) on what a decode check may hold: decoded pixels (Pillow keeps 4
bytes a pixel for RGB, 1 for greyscale and palette images) or, for a multi-scan JPEG,
libjpeg's whole-image coefficient buffer (128 bytes an 8x8 block).  Bigger images get a
check of their complete stream that holds a bounded amount instead."""

MAX_JPEG_SCANS = 500
"""More scans than this and a JPEG is refused (``too_many_scans``): encoders write about
10 (libjpeg's and mozjpeg's progressive scripts); each scan costs a pass over every block
(libjpeg-turbo's own fuzzers stop at 500)."""

_JPEG_PROGRESSIVE_FEED = 4096  # bytes fed to libjpeg at a time: ~0.5 s of the costliest scans
_INFLATE_STEP = 1 << 20  # PNG stream check: at most this much inflated data at a time
_CHUNK = 1 << 20  # stream checks read the file this much at a time


class RefusalCode(StrEnum):
    EMPTY = "empty"
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    DECODE_TOO_SLOW = "decode_too_slow"
    TOO_MANY_SCANS = "too_many_scans"


@dataclass(frozen=True, slots=True)
class Budget:
    """How much one decode check may cost: ``timeout`` seconds of wall time, and about
    ``max_decode_bytes`` bytes of decoded data."""

    timeout: float = DEFAULT_DECODE_TIMEOUT_SECONDS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES


class _DecodeTimeout(Exception):
    """The decode budget ran out (raised from :class:`BudgetedReader` into Pillow)."""


class BudgetedReader:
    """A read-only file that raises :class:`_DecodeTimeout` once ``deadline`` (monotonic
    seconds) has passed: Pillow's decoders are fed from Python a block at a time
    (``ImageFile.load``), so a slow decode stops at its next block.  One decoder call
    (libwebp, libtiff given the fd) is not interrupted: their cost is bounded by the
    pixel count, which ``max_pixels`` bounds."""

    def __init__(self, fp: BinaryIO, deadline: float) -> None:
        self._fp = fp
        self.deadline = deadline

    def check(self) -> None:
        if time.monotonic() >= self.deadline:
            raise _DecodeTimeout

    def read(self, size: int = -1) -> bytes:
        self.check()
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def fileno(self) -> int:
        return self._fp.fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """Why a file does not decode: the HTTP status the API would answer, a code, a line."""

    status: int
    code: RefusalCode
    detail: str


def _corrupt(fmt: str, message: str) -> DecodeFailure:
    return DecodeFailure(422, RefusalCode.CORRUPT_IMAGE, f"cannot decode as {fmt}: {message}")


def _decoded_bytes(mode: str, width: int, height: int) -> int:
    """What Pillow allocates for a decoded image: 1 byte a pixel for "1", "L", "P",
    2 for "I;16*", 4 for every other mode (RGB is stored as 4 bytes a pixel)."""
    if mode in ("1", "L", "P"):
        per_pixel = 1
    elif mode.startswith("I;16"):
        per_pixel = 2
    else:
        per_pixel = 4
    return width * height * per_pixel


def _jpeg_coefficient_bytes(layers: Sequence[tuple[int, int, int, int]], width: int, height: int) -> int:
    """libjpeg's whole-image coefficient buffer for a multi-scan JPEG of ``layers``
    (Pillow's ``(id, h_samp, v_samp, quant table)`` per component): 64 coefficients of 2
    bytes for every 8x8 block of every component."""
    if not layers:
        return 0
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    blocks = 0
    for _, h_samp, v_samp, _ in layers:
        comp_w = -(-width * h_samp // h_max)
        comp_h = -(-height * v_samp // v_max)
        blocks += -(-comp_w // 8) * -(-comp_h // 8)
    return blocks * 128


def check_decodes(
    path: Path,
    fmt: str,
    max_pixels: int | None = None,
    *,
    timeout: float = DEFAULT_DECODE_TIMEOUT_SECONDS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> tuple[int, int] | DecodeFailure:
    """(width, height) if ``path`` decodes completely as the sniffed family ``fmt``.

    An image of more than ``max_pixels`` is refused from its header, before any pixel is
    decoded: checking it would need up to 4 bytes a pixel (JPEG aside, which is decoded at
    1/8 scale), and the cut-out the API returns has the input's resolution.

    The check takes at most ``timeout`` seconds (else ``decode_too_slow``) and holds at
    most about ``max_decode_bytes`` of decoded data: a bigger PNG has its zlib stream
    inflated piece by piece and its length and row filters checked; a bigger multi-scan
    JPEG, GIF, WebP, TIFF or BMP has its container checked to the end (every segment,
    block or strip present), without decoding pixels."""
    deadline = time.monotonic() + timeout
    try:
        # A DecompressionBombWarning must not become an error (e.g. under -W error): only
        # Pillow's DecompressionBombError (twice the warning limit) refuses the image.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with path.open("rb") as raw:
                fp = BudgetedReader(raw, deadline)
                with Image.open(fp, formats=SUPPORTED_FORMATS) as img:  # type: ignore[arg-type]
                    family = _PILLOW_FAMILY[fmt]
                    if img.format not in family:
                        return DecodeFailure(
                            415,
                            RefusalCode.UNSUPPORTED_FORMAT,
                            f"content starts like {fmt} but decodes as {img.format}",
                        )
                    width, height = img.size
                    if max_pixels is not None and width * height > max_pixels:
                        return DecodeFailure(
                            422,
                            RefusalCode.TOO_MANY_PIXELS,
                            f"{width}x{height} is {width * height} pixels, "
                            f"over the limit of {max_pixels} (max_pixels)",
                        )
                    failure = _check_pixels(img, fp, fmt, max_decode_bytes)
                    if failure is not None:
                        return failure
    except _DecodeTimeout:
        return DecodeFailure(
            422,
            RefusalCode.DECODE_TOO_SLOW,
            f"decoding as {fmt} did not finish within the budget of {timeout:g} s (decode_timeout_seconds)",
        )
    except Image.DecompressionBombError as err:
        return DecodeFailure(422, RefusalCode.TOO_MANY_PIXELS, str(err))
    except UnidentifiedImageError:  # its message names our spool temp file
        return _corrupt(fmt, "Pillow cannot identify it")
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        return _corrupt(fmt, str(err) or type(err).__name__)
    return width, height


def _check_pixels(
    img: Image.Image, fp: BudgetedReader, fmt: str, max_decode_bytes: int
) -> DecodeFailure | None:
    """Decode ``img`` (opened from ``fp``) with Pillow if that holds at most
    ``max_decode_bytes``, else check its complete stream in bounded memory."""
    width, height = img.size
    if fmt == "JPEG":
        layers: list[tuple[int, int, int, int]] = getattr(img, "layer", [])
        progressive = bool(img.info.get("progressive"))
        coefficients = _jpeg_coefficient_bytes(layers, width, height)
        if progressive or coefficients > max_decode_bytes:
            scans = _jpeg_scans(fp)
            if isinstance(scans, DecodeFailure):
                return scans
            if scans > MAX_JPEG_SCANS:
                return DecodeFailure(
                    422,
                    RefusalCode.TOO_MANY_SCANS,
                    f"the JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS} "
                    "(each costs a pass over the whole image)",
                )
            if scans > 1 and coefficients > max_decode_bytes:
                return None  # complete to its EOI; decoding would hold every coefficient
        if progressive:
            # Many small scans cost a pass over every block each: feed libjpeg little at
            # a time so that the budget is checked often.
            img.decodermaxblock = _JPEG_PROGRESSIVE_FEED  # type: ignore[attr-defined]
        # Decode at 1/8 scale (1/64 of the memory); libjpeg still parses the whole
        # entropy-coded stream, so truncation is still detected.
        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    elif _decoded_bytes(img.mode, width, height) > max_decode_bytes:
        return _check_stream(img, fp, fmt)
    img.load()  # the first frame is enough for animations and multi-page TIFF
    return None


def _check_stream(img: Image.Image, fp: BudgetedReader, fmt: str) -> DecodeFailure | None:
    """The bounded-memory check of an image too big to decode (see :func:`_decode`)."""
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    fp.seek(0)
    if fmt == "PNG":
        return _check_png_stream(fp, size)
    if fmt == "TIFF":
        return _check_tiff_strips(img, size)
    if fmt == "WEBP":
        return _check_riff(fp, size)
    if fmt == "GIF":
        return _check_gif_blocks(fp, size)
    return _check_bmp_size(img, size)


# --- JPEG: markers -----------------------------------------------------------------------

_RST_AND_STUFFING = frozenset([0x00, *range(0xD0, 0xD8)])


def _jpeg_scans(fp: BudgetedReader) -> int | DecodeFailure:
    """The number of scans (SOS segments) of the first image in ``fp``, walking every
    segment and entropy-coded stretch up to its EOI; a failure if the stream ends early
    (a truncated file) or is malformed.  Reads the file in 1 MiB pieces."""
    fp.seek(0)
    data = b""
    pos = 0
    eof = False

    def more(need: int) -> bool:
        nonlocal data, pos, eof
        while len(data) - pos < need and not eof:
            piece = fp.read(_CHUNK)  # checks the budget
            eof = not piece
            data = data[pos:] + piece
            pos = 0
        return len(data) - pos >= need

    if not more(2) or data[:2] != b"\xff\xd8":
        return _corrupt("JPEG", "no SOI marker")
    pos = 2
    scans = 0
    while True:
        # a marker: 0xFF, any number of 0xFF fill bytes, the code
        if not more(2):
            return _corrupt("JPEG", f"truncated: the stream ends after {scans} scans, before EOI")
        if data[pos] != 0xFF:
            nxt = data.find(b"\xff", pos)  # extraneous bytes before a marker (libjpeg warns)
            pos = len(data) if nxt < 0 else nxt
            continue
        code = data[pos + 1]
        if code == 0xFF:
            pos += 1
            continue
        pos += 2
        if code == 0xD9:
            return scans
        if code in _RST_AND_STUFFING or code == 0x01:
            continue  # no length
        if not more(2):
            continue  # reported as truncated above
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return _corrupt("JPEG", f"segment 0xFF{code:02X} of length {length}")
        if not more(length):
            return _corrupt("JPEG", f"truncated: segment 0xFF{code:02X} ends past the file's end")
        pos += length
        if code != 0xDA:
            continue
        scans += 1
        # the entropy-coded data runs to the next marker other than RSTn and stuffing
        while True:
            nxt = data.find(b"\xff", pos)
            if nxt < 0 or nxt + 1 >= len(data):
                keep = 0 if nxt < 0 else len(data) - nxt
                pos = len(data) - keep
                if not more(keep + 1):
                    return _corrupt("JPEG", f"truncated: the stream ends in scan {scans}, before EOI")
                continue
            if data[nxt + 1] in _RST_AND_STUFFING:
                pos = nxt + 2
                continue
            pos = nxt
            break


# --- PNG: the zlib stream -------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(width: int, height: int, bits: int, color_type: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (a filter byte a row) a PNG's IDAT must inflate to."""
    pixel_bits = bits * _PNG_CHANNELS[color_type]
    if not interlaced:
        return height * (1 + (width * pixel_bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        pass_w = (width - x0 + dx - 1) // dx if width > x0 else 0
        pass_h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if pass_w and pass_h:
            total += pass_h * (1 + (pass_w * pixel_bits + 7) // 8)
    return total


def _png_chunks(fp: BudgetedReader, size: int) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk up to IEND, critical chunks' CRCs checked; raises
    ValueError for a truncated or malformed chunk."""
    fp.seek(8)
    pos = 8
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise ValueError("truncated: the stream ends before IEND")
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if length > size - pos - 12:
            raise ValueError(f"truncated: chunk {kind!r} ends past the file's end")
        body = fp.read(length)
        crc = fp.read(4)
        if len(body) < length or len(crc) < 4:
            raise ValueError(f"truncated: chunk {kind!r} ends past the file's end")
        if kind[:1].isupper() and kind != b"IDAT" and zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
            raise ValueError(f"bad CRC in chunk {kind!r}")
        pos += 12 + length
        yield kind, body
        if kind == b"IEND":
            return


def _check_png_stream(fp: BudgetedReader, size: int) -> DecodeFailure | None:
    """Inflate the IDAT stream in steps of at most ``_INFLATE_STEP`` bytes, checking
    that it ends exactly at the size the header implies and that every row's filter type
    is 0-4 (what a full decode would find, without holding the pixels)."""
    try:
        chunks = _png_chunks(fp, size)
        kind, ihdr = next(chunks)
        if kind != b"IHDR" or len(ihdr) != 13:
            return _corrupt("PNG", "the first chunk is not IHDR")
        width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
        bits, color_type, interlaced = ihdr[8], ihdr[9], ihdr[12] == 1
        if color_type not in _PNG_CHANNELS:
            return _corrupt("PNG", f"unknown colour type {color_type}")
        expected = _png_raw_size(width, height, bits, color_type, interlaced)
        row = 1 + (width * bits * _PNG_CHANNELS[color_type] + 7) // 8
        inflater = zlib.decompressobj()
        total = 0
        seen_idat = False
        for kind, body in chunks:
            if kind != b"IDAT":
                if seen_idat and not inflater.eof and kind != b"IEND":
                    continue  # ancillary chunks between IDATs are tolerated
                continue
            seen_idat = True
            pending = body
            while pending and not inflater.eof:
                fp.check()
                out = inflater.decompress(pending, _INFLATE_STEP)
                pending = inflater.unconsumed_tail
                if total + len(out) > expected:
                    return _corrupt("PNG", f"the image data inflates to more than {expected} bytes")
                if not interlaced:
                    first = (-total) % row
                    if out[first::row] and max(out[first::row]) > 4:
                        return _corrupt("PNG", "a row has an unknown filter type")
                total += len(out)
        if not seen_idat:
            return _corrupt("PNG", "no IDAT chunk")
        if not inflater.eof or total != expected:
            return _corrupt("PNG", f"truncated: the image data is {total} of {expected} bytes")
    except zlib.error as err:
        return _corrupt("PNG", f"bad zlib stream: {err}")
    except (ValueError, StopIteration) as err:
        return _corrupt("PNG", str(err) or "no chunks")
    return None


# --- TIFF, WebP, GIF, BMP: the container -------------------------------------------------------


def _check_tiff_strips(img: Image.Image, size: int) -> DecodeFailure | None:
    """Every strip or tile of the first page lies within the file."""
    tags = getattr(img, "tag_v2", {})
    offsets = tags.get(273) or tags.get(324)  # StripOffsets / TileOffsets
    counts = tags.get(279) or tags.get(325)  # StripByteCounts / TileByteCounts
    if not offsets or not counts:
        return _corrupt("TIFF", "no strip or tile offsets")
    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
    counts = counts if isinstance(counts, tuple) else (counts,)
    if len(offsets) != len(counts):
        return _corrupt("TIFF", "strip offsets and byte counts differ in number")
    for offset, count in zip(offsets, counts, strict=True):
        if offset + count > size:
            return _corrupt("TIFF", "truncated: a strip ends past the file's end")
    return None


def _check_riff(fp: BudgetedReader, size: int) -> DecodeFailure | None:
    """The RIFF size matches the file and its chunks (one of them image data) fit."""
    head = fp.read(12)
    riff_size = int.from_bytes(head[4:8], "little")
    if riff_size + 8 > size:
        return _corrupt("WEBP", f"truncated: RIFF says {riff_size + 8} bytes, the file has {size}")
    pos, end, image = 12, riff_size + 8, False
    while pos + 8 <= end:
        fp.seek(pos)
        chunk = fp.read(8)
        length = int.from_bytes(chunk[4:8], "little")
        image = image or chunk[:4] in (b"VP8 ", b"VP8L", b"ANMF")
        pos += 8 + length + (length & 1)
    if pos > end + 1 or not image:
        return _corrupt("WEBP", "truncated: a chunk ends past the file's end" if image else "no image data")
    return None


def _check_gif_blocks(fp: BudgetedReader, size: int) -> DecodeFailure | None:
    """Every block and data sub-block, through the first image to a trailer or the next
    image, lies within the file."""
    data = fp.read(size)  # at most max_file_bytes
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        fp.check()
        kind = data[pos]
        if kind == 0x3B:  # trailer
            return None
        if kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif kind == 0x2C:  # image: descriptor, local colour table, LZW code size
            if pos + 10 > len(data):
                break
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        else:
            return _corrupt("GIF", f"unknown block 0x{kind:02X}")
        while pos < len(data) and data[pos]:
            pos += 1 + data[pos]
        pos += 1
        if kind == 0x2C and pos <= len(data):
            return None  # the first image is complete: what a decode of frame 1 reads
    return _corrupt("GIF", "truncated: the stream ends inside a block")


def _check_bmp_size(img: Image.Image, size: int) -> DecodeFailure | None:
    """The file holds the pixel rows its header announces (uncompressed BMP: Pillow's
    ``raw`` tile gives the offset and row stride; RLE: the data starts in the file)."""
    tiles = getattr(img, "tile", None)
    if not tiles:
        return _corrupt("BMP", "no pixel data")
    codec, _, offset, args = tiles[0]
    if offset >= size:
        return _corrupt("BMP", "truncated: the pixel data starts past the file's end")
    raw = codec == "raw" and isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int)
    if raw and offset + abs(args[1]) * img.size[1] > size:
        return _corrupt("BMP", f"truncated: {size} bytes hold fewer than {img.size[1]} rows")
    return None

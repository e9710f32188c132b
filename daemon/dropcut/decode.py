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

HEIF/HEIC (through pillow-heif) and AVIF (Pillow's own plugin) are decoded by libheif and
libavif in one call each: neither the time budget nor ``max_decode_bytes`` can stop it
half-way.  What bounds them is the pixel count, read from the header (the ``ispe``
property) and refused over ``max_pixels`` before the decode: at most about 4.5 bytes a
pixel (8-bit RGB out, 4:2:0 YUV planes inside libheif), i.e. ~450 MB for 100 MP.

Since issue 10 this module also owns *decoding for people*: a file -> the image a person
sees (see "Decoding for people" below): :func:`make_proxy` (the <= 1024 px upright sRGB
proxy sent to ``/v1.0/alpha-channel``) and :func:`load_full` (the full-resolution image
the renderer cuts out), with camera raw detection (:func:`camera_raw_kind`) and frame
counting (:func:`check_image`) for inspection.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from PIL import Image, ImageCms, TiffImagePlugin, UnidentifiedImageError

if TYPE_CHECKING:  # numpy is imported where it is used: the daemon and the inspection
    import numpy as np  # workers, which import this module for the check, never need it
    import numpy.typing as npt

__all__ = [
    "API_FORMATS",
    "DEFAULT_DECODE_TIMEOUT_SECONDS",
    "DEFAULT_MAX_DECODE_BYTES",
    "MAX_JPEG_SCANS",
    "SUPPORTED_FORMATS",
    "Budget",
    "Checked",
    "DecodeError",
    "DecodeFailure",
    "FullImage",
    "MultiFrame",
    "Proxy",
    "RefusalCode",
    "camera_raw_kind",
    "camera_raw_signature",
    "check_decodes",
    "check_image",
    "fit_within",
    "load_full",
    "make_proxy",
    "register_openers",
    "tiff_raw_kind",
]

API_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
"""What the API itself accepts (``api_mode = "cutout"`` uploads the file as it is)."""

SUPPORTED_FORMATS: tuple[str, ...] = (*API_FORMATS, "HEIF", "AVIF")
"""What dropcut decodes, as returned by :func:`dropcut.inspect.sniff_format` and in
``Inspected.format``: the API's formats, and HEIF/HEIC (pillow-heif) and AVIF (Pillow),
which only ``api_mode = "matte"`` can send (as a JPEG/PNG proxy)."""

# Pillow format names that belong to each sniffed family (a multi-picture JPEG opens as MPO).
_PILLOW_FAMILY: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"JPEG", "MPO"}),
    "PNG": frozenset({"PNG"}),
    "WEBP": frozenset({"WEBP"}),
    "TIFF": frozenset({"TIFF"}),
    "BMP": frozenset({"BMP"}),
    "GIF": frozenset({"GIF"}),
    "HEIF": frozenset({"HEIF"}),
    "AVIF": frozenset({"AVIF"}),
}
_PILLOW_FORMATS: tuple[str, ...] = SUPPORTED_FORMATS  # (Pillow opens MPO through its JPEG opener)

MultiFrame = Literal["first", "quarantine"]
"""What inspection does with a multi-frame file (multi-page TIFF, animated GIF, WebP, PNG
or AVIF): ``"first"`` admits it and the first frame is used (``Inspected.frames`` says how
many there are); ``"quarantine"`` refuses it (422 ``multi_frame``)."""

# Formats whose extra frames are not frames of an animation or pages but alternatives of
# one picture: MPO (CIPA DC-007: the first image is the primary one, what a plain JPEG
# decoder shows), HEIF (pillow-heif opens the primary item: thumbnails, depth maps and
# bursts are other items).  Their primary image is used silently.
_PRIMARY_ONLY = frozenset({"MPO", "HEIF"})

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
    CAMERA_RAW = "camera_raw"
    MULTI_FRAME = "multi_frame"


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


@dataclass(frozen=True, slots=True)
class Checked:
    """A file that decodes: its stored size in pixels (EXIF orientation not applied), the
    format Pillow opened it as (e.g. "MPO" for a sniffed JPEG) and its number of frames
    (pages of a TIFF, frames of an animation; 1 for MPO and HEIF, whose primary image is
    used)."""

    width: int
    height: int
    format: str
    frames: int = 1


def check_decodes(
    path: Path,
    fmt: str,
    max_pixels: int | None = None,
    *,
    timeout: float = DEFAULT_DECODE_TIMEOUT_SECONDS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> tuple[int, int] | DecodeFailure:
    """(width, height) if ``path`` decodes completely as the sniffed family ``fmt``: see
    :func:`check_image`, of which this is the older, smaller answer."""
    checked = check_image(path, fmt, max_pixels, timeout=timeout, max_decode_bytes=max_decode_bytes)
    if isinstance(checked, DecodeFailure):
        return checked
    return checked.width, checked.height


def check_image(
    path: Path,
    fmt: str,
    max_pixels: int | None = None,
    *,
    timeout: float = DEFAULT_DECODE_TIMEOUT_SECONDS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> Checked | DecodeFailure:
    """A :class:`Checked` if ``path`` decodes completely as the sniffed family ``fmt``
    (one of :data:`SUPPORTED_FORMATS`), else why not.

    An image of more than ``max_pixels`` is refused from its header, before any pixel is
    decoded: checking it would need up to 4 bytes a pixel (JPEG aside, which is decoded at
    1/8 scale), and the cut-out the API returns has the input's resolution.

    The check takes at most ``timeout`` seconds (else ``decode_too_slow``) and holds at
    most about ``max_decode_bytes`` of decoded data: a bigger PNG has its zlib stream
    inflated piece by piece and its length and row filters checked; a bigger multi-scan
    JPEG, GIF, WebP, TIFF or BMP has its container checked to the end (every segment,
    block or strip present), without decoding pixels.  HEIF and AVIF are decoded in one
    libheif/libavif call whatever their size: the pixel cap is their bound (see the
    module's docstring).  The frames are counted after the first one decoded (reading
    TIFF IFDs and GIF blocks, within the same time budget)."""
    if fmt == "HEIF":  # (libheif only where needed: the inspection workers stay small)
        register_openers()
    deadline = time.monotonic() + timeout
    try:
        # A DecompressionBombWarning must not become an error (e.g. under -W error): only
        # Pillow's DecompressionBombError (twice the warning limit) refuses the image.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with path.open("rb") as raw:
                fp = BudgetedReader(raw, deadline)
                with Image.open(fp, formats=_PILLOW_FORMATS) as img:  # type: ignore[arg-type]
                    family = _PILLOW_FAMILY[fmt]
                    if img.format not in family:
                        return DecodeFailure(
                            415,
                            RefusalCode.UNSUPPORTED_FORMAT,
                            f"content starts like {fmt} but decodes as {img.format}",
                        )
                    width, height = img.size
                    if max_pixels is not None and width * height > max_pixels:
                        return _too_many_pixels(width, height, max_pixels)
                    failure = _check_pixels(img, fp, fmt, max_decode_bytes)
                    if failure is not None:
                        return failure
                    pillow_format = str(img.format)
                    frames = 1 if pillow_format in _PRIMARY_ONLY else int(getattr(img, "n_frames", 1))
    except _DecodeTimeout:
        return _too_slow(fmt, timeout)
    except Image.DecompressionBombError as err:
        return DecodeFailure(422, RefusalCode.TOO_MANY_PIXELS, str(err))
    except UnidentifiedImageError:  # its message names our spool temp file
        return _corrupt(fmt, "Pillow cannot identify it")
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        return _corrupt(fmt, str(err) or type(err).__name__)
    return Checked(width, height, pillow_format, max(1, frames))


def _too_many_pixels(width: int, height: int, max_pixels: int) -> DecodeFailure:
    return DecodeFailure(
        422,
        RefusalCode.TOO_MANY_PIXELS,
        f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels} (max_pixels)",
    )


def _too_slow(fmt: str, timeout: float) -> DecodeFailure:
    return DecodeFailure(
        422,
        RefusalCode.DECODE_TOO_SLOW,
        f"decoding as {fmt} did not finish within the budget of {timeout:g} s (decode_timeout_seconds)",
    )


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
    elif fmt in ("HEIF", "AVIF"):
        pass  # one libheif / libavif call: bounded by max_pixels only (module docstring)
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


def _png_passes(
    width: int, height: int, bits: int, color_type: int, interlaced: bool
) -> list[tuple[int, int, int]]:
    """Where the rows of a PNG's inflated image data lie: ``(start, row_bytes, rows)`` for
    the image (or each of the seven Adam7 passes, in order), a row being its filter byte
    and its pixels (PNG spec, sections 8.2 and 9.1)."""
    pixel_bits = bits * _PNG_CHANNELS[color_type]
    shapes = [(width, height)]
    if interlaced:
        shapes = [
            (
                (width - x0 + dx - 1) // dx if width > x0 else 0,
                (height - y0 + dy - 1) // dy if height > y0 else 0,
            )
            for x0, y0, dx, dy in _ADAM7
        ]
    passes, start = [], 0
    for pass_w, pass_h in shapes:
        if pass_w and pass_h:
            row = 1 + (pass_w * pixel_bits + 7) // 8
            passes.append((start, row, pass_h))
            start += row * pass_h
    return passes


def _bad_filter(data: bytes, offset: int, passes: list[tuple[int, int, int]]) -> bool:
    """Does ``data``, the inflated image data from ``offset`` on, hold a filter byte (the
    first byte of a row, see :func:`_png_passes`) that is not a filter type 0-4?"""
    end = offset + len(data)
    for start, row, rows in passes:
        stop = start + row * rows
        if stop <= offset or start >= end:
            continue
        first = start + max(0, -(-(offset - start) // row)) * row  # the first row start >= offset
        filters = data[first - offset : min(stop, end) - offset : row]
        if filters and max(filters) > 4:
            return True
    return False


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
        passes = _png_passes(width, height, bits, color_type, interlaced)
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
                if _bad_filter(out, total, passes):
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


# =========================================================================================
# Decoding for people: a file -> the image a person sees
# =========================================================================================
#
# What is Pillow's / ImageCms's / pillow-heif's / numpy's and what is written here:
# * opening every format, EXIF parsing and writing, ICC transforms (LittleCMS), scaled JPEG
#   decoding (draft), reduce + LANCZOS resampling, transposes: the libraries;
# * the EXIF Orientation -> transpose table (the same as ``ImageOps.exif_transpose``'s, kept
#   here because the transpose must come after the colour conversion, on a new image that
#   no longer carries the EXIF, so that only one extra copy is alive at a time);
# * 16-bit colour: Pillow 13 has no 16-bit RGB mode and decodes 48/64-bit RGB(A) PNG and
#   TIFF to 8 bits by keeping each sample's *high byte*.  We decode such a file twice with
#   Pillow's own decoder, once with the byte order of the raw mode swapped (which yields the
#   low bytes), and join the halves with numpy (:func:`_decode_16bit_colour`);
# * mapping a 16-bit / 32-bit / float image to 8 bits by its range (:func:`range_to_8bit`);
# * camera raw recognition: file signatures and three TIFF tags (Pillow reads the IFD).

_SRGB_ICC: bytes | None = None

# EXIF 2.32, tag 274 (Orientation): how the stored rows and columns are to be shown.
# 1 top-left (as stored), 2 mirrored, 3 rotated 180, 4 flipped, 5 transposed,
# 6 rotated 90 CW to view, 7 transversed, 8 rotated 90 CCW to view.
ORIENTATION_TAG = 274
ORIENTATION_TRANSPOSE: Mapping[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF Orientation (EXIF 2.32, tag 274) -> the Pillow transpose that makes the image
upright; 1 and unknown values are absent (nothing to do).  Same table as
``PIL.ImageOps.exif_transpose``."""

_GPS_IFD_TAG = 0x8825  # EXIF 2.32: GPSInfo IFD pointer
_EXIF_IFD_TAG = 0x8769  # EXIF 2.32: Exif IFD pointer
# TIFF 6.0 IFD0 tags that describe the picture (not its storage) and may go into an
# output's EXIF when the source is a TIFF (whose IFD0 is its storage).
_TIFF_DESCRIPTIVE_TAGS = (270, 271, 272, 305, 306, 315, 33432)  # description, make, model,
# software, date/time, artist, copyright

NEW_SUBFILE_TYPE_TAG = 254  # TIFF 6.0: NewSubfileType; bit 0 = reduced-resolution image
DNG_VERSION_TAG = 50706  # DNG 1.6 specification: DNGVersion
_PHOTOMETRIC_TAG = 262
_COMPRESSION_TAG = 259
_RAW_PHOTOMETRIC = {32803: "colour filter array (CFA) sensor data", 34892: "linear raw sensor data"}
# Compression codes used only by camera raw formats (ExifTool's TIFF Compression table).
_RAW_COMPRESSION = {
    32767: "Sony ARW",
    32769: "packed raw (Epson ERF)",
    32770: "Samsung SRW",
    34713: "Nikon NEF",
    34892: "lossy DNG",
    65000: "Kodak DCR",
    65535: "Pentax PEF",
}


class DecodeError(ValueError):
    """A file cannot be turned into an image: ``status`` is what the API would answer
    (415 for camera raw, 422 otherwise), ``code`` a :class:`RefusalCode`, ``detail`` a
    sentence for the user."""

    def __init__(self, failure: DecodeFailure) -> None:
        super().__init__(failure.detail)
        self.failure = failure
        self.status = failure.status
        self.code = failure.code
        self.detail = failure.detail

    def __reduce__(self) -> tuple[type[DecodeError], tuple[DecodeFailure]]:
        # raised in a worker process, it crosses back to the daemon pickled
        return (DecodeError, (self.failure,))


PROXY_JPEG_QUALITY = 90
"""The proxy's JPEG quality (the issue asks for at least 90)."""


@dataclass(frozen=True)
class Proxy:
    """The proxy :func:`make_proxy` wrote: ``size`` (width, height) in pixels, upright;
    ``format`` "JPEG" or "PNG" (PNG only when the image has transparency); ``bytes`` the
    file's length."""

    size: tuple[int, int]
    format: str
    bytes: int


@dataclass(frozen=True)
class FullImage:
    """The full-resolution image for the renderer (see :func:`load_full`).

    ``image``: mode "RGB", or "RGBA" when the original has its own transparency (some alpha
    below 255); 8 bits a channel; upright; size (W, H) = the original's displayed size.
    ``icc_profile``: the profile the pixels are in (the original's for an RGB original, else
    sRGB's); None for untagged RGB (sRGB by convention).  Attach it to the output.
    ``exif``: the original's EXIF with Orientation=1 and, with ``strip_gps``, without its
    GPS IFD, as ``Image.Exif.tobytes()`` gives it (for ``save(exif=...)``); None if it had
    none."""

    image: Image.Image
    icc_profile: bytes | None
    exif: bytes | None


def register_openers() -> None:
    """Make Pillow open HEIF/HEIC (pillow-heif's plugin; thumbnails not loaded).  AVIF
    is Pillow's own (Pillow >= 11.2).  Idempotent and cheap: called by every function here
    that opens files, so the daemon and its inspection worker processes (forkserver: a
    fresh interpreter) register on first use; importing this module registers nothing."""
    if "HEIF" in Image.ID:  # (Pillow's own registry: registered already)
        return
    from pillow_heif import register_heif_opener

    register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


def srgb_icc() -> bytes:
    """The bytes of LittleCMS's built-in sRGB profile (ICC v4, 588 bytes)."""
    global _SRGB_ICC
    if _SRGB_ICC is None:
        _SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _SRGB_ICC


# --- pure helpers ----------------------------------------------------------------------------


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` (width, height) scaled so that its long side is at most ``max_side``,
    aspect kept (each side rounded, at least 1); never upscaled."""
    width, height = size
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    scale = max_side / long_side
    return max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale)))


def camera_raw_signature(head: bytes) -> str | None:
    """The camera raw format the leading bytes announce (a name for the user), or None.

    Signatures (from the formats' own documentation as collected by ExifTool): Canon CR2
    (TIFF with ``CR\\x02`` at offset 8), CR3 (ISO media ``ftyp crx``), CRW (``HEAPCCDR``
    at 6); Olympus ORF (``IIRO``, ``IIRS``, ``MMOR``); Panasonic RW2 (``IIU\\0``);
    Fujifilm RAF (``FUJIFILMCCD-RAW``); Sigma X3F (``FOVb``); Minolta MRW (``\\0MRM``)."""
    if head[:4] == b"II*\x00" and head[8:10] == b"CR":
        return "Canon CR2"
    if head[4:8] == b"ftyp" and head[8:11] == b"crx":
        return "Canon CR3"
    if head[:2] == b"II" and head[6:14] == b"HEAPCCDR":
        return "Canon CRW"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return "Olympus ORF"
    if head[:4] == b"IIU\x00":
        return "Panasonic RW2"
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "Fujifilm RAF"
    if head[:4] == b"FOVb":
        return "Sigma X3F"
    if head[:4] == b"\x00MRM":
        return "Minolta MRW"
    return None


def tiff_raw_kind(tags: Mapping[int, Any]) -> str | None:
    """Why a TIFF whose first IFD has ``tags`` (tag number -> value) is camera raw, or None.

    * DNGVersion (tag 50706, DNG specification) present: a DNG;
    * NewSubfileType (tag 254, TIFF 6.0 section 8) with bit 0 set on the *first* IFD: the
      first image is a reduced-resolution preview, which is how NEF, ARW, DCR and other
      TIFF-based raw files start (a TIFF a person saved starts with the full image);
    * PhotometricInterpretation 32803 (CFA) or 34892 (LinearRaw) (TIFF/EP, DNG);
    * a Compression used only by raw formats (Nikon 34713, Sony 32767, Pentax 65535...)."""
    if DNG_VERSION_TAG in tags:
        return "DNG (DNGVersion tag)"
    subfile = tags.get(NEW_SUBFILE_TYPE_TAG)
    if isinstance(subfile, int) and subfile & 1:
        return "a TIFF-based raw file: its first image is a reduced-resolution preview (NewSubfileType)"
    photometric = tags.get(_PHOTOMETRIC_TAG)
    if photometric in _RAW_PHOTOMETRIC:
        return f"a TIFF of {_RAW_PHOTOMETRIC[photometric]}"
    compression = tags.get(_COMPRESSION_TAG)
    if isinstance(compression, int) and _RAW_COMPRESSION.get(compression):
        return f"{_RAW_COMPRESSION[compression]} (raw compression {compression})"
    return None


def camera_raw_kind(path: Path, head: bytes | None = None) -> str | None:
    """Why the file at ``path`` (whose first bytes are ``head``, read if None) is a camera
    raw file, or None: :func:`camera_raw_signature`, then for a TIFF the tags of its first
    IFD (:func:`tiff_raw_kind`; read with Pillow's IFD parser, one IFD, at most a few
    hundred KB).  A TIFF whose IFD cannot be read is not called raw (the decode check
    judges it)."""
    if head is None:
        with path.open("rb") as fp:
            head = fp.read(64)
    named = camera_raw_signature(head)
    if named is not None or head[:4] not in (b"II*\x00", b"MM\x00*"):
        return named
    try:
        with path.open("rb") as fp:
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head[:8])
            fp.seek(ifd.next)
            ifd.load(fp)
            tags = {tag: ifd.get(tag) for tag in (254, 259, 262, DNG_VERSION_TAG) if tag in ifd}
    except Exception:  # a malformed IFD: not for us to name
        return None
    return tiff_raw_kind(tags)


def range_to_8bit(
    data: npt.NDArray[Any], low: float, high: float, out: npt.NDArray[np.uint8] | None = None
) -> npt.NDArray[np.uint8]:
    """``data`` mapped linearly so that ``low`` -> 0 and ``high`` -> 255, rounded, values
    outside clipped (NaN -> 0); ``high <= low`` maps everything to 0.  Works on stripes of
    rows so the float temporaries stay small (a 100 MP image never needs a float copy)."""
    import numpy as np

    result = np.empty(data.shape, np.uint8) if out is None else out
    span = float(high) - float(low)
    if span <= 0:
        result[...] = 0
        return result
    rows = max(1, (1 << 20) // max(1, data[0].size if data.ndim > 1 else 1))
    for start in range(0, data.shape[0], rows):
        block = data[start : start + rows].astype(np.float32)
        block -= np.float32(low)
        block *= np.float32(255.0 / span)
        np.nan_to_num(block, copy=False, nan=0.0)
        np.clip(block, 0, 255, out=block)
        np.rint(block, out=block)
        result[start : start + rows] = block
    return result


def data_range(data: npt.NDArray[Any]) -> tuple[float, float]:
    """(min, max) of the finite values of ``data`` ((0, 0) if none): the range a high-bit-
    depth image is mapped by.  The whole range, not a percentile: nothing is clipped, the
    order of values is kept, and one outlier costs contrast, never detail."""
    import numpy as np

    if np.issubdtype(data.dtype, np.floating):
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            return 0.0, 0.0
        return float(finite.min()), float(finite.max())
    return float(data.min()), float(data.max())


# --- opening -------------------------------------------------------------------------------------


def _fail(status: int, code: RefusalCode, detail: str) -> DecodeError:
    return DecodeError(DecodeFailure(status, code, detail))


def _raw_error(kind: str) -> DecodeError:
    return _fail(
        415,
        RefusalCode.CAMERA_RAW,
        f"a camera raw file ({kind}): dropcut does not develop raw files; "
        "export it as a JPEG or TIFF from your raw converter and drop that instead",
    )


@contextlib.contextmanager
def _opened(source: Path, max_pixels: int | None, timeout: float | None) -> Iterator[Image.Image]:
    """``source`` opened with Pillow (any :data:`SUPPORTED_FORMATS`), its primary image
    selected, camera raw and ``max_pixels`` refused; Pillow's errors become DecodeError."""
    with open(source, "rb") as fh:
        if fh.read(12)[4:8] == b"ftyp":  # an ISO media file: HEIF needs pillow-heif's plugin
            register_openers()
    deadline = None if timeout is None else time.monotonic() + timeout
    kind = camera_raw_kind(source)
    if kind is not None:
        raise _raw_error(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with source.open("rb") as raw:
                fp: BinaryIO = raw if deadline is None else BudgetedReader(raw, deadline)  # type: ignore[assignment]
                with Image.open(fp, formats=_PILLOW_FORMATS) as img:
                    width, height = img.size
                    if max_pixels is not None and width * height > max_pixels:
                        raise DecodeError(_too_many_pixels(width, height, max_pixels))
                    if deadline is not None and img.info.get("progressive"):
                        # many small scans each cost a pass over every block: feed libjpeg
                        # little at a time so that the deadline is checked often
                        img.decodermaxblock = _JPEG_PROGRESSIVE_FEED
                    yield img
        except DecodeError:
            raise
        except _DecodeTimeout:
            raise DecodeError(_too_slow(source.suffix.lstrip(".").upper() or "it", timeout or 0)) from None
        except Image.DecompressionBombError as err:
            raise _fail(422, RefusalCode.TOO_MANY_PIXELS, str(err)) from err
        except UnidentifiedImageError as err:
            raise _fail(422, RefusalCode.CORRUPT_IMAGE, "cannot decode: not an image Pillow knows") from err
        except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError) as err:
            detail = f"cannot decode: {err or type(err).__name__}"
            raise _fail(422, RefusalCode.CORRUPT_IMAGE, detail) from err


def _orientation(img: Image.Image) -> int:
    """EXIF Orientation (tag 274) of ``img``, 1 if absent or not 1-8."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _tile_rawmode(img: Image.Image) -> str | None:
    """The raw mode Pillow will decode ``img``'s first tile with (before ``load``)."""
    tiles = getattr(img, "tile", None)
    if not tiles:
        return None
    args = tiles[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _is_16bit_colour(img: Image.Image) -> bool:
    """True if Pillow would decode ``img`` (RGB or RGBA) from 16-bit samples to their
    high bytes (Pillow 13 has no 16-bit colour mode)."""
    rawmode = _tile_rawmode(img)
    return img.mode in ("RGB", "RGBA") and rawmode is not None and ";16" in rawmode


def _low_byte_rawmode(rawmode: str) -> str:
    """The raw mode that makes Pillow's unpacker keep each 16-bit sample's low byte:
    the byte order swapped (``RGB;16B`` keeps bytes 0, 2, 4: read as ``RGB;16L`` it
    keeps 1, 3, 5).  ``;16N`` (native, what libtiff hands over) is resolved first."""
    native = ";16L" if sys.byteorder == "little" else ";16B"
    rawmode = rawmode.replace(";16N", native)
    if ";16B" in rawmode:
        return rawmode.replace(";16B", ";16L")
    return rawmode.replace(";16L", ";16B")


def _low_byte_tiles(img: Image.Image) -> list[Any] | None:
    """For a 16-bit RGB(A) ``img`` (opened, not loaded: take this before anything that
    may load it, e.g. a PNG's ``getexif``), its tiles set to decode the low bytes; None for
    any other image."""
    if not _is_16bit_colour(img):
        return None
    low_tiles = []
    for tile in getattr(img, "tile", []):
        args = tile[3]
        if isinstance(args, str):
            args = _low_byte_rawmode(args)
        else:
            args = (_low_byte_rawmode(args[0]), *args[1:])
        low_tiles.append(tile._replace(args=args))
    return low_tiles


def _decode_16bit_colour(source: Path, first: Image.Image, low_tiles: list[Any]) -> Image.Image:
    """The 16-bit RGB(A) image ``first`` (opened from ``source``; Pillow gives the high
    bytes) as 8-bit RGB(A), colour mapped by its range (:func:`data_range`, all colour
    channels together so that the colour balance is kept), alpha by full scale (65535 ->
    255).  ``low_tiles``: :func:`_low_byte_tiles` of ``first``.

    Peak memory: the two 8-bit decodes (4 bytes a pixel each in Pillow), the 16-bit array
    (2 bytes a sample) and the result: ~17 bytes a pixel for RGB."""
    import numpy as np

    mode = first.mode
    first.load()
    samples = np.asarray(first).astype(np.uint16) << 8
    first.close()
    with Image.open(source, formats=_PILLOW_FORMATS) as again:
        again.tile = low_tiles
        again.load()
        samples |= np.asarray(again)
    colour = samples[..., :3]
    low, high = data_range(colour)
    if high <= low:  # a flat image: full scale
        low, high = 0.0, 65535.0
    out = np.empty(samples.shape, np.uint8)
    range_to_8bit(colour, low, high, out=out[..., :3])
    if mode == "RGBA":
        range_to_8bit(samples[..., 3], 0, 65535, out=out[..., 3])
    del samples, colour
    return Image.fromarray(out, mode)


def _to_8bit(img: Image.Image) -> Image.Image:
    """``img`` (loaded) with 8-bit samples: "I;16*", "I" and "F" mapped to "L" by their
    range (:func:`data_range`, :func:`range_to_8bit`); "1" to "L"; palette images to RGB or
    RGBA; a ``transparency`` colour to an alpha channel.  8-bit modes are returned as
    they are ("L", "LA", "RGB", "RGBA", "CMYK", "LAB")."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        import numpy as np

        data = np.asarray(img)
        low, high = data_range(data)
        if high <= low and mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        out = Image.fromarray(range_to_8bit(data, low, high), "L")
        return out
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode in ("L", "RGB") and "transparency" in img.info:
        return img.convert("LA" if mode == "L" else "RGBA")
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK", "LAB"):
        return img
    return img.convert("RGBA" if "A" in mode else "RGB")


def _has_transparency(img: Image.Image) -> bool:
    """Some alpha below 255 (an alpha channel that is everywhere opaque does not count)."""
    if img.mode not in ("LA", "RGBA"):
        return False
    extrema = img.getextrema()
    alpha = extrema[-1]
    return isinstance(alpha, tuple) and alpha[0] < 255


_PROFILE_SPACE = {"RGB": "RGB ", "RGBA": "RGB ", "L": "GRAY", "LA": "GRAY", "CMYK": "CMYK", "LAB": "Lab "}


def _profile(icc: bytes | None, mode: str) -> ImageCms.ImageCmsProfile | None:
    """The embedded profile, if it parses and is for ``mode``'s colour space."""
    if not icc:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    space = str(profile.profile.xcolor_space)
    return profile if _PROFILE_SPACE.get(mode) == space else None


_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
_FLAGS = ImageCms.Flags.BLACKPOINTCOMPENSATION


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """``img`` (8-bit: L, LA, RGB, RGBA, CMYK or LAB) in sRGB as "RGB" or "RGBA".
    With an embedded profile of the right colour space:
    LittleCMS, relative colorimetric with black point compensation (what image editors do
    by default).  Without: RGB is taken as sRGB (untouched), grey becomes RGB, CMYK is
    converted by Pillow's formula (R = (255 - C)(255 - K) / 255..., as browsers do for
    untagged CMYK), Lab through LittleCMS's built-in Lab (D50) profile."""
    alpha: Image.Image | None = None
    if img.mode in ("LA", "RGBA"):
        alpha = img.getchannel("A")
        img = img.convert("L" if img.mode == "LA" else "RGB")
    profile = _profile(icc, img.mode)
    if img.mode == "LAB":
        profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
    if profile is not None:
        out = ImageCms.profileToProfile(
            img, profile, ImageCms.createProfile("sRGB"), _INTENT, "RGB", flags=_FLAGS
        )
        assert out is not None  # not in place
        img = out
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if alpha is not None:
        img.putalpha(alpha)
    return img


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    method = ORIENTATION_TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _exif_for_output(img: Image.Image, strip_gps: bool) -> bytes | None:
    """The EXIF an output carries: the original's, Orientation set to 1, the GPS IFD
    dropped with ``strip_gps``.  For a TIFF (whose IFD0 describes its own storage: strip
    offsets, bits...) only the descriptive IFD0 tags and the Exif/GPS IFDs are taken.
    The embedded thumbnail (IFD1) is not kept: it would show the old orientation."""
    try:
        exif = img.getexif()
        if not len(exif):
            return None
        if img.format == "TIFF":
            new = Image.Exif()
            for tag in _TIFF_DESCRIPTIVE_TAGS:
                if tag in exif:
                    new[tag] = exif[tag]
            for pointer in (_EXIF_IFD_TAG, _GPS_IFD_TAG):
                sub = exif.get_ifd(pointer)
                if sub:
                    new[pointer] = dict(sub)
            exif = new
        else:
            for pointer in (_EXIF_IFD_TAG, _GPS_IFD_TAG):
                if pointer in exif:
                    exif.get_ifd(pointer)  # loaded, so tobytes() writes it
        if strip_gps and _GPS_IFD_TAG in exif:
            del exif[_GPS_IFD_TAG]
        exif[ORIENTATION_TAG] = 1
        return exif.tobytes()
    except Exception:  # a broken EXIF block is not worth failing the picture for
        return None


def _decode_8bit(source: Path, img: Image.Image, low_tiles: list[Any] | None) -> Image.Image:
    """``img`` (opened from ``source``, maybe drafted) decoded and brought to 8 bits;
    ``low_tiles`` from :func:`_low_byte_tiles` (taken before anything loaded ``img``)."""
    if low_tiles is not None:
        return _decode_16bit_colour(source, img, low_tiles)
    img.load()
    return _to_8bit(img)


# --- the proxy -------------------------------------------------------------------------------------


def make_proxy(
    source: Path,
    dest: Path,
    *,
    max_side: int = 1024,
    quality: int = PROXY_JPEG_QUALITY,
    max_pixels: int | None = None,
    timeout: float | None = DEFAULT_DECODE_TIMEOUT_SECONDS,
    sync: bool = True,
) -> Proxy:
    """Write the proxy of ``source`` to ``dest``: what ``/v1.0/alpha-channel`` gets.
    (``sync=False``: not fsynced; the caller syncs, see :func:`_write_atomically`.)

    The image a person sees (primary image / first frame, EXIF orientation applied:
    upright), long side at most ``max_side`` px (never upscaled; :func:`fit_within`),
    converted to sRGB (:func:`_to_srgb`: the embedded ICC profile through LittleCMS; CMYK
    without one by Pillow's formula), 8 bits a channel (16-bit and float data mapped by
    their range).  Downscaled with quality: a JPEG is decoded already reduced (libjpeg's
    DCT scaling, ``draft``, to the smallest 1/1, 1/2, 1/4 or 1/8 size that is still at
    least the target), other formats are ``reduce``d by an integer factor, then LANCZOS to
    the exact size.  A 45 MP JPEG thus never costs a full-size decode.

    Written as a JPEG (``quality``, 90 by default; 4:2:0 chroma: the model infers a matte,
    for which chroma at half resolution is plenty, and the upload is ~25 % smaller; no
    metadata but the sRGB profile) or,
    if the image has transparency, as an RGBA PNG; no EXIF (no GPS position leaves the
    machine).  Written atomically: a temp file in ``dest``'s folder, fsynced, renamed
    over ``dest``, the folder fsynced.

    ``max_pixels`` refuses a bigger image from its header; ``timeout`` (seconds) bounds
    the decoding of block-fed formats (as in :func:`check_image`).  Raises
    :class:`DecodeError` (a ValueError: 415 ``camera_raw``, 422 ``corrupt_image``,
    ``too_many_pixels`` or ``decode_too_slow``); OSError for failures writing ``dest``."""
    with _opened(source, max_pixels, timeout) as img:
        low_tiles = _low_byte_tiles(img)
        target = fit_within(img.size, max_side)
        if img.format in ("JPEG", "MPO") and target != img.size:
            img.draft(None, target)
        orientation = _orientation(img)
        icc = img.info.get("icc_profile")
        pixels = _decode_8bit(source, img, low_tiles)
    original = img
    if pixels.size != target:
        if pixels.mode in ("LA", "RGBA"):
            # resample with premultiplied alpha: no colour bleeds in from transparent pixels
            premultiplied = pixels.convert("La" if pixels.mode == "LA" else "RGBa")
            pixels = premultiplied.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            pixels = pixels.convert("LA" if pixels.mode == "La" else "RGBA")
        else:
            pixels = pixels.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if pixels is not original:
        original.close()  # the decoded (drafted) original is no longer needed
    pixels = _to_srgb(pixels, icc)
    if pixels.mode == "RGBA" and not _has_transparency(pixels):
        pixels = pixels.convert("RGB")
    pixels = _transpose(pixels, orientation)
    fmt = "PNG" if pixels.mode == "RGBA" else "JPEG"

    def save(fp: BinaryIO) -> None:
        if fmt == "PNG":
            pixels.save(fp, "PNG", icc_profile=srgb_icc(), compress_level=6)
        else:
            pixels.save(fp, "JPEG", quality=quality, subsampling=2, optimize=True, icc_profile=srgb_icc())

    written = _write_atomically(dest, save, sync=sync)
    return Proxy(size=pixels.size, format=fmt, bytes=written)


def _write_atomically(dest: Path, save: Callable[[BinaryIO], None], *, sync: bool = True) -> int:
    """Write ``dest`` through ``save(fp)``: temp file beside it, fsync, rename, fsync of
    the folder (``sync=False``: no fsyncs, the caller syncs the file system, as inspection
    does once per batch).  Returns the bytes written.  Nothing is left behind on failure."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fp:
            save(fp)
            fp.flush()
            if sync:
                os.fsync(fp.fileno())
            written = fp.tell()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not sync:
        return written
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return written


# --- the full image ----------------------------------------------------------------------------------


def load_full(
    source: Path,
    *,
    strip_gps: bool = True,
    max_pixels: int | None = None,
    timeout: float | None = None,
) -> FullImage:
    """The full-resolution image of ``source`` for the renderer (see :class:`FullImage`).

    Primary image / first frame; 8 bits a channel (16-bit and float data mapped by their
    range); an RGB original keeps its pixels and its ICC profile (Display P3 stays P3, to
    be attached to the output); CMYK, Lab, grey and others are converted to sRGB
    (:func:`_to_srgb`) and carry sRGB's profile; alpha kept only if some pixel is not
    opaque; EXIF orientation applied last (EXIF 2.32, tag 274).

    Memory: each step makes its result and then drops its input, so at most two images of
    the full size are alive at once: peak ~2 x 4 bytes a pixel above the baseline (Pillow
    stores RGB as 4 bytes a pixel) -- ~800 MB for 100 MP, whether or not the image needs
    converting or rotating (16-bit colour: ~17 bytes a pixel, see
    :func:`_decode_16bit_colour`).  Raises :class:`DecodeError` like :func:`make_proxy`."""
    with _opened(source, max_pixels, timeout) as img:
        low_tiles = _low_byte_tiles(img)
        orientation = _orientation(img)
        icc = img.info.get("icc_profile")
        exif = _exif_for_output(img, strip_gps)
        pixels = _decode_8bit(source, img, low_tiles)
        if pixels is not img:
            img.close()  # frees the decoded original (Image.close drops the pixels)
    keep_icc: bytes | None
    if pixels.mode in ("RGB", "RGBA"):  # kept as they are, in their own colour space
        keep_icc = icc if isinstance(icc, bytes) and _profile(icc, pixels.mode) is not None else None
    else:
        pixels = _to_srgb(pixels, icc)
        keep_icc = srgb_icc()
    if pixels.mode == "RGBA" and not _has_transparency(pixels):
        pixels = pixels.convert("RGB")
    pixels = _transpose(pixels, orientation)
    return FullImage(image=pixels, icc_profile=keep_icc, exif=exif)

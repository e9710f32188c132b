"""Builders of hostile images for the inspection budget tests: small files that are
costly to decode. Everything is built in memory in well under a second."""

from __future__ import annotations

import struct
import zlib


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


class _Bits:
    """A JPEG entropy-coded segment writer: MSB first, 0xFF stuffed, padded with ones."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._acc = 0
        self._n = 0

    def put(self, value: int, length: int) -> None:
        self._acc = (self._acc << length) | (value & ((1 << length) - 1))
        self._n += length
        while self._n >= 8:
            self._n -= 8
            byte = (self._acc >> self._n) & 0xFF
            self._out.append(byte)
            if byte == 0xFF:
                self._out.append(0)
        self._acc &= (1 << self._n) - 1

    def done(self) -> bytes:
        if self._n:
            self.put((1 << (8 - self._n)) - 1, 8 - self._n)
        return bytes(self._out)


def many_scan_jpeg(width: int, height: int, scans: int) -> bytes:
    """A valid greyscale progressive JPEG (SOF2) of ``width`` x ``height`` pixels, all
    grey, whose AC coefficients are sent ``scans`` times over (a scan script no encoder
    would write, but every scan is legal: libjpeg decodes them all, each touching every
    8x8 block). About ``width*height/512`` bytes for the DC scan plus ~15 bits per 32,767
    blocks per AC scan: thousands of scans of a 100-megapixel image fit in under 1 MB."""
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    out = bytearray(b"\xff\xd8")
    out += _segment(0xDB, b"\x00" + b"\x01" * 64)  # DQT 0: all ones
    out += _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    # DC table 0 and AC table 0 each hold one symbol with the one-bit code "0":
    # DC category 0 (no change), AC 0xE0 (EOB run of 2**14 + 14 extra bits).
    counts = b"\x01" + b"\x00" * 15
    out += _segment(0xC4, b"\x00" + counts + b"\x00")
    out += _segment(0xC4, b"\x10" + counts + b"\xe0")
    # DC scan: one "0" bit a block.
    out += _segment(0xDA, b"\x01\x01\x00\x00\x00\x00")
    out += b"\x00" * (blocks // 8) + (b"\x7f" if blocks % 8 else b"")
    # One AC first scan (Ss=1, Se=63, Ah=Al=0), repeated: end-of-band runs cover all blocks.
    bits = _Bits()
    left = blocks
    while left:
        run = min(left, 32767)
        if run >= 16384:
            bits.put(0, 1)
            bits.put(run - 16384, 14)
            left -= run
        else:
            # a short tail: the same symbol, its extra bits saying a smaller run is not
            # possible below 2**14, so send the remainder block by block as EOB runs of
            # 1 (symbol 0x00) -- not in the table: instead overshoot, libjpeg discards
            # what is left of a run at the end of a scan.
            bits.put(0, 1)
            bits.put(0, 14)
            left = 0
    ac_scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + bits.done()
    out += ac_scan * scans
    out += b"\xff\xd9"
    return bytes(out)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate_rows(row: bytes, rows: int) -> bytes:
    """A zlib stream of ``row`` repeated ``rows`` times, fast: one batch of rows is
    deflated once (ending in a full flush, so the next batch starts afresh) and its
    bytes repeated; only the Adler-32 is computed over all the data."""
    batch_rows = max(1, (1 << 22) // len(row))
    batch = row * min(batch_rows, rows)
    full, rest = divmod(rows, len(batch) // len(row))
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = comp.compress(batch) + comp.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(row * rest) + last.flush()
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(batch, adler)
    adler = zlib.adler32(row * rest, adler)
    return b"\x78\xda" + segment * full + tail + struct.pack(">I", adler)


def flat_png(
    width: int, height: int, *, color_type: int = 6, rows: int | None = None, filter_type: int = 0
) -> bytes:
    """A PNG of ``width`` x ``height`` 8-bit pixels (``color_type`` 6: RGBA, 2: RGB, 0:
    grey), all zero, that deflates to ~1/1000 of its decoded size. ``rows`` < height
    leaves the image data short (a truncated stream that is still valid zlib);
    ``filter_type`` > 4 makes every row's filter invalid."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes([filter_type]) + b"\x00" * (width * channels)
    idat = _deflate_rows(row, height if rows is None else rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + b"".join(_png_chunk(b"IDAT", idat[i : i + 65536]) for i in range(0, len(idat), 65536))
        + _png_chunk(b"IEND", b"")
    )

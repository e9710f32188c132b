"""Matte + original → the full-resolution cut-out (CPU work, run in worker processes).

The withoutBG alpha-matte endpoint infers at ≤ 1024 px on the long side. dropcut sends a
proxy of that size and gets back a one-channel matte (255 = opaque) at the proxy's size;
this module brings that matte to the original's resolution and writes the cut-out:

1. :func:`load_matte` reads and validates the matte PNG (:class:`MatteError` if it is not
   one we can use).
2. :func:`guided_upsample` upsamples it with the *fast guided filter* (He & Sun, "Fast
   Guided Filter", arXiv:1505.00996, 2015; He, Sun & Tang, "Guided Image Filtering", IEEE
   TPAMI 35(6), 2013), the full-resolution photograph being the guide: the filter's local
   linear coefficients ``a``, ``b`` are computed at the matte's size against the guide
   downsampled to that size, upsampled bilinearly, and applied to the full-resolution
   guide, ``q = a·I + b``. Edges follow the photograph's edges instead of the ~4–6 px blur
   band (at 24 MP) that bilinear upsampling of a 1024 px matte leaves — the "halo" the API
   page warns about.
3. :func:`render_cutout` writes a straight-alpha RGBA PNG, 8 bits a channel, whose colour
   channels are the original's pixels untouched, with the ICC profile and EXIF attached.

Memory: every full-resolution step runs in horizontal strips of about a megapixel. No
full-size float array and no full-size RGBA copy is ever made: the PNG is encoded here,
strip by strip (PNG "Average" filter, raw-deflate blocks ended by a sync flush, one zlib
stream, the Adler-32 combined — the way pigz parallelises), with the deflate of a strip on
a small thread pool (zlib releases the GIL) while the next strip is computed. Peak memory
is the decoded original plus a few tens of MB (measured: `python -m bench.render`).

:func:`render_outputs` makes every output of a recipe from one upsampling of the matte:
the outputs that need only the alpha start while the subject's colour is estimated, each
output composites only its own crop, and two lanes take the longest output that can
start (measured with ``python -m bench.outputs``).

No module-level state: everything is a plain function of its arguments, callable in a
worker process (``ProcessPoolExecutor.submit(render_cutout, ...)``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    from dropcut.recipes import Layout, OutputSpec

__all__ = [
    "DEFAULT_COLOUR_GUIDE",
    "DEFAULT_COMPRESS_LEVEL",
    "DEFAULT_EPS",
    "DEFAULT_RADIUS",
    "MatteError",
    "RenderStats",
    "bilinear_upsample",
    "guided_upsample",
    "is_plain_cutout",
    "load_matte",
    "needs_foreground",
    "output_cost",
    "peak_rss_bytes",
    "render_cutout",
    "render_outputs",
]

#: Window radius of the guided filter, in pixels *of the matte* (the proxy's grid): the
#: window is (2r+1)² proxy pixels. Chosen on the ground-truth scenes of tests/test_render.py
#: (see bench/render.py --sweep).
DEFAULT_RADIUS = 2
#: Regularisation of the guided filter, for intensities scaled to [0, 1] (the papers' ε).
DEFAULT_EPS = 1e-4
#: Colour (3-channel) guide rather than the grey (luma) one: lower error on the test scenes.
DEFAULT_COLOUR_GUIDE = True
#: zlib level of the PNG's deflate stream (0–9): 1 keeps a 24 MP render under 4 s on two
#: cores; higher levels cost time for ~1–2 % smaller files on photographs.
DEFAULT_COMPRESS_LEVEL = 1
#: Pixels per full-resolution strip (rows = this // width, at least 8).
STRIP_PIXELS = 1 << 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_AVERAGE = 3
_U8 = npt.NDArray[np.uint8]
_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]


class MatteError(ValueError):
    """The matte file cannot be used for this image: not a complete PNG (truncated,
    corrupt), not an 8-bit one-channel matte (modes other than ``L``, or ``LA``/``RGBA``
    whose alpha is taken), or not of the image's aspect ratio / larger than the image.
    A bad answer of the API (or of its cache), never a fault of the original."""


@dataclass(frozen=True)
class RenderStats:
    """What one :func:`render_cutout` cost.

    ``seconds``: wall time of the whole call (matte load, upsampling, PNG encode, fsync);
    ``size``: the output's (width, height) in pixels (= the image's);
    ``matte_size``: the matte's (width, height); ``guided``: False when the matte already
    had the image's size (used as is); ``file_bytes``: the PNG's size in bytes;
    ``peak_rss_bytes``: this process's peak resident set so far (:func:`peak_rss_bytes`),
    which in a fresh worker process bounds the render's own peak.
    """

    seconds: float
    size: tuple[int, int]
    matte_size: tuple[int, int]
    guided: bool
    file_bytes: int
    peak_rss_bytes: int


# --- the matte ---------------------------------------------------------------------------------


def load_matte(matte_png: Path, image_size: tuple[int, int]) -> _U8:
    """Read the matte at ``matte_png`` for an image of ``image_size`` = (W, H).

    Returns the matte as an (h, w) uint8 array, 255 = opaque. Accepted: a complete PNG of
    mode ``L`` (the API's answer), or ``LA``/``RGBA`` whose alpha channel is taken. Its
    size must be at most the image's and have the image's aspect ratio within a pixel of
    rounding: the short side is within 1 px of ``long side × image short / image long``
    (the proxy was made from this upright image, long side ≤ 1024).

    Raises :class:`MatteError` for anything else: not a PNG, truncated or corrupt (CRC,
    zlib stream), another mode (``1``, ``P``, ``I;16``, ``I``, ``F``, ``RGB``…: a 16-bit
    or palette matte is not what the API sends, and guessing its scale would hide a bug),
    a wrong size. ``OSError`` only if the file cannot be opened at all (missing, EACCES).
    """
    big_w, big_h = image_size
    with open(matte_png, "rb") as fh:
        try:
            with Image.open(fh, formats=["PNG"]) as probe:
                mode, (w, h) = probe.mode, probe.size
                _check_matte_size((w, h), image_size)
                if mode not in ("L", "LA", "RGBA"):
                    raise MatteError(f"matte mode {mode!r}: expected 'L' (or the alpha of 'LA'/'RGBA')")
                probe.verify()  # chunk structure and CRCs up to IEND
            fh.seek(0)
            with Image.open(fh, formats=["PNG"]) as im:
                im.load()  # the zlib stream, completely
                band = im if im.mode == "L" else im.getchannel("A")
                matte = np.array(band, dtype=np.uint8)
        except MatteError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise MatteError(f"matte is not a complete PNG: {exc}") from exc
    if matte.shape != (h, w):  # (defensive: a decoder disagreeing with the header)
        raise MatteError(
            f"matte decoded to {matte.shape[::-1]}, header says {(w, h)} (image {big_w}×{big_h})"
        )
    return matte


def _check_matte_size(matte_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    (w, h), (big_w, big_h) = matte_size, image_size
    if w < 1 or h < 1 or w > big_w or h > big_h:
        raise MatteError(f"matte is {w}×{h}, the image {big_w}×{big_h}: larger or empty")
    if big_w >= big_h:
        off = abs(h - w * big_h / big_w)
    else:
        off = abs(w - h * big_w / big_h)
    if off > 1.0:
        raise MatteError(
            f"matte is {w}×{h}, not of the image's aspect ratio ({big_w}×{big_h}; {off:.1f} px off)"
        )


# --- the guided filter at the matte's resolution -----------------------------------------------


def _box(x: _F64, r: int) -> _F64:
    """Mean over the (2r+1)² window clipped to the array (He's O(N) box filter with
    cumulative sums), along the first two axes of an (h, w[, k]) float64 array."""
    out = x
    for axis in (0, 1):
        n = out.shape[axis]
        c = np.empty((*out.shape[:axis], n + 1, *out.shape[axis + 1 :]), dtype=np.float64)
        if axis == 0:  # row by row: numpy's cumsum along a leading axis is strided and slow
            c[0] = 0.0
            c[1] = out[0]
            for row in range(1, n):
                np.add(c[row], out[row], out=c[row + 1])
        else:
            c[:, 0] = 0.0
            np.cumsum(out, axis=1, out=c[:, 1:])

        def sl(a: int, b: int, ax: int = axis) -> tuple[slice, ...]:
            return (slice(None),) * ax + (slice(a, b),)

        s = np.empty_like(out)
        m = n - 2 * r  # indices r .. n-r-1 have their whole window inside: c[i+r+1] - c[i-r]
        if m > 0:
            np.subtract(c[sl(2 * r + 1, n + 1)], c[sl(0, m)], out=s[sl(r, r + m)])
            edges = np.r_[0:r, r + m : n]
        else:
            edges = np.arange(n)
        i = np.arange(n)
        hi, lo = np.minimum(i + r + 1, n), np.maximum(i - r, 0)
        if axis == 0:
            s[edges] = c[hi[edges]] - c[lo[edges]]
        else:
            s[:, edges] = c[:, hi[edges]] - c[:, lo[edges]]
        shape = [1] * out.ndim
        shape[axis] = n
        s /= (hi - lo).astype(np.float64).reshape(shape)
        out = s
    return out


def _box_each(planes: list[_F64], r: int) -> _F64:
    """:func:`_box` of each (h, w) plane, stacked to (h, w, k): the same numbers as
    ``_box`` of the stack, with one plane's temporaries at a time instead of k planes'."""
    out = np.empty((*planes[0].shape, len(planes)), dtype=np.float64)
    for j, plane in enumerate(planes):
        out[..., j] = _box(plane, r)
    return out


def _solve_sym3(sig: _F64, rhs: _F64) -> _F64:
    """Solve Σ·a = rhs per pixel for the symmetric 3×3 Σ given as its (h, w, 6) upper
    triangle (xx, xy, xz, yy, yz, zz) and rhs (h, w, 3): the adjugate over the determinant,
    as in He's reference code (Σ is positive definite: ε is added to its diagonal)."""
    xx, xy, xz, yy, yz, zz = (sig[..., j] for j in range(6))
    i_xx = yy * zz - yz * yz
    i_xy = xz * yz - xy * zz
    i_xz = xy * yz - xz * yy
    i_yy = xx * zz - xz * xz
    i_yz = xz * xy - xx * yz
    i_zz = xx * yy - xy * xy
    det = xx * i_xx + xy * i_xy + xz * i_xz
    r0, r1, r2 = rhs[..., 0], rhs[..., 1], rhs[..., 2]
    a = np.empty_like(rhs)
    a[..., 0] = (i_xx * r0 + i_xy * r1 + i_xz * r2) / det
    a[..., 1] = (i_xy * r0 + i_yy * r1 + i_yz * r2) / det
    a[..., 2] = (i_xz * r0 + i_yz * r1 + i_zz * r2) / det
    return a


def _coefficients(p: _F64, guide: _F64, radius: int, eps: float) -> tuple[list[_F32], _F32]:
    """The guided filter's averaged coefficients (mean_a per guide channel, mean_b) for
    the matte ``p`` (h, w) in [0, 1] and the low-resolution guide (h, w, k) in [0, 1]."""
    k = guide.shape[2]
    channels = [np.ascontiguousarray(guide[..., c]) for c in range(k)]
    mean_i = _box_each(channels, radius)
    mean_p = _box(p, radius)
    cov_ip = _box_each([g * p for g in channels], radius) - mean_i * mean_p[..., None]
    if k == 1:
        var = _box_each([g * g for g in channels], radius) - mean_i * mean_i
        a = cov_ip / (var + eps)
    else:
        pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
        sig = _box_each([channels[c1] * channels[c2] for c1, c2 in pairs], radius)
        for j, (c1, c2) in enumerate(pairs):
            sig[..., j] -= mean_i[..., c1] * mean_i[..., c2]
            if c1 == c2:
                sig[..., j] += eps
        a = _solve_sym3(sig, cov_ip)
        del sig
    b = mean_p - np.sum(a * mean_i, axis=2)
    mean_a = _box_each([np.ascontiguousarray(a[..., c]) for c in range(k)], radius)
    mean_b = _box(b, radius)
    return [np.ascontiguousarray(mean_a[..., c], dtype=np.float32) for c in range(k)], mean_b.astype(
        np.float32
    )


# --- the full-resolution guide, strip by strip -------------------------------------------------


class _Guide:
    """The full-resolution guide, whether a Pillow image (RGB, RGBA; L for a grey guide)
    or an (H, W[, C]) uint8 array, read in strips of rows."""

    def __init__(self, guide: npt.NDArray[np.uint8] | Image.Image) -> None:
        self.image: Image.Image | None = None
        self.array: _U8 | None = None
        if isinstance(guide, Image.Image):
            if guide.mode not in ("RGB", "RGBA", "L"):
                raise ValueError(f"guide mode {guide.mode!r}: expected 'RGB', 'RGBA' or 'L'")
            self.image = guide
            self.width, self.height = guide.size
            self.channels = 1 if guide.mode == "L" else 3
        else:
            arr = np.asarray(guide)
            if (
                arr.dtype != np.uint8
                or arr.ndim not in (2, 3)
                or (arr.ndim == 3 and arr.shape[2] not in (3, 4))
            ):
                raise ValueError(f"guide array {arr.dtype} {arr.shape}: expected (H, W), (H, W, 3|4) uint8")
            self.array = arr
            self.height, self.width = arr.shape[:2]
            self.channels = 1 if arr.ndim == 2 else 3

    def small(self, size: tuple[int, int], colour: bool) -> _F64:
        """The guide downsampled to ``size`` (LANCZOS, as the proxy was made), (h, w, k)
        float64 in [0, 1]; k = 3 for a colour guide, 1 for a grey one."""
        if self.image is not None:
            im = self.image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
        else:
            assert self.array is not None
            arr = self.array[..., :3] if self.array.ndim == 3 else self.array
            im = Image.fromarray(np.ascontiguousarray(arr)).resize(size, Image.Resampling.LANCZOS)
        im = im.convert("RGB" if colour and self.channels == 3 else "L")
        out = np.asarray(im, dtype=np.float64) / 255.0
        return out if out.ndim == 3 else out[..., None]

    def rows(self, y0: int, y1: int) -> _U8:
        """Rows [y0, y1) as (rows, W, C) uint8, C = 4 for an RGBA guide (its alpha last)."""
        if self.image is not None:
            arr = np.asarray(self.image.crop((0, y0, self.width, y1)))
        else:
            assert self.array is not None
            arr = self.array[y0:y1]
        return arr if arr.ndim == 3 else arr[..., None]


def _grey(rows: _U8) -> _U8:
    """ITU-R 601 luma of an (n, W, 3|4) strip, as Pillow's convert("L") computes it."""
    if rows.shape[2] == 1:
        return rows
    im = Image.fromarray(np.ascontiguousarray(rows[..., :3]))
    return np.asarray(im.convert("L"))[..., None]


def _strip_rows(width: int, height: int) -> list[tuple[int, int]]:
    """Rows [y0, y1) of the full-resolution strips: ``STRIP_PIXELS`` each, at least 8 rows."""
    rows_per = max(8, STRIP_PIXELS // max(width, 1))
    return [(y0, min(height, y0 + rows_per)) for y0 in range(0, height, rows_per)]


def _alpha_rows(
    matte: _U8,
    guide: _Guide,
    *,
    radius: int,
    eps: float,
    colour: bool,
) -> Callable[[int, int], tuple[_U8, _U8]]:
    """The upsampler: a function of rows [y0, y1) giving (guide rows (n, W, C) uint8, alpha
    (n, W) uint8). The coefficients are computed here, once; the function only reads them,
    so strips can be computed on several threads at once."""
    big_w, big_h = guide.width, guide.height
    h, w = matte.shape
    if (w, h) == (big_w, big_h):
        return lambda y0, y1: (guide.rows(y0, y1), matte[y0:y1])
    use_colour = colour and guide.channels == 3
    small = guide.small((w, h), use_colour)
    mean_a, mean_b = _coefficients(matte.astype(np.float64) / 255.0, small, radius, eps)
    del small
    # q255 = Σ a_c · I_c(uint8) + 255 · b  (a is dimensionless: guide and matte share the scale)
    planes = [Image.fromarray(a_c, mode="F") for a_c in mean_a]
    planes.append(Image.fromarray(mean_b * np.float32(255.0), mode="F"))
    sy = h / big_h

    def rows(y0: int, y1: int) -> tuple[_U8, _U8]:
        box = (0.0, y0 * sy, float(w), y1 * sy)
        up = [
            np.asarray(p.resize((big_w, y1 - y0), Image.Resampling.BILINEAR, box=box), dtype=np.float32)
            for p in planes
        ]
        guide_rows = guide.rows(y0, y1)
        gi = guide_rows if use_colour else _grey(guide_rows)
        q = up[-1].copy()
        for c in range(len(up) - 1):
            q += up[c] * gi[..., c]
        np.clip(q, 0.0, 255.0, out=q)
        q += 0.5
        return guide_rows, q.astype(np.uint8)

    return rows


def _alpha_strips(
    matte: _U8,
    guide: _Guide,
    *,
    radius: int,
    eps: float,
    colour: bool,
) -> Iterator[tuple[int, _U8, _U8]]:
    """Yield (y0, guide rows (n, W, C) uint8, alpha (n, W) uint8) strip by strip."""
    rows = _alpha_rows(matte, guide, radius=radius, eps=eps, colour=colour)
    for y0, y1 in _strip_rows(guide.width, guide.height):
        yield y0, *rows(y0, y1)


def guided_upsample(
    matte: npt.NDArray[np.uint8],
    guide: npt.NDArray[np.uint8] | Image.Image,
    *,
    radius: int = DEFAULT_RADIUS,
    eps: float = DEFAULT_EPS,
    colour: bool = DEFAULT_COLOUR_GUIDE,
    threads: int = 1,
) -> npt.NDArray[np.uint8]:
    """Upsample ``matte`` — (h, w) uint8, 255 = opaque, the API's answer at the proxy's
    size — to the guide's (H, W) with the fast guided filter (He & Sun 2015,
    arXiv:1505.00996; He, Sun & Tang, TPAMI 2013), the full-resolution image as the guide.

    ``guide``: a Pillow image ("RGB", "RGBA" — its alpha ignored — or "L") or an (H, W),
    (H, W, 3) or (H, W, 4) uint8 array, upright, of the image the proxy was made from.
    ``radius``: the window radius in *matte* pixels (window (2r+1)²); ``eps``: the
    regularisation for intensities in [0, 1] (smaller = edges follow the guide more
    closely); ``colour``: 3-channel guide (True) or its ITU-R 601 luma (False).
    ``threads``: full-resolution strips computed at once (resizing and numpy release the
    GIL; the result does not depend on it).

    Method: the guide is downsampled to (h, w) with LANCZOS (as the proxy was); there the
    filter's coefficients ``a`` (per guide channel) and ``b`` are computed with O(N) box
    filters (cumulative sums) and averaged over the window; they are upsampled bilinearly
    to (H, W) strip by strip and ``q = a·I + b`` is evaluated on the full-resolution guide,
    clipped to [0, 255] and rounded. A matte already of the guide's size is returned as is.

    Returns an (H, W) uint8 array. Raises ``ValueError`` for a matte that is not a 2-D
    uint8 array or larger than the guide, an unsupported guide, or ``threads`` < 1.
    """
    m = np.asarray(matte)
    g = _Guide(guide)
    if m.dtype != np.uint8 or m.ndim != 2:
        raise ValueError(f"matte array {m.dtype} {m.shape}: expected (h, w) uint8")
    if m.shape[0] > g.height or m.shape[1] > g.width or m.size == 0:
        raise ValueError(f"matte {m.shape[::-1]} larger than the guide {(g.width, g.height)} or empty")
    if threads < 1:
        raise ValueError(f"threads {threads}: expected >= 1")
    out = np.empty((g.height, g.width), dtype=np.uint8)
    rows = _alpha_rows(m, g, radius=radius, eps=eps, colour=colour)

    def fill(strip: tuple[int, int]) -> None:
        out[strip[0] : strip[1]] = rows(*strip)[1]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dropcut-upsample") as pool:
        for _ in pool.map(fill, _strip_rows(g.width, g.height)):
            pass
    return out


def bilinear_upsample(matte: npt.NDArray[np.uint8], size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """The baseline: ``matte`` (h, w) uint8 resized to ``size`` = (W, H) with Pillow's
    bilinear filter — what applying a 1024 px matte to a full-resolution image gives
    without a guide. Returns (H, W) uint8."""
    return np.asarray(
        Image.fromarray(np.asarray(matte, dtype=np.uint8)).resize(size, Image.Resampling.BILINEAR)
    )


# --- the PNG, encoded strip by strip -----------------------------------------------------------


def _chunk(fh: BinaryIO, kind: bytes, data: bytes) -> None:
    fh.write(struct.pack(">I", len(data)) + kind)
    fh.write(data)
    fh.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def _adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """zlib's adler32_combine: the Adler-32 of A+B from those of A and B and len(B)."""
    base = 65521
    rem = len2 % base
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % base
    sum1 += (adler2 & 0xFFFF) + base - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + base - rem
    if sum1 >= base:
        sum1 -= base
    if sum1 >= base:
        sum1 -= base
    if sum2 >= base << 1:
        sum2 -= base << 1
    if sum2 >= base:
        sum2 -= base
    return sum1 | (sum2 << 16)


def _average_filter(rgba: _U8, prev: _U8) -> bytes:
    """PNG filter type 3 (Average) of an (n, W·4) uint8 strip whose previous image row is
    ``prev`` (zeros above the first row); returns the n filtered scanlines with their
    filter-type bytes."""
    n, width = rgba.shape
    x = rgba.astype(np.uint16)
    pred = np.empty_like(x)
    pred[0] = prev
    pred[1:] = x[:-1]
    pred[:, 4:] += x[:, :-4]
    pred >>= 1
    np.subtract(x, pred, out=pred)
    raw = np.empty((n, width + 1), dtype=np.uint8)
    raw[:, 0] = _FILTER_AVERAGE
    raw[:, 1:] = pred  # (mod 256)
    return raw.tobytes()


def _deflate(raw: bytes, level: int, last: bool) -> tuple[bytes, int, int]:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    data = comp.compress(raw) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return data, zlib.adler32(raw), len(raw)


def _exif_payload(exif: bytes) -> bytes:
    return exif[6:] if exif.startswith(b"Exif\x00\x00") else exif


def _write_png(
    fh: BinaryIO,
    size: tuple[int, int],
    strips: Iterator[tuple[int, _U8, _U8]],
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
    compress_level: int,
    threads: int,
) -> None:
    """The PNG of ``strips`` (y0, rows (n, W, 3|4), alpha (n, W)) to ``fh``: ``threads``
    strips are deflated on a small pool while the next is filtered (0: each in turn)."""
    width, height = size
    fh.write(_PNG_SIGNATURE)
    _chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
    if icc_profile:
        _chunk(fh, b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile))
    if exif:
        _chunk(fh, b"eXIf", _exif_payload(exif))
    # zlib header for deflate with a 32 KiB window; FLEVEL 0 ("fastest") is advisory only.
    header = bytes([0x78, 0x01])
    adler = 1
    prev = np.zeros(width * 4, dtype=np.uint8)
    pending: deque[Future[tuple[bytes, int, int]]] = deque()

    def drain(keep: int) -> None:
        nonlocal adler, header
        while len(pending) > keep:
            data, a2, n2 = pending.popleft().result()
            adler = _adler32_combine(adler, a2, n2)
            _chunk(fh, b"IDAT", header + data)
            header = b""

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="dropcut-png") as pool:
        for y0, rows, alpha in strips:
            n = rows.shape[0]
            rgba = np.empty((n, width, 4), dtype=np.uint8)
            rgba[..., :3] = rows[..., :3]
            if rows.shape[2] == 4:  # the original's own alpha, multiplied in
                prod = alpha.astype(np.uint16) * rows[..., 3]
                prod += 127
                prod //= 255
                rgba[..., 3] = prod
            else:
                rgba[..., 3] = alpha
            flat = rgba.reshape(n, width * 4)
            raw = _average_filter(flat, prev)
            prev = flat[-1].copy()
            last = y0 + n >= height
            pending.append(pool.submit(_deflate, raw, compress_level, last))
            drain(threads)
        drain(0)
    _chunk(fh, b"IDAT", struct.pack(">I", adler))
    _chunk(fh, b"IEND", b"")


# --- the cut-out ---------------------------------------------------------------------------------


def render_cutout(
    image: Image.Image,
    matte_png: Path,
    dest: Path,
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
    radius: int = DEFAULT_RADIUS,
    eps: float = DEFAULT_EPS,
    colour: bool = DEFAULT_COLOUR_GUIDE,
    compress_level: int = DEFAULT_COMPRESS_LEVEL,
    threads: int | None = None,
) -> RenderStats:
    """Write the full-resolution cut-out of ``image`` to ``dest`` and fsync it.

    ``image``: the upright original, mode "RGB" or "RGBA" (its own transparency), 8 bits
    a channel, size (W, H) — ``FullImage.image``; it is only read, never modified.
    ``matte_png``: the API's matte for the proxy of this image (see :func:`load_matte`).
    ``dest``: a fresh staging path on the output's file system; it is created (truncated
    if present), written and fsynced — the caller renames it into place and fsyncs the
    folder. On any failure ``dest`` is removed and the exception propagates.
    ``icc_profile``: the profile the pixels are in (``iCCP`` chunk), or None;
    ``exif``: EXIF bytes (with or without the ``Exif\\0\\0`` prefix; Orientation should be 1:
    the pixels are upright), written as an ``eXIf`` chunk, or None.

    The output: a PNG of (W, H), RGBA, 8 bits a channel, straight (not premultiplied)
    alpha; R, G, B are the original's pixels unchanged (also where alpha is 0), alpha is the
    matte upsampled by :func:`guided_upsample` (``radius``, ``eps``, ``colour``), times the
    original's own alpha / 255 (rounded) when it has one. Deflate level
    ``compress_level`` (0–9), compressed on ``threads`` threads (default: up to 2).

    Raises :class:`MatteError` for an unusable matte, ``ValueError`` for an image mode
    other than RGB/RGBA, ``OSError`` for I/O failures (a full disk).
    """
    started = time.perf_counter()
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(f"image mode {image.mode!r}: expected 'RGB' or 'RGBA'")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level {compress_level}: expected 0-9")
    matte = load_matte(matte_png, image.size)
    if threads is None:
        threads = max(1, min(2, os.cpu_count() or 1))
    guide = _Guide(image)
    strips = _alpha_strips(matte, guide, radius=radius, eps=eps, colour=colour)
    try:
        with open(dest, "wb") as fh:
            _write_png(
                fh,
                image.size,
                strips,
                icc_profile=icc_profile,
                exif=exif,
                compress_level=compress_level,
                threads=threads,
            )
            fh.flush()
            os.fsync(fh.fileno())
            file_bytes = fh.tell()
    except BaseException:
        try:
            os.unlink(dest)
        except OSError:
            pass
        raise
    return RenderStats(
        seconds=time.perf_counter() - started,
        size=image.size,
        matte_size=(matte.shape[1], matte.shape[0]),
        guided=(matte.shape[1], matte.shape[0]) != image.size,
        file_bytes=file_bytes,
        peak_rss_bytes=peak_rss_bytes(),
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` of /proc/self/status, else
    ``ru_maxrss``. (On Linux ``ru_maxrss`` of a process started by fork/vfork + exec also
    counts its parent's peak — ``subprocess`` records the parent's high-water mark at the
    exec — so a worker's own peak is only visible in ``VmHWM``, which exec resets.)"""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_plain_cutout(spec: OutputSpec) -> bool:
    """Is ``spec`` today's output: the transparent PNG at the photo's own size, uncropped
    (rendered by :func:`render_cutout`, strip by strip, in the least memory)?"""
    r = spec.resolve()
    return (
        r.format == "png"
        and r.background in (None, "transparent")
        and r.crop == "none"
        and r.canvas is None
        and r.margin.value == 0
    )


def needs_foreground(spec: OutputSpec) -> bool:
    """Does ``spec`` show the subject's estimated colour
    (:func:`dropcut.compose.foreground_cutout`) rather than the photo's: a composite onto a
    colour, or a WebP (the transparent one too)? Masks never do."""
    r = spec.resolve()
    return r.format != "mask" and (r.background != "transparent" or r.format == "webp")


#: Rough cost of the parts of an output, in nanoseconds per pixel on one core of the
#: benchmark machine (``python -m bench.outputs``, 24 MP): encoding, per canvas pixel...
_ENCODE_NS: Mapping[str, float] = {"webp": 90.0, "png": 50.0, "jpeg": 15.0, "mask": 10.0}
#: ... and placing, per source pixel of the crop: unscaled (composite and copy) or scaled
#: (composite and LANCZOS).
_PASTE_NS = 6.0
_RESIZE_NS = 25.0


def output_cost(spec: OutputSpec, placed: Layout) -> float:
    """Estimated seconds one output takes on one core, placed as ``placed``
    (:func:`dropcut.recipes.layout`) and encoded as ``spec`` says: only to start the
    longest outputs first, so that the last one to finish is not a long one started late.
    The crop's source pixels times the cost of pasting or resizing them, plus the canvas's
    pixels times the format's encoding cost (see ``_ENCODE_NS``)."""
    x0, y0, x1, y1 = placed.crop
    width, height = placed.canvas
    per_source = _PASTE_NS if placed.scale == 1 else _RESIZE_NS
    return ((x1 - x0) * (y1 - y0) * per_source + width * height * _ENCODE_NS[spec.resolve().format]) * 1e-9


def _colour(background: str | None) -> tuple[int, int, int] | None:
    if background is None or background == "transparent":
        return None
    return (int(background[1:3], 16), int(background[3:5], 16), int(background[5:7], 16))


def _is_identity(placed: Layout, size: tuple[int, int]) -> bool:
    """Does ``placed`` draw the whole source, unscaled, onto a canvas of its own size?"""
    return (
        placed.scale == 1
        and placed.crop == (0.0, 0.0, float(size[0]), float(size[1]))
        and placed.canvas == size
        and placed.offset == (0, 0)
    )


@dataclass(frozen=True)
class _Output:
    """One output of a recipe: its resolved spec, staging path and layout."""

    spec: OutputSpec
    dest: Path
    placed: Layout

    @property
    def cost(self) -> float:
        return output_cost(self.spec, self.placed)

    @property
    def alpha_only(self) -> bool:
        """Made from the alpha (and the photo) alone: the plain transparent PNG, a mask."""
        return is_plain_cutout(self.spec) or self.spec.format == "mask"


class _Lanes:
    """The outputs of one recipe, shared out to ``OUTPUT_THREADS`` lanes (threads that each
    make one output after another): the outputs that need only the alpha can start at
    once, the others when :attr:`cutout` is set; each lane takes the longest output that
    can start (:func:`output_cost`), so the last to finish is not a long one started late.
    """

    def __init__(self, outputs: list[_Output]) -> None:
        def longest_first(some: list[_Output]) -> deque[_Output]:
            return deque(sorted(some, key=lambda job: job.cost, reverse=True))

        self._early = longest_first([job for job in outputs if job.alpha_only])
        self._late = longest_first([job for job in outputs if not job.alpha_only])
        self._taking = threading.Lock()
        self._failed = threading.Event()
        #: The cut-out the other outputs are placed from (None: there are none).
        self.cutout: Future[Image.Image | None] = Future()

    def _take(self) -> _Output | None:
        with self._taking:
            early, late = self._early, self._late
            if early and (not late or not self.cutout.done() or early[0].cost >= late[0].cost):
                return early.popleft()
            return late.popleft() if late else None

    def run(self, make: Callable[[_Output], None]) -> None:
        """Be a lane: ``make`` outputs until none is left or one lane has failed (its
        exception is raised here; the other lanes stop after their current output)."""
        while not self._failed.is_set() and (job := self._take()) is not None:
            try:
                make(job)
            except BaseException:
                self._failed.set()
                raise

    def fail(self, exc: BaseException) -> None:
        """Stop the lanes: this thread could not make the cut-out (or failed as a lane)."""
        self._failed.set()
        if not self.cutout.done():
            self.cutout.set_exception(exc)


def render_outputs(
    image: Image.Image,
    matte_png: Path,
    outputs: list[tuple[OutputSpec, Path]],
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
) -> float:
    """Every output of a recipe from one matte: ``outputs`` pairs each spec (see
    :mod:`dropcut.recipes`) with the path it is written to (a fresh staging file, written
    and fsynced). ``image``: the upright original, RGB or RGBA (its own alpha multiplied
    into the matte), (W, H).

    The matte is upsampled once (:func:`guided_upsample`, on ``OUTPUT_THREADS`` threads).
    Then ``OUTPUT_THREADS`` lanes (this thread and a pool's) make the outputs, longest
    first (:func:`output_cost`): while this thread estimates the subject's colour
    (:func:`dropcut.compose.foreground_cutout`: no halo of the old background), needed by
    a colour background or a WebP, the others start on the outputs that need only the
    alpha (the plain transparent PNG, masks); the rest are cropped, scaled and placed from
    that cut-out by :func:`dropcut.compose.place`, which composites only the part of the
    photo an output shows. No lane starts threads of its own (the PNG is deflated in turn),
    so the lanes keep the cores busy without crowding the estimate, which the longest
    output (the WebP) waits for. Every output carries the ICC profile and EXIF. A
    transparent output other than the plain PNG shows the estimated colour when the
    recipe estimates it, else the photo's. A recipe of today's transparent PNG alone is
    :func:`render_cutout`.

    Memory: the image, its alpha (1 byte a pixel), the cut-out (4 bytes a pixel) and what
    the outputs being made hold (a WebP: libwebp's ~12 bytes a pixel at method 0, ~19 at
    method 2; a scaled output: the composite of its crop plus the filter's reach). Returns
    the seconds it took. Raises :class:`MatteError`, ``ValueError`` or ``OSError`` (no
    output file is left then)."""
    from dropcut import compose, recipes

    if len(outputs) == 1 and is_plain_cutout(outputs[0][0]):
        dest = outputs[0][1]
        return render_cutout(image, matte_png, dest, icc_profile=icc_profile, exif=exif).seconds
    started = time.monotonic()
    try:
        matte = load_matte(matte_png, image.size)
        alpha = guided_upsample(matte, image, threads=OUTPUT_THREADS)
        if image.mode == "RGBA":  # the original's own transparency multiplied in
            own = np.asarray(image.getchannel("A"), dtype=np.uint16)
            alpha = ((alpha.astype(np.uint16) * own + 127) // 255).astype(np.uint8)
        specs = [spec.resolve() for spec, _ in outputs]
        boxes = {s.crop_threshold: recipes.subject_box(alpha, s.crop_threshold) for s in specs}
        jobs = [
            _Output(s, dest, recipes.layout(image.size, boxes[s.crop_threshold], s))
            for s, (_, dest) in zip(specs, outputs, strict=True)
        ]
        lanes = _Lanes(jobs)
        saving = threading.Lock()  # Image.save sets attributes: one save of a shared image at a time

        def make(job: _Output) -> None:
            spec, dest = job.spec, job.dest
            identity = _is_identity(job.placed, image.size)
            if is_plain_cutout(spec):  # the alpha upsampled above, written strip by strip
                _write_cutout(image, alpha, dest, icc_profile=icc_profile, exif=exif, threads=0)
            elif spec.format == "mask":
                mask = alpha if identity else compose.place(alpha, job.placed, None)
                compose.save_mask(mask, dest, exif=exif)
            else:
                cutout = lanes.cutout.result()
                assert cutout is not None
                colour = _colour(spec.background)
                out = cutout if identity and colour is None else compose.place(cutout, job.placed, colour)
                with saving if out is cutout else contextlib.nullcontext():
                    _encode(out, spec, dest, icc_profile=icc_profile, exif=exif)

        placed = [job for job in jobs if not job.alpha_only]
        any_alpha_only = len(placed) < len(jobs)
        with ThreadPoolExecutor(
            max_workers=max(1, OUTPUT_THREADS - 1), thread_name_prefix="dropcut-output"
        ) as pool:
            others = [pool.submit(lanes.run, make) for _ in range(OUTPUT_THREADS - 1)]
            try:
                if any(needs_foreground(job.spec) for job in placed):
                    # (its band pass on one thread while the other lanes are busy)
                    threads = 1 if any_alpha_only else OUTPUT_THREADS
                    lanes.cutout.set_result(compose.foreground_cutout(image, alpha, threads=threads))
                else:
                    lanes.cutout.set_result(_plain_cutout(image, alpha) if placed else None)
                lanes.run(make)
            except BaseException as exc:
                lanes.fail(exc)
                raise
            for other in others:
                other.result()
    except BaseException:
        for _, path in outputs:
            path.unlink(missing_ok=True)
        raise
    return time.monotonic() - started


WEBP_METHOD = 0  # libwebp's fastest: 2× faster than method 2 (compose.save_webp falls back to 2
# when an image is too busy for method 0's first partition)
OUTPUT_THREADS = 2  # outputs of one recipe made at once (and threads of the upsampling)


def _plain_cutout(image: Image.Image, alpha: _U8) -> Image.Image:
    """The photo's own colours with ``alpha`` (H, W) uint8: a new RGBA image (W, H)."""
    out = image.convert("RGBA") if image.mode != "RGBA" else image.copy()
    out.putalpha(Image.fromarray(alpha))
    return out


def _encode(
    image: Image.Image, spec: OutputSpec, dest: Path, *, icc_profile: bytes | None, exif: bytes | None
) -> None:
    """Write a placed output (RGB, or RGBA) in ``spec``'s format (png, jpeg or webp)."""
    from dropcut import compose

    if spec.format == "jpeg":
        compose.save_jpeg(image, dest, icc_profile=icc_profile, exif=exif, quality=spec.quality or 90)
    elif spec.format == "webp":
        compose.save_webp(
            image, dest, icc_profile=icc_profile, exif=exif, quality=spec.quality or 85, method=WEBP_METHOD
        )
    else:
        compose.save_png(
            image, dest, icc_profile=icc_profile, exif=exif, compress_level=DEFAULT_COMPRESS_LEVEL
        )


def _write_cutout(
    image: Image.Image,
    alpha: npt.NDArray[np.uint8],
    dest: Path,
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
    threads: int,
) -> None:
    """:func:`render_cutout`'s PNG, from an alpha already upsampled (and multiplied by the
    original's own): (H, W) uint8. Written strip by strip and fsynced; ``threads``
    strips are deflated while the next one is filtered (0: each in turn)."""
    guide = _Guide(image)

    def strips() -> Iterator[tuple[int, _U8, _U8]]:
        for y0, y1 in _strip_rows(image.width, image.height):
            yield y0, guide.rows(y0, y1)[..., :3], alpha[y0:y1]

    with open(dest, "wb") as fh:
        _write_png(
            fh,
            image.size,
            strips(),
            icc_profile=icc_profile,
            exif=exif,
            compress_level=DEFAULT_COMPRESS_LEVEL,
            threads=threads,
        )
        fh.flush()
        os.fsync(fh.fileno())

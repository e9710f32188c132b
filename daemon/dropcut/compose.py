"""Pixels for the deliverables other than the transparent PNG: foreground colour, composites
onto a colour, crop/scale/place on a canvas, and the JPEG / WebP / mask encoders.

Everything here is a plain function of its arguments (arrays and Pillow images in, arrays,
Pillow images or files out), with no module-level state, callable in a worker process.
Array conventions: an image is ``(H, W, 3)`` uint8 RGB (or ``(H, W, 4)`` RGBA, straight
alpha), an alpha matte is ``(H, W)`` uint8 with 255 = opaque, colours are ``(r, g, b)``
ints 0–255 in the image's own colour space (the ICC profile that is carried along).

**Foreground estimation** (:func:`estimate_foreground`). A pixel of a photo at a soft edge
is a mix ``I = αF + (1−α)B`` of the subject's colour F and the old background B. Putting
the *observed* I over a new background keeps the ``(1−α)B`` part: a green fringe from a
green screen, a dark one from a dark studio wall — the halo the withoutBG page warns
about. We solve for F instead, with the multi-level method of Germer, Uelwer, Conrad and
Harmeling, "Fast Multi-Level Foreground Estimation", ICPR 2020 (arXiv:2006.14970), the
method of pymatting's ``estimate_foreground_ml``: per pixel, minimise
``|αF + (1−α)B − I|² + Σ_j (ε + |α_i − α_j|)(|F_i − F_j|² + |B_i − B_j|²)`` over the four
neighbours j, solved level by level from 1×1 up, each level starting from the one below.

Why not pymatting itself: it installs from PyPI here, but drags in numba + llvmlite +
scipy (~320 MB), its numba functions cost ~70 s of JIT compilation on first import (a
cold worker), and it works on full-size float arrays: 2.0 s and +300 MB at 4 MP on this
machine, i.e. ~12 s and ~2 GB at 24 MP. Here (pure numpy, same energy and parameters):

1. The multi-level solve runs at a *working resolution* (long side ≤ ``work_side``,
   area-averaged image and alpha — the compositing equation is linear, so the averages
   still obey it) with vectorised Jacobi sweeps instead of numba's Gauss–Seidel loops.
2. At full resolution only the edge band ``0 < α < 255`` is computed, strip by strip
   (bounded memory): each band pixel solves the same 2×2 system once, its neighbours'
   F and B being the working-level solution sampled bilinearly there (one Jacobi step
   of the full-resolution energy). Thin strands keep their full-resolution alpha and
   colour; where α is small the estimate leans on the neighbours, where α is large on
   the pixel itself. Opaque pixels (α = 255) keep F = I exactly; transparent ones too
   (their F is never seen).

:func:`foreground_cutout` gives the same F as an RGBA Pillow image (F, α): the cut-out
that the outputs of a recipe are placed from. Its band pass reads and writes that image
strip by strip (no full-size array besides it) and can run on several threads.

**Placing** (:func:`place`). Compositing is per pixel, so an output is composited from
its own crop only: an unscaled one straight onto its canvas, strip by strip; a scaled one
composited at full resolution over the crop plus the resampling filter's reach
(:func:`filter_reach`) and then resized, the same numbers as compositing the whole frame
first. (Resizing αF and α and compositing at the small size is the same in exact
arithmetic, but measured on the 24 MP bench photo: slower, since Pillow premultiplies and
resizes four channels, and up to 21 levels off where the filter's ringing is clipped.)

Measured (``python -m bench.compose``, 6000×4000 green-screen scene, 250 k band pixels):
1.8 s at 24 MP, peak +200 MB above the inputs (the 69 MB output included); on a 1.5 MP
scene the error of F against the truth in the band is 4.4 levels here vs 4.5 for pymatting
(74 for the raw image).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_JPEG_SUBSAMPLING",
    "DEFAULT_WEBP_METHOD",
    "DEFAULT_WEBP_QUALITY",
    "DEFAULT_WORK_SIDE",
    "WEBP_OVERFLOW_METHOD",
    "LayoutLike",
    "apply_layout",
    "composite",
    "crop_and_place",
    "estimate_foreground",
    "filter_reach",
    "foreground_cutout",
    "place",
    "save_jpeg",
    "save_mask",
    "save_webp",
]

_U8 = npt.NDArray[np.uint8]
_F32 = npt.NDArray[np.float32]
RGB = tuple[int, int, int]

#: Long side, in pixels, of the working resolution of the multi-level solve.
DEFAULT_WORK_SIDE = 1024
#: Germer et al.'s / pymatting's defaults: ε (regularisation), weight of |Δα|, iterations
#: at levels ≤ 32 px and above. Jacobi sweeps (vectorised) need about twice the
#: Gauss–Seidel sweeps of the reference for the same result, hence 4 rather than 2.
_REGULARISATION = 1e-5
_GRADIENT_WEIGHT = 1.0
_SMALL_SIZE = 32
_SMALL_ITERATIONS = 10
_BIG_ITERATIONS = 4
#: Full-resolution rows processed together (about a megapixel).
_STRIP_PIXELS = 1 << 20

#: JPEG quality (Pillow/libjpeg scale 1–95 useful) and chroma subsampling: 0 = 4:4:4. A
#: subject on white is all edge: 4:2:0 halves the chroma resolution and bleeds the
#: subject's colour 1–2 px into the white (a coloured fringe of its own), so 4:4:4.
DEFAULT_JPEG_QUALITY = 90
DEFAULT_JPEG_SUBSAMPLING = 0
#: WebP quality (0–100) and libwebp effort (0 fast … 6 slow); 4 is libwebp's default,
#: 2 is ~2× faster for ~3 % more bytes on photographs.
DEFAULT_WEBP_QUALITY = 85
DEFAULT_WEBP_METHOD = 2
#: The libwebp effort a lossy WebP is encoded at again when its first partition overflows
#: at a lower one (see :func:`save_webp`), and Pillow's message for that error
#: (VP8_ENC_ERROR_PARTITION0_OVERFLOW = 6).
WEBP_OVERFLOW_METHOD = 2
_WEBP_PARTITION0_OVERFLOW = "encoding error 6"


# --- checks -------------------------------------------------------------------------------------


def _check_image_alpha(image: npt.ArrayLike, alpha: npt.ArrayLike) -> tuple[_U8, _U8]:
    img = np.asarray(image)
    a = np.asarray(alpha)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image {img.dtype} {img.shape}: expected (H, W, 3) uint8 RGB")
    if a.dtype != np.uint8 or a.shape != img.shape[:2]:
        raise ValueError(f"alpha {a.dtype} {a.shape}: expected (H, W) uint8 = {img.shape[:2]}")
    return img, a


def _check_colour(colour: Sequence[int]) -> RGB:
    c = tuple(int(v) for v in colour)
    if len(c) != 3 or not all(0 <= v <= 255 for v in c):
        raise ValueError(f"colour {colour!r}: expected (r, g, b) with 0-255 each")
    return (c[0], c[1], c[2])


# --- foreground estimation ------------------------------------------------------------------------


def _shifted(x: _F32, dy: int, dx: int) -> _F32:
    """x moved so that out[y, x] = x[clamp(y+dy), clamp(x+dx)] (edge replicated)."""
    out = np.empty_like(x)
    if dy == -1:
        out[1:], out[0] = x[:-1], x[0]
    elif dy == 1:
        out[:-1], out[-1] = x[1:], x[-1]
    elif dx == -1:
        out[:, 1:], out[:, 0] = x[:, :-1], x[:, 0]
    else:
        out[:, :-1], out[:, -1] = x[:, 1:], x[:, -1]
    return out


def _solve(img: _F32, a: _F32, weight: _F32, sum_f: _F32, sum_b: _F32) -> tuple[_F32, _F32]:
    """Per pixel: the 2×2 system of Germer et al. (eq. 9) for F and B, every channel,
    given α (n…), the summed neighbour weights W (n…) and Σ w_j F_j, Σ w_j B_j (n…, 3)."""
    a1 = 1.0 - a
    a00 = a * a + weight
    a11 = a1 * a1 + weight
    a01 = a * a1
    inv = 1.0 / (a00 * a11 - a01 * a01)
    b0 = a[..., None] * img + sum_f
    b1 = a1[..., None] * img + sum_b
    f = (inv * a11)[..., None] * b0 - (inv * a01)[..., None] * b1
    b = (inv * a00)[..., None] * b1 - (inv * a01)[..., None] * b0
    np.clip(f, 0.0, 1.0, out=f)
    np.clip(b, 0.0, 1.0, out=b)
    return f.astype(np.float32, copy=False), b.astype(np.float32, copy=False)


def _multilevel(img: _F32, a: _F32, f_init: _F32, b_init: _F32) -> tuple[_F32, _F32]:
    """Germer et al.'s multi-level F, B estimate of ``img`` (h, w, 3) float32 in [0, 1]
    with ``a`` (h, w) float32 in [0, 1]; levels w**(i/n) × h**(i/n) from 1×1, image and
    alpha area-averaged to each level, F and B of the level below upsampled (nearest)."""
    h0, w0 = a.shape
    n_levels = max(1, int(np.ceil(np.log2(max(w0, h0, 2)))))
    f = f_init.reshape(1, 1, 3).astype(np.float32)
    b = b_init.reshape(1, 1, 3).astype(np.float32)
    img_im = Image.fromarray(np.ascontiguousarray((img * 255.0 + 0.5).astype(np.uint8)))
    for level in range(n_levels + 1):
        w = max(1, round(w0 ** (level / n_levels)))
        h = max(1, round(h0 ** (level / n_levels)))
        if (h, w) == (h0, w0):
            im_l, a_l = img, a
        else:
            im_l = np.asarray(img_im.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
            a_l = np.asarray(
                Image.fromarray(a, mode="F").resize((w, h), Image.Resampling.BOX), dtype=np.float32
            )
        ys = np.minimum(np.arange(h) * f.shape[0] // h, f.shape[0] - 1)
        xs = np.minimum(np.arange(w) * f.shape[1] // w, f.shape[1] - 1)
        f = f[ys][:, xs]
        b = b[ys][:, xs]
        shifts = ((-1, 0), (1, 0), (0, -1), (0, 1))
        weights = [
            _REGULARISATION + _GRADIENT_WEIGHT * np.abs(a_l - _shifted(a_l, dy, dx)) for dy, dx in shifts
        ]
        total: _F32 = np.add.reduce(weights, dtype=np.float32)
        n_iter = _SMALL_ITERATIONS if max(w, h) <= _SMALL_SIZE else _BIG_ITERATIONS
        for _ in range(n_iter):
            sum_f = np.zeros_like(f)
            sum_b = np.zeros_like(b)
            for wgt, (dy, dx) in zip(weights, shifts, strict=True):
                sum_f += wgt[..., None] * _shifted(f, dy, dx)
                sum_b += wgt[..., None] * _shifted(b, dy, dx)
            f, b = _solve(im_l, a_l, total, sum_f, sum_b)
    return f, b


def _bilinear_at(grid: _F32, ys: _F32, xs: _F32) -> _F32:
    """Sample ``grid`` (h, w, 3) at fractional pixel-centre coordinates ys, xs (n,)."""
    h, w = grid.shape[:2]
    y = np.clip(ys, 0.0, h - 1.0)
    x = np.clip(xs, 0.0, w - 1.0)
    y0 = np.minimum(y.astype(np.int64), max(h - 2, 0))
    x0 = np.minimum(x.astype(np.int64), max(w - 2, 0))
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[:, None]
    top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
    bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
    out: _F32 = (top * (1 - fy) + bottom * fy).astype(np.float32)
    return out


@dataclass(frozen=True)
class _Working:
    """The multi-level F and B at the working resolution (h, w, 3) float32 in [0, 1], and
    working pixels per full-resolution pixel along y and x."""

    f: _F32
    b: _F32
    sy: float
    sx: float


def _working_size(size: tuple[int, int], work_side: int) -> tuple[int, int]:
    """(w, h) of the working resolution for an image of ``size`` = (W, H)."""
    width, height = size
    s = min(1.0, work_side / max(width, height))
    return max(1, round(width * s)), max(1, round(height * s))


def _solve_working(small_img: _F32, small_a: _F32) -> tuple[_F32, _F32]:
    """F and B at the working resolution, from the image (h, w, 3) and α (h, w) there."""
    # the initial (1×1) F and B: mean colours of the (nearly) opaque and clear pixels, as
    # in the reference (thresholds 0.9 / 0.1), taken at the working resolution
    opaque, clear = small_a > 0.9, small_a < 0.1
    f_mean = small_img[opaque].mean(axis=0) if opaque.any() else np.full(3, 0.5)
    b_mean = small_img[clear].mean(axis=0) if clear.any() else np.full(3, 0.5)
    return _multilevel(small_img, small_a, np.asarray(f_mean, np.float32), np.asarray(b_mean, np.float32))


def _reduced(image: Image.Image, size: tuple[int, int]) -> _F32:
    """``image`` (RGB or L) area-averaged to ``size`` = (w, h), float32 in [0, 1]."""
    small = np.asarray(image.resize(size, Image.Resampling.BOX, reducing_gap=3.0), np.float32)
    small /= 255.0
    return small


def _band_pixels(alpha: _U8, y0: int, y1: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Rows and columns of the edge band (0 < α < 255) in rows [y0, y1) of ``alpha``,
    rows counted from y0, in row-major order."""
    core = alpha[y0:y1]
    ys, xs = np.nonzero((core > 0) & (core < 255))
    return ys, xs


def _band_colours(
    alpha: _U8, ys: npt.NDArray[np.intp], xs: npt.NDArray[np.intp], pixels: _U8, work: _Working
) -> _U8:
    """F (n, 3) uint8 at the full-resolution band pixels (ys, xs) (image rows and columns)
    whose observed colours are ``pixels`` (n, 3) uint8: one step of the same energy, the
    neighbours' F and B being the working solution sampled bilinearly there."""
    height, width = alpha.shape
    a_i = alpha[ys, xs].astype(np.float32) / 255.0
    weight = np.zeros_like(a_i)
    neighbours = (  # up, down, left, right; edge replicated
        alpha[np.maximum(ys - 1, 0), xs],
        alpha[np.minimum(ys + 1, height - 1), xs],
        alpha[ys, np.maximum(xs - 1, 0)],
        alpha[ys, np.minimum(xs + 1, width - 1)],
    )
    for na in neighbours:
        weight += _REGULARISATION + _GRADIENT_WEIGHT * np.abs(a_i - na.astype(np.float32) / 255.0)
    gy = (ys.astype(np.float32) + 0.5) * work.sy - 0.5
    gx = (xs.astype(np.float32) + 0.5) * work.sx - 0.5
    f_nb = _bilinear_at(work.f, gy, gx)
    b_nb = _bilinear_at(work.b, gy, gx)
    pix = pixels.astype(np.float32) / 255.0
    f, _ = _solve(pix, a_i, weight, weight[:, None] * f_nb, weight[:, None] * b_nb)
    out: _U8 = (f * 255.0 + 0.5).astype(np.uint8)
    return out


def _strips(height: int, width: int) -> list[tuple[int, int]]:
    """Rows [y0, y1) of the full-resolution strips: about ``_STRIP_PIXELS`` each, at least
    8 rows."""
    rows = max(8, _STRIP_PIXELS // max(width, 1))
    return [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]


def estimate_foreground(
    image: npt.ArrayLike,
    alpha: npt.ArrayLike,
    *,
    work_side: int = DEFAULT_WORK_SIDE,
) -> _U8:
    """The subject's own colour F at every pixel of ``image``, so that ``αF + (1−α)C`` over
    any colour C shows no fringe of the photo's original background.

    ``image``: (H, W, 3) uint8 RGB (straight, as decoded); ``alpha``: (H, W) uint8, 255 =
    opaque (the full-resolution matte). ``work_side``: long side in pixels of the working
    resolution of the multi-level solve (≥ 1; images smaller than it are solved at their
    own size, with no full-resolution pass).

    Returns a new (H, W, 3) uint8 RGB array: equal to ``image`` where α is 0 or 255, the
    estimated foreground colour where 0 < α < 255.

    Method: Germer et al. 2020, "Fast Multi-Level Foreground Estimation" (pymatting's
    ``estimate_foreground_ml``: ε = 1e-5, gradient weight 1, 10 sweeps at levels ≤ 32 px),
    solved at ``work_side`` with Jacobi sweeps, then one full-resolution step on the edge
    band, strip by strip (see the module's docstring). Memory: the output, plus about
    60 bytes per working-level pixel and a strip's worth (~1 MP) of floats. Raises
    ``ValueError`` for arrays of the wrong shape or dtype, or ``work_side`` < 1.
    :func:`foreground_cutout` gives the same colours as an RGBA image, in less memory.
    """
    img, a = _check_image_alpha(image, alpha)
    if work_side < 1:
        raise ValueError(f"work_side {work_side}: expected >= 1")
    height, width = a.shape
    if height == 0 or width == 0:
        return img.copy()
    ws, hs = _working_size((width, height), work_side)
    if (ws, hs) == (width, height):
        f_full, _ = _solve_working(img.astype(np.float32) / 255.0, a.astype(np.float32) / 255.0)
        out = img.copy()
        band = (a > 0) & (a < 255)
        out[band] = (f_full[band] * 255.0 + 0.5).astype(np.uint8)
        return out
    small_img = _reduced(Image.fromarray(img), (ws, hs))
    small_a = _reduced(Image.fromarray(a), (ws, hs))
    out = img.copy()  # (after the reduction: its temporary Pillow copy is gone)
    f_small, b_small = _solve_working(small_img, small_a)
    del small_img
    work = _Working(f_small, b_small, hs / height, ws / width)
    # Full resolution: one step of the same energy on the band, neighbours from the solution.
    for y0, y1 in _strips(height, width):
        ys, xs = _band_pixels(a, y0, y1)
        if ys.size:
            ys += y0
            out[ys, xs] = _band_colours(a, ys, xs, img[ys, xs], work)
    return out


def foreground_cutout(
    image: Image.Image,
    alpha: npt.ArrayLike,
    *,
    work_side: int = DEFAULT_WORK_SIDE,
    threads: int = 1,
) -> Image.Image:
    """The cut-out with the subject's own colour: a new RGBA Pillow image of ``image``'s
    size, straight alpha, A = ``alpha``, RGB = :func:`estimate_foreground`'s F (the same
    numbers: the original's pixels where α is 0 or 255, the estimate where 0 < α < 255).
    Composited onto a colour (:func:`place`) it shows no fringe of the old background.

    ``image``: the upright original, mode RGB or RGBA (its colour channels are used; its
    own alpha is not: multiply it into ``alpha`` first), (W, H). ``alpha``: (H, W) uint8,
    255 = opaque. ``work_side``: as for :func:`estimate_foreground`. ``threads``: the
    full-resolution band pass runs on this many threads (numpy releases the GIL).

    Memory: the result (4 bytes a pixel) plus what :func:`estimate_foreground` needs
    besides its output; no full-size array is made (the band pass reads and writes the
    result strip by strip), except a full-size RGB copy of an RGBA ``image``. Raises
    ``ValueError`` for another mode, an ``alpha`` that is not (H, W) uint8, ``work_side``
    < 1 or ``threads`` < 1.
    """
    a = np.asarray(alpha)
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(f"image mode {image.mode!r}: expected 'RGB' or 'RGBA'")
    width, height = image.size
    if a.dtype != np.uint8 or a.shape != (height, width):
        raise ValueError(f"alpha {a.dtype} {a.shape}: expected (H, W) uint8 = {(height, width)}")
    if work_side < 1 or threads < 1:
        raise ValueError(f"work_side {work_side} / threads {threads}: expected >= 1")
    ws, hs = _working_size(image.size, work_side)
    a_image = Image.fromarray(a)
    if (ws, hs) == (width, height) or width == 0 or height == 0:  # small: solved at its own size
        rgb = estimate_foreground(np.asarray(image.convert("RGB")), a, work_side=work_side)
        small_out = Image.fromarray(rgb).convert("RGBA")
        small_out.putalpha(a_image)
        return small_out
    rgb_image = image if image.mode == "RGB" else image.convert("RGB")
    small_img = _reduced(rgb_image, (ws, hs))
    del rgb_image
    small_a = _reduced(a_image, (ws, hs))
    out = image.convert("RGBA") if image.mode == "RGB" else image.copy()
    out.putalpha(a_image)
    f_small, b_small = _solve_working(small_img, small_a)
    del small_img, small_a
    work = _Working(f_small, b_small, hs / height, ws / width)

    def strip(rows: tuple[int, int]) -> tuple[tuple[int, int], Image.Image] | None:
        """The band pixels of rows [y0, y1) with their F, as an RGBA patch of the box
        around them, and where it goes; None without band pixels."""
        y0, y1 = rows
        ys, xs = _band_pixels(a, y0, y1)
        if ys.size == 0:
            return None
        top, left = y0 + int(ys[0]), int(xs.min())
        box = (left, top, int(xs.max()) + 1, y0 + int(ys[-1]) + 1)
        patch = np.array(out.crop(box))  # rows of other strips are never read: no race
        py, px = ys + (y0 - top), xs - left
        patch[py, px, :3] = _band_colours(a, ys + y0, xs, patch[py, px, :3], work)
        return (left, top), Image.fromarray(patch)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dropcut-fg") as pool:
        # each patch holds rows of its own strip only: pasted here, while others are computed
        for done in pool.map(strip, _strips(height, width)):
            if done is not None:
                out.paste(done[1], done[0])
    return out


# --- composites -----------------------------------------------------------------------------------


def composite(
    image: npt.ArrayLike,
    alpha: npt.ArrayLike,
    background: Sequence[int] | None,
    *,
    foreground: npt.ArrayLike | None = None,
) -> _U8:
    """The cut-out over a solid colour, or as straight-alpha RGBA.

    ``image``: (H, W, 3) uint8 RGB; ``alpha``: (H, W) uint8, 255 = opaque;
    ``background``: (r, g, b) 0–255, or None for a transparent result;
    ``foreground``: (H, W, 3) uint8 from :func:`estimate_foreground` (recommended over a
    colour: without it the photo's old background shows in the edge), else ``image``.

    Returns, with a colour, an (H, W, 3) uint8 RGB array ``round((α·F + (255−α)·C) / 255)``
    per channel — exactly C where α = 0, exactly F where α = 255; with None, an (H, W, 4)
    uint8 RGBA array, RGB = F, A = α (straight alpha). Integer arithmetic, in strips of
    rows (no full-size float array). Raises ``ValueError`` for shapes/dtypes that do not
    match or a colour out of range.
    """
    img, a = _check_image_alpha(image, alpha)
    fg = img
    if foreground is not None:
        fg, _ = _check_image_alpha(foreground, a)
        if fg.shape != img.shape:
            raise ValueError(f"foreground {fg.shape} != image {img.shape}")
    height, width = a.shape
    if background is None:
        out = np.empty((height, width, 4), np.uint8)
        out[..., :3] = fg
        out[..., 3] = a
        return out
    colour = np.asarray(_check_colour(background), np.uint16)
    out = np.empty((height, width, 3), np.uint8)
    rows_per = max(8, _STRIP_PIXELS // max(width, 1))
    for y0 in range(0, height, rows_per):
        y1 = min(height, y0 + rows_per)
        a16 = a[y0:y1, :, None].astype(np.uint16)
        acc = fg[y0:y1].astype(np.uint16) * a16
        acc += (255 - a16) * colour
        acc += 127
        acc //= 255
        out[y0:y1] = acc
    return out


# --- geometry -------------------------------------------------------------------------------------


class LayoutLike(Protocol):
    """What :func:`apply_layout` needs of ``recipes.layout()``'s result.

    ``crop``: (x0, y0, x1, y1) in source pixels (x1, y1 exclusive, fractional allowed);
    ``scale``: output pixels per source pixel; ``size``: (w, h) the crop becomes on the
    canvas; ``canvas``: (W, H) of the output; ``offset``: (x, y) in canvas pixels where
    the crop's top-left corner lands.
    """

    @property
    def crop(self) -> tuple[float, float, float, float]: ...
    @property
    def scale(self) -> float: ...
    @property
    def canvas(self) -> tuple[int, int]: ...
    @property
    def size(self) -> tuple[int, int]: ...
    @property
    def offset(self) -> tuple[int, int]: ...


def crop_and_place(
    image: Image.Image | npt.ArrayLike,
    crop_box: tuple[float, float, float, float],
    scale: float,
    canvas_size: tuple[int, int],
    offset: tuple[int, int],
    background: Sequence[int] | int | None,
    *,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Crop ``image``, scale it, and place it on a canvas.

    ``image``: a Pillow image or array of mode RGB ((H, W, 3) uint8), RGBA ((H, W, 4)
    uint8, straight alpha) or L ((H, W) uint8: a mask). ``crop_box``: (x0, y0, x1, y1) in
    source pixels, x1/y1 exclusive, floats allowed; parts outside the source become
    background. ``scale``: output pixels per source pixel (> 0). ``canvas_size``: (W, H)
    of the result. ``offset``: (x, y), canvas pixel of the crop box's top-left corner.
    ``background``: (r, g, b) for an opaque RGB canvas; None for a transparent RGBA
    canvas (for an L image: a 0 canvas); an int 0–255 for an L canvas. ``size``: (w, h)
    the whole crop box becomes on the canvas (``recipes.Layout.size``); default
    ``round(crop size × scale)``.

    Source point (x, y) lands at canvas ``(offset_x + (x − x0)·size_w/(x1 − x0),
    offset_y + (y − y0)·size_h/(y1 − y0))`` (``recipes.Layout.to_canvas``), i.e. about
    ``offset + (x − x0)·scale``. The crop region inside the source is resized with LANCZOS (Pillow
    reduces by an integer factor first when shrinking a lot, ``reducing_gap=3``; RGBA is
    resized premultiplied, so no dark fringe). An RGBA image on a colour is blended
    (straight alpha) into an RGB canvas. Returns a new Pillow image of mode RGB (colour
    background), RGBA (None, colour image) or L (mask). Raises ``ValueError`` for other
    modes, scale ≤ 0, an empty canvas or crop box, or a background that does not fit the
    mode.
    """
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if im.mode not in ("RGB", "RGBA", "L"):
        raise ValueError(f"image mode {im.mode!r}: expected RGB, RGBA or L")
    cw, ch = int(canvas_size[0]), int(canvas_size[1])
    if cw < 1 or ch < 1:
        raise ValueError(f"canvas {canvas_size}: expected positive width and height")
    if not scale > 0:
        raise ValueError(f"scale {scale}: expected > 0")
    canvas_colour: tuple[int, ...] | int
    if im.mode == "L":
        if isinstance(background, Sequence):
            raise ValueError("an L (mask) image takes an int background or None")
        mode, canvas_colour = "L", 0 if background is None else int(background)
        if not 0 <= canvas_colour <= 255:
            raise ValueError(f"background {background}: expected 0-255")
    elif background is None:
        mode, canvas_colour = "RGBA", (0, 0, 0, 0)
    elif isinstance(background, int):
        raise ValueError("a colour image takes an (r, g, b) background or None")
    else:
        mode, canvas_colour = "RGB", _check_colour(background)
    canvas = Image.new(mode, (cw, ch), canvas_colour)
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"crop {crop_box}: expected x0 < x1 and y0 < y1")
    if size is None:
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size {size}: expected at least 1x1")
    # canvas pixels per source pixel, exactly (size may differ from crop × scale by < 1 px)
    fx, fy = size[0] / (x1 - x0), size[1] / (y1 - y0)
    # the part of the crop inside the source
    sx0, sy0 = max(x0, 0.0), max(y0, 0.0)
    sx1, sy1 = min(x1, float(im.width)), min(y1, float(im.height))
    if sx1 <= sx0 or sy1 <= sy0:
        return canvas
    # its place on the canvas, in whole pixels
    px0 = offset[0] + round((sx0 - x0) * fx)
    py0 = offset[1] + round((sy0 - y0) * fy)
    px1 = offset[0] + round((sx1 - x0) * fx)
    py1 = offset[1] + round((sy1 - y0) * fy)
    if px1 <= px0 or py1 <= py0:
        return canvas
    # only what lands on the canvas is resized
    vx0, vy0, vx1, vy1 = max(px0, 0), max(py0, 0), min(px1, cw), min(py1, ch)
    if vx1 <= vx0 or vy1 <= vy0:
        return canvas
    kx = (sx1 - sx0) / (px1 - px0)
    ky = (sy1 - sy0) / (py1 - py0)
    box = (
        sx0 + (vx0 - px0) * kx,
        sy0 + (vy0 - py0) * ky,
        sx0 + (vx1 - px0) * kx,
        sy0 + (vy1 - py0) * ky,
    )
    out_size = (vx1 - vx0, vy1 - vy0)
    if out_size == (round(box[2] - box[0]), round(box[3] - box[1])) and all(
        float(v).is_integer() for v in box
    ):  # 1:1: no resampling, pasted strip by strip (no copy of the crop)
        _paste_strips(canvas, im, (int(box[0]), int(box[1]), int(box[2]), int(box[3])), (vx0, vy0))
        return canvas
    part = im.resize(out_size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    if part.mode == "RGBA" and mode == "RGB":
        canvas.paste(part, (vx0, vy0), part)  # blended with its own alpha
    else:
        canvas.paste(part, (vx0, vy0))
    return canvas


def apply_layout(
    image: Image.Image | npt.ArrayLike, layout: LayoutLike, background: Sequence[int] | int | None
) -> Image.Image:
    """:func:`crop_and_place` with the numbers of a ``recipes.Layout`` (see
    :class:`LayoutLike`)."""
    return crop_and_place(
        image, layout.crop, layout.scale, layout.canvas, layout.offset, background, size=layout.size
    )


#: Reach of Pillow's LANCZOS filter: 3 pixels of the larger of the source and output grids.
_LANCZOS_SUPPORT = 3.0


def _paste_strips(
    canvas: Image.Image, image: Image.Image, box: tuple[int, int, int, int], at: tuple[int, int]
) -> None:
    """Paste the whole-pixel ``box`` of ``image`` onto ``canvas`` at ``at``, about a
    megapixel at a time (no copy of the box). An RGBA image on an RGB canvas is blended
    with its own alpha: ``(α·F + (255−α)·C) / 255`` rounded, as :func:`composite` does."""
    x0, y0, x1, y1 = box
    for s0, s1 in _strips(y1 - y0, x1 - x0):
        part = image.crop((x0, y0 + s0, x1, y0 + s1))
        pos = (at[0], at[1] + s0)
        if part.mode == "RGBA" and canvas.mode == "RGB":
            canvas.paste(part, pos, part)  # the mask: the part's own alpha
        else:
            canvas.paste(part, pos)


def filter_reach(
    crop: tuple[float, float, float, float], scale: float, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The source pixels that resizing ``crop`` (x0, y0, x1, y1 in source pixels,
    fractional) by ``scale`` (output pixels per source pixel, > 0) with LANCZOS reads: the
    crop's whole-pixel bounds widened on every side by the filter's reach, ``3 · max(1,
    1/scale)`` source pixels, plus one for rounding (Pillow's integer reduction before a
    large shrink reads no further), clipped to the source's ``size`` = (W, H). Returns
    (x0, y0, x1, y1), x1/y1 exclusive (empty when the crop lies outside the source).
    Raises ``ValueError`` for scale ≤ 0."""
    if not scale > 0:
        raise ValueError(f"scale {scale}: expected > 0")
    x0, y0, x1, y1 = crop
    pad = math.ceil(_LANCZOS_SUPPORT * max(1.0, 1.0 / scale)) + 1
    return (
        max(0, math.floor(x0) - pad),
        max(0, math.floor(y0) - pad),
        min(size[0], math.ceil(x1) + pad),
        min(size[1], math.ceil(y1) + pad),
    )


def place(
    source: Image.Image | npt.ArrayLike, layout: LayoutLike, background: Sequence[int] | int | None
) -> Image.Image:
    """:func:`apply_layout` for a cut-out that is composited onto the background first,
    touching only the part of the source the layout reads.

    ``source``: the cut-out, RGBA (straight alpha: :func:`foreground_cutout`), as a Pillow
    image or (H, W, 4) uint8 array; or RGB ((H, W, 3)), or L ((H, W): a mask).
    ``layout``: see :class:`LayoutLike`. ``background``: as for :func:`crop_and_place`.

    An RGBA source on a colour gives the same pixels as ``apply_layout(composite(F, α,
    colour), layout, colour)`` — composited at full resolution, then cropped, scaled and
    placed (no premultiplied resize, no small-size blend): exactly when the layout does not
    scale (compositing is per pixel, so crop then composite is composite then crop), within
    one level when it does (the same LANCZOS resize, of the composite of the crop plus the
    filter's reach, :func:`filter_reach`, whose coordinates differ by a whole-pixel shift).
    Other sources give :func:`apply_layout`'s result (scaled: within one level, from the
    filter's reach cut out first). Unscaled outputs are pasted onto the canvas strip by
    strip. Returns a new Pillow image of mode RGB (colour), RGBA (None, colour source) or
    L (mask). Raises ``ValueError`` as :func:`crop_and_place` does.
    """
    im = source if isinstance(source, Image.Image) else Image.fromarray(np.asarray(source, np.uint8))
    x0, y0, x1, y1 = layout.crop
    unscaled = layout.scale == 1 and all(float(v).is_integer() for v in layout.crop)
    rx0, ry0, rx1, ry1 = reach = filter_reach(layout.crop, layout.scale, im.size)
    if unscaled or rx1 <= rx0 or ry1 <= ry0:
        return apply_layout(im, layout, background)  # strip by strip, blended exactly
    if im.mode == "RGBA" and isinstance(background, Sequence):
        part = Image.new("RGB", (rx1 - rx0, ry1 - ry0), _check_colour(background))
        _paste_strips(part, im, reach, (0, 0))  # the composite, of what the filter reads only
    else:
        part = im.crop(reach)
    crop = (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0)
    return crop_and_place(
        part, crop, layout.scale, layout.canvas, layout.offset, background, size=layout.size
    )


# --- encoders -------------------------------------------------------------------------------------


def _as_image(image: Image.Image | npt.ArrayLike, modes: tuple[str, ...]) -> Image.Image:
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if im.mode not in modes:
        raise ValueError(f"image mode {im.mode!r}: expected {' or '.join(modes)}")
    return im


def _write(
    im: Image.Image,
    dest: Path,
    fmt: str,
    params: dict[str, object],
    *,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> int:
    """Save ``im`` to ``dest`` (created/truncated) with ``params`` and the ICC profile and
    EXIF given (either may be None), flush and fsync; unlink on failure."""
    if icc_profile:
        params = {**params, "icc_profile": icc_profile}
    exif_bytes = _exif_with_header(exif)
    if exif_bytes:
        params = {**params, "exif": exif_bytes}
    try:
        with open(dest, "wb") as fh:
            im.save(fh, format=fmt, **params)
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()
    except BaseException:
        try:
            os.unlink(dest)
        except OSError:
            pass
        raise


def _exif_with_header(exif: bytes | None) -> bytes | None:
    """EXIF as Pillow's JPEG/WebP writers expect it: with the ``Exif\\0\\0`` header."""
    if not exif:
        return None
    return exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif


def save_jpeg(
    image: Image.Image | npt.ArrayLike,
    dest: Path,
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
    quality: int = DEFAULT_JPEG_QUALITY,
    subsampling: int = DEFAULT_JPEG_SUBSAMPLING,
    optimize: bool = False,
) -> int:
    """Write ``image`` as a baseline JPEG to ``dest`` and fsync it; returns its size in bytes.

    ``image``: RGB only (Pillow image or (H, W, 3) uint8) — never CMYK, never alpha:
    composite onto a colour first (:func:`composite`). ``dest``: a fresh staging path
    (created or truncated; removed if writing fails). ``icc_profile``: the profile the
    pixels are in, or None; ``exif``: EXIF bytes with or without the ``Exif\\0\\0`` header
    (Orientation and GPS already handled by the caller), or None. ``quality``: 1–100;
    ``subsampling``: 0 = 4:4:4 (default), 1 = 4:2:2, 2 = 4:2:0. ``optimize``: optimised
    Huffman tables — a few % smaller, but libjpeg then holds every DCT coefficient of the
    image (6 bytes a pixel at 4:4:4: +140 MB at 24 MP), so off by default.

    Raises ``ValueError`` for another mode, quality or subsampling out of range, or EXIF
    over 65533 bytes (one APP1 segment; Pillow's message); ``OSError`` for I/O failures.
    """
    im = _as_image(image, ("RGB",))
    if not 1 <= quality <= 100:
        raise ValueError(f"quality {quality}: expected 1-100")
    if subsampling not in (0, 1, 2):
        raise ValueError(f"subsampling {subsampling}: expected 0 (4:4:4), 1 (4:2:2) or 2 (4:2:0)")
    params: dict[str, object] = {"quality": quality, "subsampling": subsampling, "optimize": optimize}
    return _write(im, dest, "JPEG", params, icc_profile=icc_profile, exif=exif)


def save_webp(
    image: Image.Image | npt.ArrayLike,
    dest: Path,
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
    quality: int = DEFAULT_WEBP_QUALITY,
    lossless: bool = False,
    method: int = DEFAULT_WEBP_METHOD,
) -> int:
    """Write ``image`` as WebP to ``dest`` and fsync it; returns its size in bytes.

    ``image``: RGB (opaque) or RGBA (straight alpha, kept: the transparent variant), as a
    Pillow image or (H, W, 3|4) uint8. ``icc_profile``/``exif`` as for :func:`save_jpeg`
    (ICCP and EXIF chunks). ``quality``: 0–100 (lossy; the alpha plane is lossless);
    ``lossless``: True for lossless WebP; ``method``: libwebp effort 0–6. WebP is limited
    to 16383 px a side.

    A lossy WebP keeps every macroblock's prediction modes in a first partition of at most
    512 KiB. Methods 0 and 1 choose modes without weighing their cost, so a large, busy
    image overflows it (libwebp's ``VP8_ENC_ERROR_PARTITION0_OVERFLOW``; measured: a 24 MP
    opaque photograph at quality 92, a 100 MP cut-out). The image is then encoded again at
    method :data:`WEBP_OVERFLOW_METHOD`, which fits the modes in (the time of one more
    encode; a smaller file). Raises ``ValueError`` for another mode, out-of-range numbers,
    a side over 16383 or an encoder error; ``OSError`` for I/O failures.
    """
    im = _as_image(image, ("RGB", "RGBA"))
    if not 0 <= quality <= 100 or not 0 <= method <= 6:
        raise ValueError(f"quality {quality} / method {method}: expected 0-100 / 0-6")
    if max(im.size) > 16383:
        raise ValueError(f"{im.size}: WebP is limited to 16383 px a side")
    params: dict[str, object] = {"quality": quality, "lossless": lossless, "method": method, "exact": False}
    try:
        return _write(im, dest, "WEBP", params, icc_profile=icc_profile, exif=exif)
    except ValueError as exc:
        if lossless or method >= WEBP_OVERFLOW_METHOD or str(exc) != _WEBP_PARTITION0_OVERFLOW:
            raise
    params["method"] = WEBP_OVERFLOW_METHOD
    return _write(im, dest, "WEBP", params, icc_profile=icc_profile, exif=exif)


def save_mask(
    alpha: Image.Image | npt.ArrayLike,
    dest: Path,
    *,
    exif: bytes | None = None,
    compress_level: int = 1,
) -> int:
    """Write the matte as an 8-bit greyscale PNG (colour type 0, values = α) to ``dest``
    and fsync it; returns its size in bytes.

    ``alpha``: (H, W) uint8 or a Pillow image of mode L. ``exif``: as for
    :func:`save_jpeg` (an ``eXIf`` chunk), or None. No ICC profile: a mask is coverage,
    not colour, and PNG allows only a greyscale profile on a greyscale image (an RGB
    photo's profile would make the file invalid). ``compress_level``: zlib 0–9.
    Raises ``ValueError`` for another mode; ``OSError`` for I/O failures.
    """
    im = _as_image(alpha, ("L",))
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level {compress_level}: expected 0-9")
    params: dict[str, object] = {"compress_level": compress_level}
    return _write(im, dest, "PNG", params, exif=exif)


def save_png(
    image: Image.Image | npt.ArrayLike,
    dest: Path,
    *,
    icc_profile: bytes | None,
    exif: bytes | None,
    compress_level: int = 1,
) -> int:
    """Write a placed output (RGB, or RGBA with straight alpha) as PNG to ``dest`` and
    fsync it; returns its size in bytes. ``icc_profile``, ``exif``: as for
    :func:`save_jpeg`; ``compress_level``: zlib 0–9. Raises ``ValueError`` for another
    mode; ``OSError`` for I/O failures."""
    im = _as_image(image, ("RGB", "RGBA"))
    params: dict[str, object] = {"compress_level": compress_level}
    return _write(im, dest, "PNG", params, icc_profile=icc_profile, exif=exif)

"""Builders of real-looking test photos, written into a folder (tmp_path) in well under a
second each: a synthetic scene (sky-like gradient, a sharp dark subject, sensor noise, a
green marker in its top-left corner) stored the ways phones and cameras store it: EXIF
orientation, HEIC, CMYK with and without a profile, Display P3, 16 bits, MPO, multi-page,
animated, camera raw.

The ICC profiles are built here byte by byte (ICC.1:2001-04, version 2 layout) because
Pillow / LittleCMS can create only sRGB, Lab and XYZ profiles: a Display P3 matrix/TRC
profile (Apple's published colorants) and a small CMYK printer profile whose A2B0 table
holds FOGRA39-like Lab values of paper, inks and overprints.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, TiffImagePlugin, TiffTags

MARKER = (40, 220, 60)  # the marker's colour: a green no other part of the scene has
UPRIGHT_SIZE = (360, 240)  # (width, height) of the scene as a person sees it

# Orientation value -> how the upright scene is stored so that applying the orientation
# (EXIF 2.32, tag 274) shows it upright again: the inverse of each orientation's transform.
STORED_AS: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # shown rotated 90 degrees clockwise: stored counter-clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def scene_array(size: tuple[int, int] = UPRIGHT_SIZE, seed: int = 7) -> npt.NDArray[np.uint8]:
    """(height, width, 3) uint8: a vertical sky gradient, a horizontal warm gradient, a
    dark red disc (the sharp subject), sensor noise, and a green marker square in the
    top-left corner (1/8 of each side, from 1/16 in)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 90 + 110 * x / width
    img[..., 1] = 120 + 80 * (1 - y / height)
    img[..., 2] = 200 - 90 * y / height
    disc = (x - width * 0.6) ** 2 + (y - height * 0.6) ** 2 < (min(width, height) * 0.25) ** 2
    img[disc] = (110, 25, 30)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    mx, my = width // 16, height // 16
    img[my : my + height // 8, mx : mx + width // 8] = MARKER
    return np.clip(img, 0, 255).astype(np.uint8)


def scene(size: tuple[int, int] = UPRIGHT_SIZE, seed: int = 7) -> Image.Image:
    return Image.fromarray(scene_array(size, seed), "RGB")


def marker_corner(img: Image.Image) -> str:
    """Which quarter of ``img`` ("top-left", "top-right", "bottom-left", "bottom-right")
    holds most of the marker's green."""
    rgb = np.asarray(img.convert("RGB")).astype(np.int16)
    green = (np.abs(rgb - np.array(MARKER, np.int16)).sum(axis=2) < 60).astype(np.int32)
    h, w = green.shape
    quarters = {
        "top-left": green[: h // 2, : w // 2].sum(),
        "top-right": green[: h // 2, w // 2 :].sum(),
        "bottom-left": green[h // 2 :, : w // 2].sum(),
        "bottom-right": green[h // 2 :, w // 2 :].sum(),
    }
    return max(quarters, key=lambda k: int(quarters[k]))


def exif_block(orientation: int | None = None, gps: bool = False) -> Image.Exif:
    """EXIF as a phone writes it: Make, Model, DateTime, an Exif IFD (exposure), and with
    ``gps`` a GPS IFD (a position in Lisbon)."""
    exif = Image.Exif()
    exif[271] = "Dropcut Phone Co."
    exif[272] = "Model 7"
    exif[306] = "2024:05:01 10:20:30"
    if orientation is not None:
        exif[274] = orientation
    exif[0x8769] = {0x829A: 1 / 125, 0x8827: 200}  # ExposureTime, ISO
    if gps:
        exif[0x8825] = {1: "N", 2: (38.0, 43.0, 22.0), 3: "W", 4: (9.0, 8.0, 20.0)}
    return exif


def oriented_jpeg(path: Path, orientation: int, *, gps: bool = False, quality: int = 92) -> Path:
    """The scene stored turned so that EXIF ``orientation`` shows it upright."""
    method = STORED_AS[orientation]
    stored = scene() if method is None else scene().transpose(method)
    stored.save(path, "JPEG", quality=quality, exif=exif_block(orientation, gps=gps).tobytes())
    return path


def big_jpeg(path: Path, size: tuple[int, int] = (6000, 4000), quality: int = 95) -> Path:
    """A camera-sized JPEG (24 MP by default) of a noisy scene: over 10 MB at quality 95,
    as a high-ISO photograph is."""
    small = scene((size[0] // 8, size[1] // 8))
    base = np.asarray(small.resize(size, Image.Resampling.BILINEAR)).astype(np.int16)
    rng = np.random.default_rng(3)
    noise = rng.integers(-40, 41, size=(size[1], size[0], 1), dtype=np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    del base, noise
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=quality, subsampling=0)
    return path


def heic(path: Path, orientation: int = 1, quality: int = 90) -> Path:
    """The scene as an iPhone stores it: HEIC (HEVC in HEIF), with EXIF."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    method = STORED_AS[orientation]
    img = scene() if method is None else scene().transpose(method)
    img.save(path, "HEIF", quality=quality, exif=exif_block(orientation).tobytes())
    return path


# --- ICC profiles (ICC.1:2001-04, version 2) ----------------------------------------------------


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


def _text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


D50 = (0.9642, 1.0, 0.8249)


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2 profile of ``tags`` ((signature, data) each; equal data is shared)."""
    table = b""
    body = b""
    offset = 128 + 4 + 12 * len(tags)
    placed: dict[bytes, int] = {}
    for sig, data in tags:
        if data not in placed:
            placed[data] = offset + len(body)
            body += data + bytes(-len(data) % 4)
        table += sig + struct.pack(">II", placed[data], len(data))
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + device_class
        + space
        + pcs
        + bytes(12)  # date
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8)  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15(D50[0])
        + _s15(D50[1])
        + _s15(D50[2])
        + bytes(4 + 16 + 28)  # creator, profile ID, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


# Display P3: P3 primaries, D65 white, the sRGB transfer curve; colorants adapted to D50
# (Bradford), as in Apple's "Display P3" profile.
P3_COLORANTS = ((0.51512, 0.24120, -0.00105), (0.29198, 0.69225, 0.04189), (0.15710, 0.06657, 0.78407))


def display_p3_icc() -> bytes:
    """A Display P3 matrix/TRC profile (monitor class, RGB, PCS XYZ)."""
    srgb_curve = b"para\0\0\0\0" + struct.pack(">HH", 3, 0)
    srgb_curve += b"".join(_s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    return _profile(
        b"mntr",
        b"RGB ",
        b"XYZ ",
        [
            (b"desc", _desc("Display P3 (dropcut test)")),
            (b"wtpt", _xyz(*D50)),
            (b"rXYZ", _xyz(*P3_COLORANTS[0])),
            (b"gXYZ", _xyz(*P3_COLORANTS[1])),
            (b"bXYZ", _xyz(*P3_COLORANTS[2])),
            (b"rTRC", srgb_curve),
            (b"gTRC", srgb_curve),
            (b"bTRC", srgb_curve),
            (b"cprt", _text("Public domain test data")),
        ],
    )


# Lab (D50) of each corner of the CMYK cube, indexed (C, M, Y, K) in {0, 1}: paper, solid
# inks and overprints, close to FOGRA39 (ISO coated v2) characterisation data.
CMYK_CORNERS: dict[tuple[int, int, int, int], tuple[float, float, float]] = {
    (0, 0, 0, 0): (95.0, 0.0, -2.0),
    (1, 0, 0, 0): (55.0, -37.0, -50.0),
    (0, 1, 0, 0): (48.0, 74.0, -3.0),
    (0, 0, 1, 0): (89.0, -5.0, 93.0),
    (1, 1, 0, 0): (23.0, 17.0, -46.0),
    (1, 0, 1, 0): (50.0, -65.0, 27.0),
    (0, 1, 1, 0): (47.0, 68.0, 48.0),
    (1, 1, 1, 0): (23.0, 0.0, 0.0),
    (0, 0, 0, 1): (16.0, 0.0, 0.0),
    (1, 0, 0, 1): (12.0, -5.0, -10.0),
    (0, 1, 0, 1): (12.0, 10.0, 0.0),
    (0, 0, 1, 1): (15.0, 0.0, 10.0),
    (1, 1, 0, 1): (9.0, 3.0, -8.0),
    (1, 0, 1, 1): (10.0, -8.0, 2.0),
    (0, 1, 1, 1): (10.0, 8.0, 5.0),
    (1, 1, 1, 1): (8.0, 0.0, 0.0),
}


def cmyk_icc() -> bytes:
    """A CMYK output profile: A2B0 a lut16Type (``mft2``) with a 2-point grid whose
    corners are :data:`CMYK_CORNERS`, PCS Lab in the version 2 16-bit encoding."""
    clut = b""
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lab_l, lab_a, lab_b = CMYK_CORNERS[(c, m, y, k)]
                    clut += struct.pack(
                        ">HHH", round(lab_l * 652.80), round((lab_a + 128) * 256), round((lab_b + 128) * 256)
                    )
    identity = struct.pack(">HH", 0, 65535)
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft2\0\0\0\0" + struct.pack(">BBBB", 4, 3, 2, 0) + matrix + struct.pack(">HH", 2, 2)
    lut += identity * 4 + clut + identity * 3
    return _profile(
        b"prtr",
        b"CMYK",
        b"Lab ",
        [
            (b"desc", _desc("Coated CMYK (dropcut test)")),
            (b"wtpt", _xyz(*D50)),
            (b"A2B0", lut),
            (b"cprt", _text("Public domain test data")),
        ],
    )


def cmyk_patches() -> Image.Image:
    """A CMYK image of four 64x64 patches side by side: paper, cyan, magenta, yellow."""
    img = Image.new("CMYK", (256, 64))
    for i, ink in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0)]):
        img.paste(ink, (i * 64, 0, i * 64 + 64, 64))
    return img


def lab_to_srgb(lab: tuple[float, float, float]) -> tuple[float, float, float]:
    """CIE Lab (D50) -> 8-bit sRGB (Bradford D50 -> D65, IEC 61966-2-1 curve), unclipped
    to the nearest level but clipped to 0..255: the expected value, computed without
    LittleCMS."""
    lab_l, lab_a, lab_b = lab
    fy = (lab_l + 16) / 116
    fx, fz = fy + lab_a / 500, fy - lab_b / 200

    def inv(t: float) -> float:
        return t**3 if t > 6 / 29 else 3 * (6 / 29) ** 2 * (t - 4 / 29)

    xyz50 = np.array([D50[0] * inv(fx), D50[1] * inv(fy), D50[2] * inv(fz)])
    bradford = np.array(
        [
            [0.9555766, -0.0230393, 0.0631636],
            [-0.0282895, 1.0099416, 0.0210077],
            [0.0122982, -0.0204830, 1.3299098],
        ]
    )
    to_srgb = np.array(
        [
            [3.2404542, -1.5371385, -0.4985314],
            [-0.9692660, 1.8760108, 0.0415560],
            [0.0556434, -0.2040259, 1.0572252],
        ]
    )
    linear = np.clip(to_srgb @ (bradford @ xyz50), 0, 1)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    r, g, b = (float(v) * 255 for v in encoded)
    return r, g, b


def p3_to_srgb(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """A Display P3 colour -> sRGB (both D65, the same curve: one 3x3 matrix), clipped."""
    p3 = np.array(rgb, np.float64) / 255
    linear = np.where(p3 <= 0.04045, p3 / 12.92, ((p3 + 0.055) / 1.055) ** 2.4)
    matrix = np.array([[1.2249, -0.2247, 0.0], [-0.0420, 1.0419, 0.0], [-0.0197, -0.0786, 1.0979]])
    out = np.clip(matrix @ linear, 0, 1)
    encoded = np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055)
    r, g, b = (float(v) * 255 for v in encoded)
    return r, g, b


# --- 16 bits -------------------------------------------------------------------------------------


def scene16(size: tuple[int, int] = (240, 160), low: int = 3000, high: int = 9000) -> npt.NDArray[np.uint16]:
    """(height, width, 3) uint16: the scene's values mapped into ``low..high`` (a part of
    the 16-bit range, as a 12-bit sensor's or a dim scan's data is)."""
    base = scene_array(size).astype(np.float64)
    return np.rint(low + base * (high - low) / 255).astype(np.uint16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(path: Path, samples: npt.NDArray[np.uint16]) -> Path:
    """A 16-bit PNG of ``samples``: (h, w) grey, (h, w, 3) RGB or (h, w, 4) RGBA (Pillow
    cannot write 16-bit colour PNGs)."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = samples.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def tiff16_rgb(path: Path, samples: npt.NDArray[np.uint16], big_endian: bool = False) -> Path:
    """An uncompressed 48-bit RGB TIFF (one strip) of ``samples`` (h, w, 3)."""
    height, width = samples.shape[:2]
    order = ">" if big_endian else "<"
    pixels = samples.astype(order + "u2").tobytes()
    entries = [  # (tag, type, count, value or offset)
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, 0),  # BitsPerSample: offset filled below
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 0),  # StripOffsets: filled below
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = ifd_offset + ifd_size
    strip_offset = bits_offset + 6
    ifd = struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_offset
        elif tag == 273:
            value = strip_offset
        if kind == 3 and count == 1:
            ifd += struct.pack(order + "HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack(order + "HHII", tag, kind, count, value)
    ifd += struct.pack(order + "I", 0)
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "I", ifd_offset)
    path.write_bytes(head + ifd + struct.pack(order + "HHH", 16, 16, 16) + pixels)
    return path


# --- frames and raw ----------------------------------------------------------------------------


def mpo(path: Path) -> Path:
    """A two-picture MPO (a stereo camera's file): the scene first (the primary image),
    then a second view of it, mirrored and darker."""
    primary = scene()
    second = Image.eval(primary.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lambda v: v // 2)
    primary.save(path, "MPO", save_all=True, append_images=[second], quality=90)
    return path


def multipage_tiff(path: Path, pages: int = 3) -> Path:
    frames = [scene(seed=i) for i in range(pages)]
    frames[0].save(path, "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw")
    return path


def animated_gif(path: Path, frames: int = 4) -> Path:
    images = [scene((120, 80), seed=i).convert("P") for i in range(frames)]
    images[0].save(path, "GIF", save_all=True, append_images=images[1:], duration=80, loop=0)
    return path


def raw_like_tiff(path: Path, *, preview: bool = False, dng: bool = False) -> Path:
    """A TIFF shaped like a camera raw file: with ``preview`` its first IFD is a small
    preview (NewSubfileType = 1, as NEF and ARW start) and names a camera maker; with
    ``dng`` it carries DNGVersion 1.4.0.0 (tag 50706)."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[271] = "NIKON CORPORATION"
    if preview:
        ifd[254] = 1
    if dng:
        ifd[50706] = b"\x01\x04\x00\x00"
        ifd.tagtype[50706] = TiffTags.BYTE
    img = scene((160, 120)) if preview else scene()
    img.save(path, "TIFF", tiffinfo=ifd)
    return path


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()

"""dropcut.compose: foreground estimation against a green-screen scene with a known alpha
(the halo measurement of issue 11, item 4), composites, crop/scale/place, and the JPEG /
WebP / mask encoders with their ICC profile and EXIF.

``green_screen_scene`` is also used by ``bench/compose.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw, ImageFilter

from dropcut import compose
from dropcut.compose import (
    apply_layout,
    composite,
    crop_and_place,
    estimate_foreground,
    filter_reach,
    foreground_cutout,
    place,
    save_jpeg,
    save_mask,
    save_webp,
)
from dropcut.recipes import Layout

GREEN = (0, 255, 0)
WHITE = (255, 255, 255)


# --- a subject shot on a saturated green background, alpha known ----------------------------


def green_screen_scene(
    size: tuple[int, int] = (1200, 800), seed: int = 3, ss: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head-like subject with a soft (blurred) outline and ~150 hair-like strands (1–3 px,
    partly transparent) on pure saturated green, with camera-like noise.

    Returns (image (H, W, 3) uint8 = αF + (1−α)·green + noise, alpha (H, W) uint8 (ground
    truth), F (H, W, 3) uint8: the subject's true colour, whose green never exceeds the
    mean of its red and blue — so any green excess in a composite is the old background).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    big = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = w * 0.5 * ss, h * 0.58 * ss, min(w, h) * 0.3 * ss
    draw.ellipse([(cx - r, cy - r * 1.1), (cx + r, cy + r * 1.1)], fill=255)
    body = big.reduce(ss).filter(ImageFilter.GaussianBlur(2.0))  # a soft outline
    strands = Image.new("L", (w * ss, h * ss), 0)
    sd = ImageDraw.Draw(strands)
    for _ in range(150):
        t = rng.uniform(np.pi * 0.05, np.pi * 0.95)  # upper half
        x, y = cx + r * 0.9 * np.cos(t), cy - r * 1.0 * np.sin(t)
        length = rng.uniform(0.2, 0.6) * r
        pts = []
        ang = t
        for _k in range(12):
            pts.append((x, y))
            ang += rng.normal(0, 0.08)
            x += np.cos(ang) * length / 12
            y -= np.sin(ang) * length / 12
        sd.line(pts, fill=int(rng.uniform(120, 255)), width=int(rng.integers(3, 10)))
    strands_a = np.asarray(strands.reduce(ss), np.float32)
    alpha_f = np.maximum(np.asarray(body, np.float32), strands_a)
    alpha = np.clip(alpha_f + 0.5, 0, 255).astype(np.uint8)
    # the subject: warm brown hair and skin, textured, G <= (R+B)/2 everywhere
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = 0.5 + 0.25 * np.sin(xx / 7.0 + yy / 13.0) + 0.25 * rng.random((h, w), dtype=np.float32)
    fg = np.stack([150 + 80 * tex, 80 + 40 * tex, 60 + 40 * tex], axis=2)
    fg[..., 1] = np.minimum(fg[..., 1], (fg[..., 0] + fg[..., 2]) / 2)
    a = alpha.astype(np.float32)[..., None] / 255.0
    bg = np.broadcast_to(np.asarray(GREEN, np.float32), fg.shape)
    noisy = a * fg + (1 - a) * bg + rng.normal(0, 3.0, fg.shape)
    image = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    return image, alpha, np.clip(fg + 0.5, 0, 255).astype(np.uint8)


def green_excess(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean of max(0, G − (R+B)/2) over the pixels of ``mask``, in 8-bit levels."""
    px = rgb[mask].astype(np.float32)
    return float(np.maximum(0.0, px[:, 1] - (px[:, 0] + px[:, 2]) / 2).mean())


def _white_jpeg(
    tmp_path: Path, name: str, image: np.ndarray, alpha: np.ndarray, fg: np.ndarray | None
) -> np.ndarray:
    rgb = composite(image, alpha, WHITE, foreground=fg)
    dest = tmp_path / name
    save_jpeg(rgb, dest, icc_profile=None, exif=None)
    with Image.open(dest) as im:
        return np.asarray(im.convert("RGB"))


def test_halo_green_excess_is_lower_with_foreground_estimation(tmp_path: Path) -> None:
    """Issue 11, item 4: the edge band of the white JPEG, with and without estimation."""
    image, alpha, true_fg = green_screen_scene()
    band = (alpha > 0) & (alpha < 255)
    assert band.sum() > 20_000  # a real edge band: outline and strands
    fg = estimate_foreground(image, alpha)
    without = green_excess(_white_jpeg(tmp_path, "without.jpg", image, alpha, None), band)
    with_est = green_excess(_white_jpeg(tmp_path, "with.jpg", image, alpha, fg), band)
    ideal = green_excess(_white_jpeg(tmp_path, "truth.jpg", image, alpha, true_fg), band)
    print(
        f"\nmean green excess along the edge band ({int(band.sum())} px), white JPEG: "
        f"without estimation {without:.2f}, with {with_est:.2f}, true foreground {ideal:.2f}"
    )
    assert without > 20.0  # the halo is there to remove
    assert with_est <= 0.2 * without
    # and the estimated colour is the subject's: in the band, F is close to the truth
    err_est = np.abs(fg[band].astype(np.float32) - true_fg[band]).mean()
    err_raw = np.abs(image[band].astype(np.float32) - true_fg[band]).mean()
    print(f"mean |F - F_true| in the band: estimated {err_est:.1f}, observed image {err_raw:.1f}")
    assert err_est < 0.5 * err_raw


def test_estimate_keeps_opaque_and_clear_pixels_and_shapes() -> None:
    image, alpha, _ = green_screen_scene((300, 200))
    fg = estimate_foreground(image, alpha, work_side=128)  # small work side: full-res band pass
    assert fg.shape == image.shape and fg.dtype == np.uint8
    keep = (alpha == 0) | (alpha == 255)
    assert np.array_equal(fg[keep], image[keep])
    fg_same = estimate_foreground(image, alpha)  # solved at its own size
    assert np.array_equal(fg_same[keep], image[keep])
    with pytest.raises(ValueError):
        estimate_foreground(image, alpha[:-1])
    with pytest.raises(ValueError):
        estimate_foreground(image.astype(np.float32), alpha)
    with pytest.raises(ValueError):
        estimate_foreground(image, alpha, work_side=0)


@pytest.mark.parametrize(
    ("size", "work_side", "threads", "strip_pixels", "mode"),
    [
        ((300, 200), 128, 1, 1 << 20, "RGB"),  # one strip
        ((300, 200), 128, 2, 300 * 9, "RGB"),  # many strips, computed on two threads
        ((300, 200), 128, 3, 300 * 8, "RGBA"),  # an RGBA original: its colour channels
        ((300, 200), 1024, 2, 300 * 9, "RGB"),  # smaller than the working side: no band pass
        ((97, 203), 64, 2, 97 * 8, "RGB"),  # portrait, odd sizes
    ],
)
def test_foreground_cutout_is_estimate_foreground_as_rgba(
    monkeypatch: pytest.MonkeyPatch,
    size: tuple[int, int],
    work_side: int,
    threads: int,
    strip_pixels: int,
    mode: str,
) -> None:
    image, alpha, _ = green_screen_scene(size)
    expected = estimate_foreground(image, alpha, work_side=work_side)
    monkeypatch.setattr(compose, "_STRIP_PIXELS", strip_pixels)
    assert np.array_equal(estimate_foreground(image, alpha, work_side=work_side), expected)
    source = Image.fromarray(image)
    if mode == "RGBA":
        source.putalpha(Image.fromarray(np.full(alpha.shape, 7, np.uint8)))  # not used
    cut = foreground_cutout(source, alpha, work_side=work_side, threads=threads)
    assert cut.mode == "RGBA" and cut.size == size
    px = np.asarray(cut)
    assert np.array_equal(px[..., :3], expected)
    assert np.array_equal(px[..., 3], alpha)


def test_foreground_cutout_refuses_bad_input() -> None:
    image, alpha, _ = green_screen_scene((60, 40))
    with pytest.raises(ValueError, match="mode"):
        foreground_cutout(Image.fromarray(image).convert("L"), alpha)
    with pytest.raises(ValueError, match="alpha"):
        foreground_cutout(Image.fromarray(image), alpha[:-1])
    with pytest.raises(ValueError, match="threads"):
        foreground_cutout(Image.fromarray(image), alpha, threads=0)
    with pytest.raises(ValueError, match="work_side"):
        foreground_cutout(Image.fromarray(image), alpha, work_side=0)


@pytest.mark.parametrize(
    ("crop", "scale", "size", "expected"),
    [
        ((100.0, 50.0, 200.0, 150.0), 1.0, (300, 200), (96, 46, 204, 154)),  # 3 px + 1
        ((100.0, 50.0, 200.0, 150.0), 2.0, (300, 200), (96, 46, 204, 154)),  # upscaling: 3 source px
        ((100.0, 50.0, 200.0, 150.0), 0.25, (300, 200), (87, 37, 213, 163)),  # 3 output px = 12 source
        ((100.5, 50.2, 199.5, 149.9), 0.5, (300, 200), (93, 43, 207, 157)),  # fractional: bounds first
        ((0.0, 0.0, 300.0, 200.0), 0.1, (300, 200), (0, 0, 300, 200)),  # clipped to the source
        ((10.0, 190.0, 20.0, 200.0), 1.0, (300, 200), (6, 186, 24, 200)),
    ],
)
def test_filter_reach(
    crop: tuple[float, float, float, float],
    scale: float,
    size: tuple[int, int],
    expected: tuple[int, int, int, int],
) -> None:
    assert filter_reach(crop, scale, size) == expected


def test_filter_reach_refuses_a_scale_of_zero() -> None:
    with pytest.raises(ValueError, match="scale"):
        filter_reach((0.0, 0.0, 10.0, 10.0), 0.0, (10, 10))


@pytest.fixture(scope="module")
def cut_scene() -> tuple[np.ndarray, np.ndarray, Image.Image]:
    """The green-screen scene at 900×600, its alpha and its foreground cut-out."""
    image, alpha, _ = green_screen_scene((900, 600))
    return image, alpha, foreground_cutout(Image.fromarray(image), alpha, work_side=256)


# Layouts as recipes.layout() makes them (crop, scale, size, canvas, offset), for a 900×600
# source; max_diff: the largest difference allowed against compositing the whole frame
# first (0 = identical; 1: the resize's coordinates shifted by whole pixels).
PLACE_CASES = {
    "unscaled crop": (Layout((150.0, 80.0, 750.0, 590.0), 1.0, (600, 510), (640, 550), (20, 20)), 0),
    "unscaled whole frame": (Layout((0.0, 0.0, 900.0, 600.0), 1.0, (900, 600), (900, 600), (0, 0)), 0),
    "shrunk into a square": (
        Layout((137.3, 61.9, 762.7, 598.1), 0.5117, (320, 274), (400, 400), (40, 63)),
        1,
    ),
    "shrunk a lot (integer reduction first)": (
        Layout((100.0, 40.0, 800.0, 600.0), 0.1, (70, 56), (80, 80), (5, 12)),
        1,
    ),
    "enlarged": (Layout((300.4, 200.0, 600.6, 400.0), 3.331, (1000, 666), (1000, 1000), (0, 167)), 1),
    "whole frame shrunk": (Layout((0.0, 0.0, 900.0, 600.0), 0.4, (360, 240), (360, 240), (0, 0)), 1),
}


def _premultiplied(px: np.ndarray) -> np.ndarray:
    """RGB as int16; RGBA as its colour times its alpha (rounded) and the alpha: the colour
    of a nearly transparent pixel is not seen (and not defined by a resize)."""
    if px.shape[-1] == 3:
        return px.astype(np.int16)
    out = px.astype(np.int16)
    out[..., :3] = (out[..., :3] * out[..., 3:] + 127) // 255
    return out


@pytest.mark.parametrize("name", PLACE_CASES)
@pytest.mark.parametrize("background", [WHITE, (12, 34, 250), None])
def test_place_is_composite_then_apply_layout(
    cut_scene: tuple[np.ndarray, np.ndarray, Image.Image],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    background: tuple[int, int, int] | None,
) -> None:
    """Compositing only what an output shows gives the pixels of compositing the whole
    frame first: crop-then-composite is composite-then-crop (exactly), and a scaled output
    is the same LANCZOS resize of the full-resolution composite (within one level), never
    a premultiplied resize blended at the small size."""
    image, alpha, cut = cut_scene
    layout, max_diff = PLACE_CASES[name]
    fg = np.asarray(cut)[..., :3]
    reference = np.asarray(
        apply_layout(composite(image, alpha, background, foreground=fg), layout, background)
    )
    monkeypatch.setattr(compose, "_STRIP_PIXELS", 900 * 50)  # several strips
    got = place(cut, layout, background)
    assert got.mode == ("RGBA" if background is None else "RGB") and got.size == layout.canvas
    diff = np.abs(_premultiplied(np.asarray(got)) - _premultiplied(reference))
    # (a transparent result is unpremultiplied after the resize: one more level of rounding)
    limit = max_diff + 1 if max_diff and background is None else max_diff
    assert diff.max() <= limit, (name, diff.max())
    assert np.count_nonzero(diff) <= 0.001 * diff.size
    assert np.array_equal(np.asarray(place(np.asarray(cut), layout, background)), np.asarray(got))


@pytest.mark.parametrize("name", PLACE_CASES)
def test_place_a_mask(cut_scene: tuple[np.ndarray, np.ndarray, Image.Image], name: str) -> None:
    _, alpha, _ = cut_scene
    layout, max_diff = PLACE_CASES[name]
    got = place(alpha, layout, None)
    assert got.mode == "L" and got.size == layout.canvas
    diff = np.abs(np.asarray(got).astype(np.int16) - np.asarray(apply_layout(alpha, layout, None)))
    assert diff.max() <= max_diff


def test_scaled_white_composite_has_no_halo(cut_scene: tuple[np.ndarray, np.ndarray, Image.Image]) -> None:
    """A shrunk square on white (Shopify's geometry) from the estimated cut-out shows far
    less of the green screen along the edge than the same from the photo's own colours."""
    image, alpha, cut = cut_scene
    layout = PLACE_CASES["shrunk into a square"][0]
    plain = Image.fromarray(image)
    plain.putalpha(Image.fromarray(alpha))
    edge = np.asarray(place(alpha, layout, None))
    band = (edge > 0) & (edge < 255)
    with_estimate = green_excess(np.asarray(place(cut, layout, WHITE)), band)
    without = green_excess(np.asarray(place(plain, layout, WHITE)), band)
    print(f"\ngreen excess along the edge of a shrunk white square: {without:.2f} -> {with_estimate:.2f}")
    assert without > 10.0
    assert with_estimate <= 0.25 * without


def test_composite_background_exact_and_transparent_variant() -> None:
    image, alpha, _ = green_screen_scene((300, 200))
    colour = (12, 34, 250)
    out = composite(image, alpha, colour)
    assert out.shape == (200, 300, 3) and out.dtype == np.uint8
    assert np.all(out[alpha == 0] == colour)
    assert np.array_equal(out[alpha == 255], image[alpha == 255])
    rgba = composite(image, alpha, None)
    assert rgba.shape == (200, 300, 4)
    assert np.array_equal(rgba[..., 3], alpha) and np.array_equal(rgba[..., :3], image)
    with pytest.raises(ValueError):
        composite(image, alpha, (0, 0, 256))


def test_crop_and_place_puts_the_subject_where_the_layout_says() -> None:
    h, w = 900, 1600
    alpha = np.zeros((h, w), np.uint8)
    alpha[300:700, 500:1100] = 255  # subject bbox x 500..1100, y 300..700 (exclusive)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 200
    rgba = composite(image, alpha, None)

    class Layout:  # the shape of recipes.Layout
        crop = (450.0, 250.0, 1150.0, 750.0)  # bbox + 50 px margin
        scale = 2048 / 700
        size = (2048, round(500 * 2048 / 700))
        canvas = (2048, 2048)
        offset = (0, (2048 - round(500 * 2048 / 700)) // 2)

    placed = apply_layout(rgba, Layout(), (255, 255, 255))
    assert placed.mode == "RGB" and placed.size == (2048, 2048)
    arr = np.asarray(placed)
    subject = arr[..., 1] < 128  # red on white: the subject has no green
    ys, xs = np.nonzero(subject)
    s = Layout.scale
    expect = (
        Layout.offset[0] + (500 - 450) * s,
        Layout.offset[1] + (300 - 250) * s,
        Layout.offset[0] + (1100 - 450) * s,
        Layout.offset[1] + (700 - 250) * s,
    )
    got = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert all(abs(g - e) <= 1.0 for g, e in zip(got, expect, strict=True)), (got, expect)
    # background exactly the colour beyond LANCZOS's reach (3 source px) of the subject's box
    reach = int(np.ceil(3 * s)) + 1
    far = np.ones(arr.shape[:2], bool)
    ex0, ey0, ex1, ey1 = (int(v) for v in expect)
    far[ey0 - reach : ey1 + reach, ex0 - reach : ex1 + reach] = False
    assert np.all(arr[far] == 255)

    # transparent canvas; crop reaching outside the source is background, not black
    t = crop_and_place(rgba, (-100, -100, 700, 500), 0.5, (500, 400), (10, 20), None)
    assert t.mode == "RGBA" and t.size == (500, 400)
    ta = np.asarray(t)
    assert np.all(ta[: 20 + 50, :, 3] == 0)  # the 100 source px outside the top: transparent
    white = crop_and_place(image, (-100, -100, 700, 500), 0.5, (500, 400), (10, 20), (255, 255, 255))
    wa = np.asarray(white)
    assert np.all(wa[: 20 + 50] == 255) and np.all(wa[100:200, 100:200] == (200, 0, 0))
    # a mask through the same geometry
    m = crop_and_place(alpha, Layout.crop, Layout.scale, Layout.canvas, Layout.offset, None)
    assert m.mode == "L" and np.array_equal(np.asarray(m) > 127, subject)


def _srgb_icc() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def _exif() -> bytes:
    ex = Image.Exif()
    ex[0x010F] = "DropcutCam"  # Make
    ex[0x0110] = "Model 7"  # Model
    ex[0x0112] = 1  # Orientation
    return ex.tobytes()


def test_jpeg_is_rgb_without_alpha_and_carries_icc_and_exif(tmp_path: Path) -> None:
    image, alpha, _ = green_screen_scene((300, 200))
    icc, exif = _srgb_icc(), _exif()
    dest = tmp_path / "out.jpg"
    n = save_jpeg(composite(image, alpha, WHITE), dest, icc_profile=icc, exif=exif)
    assert n == dest.stat().st_size
    with Image.open(dest) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (300, 200)
        assert im.info["icc_profile"] == icc
        assert im.getexif()[0x010F] == "DropcutCam" and im.getexif()[0x0112] == 1
        arr = np.asarray(im)
    # white stays exactly white through JPEG away (≥ 8 px: one DCT block) from the subject
    near = np.asarray(Image.fromarray(alpha).filter(ImageFilter.MaxFilter(17)))
    assert np.all(arr[near == 0] == 255)
    # raw TIFF EXIF (no header) is accepted too
    save_jpeg(composite(image, alpha, WHITE), dest, icc_profile=None, exif=exif[6:])
    with Image.open(dest) as im:
        assert im.getexif()[0x0110] == "Model 7"
    with pytest.raises(ValueError):
        save_jpeg(composite(image, alpha, None), tmp_path / "rgba.jpg", icc_profile=None, exif=None)
    with pytest.raises(ValueError):
        save_jpeg(Image.new("CMYK", (4, 4)), tmp_path / "cmyk.jpg", icc_profile=None, exif=None)


def test_webp_keeps_alpha_and_carries_icc_and_exif(tmp_path: Path) -> None:
    image, alpha, _ = green_screen_scene((300, 200))
    icc, exif = _srgb_icc(), _exif()
    fg = estimate_foreground(image, alpha)
    dest = tmp_path / "out.webp"
    save_webp(composite(image, alpha, None, foreground=fg), dest, icc_profile=icc, exif=exif)
    with Image.open(dest) as im:
        assert im.format == "WEBP" and im.mode == "RGBA"
        assert im.info["icc_profile"] == icc
        assert im.getexif()[0x010F] == "DropcutCam"
        a = np.asarray(im.getchannel("A"))
    assert np.array_equal(a, alpha)  # the alpha plane is lossless
    opaque = tmp_path / "opaque.webp"
    save_webp(composite(image, alpha, WHITE, foreground=fg), opaque, icc_profile=None, exif=None)
    with Image.open(opaque) as im:
        assert im.mode == "RGB"


@pytest.mark.parametrize(
    ("method", "lossless", "error", "methods_tried", "raises"),
    [
        (0, False, None, [0], False),  # fits: one encode
        (0, False, "encoding error 6", [0, 2], False),  # partition 0 overflows: method 2
        (1, False, "encoding error 6", [1, 2], False),
        (2, False, "encoding error 6", [2], True),  # already at 2: the error stands
        (0, True, "encoding error 6", [0], True),  # lossless has no partition 0
        (0, False, "encoding error 5", [0], True),  # another error stands
    ],
)
def test_webp_partition0_overflow_is_encoded_again_at_method_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: int,
    lossless: bool,
    error: str | None,
    methods_tried: list[int],
    raises: bool,
) -> None:
    tried: list[int] = []
    real = compose._write

    def write(im: Image.Image, dest: Path, fmt: str, params: dict[str, object], **kw: bytes | None) -> int:
        tried.append(int(params["method"]))  # type: ignore[call-overload]
        if error is not None and params["method"] == method:
            raise ValueError(error)  # what Pillow raises for libwebp's error code
        return real(im, dest, fmt, params, **kw)

    monkeypatch.setattr(compose, "_write", write)
    image = np.zeros((16, 16, 3), np.uint8)
    dest = tmp_path / "out.webp"
    if raises:
        with pytest.raises(ValueError, match=error or ""):
            save_webp(image, dest, icc_profile=None, exif=None, method=method, lossless=lossless)
    else:
        save_webp(image, dest, icc_profile=None, exif=None, method=method, lossless=lossless)
        with Image.open(dest) as im:
            assert im.format == "WEBP" and im.size == (16, 16)
    assert tried == methods_tried


def test_mask_is_8bit_grey_equal_to_alpha(tmp_path: Path) -> None:
    _, alpha, _ = green_screen_scene((300, 200))
    dest = tmp_path / "mask.png"
    save_mask(alpha, dest, exif=_exif())
    raw = dest.read_bytes()
    assert raw[24:26] == bytes([8, 0])  # IHDR: bit depth 8, colour type 0 (greyscale)
    with Image.open(io.BytesIO(raw)) as im:
        assert im.mode == "L" and im.getexif()[0x010F] == "DropcutCam"
        assert np.array_equal(np.asarray(im), alpha)
    with pytest.raises(ValueError):
        save_mask(np.zeros((4, 4, 3), np.uint8), tmp_path / "bad.png")

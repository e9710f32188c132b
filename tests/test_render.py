"""dropcut.render: guided upsampling of the proxy's matte against ground truth, the cut-out
PNG's contract, bad mattes, and the render's memory in a subprocess.

The scenes (``scene_hard``, ``scene_soft``) are also used by ``bench/render.py``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw, ImageFilter

from dropcut import compose as compose_module
from dropcut import render
from dropcut.compose import composite
from dropcut.recipes import OutputSpec, layout, subject_box
from dropcut.render import MatteError, bilinear_upsample, guided_upsample, load_matte, render_cutout

REPO = Path(__file__).resolve().parents[1]
SCENE_SIZE = (3000, 2000)


# --- scenes with a known full-resolution alpha -------------------------------------------------


def proxy_size(size: tuple[int, int], long_side: int = 1024) -> tuple[int, int]:
    """The proxy's size as dropcut makes it: long side ``long_side``, aspect kept."""
    w, h = size
    s = min(1.0, long_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def texture(
    size: tuple[int, int], rgb: tuple[int, int, int], rng: np.random.Generator, amp: float = 40.0
) -> np.ndarray:
    """A photo-like texture: value noise at three scales plus fine grain, (H, W, 3) float32."""
    w, h = size
    acc = np.zeros((h, w), np.float32)
    for cells, a in ((8, 0.5), (40, 0.3), (200, 0.15)):
        small = rng.random((max(2, cells * h // w), cells)).astype(np.float32)
        acc += a * (
            np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC)) - 0.5
        )
    acc += 0.08 * (rng.random((h, w), dtype=np.float32) - 0.5)
    tint = np.asarray([1.0, 0.8, 1.2], np.float32)
    return np.clip(np.asarray(rgb, np.float32) + amp * 2 * acc[..., None] * tint, 0, 255)


def compose(alpha: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> Image.Image:
    a = alpha.astype(np.float32)[..., None] / 255.0
    return Image.fromarray((a * fg + (1 - a) * bg + 0.5).astype(np.uint8))


def scene_hard(
    size: tuple[int, int] = SCENE_SIZE, seed: int = 1, ss: int = 4
) -> tuple[Image.Image, np.ndarray]:
    """A textured orange star and ellipse with hard (1 px antialiased) edges on a textured
    blue background; returns (RGB image, ground-truth alpha (H, W) uint8)."""
    rng = np.random.default_rng(seed)
    w, h = size
    cx, cy, ro, ri = w * 0.5, h * 0.5, min(w, h) * 0.42, min(w, h) * 0.18
    pts = []
    for k in range(10):
        r = ro if k % 2 == 0 else ri
        t = np.pi / 2 + k * np.pi / 5 + 0.1
        pts.append(((cx + r * np.cos(t)) * ss, (cy - r * np.sin(t)) * ss))
    big = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(big)
    draw.polygon(pts, fill=255)
    draw.ellipse([(w * 0.1 * ss, h * 0.1 * ss), (w * 0.3 * ss, h * 0.35 * ss)], fill=255)
    alpha = np.asarray(big.reduce(ss))
    return compose(alpha, texture(size, (200, 120, 60), rng), texture(size, (60, 110, 150), rng)), alpha


def scene_soft(
    size: tuple[int, int] = SCENE_SIZE, seed: int = 2, ss: int = 4
) -> tuple[Image.Image, np.ndarray]:
    """Dark "hair": a Gaussian-blurred disc (soft edge) with 400 curly strands 0.75–2 px
    wide growing out of it, on a light textured background; (RGB image, alpha (H, W))."""
    rng = np.random.default_rng(seed)
    w, h = size
    disc = Image.new("L", size, 0)
    ImageDraw.Draw(disc).ellipse([(w * 0.25, h * 0.2), (w * 0.65, h * 0.8)], fill=255)
    disc = disc.filter(ImageFilter.GaussianBlur(8))
    hair = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(hair)
    cx, cy = w * 0.45, h * 0.5
    for _ in range(400):
        t = rng.uniform(-1.2, 1.2)
        x, y = cx + h * 0.28 * np.cos(t), cy + h * 0.28 * np.sin(t)
        ang = t + rng.normal(0, 0.2)
        pts = []
        for _s in range(30):
            pts.append((x * ss, y * ss))
            ang += rng.normal(0, 0.08)
            x, y = x + 6 * np.cos(ang), y + 6 * np.sin(ang)
        draw.line(pts, fill=255, width=int(rng.integers(3, 8)))
    alpha = np.maximum(np.asarray(disc), np.asarray(hair.reduce(ss)))
    return compose(
        alpha, texture(size, (70, 50, 40), rng, 25), texture(size, (190, 200, 215), rng, 20)
    ), alpha


def api_matte(truth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What a fake API answering the exact matte of the proxy returns: the ground truth
    downscaled to the proxy's size with LANCZOS, (h, w) uint8."""
    return np.asarray(Image.fromarray(truth).resize(size, Image.Resampling.LANCZOS))


def edge_band(truth: np.ndarray, width: int = 15) -> np.ndarray:
    """Pixels within ~width/2 px of an edge of the ground truth (bool (H, W))."""
    partial = Image.fromarray(((truth > 0) & (truth < 255)).astype(np.uint8) * 255)
    return np.asarray(partial.filter(ImageFilter.MaxFilter(width))) > 0


def errors(estimate: np.ndarray, truth: np.ndarray, band: np.ndarray) -> tuple[float, float]:
    """(mean absolute error over the image, over the edge band), in 0–255 units."""
    e = np.abs(estimate.astype(np.int16) - truth.astype(np.int16))
    return float(e.mean()), float(e[band].mean())


@dataclass(frozen=True)
class Case:
    """A scene, its truth, the fake API's exact matte of its proxy, its edge band and the
    two upsamplings (default guided filter, bilinear)."""

    image: Image.Image
    truth: np.ndarray
    matte: np.ndarray
    band: np.ndarray
    guided: np.ndarray
    bilinear: np.ndarray


def make_case(scene: tuple[Image.Image, np.ndarray]) -> Case:
    image, truth = scene
    matte = api_matte(truth, proxy_size(image.size))
    return Case(
        image,
        truth,
        matte,
        edge_band(truth),
        guided_upsample(matte, image),
        bilinear_upsample(matte, image.size),
    )


@pytest.fixture(scope="module")
def hard() -> Case:
    return make_case(scene_hard())


@pytest.fixture(scope="module")
def soft() -> Case:
    return make_case(scene_soft())


# --- edge quality against ground truth -----------------------------------------------------------


def test_guided_beats_bilinear_on_hard_edges(hard: Case) -> None:
    """Measured (3000×2000, proxy 1024×683, r=2, ε=1e-4, colour guide): guided 0.097 vs
    bilinear 0.336 over the image (0.29×), 3.7 vs 14.2 in the edge band."""
    g_all, g_band = errors(hard.guided, hard.truth, hard.band)
    b_all, b_band = errors(hard.bilinear, hard.truth, hard.band)
    print(
        f"\nhard edges MAE: guided {g_all:.3f} (band {g_band:.2f}), bilinear {b_all:.3f} (band {b_band:.2f})"
    )
    assert g_all <= 0.5 * b_all
    assert g_band <= 0.5 * b_band


def test_grey_guide_is_worse_than_colour_but_still_beats_bilinear(hard: Case) -> None:
    """Measured: colour 0.097, grey 0.245, bilinear 0.336."""
    colour, _ = errors(hard.guided, hard.truth, hard.band)
    grey, _ = errors(guided_upsample(hard.matte, hard.image, colour=False), hard.truth, hard.band)
    bilinear, _ = errors(hard.bilinear, hard.truth, hard.band)
    print(f"\nhard edges MAE: colour guide {colour:.3f}, grey guide {grey:.3f}, bilinear {bilinear:.3f}")
    assert colour < grey < bilinear


def test_guided_not_worse_on_soft_edges_and_strands(soft: Case) -> None:
    """Measured: guided 0.235 vs bilinear 1.77 (strands thinner than a proxy pixel)."""
    g_all, g_band = errors(soft.guided, soft.truth, soft.band)
    b_all, b_band = errors(soft.bilinear, soft.truth, soft.band)
    print(
        f"\nsoft edges MAE: guided {g_all:.3f} (band {g_band:.2f}), bilinear {b_all:.3f} (band {b_band:.2f})"
    )
    assert g_all <= b_all + 0.05
    assert g_band <= b_band + 0.5


def test_guided_not_worse_when_the_api_matte_is_blurrier_than_truth(hard: Case, soft: Case) -> None:
    """A less exact API (its matte blurred by σ = 1 proxy px): the guide cannot restore what
    the matte lost, but must not make it worse. Measured: hard 0.63 vs 0.78, soft 1.86 vs 2.33."""
    for name, case in (("hard", hard), ("soft", soft)):
        matte = np.asarray(Image.fromarray(case.matte).filter(ImageFilter.GaussianBlur(1.0)))
        g_all, _ = errors(guided_upsample(matte, case.image), case.truth, case.band)
        b_all, _ = errors(bilinear_upsample(matte, case.image.size), case.truth, case.band)
        print(f"\n{name}, blurred API matte, MAE: guided {g_all:.3f}, bilinear {b_all:.3f}")
        assert g_all <= b_all


def test_guided_accepts_arrays_and_grey_guides() -> None:
    image, truth = scene_hard((600, 400), ss=2)
    matte = api_matte(truth, (300, 200))
    from_image = guided_upsample(matte, image)
    assert from_image.shape == (400, 600) and from_image.dtype == np.uint8
    assert np.array_equal(guided_upsample(matte, np.asarray(image)), from_image)
    grey = guided_upsample(matte, image.convert("L")).astype(np.int16)
    # (the grey guide of an RGB image is its luma; downsampled before or after: ±1-2 levels)
    assert np.abs(grey - guided_upsample(matte, image, colour=False)).mean() < 0.05
    assert np.array_equal(guided_upsample(truth, image), truth)  # already full size: as is
    with pytest.raises(ValueError):
        guided_upsample(matte.astype(np.float32), image)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        guided_upsample(np.zeros((500, 700), np.uint8), image)


def test_strips_join_seamlessly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small strips give the same alpha as one strip for the whole image."""
    image, truth = scene_hard((600, 400), ss=2)
    matte = api_matte(truth, (150, 100))
    whole = guided_upsample(matte, image)
    monkeypatch.setattr(render, "STRIP_PIXELS", 600 * 9)
    diff = np.abs(guided_upsample(matte, image).astype(np.int16) - whole)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 10  # (float rounding of the box's edges)


# --- the cut-out's contract ------------------------------------------------------------------------


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1  # Orientation
    exif[0x010F] = "dropcut test camera"  # Make
    return exif.tobytes()


def save_matte(path: Path, matte: np.ndarray | Image.Image) -> Path:
    im = matte if isinstance(matte, Image.Image) else Image.fromarray(matte)
    im.save(path, "PNG")
    return path


def test_cutout_contract(tmp_path: Path) -> None:
    image, truth = scene_hard((900, 600), ss=2)
    matte = np.array(api_matte(truth, (300, 200)))
    matte[0:10, 0:10] = 128  # a half-transparent corner
    icc, exif = srgb_profile(), exif_bytes()
    dest = tmp_path / "out.png.part"
    stats = render_cutout(image, save_matte(tmp_path / "m.png", matte), dest, icc_profile=icc, exif=exif)
    assert stats.size == (900, 600) and stats.matte_size == (300, 200) and stats.guided
    assert stats.file_bytes == dest.stat().st_size and stats.seconds > 0 and stats.peak_rss_bytes > 0
    with Image.open(dest) as out:
        assert out.format == "PNG" and out.mode == "RGBA" and out.size == image.size
        assert out.info["icc_profile"] == icc
        assert out.getexif()[0x0112] == 1 and out.getexif()[0x010F] == "dropcut test camera"
        px = np.asarray(out)
    assert px.dtype == np.uint8
    assert np.array_equal(px[..., :3], np.asarray(image))  # colour untouched, also where alpha is 0
    assert np.array_equal(px[..., 3], guided_upsample(matte, image))
    corner = px[2:20, 2:20]  # straight alpha: a pixel of alpha ~128 keeps its full colour
    assert 100 < corner[..., 3].mean() < 160
    assert np.array_equal(corner[..., :3], np.asarray(image)[2:20, 2:20])


def test_straight_alpha_128_keeps_full_colour(tmp_path: Path) -> None:
    image = Image.new("RGB", (400, 300), (250, 10, 200))
    dest = tmp_path / "out.png"
    render_cutout(
        image,
        save_matte(tmp_path / "m.png", np.full((150, 200), 128, np.uint8)),
        dest,
        icc_profile=None,
        exif=None,
    )
    with Image.open(dest) as out:
        px = np.asarray(out)
        assert "icc_profile" not in out.info and "exif" not in out.info
    assert (px[..., 3] == 128).all()
    assert (px[..., :3] == (250, 10, 200)).all()


def test_original_alpha_is_multiplied_in(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (300, 400, 4), dtype=np.uint8)
    image = Image.fromarray(rgba)
    dest = tmp_path / "out.png"
    render_cutout(
        image,
        save_matte(tmp_path / "m.png", np.full((150, 200), 128, np.uint8)),
        dest,
        icc_profile=None,
        exif=b"Exif\x00\x00" + exif_bytes(),
    )
    with Image.open(dest) as out:
        px = np.asarray(out)
        assert out.getexif()[0x0112] == 1
    assert np.array_equal(px[..., :3], rgba[..., :3])
    expected = (rgba[..., 3].astype(np.uint16) * 128 + 127) // 255
    assert np.array_equal(px[..., 3], expected.astype(np.uint8))
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), rgba)  # the input untouched


def test_full_size_matte_is_used_as_is(tmp_path: Path) -> None:
    image, truth = scene_hard((640, 480), ss=2)
    dest = tmp_path / "out.png"
    stats = render_cutout(image, save_matte(tmp_path / "m.png", truth), dest, icc_profile=None, exif=None)
    assert not stats.guided
    with Image.open(dest) as out:
        assert np.array_equal(np.asarray(out)[..., 3], truth)


def test_alpha_of_la_and_rgba_mattes_is_taken(tmp_path: Path) -> None:
    image = Image.new("RGB", (300, 200), (1, 2, 3))
    alpha = np.tile(np.arange(150, dtype=np.uint8), (100, 1))
    la = Image.merge("LA", (Image.new("L", (150, 100), 77), Image.fromarray(alpha)))
    rgba = Image.merge("RGBA", (*Image.new("RGB", (150, 100), (9, 9, 9)).split(), Image.fromarray(alpha)))
    for name, matte in (("la", la), ("rgba", rgba)):
        assert np.array_equal(load_matte(save_matte(tmp_path / f"{name}.png", matte), image.size), alpha)


@pytest.mark.parametrize("level", [0, 9])
def test_png_is_one_valid_zlib_stream_over_many_strips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: int
) -> None:
    """Strips are deflated apart and joined (sync flushes, combined Adler-32): the IDAT
    data must inflate as one zlib stream, checksum included, to the filtered scanlines."""
    monkeypatch.setattr(render, "STRIP_PIXELS", 257 * 7)
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (131, 257, 3), dtype=np.uint8))
    dest = tmp_path / "out.png"
    render_cutout(
        image,
        save_matte(tmp_path / "m.png", rng.integers(0, 256, (131, 257), dtype=np.uint8)),
        dest,
        icc_profile=None,
        exif=None,
        compress_level=level,
        threads=2,
    )
    data = dest.read_bytes()
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + n : pos + 12 + n], "big")
        kinds.append(kind)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IDAT") > 10
    assert len(zlib.decompress(idat)) == 131 * (257 * 4 + 1)  # raises on a bad Adler-32
    with Image.open(dest) as out:
        px = np.asarray(out)
    assert np.array_equal(px[..., :3], np.asarray(image))


def test_adler32_combine() -> None:
    a, b = os.urandom(100_003), os.urandom(70_001)
    combined = render._adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b))
    assert combined == zlib.adler32(a + b)
    assert render._adler32_combine(zlib.adler32(a), zlib.adler32(b""), 0) == zlib.adler32(a)


# --- bad mattes --------------------------------------------------------------------------------------


def _bad_matte_cases(tmp_path: Path) -> dict[str, Path]:
    good = io.BytesIO()
    Image.new("L", (300, 200), 200).save(good, "PNG")
    cases = {
        "wrong aspect": save_matte(tmp_path / "square.png", np.zeros((300, 300), np.uint8)),
        "aspect 2 px off": save_matte(tmp_path / "off.png", np.zeros((202, 300), np.uint8)),
        "larger than the image": save_matte(tmp_path / "big.png", np.zeros((800, 1200), np.uint8)),
        "16-bit": save_matte(tmp_path / "i16.png", Image.new("I;16", (300, 200), 4000)),
        "palette": save_matte(tmp_path / "p.png", Image.new("P", (300, 200), 3)),
        "RGB": save_matte(tmp_path / "rgb.png", Image.new("RGB", (300, 200), (255, 255, 255))),
        "bilevel": save_matte(tmp_path / "1.png", Image.new("1", (300, 200), 1)),
    }
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) - 30])
    cases["truncated"] = truncated
    flipped = bytearray(good.getvalue())
    flipped[60] ^= 0xFF  # inside the IDAT data: CRC mismatch
    (tmp_path / "crc.png").write_bytes(bytes(flipped))
    cases["bad CRC"] = tmp_path / "crc.png"
    Image.new("L", (300, 200), 200).save(tmp_path / "jpeg.png", "JPEG")
    cases["JPEG"] = tmp_path / "jpeg.png"
    (tmp_path / "json.png").write_bytes(b'{"detail": "nope"}')
    cases["JSON"] = tmp_path / "json.png"
    (tmp_path / "empty.png").write_bytes(b"")
    cases["empty"] = tmp_path / "empty.png"
    return cases


def test_bad_mattes_raise_matte_error_and_leave_no_output(tmp_path: Path) -> None:
    image = Image.new("RGB", (900, 600), (10, 20, 30))
    for name, path in _bad_matte_cases(tmp_path).items():
        dest = tmp_path / f"out-{path.stem}.png"
        with pytest.raises(MatteError):
            render_cutout(image, path, dest, icc_profile=None, exif=None)
        assert not dest.exists(), name
        assert issubclass(MatteError, ValueError)


def test_aspect_within_a_pixel_of_rounding_is_accepted(tmp_path: Path) -> None:
    # 4000×2999: the proxy's short side is 767.7 → 768 (or a server's 767)
    for h in (767, 768):
        load_matte(save_matte(tmp_path / f"{h}.png", np.zeros((h, 1024), np.uint8)), (4000, 2999))
    # portrait: the long side is the height
    load_matte(save_matte(tmp_path / "p.png", np.zeros((1024, 683), np.uint8)), (2000, 3000))
    for name, size, image_size in (("a", (769, 1024), (4000, 2999)), ("b", (1024, 685), (2000, 3000))):
        with pytest.raises(MatteError, match="aspect ratio"):
            load_matte(save_matte(tmp_path / f"{name}.png", np.zeros(size, np.uint8)), image_size)


def test_other_image_modes_are_refused(tmp_path: Path) -> None:
    matte = save_matte(tmp_path / "m.png", np.zeros((100, 150), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        render_cutout(Image.new("L", (300, 200)), matte, tmp_path / "o.png", icc_profile=None, exif=None)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_upsampling_on_threads_gives_the_same_alpha(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    image, truth = scene_hard((600, 400), ss=2)
    matte = api_matte(truth, (150, 100))
    monkeypatch.setattr(render, "STRIP_PIXELS", 600 * 9)
    alone = guided_upsample(matte, image)
    assert np.array_equal(guided_upsample(matte, image, threads=threads), alone)
    array = np.asarray(image)
    assert np.array_equal(guided_upsample(matte, array, threads=threads), guided_upsample(matte, array))
    with pytest.raises(ValueError, match="threads"):
        guided_upsample(matte, image, threads=0)


# --- every output of a recipe ----------------------------------------------------------------------

PRESETS = ("transparent", "mask", "white-jpeg", "amazon", "shopify", "webp")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"preset": "transparent"}, False),
        ({"preset": "mask"}, False),
        ({"preset": "white-jpeg"}, True),
        ({"preset": "amazon"}, True),
        ({"preset": "shopify"}, True),
        ({"preset": "webp"}, True),  # the transparent WebP too: its edge colour is seen
        ({"format": "png", "crop": "subject"}, False),  # a transparent PNG keeps the photo's
        ({"format": "png", "background": "#f4f4f4"}, True),
        ({"format": "webp", "background": "#000000"}, True),
    ],
)
def test_needs_foreground(spec: dict[str, str], expected: bool) -> None:
    assert render.needs_foreground(OutputSpec(**spec)) is expected


@pytest.mark.parametrize(
    ("preset", "seconds"),
    [  # 24 MP, the subject's box 3428×3273 px: estimated vs measured alone (bench, 2 cores)
        ("webp", 2.30),  # 2.26 s
        ("transparent", 1.34),  # 1.21 s
        ("amazon", 0.45),  # 0.41 s
        ("shopify", 0.40),  # 0.39 s
        ("mask", 0.38),  # 0.25 s
        ("white-jpeg", 0.29),  # 0.26 s
    ],
)
def test_output_cost_puts_the_longest_first(preset: str, seconds: float) -> None:
    box = (1287, 444, 4715, 3717)
    costs = {
        name: render.output_cost(spec, layout((6000, 4000), box, spec))
        for name in PRESETS
        for spec in [OutputSpec(preset=name)]
    }
    assert costs[preset] == pytest.approx(seconds, abs=0.01)
    order = sorted(costs, key=lambda name: costs[name], reverse=True)
    assert order == ["webp", "transparent", "amazon", "shopify", "mask", "white-jpeg"]


def _capture_encoders(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """The pixels each of compose's encoders is given, by the name of the file written."""
    seen: dict[str, np.ndarray] = {}
    for name in ("save_jpeg", "save_webp", "save_png", "save_mask"):
        real = getattr(compose_module, name)

        def spy(
            image: Image.Image | np.ndarray, dest: Path, *args: object, _real=real, **kwargs: object
        ) -> int:
            seen[dest.name] = np.array(image)
            return int(_real(image, dest, *args, **kwargs))

        monkeypatch.setattr(compose_module, name, spy)
    return seen


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_render_outputs_are_the_full_frame_composites_placed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """All six presets against the straightforward pipeline: alpha, F, composite of the
    whole frame on the background, then layout. Identical where nothing is scaled; the
    scaled squares within one level (the same LANCZOS resize of the same composite, of the
    crop only); the transparent PNG and the WebP's alpha exact. An RGBA original's own
    alpha (here a left-to-right ramp) is multiplied into the matte."""
    image, truth = scene_hard((1500, 1000), ss=2)
    matte_png = save_matte(tmp_path / "m.png", api_matte(truth, (768, 512)))
    own = np.broadcast_to(np.linspace(60, 255, 1500).astype(np.uint8), (1000, 1500))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.ascontiguousarray(own)))
    monkeypatch.setattr(render, "STRIP_PIXELS", 1500 * 40)  # several strips everywhere
    monkeypatch.setattr(compose_module, "_STRIP_PIXELS", 1500 * 40)
    seen = _capture_encoders(monkeypatch)
    outputs = [(OutputSpec(preset=name), tmp_path / f"out-{name}") for name in PRESETS]
    icc, exif = srgb_profile(), exif_bytes()
    seconds = render.render_outputs(image, matte_png, outputs, icc_profile=icc, exif=exif)
    assert seconds > 0

    alpha = guided_upsample(load_matte(matte_png, image.size), image)
    if mode == "RGBA":
        alpha = ((alpha.astype(np.uint16) * own + 127) // 255).astype(np.uint8)
    rgb = np.asarray(image.convert("RGB"))
    fg = compose_module.estimate_foreground(rgb, alpha)
    box = subject_box(alpha, 10)
    with Image.open(tmp_path / "out-transparent") as png:
        assert png.mode == "RGBA" and png.info["icc_profile"] == icc
        px = np.asarray(png)
    assert np.array_equal(px[..., :3], rgb) and np.array_equal(px[..., 3], alpha)
    for name in PRESETS[1:]:
        spec = OutputSpec(preset=name).resolve()
        placed = layout(image.size, box, spec)
        colour = render._colour(spec.background)
        source = alpha if name == "mask" else composite(rgb, alpha, colour, foreground=fg)
        expected = np.asarray(compose_module.apply_layout(source, placed, colour))
        got = seen[f"out-{name}"]
        assert got.shape == expected.shape, name
        diff = np.abs(got.astype(np.int16) - expected)
        assert diff.max() <= (1 if placed.scale != 1 else 0), (name, diff.max())
        assert np.count_nonzero(diff) <= 0.001 * diff.size, name
    with Image.open(tmp_path / "out-webp") as webp:
        assert webp.mode == "RGBA" and np.array_equal(np.asarray(webp.getchannel("A")), alpha)


def test_render_outputs_leave_no_file_when_one_fails(tmp_path: Path) -> None:
    image, truth = scene_hard((600, 400), ss=2)
    matte_png = save_matte(tmp_path / "m.png", api_matte(truth, (300, 200)))
    outputs = [(OutputSpec(preset=name), tmp_path / f"out-{name}") for name in PRESETS]
    outputs.insert(2, (OutputSpec(preset="white-jpeg", suffix="-2"), tmp_path / "missing" / "out"))
    with pytest.raises(OSError):
        render.render_outputs(image, matte_png, outputs, icc_profile=None, exif=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


@pytest.mark.timeout(60)
def test_render_outputs_stop_when_the_estimate_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lanes waiting for the cut-out are released (no hang), the outputs they made are
    removed, and the estimate's error is raised."""
    image, truth = scene_hard((600, 400), ss=2)
    matte_png = save_matte(tmp_path / "m.png", api_matte(truth, (300, 200)))

    def broken(*args: object, **kwargs: object) -> Image.Image:
        raise RuntimeError("no estimate")

    monkeypatch.setattr(compose_module, "foreground_cutout", broken)
    outputs = [(OutputSpec(preset=name), tmp_path / f"out-{name}") for name in PRESETS]
    with pytest.raises(RuntimeError, match="no estimate"):
        render.render_outputs(image, matte_png, outputs, icc_profile=None, exif=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


# --- memory ------------------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from PIL import Image, ImageDraw
    from dropcut.render import peak_rss_bytes, render_cutout
    tmp = Path(sys.argv[1])
    noise = Image.effect_noise((6000, 4000), 40)
    image = Image.merge("RGB", (noise, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), noise.rotate(180)))
    del noise
    matte = Image.new("L", (1024, 683), 0)
    ImageDraw.Draw(matte).ellipse([(200, 100), (800, 600)], fill=255)
    matte.save(tmp / "m.png")
    before = peak_rss_bytes() // 1024
    stats = render_cutout(image, tmp / "m.png", tmp / "out.png", icc_profile=None, exif=None)
    print(json.dumps({"before_kib": before, "peak_kib": peak_rss_bytes() // 1024, "seconds": stats.seconds,
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def test_render_24mp_peak_rss_in_a_subprocess(tmp_path: Path) -> None:
    """A 24 MP render in a fresh process (the image: 72 MB). Measured peak (VmHWM: a
    subprocess's ru_maxrss includes pytest's own peak) 353–362 MiB, 192 MiB of it before
    the render (interpreter, numpy, the image and the noise it was made from); the render
    adds ~165 MiB (float64 coefficient arrays at the proxy's size, strips, the deflate
    pipeline). Bound: 480 MiB total, 250 MiB above the pre-render peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\n24 MP render: peak RSS (VmHWM) {figures['peak_kib'] / 1024:.0f} MiB "
        f"(before the render {figures['before_kib'] / 1024:.0f} MiB; ru_maxrss, which also counts "
        f"pytest's peak, {figures['ru_maxrss_kib'] / 1024:.0f} MiB), {figures['seconds']:.2f} s"
    )
    assert figures["peak_kib"] <= 480 * 1024
    assert figures["peak_kib"] - figures["before_kib"] <= 250 * 1024
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (6000, 4000) and out.mode == "RGBA"

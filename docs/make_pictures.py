"""Pictures of every output preset for the README (docs/recipes.md).

    .venv/bin/python docs/make_pictures.py [--photo PATH/TO/coffee.png]

The test image is scikit-image's ``skimage/data/coffee.png`` (600×400, a cup of espresso on
a saucer on a wooden table; CC0, Rachel Michetti, courtesy of Pikolo Espresso Bar — see
``skimage.data.coffee``). Without ``--photo`` the script fetches the scikit-image wheel with
``pip download --no-deps`` into a temporary folder and reads the PNG out of it (scikit-image
is not a dependency of dropcut).

The matte is **synthetic**: the real API is not called. It is drawn by this script from
hand-fitted shapes — the saucer's ellipse (a least-squares conic through points picked on
its rim), the cup's rim (an ellipse) and the spoon's handle (a polygon) — antialiased by
4× supersampling and softened by a 0.7 px Gaussian, and written as an 8-bit ``L`` PNG at
the proxy's size (long side ≤ 1024 px: here the photo's own 600×400), as the API's
``/v1.0/alpha-channel`` would answer. It stands in for the API's matte; everything after
it is dropcut's real code path: ``dropcut.decode.load_full`` and
``dropcut.render.render_outputs`` with ``OutputSpec(preset=...)`` for the six presets.

Each output is then shown small in ``docs/pictures/`` (360 px on the long side; outputs
with transparency over a grey checkerboard, as JPEG quality 80; the mask as a PNG), next
to the input. Deterministic: the same inputs and library versions give the same files.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from dropcut.decode import fit_within, load_full  # noqa: E402
from dropcut.recipes import OutputSpec  # noqa: E402
from dropcut.render import render_outputs  # noqa: E402

OUT = REPO / "docs" / "pictures"
SKIMAGE = "scikit-image==0.26.0"
WHEEL_MEMBER = "skimage/data/coffee.png"
PRESETS = ("transparent", "mask", "white-jpeg", "amazon", "shopify", "webp")
THUMB = 360
SUPERSAMPLE = 4
PROXY_MAX_SIDE = 1024

# Hand-fitted shapes of coffee.png, in its pixels (600×400).
SAUCER = (277.0, 223.0, 203.0, 169.0, -3.7)  # centre x, y; semi-axes; rotation (degrees)
CUP_RIM = (291.0, 111.0, 119.0, 94.0, 0.0)
SPOON_HANDLE = [
    (399, 72), (406, 67), (420, 67), (424, 72), (417, 108), (411, 125),
    (395, 200), (388, 218), (380, 220), (383, 200), (396, 112),
]  # fmt: skip


def fetch_photo(folder: Path) -> Path:
    """coffee.png out of the scikit-image wheel, downloaded with pip into ``folder``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SKIMAGE, "-d", str(folder)],
        check=True,
    )
    (wheel,) = folder.glob("scikit_image-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        dest = folder / "coffee.png"
        dest.write_bytes(zf.read(WHEEL_MEMBER))
    return dest


def _ellipse(cx: float, cy: float, a: float, b: float, deg: float, n: int = 720) -> list[tuple[float, float]]:
    t = math.radians(deg)
    pts = []
    for k in range(n):
        u = 2 * math.pi * k / n
        pts.append(
            (
                cx + a * math.cos(u) * math.cos(t) - b * math.sin(u) * math.sin(t),
                cy + a * math.cos(u) * math.sin(t) + b * math.sin(u) * math.cos(t),
            )
        )
    return pts


def synthetic_matte(size: tuple[int, int], proxy: tuple[int, int]) -> Image.Image:
    """The stand-in for the API's answer: an ``L`` image of ``proxy`` size, 255 = opaque."""
    k = SUPERSAMPLE * proxy[0] / size[0]
    big = Image.new("L", (proxy[0] * SUPERSAMPLE, proxy[1] * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    for shape in (_ellipse(*SAUCER), _ellipse(*CUP_RIM), SPOON_HANDLE):
        draw.polygon([(x * k, y * k) for x, y in shape], fill=255)
    small = big.resize(proxy, Image.Resampling.BOX)
    return small.filter(ImageFilter.GaussianBlur(0.7))


def checkerboard(size: tuple[int, int], cell: int = 12) -> Image.Image:
    board = Image.new("RGB", size, (204, 204, 204))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], cell):
        for x in range((y // cell) % 2 * cell, size[0], 2 * cell):
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(255, 255, 255))
    return board


def thumbnail(src: Path, dest_stem: Path) -> Path:
    """A ≤ 360 px picture of one output: transparency over a checkerboard (JPEG q80),
    greyscale masks as PNG, opaque images as JPEG q80."""
    with Image.open(src) as im:
        im.load()
        scale = THUMB / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        if im.mode == "L":
            dest = dest_stem.with_suffix(".png")
            im.resize(size, Image.Resampling.LANCZOS).save(dest, optimize=True)
            return dest
        dest = dest_stem.with_suffix(".jpg")
        if im.mode in ("RGBA", "LA") or "transparency" in im.info:
            small = im.convert("RGBA").resize(size, Image.Resampling.LANCZOS)  # premultiplied
            shown = checkerboard(size)
            shown.paste(small.convert("RGB"), (0, 0), small.getchannel("A"))
        else:
            shown = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        shown.save(dest, quality=80, optimize=True)
        return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photo", type=Path, help="coffee.png (default: fetched from the scikit-image wheel)"
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dropcut-pictures-") as tmp_name:
        tmp = Path(tmp_name)
        photo = args.photo or fetch_photo(tmp)
        full = load_full(photo)
        proxy = fit_within(full.image.size, PROXY_MAX_SIDE)
        matte_png = tmp / "matte.png"
        synthetic_matte(full.image.size, proxy).save(matte_png)
        thumbnail(photo, OUT / "input")

        outputs = [(OutputSpec(preset=name), tmp / f"out-{name}") for name in PRESETS]
        seconds = render_outputs(full.image, matte_png, outputs, icc_profile=full.icc_profile, exif=full.exif)
        print(
            f"input {photo.name} {full.image.size[0]}×{full.image.size[1]}, matte {proxy[0]}×{proxy[1]}, "
            f"six outputs rendered in {seconds:.2f} s"
        )
        for name, (spec, path) in zip(PRESETS, outputs, strict=True):
            with Image.open(path) as im:
                what = f"{im.format} {im.mode} {im.width}×{im.height}"
            shown = thumbnail(path, OUT / name)
            print(
                f"{name:12} {spec.tail:14} {what:24} {path.stat().st_size:>9} B  -> "
                f"{shown.relative_to(REPO)} ({shown.stat().st_size} B)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

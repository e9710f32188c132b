"""Benchmark 7: rendering the full-resolution cut-out (dropcut.render).

For photographs of 12, 24, 45 and 100 MP (photo-like JPEGs, quality 92: value-noise
textures, a textured star as the subject, sensor-like grain), each render runs in a fresh
subprocess that decodes the JPEG (as ``decode.load_full`` will) and calls
``render.render_cutout`` with the matte of the 1024 px proxy (the star's mask, LANCZOS).
Measured per photo: render seconds (matte load, guided upsampling, PNG encode, fsync),
the process's peak RSS (VmHWM: a subprocess's ``ru_maxrss`` would also count this
benchmark's own peak, which Linux records at the exec), the RSS after the decode, and the
PNG's size. Then the zlib level's trade-off at 24 MP, and the edge error of guided against
bilinear upsampling on the ground-truth scenes of tests/test_render.py.

Targets: 24 MP ≤ 4 s; 100 MP ≤ 1.2 GB peak RSS.

Run: ``python -m bench.render`` (about 2 minutes; the first run also writes the photos to
the cache, about 1 minute). ``--sweep`` adds the radius/ε/guide sweep (2 more minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SIZES = {12: (4240, 2832), 24: (6000, 4000), 45: (8232, 5488), 100: (12248, 8168)}
LEVELS = (0, 1, 2, 4, 6)
TARGET_24MP_S = 4.0
TARGET_100MP_MIB = 1200 * 1e6 / 2**20  # 1.2 GB


def _star(size: tuple[int, int]) -> list[tuple[float, float]]:
    w, h = size
    cx, cy, ro, ri = w * 0.5, h * 0.52, min(w, h) * 0.45, min(w, h) * 0.2
    pts = []
    for k in range(10):
        r = ro if k % 2 == 0 else ri
        t = np.pi / 2 + k * np.pi / 5
        pts.append((cx + r * np.cos(t), cy - r * np.sin(t)))
    return pts


def _photo_like(size: tuple[int, int], rgb: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = (1536, max(2, 1536 * size[1] // size[0]))
    acc = np.zeros((small[1], small[0]), np.float32)
    for cells, a in ((6, 0.5), (30, 0.3), (150, 0.2)):
        noise = rng.random((max(2, cells * small[1] // small[0]), cells)).astype(np.float32)
        acc += a * (
            np.asarray(Image.fromarray(noise, mode="F").resize(small, Image.Resampling.BICUBIC)) - 0.5
        )
    tint = np.asarray([1.0, 0.8, 1.2], np.float32)
    arr = np.clip(np.asarray(rgb, np.float32) + 90 * acc[..., None] * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)


def source(mp: int) -> tuple[Path, Path]:
    """The cached photo of ``mp`` megapixels and its proxy's matte (PNG, L, long side 1024)."""
    from bench.common import CACHE

    folder = CACHE / "render"
    photo, matte = folder / f"photo-{mp}mp.jpg", folder / f"matte-{mp}mp.png"
    if photo.exists() and matte.exists():
        return photo, matte
    folder.mkdir(parents=True, exist_ok=True)
    size = SIZES[mp]
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(_star(size), fill=255)
    img = Image.composite(_photo_like(size, (200, 120, 60), 1), _photo_like(size, (60, 110, 150), 2), mask)
    grain = Image.effect_noise(size, 6).convert("RGB")
    img = ImageChops.add(img, grain, 1.0, -128)
    del grain
    img.save(photo.with_suffix(".tmp"), "JPEG", quality=92)
    photo.with_suffix(".tmp").rename(photo)
    s = 1024 / max(size)
    mask.resize((round(size[0] * s), round(size[1] * s)), Image.Resampling.LANCZOS).save(matte)
    return photo, matte


def child(photo: Path, matte: Path, dest: Path, level: int) -> None:
    """In the measured subprocess: decode, render, print the figures as JSON."""
    import resource

    from dropcut.render import peak_rss_bytes, render_cutout

    t0 = time.perf_counter()
    image = Image.open(photo)
    image.load()  # (one decoded copy, as load_full keeps it; convert() would hold two at once)
    if image.mode != "RGB":
        image = image.convert("RGB")
    decode_s = time.perf_counter() - t0
    after_decode = peak_rss_bytes()
    stats = render_cutout(image, matte, dest, icc_profile=None, exif=None, compress_level=level)
    print(
        json.dumps(
            {
                "decode_s": decode_s,
                "render_s": stats.seconds,
                "size": stats.size,
                "file_bytes": stats.file_bytes,
                "after_decode_mib": after_decode / 2**20,
                "peak_mib": peak_rss_bytes() / 2**20,
                "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def measure(mp: int, level: int = 1) -> dict[str, Any]:
    from bench.common import REPO, WORK

    photo, matte = source(mp)
    WORK.mkdir(parents=True, exist_ok=True)
    dest = WORK / f"render-{mp}mp-{level}.png"
    done = subprocess.run(
        [sys.executable, "-m", "bench.render", "--child", str(photo), str(matte), str(dest), str(level)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    dest.unlink(missing_ok=True)
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["mp"] = mp
    figures["level"] = level
    return figures


def edge_errors(sweep: bool) -> list[list[Any]]:
    from tests.test_render import api_matte, edge_band, errors, proxy_size, scene_hard, scene_soft

    from dropcut.render import bilinear_upsample, guided_upsample

    rows: list[list[Any]] = []
    for name, build in (("hard edges (star)", scene_hard), ("soft edge + strands", scene_soft)):
        image, truth = build()
        matte = api_matte(truth, proxy_size(image.size))
        band = edge_band(truth)
        b_all, b_band = errors(bilinear_upsample(matte, image.size), truth, band)
        variants: list[tuple[str, dict[str, Any]]] = [("guided (defaults)", {})]
        if sweep:
            variants += [
                (f"guided {'colour' if c else 'grey'} r={r} ε={e:g}", {"radius": r, "eps": e, "colour": c})
                for c in (True, False)
                for r in (1, 2, 3, 4)
                for e in (1e-5, 1e-4, 1e-3, 1e-2)
            ]
        rows.append([name, "bilinear", f"{b_all:.3f}", f"{b_band:.2f}", "1.00"])
        for label, kw in variants:
            t0 = time.perf_counter()
            g_all, g_band = errors(guided_upsample(matte, image, **kw), truth, band)
            took = time.perf_counter() - t0
            rows.append(
                [name, f"{label} ({took:.2f} s)", f"{g_all:.3f}", f"{g_band:.2f}", f"{g_all / b_all:.2f}"]
            )
    return rows


def run(*, sweep: bool = False, sizes: tuple[int, ...] = tuple(SIZES)) -> str:
    # (bench.common is imported here, not at the top: the measured child stays lean)
    from bench.common import machine, md_table, report, verdict

    m = machine()
    for mp in sizes:
        source(mp)
    per_size = [measure(mp) for mp in sizes]
    levels = [measure(24, level) for level in LEVELS] if 24 in sizes else []
    rows = []
    for f in per_size:
        w, h = f["size"]
        target = ""
        if f["mp"] == 24:
            target = f"≤ {TARGET_24MP_S:g} s: {verdict(f['render_s'] <= TARGET_24MP_S)}"
        elif f["mp"] == 100:
            target = f"≤ 1.2 GB: {verdict(f['peak_mib'] <= TARGET_100MP_MIB)}"
        rows.append(
            [
                f"{w}×{h} ({w * h / 1e6:.1f} MP)",
                f"{f['render_s']:.2f} s",
                f"{f['peak_mib']:.0f} MiB",
                f"{f['after_decode_mib']:.0f} MiB",
                f"{f['file_bytes'] / 1e6:.1f} MB",
                f"{f['decode_s']:.2f} s",
                target,
            ]
        )
    table = md_table(
        [
            "photo",
            "render",
            "peak RSS (VmHWM)",
            "RSS after decode",
            "PNG",
            "decode (not in render)",
            "target",
        ],
        rows,
    )
    if levels:
        table += "\n\nzlib level at 24 MP:\n\n" + md_table(
            ["compress_level", "render", "PNG"],
            [[f["level"], f"{f['render_s']:.2f} s", f"{f['file_bytes'] / 1e6:.1f} MB"] for f in levels],
        )
    table += "\n\nEdge error (MAE, 0–255) against the full-resolution truth, 3000×2000, proxy 1024×683:\n\n"
    table += md_table(["scene", "upsampling", "MAE image", "MAE edge band", "× bilinear"], edge_errors(sweep))
    notes = [
        "render = render_cutout: matte load + guided upsampling + PNG encode (2 deflate threads) + fsync; "
        "the JPEG decode is timed apart.",
        "peak RSS is the render process's VmHWM (decode included); ru_maxrss is in the JSON.",
    ]
    data: dict[str, Any] = {"machine": m, "sizes": per_size, "levels": levels}
    return report("render", "7. Render (guided upsampling + PNG)", data, table, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep radius, ε and grey/colour guide")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="megapixels, e.g. 12,24")
    parser.add_argument(
        "--child", nargs=4, metavar=("PHOTO", "MATTE", "DEST", "LEVEL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        photo, matte, dest, level = args.child
        child(Path(photo), Path(matte), Path(dest), int(level))
        return
    run(sweep=args.sweep, sizes=tuple(int(s) for s in args.sizes.split(",")))


if __name__ == "__main__":
    main()

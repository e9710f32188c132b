"""Benchmark: every output of a recipe from one matte (issue 11).

    .venv/bin/python -m bench.outputs [--repeat N]

For one real-content 24 MP photo (``bench.images.real_photo_jpeg(24)``: a camera
photograph resampled to 6000×4000, JPEG quality 92) and a matte of its 1024 px proxy (a
soft-edged ellipse, 8-bit L PNG as the API answers), a fresh subprocess per case decodes
the photo with ``dropcut.decode.load_full`` and calls ``dropcut.render.render_outputs``
with

* ``default``: the default recipe alone (today's transparent PNG, ``render_cutout``);
* ``all six``: the six presets (transparent, mask, white-jpeg, amazon, shopify, webp).

Measured per case: decode seconds (``load_full``), render seconds (``render_outputs``:
matte upsampling, foreground estimation, composites, encoders, fsync), their sum, peak RSS
of the subprocess (VmHWM, which exec resets: a subprocess's ``ru_maxrss`` would count this
benchmark's own peak) and after the decode, the bytes written, and photos per minute
(60 / (decode + render), one render worker). Goal: all six presets ≤ 8 s for a 24 MP photo
(decode + render), so that a full recipe keeps up with 7 requests a minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

GOAL_ALL_S = 8.0
PRESETS = ("transparent", "mask", "white-jpeg", "amazon", "shopify", "webp")
CASES = {"default": ("transparent",), "all six": PRESETS}


def matte_for(photo: Path) -> Path:
    """A cached soft-edged ellipse matte of the photo's 1024 px proxy (L PNG)."""
    from bench.common import CACHE
    from dropcut.decode import fit_within

    dest = CACHE / f"outputs-matte-{photo.stem}.png"
    if dest.exists():
        return dest
    with Image.open(photo) as im:
        size = fit_within(im.size, 1024)
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((w * 0.22, h * 0.12, w * 0.78, h * 0.92), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(1.5))  # a soft edge: a band to estimate
    tmp = dest.with_suffix(".tmp")
    mask.save(tmp, format="PNG")
    tmp.replace(dest)
    return dest


def child(photo: Path, matte: Path, folder: Path, presets: list[str]) -> None:
    """In the measured subprocess: load_full, render_outputs, print the figures as JSON."""
    from dropcut.decode import load_full
    from dropcut.recipes import OutputSpec
    from dropcut.render import peak_rss_bytes, render_outputs

    t0 = time.perf_counter()
    full = load_full(photo)
    decode_s = time.perf_counter() - t0
    after_decode = peak_rss_bytes()
    outputs = [(OutputSpec(preset=name), folder / f"out-{name}") for name in presets]
    t1 = time.perf_counter()
    render_outputs(full.image, matte, outputs, icc_profile=full.icc_profile, exif=full.exif)
    render_s = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "size": full.image.size,
                "decode_s": decode_s,
                "render_s": render_s,
                "after_decode_mib": after_decode / 2**20,
                "peak_mib": peak_rss_bytes() / 2**20,
                "bytes": {name: (folder / f"out-{name}").stat().st_size for name in presets},
            }
        )
    )


def measure(photo: Path, matte: Path, presets: tuple[str, ...]) -> dict[str, Any]:
    from bench.common import REPO, WORK

    WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="outputs-", dir=WORK))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.outputs", "--child", str(photo), str(matte), str(folder), *presets],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="every output of a recipe from one matte, 24 MP")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (the fastest is reported)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        photo, matte, folder, *presets = args.child
        child(Path(photo), Path(matte), Path(folder), presets)
        return
    run(repeat=args.repeat)


def run(*, repeat: int = 1) -> str:
    """Benchmark 8 (see the module docstring); returns its markdown report."""
    from bench.common import machine, md_table, report, verdict
    from bench.images import real_photo_jpeg

    photo = real_photo_jpeg(24)
    matte = matte_for(photo)
    results: dict[str, dict[str, Any]] = {}
    for case, presets in CASES.items():
        runs = [measure(photo, matte, presets) for _ in range(max(1, repeat))]
        results[case] = min(runs, key=lambda r: r["decode_s"] + r["render_s"])
    rows = []
    for case, r in results.items():
        total = r["decode_s"] + r["render_s"]
        rows.append(
            [
                case,
                len(CASES[case]),
                f"{r['decode_s']:.2f}",
                f"{r['render_s']:.2f}",
                f"{total:.2f}",
                f"{r['after_decode_mib']:.0f}",
                f"{r['peak_mib']:.0f}",
                f"{sum(r['bytes'].values()) / 1e6:.1f}",
                f"{60 / total:.1f}",
            ]
        )
    w, h = results["all six"]["size"]
    all_s = results["all six"]["decode_s"] + results["all six"]["render_s"]
    table = md_table(
        [
            "recipe",
            "outputs",
            "decode s (load_full)",
            "render s (render_outputs)",
            "total s",
            "RSS after decode MiB",
            "peak RSS MiB",
            "written MB",
            "photos/min (1 worker)",
        ],
        rows,
    )
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in results["all six"]["bytes"].items())
    notes = [
        f"Photo: {photo.name}, {w}×{h} ({w * h / 1e6:.0f} MP), a real camera photograph resampled; "
        "matte: a soft ellipse at the 1024 px proxy's size.",
        f"Goal: all six presets ≤ {GOAL_ALL_S:g} s (decode + render): {all_s:.2f} s, "
        f"{verdict(all_s <= GOAL_ALL_S)}.",
        f"Outputs of all six: {sizes}.",
        "Each case runs in a fresh subprocess (peak RSS = its VmHWM); photos per minute = 60 / total "
        "for one render worker (the daemon runs two).",
    ]
    return report(
        "outputs",
        "Output recipes: the default output vs all six presets, 24 MP",
        {"machine": machine(), "photo": str(photo), "results": results, "goal_all_s": GOAL_ALL_S},
        table,
        notes,
    )


if __name__ == "__main__":
    main()

"""Seconds and peak memory of dropcut.compose at full resolution (default 24 MP).

    python -m bench.compose [--size 6000x4000] [--work-side 1024]

The green-screen scene of tests/test_compose.py is built at the given size (cached as .npy
under /tmp), then a fresh child process loads it and times each step; its peak resident
set (VmHWM) is reported above what the loaded inputs (image + alpha) already take.
Also reports the halo measurement (mean green excess in the edge band of the white JPEG).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)
CACHE = Path(tempfile.gettempdir()) / "dropcut-bench-compose"


def _vm(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(prefix: Path, work_side: int) -> None:
    from tests.test_compose import green_excess

    from dropcut.compose import (
        composite,
        crop_and_place,
        estimate_foreground,
        save_jpeg,
        save_mask,
        save_webp,
    )

    image = np.load(f"{prefix}-image.npy")
    alpha = np.load(f"{prefix}-alpha.npy")
    base = _vm("VmRSS")
    out: dict[str, float] = {}
    out_dir = Path(tempfile.mkdtemp(prefix="dropcut-bench-compose-"))

    def step(name: str, fn):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        r = fn()
        out[name] = round(time.perf_counter() - t, 3)
        return r

    fg = step("estimate_foreground", lambda: estimate_foreground(image, alpha, work_side=work_side))
    white = step("composite_white", lambda: composite(image, alpha, (255, 255, 255), foreground=fg))
    step("jpeg_full_q90_444", lambda: save_jpeg(white, out_dir / "w.jpg", icc_profile=None, exif=None))
    h, w = alpha.shape
    side = max(w, h)
    square = step(
        "square_2048_place",
        lambda: crop_and_place(
            white, (0, 0, w, h), 2048 / side, (2048, 2048), (0, (2048 - round(h * 2048 / side)) // 2), WHITE
        ),
    )
    step("square_2048_jpeg", lambda: save_jpeg(square, out_dir / "s.jpg", icc_profile=None, exif=None))
    rgba = step("composite_transparent", lambda: composite(image, alpha, None, foreground=fg))
    web = step(
        "webp_2048_place",
        lambda: crop_and_place(rgba, (0, 0, w, h), 2048 / side, (2048, round(h * 2048 / side)), (0, 0), None),
    )
    step("webp_2048_rgba_q85_m2", lambda: save_webp(web, out_dir / "t.webp", icc_profile=None, exif=None))
    step("mask_full_png", lambda: save_mask(alpha, out_dir / "m.png"))
    band = (alpha > 0) & (alpha < 255)
    with Image.open(out_dir / "w.jpg") as im:
        ge_with = green_excess(np.asarray(im), band)
    plain = composite(image, alpha, (255, 255, 255))
    save_jpeg(plain, out_dir / "p.jpg", icc_profile=None, exif=None)
    with Image.open(out_dir / "p.jpg") as im:
        ge_without = green_excess(np.asarray(im), band)
    for p in out_dir.iterdir():
        p.unlink()
    out_dir.rmdir()
    print(
        json.dumps(
            {
                "size": [w, h],
                "band_pixels": int(band.sum()),
                "seconds": out,
                "total_seconds": round(sum(out.values()), 3),
                "inputs_mib": round(base / 2**20, 1),
                "peak_above_inputs_mib": round((_vm("VmHWM") - base) / 2**20, 1),
                "green_excess_without": round(ge_without, 2),
                "green_excess_with": round(ge_with, 2),
            },
            indent=1,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="6000x4000")
    ap.add_argument("--work-side", type=int, default=1024)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.work_side)
        return
    w, h = (int(v) for v in args.size.lower().split("x"))
    CACHE.mkdir(exist_ok=True)
    prefix = CACHE / f"scene-{w}x{h}"
    if not Path(f"{prefix}-alpha.npy").exists():
        from tests.test_compose import green_screen_scene

        image, alpha, _ = green_screen_scene((w, h), ss=2 if w * h > 4e6 else 4)
        np.save(f"{prefix}-image.npy", image)
        np.save(f"{prefix}-alpha.npy", alpha)
        del image, alpha
    cmd = [sys.executable, "-m", "bench.compose", "--child", str(prefix), "--work-side", str(args.work_side)]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()

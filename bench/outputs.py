"""Benchmark: every output of a recipe from one matte (issue 11).

    .venv/bin/python -m bench.outputs [--repeat N] [--megapixels MP] [--baseline DIR]

For one real-content photo (``bench.images.real_photo_jpeg(MP)``, default 24 MP: a camera
photograph resampled to 6000×4000, JPEG quality 92; ``--megapixels 100`` gives
12247×8164) and a matte of its 1024 px proxy (a soft-edged ellipse, 8-bit L PNG as the
API answers), a fresh subprocess per case decodes the photo with
``dropcut.decode.load_full`` and calls ``dropcut.render.render_outputs`` with

* ``default``: the default recipe alone (today's transparent PNG, ``render_cutout``);
* ``all six``: the six presets (transparent, mask, white-jpeg, amazon, shopify, webp).

Measured per case: decode seconds (``load_full``), render seconds (``render_outputs``:
matte upsampling, foreground estimation, composites, encoders, fsync), their sum, the CPU
seconds of both (user + system, all threads: what the work costs, whatever else the
machine runs), peak RSS of the subprocess (VmHWM, which exec resets: a subprocess's
``ru_maxrss`` would count this benchmark's own peak) and after the decode, the bytes
written, and photos per minute (60 / (decode + render), one render worker). Goal: all six
presets ≤ 8 s for a 24 MP photo (decode + render), so that a full recipe keeps up with 7
requests a minute.

``--baseline DIR`` measures another version of dropcut side by side, in the same run:
``DIR`` holds its ``dropcut`` package (e.g. ``git archive HEAD daemon | tar -x -C /tmp/base``
then ``--baseline /tmp/base/daemon``), put first on the subprocess's ``PYTHONPATH``. The
runs of both versions alternate, and with ``--repeat`` the fastest of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
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

    cpu0, t0 = _cpu_s(), time.perf_counter()
    full = load_full(photo)
    decode_s = time.perf_counter() - t0
    after_decode = peak_rss_bytes()
    outputs = [(OutputSpec(preset=name), folder / f"out-{name}") for name in presets]
    t1 = time.perf_counter()
    error = None
    try:
        render_outputs(full.image, matte, outputs, icc_profile=full.icc_profile, exif=full.exif)
    except (ValueError, OSError) as exc:  # reported with the figures up to the failure
        error = f"{type(exc).__name__}: {exc}"
    render_s = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "size": full.image.size,
                "decode_s": decode_s,
                "render_s": render_s,
                "cpu_s": _cpu_s() - cpu0,
                "after_decode_mib": after_decode / 2**20,
                "peak_mib": peak_rss_bytes() / 2**20,
                "bytes": {
                    name: (folder / f"out-{name}").stat().st_size
                    for name in presets
                    if (folder / f"out-{name}").exists()
                },
                "error": error,
            }
        )
    )


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    times = os.times()
    return times.user + times.system


def measure(
    photo: Path, matte: Path, presets: tuple[str, ...], baseline: Path | None = None
) -> dict[str, Any]:
    """One case in a fresh subprocess: this checkout's dropcut, or the one in ``baseline``."""
    from bench.common import REPO, WORK

    WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="outputs-", dir=WORK))
    env = dict(os.environ)
    if baseline is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(baseline), *filter(None, [env.get("PYTHONPATH")])])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.outputs", "--child", str(photo), str(matte), str(folder), *presets],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measured subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="every output of a recipe from one matte")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (the fastest is reported)")
    parser.add_argument("--megapixels", type=int, default=24, help="size of the photo (default 24)")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="folder holding another dropcut package, measured beside"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        photo, matte, folder, *presets = args.child
        child(Path(photo), Path(matte), Path(folder), presets)
        return
    if args.baseline is not None and not (args.baseline / "dropcut" / "render.py").is_file():
        parser.error(f"--baseline {args.baseline}: no dropcut/render.py there")
    run(repeat=args.repeat, megapixels=args.megapixels, baseline=args.baseline)


def run(*, repeat: int = 1, megapixels: int = 24, baseline: Path | None = None) -> str:
    """Benchmark 8 (see the module docstring); returns its markdown report."""
    from bench.common import machine, md_table, report, verdict
    from bench.images import real_photo_jpeg

    photo = real_photo_jpeg(megapixels)
    matte = matte_for(photo)
    versions: dict[str, Path | None] = {"": None}
    if baseline is not None:
        versions = {" (baseline)": baseline, "": None}
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(max(1, repeat)):  # versions alternate: a busy spell hits both alike
        for case, presets in CASES.items():
            for label, path in versions.items():
                runs.setdefault(case + label, []).append(measure(photo, matte, presets, path))
    results = {name: min(rs, key=lambda r: r["decode_s"] + r["render_s"]) for name, rs in runs.items()}
    rows = []
    for name, r in results.items():
        total = r["decode_s"] + r["render_s"]
        rows.append(
            [
                name + (" — **failed**" if r.get("error") else ""),
                len(r["bytes"]),
                f"{r['decode_s']:.2f}",
                f"{r['render_s']:.2f}",
                f"{total:.2f}",
                f"{r['cpu_s']:.1f}" if "cpu_s" in r else "",
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
            "CPU s",
            "RSS after decode MiB",
            "peak RSS MiB",
            "written MB",
            "photos/min (1 worker)",
        ],
        rows,
    )
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in results["all six"]["bytes"].items())
    mp = f"{w * h / 1e6:.0f} MP"
    notes = [
        f"Photo: {photo.name}, {w}×{h} ({mp}), a real camera photograph resampled; "
        "matte: a soft ellipse at the 1024 px proxy's size.",
        f"Outputs of all six: {sizes}.",
        "Each case runs in a fresh subprocess (peak RSS = its VmHWM); CPU s = user + system of the "
        "subprocess (decode + render, all threads); photos per minute = 60 / total for one render "
        "worker (the daemon runs two)."
        + (f" Best of {repeat} runs, the versions alternating." if repeat > 1 else ""),
    ]
    if megapixels == 24:
        notes.insert(
            1,
            f"Goal: all six presets ≤ {GOAL_ALL_S:g} s (decode + render): {all_s:.2f} s, "
            f"{verdict(all_s <= GOAL_ALL_S)}.",
        )
    if baseline is not None:
        notes.append(f"Baseline: the dropcut package in {baseline}, measured in the same run.")
    notes += [
        f"{name} failed after {r['render_s']:.1f} s ({r['error']}): its figures are up to the failure "
        "(and no output is left: all or nothing)."
        for name, r in results.items()
        if r.get("error")
    ]
    return report(
        "outputs" if megapixels == 24 else f"outputs-{megapixels}mp",
        f"Output recipes: the default output vs all six presets, {mp}",
        {
            "machine": machine(),
            "photo": str(photo),
            "baseline": str(baseline) if baseline else None,
            "results": results,
            "goal_all_s": GOAL_ALL_S,
        },
        table,
        notes,
    )


if __name__ == "__main__":
    main()

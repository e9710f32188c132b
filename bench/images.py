"""Test images for the benchmarks: fast to make, distinct, valid, cached under /tmp.

* :func:`unique_png` — a tiny 8x8 PNG made once by Pillow, with a ``tEXt`` chunk (valid
  CRC) carrying a number inserted after ``IHDR``: every file has different bytes (a
  different sha256) and decodes fully. 100,000 of them take a few seconds to write.
* :func:`photo_jpeg` — a small noise JPEG (distinct per seed) for the pipeline benchmarks.
* :func:`large_jpeg` — a noise JPEG of a given byte size (9-10 MB), quality 100.
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import struct
import subprocess
import time
import zlib
from functools import cache
from pathlib import Path

from PIL import Image

from bench.common import CACHE

TREE_VERSION = 1


@cache
def _png_parts() -> tuple[bytes, bytes]:
    """The template PNG split after its IHDR chunk (signature + IHDR, rest)."""
    img = Image.new("RGB", (8, 8), (180, 120, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    data = buf.getvalue()
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
    assert data[12:16] == b"IHDR"
    return data[:ihdr_end], data[ihdr_end:]


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def unique_png(n: int) -> bytes:
    """A valid 8x8 PNG whose bytes differ for every ``n``."""
    head, rest = _png_parts()
    return head + _chunk(b"tEXt", b"dropcut-bench\x00" + str(n).encode()) + rest


def tree_paths(n_files: int, top: int = 10, sub: int = 100) -> list[str]:
    """Relative paths of ``n_files`` files spread over ``top`` x ``sub`` leaf folders
    (``top + top*sub`` folders in all)."""
    leaves = top * sub
    per_leaf = math.ceil(n_files / leaves)
    out = []
    for i in range(n_files):
        leaf = i // per_leaf
        out.append(f"d{leaf // sub:02d}/s{leaf % sub:03d}/img{i:06d}.png")
    return out


def write_tree(root: Path, n_files: int, top: int = 10, sub: int = 100, offset: int = 0) -> int:
    """Write the tree below ``root``; returns the number of folders made."""
    made: set[str] = set()
    for i, rel in enumerate(tree_paths(n_files, top, sub)):
        parent = rel.rsplit("/", 1)[0]
        if parent not in made:
            (root / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, unique_png(offset + i))
        finally:
            os.close(fd)
    return len(made) + len({p.split("/", 1)[0] for p in made})


def cached_tree(n_files: int, top: int = 10, sub: int = 100) -> tuple[Path, float | None]:
    """A tree of ``n_files`` distinct PNGs under ``CACHE``, made once and reused.

    Returns the tree's root and how long generating it took (None when it was cached).
    The daemon must never modify it: benchmarks that use it keep the API paused or use
    ``on_success = keep``.
    """
    name = f"tree-{n_files}-{top}x{sub}-v{TREE_VERSION}"
    root = CACHE / name
    marker = CACHE / f"{name}.complete"
    if marker.exists() and root.is_dir():
        return root, None
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    write_tree(root, n_files, top, sub)
    elapsed = time.perf_counter() - started
    marker.write_text(f"{n_files} files\n")
    return root, elapsed


def photo_jpeg(seed: int, size: tuple[int, int] = (320, 240), quality: int = 90) -> bytes:
    """A noise JPEG, different for every seed (about 60 KB at 320x240)."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


LARGE_BYTES_PER_PIXEL = 4.1  # noise at quality 100 without chroma subsampling


def large_jpeg(seed: int, target: int) -> bytes:
    """A noise JPEG of about ``target`` bytes (within 3 %, never above ``target``)."""
    side = int(math.sqrt(target / LARGE_BYTES_PER_PIXEL))
    rng = random.Random(seed)
    while True:
        img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=100, subsampling=0)
        data = buf.getvalue()
        if len(data) <= target:
            if len(data) >= target * 0.97:
                return data
            side += max(1, int(side * (target / len(data) - 1) / 2.2))
        else:
            side -= max(1, int(side * (1 - target / len(data)) / 1.8) + 1)


def cached_large_files(count: int, low: int, high: int) -> list[Path]:
    """``count`` large JPEGs of ``low``..``high`` bytes, cached under ``CACHE``."""
    folder = CACHE / f"large-{count}-{low}-{high}-v1"
    marker = CACHE / f"large-{count}-{low}-{high}-v1.complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(count):
            target = low + (high - low) * (i + 1) // (count + 1)
            (folder / f"large{i:02d}.jpg").write_bytes(large_jpeg(7000 + i, target))
        marker.write_text(f"{count} files\n")
    return sorted(folder.glob("*.jpg"))


MATE_PHOTO = "usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg"


def _real_source() -> Path:
    """A real camera photograph (5640×3172, Debian's ``mate-backgrounds``): the installed
    file, or the package fetched with ``apt-get download`` and unpacked under ``CACHE``."""
    for root in (Path("/"), CACHE / "mate-backgrounds"):
        if (root / MATE_PHOTO).is_file():
            return root / MATE_PHOTO
    folder = CACHE / "mate-backgrounds"
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "mate-backgrounds"], cwd=folder, check=True, capture_output=True)
    (deb,) = folder.glob("mate-backgrounds_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    return folder / MATE_PHOTO


def real_photo_jpeg(megapixels: int, variant: int = 0, quality: int = 92) -> Path:
    """A real photograph resampled to about ``megapixels`` MP (3:2), as a camera JPEG;
    ``variant`` changes a few pixels so every file has its own content. Cached."""
    path = CACHE / f"photo-{megapixels}mp-{variant}-q{quality}.jpg"
    if path.exists():
        return path
    width = int(math.sqrt(megapixels * 1e6 * 3 / 2))
    height = width * 2 // 3
    with Image.open(_real_source()) as src:
        img = src.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    img.putpixel((variant % width, 0), (variant % 256, 0, 0))
    tmp = path.with_suffix(".tmp")
    img.save(tmp, format="JPEG", quality=quality)
    tmp.replace(path)
    return path

"""Thumbnails for the status page: a job's input (*before*) and its first output (*after*,
on a checkerboard so that transparency shows), at most :data:`THUMB_SIDE` pixels a side.

Made once, on first request, and kept in ``state_dir/thumbs`` as JPEGs
(``<job id>-<before|after>-<key>.jpg``: the key changes with the content, so a thumbnail is
never stale). The newest :data:`MAX_THUMBS` are kept.

A file is found from the job's record only — never from a name a request gives — and only
below the folder it belongs in (the archive or the inbox for the input, the outbox for the
output), after resolving links: a name that leads outside is not read. The input is the
archived copy (``on_success = "archive"``), else the file still in the inbox if it is the
one the job was made from (same size and mtime: ``on_success = "keep"``); after
``on_success = "delete"`` there is none, and the page shows a placeholder.

Decoding goes through :func:`dropcut.decode.make_proxy` (EXIF orientation, ICC profiles,
HEIC, 16 bits, CMYK: the same image a person sees), bounded by ``max_pixels`` and the
decode time budget, in a worker process of its own (:func:`dropcut.worker.pool`, at the
renders' lower priority), as the daemon decodes nothing itself: a 24 MP output's PNG costs
~1.2 s and ~190 MiB there, never in the daemon. One thumbnail is made at a time; the worker
is started on the first one and ends after :data:`IDLE_SECONDS` without any.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import os
import stat
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from dropcut import worker
from dropcut.paths import Layout
from dropcut.queue import Job

THUMB_SIDE = 256
THUMB_QUALITY = 85
MAX_THUMBS = 5000
"""Thumbnails kept in the cache (about 10 KB each); the oldest beyond go."""
PRUNE_EVERY = 100  # new thumbnails between two looks at the cache's size
IDLE_SECONDS = 60.0  # the worker process ends after this long without a thumbnail to make
MAKE_SECONDS = 120.0  # the longest a thumbnail may take (a 100 MP PNG: ~6 s)
WORKER_NICE = 10  # as the renders: the event loop and the proxies come first
CHECKER = 12  # pixels a square of the checkerboard
CHECKER_LIGHT, CHECKER_DARK = (255, 255, 255), (214, 214, 214)

Kind = Literal["before", "after"]
KINDS: tuple[Kind, ...] = ("before", "after")


@dataclass(frozen=True)
class Thumb:
    """An image to serve: its bytes and media type."""

    data: bytes
    content_type: str


def inside(root: Path, rel: str | None) -> Path | None:
    """``root/rel`` with every link resolved, if it is a regular file below ``root`` (also
    resolved); None otherwise (no name, an absolute name, ``..`` or a link leading out,
    missing, not a regular file)."""
    if not rel or "\x00" in rel or os.path.isabs(rel):
        return None
    base = Path(os.path.realpath(root))
    full = Path(os.path.realpath(base / rel))
    if not full.is_relative_to(base) or full == base:
        return None
    try:
        st = full.stat()
    except OSError:
        return None
    return full if stat.S_ISREG(st.st_mode) else None


class Thumbnails:
    """The thumbnail cache of one layout. Thread-safe (the status page's request threads
    call :meth:`get` at once)."""

    def __init__(
        self,
        layout: Layout,
        *,
        max_pixels: int | None = None,
        timeout: float | None = None,
        side: int = THUMB_SIDE,
        keep: int = MAX_THUMBS,
    ) -> None:
        self._layout = layout
        self.dir = layout.state_dir / "thumbs"
        self._max_pixels = max_pixels
        self._timeout = timeout
        self._side = side
        self._keep = keep
        self._making = threading.Lock()  # one decode at a time
        self._made = 0
        self._pool: ProcessPoolExecutor | None = None
        self._idle: threading.Timer | None = None

    def prepare(self) -> None:
        """Create the cache folder; remove what a crash left half-written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.dir):
            if entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def source(self, job: Job, kind: Kind) -> Path | None:
        """The file a thumbnail of ``job`` is made from, or None when there is none."""
        if kind == "after":
            return inside(self._layout.outbox, job.output_rel)
        if job.archived_as:
            found = inside(self._layout.archive, job.archived_as)
            if found is not None:
                return found
        found = inside(self._layout.inbox, job.rel_path)
        if found is None:
            return None
        try:
            st = found.stat()
        except OSError:
            return None
        # the very file the job was made from, not another one saved under its name since
        return found if (st.st_size, st.st_mtime_ns) == (job.size, job.mtime_ns) else None

    def get(self, job: Job, kind: Kind) -> Thumb:
        """The thumbnail (a JPEG), or a placeholder (SVG) saying why there is none."""
        src = self.source(job, kind)
        if src is None:
            if kind == "after":
                return placeholder("output not found")
            # archived and gone since, or never kept (on_success = "delete")
            return placeholder("original not found" if job.archived_as else "original not kept")
        try:
            st = src.stat()
        except OSError:
            return placeholder("not readable")
        key = hashlib.sha256(f"{job.sha256}:{src.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        path = self.dir / f"{job.id}-{kind}-{key[:16]}.jpg"
        with contextlib.suppress(FileNotFoundError):
            return Thumb(path.read_bytes(), "image/jpeg")
        with self._making:
            with contextlib.suppress(FileNotFoundError):  # made meanwhile by another request
                return Thumb(path.read_bytes(), "image/jpeg")
            if not self._make(src, path):
                return placeholder("cannot show")
            self._made += 1
            if self._made % PRUNE_EVERY == 0:
                self.prune()
        try:
            return Thumb(path.read_bytes(), "image/jpeg")
        except FileNotFoundError:  # pruned at once (a cache of one)
            return placeholder("cannot show")

    def _make(self, src: Path, dest: Path) -> bool:
        """Make ``dest`` from ``src`` in the worker process (call with ``_making`` held);
        False when it cannot be made (not an image, too big, too slow, a crashed worker)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._idle is not None:
            self._idle.cancel()
        if self._pool is None:
            self._pool = worker.pool(1, nice=WORKER_NICE)
        pool = self._pool
        try:
            pool.submit(make_thumbnail, src, dest, self._side, self._max_pixels, self._timeout).result(
                MAKE_SECONDS
            )
        except (BrokenProcessPool, FutureTimeout):
            # a worker that died (the OOM killer, a crash in a decoder) or hangs: a new one
            # next time (a hung one ends with its decode, bounded by max_pixels)
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            return False
        except (OSError, ValueError):  # DecodeError is a ValueError
            return False
        finally:
            self._idle = threading.Timer(IDLE_SECONDS, self.close)
            self._idle.daemon = True
            self._idle.start()
        return True

    def close(self, wait: float = 1.0) -> None:
        """End the worker process (a new one starts when a thumbnail is wanted again),
        waiting at most ``wait`` seconds for a thumbnail being made."""
        locked = self._making.acquire(timeout=wait)
        try:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        finally:
            if locked:
                self._making.release()

    def prune(self) -> int:
        """Remove the oldest thumbnails beyond the ones kept; returns how many went."""
        entries: list[tuple[float, str]] = []
        with contextlib.suppress(OSError), os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith(".jpg") and not entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        entries.append((entry.stat().st_mtime, entry.path))
        entries.sort(reverse=True)
        removed = 0
        for _, path in entries[self._keep :]:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
        return removed


def make_thumbnail(
    source: Path, dest: Path, side: int, max_pixels: int | None, timeout: float | None
) -> None:
    """In a worker process: the thumbnail of ``source`` (upright, at most ``side`` px a
    side, transparency on the checkerboard) written to ``dest`` as a JPEG, atomically.
    Raises :class:`dropcut.decode.DecodeError` (a ValueError) or OSError."""
    from dropcut.decode import make_proxy

    tmp = dest.parent / f".{dest.name}.proxy"
    part = dest.parent / f".{dest.name}.part"
    try:
        make_proxy(
            source,
            tmp,
            max_side=side,
            quality=THUMB_QUALITY,
            max_pixels=max_pixels,
            timeout=timeout,
            sync=False,
        )
        with Image.open(tmp) as img:
            img.load()
            flat = on_checkerboard(img) if img.mode in ("RGBA", "LA") else img.convert("RGB")
        flat.save(part, "JPEG", quality=THUMB_QUALITY, optimize=True)
        os.replace(part, dest)
    finally:
        tmp.unlink(missing_ok=True)
        part.unlink(missing_ok=True)


def on_checkerboard(img: Image.Image, square: int = CHECKER) -> Image.Image:
    """``img`` (with alpha) composited over a light checkerboard, as RGB."""
    rgba = img.convert("RGBA")
    width, height = rgba.size
    board = Image.new("RGBA", (width, height), (*CHECKER_LIGHT, 255))
    dark = Image.new("RGBA", (square, square), (*CHECKER_DARK, 255))
    for y in range(0, height, square):
        for x in range((y // square) % 2 * square, width, 2 * square):
            board.paste(dark, (x, y))
    return Image.alpha_composite(board, rgba).convert("RGB")


def placeholder(text: str, width: int = THUMB_SIDE, height: int = THUMB_SIDE * 3 // 4) -> Thumb:
    """A grey SVG image with ``text`` in it (no thumbnail to show)."""
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><rect width="100%" height="100%" fill="#eceff1"/>'
        f'<text x="50%" y="50%" text-anchor="middle" dominant-baseline="middle" '
        f'font-family="sans-serif" font-size="16" fill="#607d8b">{html.escape(text)}</text></svg>'
    )
    return Thumb(svg.encode(), "image/svg+xml")

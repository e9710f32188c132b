"""The decode check's time and memory budget (inspect): hostile images built in tmp_path."""

from __future__ import annotations

import functools
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from dropcut import decode
from dropcut.inspect import Inspected, Refused, inspect_file, inspect_some
from dropcut.settings import Settings
from tests.hostile_images import flat_png, many_scan_jpeg

MAX = 10_000_000
MiB = 1024 * 1024


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    (tmp_path / "inbox").mkdir()
    return tmp_path / "inbox"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    (tmp_path / "spool").mkdir()
    return tmp_path / "spool"


def test_settings_defaults_are_the_inspect_defaults() -> None:
    fields = Settings.model_fields
    assert fields["decode_timeout_seconds"].default == decode.DEFAULT_DECODE_TIMEOUT_SECONDS
    assert fields["max_decode_bytes"].default == decode.DEFAULT_MAX_DECODE_BYTES


def test_a_jpeg_of_thousands_of_scans_is_refused_without_decoding(inbox: Path, spool: Path) -> None:
    data = many_scan_jpeg(4000, 4000, 3000)  # ~0.2 MB; decoding it costs seconds of CPU
    assert len(data) < 1_000_000
    (inbox / "scans.jpg").write_bytes(data)
    started = time.monotonic()
    result = inspect_file(inbox, "scans.jpg", spool_dir=spool, max_bytes=MAX)
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (422, "too_many_scans")
    assert "3001 scans" in result.detail and str(decode.MAX_JPEG_SCANS) in result.detail
    assert time.monotonic() - started < 2.0
    assert list(spool.iterdir()) == []


def _slow_jpeg(inbox: Path) -> str:
    # 250,000 blocks (32 MB of coefficients: within the default cap, so decoded), 480
    # scans: about a second of decoding, far over the budgets below.
    (inbox / "slow.jpg").write_bytes(many_scan_jpeg(4000, 4000, 479))
    return "slow.jpg"


def test_a_slow_decode_is_refused_once_its_budget_is_spent(inbox: Path, spool: Path) -> None:
    rel = _slow_jpeg(inbox)
    started = time.monotonic()
    result = inspect_file(inbox, rel, spool_dir=spool, max_bytes=MAX, decode_timeout=0.05)
    elapsed = time.monotonic() - started
    assert isinstance(result, Refused)
    assert (result.status, result.code) == (422, "decode_too_slow")
    assert "0.05 s" in result.detail and "decode_timeout_seconds" in result.detail
    assert elapsed < 0.9  # stopped at a feed of 4 KiB, not at the end of the decode
    assert list(spool.iterdir()) == []


def test_inspect_some_passes_the_budget_on_in_a_thread(inbox: Path, spool: Path) -> None:
    rel = _slow_jpeg(inbox)
    results, _ = inspect_some([rel], inbox, spool, MAX, decode_timeout=0.05)
    assert [getattr(r, "code", r) for r in results] == ["decode_too_slow"]


def test_inspect_some_passes_the_budget_on_in_a_worker_process(inbox: Path, spool: Path) -> None:
    rel = _slow_jpeg(inbox)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        call = functools.partial(inspect_some, capture=True, decode_timeout=0.05)
        results, _ = pool.submit(call, [rel], inbox, spool, MAX).result(timeout=60)
    assert [getattr(r, "code", r) for r in results] == ["decode_too_slow"]


def test_the_default_budget_lets_a_normal_progressive_jpeg_through(inbox: Path, spool: Path) -> None:
    (inbox / "ok.jpg").write_bytes(many_scan_jpeg(1000, 800, 9))
    result = inspect_file(inbox, "ok.jpg", spool_dir=spool, max_bytes=MAX)
    assert isinstance(result, Inspected) and (result.width, result.height) == (1000, 800)


# --- memory: each hostile file is checked in a fresh interpreter, its peak RSS measured ----

_PROBE = """
import json, resource, sys
from pathlib import Path
from dropcut.inspect import inspect_file
inbox, spool, rel, cap = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
inspect_file(inbox, "warm.png", spool_dir=spool, max_bytes=10**7)  # Pillow's plugins loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = inspect_file(inbox, rel, spool_dir=spool, max_bytes=10**7, max_decode_bytes=cap)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"kind": type(r).__name__, "code": getattr(r, "code", None), "grew_kib": grew,
                  "size": [getattr(r, "width", 0), getattr(r, "height", 0)]}))
"""


def _peak(
    inbox: Path, spool: Path, rel: str, cap: int = decode.DEFAULT_MAX_DECODE_BYTES
) -> dict[str, object]:
    (inbox / "warm.png").write_bytes(flat_png(8, 8))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(inbox), str(spool), rel, str(cap)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


# (name, builder, decoded size the old check held, expected result)
MEMORY_CASES = [
    ("png-rgba-8000x8000", lambda: flat_png(8000, 8000), 256 * MiB, ("Inspected", None)),
    ("png-grey-12000x8000", lambda: flat_png(12000, 8000, color_type=0), 96 * MiB, ("Inspected", None)),
    (
        "progressive-jpeg-10000x10000",
        lambda: many_scan_jpeg(10000, 10000, 20),
        200 * MiB,
        ("Inspected", None),
    ),
    ("png-short-rows", lambda: flat_png(8000, 8000, rows=7999), 256 * MiB, ("Refused", "corrupt_image")),
]


@pytest.mark.parametrize(
    ("build", "held_before", "expected"),
    [c[1:] for c in MEMORY_CASES],
    ids=[c[0] for c in MEMORY_CASES],
)
def test_a_big_image_is_checked_in_bounded_memory(
    inbox: Path, spool: Path, build: object, held_before: int, expected: tuple[str, str | None]
) -> None:
    assert callable(build)
    (inbox / "big").write_bytes(build())
    measured = _peak(inbox, spool, "big")
    assert (measured["kind"], measured["code"]) == expected
    grew = int(str(measured["grew_kib"])) * 1024
    assert grew < decode.DEFAULT_MAX_DECODE_BYTES + 16 * MiB < held_before


# --- the complete-stream checks, table-driven --------------------------------------------------

STREAM_CASES = [
    # (id, file, max_decode_bytes, expected code or None for Inspected)
    ("png-whole", flat_png(3000, 2000), 1 * MiB, None),
    ("png-rows-missing", flat_png(3000, 2000, rows=1999), 1 * MiB, "corrupt_image"),
    ("png-cut-short", flat_png(3000, 2000)[:-40], 1 * MiB, "corrupt_image"),
    ("png-bad-filter", flat_png(3000, 2000, filter_type=5), 1 * MiB, "corrupt_image"),
    ("png-grey-whole", flat_png(3000, 2000, color_type=0), 1 * MiB, None),
    ("jpeg-multiscan-whole", many_scan_jpeg(3000, 2000, 5), 1 * MiB, None),
    ("jpeg-multiscan-cut-short", many_scan_jpeg(3000, 2000, 5)[:-60], 1 * MiB, "corrupt_image"),
    ("jpeg-no-eoi", many_scan_jpeg(3000, 2000, 5)[:-2], 1 * MiB, "corrupt_image"),
]


@pytest.mark.parametrize(
    ("data", "cap", "code"), [c[1:] for c in STREAM_CASES], ids=[c[0] for c in STREAM_CASES]
)
def test_complete_stream_checks(inbox: Path, spool: Path, data: bytes, cap: int, code: str | None) -> None:
    (inbox / "x").write_bytes(data)
    result = inspect_file(inbox, "x", spool_dir=spool, max_bytes=MAX, max_decode_bytes=cap)
    if code is None:
        assert isinstance(result, Inspected), result
    else:
        assert isinstance(result, Refused) and result.code == code, result


PNG_RAW_SIZES = [
    # (width, height, bits, colour type, interlaced, bytes)
    (1, 1, 8, 6, False, 5),
    (3, 2, 1, 0, False, 2 * 2),
    (10, 10, 8, 2, False, 10 * 31),
    (8, 8, 8, 0, True, 1 * 2 + 1 * 2 + 1 * 3 + 2 * 3 + 2 * 5 + 4 * 5 + 4 * 9),  # Adam7 passes 1-7
    (1, 1, 16, 4, True, 5),
]


@pytest.mark.parametrize(("w", "h", "bits", "ct", "interlaced", "expected"), PNG_RAW_SIZES)
def test_png_raw_size(w: int, h: int, bits: int, ct: int, interlaced: bool, expected: int) -> None:
    assert decode._png_raw_size(w, h, bits, ct, interlaced) == expected


COEFFICIENTS = [
    ([(1, 1, 1, 0)], 8, 8, 128),
    ([(1, 1, 1, 0)], 9, 8, 2 * 128),
    ([(1, 2, 2, 0), (2, 1, 1, 1), (3, 1, 1, 1)], 16, 16, 6 * 128),  # 4:2:0
    ([(1, 1, 1, 0), (2, 1, 1, 1), (3, 1, 1, 1)], 16, 16, 12 * 128),  # 4:4:4
    ([], 100, 100, 0),
]


@pytest.mark.parametrize(("layers", "w", "h", "expected"), COEFFICIENTS)
def test_jpeg_coefficient_bytes(
    layers: list[tuple[int, int, int, int]], w: int, h: int, expected: int
) -> None:
    assert decode._jpeg_coefficient_bytes(layers, w, h) == expected


def _interlaced_rgba_png(path: Path, width: int, height: int, bad_row: int | None) -> Path:
    """An Adam7-interlaced RGBA PNG of zero pixels; with ``bad_row`` the row of that index
    (counted over all passes) has filter type 7, which no decoder knows."""
    import struct
    import zlib

    passes = decode._png_passes(width, height, 8, 6, True)
    raw = bytearray(sum(row * rows for _, row, rows in passes))
    if bad_row is not None:
        starts = [start + i * row for start, row, rows in passes for i in range(rows)]
        raw[starts[bad_row]] = 7

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 1)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(raw), 1))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("bad_row", [None, 0, 700, -1])
def test_an_interlaced_png_too_big_to_decode_has_its_row_filters_checked(
    tmp_path: Path, bad_row: int | None
) -> None:
    """Issue 9 item 6, as an attack review found it: a 3000×3000 interlaced RGBA answer
    (36 MB decoded: the streamed check) whose rows have an unknown filter type is not a
    whole PNG, wherever the bad row is."""
    path = _interlaced_rgba_png(tmp_path / "a.png", 3000, 3000, bad_row)
    result = decode.check_decodes(path, "PNG")
    if bad_row is None:
        assert result == (3000, 3000)
    else:
        assert isinstance(result, decode.DecodeFailure) and "filter type" in result.detail

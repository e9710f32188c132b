"""The whole path, in-process: drop → settle → inspect → queue → send → publish."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image

from tests.fake_api import FakeWithoutBG
from tests.support import (
    API_KEY,
    DaemonProcess,
    Folders,
    InProcessDaemon,
    drop,
    image_bytes,
    json_events,
    wait_for,
)


def test_drop_gives_png_and_archives_input(folders: Folders, api: FakeWithoutBG) -> None:
    data = image_bytes("JPEG", (80, 60), seed=1)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "shop/shoe.jpg", data)
        out = folders.outbox / "shop" / "shoe.png"
        wait_for(lambda: (folders.archive / "shop" / "shoe.jpg").exists())
        with Image.open(out) as img:
            assert img.format == "PNG" and img.mode == "RGBA" and img.size == (80, 60)
        assert (folders.archive / "shop" / "shoe.jpg").read_bytes() == data
        assert not (folders.inbox / "shop" / "shoe.jpg").exists()
        names = [e["event"] for e in run.logs.events()]
        for step in (
            "daemon_started",
            "file_admitted",
            "job_queued",
            "upload_started",
            "upload_succeeded",
            "output_written",
        ):
            assert step in names, step
        assert names.index("file_admitted") < names.index("upload_started") < names.index("output_written")
    records = api.records()
    assert len(records) == 1 and records[0].status == 200
    assert "daemon_stopping" in [e["event"] for e in run.logs.events()]
    assert API_KEY not in run.logs.text()


def test_local_refusals_never_reach_the_api(folders: Folders, api: FakeWithoutBG) -> None:
    good = image_bytes("PNG", seed=2)
    jpeg = image_bytes("JPEG", (200, 200), seed=3)
    wide = io.BytesIO()
    Image.new("RGB", (500, 100), "white").save(wide, "PNG")  # small file, 50,000 pixels
    settings = folders.settings(api.url, max_file_bytes=50_000, max_pixels=40_000)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "big.png", image_bytes("PNG", (200, 200), seed=4))
        drop(folders.inbox, "wide.png", wide.getvalue())
        drop(folders.inbox, "notes.jpg", b"just some text, not an image\n" * 10)
        drop(folders.inbox, "cut.jpg", jpeg[: len(jpeg) // 2])
        drop(folders.inbox, "empty.png", b"")
        drop(folders.inbox, "ok.png", good)
        expected = {"big.png": 413, "notes.jpg": 415, "cut.jpg": 422, "empty.png": 422, "wide.png": 422}
        wait_for(lambda: {e["file"] for e in run.logs.events("file_quarantined")} == set(expected))
        wait_for(lambda: (folders.outbox / "ok.png").exists())
        for name, status in expected.items():
            record = json.loads((folders.quarantine / f"{name}.error.json").read_text())
            assert record["file"] == name
            assert record["error"]["status"] == status
            assert record["error"]["source"] == "local"
            assert record["error"]["code"] and record["error"]["detail"]
            assert len(record["sha256"]) == 64
            assert isinstance(record["size_bytes"], int)
            assert record["attempts"] == 0
            assert record["first_seen"] and record["failed_at"]
            assert (folders.quarantine / name).exists()
            assert not (folders.inbox / name).exists()
        codes = {
            name: json.loads((folders.quarantine / f"{name}.error.json").read_text())["error"]["code"]
            for name in expected
        }
        assert codes["wide.png"] == "too_many_pixels" and codes["cut.jpg"] == "corrupt_image"
        quarantined = run.logs.events("file_quarantined")
        assert {e["file"] for e in quarantined} == set(expected)
    assert [r.status for r in api.records()] == [200]


def test_a_backlog_is_inspected_in_worker_processes(folders: Folders, api: FakeWithoutBG) -> None:
    """Enough files at start make batches large enough for the process pool (the GIL
    would keep inspection on one core); every file still becomes exactly one job."""
    count = 160
    for i in range(count):
        drop(folders.inbox, f"bulk/{i // 40}/{i:03}.png", image_bytes("PNG", (8, 8), seed=1000 + i))
    settings = folders.settings(api.url, rate_limit_requests=200)
    with InProcessDaemon(settings) as run:
        wait_for(lambda: len(run.logs.events("job_queued")) == count, timeout=60)
        assert run.daemon.admission._pool is not None, "the backlog was not inspected in processes"
        wait_for(lambda: len(list(folders.outbox.rglob("*.png"))) == count, timeout=60)
    assert len({r.sha256 for r in api.records()}) == count
    assert not list((folders.state / "spool").iterdir())


def _png_pillow_warns_about(seed: int) -> bytes:
    """A valid PNG with an acTL chunk announcing 0 frames: Pillow warns "Invalid APNG"
    (a UserWarning) when it opens it, and decodes it as a still PNG."""
    png = image_bytes("PNG", (16, 16), seed=seed)
    body = b"acTL" + struct.pack(">II", 0, 0)
    chunk = struct.pack(">I", 8) + body + struct.pack(">I", zlib.crc32(body))
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


@pytest.mark.filterwarnings("ignore:Invalid APNG:UserWarning")  # the fake API's Pillow
def test_what_libraries_say_in_inspection_workers_is_logged_as_json(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """With log_format=json every line the process writes is a JSON event, also what
    Pillow says in the worker processes that inspect a backlog (they have no logging of
    their own and share the daemon's stderr): each warning is a python_warning event of
    the daemon naming its file."""
    count = 100  # one batch of POOL_MIN_BATCH or more: the process pool
    names = [f"bulk/{i:03}.png" for i in range(count)]
    for i, name in enumerate(names):
        drop(folders.inbox, name, _png_pillow_warns_about(2000 + i))
    proc = DaemonProcess(folders.env(api.url, rate_limit_requests=200)).start()
    try:
        wait_for(lambda: len(proc.events("file_admitted")) == count, timeout=60)
    finally:
        returncode = proc.stop()
    assert returncode == 0
    for line in list(proc.lines):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(event, dict) and event.get("event") and event.get("timestamp"), line
    warned = [e for e in json_events(proc.lines, "python_warning") if "file" in e]
    assert {e["file"] for e in warned} == set(names)
    for event in warned:
        assert event["category"] == "UserWarning" and event["level"] == "warning"
        assert "Invalid APNG" in event["message"]
    assert any(e.get("worker") for e in warned), "no file was inspected in a worker process"

"""The whole path, in-process: drop → settle → inspect → queue → send → publish."""

from __future__ import annotations

import io
import json

from PIL import Image

from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for


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

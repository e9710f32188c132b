"""Names and folders: ignore rules, temporary names, subfolders, awkward names, output
collisions — the real daemon in-process on real files, real HTTP to the fake API."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for

# watchdog's inotify group may add a new folder's watch twice while racing `mkdir -p` (it
# says so with a RuntimeWarning and carries on): watchdog's business, not dropcut's.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def put(inbox: Path, rel: str, data: bytes) -> Path:
    """Write via a short temporary name and rename (``drop`` would need a name 5 bytes
    longer than the final one, too long for 255-byte names)."""
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / ".t.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def loud_events(run: InProcessDaemon) -> list[dict[str, Any]]:
    """Everything logged above debug level."""
    return [e for e in run.logs.events() if e.get("level") != "debug"]


def mentions(event: dict[str, Any], needle: str) -> bool:
    return needle in json.dumps(event, ensure_ascii=False)


def outputs_by_input(run: InProcessDaemon) -> dict[str, str]:
    return {e["file"]: e["output"] for e in run.logs.events("output_written")}


def wait_rescans(run: InProcessDaemon, n: int) -> None:
    """Wait until ``n`` more full rescans have run (needs log_level debug)."""
    start = len(run.logs.events("rescan_done"))
    wait_for(lambda: len(run.logs.events("rescan_done")) >= start + n, timeout=10)


# ---------------------------------------------------------------------------------------
# Ignore rules
# ---------------------------------------------------------------------------------------

IGNORED = [
    "._a.jpg",  # macOS AppleDouble
    ".DS_Store",
    "~$doc.jpg",  # Office owner file
    "Thumbs.db",
    "thumbs.DB",  # case-insensitive
    "desktop.ini",
    "a.jpg.part",
    "x.crdownload",
    "e.jpg.tmp",
    ".photo.jpg.Xa9fQ2",  # rsync
    "@eaDir/a.jpg",  # Synology
    "sub/@eaDir/b.jpg@SynoEAStream",
    ".stversions/c.jpg",  # Syncthing
    "#recycle/d.jpg",  # Synology/QNAP recycle bin
    "sub/#recycle/deep/e.jpg",
    ".hidden/f.jpg",
    "g.jpg.download/g.jpg",  # Safari bundle
]


def test_ignored_files_are_never_touched_nor_reported(folders: Folders, api: FakeWithoutBG) -> None:
    """Valid images and junk alike: left alone, nothing above debug mentions them."""

    def content(i: int) -> bytes:
        return image_bytes(seed=100 + i) if i % 2 else b"not an image at all\n"

    before = IGNORED[: len(IGNORED) // 2]  # found by the start-up scan
    after = IGNORED[len(IGNORED) // 2 :]  # reported by events
    for i, rel in enumerate(before):
        put(folders.inbox, rel, content(i))
    settings = folders.settings(api.url, rescan_interval_seconds=0.3, log_level="debug")
    with InProcessDaemon(settings) as run:
        for i, rel in enumerate(after, start=len(before)):
            put(folders.inbox, rel, content(i))
        drop(folders.inbox, "sentinel.jpg", image_bytes(seed=99))
        wait_for(lambda: (folders.archive / "sentinel.jpg").exists())
        wait_rescans(run, 2)
        ignored = {e["file"] for e in run.logs.events("file_ignored")}
        loud = loud_events(run)
    for i, rel in enumerate(IGNORED):
        assert (folders.inbox / rel).read_bytes() == content(i), f"{rel} was touched"
        name = rel.rsplit("/", 1)[-1]
        assert not [e for e in loud if mentions(e, name)], f"{rel} reported above debug"
    assert {rel for rel in IGNORED if "/" not in rel} <= ignored  # seen, and ignored on purpose
    assert folders.files(folders.outbox) == ["sentinel.png"]
    assert folders.files(folders.archive) == ["sentinel.jpg"]
    assert not folders.quarantine.exists() or folders.files(folders.quarantine) == []
    assert [r.filename for r in api.records()] == ["sentinel.jpg"]


TEMP_NAMES = [
    ("a/photo.jpg.part", "a/photo.jpg"),  # Firefox, Nextcloud, wget2
    ("b/.photo.jpg.Xa9fQ2", "b/photo.jpg"),  # rsync
    ("c/photo.jpg.crdownload", "c/photo.jpg"),  # Chrome
    ("d/~syncthing~photo.jpg.tmp", "d/photo.jpg"),  # Syncthing on Windows
]


def test_a_file_delivered_under_a_temporary_name_is_processed_once_under_its_final_name(
    folders: Folders, api: FakeWithoutBG
) -> None:
    data = {final: image_bytes("JPEG", (96, 64 + i), seed=7 + i) for i, (_, final) in enumerate(TEMP_NAMES)}
    for _, final in TEMP_NAMES:
        (folders.inbox / final).parent.mkdir()
    settings = folders.settings(api.url, debounce_seconds=0.1, corrupt_grace_seconds=0)
    with InProcessDaemon(settings) as run:
        handles = {temp: (folders.inbox / temp).open("wb") for temp, _ in TEMP_NAMES}
        try:  # written slowly: quiet for longer than the debounce between writes
            for part in range(4):
                for temp, final in TEMP_NAMES:
                    blob = data[final]
                    step = len(blob) // 4 + 1
                    handles[temp].write(blob[part * step : (part + 1) * step])
                    handles[temp].flush()
                time.sleep(0.15)
        finally:
            for fh in handles.values():
                fh.close()
        for temp, final in TEMP_NAMES:
            os.rename(folders.inbox / temp, folders.inbox / final)
        for _, final in TEMP_NAMES:
            wait_for(lambda f=final: (folders.archive / f).exists())
        assert sorted(e["file"] for e in run.logs.events("job_queued")) == sorted(f for _, f in TEMP_NAMES)
        for temp, _ in TEMP_NAMES:
            assert not [e for e in loud_events(run) if mentions(e, temp.split("/")[1])]
    for i, (_, final) in enumerate(TEMP_NAMES):
        assert png_size(folders.outbox / final.replace(".jpg", ".png")) == (96, 64 + i)
    assert sorted((r.filename, r.sha256) for r in api.records()) == sorted(
        ("photo.jpg", sha(blob)) for blob in data.values()
    )
    assert len(folders.files(folders.outbox)) == len(TEMP_NAMES)
    assert not folders.quarantine.exists() or folders.files(folders.quarantine) == []


NOT_IMAGES = {
    "notes.txt": (b"shopping list\n- milk\n", "text"),
    "report.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF document"),
    "IMG_0001.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
    "sub/archive.zip": (b"PK\x03\x04" + bytes(60), "ZIP archive"),
}


def test_files_that_are_not_ignored_but_not_images_go_to_quarantine(
    folders: Folders, api: FakeWithoutBG
) -> None:
    with InProcessDaemon(
        folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0.1)
    ) as run:
        for name, (data, _) in NOT_IMAGES.items():
            drop(folders.inbox, name, data)
        wait_for(lambda: len(run.logs.events("file_quarantined")) == len(NOT_IMAGES))
        events = {e["file"]: e for e in run.logs.events("file_quarantined")}
    for name, (data, looks_like) in NOT_IMAGES.items():
        assert events[name]["status"] == 415
        record = json.loads((folders.quarantine / f"{name}.error.json").read_text())
        assert record["error"]["status"] == 415 and record["error"]["code"] == "unsupported_format"
        assert looks_like in record["error"]["detail"]
        assert (folders.quarantine / name).read_bytes() == data
        assert not (folders.inbox / name).exists()
    assert api.records() == []


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------


def test_folders_created_after_start_are_watched_and_mirrored(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    settings = folders.settings(api.url, rescan_interval_seconds=3600, debounce_seconds=0.1)  # events only
    a, b, c = (image_bytes(size=(40 + 10 * i, 30 + 5 * i), seed=200 + i) for i in range(3))
    with InProcessDaemon(settings):
        deep = folders.inbox / "deep" / "er" / "path"
        deep.mkdir(parents=True)  # mkdir -p, then a file at once (before any watch on it)
        (deep / "x.jpg").write_bytes(a)
        drop(folders.inbox, "deep/er/y.jpg", b)
        # a whole tree moved in from elsewhere on the same file system
        staged = tmp_path / "elsewhere" / "moved" / "in"
        staged.mkdir(parents=True)
        (staged / "z.jpg").write_bytes(c)
        os.rename(tmp_path / "elsewhere" / "moved", folders.inbox / "moved")
        for rel in ("deep/er/path/x.jpg", "deep/er/y.jpg", "moved/in/z.jpg"):
            wait_for(lambda r=rel: (folders.archive / r).exists())
    assert png_size(folders.outbox / "deep/er/path/x.png") == (40, 30)
    assert png_size(folders.outbox / "deep/er/y.png") == (50, 35)
    assert png_size(folders.outbox / "moved/in/z.png") == (60, 40)
    assert folders.files(folders.outbox) == ["deep/er/path/x.png", "deep/er/y.png", "moved/in/z.png"]
    assert (folders.archive / "deep/er/path/x.jpg").read_bytes() == a


# ---------------------------------------------------------------------------------------
# Awkward names
# ---------------------------------------------------------------------------------------

NFC = unicodedata.normalize("NFC", "café.jpg")
NFD = unicodedata.normalize("NFD", "café.jpg")
LONG_ASCII = "L" * 251 + ".jpg"  # 255 bytes
LONG_UTF8 = "é" * 125 + "x.jpg"  # 255 bytes of UTF-8, 131 characters
AWKWARD = [
    NFC,
    NFD,
    "my photo  1 .jpg",
    "line\nbreak.jpg",
    "tab\there.jpg",
    LONG_ASCII,
    LONG_UTF8,
    "Photo.jpg",
    "photo.jpg",
    "sub dir/ünïcödé 名前.jpg",
]


def test_awkward_names_each_get_their_own_output(folders: Folders, api: FakeWithoutBG) -> None:
    assert NFC != NFD and len(LONG_ASCII.encode()) == 255 and len(LONG_UTF8.encode()) == 255
    sizes = {name: (30 + 4 * i, 20 + 2 * i) for i, name in enumerate(AWKWARD)}
    with InProcessDaemon(folders.settings(api.url, debounce_seconds=0.1)) as run:
        for i, name in enumerate(AWKWARD):
            put(folders.inbox, name, image_bytes(size=sizes[name], seed=300 + i))
        wait_for(lambda: len(run.logs.events("input_disposed")) == len(AWKWARD), timeout=20)
        outputs = outputs_by_input(run)
    assert set(outputs) == set(AWKWARD)
    assert len({o.casefold() for o in outputs.values()}) == len(AWKWARD), "two inputs share an output"
    for name, out in outputs.items():
        assert len(os.path.basename(out).encode()) <= 255
        assert png_size(folders.outbox / out) == sizes[name], name
        assert (folders.archive / name).exists(), name
    # the case-only pair: one keeps its plain name, the other gets the collision name
    pair = {outputs["Photo.jpg"], outputs["photo.jpg"]}
    assert pair in ({"Photo.png", "photo~jpg.png"}, {"photo.png", "Photo~jpg.png"})
    assert outputs[NFC] == NFC.replace(".jpg", ".png") and outputs[NFD] == NFD.replace(".jpg", ".png")
    assert outputs[LONG_ASCII] == "L" * 251 + ".png"
    assert not folders.quarantine.exists() or folders.files(folders.quarantine) == []
    assert sorted(r.sha256 or "" for r in api.records()) == sorted(
        sha(image_bytes(size=sizes[n], seed=300 + i)) for i, n in enumerate(AWKWARD)
    )


def test_255_byte_names_can_still_be_quarantined_with_their_error_json(
    folders: Folders, api: FakeWithoutBG
) -> None:
    names = [LONG_ASCII, LONG_UTF8, "q" * 250 + ".jpeg"]
    junk = b"this is not a picture\n" * 3
    with InProcessDaemon(
        folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0.1)
    ) as run:
        for name in names:
            put(folders.inbox, name, junk)
        wait_for(lambda: len(run.logs.events("file_quarantined")) == len(names))
        assert not run.logs.events("quarantine_failed")
    records = {}
    for error_json in folders.quarantine.glob("*.error.json"):
        assert len(error_json.name.encode()) <= 255
        record = json.loads(error_json.read_text(encoding="utf-8"))
        records[record["file"]] = record
    assert set(records) == set(names)
    for name in names:
        assert (folders.quarantine / name).read_bytes() == junk
        assert records[name]["quarantined_as"] == name
        assert records[name]["error"]["code"] == "unsupported_format"


def test_a_name_that_is_not_utf8_does_not_stop_the_daemon(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, rescan_interval_seconds=0.3, debounce_seconds=0.1, log_level="debug")
    with InProcessDaemon(settings) as run:
        bad = os.path.join(os.fsencode(folders.inbox), b"caf\xe9.jpg")
        with open(bad, "wb") as fh:
            fh.write(image_bytes(seed=400))
        drop(folders.inbox, "ok.jpg", image_bytes(seed=401))
        wait_for(lambda: (folders.outbox / "ok.png").exists() or run.logs.events("stage_crashed"))
        # two more rescans see the file again (or the daemon is already down)
        wait_for(lambda: len(run.logs.events("rescan_done")) >= 2 or run.logs.events("stage_crashed"))
        assert not run.logs.events("stage_crashed")
        assert run.daemon.exit_code == 0 and not run.daemon._stop_requested
        # handled one way or the other — processed, or left alone and reported once — never a crash
        if b"caf\xe9.png" not in os.listdir(os.fsencode(folders.outbox)):
            assert len(run.logs.events("file_rejected")) == 1, "reported once, not at every rescan"
            with open(bad, "rb") as fh:
                assert fh.read() == image_bytes(seed=400)
            assert not run.logs.events("file_quarantined")


# ---------------------------------------------------------------------------------------
# Output collisions and replacements
# ---------------------------------------------------------------------------------------


def test_inputs_mapping_to_the_same_output_never_overwrite_each_other(
    folders: Folders, api: FakeWithoutBG
) -> None:
    inputs = {
        "a.jpg": image_bytes("JPEG", (80, 60), seed=500),
        "a.png": image_bytes("PNG", (50, 40), seed=501),
        "A.jpeg": image_bytes("JPEG", (30, 70), seed=502),  # same output ignoring case
        "sub/a.jpg": image_bytes("JPEG", (20, 20), seed=503),  # another folder: no collision
    }
    sizes = {"a.jpg": (80, 60), "a.png": (50, 40), "A.jpeg": (30, 70), "sub/a.jpg": (20, 20)}
    with InProcessDaemon(
        folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0.1)
    ) as run:
        for name, data in inputs.items():
            drop(folders.inbox, name, data)
        wait_for(lambda: len(run.logs.events("input_disposed")) == len(inputs))
        order = [e["file"] for e in run.logs.events("job_queued")]
        outputs = outputs_by_input(run)
    assert outputs["sub/a.jpg"] == "sub/a.png"
    root = [n for n in order if "/" not in n]
    plain = {"a.jpg": "a.png", "a.png": "a.png", "A.jpeg": "A.png"}
    assert outputs[root[0]] == plain[root[0]], "the first queued keeps the plain name"
    expected_second = {"a.jpg": "a~jpg.png", "a.png": "a~png.png", "A.jpeg": "A~jpeg.png"}
    for name in root[1:]:
        assert outputs[name] == expected_second[name]
    for name, out in outputs.items():
        assert png_size(folders.outbox / out) == sizes[name], f"{out} is not the result of {name}"
    assert len(folders.files(folders.outbox)) == 4
    assert len(api.records()) == 4


def test_the_first_queued_keeps_the_plain_name_whichever_answer_comes_first(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """The collision rule follows the order files are queued in, not the order answers
    come back: a.jpg, queued first but answered last (its first attempt gets a 503), still
    gets a.png."""
    api.fail_next(1, 503, retry_after="2")  # a.png is queued well within those 2 s
    settings = folders.settings(api.url, max_in_flight=1, debounce_seconds=0.1)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", image_bytes("JPEG", (80, 60), seed=510))
        wait_for(lambda: run.logs.events("retry_scheduled"))
        drop(folders.inbox, "a.png", image_bytes("PNG", (50, 40), seed=511))
        wait_for(lambda: len(run.logs.events("input_disposed")) == 2)
        written = [e["file"] for e in run.logs.events("output_written")]
        outputs = outputs_by_input(run)
    assert written == ["a.png", "a.jpg"], "a.png was answered first"
    assert outputs == {"a.jpg": "a.png", "a.png": "a~png.png"}
    assert png_size(folders.outbox / "a.png") == (80, 60)
    assert png_size(folders.outbox / "a~png.png") == (50, 40)


def test_the_same_path_dropped_again_with_new_content_replaces_its_output(
    folders: Folders, api: FakeWithoutBG
) -> None:
    first = image_bytes("JPEG", (64, 48), seed=600)
    second = image_bytes("JPEG", (90, 70), seed=601)
    with InProcessDaemon(
        folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0.1)
    ) as run:
        drop(folders.inbox, "shoe.jpg", first)
        wait_for(lambda: (folders.archive / "shoe.jpg").exists())
        assert png_size(folders.outbox / "shoe.png") == (64, 48)
        drop(folders.inbox, "shoe.jpg", second)
        wait_for(lambda: (folders.archive / "shoe~2.jpg").exists())
        assert [e["output"] for e in run.logs.events("output_written")] == ["shoe.png", "shoe.png"]
    assert png_size(folders.outbox / "shoe.png") == (90, 70)
    assert folders.files(folders.outbox) == ["shoe.png"]
    assert (folders.archive / "shoe.jpg").read_bytes() == first
    assert (folders.archive / "shoe~2.jpg").read_bytes() == second
    assert [r.sha256 for r in api.records()] == [sha(first), sha(second)]


def test_content_dropped_again_after_other_content_at_the_same_path_wins_again(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """A, then B, then A again under one name: each drop is the newest when it is processed,
    so the outbox ends with A's cut-out. (A's job comes back with its old row for the third
    drop; it must not look older than B's and have its result thrown away as stale.)"""
    a = image_bytes("JPEG", (64, 48), seed=610)
    b = image_bytes("JPEG", (90, 70), seed=611)
    with InProcessDaemon(
        folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0.1)
    ) as run:
        outputs: list[bytes] = []
        for n, data in enumerate((a, b, a), start=1):
            drop(folders.inbox, "shoe.jpg", data)
            wait_for(lambda n=n: len(run.logs.events("input_disposed")) == n)
            outputs.append((folders.outbox / "shoe.png").read_bytes())
        assert [e["output"] for e in run.logs.events("output_written")] == ["shoe.png"] * 3
        assert not run.logs.events("output_superseded")
    out_a, out_b, final = outputs
    assert out_a != out_b
    assert final == out_a, "the outbox kept B's cut-out after A was dropped again"
    # and it is A's cut-out indeed: the fake keeps the input's pixels and size, adds a matte
    with Image.open(folders.outbox / "shoe.png") as img, Image.open(io.BytesIO(a)) as src:
        assert img.format == "PNG" and img.mode == "RGBA" and img.size == (64, 48)
        assert img.convert("RGB").tobytes() == src.convert("RGB").tobytes()
    assert folders.files(folders.outbox) == ["shoe.png"]
    assert folders.files(folders.inbox) == []
    # archived (the third drop's bytes are those of archive/shoe.jpg already)
    assert {(folders.archive / f).read_bytes() for f in folders.files(folders.archive)} == {a, b}
    assert {r.sha256 for r in api.records()} == {sha(a), sha(b)}

"""The matte path end to end (issue 10): a proxy of at most 1024 px goes to the alpha-matte
endpoint, the matte is cached, and the cut-out is rendered here at full resolution, in
worker processes, surviving a kill -9 while it renders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import photos
from tests.fake_api import ALPHA_PATH, CUTOUT_PATH, FakeWithoutBG
from tests.support import DaemonProcess, Folders, InProcessDaemon, drop, wait_for


def scene(width: int, height: int, seed: int = 0, *, quality: int = 92, exif: bytes | None = None) -> bytes:
    """A real-looking JPEG: a lit gradient background with texture, and a dark textured
    disc in the middle (the subject)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.stack([120 + 80 * x / width, 140 + 60 * y / height, np.full_like(x, 180)], axis=-1)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) * 0.35) ** 2
    img = np.where(
        disc[..., None], np.stack([70 + 30 * np.sin(x / 7), 40 + 0 * y, 30 + 20 * np.cos(y / 5)], -1), bg
    )
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=quality, **({"exif": exif} if exif else {})
    )
    return buf.getvalue()


def matte_settings(folders: Folders, api: FakeWithoutBG, **overrides: object) -> dict[str, object]:
    return folders.values(api.url, api_mode="matte", **overrides)


def alpha_at(path: Path, xy: tuple[int, int]) -> int:
    with Image.open(path) as img:
        return int(img.getchannel("A").getpixel(xy))  # type: ignore[arg-type]


def test_a_proxy_is_sent_and_the_cut_out_is_rendered_at_full_resolution(
    folders: Folders, api: FakeWithoutBG
) -> None:
    from dropcut.settings import Settings

    data = scene(3000, 2000, seed=1)
    with InProcessDaemon(Settings(**matte_settings(folders, api))) as run:
        drop(folders.inbox, "shoot/a.jpg", data)
        wait_for(lambda: (folders.archive / "shoot" / "a.jpg").exists(), timeout=30)
        assert run.logs.events("output_rendered")
    (record,) = api.records()
    assert record.path == ALPHA_PATH and record.status == 200
    assert record.image_size == (1024, 683) and record.image_format == "JPEG"
    assert record.size is not None and record.size < len(data) / 3
    out = folders.outbox / "shoot" / "a.png"
    with Image.open(out) as img:
        assert (img.mode, img.size) == ("RGBA", (3000, 2000))
    # the fake's matte is a centred ellipse: opaque in the middle, clear in the corners
    assert alpha_at(out, (1500, 1000)) == 255
    assert alpha_at(out, (5, 5)) == 0


def test_the_matte_is_the_cached_result_the_same_photo_elsewhere_costs_nothing(
    folders: Folders, api: FakeWithoutBG
) -> None:
    from dropcut.settings import Settings

    data = scene(1600, 1200, seed=2)
    with InProcessDaemon(Settings(**matte_settings(folders, api))) as run:
        drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=30)
        drop(folders.inbox, "again/b.jpg", data)
        wait_for(lambda: (folders.outbox / "again" / "b.png").exists(), timeout=30)
        assert [e["file"] for e in run.logs.events("result_reused")] == ["again/b.jpg"]
    assert len(api.records()) == 1
    assert (folders.outbox / "a.png").read_bytes() == (folders.outbox / "again" / "b.png").read_bytes()


def test_cutout_mode_keeps_the_binary_endpoint(folders: Folders, api: FakeWithoutBG) -> None:
    from dropcut.settings import Settings

    data = scene(640, 480, seed=3)
    with InProcessDaemon(Settings(**folders.values(api.url, api_mode="cutout"))):
        drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=30)
    (record,) = api.records()
    assert record.path == CUTOUT_PATH and record.size == len(data)


def test_a_photo_over_the_api_limit_goes_as_a_proxy_and_is_refused_locally_in_cutout_mode(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    from dropcut.settings import Settings

    data = photos.big_jpeg(tmp_path / "big.jpg").read_bytes()  # 24 MP, high-ISO noise
    assert len(data) > 10 * 1024 * 1024
    with InProcessDaemon(Settings(**matte_settings(folders, api))):
        drop(folders.inbox, "big.jpg", data)
        wait_for(lambda: (folders.outbox / "big.png").exists(), timeout=60)
    assert [r.image_size for r in api.records()] == [(1024, 683)]
    with Image.open(folders.outbox / "big.png") as img:
        assert (img.mode, img.size) == ("RGBA", (6000, 4000))
    other = Folders.make(folders.root / "cutout")
    with InProcessDaemon(Settings(**other.values(api.url, api_mode="cutout"))):
        drop(other.inbox, "big.jpg", data)
        wait_for(lambda: (other.quarantine / "big.jpg.error.json").exists(), timeout=30)
    assert len(api.records()) == 1, "no request for a file the API would refuse"
    assert '"too_large"' in (other.quarantine / "big.jpg.error.json").read_text()


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_a_rotated_phone_portrait_comes_out_upright(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path, orientation: int
) -> None:
    from dropcut.settings import Settings

    data = photos.oriented_jpeg(tmp_path / "p.jpg", orientation, gps=True).read_bytes()
    with InProcessDaemon(Settings(**matte_settings(folders, api))):
        drop(folders.inbox, "p.jpg", data)
        wait_for(lambda: (folders.outbox / "p.png").exists(), timeout=30)
    (record,) = api.records()
    with Image.open(folders.outbox / "p.png") as out:
        assert out.size == photos.UPRIGHT_SIZE and record.image_size == photos.UPRIGHT_SIZE
        assert photos.marker_corner(out) == "top-left"
        exif = out.getexif()
        assert exif.get(274) == 1 and 0x8825 not in exif  # upright, and no GPS position


def test_an_iphone_heic_becomes_a_cut_out(folders: Folders, api: FakeWithoutBG, tmp_path: Path) -> None:
    from dropcut.settings import Settings

    data = photos.heic(tmp_path / "IMG_0001.HEIC", orientation=6).read_bytes()
    with InProcessDaemon(Settings(**matte_settings(folders, api))):
        drop(folders.inbox, "IMG_0001.HEIC", data)
        wait_for(lambda: (folders.outbox / "IMG_0001.png").exists(), timeout=30)
    (record,) = api.records()
    assert record.image_format == "JPEG" and record.path == ALPHA_PATH
    with Image.open(folders.outbox / "IMG_0001.png") as out:
        assert out.mode == "RGBA" and out.size == photos.UPRIGHT_SIZE
        assert photos.marker_corner(out) == "top-left"


def test_camera_raw_and_multi_frame_files_are_refused_locally_with_their_code(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    from dropcut.settings import Settings

    drop(folders.inbox, "DSC_0001.DNG", photos.raw_like_tiff(tmp_path / "r.dng", dng=True).read_bytes())
    drop(folders.inbox, "scan.tif", photos.multipage_tiff(tmp_path / "m.tif").read_bytes())
    drop(folders.inbox, "anim.gif", photos.animated_gif(tmp_path / "a.gif").read_bytes())
    with InProcessDaemon(Settings(**matte_settings(folders, api, multi_frame="quarantine"))):
        wait_for(lambda: len(list(folders.quarantine.glob("*.error.json"))) == 3, timeout=30)
    codes = {
        p.name: json.loads(p.read_text())["error"]["code"] for p in folders.quarantine.glob("*.error.json")
    }
    assert codes == {
        "DSC_0001.DNG.error.json": "camera_raw",
        "scan.tif.error.json": "multi_frame",
        "anim.gif.error.json": "multi_frame",
    }
    assert api.records() == []


def test_multi_frame_first_processes_the_first_frame_and_says_so(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    from dropcut.cli import status_report
    from dropcut.settings import Settings

    settings = Settings(**matte_settings(folders, api))
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "scan.tif", photos.multipage_tiff(tmp_path / "m.tif", pages=3).read_bytes())
        wait_for(lambda: (folders.outbox / "scan.png").exists(), timeout=30)
        (skipped,) = run.logs.events("frames_skipped")
        assert skipped["frames"] == 3
    assert status_report(settings)["frames_skipped"] == 1


@pytest.mark.slow
def test_kill9_while_rendering_finishes_from_the_cached_matte_after_restart(
    folders: Folders, api: FakeWithoutBG, spawn: object
) -> None:
    env = folders.env(api.url, api_mode="matte")
    drop(folders.inbox, "big.jpg", scene(6000, 4000, seed=5))
    first = spawn(env)  # type: ignore[operator]
    first.wait_event("render_started", timeout=60)
    first.kill9()
    assert not (folders.outbox / "big.png").exists(), "killed before the render was done"
    second = spawn(env)  # type: ignore[operator]
    second.wait_event("output_written", timeout=90)
    assert second.events("result_reused")
    second.stop()
    assert len(api.records()) == 1, "no second request for a matte already paid for"
    with Image.open(folders.outbox / "big.png") as img:
        assert (img.mode, img.size) == ("RGBA", (6000, 4000))
    assert isinstance(first, DaemonProcess)


def test_the_output_keeps_the_originals_icc_profile_and_pixels(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    """A Display-P3 photo: the proxy the API gets is sRGB, the output keeps the P3 pixels
    untouched and carries the P3 profile, so its colours look as the original's do."""
    from dropcut.settings import Settings

    p3 = photos.display_p3_icc()
    original = photos.scene()
    src = tmp_path / "p3.png"
    original.save(src, icc_profile=p3)
    with InProcessDaemon(Settings(**matte_settings(folders, api))):
        drop(folders.inbox, "p3.png", src.read_bytes())
        wait_for(lambda: (folders.outbox / "p3.png").exists(), timeout=30)
    with Image.open(folders.outbox / "p3.png") as out:
        assert out.info.get("icc_profile") == p3
        assert out.convert("RGB").tobytes() == original.tobytes()


def test_the_proxy_is_made_when_the_file_is_queued_and_removed_with_the_job(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """Off the request's path: by the time a rate-limit slot opens the proxy is there
    (made while inspecting), and it goes when the job is done."""
    from dropcut.settings import Settings

    api.latency = 1.0
    with InProcessDaemon(Settings(**matte_settings(folders, api))) as run:
        drop(folders.inbox, "a.jpg", scene(2000, 1500, seed=9))
        queued = wait_for(lambda: run.logs.events("job_queued"))[0]
        proxy = folders.state / "spool" / f"{queued['sha256']}.proxy-1024"
        assert proxy.is_file()
        with Image.open(proxy) as img:
            assert img.size == (1024, 768) and img.format == "JPEG"
        wait_for(lambda: run.logs.events("input_disposed"), timeout=30)
        assert not proxy.exists()

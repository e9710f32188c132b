"""The status page: its contents, its thumbnails, its Retry button, the token off loopback,
and cross-site requests refused; and the page in a real headless Chromium (Debian's
``chromium`` through Selenium), screenshot saved under the test's tmp folder."""

from __future__ import annotations

import io
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench.page import build_database
from PIL import Image
from pydantic import SecretStr

from dropcut.logs import Redactor
from dropcut.metrics import Metrics
from dropcut.paths import Layout
from dropcut.settings import ConfigError, Settings, startup_problems
from dropcut.thumbs import Thumbnails, inside
from dropcut.web import Request, Scrubber, StatusSite, serve, snapshot
from tests.browser import chromium
from tests.fake_api import FakeWithoutBG
from tests.photos import MARKER, scene
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for

TOKEN = "page-token-0123456789abcdef"
CSRF = re.compile(r'name=csrf value="([0-9a-f]{64})"')


def listening(run: InProcessDaemon) -> str:
    event: dict[str, Any] = wait_for(lambda: (run.logs.events("http_listening") or [None])[0], 15)
    return str(event["url"]).replace("0.0.0.0", "127.0.0.1")


def photo(seed: int, size: tuple[int, int] = (360, 240)) -> bytes:
    buf = io.BytesIO()
    scene(size, seed=seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def quarantine_by_the_api(folders: Folders, api: FakeWithoutBG, rel: str, data: bytes) -> None:
    """Drop ``rel``, have the API refuse it (422), wait until it is quarantined (a retry of
    it then succeeds: the fake refuses only once)."""
    api.fail_next(1, 422)
    drop(folders.inbox, rel, data)
    wait_for(
        lambda: (folders.quarantine / rel).exists() and (folders.quarantine / f"{rel}.error.json").exists()
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium (skipped, saying why, where Debian's chromium is missing)."""
    yield from chromium(tmp_path)


def csrf_of(page: str) -> str:
    found = CSRF.search(page)
    assert found, "no Retry form on the page"
    return found.group(1)


# --- who may ask -------------------------------------------------------------------------------


def test_an_address_off_loopback_needs_a_token(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    for listen in ("0.0.0.0:9840", "192.0.2.7:9840", "[::]:9840"):
        settings = folders.settings("http://127.0.0.1:9", http_listen=listen)
        problems = startup_problems(settings)
        assert any("http_token" in p and "not a loopback address" in p for p in problems), problems
        with pytest.raises(ConfigError, match="not a loopback address"):
            serve(settings, current=lambda s=settings: s, metrics=_metrics(settings))
    for listen in ("127.0.0.1:9840", "[::1]:9840", "localhost:9840", ""):
        settings = folders.settings("http://127.0.0.1:9", http_listen=listen)
        assert not any("http_token" in p for p in startup_problems(settings))
    settings = folders.settings("http://127.0.0.1:9", http_listen="0.0.0.0:9840", http_token=TOKEN)
    assert not any("http_token" in p for p in startup_problems(settings))
    settings = folders.settings("http://127.0.0.1:9", http_listen="0.0.0.0:9840", http_token="short")
    assert any("shorter than 16" in p for p in startup_problems(settings))


@pytest.mark.slow
def test_off_loopback_every_request_needs_the_token(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, http_listen="0.0.0.0:0", http_token=TOKEN)
    with InProcessDaemon(settings) as run:
        url = listening(run)
        drop(folders.inbox, "a.jpg", image_bytes("JPEG", seed=1))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        with httpx.Client(base_url=url.rstrip("/"), timeout=10) as anonymous:
            for path in ("/", "/metrics", "/thumb/1/before", "/thumb/1/after", "/?page=2"):
                answer = anonymous.get(path)
                assert answer.status_code == 401, path
                assert answer.headers["www-authenticate"] == 'Bearer realm="dropcut"'
                assert TOKEN not in answer.text
            assert (
                anonymous.get(
                    "/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}
                ).status_code
                == 401
            )
            assert anonymous.get("/", params={"token": "wrong-token-0123456789"}).status_code == 401
            assert anonymous.get("/", headers={"Cookie": f"dropcut_session={TOKEN}"}).status_code == 401
            # a Prometheus scrape: the bearer token
            scrape = anonymous.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert scrape.status_code == 200 and "dropcut_files_total" in scrape.text
        with httpx.Client(base_url=url.rstrip("/"), timeout=10) as person:
            # a person: /?token= once, redirected to / at once with a session cookie
            first = person.get("/", params={"token": TOKEN})
            assert first.status_code == 303 and first.headers["location"] == "/"
            cookie = first.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
            assert TOKEN not in cookie  # (an HMAC of it)
            page = person.get("/")
            assert page.status_code == 200 and "a.jpg" in page.text
            assert TOKEN not in page.text
            assert person.get("/thumb/1/after").headers["content-type"] == "image/jpeg"
            assert person.get("/metrics").status_code == 200
    assert TOKEN not in run.logs.text()


def test_a_foreign_host_name_is_refused_on_loopback(folders: Folders, api: FakeWithoutBG) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1."""
    with InProcessDaemon(folders.settings(api.url, http_listen="127.0.0.1:0")) as run:
        url = listening(run)
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
            answer = httpx.get(url, headers={"Host": host}, timeout=10)
            assert answer.status_code == 421, host
        for host in ("localhost", "127.0.0.1", url.split("/")[2]):
            assert httpx.get(url, headers={"Host": host}, timeout=10).status_code == 200, host


# --- the Retry button ----------------------------------------------------------------------------


@pytest.mark.slow
def test_retry_refuses_cross_site_requests_and_moves_nothing(folders: Folders, api: FakeWithoutBG) -> None:
    with InProcessDaemon(folders.settings(api.url, http_listen="127.0.0.1:0")) as run:
        url = listening(run)
        quarantine_by_the_api(folders, api, "shoot/a.jpg", image_bytes("JPEG", seed=3))
        page = httpx.get(url, timeout=10).text
        csrf = csrf_of(page)
        job = re.search(r'name=job value="(\d+)"', page)
        assert job
        host = url.split("/")[2]
        form = {"csrf": csrf, "job": job.group(1), "qpage": "1"}
        same = {"Origin": f"http://{host}"}
        refused = [
            httpx.get(url + "retry", params=form, headers=same, timeout=10),  # a GET
            httpx.post(url + "retry", data=form, headers={"Origin": "http://evil.example"}, timeout=10),
            httpx.post(url + "retry", data=form, headers={"Origin": "null"}, timeout=10),
            httpx.post(url + "retry", data=form, headers={"Referer": "http://evil.example/x"}, timeout=10),
            httpx.post(url + "retry", data=form, timeout=10),  # no Origin, no Referer
            httpx.post(url + "retry", data={**form, "csrf": ""}, headers=same, timeout=10),
            httpx.post(url + "retry", data={"job": job.group(1)}, headers=same, timeout=10),
            httpx.post(url + "retry", data={**form, "csrf": "0" * 64}, headers=same, timeout=10),
            httpx.post(url + "retry", json=form, headers=same, timeout=10),  # not the form
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert (folders.quarantine / "shoot" / "a.jpg").exists()
        assert not (folders.inbox / "shoot" / "a.jpg").exists()
        assert not run.logs.events("retry_requested")
        # the same request from the page itself: 303 back to the page, the file goes back
        done = httpx.post(url + "retry", data=form, headers={"Referer": url}, timeout=10)
        assert done.status_code == 303
        assert done.headers["location"] == "/?qpage=1&note=retried#quarantine"
        wait_for(lambda: (folders.archive / "shoot" / "a.jpg").exists())
        assert not (folders.quarantine / "shoot" / "a.jpg").exists()
        assert not (folders.quarantine / "shoot" / "a.jpg.error.json").exists()
        assert (folders.outbox / "shoot" / "a.png").exists()
        assert run.logs.events("retry_requested")[0]["file"] == "shoot/a.jpg"
        # a second press of a stale button: nothing left to retry
        again = httpx.post(url + "retry", data=form, headers=same, timeout=10)
        assert again.status_code == 303 and "note=gone" in again.headers["location"]


# --- what the page shows -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_page_shows_names_not_paths_and_never_a_secret(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, http_listen="127.0.0.1:0")
    with InProcessDaemon(settings) as run:
        url = listening(run)
        drop(folders.inbox, "shoot/a.jpg", image_bytes("JPEG", seed=4))
        drop(folders.inbox, "shoot/notes.jpg", b"not an image\n" * 30)
        wait_for(lambda: (folders.archive / "shoot" / "a.jpg").exists())
        wait_for(lambda: (folders.quarantine / "shoot" / "notes.jpg").exists())
        answer = httpx.get(url, timeout=10)
        assert answer.status_code == 200
        page = answer.text
        thumbs = re.findall(r'src="(/thumb/\d+/(?:before|after))"', page)
        scrape = httpx.get(url + "metrics", timeout=10).text
        for path in thumbs:
            assert httpx.get(url.rstrip("/") + path, timeout=10).headers["content-type"] == "image/jpeg"
    assert "shoot/a.jpg" in page and "outbox/shoot/a.png" in page and "quarantine/shoot/notes.jpg" in page
    assert "Retry" in page and 'http-equiv="refresh"' in page
    assert len(thumbs) == 2
    for text in (page, scrape):
        assert API_KEY not in text
        assert str(folders.root) not in text and os.path.realpath(folders.root) not in text
    assert "<script" not in page and "http://" not in page.replace(url, "") and "https://" not in page
    headers = answer.headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert headers["server"] == "dropcut"


def test_error_details_lose_secrets_and_absolute_paths(folders: Folders) -> None:
    settings = folders.settings("http://127.0.0.1:9", api_key="the-api-key-0123456789")
    redactor = Redactor()
    redactor.set_secrets("the-api-key-0123456789")
    scrub = Scrubber(settings, redactor.scrub_text, SecretStr(TOKEN))
    text = (
        f"cannot open {folders.inbox}/shoot/a.jpg: EACCES; state in {folders.state}; "
        f"/etc/dropcut/secret.toml; key the-api-key-0123456789 token {TOKEN}; "
        "429 Rate limit (7 request/minute) at https://api.withoutbg.com/v1.0/alpha-channel; 1/2"
    )
    assert scrub(text) == (
        "cannot open inbox/shoot/a.jpg: EACCES; state in state; …; key [redacted] token [redacted]; "
        "429 Rate limit (7 request/minute) at https://api.withoutbg.com/v1.0/alpha-channel; 1/2"
    )


@pytest.mark.slow
def test_thumbnails_come_from_the_job_record_and_stay_in_the_configured_folders(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    settings = folders.settings(api.url, http_listen="127.0.0.1:0")
    with InProcessDaemon(settings) as run:
        url = listening(run).rstrip("/")
        drop(folders.inbox, "a.jpg", photo(1))
        drop(folders.inbox, "b.jpg", photo(2))
        wait_for(lambda: (folders.archive / "a.jpg").exists() and (folders.archive / "b.jpg").exists())
        ids = sorted(int(i) for i in re.findall(r'data-job="(\d+)"', httpx.get(url, timeout=10).text))
        assert len(ids) == 2
        first = httpx.get(f"{url}/thumb/{ids[0]}/before", timeout=10)
        assert first.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(first.content)) as img:
            assert img.size == (256, 171)  # 360 × 240, at most 256 a side
        cached = sorted((folders.state / "thumbs").glob(f"{ids[0]}-before-*.jpg"))
        assert len(cached) == 1 and cached[0].read_bytes() == first.content
        made = cached[0].stat().st_mtime_ns
        assert httpx.get(f"{url}/thumb/{ids[0]}/before", timeout=10).content == first.content
        assert cached[0].stat().st_mtime_ns == made  # made once
        # the archived input replaced by a link to a file outside every folder: not read
        secret = tmp_path / "elsewhere.jpg"
        secret.write_bytes(photo(9))
        (folders.archive / "b.jpg").unlink()
        (folders.archive / "b.jpg").symlink_to(secret)
        answer = httpx.get(f"{url}/thumb/{ids[1]}/before", timeout=10)
        assert answer.headers["content-type"] == "image/svg+xml" and b"original not found" in answer.content
        assert secret.read_bytes() == photo(9)  # (and not read: no thumbnail of it was made)
        assert not list((folders.state / "thumbs").glob(f"{ids[1]}-before-*"))
        for path in (
            "/thumb/../../etc/passwd",
            "/thumb/%2e%2e/before",
            f"/thumb/{ids[0]}/original",
            "/thumb/999999/before",
            f"/thumb/{ids[0]}/before/../../x",
            "/state/queue.sqlite3",
        ):
            assert httpx.get(url + path, timeout=10).status_code == 404, path
    assert inside(folders.archive, "a.jpg") == Path(os.path.realpath(folders.archive / "a.jpg"))
    for rel in ("b.jpg", "../state/queue.sqlite3", "/etc/passwd", "", None, "."):
        assert inside(folders.archive, rel) is None, rel


@pytest.mark.slow
def test_after_on_success_delete_the_page_shows_a_placeholder(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, http_listen="127.0.0.1:0", on_success="delete")
    with InProcessDaemon(settings) as run:
        url = listening(run).rstrip("/")
        drop(folders.inbox, "a.jpg", photo(1))
        wait_for(lambda: (folders.outbox / "a.png").exists() and not (folders.inbox / "a.jpg").exists())
        job = re.findall(r'data-job="(\d+)"', httpx.get(url, timeout=10).text)[0]
        before = httpx.get(f"{url}/thumb/{job}/before", timeout=10)
        after = httpx.get(f"{url}/thumb/{job}/after", timeout=10)
    assert before.headers["content-type"] == "image/svg+xml" and b"original not kept" in before.content
    assert after.headers["content-type"] == "image/jpeg"


def test_the_listener_takes_ipv6_and_the_page_works_without_a_database(folders: Folders) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    settings = folders.settings("http://127.0.0.1:9", http_listen="[::1]:0")
    try:
        server = serve(settings, current=lambda: settings, metrics=_metrics(settings))
    except ConfigError as exc:
        pytest.skip(f"cannot listen on ::1 here: {exc}")
    assert server is not None
    try:
        assert server.url == f"http://[::1]:{server.port}/"
        metrics = httpx.get(server.url + "metrics", timeout=10)
        assert metrics.status_code == 200 and "dropcut_build_info" in metrics.text
        assert "dropcut_jobs" not in metrics.text  # no database yet: those gauges are left out
        page = httpx.get(server.url, timeout=10)
        assert page.status_code == 503 and "cannot be read" in page.text
        assert str(folders.root) not in page.text
    finally:
        server.stop()


def test_the_thumbnail_cache_keeps_the_newest(tmp_path: Path) -> None:
    thumbs = Thumbnails(Layout(tmp_path, tmp_path, tmp_path, tmp_path, tmp_path / "state"), keep=3)
    thumbs.prepare()
    (thumbs.dir / ".half-written.part").write_bytes(b"x")
    for n in range(5):
        path = thumbs.dir / f"{n}-before-0000.jpg"
        path.write_bytes(b"jpeg")
        os.utime(path, (1000 + n, 1000 + n))
    assert thumbs.prune() == 2
    assert sorted(p.name for p in thumbs.dir.iterdir()) == [
        ".half-written.part",
        "2-before-0000.jpg",
        "3-before-0000.jpg",
        "4-before-0000.jpg",
    ]
    thumbs.prepare()  # at start: what a crash left half-written goes
    assert not (thumbs.dir / ".half-written.part").exists()


def test_pages_of_outputs_and_quarantine(folders: Folders) -> None:
    settings = folders.settings("http://127.0.0.1:9")
    folders.state.mkdir(parents=True, exist_ok=True)
    shares = (("done", 0.6), ("quarantined", 0.3), ("queued", 0.1))
    counts = build_database(folders.state / "queue.sqlite3", 200, seed=5, shares=shares)
    size = 10
    site = StatusSite(
        settings=lambda: settings,
        metrics=_metrics(settings),
        token=None,
        bound_host="127.0.0.1",
        page_size=size,
    )

    def get(query: str) -> str:
        params = dict(pair.split("=") for pair in query.split("&")) if query else {}
        answer = site.handle(Request("GET", "/", params, {"Host": "127.0.0.1:9840"}))
        assert answer.status == 200
        return answer.body.decode()

    def outputs(page: str) -> list[int]:
        return [int(i) for i in re.findall(r'<figure class=out data-job="(\d+)"', page)]

    def held(page: str) -> list[int]:
        return [int(i) for i in re.findall(r'<tr data-job="(\d+)"', page)]

    pages = -(-counts["done"] // size)
    qpages = -(-counts["quarantined"] // size)
    seen: list[int] = []
    for n in range(1, pages + 1):
        page = get(f"page={n}")
        assert f"page {n} of {pages}" in page
        seen += outputs(page)
    assert len(seen) == len(set(seen)) == counts["done"]
    assert seen == sorted(seen, reverse=True)  # newest first (build_database: ids in time order)
    assert outputs(get("")) == seen[:size]
    assert outputs(get("page=0")) == outputs(get("page=abc")) == seen[:size]  # page 1
    assert outputs(get("page=99999")) == seen[(pages - 1) * size :]  # the last
    assert f"{counts['done']:,} in all" in get("")
    quarantined: list[int] = []
    for n in range(1, qpages + 1):
        quarantined += held(get(f"qpage={n}&page=2"))
    assert len(quarantined) == counts["quarantined"]
    assert 'href="/?page=2&amp;qpage=2#quarantine"' in get("page=2")


# --- in a real browser ---------------------------------------------------------------------------


def thumbs_loaded(driver: Any) -> list[dict[str, Any]] | None:
    state: list[dict[str, Any]] = driver.execute_script(
        "return [...document.querySelectorAll('img.thumb')].map(i => ({"
        "src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,"
        "rect: i.getBoundingClientRect().toJSON()}))"
    )
    return state if state and all(t["complete"] and t["width"] > 0 for t in state) else None


def shown(screenshot: Image.Image, thumb: dict[str, Any], part: str = "middle") -> Image.Image:
    """Where the thumbnail's image shows in the screenshot (``object-fit: contain``
    letterboxes it in its box): its ``middle`` third, or its top-left ``corner`` (a fifth
    of each side, from 2 % in)."""
    rect = thumb["rect"]
    scale = min(rect["width"] / thumb["width"], rect["height"] / thumb["height"])
    width, height = thumb["width"] * scale, thumb["height"] * scale
    left = rect["x"] + (rect["width"] - width) / 2
    top = rect["y"] + (rect["height"] - height) / 2
    if part == "middle":
        box = (left + width / 3, top + height / 3, left + 2 * width / 3, top + 2 * height / 3)
    else:
        box = (left + width / 50, top + height / 50, left + width / 5, top + height / 5)
    return screenshot.crop(tuple(round(v) for v in box)).convert("RGB")


def share_near(img: Image.Image, colour: tuple[int, int, int], tolerance: int) -> float:
    pixels = list(img.getdata())
    near = sum(1 for p in pixels if all(abs(a - b) <= tolerance for a, b in zip(p, colour, strict=True)))
    return near / len(pixels)


@pytest.mark.slow
def test_the_page_in_chromium_shows_the_thumbnails_and_its_retry_button_works(
    folders: Folders, api: FakeWithoutBG, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    settings = folders.settings(api.url, http_listen="127.0.0.1:0", api_mode="matte")
    with InProcessDaemon(settings) as run:
        url = listening(run)
        quarantine_by_the_api(folders, api, "shoot/refused.jpg", photo(20))
        for n in range(3):
            drop(folders.inbox, f"shoot/IMG_{n:04d}.jpg", photo(n + 1))
        wait_for(lambda: len(list((folders.archive / "shoot").glob("IMG_*.jpg"))) == 3)
        wait_for(lambda: len(list((folders.outbox / "shoot").glob("IMG_*.png"))) == 3)

        browser.get(url)
        assert browser.title == "dropcut status"
        thumbs = wait_for(lambda: thumbs_loaded(browser), 30)
        assert len(thumbs) == 6
        for thumb in thumbs:
            assert (thumb["width"], thumb["height"]) == (256, 171), thumb  # the JPEGs, not a placeholder
        shot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        with Image.open(shot) as img:
            screenshot = img.convert("RGB")
        for thumb in thumbs:
            if thumb["src"].endswith("/after"):
                # the cut-out (the fake's matte: an ellipse) on the checkerboard: its two
                # greys in the corner, the photo in the middle
                corner = shown(screenshot, thumb, "corner")
                assert share_near(corner, (255, 255, 255), 10) > 0.15, thumb
                assert share_near(corner, (214, 214, 214), 10) > 0.15, thumb
                assert share_near(shown(screenshot, thumb), (214, 214, 214), 10) < 0.05, thumb
            else:
                # the photo: its green marker in the top-left corner, its noise in the middle
                assert share_near(shown(screenshot, thumb, "corner"), MARKER, 40) > 0.2, thumb
                assert len(set(shown(screenshot, thumb).getdata())) > 200, thumb
        text = browser.find_element(By.ID, "quarantine").text
        assert "quarantine/shoot/refused.jpg" in text and "422" in text

        browser.find_element(By.CSS_SELECTOR, "#quarantine tr[data-job] button").click()
        wait_for(lambda: "note=retried" in browser.current_url, 15)
        assert "The file is back in the inbox" in browser.find_element(By.TAG_NAME, "main").text
        wait_for(lambda: (folders.outbox / "shoot" / "refused.png").exists(), 20)
        assert not (folders.quarantine / "shoot" / "refused.jpg").exists()
        # (the input is archived just after its output is placed: wait for that too)
        wait_for(lambda: (folders.archive / "shoot" / "refused.jpg").exists(), 20)
        browser.get(url)
        wait_for(lambda: thumbs_loaded(browser), 30)
        browser.save_screenshot(str(tmp_path / "status-page-after-retry.png"))
        assert "Nothing is quarantined." in browser.find_element(By.ID, "quarantine").text
    assert API_KEY not in browser.page_source


@pytest.mark.slow
def test_the_token_in_chromium_leaves_the_address_bar_and_the_cookie_does_the_rest(
    folders: Folders, api: FakeWithoutBG, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    settings = folders.settings(api.url, http_listen="0.0.0.0:0", http_token=TOKEN)
    with InProcessDaemon(settings) as run:
        url = listening(run)
        quarantine_by_the_api(folders, api, "b.jpg", photo(5))
        drop(folders.inbox, "a.jpg", photo(4))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        browser.get(url)
        assert "needs its token" in browser.find_element(By.TAG_NAME, "main").text
        browser.get(f"{url}?token={TOKEN}")
        wait_for(lambda: browser.title == "dropcut status", 10)
        assert browser.current_url == url  # the token is gone from the address bar
        assert browser.execute_script("return document.cookie") == ""  # HttpOnly
        thumbs = wait_for(lambda: thumbs_loaded(browser), 30)
        assert len(thumbs) == 2 and all(t["width"] == 256 for t in thumbs)
        browser.find_element(By.CSS_SELECTOR, "#quarantine tr[data-job] button").click()
        wait_for(lambda: "note=retried" in browser.current_url, 15)
        wait_for(lambda: (folders.outbox / "b.png").exists(), 20)
        browser.save_screenshot(str(tmp_path / "status-page-token.png"))
        assert TOKEN not in browser.page_source
    assert TOKEN not in run.logs.text()


def _metrics(settings: Settings) -> Metrics:
    return Metrics(overview=lambda: snapshot(settings), watch=lambda: ("native", True), version="test")

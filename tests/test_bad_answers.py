"""Bad answers end to end, the real daemon against the fake API: a 200 whose PNG is no
usable cut-out, an answer far larger than the image allows, a trickled answer, a redirect,
an error that echoes the API key. None of them may reach the outbox, the result cache or a
quarantine record as it came; each is retried, or pauses the queue, as the README says.

Some of these rely on the dispatcher passing ``expected_size`` (the spool image's
(width, height)) to ``WithoutBG.remove_background``: the 1×1 and wrong-size PNGs, the huge
answers, and the ``location`` field of ``queue_paused``.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dropcut.client import answer_limit
from tests.fake_api import BadPng, FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for

SIZE = (64, 48)


def assert_good_cutout(folders: Folders, rel: str) -> None:
    with Image.open(folders.outbox / rel) as img:
        img.load()
        assert (img.size, img.mode) == (SIZE, "RGBA")


def staging_left(folders: Folders) -> list[str]:
    staging = folders.outbox / ".dropcut-staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        pytest.param("iend_only", "undecodable", id="iend-only"),
        pytest.param("broken_idat", "undecodable", id="broken-idat"),
        pytest.param("rgb", "wrong_mode", id="rgb-without-alpha"),
        pytest.param("tiny", "wrong_size", id="1x1"),  # needs expected_size wired
        pytest.param("wrong_size", "wrong_size", id="wrong-size"),  # needs expected_size wired
    ],
)
def test_a_png_that_is_no_usable_cutout_is_retried_and_never_published(
    folders: Folders, api: FakeWithoutBG, kind: BadPng, problem: str
) -> None:
    data = image_bytes(size=SIZE, seed=70)
    api.bad_png_next(2, kind)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        retries = run.logs.events("retry_scheduled")
        assert [e["code"] for e in retries] == ["bad_response", "bad_response"]
        assert all(f"[{problem}]" in e["detail"] for e in retries)
        # What the cache kept is the good answer: the same content again is served from it.
        drop(folders.inbox, "b.jpg", data)
        wait_for(lambda: (folders.archive / "b.jpg").exists())
        assert len(run.logs.events("result_reused")) == 1
    assert [r.status for r in api.records()] == [200, 200, 200]
    assert_good_cutout(folders, "a.png")
    assert (folders.outbox / "b.png").read_bytes() == (folders.outbox / "a.png").read_bytes()
    assert not list(folders.quarantine.rglob("*"))


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({}, id="content-length-announces-it"),
        pytest.param({"announce": False}, id="close-delimited"),
        pytest.param({"gzip": True}, id="gzip"),
    ],
)
def test_an_answer_larger_than_the_image_allows_is_retried_and_removed(
    folders: Folders, api: FakeWithoutBG, how: dict[str, bool]
) -> None:
    """Needs expected_size wired: unknown, the bound is that of a 100 MP image."""
    api.huge_next(1, 16 * 1024 * 1024, **how)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(size=SIZE, seed=71))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        (retry,) = run.logs.events("retry_scheduled")
        assert retry["code"] == "bad_response" and "[too_large]" in retry["detail"]
    assert (folders.outbox / "a.png").stat().st_size < answer_limit(SIZE)
    assert_good_cutout(folders, "a.png")
    assert folders.files(folders.outbox) == ["a.png"]
    assert staging_left(folders) == []
    cached = [p for p in folders.state.rglob("*") if p.is_file() and p.stat().st_size > answer_limit(SIZE)]
    assert cached == [], "nothing that large is kept anywhere in state_dir"


def test_a_trickled_answer_times_out_as_a_whole_and_is_retried(folders: Folders, api: FakeWithoutBG) -> None:
    api.trickle_next(1, interval=0.02)  # a byte each 20 ms: no single read ever times out
    settings = folders.settings(api.url, request_timeout_seconds=1.0)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", image_bytes(size=SIZE, seed=72))
        wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=15)
        (retry,) = run.logs.events("retry_scheduled")
        assert retry["code"] == "timeout" and "[deadline]" in retry["detail"]
        assert 900 <= retry["duration_ms"] < 5000
    assert [r.status for r in api.records()] == [200, 200]
    assert_good_cutout(folders, "a.png")


MOVED = "https://moved.example"


def test_a_redirect_pauses_the_queue_and_quarantines_nothing(folders: Folders, api: FakeWithoutBG) -> None:
    api.redirect_all(MOVED)  # every path, the credit check's included: api_url is wrong
    with InProcessDaemon(folders.settings(api.url, credit_check_interval_seconds=0.3)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(size=SIZE, seed=73))
        (paused,) = wait_for(lambda: run.logs.events("queue_paused"))
        assert paused["code"] == "endpoint_redirected" and paused["status"] == 301
        assert f"{MOVED}/v1.0/image-without-background" in paused["detail"]
        checks = api.credit_checks
        wait_for(lambda: api.credit_checks >= checks + 2)  # still paused, still checking
        assert len(api.records()) == 1, "a paused queue sends nothing"
        assert not run.logs.events("retry_scheduled") and not run.logs.events("file_quarantined")
        assert (folders.inbox / "a.jpg").exists()
        api.redirect_all(None)
        wait_for(lambda: run.logs.events("queue_resumed"))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
    assert_good_cutout(folders, "a.png")
    assert not list(folders.quarantine.rglob("*"))


def test_queue_paused_names_the_redirect_location(folders: Folders, api: FakeWithoutBG) -> None:
    """Needs the dispatcher to log Pause.location in ``queue_paused``."""
    api.redirect_all(MOVED, status=308)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(size=SIZE, seed=74))
        (paused,) = wait_for(lambda: run.logs.events("queue_paused"))
    assert paused["location"] == f"{MOVED}/v1.0/image-without-background"


def test_an_error_echoing_the_key_is_quarantined_with_the_key_redacted(
    folders: Folders, api: FakeWithoutBG
) -> None:
    api.echo_key_next(1, 422)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(size=SIZE, seed=75))
        wait_for(lambda: run.logs.events("file_quarantined"))
    text = (folders.quarantine / "a.jpg.error.json").read_text()
    record = json.loads(text)
    assert API_KEY not in text
    assert "[redacted]" in record["error"]["detail"]
    assert "[redacted]" in record["history"][-1]["detail"]

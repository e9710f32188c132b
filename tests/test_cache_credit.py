"""The result cache's bound, and credit reporting."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dropcut.cache import ResultCache
from dropcut.cli import status_report
from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for


def test_cache_evicts_least_recently_used_first(tmp_path: Path) -> None:
    src = tmp_path / "result.png"
    src.write_bytes(b"x" * 1000)
    cache = ResultCache(tmp_path / "cache", max_bytes=2500)
    for i, sha in enumerate(["a" * 64, "b" * 64]):
        cache.store(sha, src)
        os.utime(cache.path(sha), (1000 + i, 1000 + i))
    assert cache.get("a" * 64) is not None  # used now: "b" is the oldest
    cache.store("c" * 64, src)
    assert cache.get("b" * 64) is None
    assert cache.get("a" * 64) is not None and cache.get("c" * 64) is not None
    assert cache.total_bytes == 2000
    # the bound holds across restarts: a new instance counts what is on disk
    assert ResultCache(tmp_path / "cache", max_bytes=2500).total_bytes == 2000


def test_cache_removes_half_written_entries_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / f"{'d' * 64}.123.tmp").write_bytes(b"partial")
    ResultCache(directory, max_bytes=10_000)
    assert list(directory.iterdir()) == []


@pytest.fixture
def api() -> Iterator[FakeWithoutBG]:
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0, credit=52) as server:
        yield server


def test_credit_logged_and_low_credit_warned_once_per_crossing(tmp_path: Path, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path)
    settings = folders.settings(api.url, credit_warn_below=50, credit_check_interval_seconds=0.2)
    with InProcessDaemon(settings) as run:
        first = wait_for(lambda: run.logs.events("credit_checked"))[0]
        assert first["credit"] == 52
        for i in range(3):
            drop(folders.inbox, f"{i}.jpg", image_bytes(seed=300 + i))
        wait_for(lambda: len(list(folders.outbox.glob("*.png"))) == 3)
        wait_for(lambda: any(e["credit"] == 49 for e in run.logs.events("credit_checked")))
        checks = len(run.logs.events("credit_checked"))
        wait_for(lambda: len(run.logs.events("credit_checked")) >= checks + 2)
        low = run.logs.events("credit_low")
        assert len(low) == 1 and low[0]["credit"] == 49
        api.credit = 100  # topped up: above the line again
        wait_for(lambda: any(e["credit"] == 100 for e in run.logs.events("credit_checked")))
        api.credit = 10  # a second crossing warns again
        wait_for(lambda: len(run.logs.events("credit_low")) == 2)
    report = status_report(settings)
    assert report["credit"]["credit"] == 10
    assert report["jobs"]["done"] == 3 and report["paused"] is None

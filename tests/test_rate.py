"""The rate limit used to the last slot, against a strict sliding-window server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for

LIMIT = 3
PERIOD = 1.5
FILES = 12


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = 0
    for i, t in enumerate(times):
        best = max(best, sum(1 for u in times[i:] if u - t < period))
    return best


@pytest.mark.parametrize("latency", [0.05, 0.6], ids=["fast", "slow"])
def test_backlog_uses_the_whole_allowance_without_429(tmp_path: Path, latency: float) -> None:
    folders = Folders.make(tmp_path)
    for i in range(FILES):
        drop(folders.inbox, f"b/{i:02}.jpg", image_bytes(seed=100 + i))
    with FakeWithoutBG(api_key=API_KEY, rate_limit=LIMIT, rate_period=PERIOD, latency=latency) as api:
        settings = folders.settings(
            api.url, rate_limit_requests=LIMIT, rate_limit_period_seconds=PERIOD, max_in_flight=4
        )
        with InProcessDaemon(settings):
            wait_for(lambda: len(list(folders.outbox.rglob("*.png"))) == FILES, timeout=30)
        records = api.records()
    assert [r.status for r in records].count(429) == 0
    arrivals = [r.arrived for r in records]
    assert len(arrivals) == FILES
    assert max_in_window(arrivals, PERIOD) <= LIMIT
    # The ideal schedule starts LIMIT requests per PERIOD: the last one at this offset.
    ideal = math.floor((FILES - 1) / LIMIT) * PERIOD
    actual = max(arrivals) - min(arrivals)
    assert ideal / actual >= 0.95, f"used {ideal / actual:.3f} of the allowance ({actual:.2f} s vs {ideal} s)"


def test_window_survives_a_restart(tmp_path: Path) -> None:
    """Requests made before a restart still count: the new process does not burst."""
    folders = Folders.make(tmp_path)
    with FakeWithoutBG(api_key=API_KEY, rate_limit=LIMIT, rate_period=3.0) as api:
        settings = folders.settings(api.url, rate_limit_requests=LIMIT, rate_limit_period_seconds=3.0)
        with InProcessDaemon(settings):
            for i in range(LIMIT):
                drop(folders.inbox, f"{i}.jpg", image_bytes(seed=200 + i))
            wait_for(lambda: len(list(folders.outbox.rglob("*.png"))) == LIMIT)
        for i in range(LIMIT, 2 * LIMIT):
            drop(folders.inbox, f"{i}.jpg", image_bytes(seed=200 + i))
        with InProcessDaemon(settings):
            wait_for(lambda: len(list(folders.outbox.rglob("*.png"))) == 2 * LIMIT, timeout=30)
        records = api.records()
    assert [r.status for r in records].count(429) == 0
    assert max_in_window([r.arrived for r in records], 3.0) <= LIMIT

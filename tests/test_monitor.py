"""Headlines for conditions (issue 12, items 3 and 4): the condition board with a fake
clock, the overview's words and numbers, and a real daemon whose API goes away and comes
back: one ``condition_started``, ``condition_continues`` while it lasts, one
``condition_ended`` with its length, and ``dropcut status`` saying it in a sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from dropcut.conditions import Condition, ConditionBoard, Observed
from dropcut.overview import Overview, RateUse, eta_seconds, human_duration, sentence, summary_line
from dropcut.queue import STATES, JobQueue, RequestRecord, connect
from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for

# --- the board, with a fake clock -----------------------------------------------------------

T0 = 1_700_000_000.0
DROPCUT = str(Path(sys.executable).parent / "dropcut")


# Each case: report_every, then (seconds after T0, conditions that hold) steps, and the
# reports expected at each step as (kind, code, lasted seconds).
BOARD_CASES = {
    "starts once, repeats every 300 s, ends once": (
        300.0,
        [
            (0, ["api_unreachable"], [("started", "api_unreachable", 0)]),
            (1, ["api_unreachable"], []),
            (299, ["api_unreachable"], []),
            (300, ["api_unreachable"], [("continues", "api_unreachable", 300)]),
            (301, ["api_unreachable"], []),
            (600, ["api_unreachable"], [("continues", "api_unreachable", 600)]),
            (642, [], [("ended", "api_unreachable", 642)]),
            (643, [], []),
        ],
    ),
    "two at once, each on its own schedule": (
        10.0,
        [
            (0, ["disk_full"], [("started", "disk_full", 0)]),
            (5, ["disk_full", "watch_degraded"], [("started", "watch_degraded", 0)]),
            (10, ["disk_full", "watch_degraded"], [("continues", "disk_full", 10)]),
            (15, ["watch_degraded"], [("ended", "disk_full", 15), ("continues", "watch_degraded", 10)]),
            (16, [], [("ended", "watch_degraded", 11)]),
        ],
    ),
    "a condition that comes back is a new one": (
        100.0,
        [
            (0, ["account_paused"], [("started", "account_paused", 0)]),
            (3, [], [("ended", "account_paused", 3)]),
            (4, ["account_paused"], [("started", "account_paused", 0)]),
            (104, ["account_paused"], [("continues", "account_paused", 100)]),
        ],
    ),
    "nothing holds: nothing to say": (
        1.0,
        [(0, [], []), (5, [], [])],
    ),
}


@pytest.mark.parametrize("report_every, steps", BOARD_CASES.values(), ids=BOARD_CASES.keys())
def test_board_reports_start_repeat_end(
    report_every: float, steps: list[tuple[float, list[str], list[tuple[str, str, float]]]]
) -> None:
    board = ConditionBoard(report_every)
    for t, codes, expected in steps:
        reports = board.update([Observed(c, f"why {c}") for c in codes], now=T0 + t, waiting=4)
        got = [(r.kind, r.condition.code, r.lasted) for r in reports]
        assert got == expected, f"at +{t} s"
        assert sorted(c.code for c in board.current) == sorted(codes)


def test_board_keeps_the_start_a_stage_knows_and_takes_the_new_detail() -> None:
    board = ConditionBoard(60.0)
    # a pause stored by the previous run began an hour ago
    [started] = board.update([Observed("account_paused", "402", since=T0 - 3600)], now=T0, waiting=2)
    assert started.kind == "started" and started.lasted == 3600
    assert board.update([Observed("account_paused", "402 again")], now=T0 + 1, waiting=3) == []
    [c] = board.current
    assert (c.since, c.detail, c.waiting) == (T0 - 3600, "402 again", 3)
    with pytest.raises(ValueError, match="report_every"):
        ConditionBoard(0)


# --- the overview's numbers and words ---------------------------------------------------------

ETA_CASES = [
    # backlog, limit, period, paused, expected seconds
    (0, 7, 60.0, False, None),
    (1, 7, 60.0, False, 0.0),
    (7, 7, 60.0, False, 0.0),
    (8, 7, 60.0, False, 60.0),
    (700, 7, 60.0, False, 99 * 60.0),
    (15, 5, 2.0, False, 4.0),
    (50, 7, 60.0, True, None),
]


@pytest.mark.parametrize("backlog, limit, period, paused, expected", ETA_CASES)
def test_eta_at_the_allowance(
    backlog: int, limit: int, period: float, paused: bool, expected: float | None
) -> None:
    assert eta_seconds(backlog, limit=limit, period=period, paused=paused) == expected


def test_eta_refuses_a_nonsense_allowance() -> None:
    with pytest.raises(ValueError):
        eta_seconds(3, limit=0, period=60)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0 s"),
        (42.4, "42 s"),
        (60, "1 min 00 s"),
        (185, "3 min 05 s"),
        (7620, "2 h 07 min"),
        (273600, "3 d 4 h"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_sentence_says_what_since_when_why_and_who_waits() -> None:
    since = datetime(2026, 11, 30, 14, 3).timestamp()
    c = Condition("api_unreachable", "network_error: connection refused", since, waiting=40)
    assert sentence(c, since + 750) == (
        "cannot reach the API since 14:03 (12 min 30 s): network_error: connection refused; 40 files wait"
    )
    one = Condition("disk_full", "", since, waiting=1)
    assert sentence(one, since + 5) == "the disk is full; the queue is paused since 14:03 (5 s); 1 file wait"
    assert "None" not in sentence(Condition("watch_degraded", "", since), since)


def test_summary_line() -> None:
    jobs = dict.fromkeys(STATES, 0) | {"queued": 12, "inflight": 1, "done": 340, "quarantined": 2}
    ov = Overview(
        at=T0,
        jobs=jobs,
        rate=RateUse(limit=7, period=60.0, window=5, minute=5, hour=100, day=300),
        eta_seconds=103.0,
        credit=None,
        last_success=None,
        frames_skipped=0,
    )
    assert summary_line(ov) == (
        "queued 12 · in flight 1 · done 340 · quarantined 2 · rate 5/7 per 60 s · ETA 1 min 43 s"
    )
    assert len(summary_line(ov)) <= 120


def test_request_log_counts_by_time_and_forgets_after_forty_days(tmp_path: Path) -> None:
    queue = JobQueue(connect(tmp_path / "q.sqlite3"))
    for t in (T0 - 41 * 86400, T0 - 3000, T0 - 30, T0 - 1):
        queue.record_request(RequestRecord(t, "/v1.0/alpha-channel", 200, 0.5, 100, 50))
    assert queue.requests_since(T0 - 60) == 2
    assert queue.requests_since(T0 - 3600) == 3
    assert queue.requests_since(0) == 3  # the 41-day-old one is gone
    queue.close()


# --- a real daemon: the API goes away and comes back ---------------------------------------------


def test_an_api_outage_is_a_condition_started_repeated_and_ended(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    settings = folders.settings(api.url, condition_report_seconds=1.0, max_attempts=100)
    api.fail_next(10_000, status=503)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=1201))
        drop(folders.inbox, "b.jpg", image_bytes(seed=1202))
        [started] = wait_for(lambda: run.logs.events("condition_started"))
        assert started["code"] == "api_unreachable" and started["level"] == "warning"
        assert "503" in started["detail"] or "server" in started["detail"]
        assert started["message"].startswith("cannot reach the API since ")
        continues = wait_for(lambda: run.logs.events("condition_continues"), timeout=10)
        assert continues[0]["code"] == "api_unreachable" and continues[0]["waiting"] == 2

        # status, from another process, says it in a sentence (and never "None")
        env = folders.env(api.url)
        out = subprocess.run(
            [DROPCUT, "status"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "dropcut: running" in out.stdout
        assert "- cannot reach the API since " in out.stdout and "2 files wait" in out.stdout
        assert "no estimate while nothing is sent" in out.stdout
        assert "None" not in out.stdout
        data = json.loads(
            subprocess.run(
                [DROPCUT, "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
        [cond] = data["conditions"]
        assert cond["code"] == "api_unreachable" and cond["waiting"] == 2
        assert data["backlog"] == 2 and data["eta_seconds"] is None  # nothing is sent: no estimate
        assert data["rate"]["used"]["minute"] >= 1

        api.reset()  # the API is back
        wait_for(lambda: (folders.outbox / "a.png").exists() and (folders.outbox / "b.png").exists())
        [ended] = wait_for(lambda: run.logs.events("condition_ended"), timeout=10)
        assert ended["code"] == "api_unreachable" and ended["lasted_s"] >= 1
        assert len(run.logs.events("condition_started")) == 1
        # the stored conditions are gone with it
        queue = JobQueue(connect(folders.state / "queue.sqlite3", readonly=True))
        wait_for(lambda: queue.get_meta("conditions") is None, timeout=5)
        queue.close()


def test_a_clean_stop_leaves_no_stale_condition_behind(folders: Folders, api: FakeWithoutBG) -> None:
    api.fail_next(10_000, status=503)
    with InProcessDaemon(folders.settings(api.url, max_attempts=100)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=1203))
        wait_for(lambda: run.logs.events("condition_started"))
    queue = JobQueue(connect(folders.state / "queue.sqlite3", readonly=True))
    try:
        assert queue.get_meta("conditions") is None
        assert queue.counts()["queued"] == 1  # nothing lost
    finally:
        queue.close()

"""The spend guard (issue 14, item 1): budgets per calendar day and month, counted in the
queue's request log, with a fake clock across a day and a month boundary; the queue waits
at the cap (condition ``budget_reached``) and goes on by itself in the next period, or at
once after ``dropcut budget raise N`` / ``dropcut resume``."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dropcut.budget import Caps, Verdict, period_bounds, period_key, verdict
from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for

DROPCUT = str(Path(sys.executable).parent / "dropcut")
BERLIN = ZoneInfo("Europe/Berlin")


def ts(text: str, tz: ZoneInfo | None = None) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz or UTC).timestamp()


# --- periods ------------------------------------------------------------------------------------

PERIOD_CASES = [
    # now, tz, period, start, end (local ISO)
    ("2026-11-30T23:59:59", UTC, "day", "2026-11-30T00:00:00", "2026-12-01T00:00:00"),
    ("2026-12-01T00:00:00", UTC, "day", "2026-12-01T00:00:00", "2026-12-02T00:00:00"),
    ("2026-11-30T23:59:59", UTC, "month", "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
    ("2026-12-31T12:00:00", UTC, "month", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ("2028-02-29T08:00:00", UTC, "day", "2028-02-29T00:00:00", "2028-03-01T00:00:00"),
    # daylight saving: the day of the change is 23 or 25 hours long
    ("2026-03-29T12:00:00", BERLIN, "day", "2026-03-29T00:00:00", "2026-03-30T00:00:00"),
    ("2026-10-25T12:00:00", BERLIN, "day", "2026-10-25T00:00:00", "2026-10-26T00:00:00"),
]


@pytest.mark.parametrize("now, tz, period, start, end", PERIOD_CASES)
def test_period_bounds_are_local_calendar_days_and_months(
    now: str, tz: ZoneInfo, period: str, start: str, end: str
) -> None:
    got = period_bounds(ts(now, tz), tz, period)  # type: ignore[arg-type]
    assert got == (ts(start, tz), ts(end, tz))


def test_daylight_saving_days_are_23_and_25_hours() -> None:
    spring = period_bounds(ts("2026-03-29T12:00:00", BERLIN), BERLIN, "day")
    autumn = period_bounds(ts("2026-10-25T12:00:00", BERLIN), BERLIN, "day")
    assert (spring[1] - spring[0], autumn[1] - autumn[0]) == (23 * 3600, 25 * 3600)


def test_period_keys() -> None:
    now = ts("2026-11-30T23:30:00")  # in Berlin already the first of December
    assert period_key(now, UTC, "day") == "day:2026-11-30"
    assert period_key(now, BERLIN, "day") == "day:2026-12-01"
    assert period_key(now, BERLIN, "month") == "month:2026-12"


# --- verdicts --------------------------------------------------------------------------------------

NOW = ts("2026-11-30T15:00:00")
DAY_END, MONTH_END = ts("2026-12-01T00:00:00"), ts("2026-12-01T00:00:00")
VERDICT_CASES = {
    "no caps": (Caps(), {"day": 10**6, "month": 10**6}, {}, frozenset(), Verdict(False)),
    "under the day cap": (Caps(per_day=5), {"day": 4}, {}, frozenset(), Verdict(False)),
    "at the day cap": (Caps(per_day=5), {"day": 5}, {}, frozenset(), Verdict(True, "day", 5, 5, DAY_END)),
    "raised today": (Caps(per_day=5), {"day": 5}, {"day:2026-11-30": 2}, frozenset(), Verdict(False)),
    "a raise of yesterday does not count": (
        Caps(per_day=5),
        {"day": 5},
        {"day:2026-11-29": 2},
        frozenset(),
        Verdict(True, "day", 5, 5, DAY_END),
    ),
    "lifted today": (Caps(per_day=5), {"day": 9}, {}, frozenset({"day:2026-11-30"}), Verdict(False)),
    "month cap": (
        Caps(per_day=100, per_month=50),
        {"day": 10, "month": 50},
        {},
        frozenset(),
        Verdict(True, "month", 50, 50, MONTH_END),
    ),
    "both reached: waits for the later reset": (
        Caps(per_day=5, per_month=50),
        {"day": 5, "month": 60},
        {},
        frozenset(),
        Verdict(True, "month", 50, 60, MONTH_END),
    ),
}


@pytest.mark.parametrize(
    "caps, used, raised, lifted, expected", VERDICT_CASES.values(), ids=VERDICT_CASES.keys()
)
def test_verdicts(
    caps: Caps, used: dict[str, int], raised: dict[str, int], lifted: frozenset[str], expected: Verdict
) -> None:
    assert verdict(caps, used, now=NOW, tz=UTC, raised=raised, lifted=lifted) == expected  # type: ignore[arg-type]


def test_both_reached_mid_month_waits_for_the_month() -> None:
    now = ts("2026-11-10T15:00:00")
    v = verdict(Caps(per_day=5, per_month=50), {"day": 5, "month": 50}, now=now, tz=UTC)
    assert (v.period, v.resets_at) == ("month", ts("2026-12-01T00:00:00"))


# --- a real daemon, with a fake clock across midnight and the first of the month ------------------


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def cli(folders: Folders, api: FakeWithoutBG, *args: str, **settings: object) -> str:
    done = subprocess.run(
        [DROPCUT, *args],
        env=folders.env(api.url, **settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def outputs(folders: Folders) -> int:
    return len(list(folders.outbox.glob("*.png")))


def test_the_day_cap_holds_then_resets_at_midnight_and_the_month_cap_on_the_first(
    folders: Folders, api: FakeWithoutBG
) -> None:
    # 30 s before the last midnight of November, UTC
    clock = FakeClock(ts("2026-11-30T23:59:30"))
    settings = folders.settings(
        api.url, budget_per_day=2, budget_per_month=3, budget_timezone="UTC", max_in_flight=4
    )
    with InProcessDaemon(settings, clock=clock) as run:
        for i in range(6):
            drop(folders.inbox, f"p{i}.jpg", image_bytes(seed=1400 + i))
        wait_for(lambda: run.logs.events("budget_reached"))
        wait_for(lambda: outputs(folders) == 2)
        [reached] = run.logs.events("budget_reached")
        assert (reached["period"], reached["budget"], reached["used"]) == ("day", 2, 2)
        assert reached["resets_at"] == "2026-12-01T00:00:00+00:00"
        cond = wait_for(lambda: run.logs.events("condition_started"))[0]
        assert cond["code"] == "budget_reached" and "2 of 2 requests this day" in cond["detail"]
        assert len(api.requests) == 2  # never more than the cap, with 4 in flight allowed

        # Midnight, and the first of December: the day starts again, and so does the
        # month (were November's two still counted, the month cap of 3 would let one go).
        clock.now = ts("2026-12-01T00:00:05")
        wait_for(lambda: run.logs.events("budget_available"))
        wait_for(lambda: len(run.logs.events("budget_reached")) == 2)
        wait_for(lambda: outputs(folders) == 4)
        assert len(api.requests) == 4
        assert run.logs.events("budget_reached")[1]["period"] == "day"

        # the next day the month cap is what holds
        clock.now = ts("2026-12-02T00:00:05")
        wait_for(lambda: len(run.logs.events("budget_reached")) == 3)
        wait_for(lambda: outputs(folders) == 5)
        third = run.logs.events("budget_reached")[2]
        assert (third["period"], third["budget"], third["used"]) == ("month", 3, 3)
        assert third["resets_at"] == "2027-01-01T00:00:00+00:00"
        assert len(api.requests) == 5


def test_budget_raise_and_resume_let_more_go_at_once(folders: Folders, api: FakeWithoutBG) -> None:
    caps = {"budget_per_day": 1, "budget_timezone": "UTC"}
    with InProcessDaemon(folders.settings(api.url, **caps)) as run:
        for i in range(4):
            drop(folders.inbox, f"r{i}.jpg", image_bytes(seed=1450 + i))
        wait_for(lambda: run.logs.events("budget_reached"))
        wait_for(lambda: outputs(folders) == 1)
        assert len(api.requests) == 1
        shown = cli(folders, api, "budget", **caps)
        assert "this day: 1 requests, cap 1;" in shown and "this month: 1 requests, no cap;" in shown

        said = cli(folders, api, "budget", "raise", "1", **caps)
        assert "raised the caps of today and this month by 1" in said
        wait_for(lambda: outputs(folders) == 2)
        wait_for(lambda: len(run.logs.events("budget_reached")) == 2)
        assert len(api.requests) == 2
        assert "cap 2 (1 + 1 raised)" in cli(folders, api, "budget", **caps)

        assert "lifted" in cli(folders, api, "resume", **caps)
        wait_for(lambda: outputs(folders) == 4)
        assert len(api.requests) == 4


def test_cached_answers_are_not_counted(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, budget_per_day=2, budget_timezone="UTC")
    photo = image_bytes(seed=1460)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", photo)
        wait_for(lambda: (folders.outbox / "a.png").exists())
        drop(folders.inbox, "copy-of-a.jpg", photo)  # same content: from the result cache
        wait_for(lambda: (folders.outbox / "copy-of-a.png").exists())
        drop(folders.inbox, "b.jpg", image_bytes(seed=1461))  # the second request: the cap
        wait_for(lambda: (folders.outbox / "b.png").exists())
        drop(folders.inbox, "c.jpg", image_bytes(seed=1462))
        wait_for(lambda: [e for e in run.logs.events("job_queued") if e["file"] == "c.jpg"])
        wait_for(lambda: run.logs.events("budget_reached"))
        assert len(api.requests) == 2
        assert not (folders.outbox / "c.png").exists()

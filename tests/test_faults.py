"""API faults end to end: retries, refusals, account pauses, duplicates, rate limit."""

from __future__ import annotations

import json
import time

import pytest

from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for


def statuses(api: FakeWithoutBG) -> list[int]:
    return [r.status for r in api.records()]


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(lambda a: a.fail_next(3, 500), id="5xx"),
        pytest.param(lambda a: a.fail_next(2, 503, retry_after="0"), id="503-retry-after"),
        pytest.param(lambda a: a.fail_next(2, 429), id="429"),
        pytest.param(lambda a: a.drop_next(2), id="dropped-connection"),
        pytest.param(lambda a: a.truncate_next(2), id="truncated-body"),
        pytest.param(lambda a: a.garbage_next(2), id="json-body-on-200"),
    ],
)
def test_transient_errors_are_retried_until_success(folders: Folders, api: FakeWithoutBG, inject) -> None:  # type: ignore[no-untyped-def]
    inject(api)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=10))
        wait_for(lambda: (folders.outbox / "a.png").exists())
        retries = run.logs.events("retry_scheduled")
        assert retries and all(e["file"] == "a.jpg" for e in retries)
        assert [e["attempt"] for e in retries] == list(range(1, len(retries) + 1))
    assert statuses(api)[-1] == 200
    assert not list(folders.quarantine.rglob("*.json"))
    # partial or foreign bodies never reach the outbox under a final name
    assert folders.files(folders.outbox) == ["a.png"]


def test_retry_after_is_honoured(folders: Folders, api: FakeWithoutBG) -> None:
    api.fail_next(1, 503, retry_after="1")
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=11))
        wait_for(lambda: (folders.outbox / "a.png").exists())
        (retry,) = run.logs.events("retry_scheduled")
        assert retry["delay_s"] >= 1.0
    first, second = api.records()
    assert second.arrived - first.arrived >= 1.0


def test_exhausted_retries_quarantine_with_history(folders: Folders, api: FakeWithoutBG) -> None:
    api.fail_next(100, 502)
    settings = folders.settings(api.url, max_attempts=8)
    with InProcessDaemon(settings):
        drop(folders.inbox, "a.jpg", image_bytes(seed=12))
        wait_for(lambda: (folders.quarantine / "a.jpg.error.json").exists(), timeout=30)
    record = json.loads((folders.quarantine / "a.jpg.error.json").read_text())
    assert record["error"]["code"] == "retries_exhausted"
    assert record["error"]["source"] == "api"
    assert record["attempts"] == 8
    assert [h["status"] for h in record["history"]] == [502] * 8
    assert len(api.records()) == 8  # never quarantined before the 8th attempt
    assert (folders.quarantine / "a.jpg").exists()


@pytest.mark.parametrize("status", [413, 415, 422])
def test_api_refusal_quarantines_the_file(folders: Folders, api: FakeWithoutBG, status: int) -> None:
    api.fail_next(1, status)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=13))
        (event,) = wait_for(lambda: run.logs.events("file_quarantined"))
        assert event["status"] == status and event["source"] == "api"
    record = json.loads((folders.quarantine / "a.jpg.error.json").read_text())
    assert record["error"]["status"] == status and record["error"]["source"] == "api"
    assert record["attempts"] == 1
    assert statuses(api) == [status]
    assert not (folders.inbox / "a.jpg").exists()
    assert not list(folders.outbox.rglob("*.png"))


@pytest.mark.parametrize(
    ("setup", "fix", "code"),
    [
        pytest.param(
            lambda a: setattr(a, "credit", 0),
            lambda a: setattr(a, "credit", 100),
            "insufficient_credit",
            id="402",
        ),
        pytest.param(
            lambda a: setattr(a, "expired", True),
            lambda a: setattr(a, "expired", False),
            "credits_expired",
            id="403",
        ),
    ],
)
def test_account_problems_pause_and_resume(folders: Folders, api: FakeWithoutBG, setup, fix, code) -> None:  # type: ignore[no-untyped-def]
    setup(api)
    with InProcessDaemon(folders.settings(api.url, credit_check_interval_seconds=0.3)) as run:
        for i in range(3):
            drop(folders.inbox, f"p{i}.jpg", image_bytes(seed=20 + i))
        wait_for(lambda: run.logs.events("queue_paused"))
        wait_for(lambda: run.daemon.dispatcher.in_flight == 0)
        sent = len(api.records())
        checks_before = api.credit_checks
        wait_for(lambda: api.credit_checks >= checks_before + 2)  # still paused, still checking
        assert len(api.records()) == sent, "a paused queue sends nothing"
        assert sent <= 3  # at most what was already in flight when the first refusal came
        assert len(run.logs.events("queue_paused")) == 1
        assert run.logs.events("queue_paused")[0]["code"] == code
        assert not list(folders.quarantine.rglob("*")), "an account problem quarantines nothing"
        fix(api)
        wait_for(lambda: run.logs.events("queue_resumed"))
        for i in range(3):
            wait_for(lambda i=i: (folders.outbox / f"p{i}.png").exists())
    assert not list(folders.quarantine.rglob("*"))


def test_invalid_key_pauses_without_quarantine(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, api_key="wrong-key")
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=30))
        wait_for(lambda: run.logs.events("queue_paused"))
        paused = run.logs.events("queue_paused")[0]
        assert paused["code"] == "invalid_api_key" and paused["status"] == 401
        assert not list(folders.quarantine.rglob("*"))
        assert (folders.inbox / "a.jpg").exists()
    assert "wrong-key" not in run.logs.text()


def test_same_content_costs_one_request(folders: Folders, api: FakeWithoutBG) -> None:
    data = image_bytes(seed=40)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        drop(folders.inbox, "other/b.jpg", data)
        drop(folders.inbox, "c.jpeg", data)
        wait_for(
            lambda: (folders.archive / "other" / "b.jpg").exists() and (folders.archive / "c.jpeg").exists()
        )
        assert (folders.outbox / "a.png").read_bytes() == (folders.outbox / "other" / "b.png").read_bytes()
        assert (folders.outbox / "c.png").read_bytes() == (folders.outbox / "a.png").read_bytes()
        assert len(run.logs.events("result_reused")) == 2
    assert len(api.records()) == 1


def test_result_cache_survives_restart(folders: Folders, api: FakeWithoutBG) -> None:
    data = image_bytes(seed=41)
    with InProcessDaemon(folders.settings(api.url)):
        drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: (folders.archive / "a.jpg").exists())
    with InProcessDaemon(folders.settings(api.url)):
        drop(folders.inbox, "again/a.jpg", data)
        wait_for(lambda: (folders.outbox / "again" / "a.png").exists())
    assert len(api.records()) == 1


def test_keep_mode_is_not_sent_again_after_restart(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, on_success="keep")
    drop(folders.inbox, "a.jpg", image_bytes(seed=42))
    with InProcessDaemon(settings):
        wait_for(lambda: (folders.outbox / "a.png").exists())
    with InProcessDaemon(settings.model_copy(update={"log_level": "debug"})) as run:
        assert run.logs.events("daemon_started")[0]["found"] == 1  # the start-up scan found it
        wait_for(lambda: run.logs.events("file_known"))  # …and recognised it without reading it
        assert not run.logs.events("file_admitted")
    assert (folders.inbox / "a.jpg").exists()
    assert len(api.records()) == 1


def test_delete_mode_removes_input_after_output(folders: Folders, api: FakeWithoutBG) -> None:
    with InProcessDaemon(folders.settings(api.url, on_success="delete")):
        drop(folders.inbox, "a.jpg", image_bytes(seed=43))
        wait_for(lambda: (folders.outbox / "a.png").exists() and not (folders.inbox / "a.jpg").exists())
    assert not folders.archive.exists() or not list(folders.archive.rglob("a.jpg"))


def test_new_content_at_same_path_is_processed_again(folders: Folders, api: FakeWithoutBG) -> None:
    with InProcessDaemon(folders.settings(api.url)):
        drop(folders.inbox, "a.jpg", image_bytes(seed=44))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        first = (folders.outbox / "a.png").read_bytes()
        drop(folders.inbox, "a.jpg", image_bytes(size=(90, 70), seed=45))
        wait_for(lambda: (folders.archive / "a~2.jpg").exists())
        wait_for(lambda: (folders.outbox / "a.png").read_bytes() != first)
    assert len(api.records()) == 2


def test_an_outage_quarantines_nothing_while_the_budget_lasts(folders: Folders, api: FakeWithoutBG) -> None:
    """The server answers 503 to everything for 3 s. Backoff plus the queue-wide hold
    spread the attempts out: no file runs through its 8 attempts, nothing is quarantined."""
    settings = folders.settings(
        api.url, max_attempts=8, retry_base_delay_seconds=0.2, retry_max_delay_seconds=1.0
    )
    api.fail_next(10_000, 503)
    with InProcessDaemon(settings) as run:
        for i in range(4):
            drop(folders.inbox, f"o{i}.jpg", image_bytes(seed=60 + i))
        wait_for(lambda: len(api.records()) >= 3)
        time.sleep(3.0)  # the outage itself
        during = len(api.records())
        api.reset()  # the server is back
        wait_for(lambda: len(list(folders.outbox.glob("*.png"))) == 4, timeout=30)
        attempts = [e["attempt"] for e in run.logs.events("retry_scheduled")]
    assert not list(folders.quarantine.rglob("*")), "an outage within the budget quarantines nothing"
    assert max(attempts) < 8
    assert during < 4 * 8, f"{during} requests in 3 s of outage: the backoff did not wait"


def test_an_outage_backs_off_as_one_service_not_file_by_file(folders: Folders, api: FakeWithoutBG) -> None:
    """The wait after a 503 grows with the outage, not with the attempts of whichever job
    happened to probe: six queued files must not each restart the backoff from its base
    (that would be 6 x 5 quick probes before the waits reach the cap)."""
    settings = folders.settings(
        api.url, max_attempts=8, retry_base_delay_seconds=0.05, retry_max_delay_seconds=1.6
    )
    api.fail_next(10_000, 503)
    with InProcessDaemon(settings) as run:
        for i in range(6):
            drop(folders.inbox, f"s{i}.jpg", image_bytes(seed=90 + i))
        wait_for(lambda: len(run.logs.events("job_queued")) == 6)
        wait_for(lambda: len(api.records()) >= 1)
        time.sleep(3.0)  # the outage itself
        during = len(api.records())
        api.reset()  # the server is back
        wait_for(lambda: len(list(folders.outbox.glob("*.png"))) == 6, timeout=30)
    assert not list(folders.quarantine.rglob("*"))
    # One service-wide backoff: about 0.05+0.1+0.2+0.4+0.8 s, then ~0.8 s a probe: ~8 in
    # 3 s. Per-file backoff from each job's own attempt count makes about 25.
    assert during <= 15, f"{during} requests in 3 s of outage"

"""Faults that must neither stop the daemon nor strand a job: answers httpx cannot decode,
a result cache that cannot be written, an input that may not be moved (EPERM)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, make_immutable, wait_for


def test_an_upload_answer_that_cannot_be_decoded_is_retried(folders: Folders, api: FakeWithoutBG) -> None:
    api.bad_encoding_next(1)
    with InProcessDaemon(folders.settings(api.url)) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=1))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        retry = run.logs.events("retry_scheduled")
        assert [e["code"] for e in retry] == ["protocol_error"] or retry[0]["attempt"] == 1, retry
        assert not run.logs.events("job_failed")
    assert [r.status for r in api.records()] == [200, 200]
    assert (folders.outbox / "a.png").exists()


def test_a_credit_answer_that_cannot_be_decoded_does_not_stop_the_daemon(
    folders: Folders, api: FakeWithoutBG
) -> None:
    api.bad_encoding_credit_next(1)  # the check at start
    with InProcessDaemon(folders.settings(api.url)) as run:
        wait_for(lambda: api.credit_checks >= 1)
        drop(folders.inbox, "a.jpg", image_bytes(seed=2))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        assert not run.logs.events("stage_crashed")
    assert run.result == 0


def test_an_unwritable_result_cache_costs_no_output(
    folders: Folders, api: FakeWithoutBG, immutable: list[Path]
) -> None:
    with InProcessDaemon(folders.settings(api.url)) as run:
        make_immutable(immutable, folders.state / "results")
        drop(folders.inbox, "a.jpg", image_bytes(seed=3))
        wait_for(lambda: (folders.archive / "a.jpg").exists())
        failed = run.logs.events("cache_store_failed")
        assert [e["file"] for e in failed] == ["a.jpg"]
        assert not run.logs.events("disk_full") and not run.logs.events("job_failed")
    assert (folders.outbox / "a.png").exists()
    assert [r.status for r in api.records()] == [200], "one request, published despite the cache"


def test_an_input_that_may_not_be_moved_waits_survives_a_restart_and_is_moved_later(
    folders: Folders, api: FakeWithoutBG, immutable: list[Path]
) -> None:
    """EPERM on the archive move (an immutable folder; SMB gives EACCES/EPERM/EBUSY): the
    output is kept, the problem is reported once, the daemon restarts cleanly, and the
    input is archived at a rescan once the folder can be written again."""
    data = image_bytes(seed=4)
    settings = folders.settings(api.url, rescan_interval_seconds=0.5, log_level="debug")
    drop(folders.inbox, "sub/a.jpg", data)
    make_immutable(immutable, folders.inbox / "sub")
    with InProcessDaemon(settings) as run:
        wait_for(lambda: len(run.logs.events("rescan_done")) >= 3)
        failed = run.logs.events("input_dispose_failed")
        assert len(failed) >= 3, "tried again after each rescan"
        reported = [e for e in failed if e["level"] == "warning"]  # the others are debug
        assert len(reported) == 1 and reported[0]["file"] == "sub/a.jpg" and "EPERM" in reported[0]["reason"]
        assert not run.logs.events("job_failed")
        assert (folders.outbox / "sub" / "a.png").exists()
    with InProcessDaemon(settings) as run:  # a restart with the job still waiting
        wait_for(lambda: run.logs.events("daemon_started"))
        subprocess.run(["chattr", "-i", str(folders.inbox / "sub")], check=True)
        wait_for(lambda: (folders.archive / "sub" / "a.jpg").exists())
        assert [e["file"] for e in run.logs.events("input_disposed")] == ["sub/a.jpg"]
    assert (folders.archive / "sub" / "a.jpg").read_bytes() == data
    assert [r.status for r in api.records()] == [200]


def test_a_refusal_that_cannot_be_quarantined_is_not_sent_again(
    folders: Folders, api: FakeWithoutBG, immutable: list[Path]
) -> None:
    """The API refuses the file (422), but the quarantine folder cannot be written (EPERM):
    the refusal is kept and the move waits for a later rescan. The file is never sent
    again, whatever the rescans find."""
    folders.quarantine.mkdir(exist_ok=True)
    api.fail_next(1, 422)
    settings = folders.settings(api.url, rescan_interval_seconds=0.5, log_level="debug")
    with InProcessDaemon(settings) as run:
        make_immutable(immutable, folders.quarantine)
        drop(folders.inbox, "a.jpg", image_bytes(seed=5))
        wait_for(lambda: run.logs.events("quarantine_failed"))
        wait_for(lambda: len(run.logs.events("rescan_done")) >= 3)
        assert [r.status for r in api.records()] == [422], "a refused file is not sent again"
        assert (folders.inbox / "a.jpg").exists()
        subprocess.run(["chattr", "-i", str(folders.quarantine)], check=True)
        wait_for(lambda: (folders.quarantine / "a.jpg.error.json").exists())
        wait_for(lambda: (folders.quarantine / "a.jpg").exists())
    assert not (folders.inbox / "a.jpg").exists()
    assert [r.status for r in api.records()] == [422]

"""The notifications wired into a real daemon (issue 14, item 3): quarantined files arrive
batched in one message, a paused account and its end arrive as conditions, a spent
budget and a held batch as their own events, and none of them carries the key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for

RECEIVER = """\
import json, os, sys
data = sys.stdin.read()
with open(sys.argv[1], "a") as fh:
    fh.write(json.dumps({"message": json.loads(data), "env": dict(os.environ)}) + "\\n")
"""


def received(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def messages(path: Path, event: str) -> list[dict[str, object]]:
    return [r["message"] for r in received(path) if r["message"]["event"] == event]  # type: ignore[index]


def receiver(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "receiver.py"
    script.write_text(RECEIVER)
    out = tmp_path / "received.jsonl"
    return f"{sys.executable} {script} {out}", out


def test_quarantines_are_batched_and_a_pause_is_told_without_the_key(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    command, out = receiver(tmp_path)
    settings = folders.settings(api.url, notify_command=command, notify_batch_seconds=1.0)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "bad1.jpg", b"not an image at all\n" * 10)
        drop(folders.inbox, "bad2.jpg", b"not an image either\n" * 10)
        wait_for(lambda: len(run.logs.events("file_quarantined")) == 2)
        [batch] = wait_for(lambda: messages(out, "files_quarantined"), timeout=20)
        assert batch["count"] == 2
        assert sorted(f["file"] for f in batch["files"]) == ["bad1.jpg", "bad2.jpg"]  # type: ignore[attr-defined]

        api.credit = 0  # 402 at the next request: the account pauses the queue
        drop(folders.inbox, "a.jpg", image_bytes(seed=1501))
        [paused] = wait_for(lambda: messages(out, "condition_started"), timeout=20)
        assert paused["code"] == "account_paused" and paused["waiting"] == 1
        assert str(paused["summary"]).startswith("the API refused the account")
    for record in received(out):
        text = json.dumps(record)
        assert API_KEY not in text  # neither in a message nor in the command's environment
        assert not [k for k in record["env"] if k.upper().startswith("DROPCUT_")]  # type: ignore[attr-defined]


def test_a_spent_budget_and_a_held_batch_have_their_own_messages(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    command, out = receiver(tmp_path)
    settings = folders.settings(
        api.url, notify_command=command, budget_per_day=2, hold_batches_over=3, budget_timezone="UTC"
    )
    with InProcessDaemon(settings):
        for i in range(5):
            drop(folders.inbox, f"p{i}.jpg", image_bytes(seed=1510 + i))
        [held] = wait_for(lambda: messages(out, "batch_held"), timeout=20)
        assert held["held"] == 2 and held["credits"] == 2 and "dropcut approve" in str(held["summary"])
        [budget] = wait_for(lambda: messages(out, "budget_reached"), timeout=20)
        assert (budget["budget"], budget["period"]) == (2, "day")
        started = messages(out, "condition_started")
        assert not [m for m in started if m["code"] in ("budget_reached", "batch_held")]

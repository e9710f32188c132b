"""``dropcut run`` as a real process: signals, grace period, kill -9, JSON logs, secrets.

Every test runs ``python -m dropcut.cli run`` with DROPCUT_* variables against the fake
withoutBG server over real HTTP, and looks at its files, its queue database and every line
it writes (stdout and stderr together).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.fake_api import FakeWithoutBG
from tests.support import REPO, DaemonProcess, Folders, drop, image_bytes, wait_for

SECRET = "sk-dropcut-PROC-4vW8nK2qTz"
"""The API key of these tests: distinctive, so that finding it anywhere means a leak."""

STAGING = ".dropcut-staging"

# Loaded by the daemon's interpreter at start-up (``sitecustomize`` on PYTHONPATH). Once
# dropcut has configured its logging and started, it makes the libraries speak: httpx and watchdog log
# records (one of them two lines long), a Python warning, a library error with a traceback,
# and a crashing thread; the last three carry the API key in their text.
PROBE = """
import logging, os, threading, time, warnings

def _configured():
    # logging is set up, and the daemon is past start-up (its lock file holds our pid)
    lock = os.path.join(os.environ["DROPCUT_STATE_DIR"], "dropcut.lock")
    try:
        with open(lock) as fh:
            locked = fh.read().strip() == str(os.getpid())
    except OSError:
        locked = False
    return locked and threading.excepthook is not threading.__excepthook__ and any(
        type(h).__name__ == "_StdlibBridge" for h in logging.getLogger().handlers
    )

def _crash(secret):
    raise ValueError("probe thread failed, key " + secret)

def _probe():
    deadline = time.monotonic() + 30
    while not _configured():
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    secret = os.environ.get("PROBE_SECRET", "")
    logging.getLogger("httpx").warning("probe: httpx speaking")
    logging.getLogger("watchdog.observers.inotify").error("probe: watchdog line one\\nline two")
    warnings.warn("probe: a python warning about key " + secret, UserWarning, stacklevel=1)
    try:
        raise RuntimeError("probe: library failure, key " + secret)
    except RuntimeError:
        logging.getLogger("httpcore").exception("probe: httpcore caught something")
    t = threading.Thread(target=_crash, args=(secret,), name="probe-crash")
    t.start()
    t.join()
    logging.getLogger("probe").warning("probe: done")

threading.Thread(target=_probe, name="probe", daemon=True).start()
"""


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    return Folders.make(tmp_path / "srv")


@pytest.fixture
def api() -> Iterator[FakeWithoutBG]:
    with FakeWithoutBG(api_key=SECRET, rate_limit=50, rate_period=1.0) as server:
        yield server


def env_for(folders: Folders, api: FakeWithoutBG, **overrides: Any) -> dict[str, str]:
    env = folders.env(api.url, api_key=SECRET, **overrides)
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def stopped(proc: DaemonProcess, timeout: float = 10) -> int:
    """Wait for a clean exit and for its last line (``daemon_stopped``) to be read."""
    code = proc.wait(timeout)
    wait_for(lambda: proc.events("daemon_stopped"), timeout=5)
    return code


def json_lines(proc: DaemonProcess) -> list[dict[str, Any]]:
    """Every line the process wrote, each of which must be one JSON object with an
    ``event`` and a ``timestamp``."""
    events = []
    for line in list(proc.lines):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(event, dict), line
        assert event.get("event") and event.get("timestamp"), line
        events.append(event)
    return events


def names_after(events: list[dict[str, Any]], marker: str) -> list[str]:
    names = [e["event"] for e in events]
    return names[names.index(marker) + 1 :]


def of_file(proc: DaemonProcess, name: str, rel: str) -> list[dict[str, Any]]:
    return [e for e in proc.events(name) if e.get("file") == rel]


def queue_rows(folders: Folders) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{folders.state / 'queue.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT rel_path, state FROM jobs").fetchall())
    finally:
        conn.close()


def staging_leftovers(folders: Folders) -> list[str]:
    return [
        str(p)
        for root in (folders.outbox, folders.archive, folders.quarantine)
        if (root / STAGING).is_dir()
        for p in (root / STAGING).iterdir()
    ]


def explain(folders: Folders, api: FakeWithoutBG, *procs: DaemonProcess) -> str:
    """What to look at when a run did not finish."""
    conn = sqlite3.connect(f"file:{folders.state / 'queue.sqlite3'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT rel_path, state, attempts, next_attempt_at, error FROM jobs").fetchall()
    finally:
        conn.close()
    parts = [f"jobs: {rows}", f"api: {[(r.status, r.filename, r.arrived) for r in api.records()]}"]
    for name, root in (("inbox", folders.inbox), ("outbox", folders.outbox), ("archive", folders.archive)):
        parts.append(f"{name}: {folders.files(root)}")
    for i, proc in enumerate(procs):
        parts.append(f"--- process {i} ---")
        parts.extend(proc.lines)
    return "\n".join(parts)


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGBA" and img.size == size


# --- stop signals ------------------------------------------------------------------------------


def test_sigint_lets_the_request_in_flight_finish(folders: Folders, api: FakeWithoutBG, spawn: Any) -> None:
    api.latency = 1.0
    proc = spawn(env_for(folders, api, shutdown_grace_seconds=5))
    drop(folders.inbox, "a.jpg", image_bytes(seed=1))
    proc.wait_event("upload_started")
    asked = time.monotonic()
    proc.signal(signal.SIGINT)
    assert stopped(proc) == 0
    assert time.monotonic() - asked < 10
    events = json_lines(proc)
    after = names_after(events, "daemon_stopping")
    # the answer arrived after the stop was asked for, and was used
    assert {"upload_succeeded", "output_written", "input_disposed"} <= set(after)
    assert after[-1] == "daemon_stopped"
    assert proc.events("daemon_stopped")[0]["requeued"] == 0
    assert not proc.events("job_requeued")
    assert_png(folders.outbox / "a.png", (64, 48))
    assert folders.files(folders.archive) == ["a.jpg"]
    assert folders.files(folders.inbox) == []
    assert queue_rows(folders) == {"a.jpg": "done"}
    assert [r.status for r in api.records()] == [200]


def test_idle_daemon_stops_at_once(folders: Folders, api: FakeWithoutBG, spawn: Any) -> None:
    proc = spawn(env_for(folders, api))
    asked = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert stopped(proc) == 0
    assert time.monotonic() - asked < 3
    names = [e["event"] for e in json_lines(proc)]
    assert "daemon_stopping" in names and names[-1] == "daemon_stopped"
    assert proc.events("daemon_stopped")[0]["requeued"] == 0


def test_second_instance_refuses_with_one_line_and_exit_2(
    folders: Folders, api: FakeWithoutBG, spawn: Any
) -> None:
    env = env_for(folders, api)
    first = spawn(env)
    second = subprocess.run(
        [sys.executable, "-m", "dropcut.cli", "run"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 2
    assert first.proc is not None and first.proc.poll() is None  # the first one is untouched
    assert second.stdout == ""
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and "another dropcut" in lines[0], lines


def test_request_outlasting_the_grace_is_requeued_and_sent_after_restart(
    folders: Folders, api: FakeWithoutBG, spawn: Any
) -> None:
    api.latency = 30.0
    env = env_for(folders, api, shutdown_grace_seconds=0.5)
    data = image_bytes(seed=2)
    proc = spawn(env)
    drop(folders.inbox, "slow.jpg", data)
    proc.wait_event("upload_started")
    asked = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert stopped(proc) == 0
    assert time.monotonic() - asked < 10
    json_lines(proc)
    requeued = proc.events("job_requeued")
    assert [e["file"] for e in requeued] == ["slow.jpg"]
    assert proc.events("daemon_stopped")[0]["requeued"] == 1
    assert not proc.events("output_written")
    assert folders.files(folders.outbox) == []
    assert (folders.inbox / "slow.jpg").read_bytes() == data
    assert queue_rows(folders) == {"slow.jpg": "queued"}
    assert staging_leftovers(folders) == []

    api.latency = 0.0
    restarted = time.time()
    again = spawn(env)
    wait_for(lambda: (folders.archive / "slow.jpg").exists(), timeout=15)
    assert again.stop() == 0
    wait_for(lambda: again.events("daemon_stopped"), timeout=5)
    json_lines(again)
    assert_png(folders.outbox / "slow.png", (64, 48))
    assert folders.files(folders.outbox) == ["slow.png"]
    sent_again = [r for r in api.records() if r.arrived >= restarted]
    assert [r.status for r in sent_again] == [200]
    assert queue_rows(folders) == {"slow.jpg": "done"}


def test_no_file_is_admitted_after_a_stop_signal(folders: Folders, api: FakeWithoutBG, spawn: Any) -> None:
    api.latency = 2.5  # longer than the re-check below, and than one health check (2 s)
    proc = spawn(env_for(folders, api, shutdown_grace_seconds=6, corrupt_grace_seconds=1))
    drop(folders.inbox, "busy.jpg", image_bytes(seed=3))
    proc.wait_event("upload_started")
    # A scanner still writing: the first look finds a cut-off JPEG, a re-check is due in 1 s.
    whole = image_bytes("JPEG", (96, 64), seed=4)
    drop(folders.inbox, "scan.jpg", whole[: len(whole) // 2])
    wait_for(lambda: of_file(proc, "file_recheck_scheduled", "scan.jpg"))
    proc.signal(signal.SIGTERM)
    proc.wait_event("daemon_stopping")
    drop(folders.inbox, "scan.jpg", whole)  # the scanner finishes
    assert stopped(proc, 15) == 0
    events = json_lines(proc)
    assert (folders.outbox / "busy.png").exists()  # the request in flight was finished
    after = names_after(events, "daemon_stopping")
    admission = [
        n
        for n in after
        if n in ("file_admitted", "job_queued", "file_quarantined", "watch_started", "watch_restored")
    ]
    assert admission == [], f"admission went on after the stop signal: {after}"
    assert (folders.inbox / "scan.jpg").read_bytes() == whole


# --- logs and secrets ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "api_key_file", "credentials"])
def test_every_line_is_json_and_the_key_never_shows(
    source: str, tmp_path: Path, folders: Folders, api: FakeWithoutBG, spawn: Any
) -> None:
    env = env_for(folders, api, log_level="debug")
    if source == "api_key_file":
        del env["DROPCUT_API_KEY"]
        key_file = tmp_path / "secrets" / "api.key"
        key_file.parent.mkdir()
        key_file.write_text(SECRET + "\n")
        env["DROPCUT_API_KEY_FILE"] = str(key_file)
    elif source == "credentials":
        del env["DROPCUT_API_KEY"]
        creds = tmp_path / "credentials"
        creds.mkdir()
        (creds / "dropcut-api-key").write_text(SECRET + "\n")
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe), env.get("PYTHONPATH", "")) if p)
    env["PROBE_SECRET"] = SECRET
    env["PYTHONWARNINGS"] = "default"

    proc = spawn(env)
    assert proc.proc is not None
    cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
    assert b"dropcut.cli" in cmdline
    assert SECRET.encode() not in cmdline

    api.fail_next(1, status=422)  # the API refuses one of the two: an error JSON is written
    drop(folders.inbox, "one.jpg", image_bytes(seed=5))
    drop(folders.inbox, "two.jpg", image_bytes(seed=6))
    errors = lambda: list(folders.quarantine.glob("*.error.json"))  # noqa: E731
    wait_for(lambda: errors() and folders.files(folders.archive))
    wait_for(lambda: [e for e in proc.events("library_log") if e.get("logger") == "probe"])
    assert proc.stop() == 0
    wait_for(lambda: proc.events("daemon_stopped"), timeout=5)

    events = json_lines(proc)  # every line, stdout and stderr alike
    text = "\n".join(proc.lines)
    assert SECRET not in text
    assert "[redacted]" in text  # what carried the key was logged, scrubbed
    probed = {
        e["logger"]: e for e in events if e["event"] == "library_log" and e["message"].startswith("probe:")
    }
    assert {"httpx", "watchdog.observers.inotify", "httpcore"} <= set(probed)
    assert probed["watchdog.observers.inotify"]["message"] == "probe: watchdog line one\nline two"
    assert probed["httpx"]["level"] == "warning"
    assert "RuntimeError: probe: library failure, key [redacted]" in probed["httpcore"]["exception"]
    warning = [e for e in events if e["event"] == "python_warning"]
    assert warning and "a python warning about key [redacted]" in warning[0]["message"]
    crash = [e for e in events if e["event"] == "thread_crashed"]
    assert crash and crash[0]["thread"] == "probe-crash"
    assert "ValueError: probe thread failed, key [redacted]" in crash[0]["exception"]

    [error_json] = errors()
    error = error_json.read_text()
    assert json.loads(error)["error"]["status"] == 422
    assert SECRET not in error
    [done] = folders.files(folders.archive)
    assert_png(folders.outbox / done.replace(".jpg", ".png"), (64, 48))
    assert all(r.api_key_ok for r in api.records())
    for root in (folders.outbox, folders.archive, folders.quarantine, folders.state):
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


# --- kill -9 ----------------------------------------------------------------------------------


def test_kill_9_mid_batch_then_restart_finishes_everything_once(
    folders: Folders, api: FakeWithoutBG, spawn: Any
) -> None:
    api.latency = 1.0
    env = env_for(folders, api, max_in_flight=2)
    names = ["a.jpg", "b.jpg", "sub/c.jpg", "d.jpg"]
    data = {name: image_bytes(seed=10 + i) for i, name in enumerate(names)}
    proc = spawn(env)
    for name in names:
        drop(folders.inbox, name, data[name])
    wait_for(lambda: len(proc.events("upload_started")) >= 2)
    proc.kill9()
    assert proc.proc is not None and proc.proc.returncode == -signal.SIGKILL

    rows = queue_rows(folders)
    in_flight = {rel for rel, state in rows.items() if state == "inflight"}
    assert in_flight, f"nothing was in flight at the kill: {rows}"
    assert in_flight <= {e["file"] for e in proc.events("upload_started")}

    api.latency = 0.0
    restarted = time.time()
    again = spawn(env)
    assert again.events("daemon_started")[0]["requeued"] == len(in_flight)
    try:
        wait_for(lambda: all((folders.archive / n).exists() for n in names), timeout=20)
    except AssertionError:
        pytest.fail(explain(folders, api, proc, again))
    assert again.stop() == 0
    wait_for(lambda: again.events("daemon_stopped"), timeout=5)
    json_lines(again)

    # each job that was in flight at the kill was sent again after the restart
    from hashlib import sha256

    resent = {r.sha256 for r in api.records() if r.arrived >= restarted and r.status == 200}
    for rel in in_flight:
        assert sha256(data[rel]).hexdigest() in resent, rel
    # every input has exactly one output, and nothing else is left anywhere
    assert folders.files(folders.outbox) == sorted(n.replace(".jpg", ".png") for n in names)
    for name in names:
        assert_png(folders.outbox / name.replace(".jpg", ".png"), (64, 48))
        assert (folders.archive / name).read_bytes() == data[name]
    assert folders.files(folders.inbox) == []
    assert folders.files(folders.quarantine) == []
    assert staging_leftovers(folders) == []
    assert queue_rows(folders) == dict.fromkeys(names, "done")
    conn = sqlite3.connect(folders.state / "queue.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def test_a_sigkilled_daemon_leaves_no_inspection_workers_behind(
    folders: Folders, api: FakeWithoutBG, spawn: Any
) -> None:
    """A backlog is inspected in worker processes; when the daemon is SIGKILLed (outside
    systemd, nobody else cleans up) they must not live on."""
    for i in range(150):
        drop(folders.inbox, f"d{i % 10}/x{i}.png", image_bytes("PNG", (8, 8), seed=i))
    api.credit = 0  # queued, never sent
    proc = spawn(env_for(folders, api, debounce_seconds=0.1))
    assert proc.proc is not None
    wait_for(lambda: len(proc.events("job_queued")) == 150, timeout=60)
    workers = children_of(proc.proc.pid)
    assert len(workers) >= 2, "the backlog took the worker-process path"
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    wait_for(lambda: not [w for w in workers if _alive(w)], timeout=10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

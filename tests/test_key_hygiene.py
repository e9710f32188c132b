"""The API key never leaves the process: not in an error text, a log line of any format,
``dropcut status``, nor a core dump.

A key file with a second line (a comment, an old key) used to make every request fail
with h11's "Illegal header value b'<key>\\n…'", which then reached the logs, the
quarantine JSON, the queue and ``dropcut status``. Now such a key is refused where it is
read (``dropcut check`` and ``dropcut run`` exit 2, a reload keeps the old key), every
log format redacts the key as its last step, ``status`` scrubs what the queue holds, and
``dropcut run`` makes itself undumpable.

Every key here carries :data:`MARK`: finding it in any output, in whatever escaping,
means a leak.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dropcut.cli import main
from dropcut.queue import JobQueue
from dropcut.settings import ApiKeyError, load_settings
from tests.fake_api import FakeWithoutBG
from tests.support import REPO, DaemonProcess, Folders, drop, image_bytes, wait_for

MARK = "7Q2x9Zp4Lm"
"""In every key of these tests and in nothing else."""

KEY = f"sk-hygiene-{MARK}"
ODD_KEY = f"sk-\"odd\\key'-{MARK}"
"""A valid key (visible ASCII) whose quote and backslash are escaped by JSON and repr()."""

NO_SERVER = "http://127.0.0.1:9"

CliRun = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DROPCUT_") or name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(name)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRun:
    """``dropcut ARGS…`` in-process: (exit code, stdout, stderr)."""

    def run(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def key_api() -> Iterator[FakeWithoutBG]:
    with FakeWithoutBG(api_key=KEY, rate_limit=50, rate_period=1.0) as server:
        yield server


def folder_env(folders: Folders, api_url: str = NO_SERVER) -> dict[str, str]:
    """The folders as DROPCUT_* variables, no key."""
    env = folders.env(api_url)
    del env["DROPCUT_API_KEY"]
    return env


def set_folder_env(monkeypatch: pytest.MonkeyPatch, folders: Folders, api_url: str = NO_SERVER) -> None:
    for name, value in folder_env(folders, api_url).items():
        if name.startswith("DROPCUT_"):
            monkeypatch.setenv(name, value)


def assert_no_key(*texts: str) -> None:
    for text in texts:
        assert MARK not in text, text


# --- refused where it is read -------------------------------------------------------------

BAD_KEYS = {
    # name: (key text as stored, words the message must contain)
    "second_line": (f"{KEY}\n# rotated 2026-01: old key sk-old-{MARK}\n", "more than one line"),
    "crlf_second_line": (f"{KEY}\r\nsk-old-{MARK}\r\n", "more than one line"),
    "space_inside": (f"{KEY} # production", "space or tab"),
    "tab_inside": (f"{KEY}\tsecond", "space or tab"),
    "escape_char": (f"sk-\x1b[1m{MARK}", "control character"),
    "del_char": (f"sk-\x7f{MARK}", "control character"),
    "non_ascii": (f"sk-clé-{MARK}", "not ASCII"),
    "nbsp_inside": (f"sk-\u00a0{MARK}", "not ASCII"),
}


def _from_key_file(tmp: Path, key: str, mp: pytest.MonkeyPatch) -> tuple[list[str], str]:
    path = tmp / "api-key"
    path.write_bytes(key.encode("utf-8"))
    mp.setenv("DROPCUT_API_KEY_FILE", str(path))
    return [], f"api_key_file {path}"


def _from_credential(tmp: Path, key: str, mp: pytest.MonkeyPatch) -> tuple[list[str], str]:
    creds = tmp / "creds"
    creds.mkdir()
    (creds / "dropcut-api-key").write_bytes(key.encode("utf-8"))
    mp.setenv("CREDENTIALS_DIRECTORY", str(creds))
    return [], f"systemd credential dropcut-api-key ({creds / 'dropcut-api-key'})"


def _from_env(tmp: Path, key: str, mp: pytest.MonkeyPatch) -> tuple[list[str], str]:
    mp.setenv("DROPCUT_API_KEY", key)
    return [], "DROPCUT_API_KEY"


def _from_toml(tmp: Path, key: str, mp: pytest.MonkeyPatch) -> tuple[list[str], str]:
    config = tmp / "dropcut.toml"
    # a TOML basic string: JSON's escapes are TOML's, but DEL must be escaped too
    value = json.dumps(key).replace("\x7f", "\\u007f")
    config.write_text(f"api_key = {value}\n", encoding="utf-8")
    return ["--config", str(config)], "api_key"


SOURCES = {
    "api_key_file": _from_key_file,
    "credential": _from_credential,
    "DROPCUT_API_KEY": _from_env,
    "toml_api_key": _from_toml,
}


@pytest.mark.parametrize("bad", list(BAD_KEYS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_a_key_that_cannot_be_a_header_value_is_refused_by_check_and_run(
    source: str, bad: str, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_folder_env(monkeypatch, folders)
    text, words = BAD_KEYS[bad]
    extra, where = SOURCES[source](folders.root, text, monkeypatch)

    code, out, err = cli("check", *extra)
    assert code == 2
    assert_no_key(out, err)
    problem = [line for line in err.splitlines() if "API key" in line]
    assert len(problem) == 1, err
    assert f"from {where} has" in problem[0] and words in problem[0]
    assert "configuration OK" not in err

    code, out, err = cli("run", *extra)
    assert code == 2
    assert out == ""
    assert_no_key(err)
    line = err.strip()
    assert "\n" not in line and line.startswith("dropcut: cannot start: ")
    assert f"from {where} has" in line and words in line
    assert not folders.state.exists()  # refused before touching anything


def test_the_refusal_names_no_part_of_the_key(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    """The message carries the source and the kind of problem only; the pieces a library
    would quote are kept apart (for scrubbing) and never rendered."""
    set_folder_env(monkeypatch, folders)
    _from_key_file(folders.root, f"{KEY}\n# note\n", monkeypatch)
    settings = load_settings()
    with pytest.raises(ApiKeyError) as caught:
        settings.resolve_api_key()
    exc = caught.value
    assert_no_key(str(exc), repr(exc), *map(str, exc.args))
    assert "sk-hygiene" not in str(exc)
    assert exc.fragments == (KEY, "#", "note")


KEY_FILE_FORMS = {
    "trailing_newline": f"{KEY}\n".encode(),
    "windows_line_end": f"{KEY}\r\n".encode(),
    "surrounding_blanks": f"  \t{KEY}  \n\n".encode(),
    "utf8_bom": b"\xef\xbb\xbf" + f"{KEY}\n".encode(),
    "every_visible_ascii": bytes(range(0x21, 0x7F)) + b"\n",
}


@pytest.mark.parametrize("form", list(KEY_FILE_FORMS))
def test_a_key_file_with_normal_surroundings_is_accepted(
    form: str, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    set_folder_env(monkeypatch, folders)
    raw = KEY_FILE_FORMS[form]
    (folders.root / "api-key").write_bytes(raw)
    monkeypatch.setenv("DROPCUT_API_KEY_FILE", str(folders.root / "api-key"))
    code, out, err = cli("check")
    assert code == 0, err
    assert "configuration OK" in err
    key = load_settings().resolve_api_key()
    assert key is not None
    expected = KEY if form != "every_visible_ascii" else bytes(range(0x21, 0x7F)).decode()
    assert key.get_secret_value() == expected
    assert_no_key(out, err)


def test_key_file_with_a_second_line_end_to_end(folders: Folders, tmp_path: Path) -> None:
    """The reported case, as an admin meets it: real processes, a real key file."""
    key_file = tmp_path / "api-key"
    key_file.write_text(f"{KEY}\n# old: sk-old-{MARK}\n", encoding="utf-8")
    env = folder_env(folders)
    env["DROPCUT_API_KEY_FILE"] = str(key_file)

    def dropcut(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dropcut.cli", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    check = dropcut("check")
    assert check.returncode == 2, check.stderr
    assert_no_key(check.stdout, check.stderr)
    assert f"api_key_file {key_file}" in check.stderr and "more than one line" in check.stderr

    run = dropcut("run")
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert_no_key(run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"api_key_file {key_file}" in run.stderr and "more than one line" in run.stderr
    assert not folders.state.exists()


@pytest.mark.slow
def test_a_reload_with_a_bad_key_is_refused_and_the_old_key_stays(
    folders: Folders, key_api: FakeWithoutBG, tmp_path: Path, spawn: Any
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(f"{KEY}\n", encoding="utf-8")
    env = folder_env(folders, key_api.url)
    env["DROPCUT_API_KEY_FILE"] = str(key_file)
    proc = spawn(env)

    key_file.write_text(f"{KEY}\nsk-new-{MARK}\n", encoding="utf-8")
    proc.signal(signal.SIGHUP)
    failed = proc.wait_event("reload_failed")
    assert f"api_key_file {key_file}" in failed["error"] and "more than one line" in failed["error"]
    assert not proc.events("config_reloaded")

    # still running, and still sending the old, valid key
    drop(folders.inbox, "a.jpg", image_bytes(seed=3))
    proc.wait_event("upload_succeeded")
    assert proc.stop() == 0
    assert_no_key(*proc.lines)


# --- dropcut status -------------------------------------------------------------------------


def _insert_job_row(db: Path, values: dict[str, Any]) -> None:
    """A row in ``jobs`` as an older version may have left it: the given columns, and
    zero / empty for every other NOT NULL column without a default (whatever the schema
    of this version holds)."""
    conn = sqlite3.connect(db)
    try:
        row = dict(values)
        for _, name, kind, notnull, default, pk in conn.execute("PRAGMA table_info(jobs)"):
            if name in row or pk or not notnull or default is not None:
                continue
            row[name] = "" if "TEXT" in str(kind).upper() else 0
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", list(row.values()))
        conn.commit()
    finally:
        conn.close()


def _store_leaked_details(folders: Folders, key: str) -> None:
    """What a dropcut before this fix stored after sending a key with a second line: h11's
    error text (the key as a bytes repr), in the last error and in the pause."""
    folders.state.mkdir(parents=True, exist_ok=True)
    db = folders.state / "queue.sqlite3"
    JobQueue.open(db).close()  # the schema of this version
    quoted = repr(key.encode())
    detail = f"LocalProtocolError: Illegal header value {quoted}"
    error = {"status": None, "code": "request_failed", "detail": detail, "source": "api", "raw": key}
    now = time.time()
    _insert_job_row(
        db,
        {
            "rel_path": "a.jpg",
            "sha256": "ab" * 32,
            "size": 10,
            "state": "quarantined",
            "first_seen": now,
            "updated_at": now,
            "error": json.dumps(error),
            "history": json.dumps([{"attempt": 1, "detail": detail}]),
        },
    )
    queue = JobQueue.open(db)
    try:
        queue.set_meta("paused", {"code": "unauthorized", "detail": f"401 for key {key}", "since": now})
        queue.set_meta("credit", {"credit": 12, "expiration_date": key, "checked_at": now})
    finally:
        queue.close()


STATUS_CASES = {
    # name: (the key dropcut status resolves, how it is configured, the key in the DB)
    "valid_key": (KEY, "env", KEY),
    "odd_valid_key": (ODD_KEY, "file", ODD_KEY),
    # today's refused key file: the DB holds what the old version sent
    "key_file_with_second_line": (f"{KEY}\n# comment\n", "file", f"{KEY}\n# comment"),
}


@pytest.mark.parametrize("case", list(STATUS_CASES))
def test_status_never_shows_the_key_even_if_the_queue_holds_it(
    case: str, folders: Folders, monkeypatch: pytest.MonkeyPatch, cli: CliRun
) -> None:
    configured, how, stored = STATUS_CASES[case]
    set_folder_env(monkeypatch, folders)
    if how == "env":
        monkeypatch.setenv("DROPCUT_API_KEY", configured)
    else:
        (folders.root / "api-key").write_text(configured, encoding="utf-8")
        monkeypatch.setenv("DROPCUT_API_KEY_FILE", str(folders.root / "api-key"))
    _store_leaked_details(folders, stored)

    code, out, err = cli("status")
    assert code == 0, err
    assert_no_key(out, err)
    assert "PAUSED since" in out and "unauthorized" in out
    assert "last error: a.jpg:" in out and "[redacted]" in out

    code, out, err = cli("status", "--json")
    assert code == 0, err
    assert_no_key(out, err)
    report = json.loads(out)
    assert report["last_error"]["file"] == "a.jpg"
    assert "[redacted]" in report["last_error"]["error"]["detail"]
    assert report["last_error"]["error"]["raw"].startswith("[redacted]")
    assert report["paused"]["detail"].startswith("401 for key [redacted]")
    assert report["credit"]["credit"] == 12


# --- logs: every format, every way text gets out ------------------------------------------

LOG_SCRIPT = r"""
import logging, sys, threading, warnings
import structlog
from dropcut.logs import configure

log_format, key = sys.argv[1], sys.argv[2]
redactor = configure(log_format, "info")
redactor.set_secrets(key)
log = structlog.get_logger()

log.info("plain_value", detail="key " + key, nested={"k": [key], key: "as a dict key"})
log.info("repr_value", detail="Illegal header value " + repr(key.encode()))
try:
    raise ValueError("Illegal header value " + repr(key.encode()))
except ValueError:
    log.exception("caught_exception")
try:
    raise RuntimeError("library saw " + key)
except RuntimeError:
    logging.getLogger("httpx").error("request with %s failed", key, exc_info=True)
warnings.warn("deprecated key " + key, UserWarning, stacklevel=1)


class Finalized:
    def __del__(self):
        raise OSError("finalizer saw " + key)


Finalized()  # an exception nobody can catch: sys.unraisablehook


def crash():
    raise KeyError("thread saw " + key)


thread = threading.Thread(target=crash, name="crasher")
thread.start()
thread.join()
raise LookupError("uncaught " + repr(key))
"""

EXPECTED_EVENTS = (
    "plain_value",
    "repr_value",
    "caught_exception",
    "library_log",
    "python_warning",
    "unraisable_exception",
    "thread_crashed",
    "daemon_crashed",
)


def run_log_script(
    log_format: str, key: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOG_SCRIPT, log_format, key],
        cwd=REPO,
        env=env if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("key", [KEY, ODD_KEY], ids=["plain_key", "key_with_quote_and_backslash"])
@pytest.mark.parametrize("log_format", ["json", "console"])
def test_every_log_format_redacts_exceptions_warnings_library_logs_and_crashes(
    log_format: str, key: str
) -> None:
    proc = run_log_script(log_format, key)
    assert proc.returncode == 1, proc.stderr  # the uncaught exception
    assert proc.stdout == ""
    assert_no_key(proc.stderr)
    for event in EXPECTED_EVENTS:
        assert event in proc.stderr, (event, proc.stderr)
    # tracebacks are printed (redacted), not dropped
    assert proc.stderr.count("Traceback (most recent call last)") >= 5, proc.stderr
    for what in ("Illegal header value", "library saw", "deprecated key", "finalizer saw", "thread saw"):
        assert what in proc.stderr, what
    assert proc.stderr.count("[redacted]") >= len(EXPECTED_EVENTS)
    if log_format == "json":
        lines = proc.stderr.splitlines()
        events = [json.loads(line) for line in lines]  # every line is one JSON object
        assert [e["event"] for e in events] == list(EXPECTED_EVENTS)


# --- core dumps -----------------------------------------------------------------------------

DUMPABLE_PROBE = r"""
import ctypes, json, signal, sys

def report(signum, frame):
    dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    print(json.dumps({"event": "dumpable_probe", "dumpable": dumpable}), flush=True)

signal.signal(signal.SIGUSR1, report)
from dropcut.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


class ProbedDaemon(DaemonProcess):
    """``dropcut run`` whose process answers SIGUSR1 with its own PR_GET_DUMPABLE."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", DUMPABLE_PROBE]


def _limits(pid: int) -> dict[str, list[str]]:
    """/proc/<pid>/limits by name ({} if the process has gone)."""
    limits: dict[str, list[str]] = {}
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return limits
    for line in text.splitlines()[1:]:
        name = line[:26].strip()
        limits[name] = line[26:].split()
    return limits


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_dropcut_run_cannot_dump_core(folders: Folders, key_api: FakeWithoutBG, spawn: Any) -> None:
    env = folders.env(key_api.url)
    env["DROPCUT_API_KEY"] = KEY
    proc = spawn(env, ProbedDaemon)
    assert proc.proc is not None
    pid = proc.proc.pid

    assert _limits(pid)["Max core file size"][:2] == ["0", "0"]
    proc.signal(signal.SIGUSR1)
    assert proc.wait_event("dumpable_probe")["dumpable"] == 0
    if os.geteuid() != 0:  # a non-dumpable process's /proc files belong to root
        with pytest.raises(PermissionError):
            Path(f"/proc/{pid}/environ").read_bytes()
    assert not proc.events("core_dumps_not_disabled")

    assert proc.stop() == 0
    assert_no_key(*proc.lines)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_inspection_workers_cannot_dump_core_either(
    folders: Folders, key_api: FakeWithoutBG, spawn: Any
) -> None:
    """A backlog starts worker processes (forkserver: an exec, which makes a process
    dumpable again); they inherit RLIMIT_CORE 0."""
    for i in range(70):  # more than admit.POOL_MIN_BATCH: the start-up scan is a backlog
        drop(folders.inbox, f"b/{i:03}.png", image_bytes("PNG", size=(8, 8), seed=i))
    env = folders.env(key_api.url)
    env["DROPCUT_API_KEY"] = KEY
    proc = spawn(env)
    assert proc.proc is not None
    pid = proc.proc.pid
    # the forkserver and the pool's workers below it
    workers = wait_for(lambda: [d for d in _descendants(pid) if _limits(d)][2:] and _descendants(pid))
    for worker in workers:
        assert _limits(worker)["Max core file size"][:2] == ["0", "0"], worker
    assert proc.stop() == 0


def _descendants(pid: int) -> list[int]:
    """Live processes below ``pid`` (children, grandchildren…), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found

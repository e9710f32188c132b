"""log_format = "console": one line per event that fits the width, and the status line —
drawn at the bottom of a real pseudo-terminal, plain lines (no escape codes) in a pipe."""

from __future__ import annotations

import fcntl
import io
import itertools
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
import structlog
from rich.cells import cell_len

from dropcut import logs
from dropcut.console import (
    FIELDS,
    MAX_WIDTH,
    ConsoleOutput,
    ConsoleRenderer,
    StatusLine,
    format_event,
    format_line,
    human_bytes,
    shorten_path,
)
from tests.support import REPO, LogCapture, wait_for

SHA = "3f2a9c01b7de" + "0123456789abcdef" * 3 + "0bad"
assert len(SHA) == 64
TS = "2025-03-04T09:15:02.123456Z"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LINE_START = re.compile(r"^(\d\d:\d\d:\d\d|--:--:--) (DEBUG|INFO |WARN |ERROR|CRIT ) \S")
LONG_DIR = "clients/" + "/".join(f"folder-{i:02}-with-a-long-name" for i in range(8))  # 250+ chars
UNICODE_DIR = "写真/東京/夏休み/家族写真アルバム/ß-ü-é-ñ"
LONG_TEXT = (
    "upstream connect error or disconnect/reset before headers. reset reason: connection termination " * 2
)
SUMMARY = "queued 12 · in flight 1 · done 340 · quarantined 2 · rate 7/60 s · ETA 1 m 43 s"
KEY = "sk-live-0123456789abcdefSECRET"


def ev(event: str, level: str = "info", **fields: Any) -> dict[str, Any]:
    return {"event": event, "level": level, "timestamp": TS, "logger": "dropcut", **fields}


@dataclass
class Case:
    id: str
    event: dict[str, Any]
    has: list[str] = field(default_factory=list)
    lacks: list[str] = field(default_factory=list)
    width: int = MAX_WIDTH


CASES = [
    Case(
        "upload_started",
        ev("upload_started", file="shoes/IMG_0001.jpg", sha256=SHA, size=8123456, attempt=1, bytes=212345),
        ["09:15:02 INFO  upload_started   shoes/IMG_0001.jpg  attempt=1 bytes=207KiB", "sha256=3f2a9c01b7de"],
        [SHA[:13], "logger="],
    ),
    Case(
        "upload_succeeded",
        ev("upload_succeeded", file="a.jpg", attempt=2, status=200, duration_ms=1834, bytes=190233),
        ["upload_succeeded a.jpg  duration_ms=1834 bytes=186KiB attempt=2", "status=200"],
    ),
    Case(
        "retry_scheduled: a 200-character detail is cut, the three fields stay",
        ev(
            "retry_scheduled",
            "warning",
            file="shoes/IMG_0002.jpg",
            attempt=3,
            status=503,
            code="server_error",
            detail=LONG_TEXT,
            delay_s=7.31,
            duration_ms=120,
        ),
        ["WARN  retry_scheduled  shoes/IMG_0002.jpg  code=server_error delay_s=7.31 attempt=3", "status=503"],
        [LONG_TEXT[:60]],
    ),
    Case(
        "job_queued: sha256 shortened to 12",
        ev("job_queued", file="a/b.png", sha256=SHA, size=1536, again=False),
        ["job_queued       a/b.png  sha256=3f2a9c01b7de size=1.5KiB again=false"],
        [SHA[:13]],
    ),
    Case(
        "a sha256 inside any value is shortened too",
        ev("disk_full", "error", file="x.jpg", path=f"/var/lib/dropcut/spool/{SHA}.proxy-1", detail=SHA),
        ["path=/var/lib/dropcut/spool/3f2a9c01b7de.proxy-1", "detail=3f2a9c01b7de"],
        [SHA[:13]],
    ),
    Case(
        "file_rejected",
        ev("file_rejected", "warning", file="raw/DSC_0042.NEF", reason="camera_raw"),
        ["09:15:02 WARN  file_rejected    raw/DSC_0042.NEF  reason=camera_raw"],
    ),
    Case(
        "queue_paused: None values left out",
        ev(
            "queue_paused", "error", code="unauthorized", status=401, detail="401: invalid key", location=None
        ),
        ['ERROR queue_paused     code=unauthorized detail="401: invalid key" status=401'],
        ["location", "None"],
    ),
    Case(
        "output_written",
        ev("output_written", file="web/shoe.jpg", sha256=SHA, size=10, output="web/shoe.png", cached=True),
        ["output_written   web/shoe.jpg  output=web/shoe.png cached=true"],
    ),
    Case(
        "a 250-character path keeps its file name",
        ev("upload_started", file=f"{LONG_DIR}/IMG_20240312_101532_HDR.jpg", attempt=1, bytes=1),
        ["clients/folder-00", "…/IMG_20240312_101532_HDR.jpg  attempt=1 bytes=1B"],
    ),
    Case(
        "a 150-character file name is cut in its middle, keeping the extension",
        ev("file_rejected", "warning", file="x" * 150 + ".jpeg", reason="too_many_pixels"),
        ["xxxx…xxxx", "xxxx.jpeg  reason=too_many_pixels"],
    ),
    Case(
        "wide characters count two columns",
        ev("output_written", file=f"{UNICODE_DIR}/{'写真' * 30}_0001.jpg", output=f"{UNICODE_DIR}/写真.png"),
        ["写真_0001.jpg", "output="],
    ),
    Case(
        "emoji and combining characters",
        ev("job_queued", file="📷/cafe\u0301/👨‍👩‍👧-" + "é" * 120 + ".heic", sha256=SHA, size=1),
        [".heic", "sha256=3f2a9c01b7de"],
    ),
    Case(
        "control characters, escape codes and bidi overrides are escaped",
        ev("file_quarantined", "warning", file="a/\x1b[2J\x07evil\u202egpj.exe", detail="two\nlines\r"),
        ["a/\\x1b[2J\\x07evil\\u202egpj.exe", "detail=two\\nlines\\r"],
        ["\x1b", "\x07", "\u202e", "\n", "\r"],
    ),
    Case(
        "a name that is not UTF-8 (lone surrogates) is escaped",
        ev("file_rejected", "warning", file="caf\udce9.jpg", reason="name_not_utf8"),
        ["caf\\udce9.jpg  reason=name_not_utf8"],
        ["\udce9"],
    ),
    Case(
        "missing everything",
        {},
        ["--:--:-- -     -"],
    ),
    Case(
        "missing timestamp and level, unknown event",
        {"event": "something_new", "a": 1},
        ["--:--:-- -     something_new    a=1"],
    ),
    Case(
        "a timestamp that is not one",
        {"event": "x", "level": "info", "timestamp": "yesterday"},
        ["--:--:-- INFO  x"],
    ),
    Case(
        "epoch seconds",
        {"event": "x", "level": "info", "timestamp": 0},
        ["00:00:00 INFO  x"],
    ),
    Case(
        "an unknown event: other fields while they fit, then …",
        ev("bench_tick", **{f"field_{i:02}": "v" * 30 for i in range(10)}),
        ["bench_tick       field_00=" + "v" * 30, " …"],
        ["field_09"],
    ),
    Case(
        "values: bool, float, list, dict, bytes, objects",
        ev("config_reloaded", changed=["rate_limit_requests", "on_success"], big=True, f=0.25, d={"k": 1}),
        ['changed=["rate_limit_requests","on_success"] big=true f=0.25 d={"k":1}'],
    ),
    Case(
        "a 300-character library message",
        ev("library_log", "warning", logger="httpx", message="m" * 300),
        ["WARN  library_log      logger=httpx message=mmmm", "m…"],
    ),
    Case(
        "a library's logger is shown, ours is not",
        ev("watch_started", mode="native"),
        ["watch_started    mode=native"],
        ["logger"],
    ),
    Case(
        "the status event shows the summary alone",
        ev("status", summary=SUMMARY),
        ["INFO  status           " + SUMMARY],
        ["summary="],
    ),
    Case(
        "levels have five columns",
        ev("daemon_crashed", "critical"),
        ["09:15:02 CRIT  daemon_crashed"],
    ),
    Case(
        "debug",
        ev("rescan_done", "debug", found=3),
        ["09:15:02 DEBUG rescan_done      found=3"],
    ),
    Case(
        "an event name of 100 characters",
        ev("e" * 100, file="a.jpg"),
        ["e" * 31 + "…", "a.jpg"],
    ),
    Case(
        "80 columns: the file name stays, fields that do not fit are left out",
        ev("upload_succeeded", file="shoes/IMG_0001.jpg", attempt=1, duration_ms=1834, bytes=190233),
        ["shoes/IMG_0001.jpg  duration_ms=1834"],
        width=80,
    ),
    Case(
        "80 columns, a long path",
        ev("job_queued", file=f"{LONG_DIR}/IMG_20240312_101532_HDR.jpg", sha256=SHA, size=1),
        ["…/IMG_20240312_101532_HDR.jpg"],
        width=80,
    ),
    Case(
        "40 columns",
        ev("retry_scheduled", file=f"{LONG_DIR}/a.jpg", code="x", detail=LONG_TEXT),
        [],
        width=40,
    ),
    Case(
        "20 columns: the head is cut",
        ev("retry_scheduled", file="a.jpg", code="timeout"),
        ["09:15:02"],
        width=20,
    ),
    Case("1 column", ev("retry_scheduled", file="a.jpg"), [], width=1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_console_line_width_and_content(case: Case) -> None:
    line = format_line(case.event, width=case.width, tz=UTC)
    assert cell_len(line) <= case.width, (cell_len(line), line)
    assert "\n" not in line and "\x1b" not in line
    for text in case.has:
        assert text in line, (text, line)
    for text in case.lacks:
        assert text not in line, (text, line)


def test_every_event_of_the_table_fits_with_huge_values_at_any_width() -> None:
    huge = "Ünïcødé 写真 " * 20 + SHA  # 300+ columns
    for name, keys in FIELDS.items():
        event = ev(name, "warning", file=f"{LONG_DIR}/{huge}.jpg", sha256=SHA, size=123456, extra=huge)
        event.update({k: huge for k in keys})
        for width in (200, 120, 100, 80, 60, 33, 10):
            for colors in (False, True):
                line = format_line(event, width=width, colors=colors, tz=UTC)
                plain = ANSI.sub("", line)
                assert cell_len(plain) <= width, (name, width, line)
                assert "\n" not in line and SHA[:13] not in line
                if colors and width >= 40:
                    assert line.startswith("09:15:02 \x1b[33mWARN\x1b[0m  \x1b[1m" + name[:31]), line


def test_the_event_column_lines_up() -> None:
    names = ["job_queued", "upload_started", "upload_succeeded", "output_written"]
    lines = [format_line(ev(n, file="a.jpg"), tz=UTC) for n in names]
    assert {line.index("a.jpg") for line in lines} == {32}


def test_local_time_and_colours() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert format_line(ev("x"), tz=plus_two).startswith("11:15:02 INFO  x")
    coloured = format_line(ev("queue_paused", "error", code="unauthorized"), colors=True, tz=UTC)
    assert coloured.startswith("09:15:02 \x1b[31mERROR\x1b[0m \x1b[1mqueue_paused\x1b[0m")
    assert ANSI.sub("", coloured) == format_line(ev("queue_paused", "error", code="unauthorized"), tz=UTC)


def test_shorten_path_and_human_bytes() -> None:
    assert shorten_path("a/b/c.jpg", 20) == "a/b/c.jpg"
    assert shorten_path("shop/2024/spring/IMG_0001.jpg", 24) == "shop/2024/…/IMG_0001.jpg"
    assert shorten_path("shop/2024/spring/IMG_0001.jpg", 14) == "…/IMG_0001.jpg"
    assert shorten_path("IMG_0001_with_a_long_name.jpg", 16) == "IMG_000…name.jpg"
    for width in range(1, 40):
        cut = shorten_path("shop/2024/spring/IMG_0001.jpg", width)
        assert cell_len(cut) <= width
        if width >= 14:
            assert cut.endswith("/IMG_0001.jpg")
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 8123456, 5 * 1024**3)] == [
        "0B",
        "1023B",
        "1.0KiB",
        "1.5KiB",
        "7.7MiB",
        "5.0GiB",
    ]


# --- exceptions ----------------------------------------------------------------------------


def _raise(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


EXCEPTION_CASES = [
    ("an exception", lambda: {"exc_info": _raise("boom")}, ["ValueError: boom"]),
    ("an exc_info tuple", lambda: {"exc_info": (ValueError, _raise("t"), _raise("t").__traceback__)}, ["t"]),
    ("a formatted exception", lambda: {"exception": "Traceback (most recent call last):\nX: y\n"}, ["X: y"]),
    ("a stack", lambda: {"stack": "Stack (most recent call last):\n  File x"}, ["Stack (most recent"]),
    ("control characters", lambda: {"exc_info": _raise("a\x1b[31mred\x1b[0m")}, ["a\\x1b[31mred\\x1b[0m"]),
    ("a 300-character message", lambda: {"exc_info": _raise("m" * 300)}, ["ValueError: " + "m" * 300]),
    ("no exception", lambda: {"exc_info": False}, []),
]


@pytest.mark.parametrize(
    "make, shown", [(c[1], c[2]) for c in EXCEPTION_CASES], ids=[c[0] for c in EXCEPTION_CASES]
)
def test_exceptions_follow_on_plain_lines(make: Any, shown: list[str]) -> None:
    text = format_event(ev("job_failed", "error", file="a.jpg", **make()), width=100, colors=True, tz=UTC)
    first, *rest = text.split("\n")
    assert cell_len(ANSI.sub("", first)) <= 100
    assert ANSI.sub("", first) == "09:15:02 ERROR job_failed       a.jpg"
    body = "\n".join(rest)
    assert "\x1b" not in body  # no colour, no escape code in a traceback
    for text_shown in shown:
        assert text_shown in body
    assert bool(rest) == bool(shown)
    if "exc_info" in make() and make()["exc_info"]:
        assert rest[0] == "Traceback (most recent call last):"


def test_exc_info_true_is_the_exception_being_handled() -> None:
    try:
        raise KeyError("handled")
    except KeyError:
        text = format_event(ev("job_failed", "error", exc_info=True))
    assert "KeyError: 'handled'" in text


# --- the output and the status line, in-process (a stream that is not a terminal) ----------


def _chain(output: ConsoleOutput) -> Any:
    """A structlog logger writing the console format into ``output`` (not the global
    configuration)."""
    return structlog.wrap_logger(
        output,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            ConsoleRenderer(output),
        ],
    )


class Counting:
    """A summary: its text, and how often it was asked for (thread-safe)."""

    def __init__(self, text: str = "queued 3 · done 0") -> None:
        self.text = text
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.calls += 1
            return self.text


def test_not_a_terminal_plain_status_lines_only_when_changed() -> None:
    stream = LogCapture()
    output = ConsoleOutput(stream)
    assert not output.is_terminal and not output.colors and output.width() == MAX_WIDTH
    summary = Counting()
    status = StatusLine(summary, output, plain_every_seconds=0.01, log=_chain(output))
    assert not status.drawn
    status.start()
    wait_for(lambda: summary.calls >= 5, timeout=10)  # unchanged: nothing printed again
    summary.text = "queued 2 · done 1"
    wait_for(lambda: "queued 2" in stream.text(), timeout=10)
    calls = summary.calls
    wait_for(lambda: summary.calls >= calls + 5, timeout=10)
    with pytest.raises(RuntimeError):
        status.start()
    status.stop(final="queued 0 · done 3")
    status.stop()  # twice: nothing more
    text = stream.text()
    assert "\x1b" not in text
    statuses = [line.split("status", 1)[1].strip() for line in text.splitlines()]
    assert statuses == ["queued 3 · done 0", "queued 2 · done 1", "queued 0 · done 3"]
    assert all(LINE_START.match(line) for line in text.splitlines())
    with pytest.raises(RuntimeError):
        output.show_status("x")  # no cursor control when it is not a terminal


def test_a_failing_summary_keeps_the_last_text_and_is_reported_once() -> None:
    stream = LogCapture()
    output = ConsoleOutput(stream)
    state = {"fail": False, "calls": 0}

    def summary() -> str:
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("SQLite objects created in a thread can only be used in that same thread")
        return "queued 1"

    status = StatusLine(summary, output, plain_every_seconds=0.01, log=_chain(output))
    status.start()
    state["fail"] = True
    wait_for(lambda: state["calls"] >= 10, timeout=10)
    status.stop()
    text = stream.text()
    assert text.count("status_failed") == 1
    assert "RuntimeError: SQLite objects" in text and "Traceback" in text
    assert text.splitlines()[-1].endswith("status           queued 1 (status unavailable: RuntimeError)")


def test_log_lines_from_many_threads_are_never_torn() -> None:
    stream = LogCapture()
    output = ConsoleOutput(stream)
    log = _chain(output)
    summary = Counting()
    status = StatusLine(summary, output, plain_every_seconds=0.001, log=log)
    status.start()

    def work(n: int) -> None:
        for i in range(200):
            summary.text = f"queued {n}-{i}"
            log.info("upload_started", file=f"t{n}/IMG_{i:04}.jpg", attempt=1, bytes=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    status.stop()
    lines = stream.text().splitlines()
    assert all(LINE_START.match(line) for line in lines)
    uploads = [line for line in lines if "upload_started" in line]
    assert len(uploads) == 8 * 200
    assert all(re.search(r"upload_started   t\d/IMG_\d{4}\.jpg  attempt=1 bytes=\d+B$", u) for u in uploads)


# --- the real set-up: logs.setup ---------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Puts back what logs.setup changes globally."""
    config = structlog.get_config()
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning = hooks
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_output_is_unchanged_and_has_no_status_line(restore_logging: None) -> None:
    stream = LogCapture()
    setup = logs.setup("json", "info", stream=stream)
    assert setup.console is None  # the daemon makes no StatusLine
    setup.redactor.set_secrets(KEY)
    structlog.get_logger().info("upload_started", file="a/" + "x" * 200 + ".jpg", sha256=SHA, bytes=5, k=KEY)
    (event,) = stream.events()
    assert list(event) == ["file", "sha256", "bytes", "k", "event", "level", "logger", "timestamp"]
    assert (
        event["sha256"] == SHA and event["file"] == "a/" + "x" * 200 + ".jpg" and event["k"] == "[redacted]"
    )
    assert logs.configure("json", stream=stream) is not None  # (the old entry point: the redactor)


def test_console_setup_writes_short_redacted_lines(restore_logging: None) -> None:
    stream = LogCapture()
    setup = logs.setup("console", "info", stream=stream)
    assert setup.console is not None and not setup.console.is_terminal
    setup.redactor.set_secrets(KEY)
    log = structlog.get_logger()
    log.info("upload_started", file="a.jpg", attempt=1, bytes=5, detail=f"key {KEY}")
    try:
        raise ValueError(f"header {KEY!r}")
    except ValueError:
        log.exception("job_failed", file="a.jpg")
    text = stream.text()
    assert KEY not in text and "[redacted]" in text
    lines = text.splitlines()
    assert lines[0].endswith('upload_started   a.jpg  attempt=1 bytes=5B detail="key [redacted]"')
    assert "ERROR job_failed       a.jpg" in lines[1] and lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: header '[redacted]'"


# --- subprocesses: a pipe, a pseudo-terminal -------------------------------------------------------

STATUS_SCRIPT = r"""
import sys, threading, time
import structlog
from dropcut.logs import setup
from dropcut.console import StatusLine

KEY = sys.argv[1]
logging_ = setup("console", "info")
logging_.redactor.set_secrets(KEY)
output = logging_.console
assert output is not None
calls = []


def summary():
    calls.append(1)
    n = len(calls)
    return f"queued {100 - n} · in flight 1 · done {n} · rate 7/60 s · ETA {100 - n} s"


def wait(n):
    deadline = time.monotonic() + 20
    while len(calls) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"summary asked {len(calls)} times, not {n}")
        time.sleep(0.005)


status = StatusLine(summary, output, refresh_seconds=0.05, plain_every_seconds=0.05)
print("drawn" if status.drawn else "plain", file=sys.stdout, flush=True)
status.start()
log = structlog.get_logger()
wait(3)
log.info("upload_started", file="shoes/IMG_0001.jpg", attempt=1, bytes=212345, detail="key " + KEY)


def worker(n):
    for i in range(25):
        log.info("output_written", file=f"t{n}/IMG_{i:04}.jpg", output=f"t{n}/IMG_{i:04}.png", cached=False)


threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wait(6)
try:
    raise ValueError("bad key " + KEY + " " + "m" * 150)  # longer than the terminal
except ValueError:
    log.exception("job_failed", file="shoes/IMG_0002.jpg")
wait(9)
status.stop(final="queued 0 · done 9 · final")
"""


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["TERM"] = "xterm-256color"
    return env


def test_under_a_pipe_the_status_is_plain_lines_without_escape_codes() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", STATUS_SCRIPT, KEY],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "plain\n"
    err = proc.stderr
    assert "\x1b" not in err and "\r" not in err
    assert KEY not in err and err.count("[redacted]") >= 2
    lines = err.splitlines()
    heads = [line for line in lines if LINE_START.match(line)]
    assert all(cell_len(line) <= MAX_WIDTH for line in heads)
    statuses = [line for line in heads if " status " in line]
    assert len(statuses) >= 3
    texts = [s.split(" status ", 1)[1].strip() for s in statuses]
    assert all(a != b for a, b in itertools.pairwise(texts))  # only when it changed
    assert texts[0].startswith("queued 99 · in flight 1 · done 1")
    assert lines[-1].endswith("status           queued 0 · done 9 · final")
    assert len([line for line in heads if "output_written" in line]) == 100
    assert "Traceback (most recent call last):" in lines
    assert "ValueError: bad key [redacted] " + "m" * 150 in lines


class Screen:
    """Just enough of a terminal to replay what the status line and the log lines wrote:
    text, CR, LF, erase line (CSI 2K), cursor up (CSI nA); SGR and cursor visibility
    ignored. Any other escape sequence fails the test."""

    def __init__(self) -> None:
        self.rows: list[str] = [""]
        self.row = 0
        self.col = 0

    def feed(self, text: str) -> None:
        for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", text):
            if token == "\r":
                self.col = 0
            elif token == "\n":
                self.row += 1
                if self.row == len(self.rows):
                    self.rows.append("")
            elif token.startswith("\x1b["):
                self._control(token)
            else:
                line = self.rows[self.row].ljust(self.col)
                self.rows[self.row] = line[: self.col] + token + line[self.col + len(token) :]
                self.col += len(token)

    def _control(self, code: str) -> None:
        arg, final = code[2:-1], code[-1]
        if final == "m" or code in ("\x1b[?25l", "\x1b[?25h"):
            return
        if final == "K" and arg == "2":
            self.rows[self.row] = ""
        elif final == "A":
            self.row = max(0, self.row - int(arg or 1))
        else:
            raise AssertionError(f"unexpected escape sequence {code!r}")

    def lines(self) -> list[str]:
        rows = list(self.rows)
        while rows and not rows[-1]:
            rows.pop()
        return rows


def _run_in_pty(columns: int, rows: int = 30) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", STATUS_SCRIPT, KEY],
        cwd=REPO,
        env=_clean_env(),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    data = bytearray()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not chunk:
                break
            data += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, data.decode("utf-8")


def test_under_a_terminal_the_status_line_is_drawn_below_the_log_lines() -> None:
    code, out = _run_in_pty(columns=100)
    assert code == 0, out
    assert out.startswith("drawn\r\n")  # (the terminal writes "\n" as "\r\n")
    out = out[len("drawn\r\n") :]
    assert KEY not in out and "[redacted]" in out
    # drawn: cursor hidden, the line erased and redrawn, the cursor shown again at the end
    assert out.startswith("\x1b[?25l") and "\x1b[2K" in out and "\x1b[1A" in out
    assert out.rindex("\x1b[?25h") > out.rindex("queued 9")
    assert "\x1b[32mINFO\x1b[0m" in out or "\x1b[32mINFO" in out  # colour on a terminal

    # just before stop(): the status line is the last row, every log line above it
    before_stop = Screen()
    before_stop.feed(out[: out.rindex("\x1b[?25h")])
    shown = before_stop.lines()
    assert re.fullmatch(r"queued \d+ · in flight 1 · done \d+ · rate 7/60 s · ETA \d+ s", shown[-1].rstrip())
    assert not any("queued" in line for line in shown[:-1])  # never left behind in the log
    assert shown[0].startswith(tuple(f"{h:02}:" for h in range(24))) and "upload_started" in shown[0]

    # at the end: the status line erased, the last summary printed as a plain line
    end = Screen()
    end.feed(out)
    final = end.lines()
    assert final[-1].endswith("status           queued 0 · done 9 · final")
    assert not any(line.startswith("queued") for line in final)
    logged = [line for line in final if LINE_START.match(line)]
    assert all(cell_len(line) <= 100 for line in logged)
    assert len([line for line in logged if "output_written" in line]) == 100
    assert "ValueError: bad key [redacted] " + "m" * 150 in final  # printed whole, not cut
    order = [line.split()[2] for line in logged]
    assert order[0] == "upload_started" and order[-2:] == ["job_failed", "status"]


def test_under_a_narrow_terminal_lines_fit_it() -> None:
    code, out = _run_in_pty(columns=72)
    assert code == 0, out
    screen = Screen()
    screen.feed(out[len("drawn\r\n") :])
    logged = [line for line in screen.lines() if LINE_START.match(line)]
    assert len(logged) > 100
    assert all(cell_len(line) <= 72 for line in logged), [line for line in logged if cell_len(line) > 72]


def test_a_dumb_terminal_gets_plain_lines() -> None:
    output = ConsoleOutput(io.StringIO(), environ={"TERM": "dumb"})
    assert not output.is_terminal
    tty = _FakeTTY()
    assert ConsoleOutput(tty, environ={"TERM": "xterm"}).colors
    assert not ConsoleOutput(tty, environ={"TERM": "xterm", "NO_COLOR": "1"}).colors
    assert not ConsoleOutput(tty, environ={"TERM": "dumb"}).is_terminal


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True

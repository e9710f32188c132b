"""dropcut.systemd and systemd/: sd_notify against a real socket, journald fields and the
native protocol, the unit (verify, security score) and its sandbox (W^X memory and the
system call filter emulated with the same kernel mechanisms systemd uses)."""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import dropcut.systemd as sd
from dropcut.systemd import (
    JournalRenderer,
    JournalUnavailableError,
    Notifier,
    field_name,
    journal_fields,
    priority_for,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dropcut.service"
VERIFY = ROOT / "systemd" / "verify.sh"
MAX_EXPOSURE = 2.0

try:
    import systemd.daemon as sd_daemon_mod
except ImportError:  # pragma: no cover
    sd_daemon_mod = None

needs_systemd_python = pytest.mark.skipif(sd_daemon_mod is None, reason="systemd-python is not installed")
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


# ---------------------------------------------------------------------------------------
# sd_notify: a real AF_UNIX datagram socket


class NotifyListener:
    """A bound AF_UNIX/SOCK_DGRAM socket as systemd's $NOTIFY_SOCKET; records the sender's
    pid (SCM_CREDENTIALS) of every datagram, as systemd does for NotifyAccess=main."""

    def __init__(self, address: str) -> None:
        self.address = address  # the NOTIFY_SOCKET value: /path or @abstract
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = 0.5) -> list[tuple[str, int]]:
        """All datagrams that arrive until none has for ``timeout`` seconds."""
        out: list[tuple[str, int]] = []
        self.sock.settimeout(timeout)
        creds_size = struct.calcsize("3i")
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                return out
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds_size])[0]
            out.append((data.decode(), pid))

    def messages(self, timeout: float = 0.5) -> list[str]:
        return [text for text, _pid in self.receive(timeout)]

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a shorter directory when sockaddr_un's 107 bytes would not fit it."""
    if len(str(tmp_path / "nobody-listens.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(str(sock_dir / "notify.sock"))
    yield lst
    lst.close()


@pytest.fixture
def abstract_listener() -> Iterator[NotifyListener]:
    lst = NotifyListener(f"@dropcut-test-{uuid.uuid4().hex}")
    yield lst
    lst.close()


def _exercise(notifier: Notifier) -> None:
    notifier.ready()
    notifier.status("queued 3 · in flight 1 · done 0 · quarantined 0")
    notifier.status("queued 3 · in flight 1 · done 0 · quarantined 0")  # unchanged: not sent
    notifier.status("queued 2 ·\nin flight 2")  # one line
    notifier.watchdog()
    notifier.reloading()
    notifier.ready()
    notifier.stopping()


def _check_sequence(received: list[tuple[str, int]], before_usec: int, after_usec: int) -> None:
    texts = [text for text, _ in received]
    assert texts[:4] == [
        "READY=1",
        "STATUS=queued 3 · in flight 1 · done 0 · quarantined 0",
        "STATUS=queued 2 · in flight 2",
        "WATCHDOG=1",
    ]
    reload_lines = texts[4].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    key, _, usec = reload_lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before_usec <= int(usec) <= after_usec  # CLOCK_MONOTONIC, in microseconds
    assert texts[5:] == ["READY=1", "STOPPING=1"]
    assert len(texts) == 7
    assert {pid for _, pid in received} == {os.getpid()}  # NotifyAccess=main sees our pid


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@needs_systemd_python
def test_notifier_sends_through_libsystemd(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    notifier = Notifier()
    assert notifier.enabled and notifier.backend == "libsystemd"
    before = _monotonic_usec()
    _exercise(notifier)
    _check_sequence(listener.receive(), before, _monotonic_usec())


def test_notifier_stdlib_fallback_without_systemd_python(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sd, "_sd_daemon", None)
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    notifier = Notifier()
    assert notifier.enabled and notifier.backend == "stdlib"
    before = _monotonic_usec()
    _exercise(notifier)
    _check_sequence(listener.receive(), before, _monotonic_usec())


def test_notifier_with_explicit_env_uses_that_socket(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sd_notify only reads the process environment: an env mapping naming another socket
    # must still reach that socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier({"NOTIFY_SOCKET": listener.address})
    assert notifier.backend == "stdlib"
    notifier.ready()
    assert listener.messages() == ["READY=1"]


@pytest.mark.parametrize("backend", ["libsystemd", "stdlib"])
def test_notifier_abstract_namespace_socket(
    abstract_listener: NotifyListener, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    if backend == "libsystemd" and sd_daemon_mod is None:
        pytest.skip("systemd-python is not installed")
    if backend == "stdlib":
        monkeypatch.setattr(sd, "_sd_daemon", None)
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.address)
    notifier = Notifier()
    assert notifier.backend == backend
    notifier.ready()
    notifier.status("paused: account out of credits")
    notifier.stopping()
    assert abstract_listener.messages() == [
        "READY=1",
        "STATUS=paused: account out of credits",
        "STOPPING=1",
    ]


def test_notifier_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and notifier.backend == "none"
    _exercise(notifier)  # nothing to send to, nothing raised
    notifier.extend_timeout(30)


@pytest.mark.parametrize("backend", ["libsystemd", "stdlib"])
def test_notifier_send_errors_are_logged_once_not_raised(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch, backend: str, reset_structlog: None
) -> None:
    if backend == "libsystemd" and sd_daemon_mod is None:
        pytest.skip("systemd-python is not installed")
    if backend == "stdlib":
        monkeypatch.setattr(sd, "_sd_daemon", None)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_dir / "nobody-listens.sock"))
    notifier = Notifier()
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.watchdog()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"


def test_notifier_extend_timeout(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    Notifier().extend_timeout(90)
    assert listener.messages() == ["EXTEND_TIMEOUT_USEC=90000000"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # WatchdogSec=30s
        ("30000000", "self", 15.0),
        ("30000000", "other", None),  # meant for another process
        ("1000000", None, 0.5),
        (None, None, None),
        (None, "self", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "not-a-pid", None),  # unparsable: off, as sd_watchdog_enabled() does
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier(env).watchdog_interval() == expected


def test_a_hung_loop_stops_sending_watchdog(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pattern the daemon uses: WATCHDOG=1 from the loop itself, every half interval.
    While the loop hangs, no ping arrives, so systemd's WatchdogSec= fires."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s -> ping every 0.1 s
    notifier = Notifier()
    interval = notifier.watchdog_interval()
    assert interval is not None and interval == pytest.approx(0.1)
    hang, stop = threading.Event(), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if hang.is_set():
                stop.wait()  # stuck: never pings again
                return
            notifier.watchdog()
            time.sleep(interval)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(0.55)
        alive = listener.messages(timeout=0.05)
        hang.set()
        time.sleep(0.15)
        listener.messages(timeout=0.05)  # drain a ping that was under way
        during_hang = listener.messages(timeout=0.6)
    finally:
        stop.set()
        thread.join()
    assert alive.count("WATCHDOG=1") >= 3
    assert during_hang == []


# ---------------------------------------------------------------------------------------
# journald: fields


def _journal_row(**event: Any) -> dict[str, str]:
    return journal_fields(event)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        ("debug", "7"),
        ("info", "6"),
        ("notice", "5"),
        ("warning", "4"),
        ("warn", "4"),
        ("error", "3"),
        ("exception", "3"),
        ("critical", "2"),
        ("fatal", "2"),
        ("WARNING", "4"),
        ("chatty", "6"),  # unknown: info
        (None, "6"),
    ],
)
def test_priority_from_level(level: str | None, priority: str) -> None:
    event: dict[str, Any] = {"event": "x"}
    if level is not None:
        event["level"] = level
    assert journal_fields(event)["PRIORITY"] == priority
    assert priority_for(level) == int(priority)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("event", "DROPCUT_EVENT"),
        ("file", "DROPCUT_FILE"),
        ("sha256", "DROPCUT_SHA256"),
        ("retry_at", "DROPCUT_RETRY_AT"),
        ("http-status", "DROPCUT_HTTP_STATUS"),
        ("größe", "DROPCUT_GR_SSE"),  # str.upper: ß -> SS; Ö is not [A-Z] -> _
        ("a.b c", "DROPCUT_A_B_C"),
        ("x" * 100, ("DROPCUT_" + "X" * 100)[:64]),
    ],
)
def test_field_names(key: str, name: str) -> None:
    assert field_name(key) == name
    assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name)


JOURNAL_ROWS: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    (
        "quarantine event",
        {
            "event": "file_quarantined",
            "level": "warning",
            "timestamp": "2024-05-01T10:00:00Z",
            "logger": "dropcut",
            "file": "shoot/IMG_0001.jpg",
            "sha256": "ab" * 32,
            "reason": "not_an_image",
        },
        {
            "MESSAGE": f"file_quarantined file=shoot/IMG_0001.jpg sha256={'ab' * 32} reason=not_an_image",
            "PRIORITY": "4",
            "SYSLOG_IDENTIFIER": "dropcut",
            "DROPCUT_EVENT": "file_quarantined",
            "DROPCUT_LOGGER": "dropcut",
            "DROPCUT_FILE": "shoot/IMG_0001.jpg",
            "DROPCUT_SHA256": "ab" * 32,
            "DROPCUT_REASON": "not_an_image",
        },
    ),
    (
        "unicode, spaces and newlines",
        {"event": "file_admitted", "level": "info", "file": "Café/été 2024\nb.jpg", "size": 1024},
        {
            "MESSAGE": 'file_admitted file="Café/été 2024\\nb.jpg" size=1024',
            "PRIORITY": "6",
            "SYSLOG_IDENTIFIER": "dropcut",
            "DROPCUT_EVENT": "file_admitted",
            "DROPCUT_FILE": "Café/été 2024\nb.jpg",
            "DROPCUT_SIZE": "1024",
        },
    ),
    (
        "nested dict, list, None, bool, float",
        {
            "event": "account_paused",
            "level": "error",
            "limits": {"per_minute": 7, "window": [60, "s"]},
            "files": ["a.jpg", "b c.png"],
            "retry_at": None,
            "paused": True,
            "wait": 1.5,
        },
        {
            "MESSAGE": 'account_paused limits={"per_minute":7,"window":[60,"s"]} '
            'files=["a.jpg","b c.png"] retry_at=None paused=True wait=1.5',
            "PRIORITY": "3",
            "SYSLOG_IDENTIFIER": "dropcut",
            "DROPCUT_EVENT": "account_paused",
            "DROPCUT_LIMITS": '{"per_minute":7,"window":[60,"s"]}',
            "DROPCUT_FILES": '["a.jpg","b c.png"]',
            "DROPCUT_RETRY_AT": "None",
            "DROPCUT_PAUSED": "True",
            "DROPCUT_WAIT": "1.5",
        },
    ),
    (
        "exception text",
        {
            "event": "daemon_crashed",
            "level": "critical",
            "exception": 'Traceback (most recent call last):\n  File "x.py", line 1\n'
            "ValueError: bad = value\n",
        },
        {
            "MESSAGE": 'daemon_crashed exception="ValueError: bad = value"',
            "PRIORITY": "2",
            "SYSLOG_IDENTIFIER": "dropcut",
            "DROPCUT_EVENT": "daemon_crashed",
            "DROPCUT_EXCEPTION": 'Traceback (most recent call last):\n  File "x.py", line 1\n'
            "ValueError: bad = value",
        },
    ),
    (
        "library record through the stdlib bridge, call site",
        {
            "event": "library_log",
            "level": "warning",
            "logger": "httpx",
            "message": "HTTP Request: POST https://example.invalid",
            "pathname": "/opt/dropcut/lib/x.py",
            "lineno": 12,
            "func_name": "send",
        },
        {
            "MESSAGE": 'library_log logger=httpx message="HTTP Request: POST https://example.invalid"',
            "PRIORITY": "4",
            "SYSLOG_IDENTIFIER": "dropcut",
            "DROPCUT_EVENT": "library_log",
            "DROPCUT_LOGGER": "httpx",
            "DROPCUT_MESSAGE": "HTTP Request: POST https://example.invalid",
            "CODE_FILE": "/opt/dropcut/lib/x.py",
            "CODE_LINE": "12",
            "CODE_FUNC": "send",
        },
    ),
]


@pytest.mark.parametrize(
    ("event", "expected"), [row[1:] for row in JOURNAL_ROWS], ids=[row[0] for row in JOURNAL_ROWS]
)
def test_journal_fields(event: dict[str, Any], expected: dict[str, str]) -> None:
    fields = journal_fields(event)
    assert fields == expected
    assert "\n" not in fields["MESSAGE"]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name) for name in fields)


def test_journal_fields_exc_info_tuple() -> None:
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        fields = journal_fields({"event": "boom", "exc_info": sys.exc_info()})
    assert fields["DROPCUT_EXCEPTION"].startswith("Traceback (most recent call last):")
    assert fields["DROPCUT_EXCEPTION"].endswith("RuntimeError: disk on fire")
    assert fields["MESSAGE"] == 'boom exception="RuntimeError: disk on fire"'


def test_journal_fields_is_pure() -> None:
    event = {"event": "x", "level": "info", "nested": {"a": 1}}
    copy = json.loads(json.dumps(event))
    journal_fields(event)
    assert event == copy


# ---------------------------------------------------------------------------------------
# journald: the structlog processor


@pytest.fixture
def reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()  # whatever an earlier test configured
    yield
    structlog.reset_defaults()


def _configure(renderer: JournalRenderer, out: io.StringIO) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def test_journal_renderer_sends_and_drops_the_event(reset_structlog: None) -> None:
    sent: list[dict[str, Any]] = []
    out = io.StringIO()
    _configure(JournalRenderer(send=lambda **kw: sent.append(kw)), out)
    log = structlog.get_logger()
    log.warning("file_quarantined", file="a/b.jpg", sha256="00ff")
    log.debug("file_seen", file="c.jpg")
    assert out.getvalue() == ""  # DropEvent: the wrapped logger never writes
    assert [s["DROPCUT_EVENT"] for s in sent] == ["file_quarantined", "file_seen"]
    first = sent[0]
    assert first["MESSAGE"] == "file_quarantined file=a/b.jpg sha256=00ff"
    assert first["PRIORITY"] == "4" and first["SYSLOG_IDENTIFIER"] == "dropcut"
    assert "DROPCUT_TIMESTAMP" not in first
    # the call site is this test, not the renderer or structlog
    assert first["CODE_FILE"] == __file__
    assert first["CODE_FUNC"] == "test_journal_renderer_sends_and_drops_the_event"
    assert isinstance(first["CODE_LINE"], int)


def test_journal_renderer_falls_back_to_stderr_when_journald_is_unreachable(
    reset_structlog: None,
) -> None:
    lines: list[str] = []

    def broken(**kw: Any) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    out = io.StringIO()
    _configure(JournalRenderer(send=broken, fallback=lines.append), out)
    structlog.get_logger().error("upload_failed", file="x.jpg")
    assert out.getvalue() == ""
    assert len(lines) == 1
    assert lines[0].startswith("upload_failed file=x.jpg (journal send failed:")


@needs_systemd_python
def test_journal_renderer_without_journald_says_so_and_writes_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reset_structlog: None
) -> None:
    # libsystemd would drop the entries silently
    monkeypatch.setattr(sd, "JOURNAL_SOCKET", str(tmp_path / "no-journald"))
    lines: list[str] = []
    out = io.StringIO()
    _configure(JournalRenderer(fallback=lines.append), out)
    structlog.get_logger().info("watch_started", inbox="/srv/dropcut/inbox")
    assert lines == [
        f"journald is not running ({tmp_path / 'no-journald'} missing): logging to stderr",
        "watch_started inbox=/srv/dropcut/inbox",
    ]
    assert out.getvalue() == ""


def test_journal_renderer_without_systemd_python_fails_at_configure_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sd, "_sd_journal", None)
    with pytest.raises(JournalUnavailableError, match="systemd-python"):
        JournalRenderer()


# ---------------------------------------------------------------------------------------
# journald: what systemd-python really sends (native protocol)

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def parse_native(data: bytes) -> list[tuple[str, bytes]]:
    """journald's native protocol: ``KEY=value\\n``, or for values that contain a newline
    ``KEY\\n<uint64 LE length><value>\\n``."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields.append((key.decode(), value))
            pos = end + 1
        else:
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 9
            fields.append((line.decode(), data[start : start + size]))
            assert data[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
    return fields


@pytest.fixture
def journal_socket() -> Iterator[socket.socket]:
    if os.geteuid() != 0:
        pytest.skip("binding /run/systemd/journal/socket needs root")
    if JOURNAL_SOCKET.exists():
        pytest.skip(f"{JOURNAL_SOCKET} exists (a real journald runs here): not hijacking it")
    created = [p for p in (JOURNAL_SOCKET.parent.parent, JOURNAL_SOCKET.parent) if not p.exists()]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for path in created:
            path.mkdir(mode=0o755)
        sock.bind(str(JOURNAL_SOCKET))
    except OSError as exc:
        sock.close()
        for path in reversed(created):
            path.rmdir()
        pytest.skip(f"cannot bind {JOURNAL_SOCKET}: {exc}")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
    try:
        yield sock
    finally:
        sock.close()
        JOURNAL_SOCKET.unlink(missing_ok=True)
        for path in reversed(created):
            path.rmdir()


def _receive_entry(sock: socket.socket) -> dict[str, bytes]:
    """One entry; large ones arrive as a sealed memfd passed with SCM_RIGHTS."""
    sock.settimeout(5)
    data, anc, _flags, _addr = sock.recvmsg(16 * 1024 * 1024, socket.CMSG_SPACE(4 * 8))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                try:
                    data = os.pread(fd, os.fstat(fd).st_size, 0)
                finally:
                    os.close(fd)
    entry = dict(parse_native(data))
    assert len(entry) == len(parse_native(data)), "duplicate fields"
    return entry


@needs_systemd_python
def test_journal_renderer_through_real_systemd_journal_send(
    journal_socket: socket.socket, reset_structlog: None
) -> None:
    out = io.StringIO()
    _configure(JournalRenderer(), out)  # the real systemd.journal.send
    log = structlog.get_logger()
    log.warning(
        "file_quarantined",
        file="Café/IMG 1.jpg",
        sha256="ab" * 32,
        reason="decode_failed",
        detail="line one\nline two",
        limits={"per_minute": 7},
    )
    entry = _receive_entry(journal_socket)
    assert entry["DROPCUT_EVENT"] == b"file_quarantined"
    assert entry["DROPCUT_FILE"] == "Café/IMG 1.jpg".encode()
    assert entry["DROPCUT_SHA256"] == b"ab" * 32
    assert entry["DROPCUT_DETAIL"] == b"line one\nline two"  # the binary-safe form
    assert entry["DROPCUT_LIMITS"] == b'{"per_minute":7}'
    assert entry["PRIORITY"] == b"4"
    assert entry["SYSLOG_IDENTIFIER"] == b"dropcut"
    assert entry["MESSAGE"].startswith(b'file_quarantined file="Caf\xc3\xa9/IMG 1.jpg" ')
    assert entry["CODE_FILE"] == __file__.encode()
    assert entry["CODE_FUNC"] == b"test_journal_renderer_through_real_systemd_journal_send"
    assert "DROPCUT_TIMESTAMP" not in entry
    assert out.getvalue() == ""

    try:
        raise ValueError("x" * 300_000)  # larger than a datagram: memfd path
    except ValueError:
        log.exception("daemon_crashed")
    entry = _receive_entry(journal_socket)
    assert entry["DROPCUT_EVENT"] == b"daemon_crashed"
    assert entry["PRIORITY"] == b"3"
    assert entry["DROPCUT_EXCEPTION"].startswith(b"Traceback (most recent call last):")
    assert entry["DROPCUT_EXCEPTION"].endswith(b"ValueError: " + b"x" * 300_000)


# ---------------------------------------------------------------------------------------
# the unit file


def read_unit(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax as far as we use it: sections, repeated keys, no continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "keep the unit free of line continuations"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_settings_from_the_issue() -> None:
    unit = read_unit()
    service, meta = unit["Service"], unit["Unit"]

    def one(key: str) -> str:
        assert len(service[key]) == 1, key
        return service[key][0]

    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30s"
    assert one("ExecStart") == "/opt/dropcut/bin/dropcut run --config /etc/dropcut/dropcut.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("LoadCredential") == "dropcut-api-key:/etc/dropcut/api-key"
    assert one("StateDirectory") == "dropcut"
    assert one("Restart") == "on-failure" and one("RestartPreventExitStatus") == "2"
    assert "StartLimitIntervalSec" in meta and "StartLimitBurst" in meta
    assert one("User") == "dropcut" and one("Group") == "dropcut"
    assert one("ProtectSystem") == "strict"
    assert one("ReadWritePaths").split() == [
        "/srv/dropcut/inbox",
        "/srv/dropcut/outbox",
        "/srv/dropcut/quarantine",
        "/srv/dropcut/archive",
    ]
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert service["SystemCallFilter"][0] == "@system-service"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectHome",
        "MemoryDenyWriteExecute",
    ):
        assert one(key) == "yes", key
    assert one("UMask") == "0027"
    # a core dump would hold the API key
    assert one("LimitCORE") == "0"
    # the API key never travels through the environment
    for assignment in service.get("Environment", []):
        assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", assignment.upper()), assignment
    assert "EnvironmentFile" not in service
    assert one("Environment") == "DROPCUT_LOG_FORMAT=journal"


def _exposure(text: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", text)
    assert match, text
    return float(match.group(1))


@needs_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    exposure = _exposure(result.stdout + result.stderr)
    assert exposure <= MAX_EXPOSURE, result.stdout
    # --threshold= is in tenths on systemd 252: exposure*10 > threshold fails
    over = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={round(exposure * 10) - 1}",
            str(UNIT),
        ],
        capture_output=True,
        check=False,
    )
    assert over.returncode != 0


@needs_analyze
def test_verify_script_passes() -> None:
    """systemd/verify.sh: systemd-analyze verify (unit and example drop-ins), sysusers.d,
    tmpfiles.d and the security score, as .ci/run runs it."""
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    result = subprocess.run(["bash", str(VERIFY)], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"exposure (\d+\.\d+) \(max", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


@needs_analyze
def test_verify_script_rejects_a_typo_and_a_weakened_unit(tmp_path: Path) -> None:
    copy = tmp_path / "systemd"
    shutil.copytree(UNIT.parent, copy)
    unit = copy / "dropcut.service"
    original = unit.read_text()

    unit.write_text(original.replace("ProtectSystem=strict", "ProtectSytem=strict"))
    typo = subprocess.run(["bash", str(copy / "verify.sh")], capture_output=True, text=True)
    assert typo.returncode != 0
    assert "ProtectSytem" in typo.stderr

    weakened = re.sub(
        r"^(ProtectHome|PrivateUsers|PrivateDevices|ProtectSystem|SystemCallFilter)=.*$",
        "",
        original,
        flags=re.M,
    )
    unit.write_text(weakened)
    weak = subprocess.run(["bash", str(copy / "verify.sh")], capture_output=True, text=True)
    assert weak.returncode != 0
    assert "is above 2.0" in weak.stderr


@needs_analyze
def test_verify_script_requires_no_core_dumps(tmp_path: Path) -> None:
    """verify.sh fails when the unit loses LimitCORE=0, or a drop-in example raises it
    (systemd-analyze security does not score core dumps)."""
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    copy = tmp_path / "systemd"
    shutil.copytree(UNIT.parent, copy)
    unit = copy / "dropcut.service"
    original = unit.read_text()

    unit.write_text(re.sub(r"^LimitCORE=0\n", "", original, flags=re.M))
    gone = subprocess.run(["bash", str(copy / "verify.sh")], capture_output=True, text=True, timeout=120)
    assert gone.returncode != 0
    assert "does not set LimitCORE=0" in gone.stderr

    unit.write_text(original)
    example = copy / "examples" / "nas.conf"
    example.write_text(example.read_text() + "LimitCORE=infinity\n")
    raised = subprocess.run(["bash", str(copy / "verify.sh")], capture_output=True, text=True, timeout=120)
    assert raised.returncode != 0
    assert "LimitCORE= to something other than 0: nas.conf" in raised.stderr


# ---------------------------------------------------------------------------------------
# the sandbox: MemoryDenyWriteExecute= and SystemCallFilter= emulated
#
# systemd 252 (Debian 12) implements MemoryDenyWriteExecute=yes as a seccomp filter: mmap
# with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect with PROT_EXEC and shmat with SHM_EXEC
# fail with EPERM. Newer systemd uses the kernel's prctl(PR_SET_MDWE) (Linux >= 6.3) where
# available. SystemCallFilter= is an allow-list seccomp filter (with @default added), the
# denied calls failing with SystemCallErrorNumber=. The probe below loads what the daemon
# loads and does what it does once under no restriction and once under each mechanism;
# everything must behave the same.

_SECCOMP_LAUNCHER = r"""
import ctypes, ctypes.util, errno, json, os, sys

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if spec.get("prctl_mdwe"):
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        err = ctypes.get_errno()
        sys.exit(77 if err == errno.EINVAL else 1)

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

ALLOW = 0x7FFF0000
MASKED_EQ = 7
def errno_action(n):
    return 0x00050000 | (n & 0xFFFF)

lib = None
if spec.get("seccomp_mdwe") or spec.get("allow") is not None:
    lib = ctypes.CDLL(spec["libseccomp"], use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

if spec.get("seccomp_mdwe"):  # MemoryDenyWriteExecute=yes as systemd 252 does it
    ctx = lib.seccomp_init(ALLOW)
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    for name, mask in ((b"mmap", PROT_WRITE | PROT_EXEC), (b"mprotect", PROT_EXEC),
                       (b"pkey_mprotect", PROT_EXEC), (b"shmat", SHM_EXEC)):
        nr = lib.seccomp_syscall_resolve_name(name)
        cmp = ArgCmp(2, MASKED_EQ, mask, mask)
        if lib.seccomp_rule_add_array(ctx, errno_action(errno.EPERM), nr, 1, ctypes.byref(cmp)):
            raise OSError("seccomp_rule_add " + name.decode())
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load (MemoryDenyWriteExecute)")

# SystemCallFilter= (allow-list) comes last, as in systemd: it may deny seccomp() itself
if spec.get("allow") is not None:
    ctx = lib.seccomp_init(errno_action(spec["errno"]))
    for name in spec["allow"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a syscall of this architecture
        lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None)
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load (SystemCallFilter)")

os.execv(spec["argv"][0], spec["argv"])
"""

_PROBE = r"""
import importlib, io, json, mmap, os, pkgutil, shutil, socket, sqlite3, ssl, sys, threading
import time, traceback

work = sys.argv[1]
results, details = {}, {}

def step(name):
    def run(fn):
        try:
            value = fn()
            results[name] = "ok" if value is None else value
        except BaseException as exc:
            results[name] = type(exc).__name__
            details[name] = "".join(traceback.format_exception_only(exc)).strip()
        return fn
    return run

@step("wx_mmap")
def _():
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
        return "allowed"
    except OSError:
        return "refused"

@step("sched_setaffinity")  # in @resources: tells whether the syscall filter is in force
def _():
    os.sched_setaffinity(0, os.sched_getaffinity(0))

import dropcut
for info in sorted(pkgutil.walk_packages(dropcut.__path__, "dropcut."), key=lambda m: m.name):
    step("import " + info.name)(lambda: importlib.import_module(info.name) and None)

for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP", "MPO"):
    @step("pillow " + fmt)
    def _():
        from PIL import Image, ImageOps
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG" if fmt == "MPO" else fmt)
        buf.seek(0)
        im = Image.open(buf)
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGBA").resize((32, 24))
        im.save(io.BytesIO(), "PNG")

@step("ssl context")
def _():
    import certifi
    ctx = ssl.create_default_context(cafile=certifi.where())
    assert ctx.cert_store_stats()["x509_ca"] > 0

@step("httpx local http")
def _():
    import http.server, httpx
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try:
        with httpx.Client(timeout=5) as client:
            r = client.get(f"http://127.0.0.1:{srv.server_address[1]}/")
            assert r.status_code == 200 and r.text == "ok"
    finally:
        srv.shutdown()

@step("getaddrinfo localhost")
def _():
    socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)

@step("sqlite wal")
def _():
    db = sqlite3.connect(os.path.join(work, "queue.db"))
    db.execute("pragma journal_mode=wal")
    db.execute("create table if not exists jobs(id integer primary key, rel text)")
    db.execute("insert into jobs(rel) values ('a.jpg')")
    db.commit()
    db.execute("pragma wal_checkpoint(truncate)")
    db.close()

@step("files")
def _():
    src = os.path.join(work, "in.jpg")
    with open(src, "wb") as f:
        f.write(b"x" * 100000); f.flush(); os.fsync(f.fileno())
    os.makedirs(os.path.join(work, "out", "sub"), exist_ok=True)
    shutil.copy2(src, os.path.join(work, "out", "sub", ".tmp.png"))
    os.replace(os.path.join(work, "out", "sub", ".tmp.png"), os.path.join(work, "out", "sub", "a.png"))
    fd = os.open(os.path.join(work, "out"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    os.fsync(fd); os.close(fd)
    shutil.move(src, os.path.join(work, "out", "moved.jpg"))
    assert sorted(e.name for e in os.scandir(os.path.join(work, "out"))) == ["moved.jpg", "sub"]

@step("watchdog inotify")
def _():
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    seen = threading.Event()
    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            seen.set()
    watched = os.path.join(work, "watched"); os.makedirs(watched, exist_ok=True)
    obs = Observer(); obs.schedule(Handler(), watched, recursive=True); obs.start()
    try:
        with open(os.path.join(watched, "x.jpg"), "w") as f:
            f.write("x")
        assert seen.wait(5), "no file system event"
    finally:
        obs.stop(); obs.join()
    return type(obs).__name__

@step("sd_notify")
def _():
    from dropcut.systemd import Notifier
    path = os.path.join(work, "n.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(path); s.settimeout(5)
    os.environ["NOTIFY_SOCKET"] = path
    Notifier().ready()
    assert s.recv(100) == b"READY=1"
    Notifier({"NOTIFY_SOCKET": path, "X": "1"}).status("s")
    assert s.recv(100) == b"STATUS=s"
    s.close()

@step("journal send")
def _():
    from systemd import journal
    journal.send("probe", DROPCUT_EVENT="probe")

@step("signals and threads")
def _():
    import signal
    signal.signal(signal.SIGHUP, lambda *a: None)
    t = threading.Thread(target=time.sleep, args=(0.01,)); t.start(); t.join()

@step("ctypes callback")
def _():
    import ctypes
    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
    assert cb(41) == 42

@step("no core dumps")  # what dropcut run does first: the unit's filter must allow it
def _():
    import ctypes, resource
    from dropcut.harden import disable_core_dumps
    problems = disable_core_dumps()
    dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    return f"problems={problems} dumpable={dumpable} core={resource.getrlimit(resource.RLIMIT_CORE)}"

results["cffi loaded by the stack"] = "yes" if "_cffi_backend" in sys.modules else "no"

@step("cffi callback")
def _():
    try:
        import _cffi_backend
    except ImportError:
        return "not installed"
    cb = _cffi_backend.FFI().callback("int(*)(int)", lambda x: x + 1)
    assert cb(41) == 42

print(json.dumps({"results": results, "details": details}))
"""


def _libseccomp() -> str | None:
    name = ctypes.util.find_library("seccomp")
    for candidate in (name, "libseccomp.so.2"):
        if not candidate:
            continue
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        return candidate
    return None


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= _expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def unit_syscall_allow_list() -> tuple[list[str], int]:
    """The allow-list systemd 252 builds from the unit's SystemCallFilter= lines: the first
    line is an allow-list (so @default is added), later ``~`` lines remove from it."""
    service = read_unit()["Service"]
    groups = _syscall_groups()
    allowed: set[str] | None = None
    for value in service["SystemCallFilter"]:
        invert = value.startswith("~")
        names = _expand(value.lstrip("~").split(), groups)
        if allowed is None:
            assert not invert, "the unit's filter must be an allow-list"
            allowed = _expand(["@default"], groups) | names
        elif invert:
            allowed -= names
        else:
            allowed |= names
    assert allowed
    errno_name = service.get("SystemCallErrorNumber", ["EPERM"])[-1]
    import errno as errno_mod

    return sorted(allowed), int(getattr(errno_mod, errno_name))


def _run_probe(work: Path, launcher_spec: dict[str, Any] | None) -> dict[str, Any]:
    work.mkdir()
    probe = work / "probe.py"
    probe.write_text(_PROBE)
    argv = [sys.executable, str(probe), str(work)]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    if launcher_spec is None:
        cmd = argv
    else:
        spec = dict(launcher_spec, argv=argv)
        cmd = [sys.executable, "-c", _SECCOMP_LAUNCHER, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def probe_baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = _run_probe(tmp_path_factory.mktemp("probe") / "plain", None)
    results = base["results"]
    assert results["wx_mmap"] == "allowed"
    # the probe must actually exercise the stack, or the comparison proves nothing
    for key in (
        "pillow JPEG",
        "pillow PNG",
        "ssl context",
        "httpx local http",
        "sqlite wal",
        "files",
        "sd_notify",
        "signals and threads",
        "ctypes callback",
    ):
        assert results[key] == "ok", (key, base["details"].get(key))
    assert results["watchdog inotify"] == "InotifyObserver"
    assert results["no core dumps"] == "problems=[] dumpable=0 core=(0, 0)"
    assert results["cffi loaded by the stack"] == "no", (
        "something in the daemon's stack now loads cffi: cffi's ffi.callback() needs "
        "writable+executable memory, which MemoryDenyWriteExecute=yes forbids; check that "
        "no callback is created (or drop MemoryDenyWriteExecute= from the unit)"
    )
    return base


def _compare(restricted: dict[str, Any], baseline: dict[str, Any]) -> None:
    got, want = restricted["results"], baseline["results"]
    assert got["wx_mmap"] == "refused", "the restriction is not in force"
    differences = {
        key: (want.get(key), got.get(key), restricted["details"].get(key))
        for key in set(want) | set(got)
        if key not in ("wx_mmap", "sched_setaffinity", "cffi callback") and want.get(key) != got.get(key)
    }
    assert differences == {}


sandbox_tools = pytest.mark.skipif(
    _libseccomp() is None or shutil.which("systemd-analyze") is None,
    reason="needs libseccomp and systemd-analyze",
)


@sandbox_tools
def test_stack_runs_under_systemd_252_syscall_filter_and_mdwe(
    tmp_path: Path, probe_baseline: dict[str, Any]
) -> None:
    """What Debian 12's systemd applies: NoNewPrivileges, the unit's SystemCallFilter=
    (allow-list, EPERM) and MemoryDenyWriteExecute=yes as a seccomp filter."""
    allow, err = unit_syscall_allow_list()
    spec = {"libseccomp": _libseccomp(), "allow": allow, "errno": err, "seccomp_mdwe": True}
    restricted = _run_probe(tmp_path / "systemd252", spec)
    assert probe_baseline["results"]["sched_setaffinity"] == "ok"
    assert restricted["results"]["sched_setaffinity"] == "PermissionError", "filter not in force"
    _compare(restricted, probe_baseline)
    # cffi's old-style callbacks are what would break (only when cffi is installed)
    assert restricted["results"]["cffi callback"] in ("not installed", "MemoryError")


@sandbox_tools
def test_stack_runs_under_kernel_mdwe(tmp_path: Path, probe_baseline: dict[str, Any]) -> None:
    """prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): what newer systemd uses for
    MemoryDenyWriteExecute=yes on Linux >= 6.3."""
    restricted = _run_probe(tmp_path / "mdwe", {"prctl_mdwe": True})
    _compare(restricted, probe_baseline)


def test_probe_scripts_are_valid_python() -> None:
    compile(_PROBE, "probe", "exec")
    compile(_SECCOMP_LAUNCHER, "launcher", "exec")


# ---------------------------------------------------------------------------------------
# the real daemon: sd_notify and journald end to end


@pytest.fixture
def folders(tmp_path: Path) -> Any:
    from tests.support import Folders

    return Folders.make(tmp_path / "srv")


@pytest.fixture
def api() -> Iterator[Any]:
    from tests.fake_api import FakeWithoutBG
    from tests.support import API_KEY

    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0) as server:
        yield server


def _collect_until(
    listener: NotifyListener,
    got: list[tuple[str, int]],
    done: Callable[[list[str]], bool],
    timeout: float = 20.0,
) -> None:
    deadline = time.monotonic() + timeout
    while not done([text for text, _ in got]):
        assert time.monotonic() < deadline, f"timed out; received so far: {got}"
        got.extend(listener.receive(timeout=0.1))


@pytest.mark.slow
def test_daemon_notify_sequence(folders: Any, api: Any, listener: NotifyListener) -> None:
    """`dropcut run` under a fake systemd: READY=1 then STATUS=, WATCHDOG=1 at half of
    WATCHDOG_USEC, RELOADING=1 … READY=1 around SIGHUP, STOPPING=1 on SIGTERM, exit 0 — all
    from the main process (NotifyAccess=main)."""
    from tests.support import DaemonProcess

    env = folders.env(api.url)
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    proc = DaemonProcess(env).start()
    got: list[tuple[str, int]] = []
    try:
        _collect_until(listener, got, lambda t: t.count("WATCHDOG=1") >= 3)
        proc.signal(signal.SIGHUP)
        _collect_until(listener, got, lambda t: "RELOADING=1" in " ".join(t) and t[-1] == "READY=1")
        proc.signal(signal.SIGTERM)
        code = proc.wait(20)
        got.extend(listener.receive(timeout=0.3))
    finally:
        proc.stop()
    assert code == 0
    assert proc.proc is not None
    assert {pid for _, pid in got} == {proc.proc.pid}
    texts = [text for text, _ in got]
    assert texts[0] == "READY=1"
    assert texts[1].startswith("STATUS=queued ")
    assert all("\n" not in t for t in texts if t.startswith("STATUS="))
    reload_at = next(i for i, t in enumerate(texts) if t.startswith("RELOADING=1\nMONOTONIC_USEC="))
    ready_again = texts.index("READY=1", reload_at)
    stopping = texts.index("STOPPING=1")
    assert 0 < reload_at < ready_again < stopping
    assert "READY=1" not in texts[stopping:]
    # pings every 0.5 s: three of them took at least a second
    assert texts[:reload_at].count("WATCHDOG=1") >= 3


def test_daemon_hung_loop_stops_watchdog(folders: Any, api: Any, listener: NotifyListener) -> None:
    """WATCHDOG=1 comes from the daemon's event loop: block the loop and the pings stop
    (systemd would then kill and restart the service), unblock it and they resume."""
    from tests.support import InProcessDaemon

    notifier = Notifier({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"})
    assert notifier.watchdog_interval() == pytest.approx(0.2)
    with InProcessDaemon(folders.settings(api.url), notifier=notifier) as run:
        got: list[tuple[str, int]] = []
        _collect_until(listener, got, lambda t: t.count("WATCHDOG=1") >= 3, timeout=10)
        run.call(lambda: time.sleep(2.0))  # the loop hangs for 2 s
        time.sleep(0.4)
        listener.receive(timeout=0.01)  # a ping sent just before the hang
        during_hang = listener.messages(timeout=1.2)
        assert "WATCHDOG=1" not in during_hang
        after: list[tuple[str, int]] = []
        _collect_until(listener, after, lambda t: "WATCHDOG=1" in t, timeout=5)


@pytest.mark.slow
@needs_systemd_python
def test_daemon_logs_to_journald_with_queryable_fields(
    folders: Any, api: Any, journal_socket: socket.socket
) -> None:
    """log_format=journal end to end: what `journalctl -u dropcut
    DROPCUT_EVENT=file_quarantined DROPCUT_FILE=broken.jpg` would find."""
    from tests.support import DaemonProcess, drop

    drop(folders.inbox, "broken.jpg", b"this is not a JPEG")
    proc = DaemonProcess(folders.env(api.url, log_format="journal")).start()
    entries: list[dict[str, bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while not any(e.get("DROPCUT_EVENT") == b"file_quarantined" for e in entries):
            assert time.monotonic() < deadline, (entries, proc.lines)
            try:
                entries.append(_receive_entry(journal_socket))
            except TimeoutError:
                pass
    finally:
        code = proc.stop()
    assert code == 0
    events = [e.get("DROPCUT_EVENT") for e in entries]
    assert b"daemon_started" in events
    quarantined = next(e for e in entries if e.get("DROPCUT_EVENT") == b"file_quarantined")
    assert quarantined["DROPCUT_FILE"] == b"broken.jpg"
    assert quarantined["SYSLOG_IDENTIFIER"] == b"dropcut"
    assert quarantined["PRIORITY"] in (b"3", b"4")
    assert quarantined["MESSAGE"].startswith(b"file_quarantined ")
    assert all(e["SYSLOG_IDENTIFIER"] == b"dropcut" for e in entries)
    # nothing about the events went to stderr: the journal has them
    assert not [line for line in proc.lines if '"event"' in line]


@needs_systemd_python
@pytest.mark.parametrize(
    "key",
    ["sk-hygiene-7Q2x9Zp4Lm", "sk-\"odd\\key'-7Q2x9Zp4Lm"],
    ids=["plain_key", "key_with_quote_and_backslash"],
)
def test_journal_format_redacts_exceptions_warnings_library_logs_and_crashes(
    journal_socket: socket.socket, key: str
) -> None:
    """log_format=journal: what reaches journald (every field of every entry) holds no
    trace of the key, whether dropcut, a library, a warning, a finalizer, a thread or an
    uncaught exception produced it; the tracebacks are there (DROPCUT_EXCEPTION), redacted."""
    from tests.test_key_hygiene import EXPECTED_EVENTS, MARK, run_log_script

    proc = run_log_script("journal", key)
    assert proc.returncode == 1, proc.stderr
    assert MARK not in proc.stdout + proc.stderr
    entries: list[dict[str, bytes]] = []
    while len(entries) < len(EXPECTED_EVENTS):
        try:
            entries.append(_receive_entry(journal_socket))
        except TimeoutError:
            break
    assert [e.get("DROPCUT_EVENT", b"").decode() for e in entries] == list(EXPECTED_EVENTS)
    for entry in entries:
        for name, value in entry.items():
            assert MARK.encode() not in value, (name, value)
    tracebacks = [e["DROPCUT_EXCEPTION"] for e in entries if "DROPCUT_EXCEPTION" in e]
    assert len(tracebacks) >= 5
    assert all(b"[redacted]" in t for t in tracebacks), tracebacks

"""systemd integration: sd_notify (readiness, status, watchdog, reload, stop) and journald.

Thin wrappers over systemd-python (the optional ``dropcut[systemd]`` extra), importable
without it:

``Notifier``
    Sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``RELOADING=1``, ``STOPPING=1`` to the
    socket named by ``$NOTIFY_SOCKET`` through ``systemd.daemon.notify`` (sd_notify(3)).
    Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not ``notify``)
    every call is a no-op.

    Fallback without systemd-python: when the package is missing but ``$NOTIFY_SOCKET`` is
    set, the messages go out through a minimal stdlib sender (one ``AF_UNIX``/``SOCK_DGRAM``
    datagram of newline-separated ``KEY=VALUE`` lines per call, to a path or, for a name
    starting with ``@``, to the abstract namespace). Justification: systemd-python has no
    wheels (building it needs libsystemd-dev, pkg-config and a compiler), so an install
    without it is plausible, and under ``Type=notify`` a daemon that never sends
    ``READY=1`` is killed after ``TimeoutStartSec=`` and one that never sends
    ``WATCHDOG=1`` is killed every ``WatchdogSec=`` — a far worse failure than a missing
    optional feature. The notify protocol is documented as a stable interface meant to be
    spoken without libsystemd (recent sd_notify(3) man pages even include a standalone
    reference implementation), and the sender below is exactly that protocol for the two
    address forms systemd 252 supports. The same stdlib sender is used
    when the caller hands in an ``env`` whose ``NOTIFY_SOCKET`` differs from the process
    environment, because sd_notify only ever reads the process environment.

    Errors while sending are logged once (``sd_notify_failed``) and otherwise swallowed:
    a lost status line must not take the daemon down, and a lost ``WATCHDOG=1`` is
    exactly what the watchdog is there to notice.

``journal_fields`` / ``JournalRenderer``
    ``log_format=journal``: every structlog event becomes one journal entry whose fields
    are the event's fields (``DROPCUT_EVENT=``, ``DROPCUT_FILE=``, ``DROPCUT_SHA256=`` …),
    so ``journalctl -u dropcut DROPCUT_EVENT=file_quarantined`` works. ``JournalRenderer``
    is the *final* structlog processor: it sends the entry with ``systemd.journal.send``
    and then raises ``structlog.DropEvent``, so the wrapped logger (whatever
    ``logger_factory`` made it) is never called and nothing is printed twice. There is no
    stdlib fallback for the journal's native protocol (it needs memfd passing for large
    entries); without systemd-python ``JournalRenderer()`` raises
    ``JournalUnavailableError`` at configure time, and ``log_format=json`` is the
    alternative (under systemd, stderr goes to the journal as well). libsystemd drops
    entries silently when journald is not running; the renderer checks for journald's
    socket at configure time and, if it is missing, says so and writes to stderr instead.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import FrameType, ModuleType
from typing import Any, NoReturn

import structlog
from structlog.typing import EventDict, WrappedLogger


def _optional_module(name: str) -> ModuleType | None:
    # importlib rather than "from systemd import daemon": the project's own systemd/
    # folder (unit files) would otherwise shadow systemd-python for type checkers
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# the optional extra dropcut[systemd]; tests monkeypatch these to None
_sd_daemon = _optional_module("systemd.daemon")
_sd_journal = _optional_module("systemd.journal")

__all__ = [
    "JournalRenderer",
    "JournalUnavailableError",
    "Notifier",
    "journal_fields",
    "priority_for",
]

IDENTIFIER = "dropcut"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELD_PREFIX = "DROPCUT_"

# ---------------------------------------------------------------------------------------
# sd_notify


def _stdlib_notify(address: str, message: str) -> None:
    """Send one sd_notify datagram without libsystemd (see the module docstring)."""
    if address.startswith("@"):
        target = "\0" + address[1:]  # abstract namespace
    elif address.startswith("/"):
        target = address
    else:
        raise OSError(f"unsupported NOTIFY_SOCKET address {address!r} (need /path or @name)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode("utf-8"), target)


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number > 0 else None


class Notifier:
    """sd_notify messages for a ``Type=notify`` service; no-ops outside systemd.

    Thread-safe: the main loop, the watchdog ping and status updates may come from
    different threads.
    """

    enabled: bool

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ: Mapping[str, str] = os.environ if env is None else env
        address = environ.get("NOTIFY_SOCKET") or None
        self._address = address
        self.enabled = address is not None
        self._watchdog_usec = _positive_int(environ.get("WATCHDOG_USEC"))
        self._watchdog_pid_raw = environ.get("WATCHDOG_PID")
        self._lock = threading.Lock()
        self._last_status: str | None = None
        self._failing = False
        # systemd.daemon.notify reads $NOTIFY_SOCKET from the process environment itself;
        # use it when that is the socket we were told about, else the stdlib sender.
        self._use_libsystemd = _sd_daemon is not None and address == os.environ.get("NOTIFY_SOCKET")

    @property
    def backend(self) -> str:
        """``"libsystemd"``, ``"stdlib"`` or ``"none"`` (diagnostics, tests)."""
        if not self.enabled:
            return "none"
        return "libsystemd" if self._use_libsystemd else "stdlib"

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._use_libsystemd:
                assert _sd_daemon is not None
                _sd_daemon.notify(message)
            else:
                _stdlib_notify(self._address, message)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                structlog.get_logger("dropcut.systemd").warning(
                    "sd_notify_failed", error=str(exc), message=message.split("\n", 1)[0]
                )
        else:
            self._failing = False

    def ready(self) -> None:
        """``READY=1``: start-up (or a reload) is complete."""
        self._send("READY=1")

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (systemd >= 253 requires it for
        ``Type=notify-reload``; older versions ignore the extra field). Send ``ready()``
        when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """``STOPPING=1``: shutdown has begun."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """``STATUS=<one line>`` (shown by ``systemctl status``); sent only when changed."""
        line = " ".join(text.split())
        with self._lock:
            if line == self._last_status:
                return
            self._last_status = line
        self._send(f"STATUS={line}")

    def extend_timeout(self, seconds: float) -> None:
        """``EXTEND_TIMEOUT_USEC=``: ask for more time while a long start-up (or stop)
        is still making progress, e.g. the start-up scan of a slow network share."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, in seconds, when
        ``$WATCHDOG_PID`` is unset or names this process; else ``None`` (no watchdog)."""
        if self._watchdog_usec is None:
            return None
        # like sd_watchdog_enabled(): a WATCHDOG_PID that is not ours (or unparsable) = off
        raw_pid = self._watchdog_pid_raw
        if raw_pid is not None and _positive_int(raw_pid) != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the main loop is alive. Call it from the main loop itself, so
        that a hung loop stops the pings and systemd restarts the service."""
        self._send("WATCHDOG=1")


# ---------------------------------------------------------------------------------------
# journald

# syslog(3) priorities, as journald's PRIORITY= field wants them
_PRIORITIES = {
    "critical": 2,
    "fatal": 2,
    "error": 3,
    "exception": 3,
    "err": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
_DEFAULT_PRIORITY = 6

# structlog.processors.CallsiteParameterAdder keys that journald has native fields for
_CODE_FIELDS = {"pathname": "CODE_FILE", "lineno": "CODE_LINE", "func_name": "CODE_FUNC"}
# keys that are not copied into DROPCUT_* fields
_DROPPED = frozenset({"timestamp", "level"})
_FIELD_NAME_MAX = 64  # journald ignores longer field names
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_BARE_TOKEN = re.compile(r"[^\s\"'=\\]+")


def priority_for(level: str | None) -> int:
    """syslog priority for a structlog level name (unknown levels count as info)."""
    if level is None:
        return _DEFAULT_PRIORITY
    return _PRIORITIES.get(level.lower(), _DEFAULT_PRIORITY)


def field_name(key: str) -> str:
    """``sha256`` → ``DROPCUT_SHA256``; anything outside ``[A-Z0-9_]`` becomes ``_``."""
    name = FIELD_PREFIX + _INVALID_FIELD_CHARS.sub("_", key.upper())
    return name[:_FIELD_NAME_MAX]


def _field_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def _message_value(value: Any) -> str:
    """A value for the one-line MESSAGE: bare when it is a simple token, else JSON."""
    if isinstance(value, str):
        if _BARE_TOKEN.fullmatch(value):
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    return _message_value(_field_value(value))


def _exception_text(value: Any) -> str:
    if isinstance(value, BaseException):
        return "".join(traceback.format_exception(value)).rstrip("\n")
    if isinstance(value, tuple) and len(value) == 3 and value[1] is not None:
        return "".join(traceback.format_exception(*value)).rstrip("\n")
    if value is True:
        exc = sys.exc_info()[1]
        return _exception_text(exc) if exc is not None else ""
    return str(value).rstrip("\n")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The journal entry for one structlog event (pure).

    - ``MESSAGE``: one readable line, the event name then ``key=value`` pairs (values that
      are not simple tokens JSON-quoted, so newlines stay escaped); an exception appears as
      its last line only.
    - ``PRIORITY``: syslog priority from ``level`` (debug 7, info 6, notice 5, warning 4,
      error 3, critical 2).
    - ``SYSLOG_IDENTIFIER=dropcut``.
    - every other key as ``DROPCUT_<KEY>`` (upper case, characters outside ``[A-Z0-9_]``
      replaced by ``_``): ``event`` → ``DROPCUT_EVENT``, ``file`` → ``DROPCUT_FILE``,
      ``exception``/``exc_info`` → ``DROPCUT_EXCEPTION`` (the full traceback). Strings are
      kept as they are (newlines included), dicts and lists become compact JSON, anything
      else ``str()``.
    - ``timestamp`` is dropped (journald stamps entries itself), ``level`` only sets
      ``PRIORITY``; structlog's call-site keys ``pathname``/``lineno``/``func_name`` become
      journald's ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``.
    """
    fields: dict[str, str] = {}
    event = event_dict.get("event")
    event_name = "" if event is None else _field_value(event)
    parts = [" ".join(event_name.split())] if event_name else []
    for key, value in event_dict.items():
        if key in _DROPPED:
            continue
        if key in _CODE_FIELDS:
            fields[_CODE_FIELDS[key]] = _field_value(value)
            continue
        if key in ("exception", "exc_info"):
            text = _exception_text(value)
            if not text:
                continue
            fields[FIELD_PREFIX + "EXCEPTION"] = text
            parts.append(f"exception={_message_value(_last_line(text))}")
            continue
        fields[field_name(key)] = _field_value(value)
        if key != "event" and not (key == "logger" and value == IDENTIFIER):
            parts.append(f"{key}={_message_value(value)}")
    fields["MESSAGE"] = " ".join(parts)
    fields["PRIORITY"] = str(priority_for(event_dict.get("level")))
    fields["SYSLOG_IDENTIFIER"] = IDENTIFIER
    return fields


class JournalUnavailableError(RuntimeError):
    """``log_format=journal`` without systemd-python: a configuration error."""


_SKIP_MODULES = ("structlog", "logging", "dropcut.logs", "dropcut.systemd", "systemd")


def _caller_code_fields() -> dict[str, Any]:
    """CODE_FILE/CODE_LINE/CODE_FUNC of the frame that logged (outside structlog, logging
    and this module), so journald does not record this renderer as the source."""
    frame: FrameType | None = sys._getframe(1)
    found: FrameType | None = None
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if not any(module == m or module.startswith(m + ".") for m in _SKIP_MODULES):
            found = frame
            break
        found = frame
        frame = frame.f_back
    if found is None:  # pragma: no cover - there is always a frame
        return {"CODE_FILE": "", "CODE_LINE": 0, "CODE_FUNC": ""}
    code = found.f_code
    return {"CODE_FILE": code.co_filename, "CODE_LINE": found.f_lineno, "CODE_FUNC": code.co_name}


class JournalRenderer:
    """Final structlog processor for ``log_format=journal``.

    ``structlog.configure(processors=[..., JournalRenderer()], logger_factory=...)``: each
    event is sent to journald with ``journal_fields(event_dict)`` as its fields, then
    ``structlog.DropEvent`` is raised so the logger from ``logger_factory`` never writes
    it. If journald cannot be reached the line goes to ``fallback`` (stderr) instead, so
    nothing is lost and logging never raises into the daemon.

    ``scrub`` (``Redactor.scrub_text``) is applied to every field, and to the fallback
    line, just before it leaves: the traceback this renderer formats from ``exc_info`` is
    redacted like every other value.

    ``send`` is injectable for tests; by default ``systemd.journal.send`` (systemd-python),
    and without it the constructor raises ``JournalUnavailableError``. libsystemd drops
    entries silently when journald is not running, so when its socket is missing at
    configure time the renderer says so once and writes every line to ``fallback``.
    """

    def __init__(
        self,
        send: Callable[..., None] | None = None,
        *,
        fallback: Callable[[str], None] | None = None,
        scrub: Callable[[str], str] | None = None,
    ) -> None:
        self._journal_missing = False
        self._scrub = scrub
        if send is None:
            if _sd_journal is None:
                raise JournalUnavailableError(
                    "log_format=journal needs systemd-python: install dropcut[systemd] "
                    "(building it needs libsystemd-dev and pkg-config), or set "
                    "log_format=json (under systemd, stderr reaches the journal too)"
                )
            send = _sd_journal.send
            # libsystemd silently drops entries when journald is not running: say so once
            # and write the lines to stderr instead
            if not os.path.exists(JOURNAL_SOCKET):
                self._journal_missing = True
        self._send: Callable[..., None] = send
        self._fallback = fallback or _write_stderr
        if self._journal_missing:
            self._fallback(f"journald is not running ({JOURNAL_SOCKET} missing): logging to stderr")

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> NoReturn:
        fields: dict[str, Any] = dict(journal_fields(event_dict))
        if self._scrub is not None:
            # the last step: whatever journal_fields made of the event (a traceback it
            # formatted, JSON of a dict) goes out redacted
            fields = {key: self._scrub(value) for key, value in fields.items()}
        if "CODE_FILE" not in fields and "CODE_FUNC" not in fields:
            fields.update(_caller_code_fields())
        if "CODE_LINE" in fields:
            try:
                fields["CODE_LINE"] = int(fields["CODE_LINE"])
            except ValueError:
                del fields["CODE_LINE"]
        if self._journal_missing:
            self._fallback(fields["MESSAGE"])
            raise structlog.DropEvent
        try:
            self._send(**fields)
        except Exception as exc:  # never let logging kill the caller
            line = f"{fields['MESSAGE']} (journal send failed: {exc})"
            self._fallback(self._scrub(line) if self._scrub is not None else line)
        raise structlog.DropEvent


def _write_stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass

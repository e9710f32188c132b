"""``log_format = "console"``: one short line per event for a person at a terminal, and a
status line at the bottom of it.

A line is ``HH:MM:SS LEVEL event file  key=value…``: the local time, a five-column level,
the event name, the file, then the fields that matter for that event (:data:`FIELDS`), then
any other fields while they fit. The whole line fits :data:`MAX_WIDTH` columns, or the
terminal when it is narrower; a sha256 anywhere is shortened to 12 hex digits; an exception
follows on the next lines as a plain traceback. Colour (level, event) only on a terminal,
never with ``NO_COLOR`` set.

:class:`ConsoleOutput` is where the console format's lines go (one lock for every thread)
and :class:`StatusLine` keeps a summary of the queue below them: on a terminal one line,
redrawn every second with the log lines printed above it (rich's ``Live``); anywhere else
no cursor control at all, but a plain ``status`` line now and then. The json and journal
formats have no :class:`ConsoleOutput`, hence no status line.

Secrets: the values of an event are redacted before they get here (the chain's
:class:`dropcut.logs.Redactor`) and the rendered text, traceback included, is scrubbed again
afterwards (:class:`dropcut.logs._ScrubbedRenderer`): a value is cut only once it is
redacted, so a cut can never leave part of a key behind.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, tzinfo
from types import MappingProxyType, TracebackType
from typing import Any, Self, TextIO

import structlog
from rich.cells import cell_len, get_character_cell_size
from rich.console import Console
from rich.live import Live
from rich.text import Text
from structlog.typing import EventDict, WrappedLogger

MAX_WIDTH = 120
"""Columns a line may take at most (fewer on a narrower terminal)."""

SHA_SHORT = 12
"""Hex digits of a sha256 that are shown."""

LEVEL_WIDTH = 5
EVENT_WIDTH = 16  # the event column (longer names push the rest to the right)
EVENT_MAX = 32  # columns an event name may take at most
FILE_MIN = 24  # columns the file keeps before the event's fields are cut shorter…
FILE_NAME_MAX = 40  # …or more, to keep its file name whole, up to these
VALUE_MIN = SHA_SHORT  # columns a value keeps: cut shorter, its field is left out
EXTRA_MAX = 40  # columns of a value of a field not in the event's table
ELLIPSIS = "…"

FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # start, stop, reload
        "daemon_started": ("version", "pid", "found", "requeued", "paused"),
        "daemon_stopped": ("requeued",),
        "reload_failed": ("error",),
        "reload_refused": ("keys", "reason"),
        "config_reloaded": ("changed",),
        "core_dumps_not_disabled": ("problems",),
        "stage_crashed": ("stage",),
        "sd_notify_failed": ("error", "message"),
        # watch
        "watch_mode_chosen": ("mode", "reason", "fstype"),
        "watch_started": ("mode",),
        "watch_degraded": ("reason", "fallback", "action"),
        "watch_restarted": ("mode", "poll_interval_s", "found"),
        "watch_restored": ("mode", "found"),
        "watch_stop_abandoned": ("reason",),
        "watch_event_failed": ("path",),
        "rescan_done": ("found",),
        # admission
        "file_known": ("state",),
        "file_rejected": ("reason",),
        "file_unreadable": ("errno", "detail"),
        "file_admitted": ("format", "width", "height", "size"),
        "frames_skipped": ("frames", "used"),
        "file_recheck_scheduled": ("code", "after_s"),
        "job_queued": ("sha256", "size", "again"),
        "job_duplicate": ("sha256", "state"),
        "quarantine_failed": ("error",),
        # dispatch
        "job_cancelled": ("reason", "paid"),
        "job_postponed": ("reason",),
        "job_requeued": ("reason",),
        "result_reused": ("sha256",),
        "spool_missing": ("sha256",),
        "upload_started": ("attempt", "bytes"),
        "upload_succeeded": ("duration_ms", "bytes", "attempt"),
        "retry_scheduled": ("code", "delay_s", "attempt"),
        "render_started": ("outputs",),
        "output_rendered": ("seconds", "outputs"),
        "output_written": ("output", "cached"),
        "input_disposed": ("result",),
        "input_dispose_deferred": ("reason",),
        "held_file_restored": ("held_as",),
        "held_restore_failed": ("reason",),
        "quarantine_deferred": ("reason",),
        "file_quarantined": ("code", "status", "detail"),
        "disk_full": ("path", "detail"),
        "cache_store_failed": ("detail",),
        "queue_paused": ("code", "detail", "location"),
        "queue_resumed": ("reason", "paused_code"),
        "credit_checked": ("credit", "expiration_date"),
        "credit_check_failed": ("status", "detail", "transport_error"),
        "credit_low": ("credit", "warn_below"),
        # everybody else's
        "library_log": ("logger", "message"),
        "python_warning": ("category", "message", "where"),
        "thread_crashed": ("thread",),
        "unraisable_exception": ("message", "object"),
        # the status line's plain form
        "status": ("summary",),
        "status_failed": ("error",),
    }
)
"""Event name → the fields shown right after the file, in this order (when present and
not None). Other fields follow while they fit."""

BARE_FIELDS = frozenset({"summary"})
"""Fields shown as their value alone, without ``key=``."""

BYTE_FIELDS = frozenset({"bytes", "size"})
"""Integer fields that are a number of bytes: shown as ``212.4KiB``."""

PATH_FIELDS = frozenset({"output", "path", "held_as", "quarantined_as", "inbox", "outbox", "where", "result"})
"""Fields cut in the middle like the file (keeping the end, the file name)."""

# shown in their own columns, or on the following lines, or not at all
_NOT_FIELDS = frozenset(
    {"timestamp", "level", "event", "file", "exc_info", "exception", "stack", "stack_info"}
)

LEVELS = MappingProxyType(
    {
        "debug": "DEBUG",
        "info": "INFO",
        "warning": "WARN",
        "warn": "WARN",
        "error": "ERROR",
        "exception": "ERROR",
        "critical": "CRIT",
        "fatal": "CRIT",
    }
)
_LEVEL_SGR = MappingProxyType({"DEBUG": "2", "INFO": "32", "WARN": "33", "ERROR": "31", "CRIT": "1;31"})
_EVENT_SGR = "1"

_SHA256 = re.compile(r"(?<![0-9A-Fa-f])([0-9a-f]{64})(?![0-9A-Fa-f])")
# C0, DEL, C1, lone surrogates (a file name that is not UTF-8), line and paragraph
# separators and the bidirectional controls (a name that reads backwards): never printed
# as they are, so that no file name can move the cursor, recolour or spoof the terminal.
_SPOOFING = r"\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNPRINTABLE = re.compile(rf"[\x00-\x1f{_SPOOFING}]")
_UNPRINTABLE_KEEP_NL = re.compile(rf"[\x00-\x09\x0b-\x1f{_SPOOFING}]")
_NAMED_ESCAPES = MappingProxyType({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


# --- text in terminal cells --------------------------------------------------------------


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character, lone surrogate, line separator and
    bidirectional control written as a backslash escape (``\\x1b``, ``\\n``, ``\\udce9``),
    so that printing it cannot move the cursor or change the terminal. ``keep_newlines``
    leaves ``\\n`` as it is (tracebacks)."""
    pattern = _UNPRINTABLE_KEEP_NL if keep_newlines else _UNPRINTABLE
    return pattern.sub(_escape_char, text)


def _cut_end(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, cut at the end with "…" when it is longer."""
    if cell_len(text) <= width:
        return text
    if width <= 0:
        return ""
    return _take_start(text, width - 1) + ELLIPSIS


def _take_start(text: str, width: int) -> str:
    """The longest start of ``text`` of at most ``width`` cells (zero-width characters stay
    with the character before them)."""
    used = 0
    for index, char in enumerate(text):
        size = get_character_cell_size(char)
        if used + size > width:
            return text[:index]
        used += size
    return text


def _take_end(text: str, width: int) -> str:
    """The longest end of ``text`` of at most ``width`` cells, not starting with a
    zero-width character (which belongs to the one before it)."""
    used = 0
    start = len(text)
    for index in range(len(text) - 1, -1, -1):
        size = get_character_cell_size(text[index])
        if used + size > width:
            break
        used += size
        start = index
    while start < len(text) and get_character_cell_size(text[start]) == 0:
        start += 1
    return text[start:]


def _cut_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, its middle replaced by "…" when it is longer
    (the end, which tells most, gets the larger half)."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    tail = _take_end(text, (width - 1) - (width - 1) // 2)
    head = _take_start(text, width - 1 - cell_len(tail))
    return head + ELLIPSIS + tail


def shorten_path(path: str, width: int) -> str:
    """``path`` in at most ``width`` cells: when it is longer, the folders are cut in the
    middle ("shop/2024/spr…/IMG_0001.jpg", down to "…/IMG_0001.jpg") and the file name
    is kept whole if it fits, else the name itself is cut in its middle, keeping its
    extension."""
    if cell_len(path) <= width:
        return path
    folder, slash, name = path.rpartition("/")
    tail = slash + name
    room = width - cell_len(tail) - 1
    if folder and room >= 0:
        return _take_start(folder, room) + ELLIPSIS + tail
    return _cut_middle(path, width)


# --- values -------------------------------------------------------------------------------


def _short_shas(text: str) -> str:
    return _SHA256.sub(lambda m: m.group(1)[:SHA_SHORT], text)


def human_bytes(n: int) -> str:
    """``n`` bytes as a short figure: ``512B``, ``7.7MiB``, ``212KiB``, ``1.2GiB``."""
    if abs(n) < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"


def _value_text(key: str, value: Any) -> str:
    """A value as printable text, not yet quoted or cut."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int) and key in BYTE_FIELDS:
        text = human_bytes(value)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, list | tuple | dict):
        try:
            text = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
        except (TypeError, ValueError):  # (keys json cannot take)
            text = str(value)
    else:
        text = str(value)
    return printable(_short_shas(text))


def _needs_quotes(text: str) -> bool:
    return text == "" or any(c.isspace() or c == '"' for c in text)


class _Field:
    """One ``key=value`` of a line, which can be cut to a width."""

    def __init__(self, key: str, value: Any, width: int) -> None:
        self.key = printable(key)
        # (no line shows more of it: later cuts need not measure all of a huge value)
        self.text = _value_text(key, value)
        if len(self.text) > width:
            cut = shorten_path if key in PATH_FIELDS else _cut_end
            self.text = cut(self.text, width)
        self.bare = key in BARE_FIELDS
        self.path = key in PATH_FIELDS
        # (a list or dict is JSON: its strings are quoted already)
        json_value = isinstance(value, list | tuple | dict)
        self.quoted = not self.bare and not json_value and _needs_quotes(self.text)
        self.size = self.render_width(None)

    def render(self, cap: int | None) -> str:
        """The field, its value cut to at most ``cap`` cells (None: whole)."""
        text = self.text
        if cap is not None and cell_len(text) > cap:
            text = shorten_path(text, cap) if self.path else _cut_end(text, cap)
        if self.quoted:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return text if self.bare else f"{self.key}={text}"

    def render_width(self, cap: int | None) -> int:
        return cell_len(self.render(cap))


def _fit(fields: list[_Field], room: int) -> list[str]:
    """The fields, their values cut to one common cap (the largest that lets them all fit
    in ``room`` cells, separated by spaces), but not below :data:`VALUE_MIN`."""
    if not fields:
        return []
    whole = sum(f.size for f in fields) + len(fields) - 1
    if whole <= room:
        return [f.render(None) for f in fields]
    longest = max(cell_len(f.text) for f in fields)
    cap = min(longest, max(room, VALUE_MIN))
    while cap > VALUE_MIN:
        if sum(f.render_width(cap) for f in fields) + len(fields) - 1 <= room:
            break
        cap -= 1
    return [f.render(cap) for f in fields]


def _clock(timestamp: Any, tz: tzinfo | None) -> str:
    """``HH:MM:SS`` in ``tz`` (None: local time) of an ISO 8601 timestamp (structlog's,
    ``…Z`` for UTC) or of seconds since the epoch; ``--:--:--`` if there is none."""
    try:
        if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
            moment = datetime.fromtimestamp(float(timestamp), UTC)
        elif isinstance(timestamp, str):
            moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        else:
            return "--:--:--"
        return moment.astimezone(tz).strftime("%H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return "--:--:--"


def _sgr(text: str, code: str | None, colors: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colors and code and text else text


def format_line(
    event: Mapping[str, Any],
    *,
    width: int = MAX_WIDTH,
    colors: bool = False,
    tz: tzinfo | None = None,
) -> str:
    """One event as one line of at most ``width`` terminal columns (cells, so a wide
    character counts two; colour codes count nothing), without a newline and without the
    exception (see :func:`format_event`).

    ``event`` is structlog's event dict: ``timestamp`` (ISO 8601, as
    ``TimeStamper(fmt="iso")`` writes it, or epoch seconds), ``level``, ``event``, ``file``
    and any other fields; each may be missing. The line is the time in ``tz`` (None: the
    local time zone), the level, the event, the file (its folders cut in the middle when it
    is long), the fields :data:`FIELDS` names for the event, then the others in their order
    while they fit (a trailing "…" when some did not). None values are left out, values cut
    to fit, every sha256 shortened to :data:`SHA_SHORT` hex digits, control characters
    escaped. ``colors`` adds ANSI colours to the level and the event. Never raises for
    any value in ``event`` (values are shown with ``str()``).
    """
    width = max(1, width)
    name = printable(str(event.get("event", "")))
    level = str(event.get("level", ""))
    label = _cut_end((LEVELS.get(level.lower()) or printable(level)).upper(), LEVEL_WIDTH) or "-"
    shown_name = _cut_end(name, EVENT_MAX) or "-"
    clock = _clock(event.get("timestamp"), tz)
    pad_level = " " * (LEVEL_WIDTH - cell_len(label))
    plain_head = f"{clock} {label}{pad_level} {shown_name}"
    coloured = _sgr(label, _LEVEL_SGR.get(label), colors)
    head = f"{clock} {coloured}{pad_level} {_sgr(shown_name, _EVENT_SGR, colors)}"
    plain_head += " " * max(0, EVENT_WIDTH - cell_len(shown_name))
    head += " " * max(0, EVENT_WIDTH - cell_len(shown_name))
    room = width - cell_len(plain_head) - 1  # for what follows the head and a space

    wanted = FIELDS.get(name, ())
    keys = [_Field(k, event[k], width) for k in wanted if k not in _NOT_FIELDS and event.get(k) is not None]
    raw_file = event.get("file")
    file = printable(_short_shas(str(raw_file))) if raw_file is not None else None
    file_keep = 0
    if file is not None:  # at least the file name and "…/", up to FILE_NAME_MAX columns
        name_keep = min(cell_len(file.rpartition("/")[2]) + 2, FILE_NAME_MAX)
        file_keep = min(cell_len(file), max(FILE_MIN, name_keep))
    # the event's fields, first ones first: those that do not fit even cut short are left out
    avail = room - (file_keep + 2 if file is not None else 0)
    left_out = False
    while keys and sum(f.render_width(VALUE_MIN) for f in keys) + len(keys) - 1 > avail:
        keys.pop()
        left_out = True
    parts = _fit(keys, avail)
    body = " ".join(parts)
    if file is not None:
        file_room = room - (cell_len(body) + 2 if parts else 0)
        body = shorten_path(file, max(file_room, min(file_keep, VALUE_MIN))) + ("  " + body if parts else "")
    sep = " " if parts or file is None else "  "
    if cell_len(body) > room:  # a terminal narrower than the head and a file: cut the line
        return head + " " + _cut_end(body, room) if room > 0 else _cut_plain(plain_head, head, width)

    used = cell_len(body)
    for key in event:
        value = event[key]
        if (
            key in _NOT_FIELDS
            or key in wanted
            or value is None
            or str(key).startswith("_")
            or (key == "logger" and value == "dropcut")  # the default: our own events
        ):
            continue
        part = _Field(str(key), value, width).render(EXTRA_MAX)
        gap = sep if body else ""
        if used + len(gap) + cell_len(part) <= room - 2:  # room for a closing " …" is kept
            body += gap + part
            used += len(gap) + cell_len(part)
            sep = " "
        else:
            left_out = True
    if left_out and used + 2 <= room:
        body += (" " if body else "") + ELLIPSIS
    if not body:
        return _cut_plain(plain_head, head, width)
    return head + " " + body


def _cut_plain(plain_head: str, head: str, width: int) -> str:
    """The head alone cut to ``width`` cells (a terminal narrower than the head: colour
    is dropped then)."""
    plain = plain_head.rstrip(" ")
    return _cut_end(plain, width) if cell_len(plain) > width else head.rstrip(" ")


def _exc_info(value: Any) -> tuple[type[BaseException], BaseException, TracebackType | None] | None:
    if value is None or value is False:
        return None
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return (value[0], value[1], value[2])
    if value is True or value:
        current = sys.exc_info()
        if current[1] is not None:
            return (current[0] or type(current[1]), current[1], current[2])
    return None


def format_event(
    event: Mapping[str, Any],
    *,
    width: int = MAX_WIDTH,
    colors: bool = False,
    tz: tzinfo | None = None,
) -> str:
    """:func:`format_line`, followed on the next lines by the exception of ``exc_info``
    (an exception, a ``sys.exc_info()`` tuple, or True for the one being handled), of
    ``exception`` (a traceback already formatted) and ``stack`` as plain text (no colour,
    not cut: lines may be longer than ``width``), control characters other than newlines
    escaped. No trailing newline."""
    lines = [format_line(event, width=width, colors=colors, tz=tz)]
    info = _exc_info(event.get("exc_info"))
    if info is not None:
        lines.append("".join(traceback.format_exception(*info)).rstrip("\n"))
    for key in ("exception", "stack"):
        text = event.get(key)
        if isinstance(text, str) and text:
            lines.append(text.rstrip("\n"))
    return "\n".join(printable(part, keep_newlines=True) if i else part for i, part in enumerate(lines))


# --- where the lines go ---------------------------------------------------------------------


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):  # closed
        return False


class ConsoleOutput:
    """The console format's output: every rendered event goes through :meth:`write`, from
    any thread, one at a time; a :class:`StatusLine` draws below them through
    :meth:`show_status` on a terminal.

    Args:
        stream: where the lines go (the daemon's stderr).
        max_width: columns a line may take at most (:data:`MAX_WIDTH`); on a terminal
            narrower than that, its width.
        environ: the environment to read ``TERM`` and ``NO_COLOR`` from (default
            ``os.environ``).

    ``is_terminal`` is true when ``stream`` is a TTY and ``TERM`` is not ``dumb``: only
    then is a status line drawn. ``colors`` is ``is_terminal`` unless ``NO_COLOR`` is set.
    It is also structlog's logger (``msg``, ``info``… all :meth:`write`), so
    ``logger_factory=lambda *a: output`` makes it the chain's output.
    """

    def __init__(
        self, stream: TextIO, *, max_width: int = MAX_WIDTH, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self._stream = stream
        self._max_width = max_width
        self._lock = threading.RLock()
        self.is_terminal = _isatty(stream) and env.get("TERM", "").lower() not in ("dumb", "unknown")
        self.colors = self.is_terminal and not env.get("NO_COLOR")
        self._live: Live | None = None

    @property
    def stream(self) -> TextIO:
        """The stream the lines go to."""
        return self._stream

    def terminal_size(self) -> tuple[int, int] | None:
        """(columns, lines) of the terminal ``stream`` is, None when it is none (or says
        0 × 0)."""
        if not self.is_terminal:
            return None
        try:
            size = os.get_terminal_size(self._stream.fileno())
        except (AttributeError, ValueError, OSError):
            return None
        if size.columns <= 0:
            return None
        return size.columns, max(size.lines, 1)

    def width(self) -> int:
        """Columns a line may take: ``max_width``, or the terminal's width if smaller."""
        size = self.terminal_size()
        return min(self._max_width, size[0]) if size else self._max_width

    def write(self, text: str) -> None:
        """Print one rendered event (a line, maybe followed by traceback lines) and a
        newline, above the status line if one is shown; flushed.

        Raises:
            OSError: the stream cannot be written (as any write to it would).
        """
        with self._lock:
            live = self._live
            if live is None:
                self._stream.write(text + "\n")
                self._stream.flush()
                return
            self._resize(live.console)
            live.console.print(Text.from_ansi(text), soft_wrap=True)

    # structlog calls the method named like the level with the rendered text
    msg = log = debug = info = warn = warning = write
    fatal = failure = err = error = critical = exception = write

    def _resize(self, console: Console) -> None:
        size = self.terminal_size()
        if size is not None and size != (console.width, console.height):
            console.size = size

    def show_status(self, text: str) -> None:
        """Draw ``text`` as the status line at the bottom of the terminal (one line, cut at
        its width), replacing the one drawn before; the first call hides the cursor.
        Control characters in ``text`` are escaped.

        Raises:
            RuntimeError: not a terminal (``is_terminal`` is false): nothing is drawn.
        """
        if not self.is_terminal:
            raise RuntimeError("no status line: not a terminal")
        status = Text(printable(text), no_wrap=True, overflow="ellipsis", end="")
        with self._lock:
            if self._live is None:
                size = self.terminal_size() or (80, 24)
                console = Console(
                    file=self._stream,
                    force_terminal=True,
                    force_interactive=True,
                    color_system="auto" if self.colors else None,
                    no_color=not self.colors,
                    width=size[0],
                    height=size[1],
                    highlight=False,
                    markup=False,
                    emoji=False,
                    soft_wrap=True,
                )
                live = Live(
                    status,
                    console=console,
                    auto_refresh=False,
                    transient=True,
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                self._live = live
                live.start(refresh=True)
                return
            self._resize(self._live.console)
            self._live.update(status, refresh=True)

    def hide_status(self) -> None:
        """Erase the status line and show the cursor again; lines are printed plainly
        from then on. Does nothing when no status line is shown."""
        with self._lock:
            live, self._live = self._live, None
            if live is not None:
                live.stop()
                self._stream.flush()

    @property
    def status_shown(self) -> bool:
        """Whether a status line is drawn now."""
        return self._live is not None


class ConsoleRenderer:
    """structlog's renderer for ``log_format="console"``: :func:`format_event` at the
    output's width and colours. (In :mod:`dropcut.logs` its text is scrubbed of secrets
    as the very last step.)"""

    def __init__(self, output: ConsoleOutput, *, tz: tzinfo | None = None) -> None:
        self._output = output
        self._tz = tz

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        return format_event(event_dict, width=self._output.width(), colors=self._output.colors, tz=self._tz)


# --- the status line ------------------------------------------------------------------------


class StatusLine:
    """A summary of the daemon's state kept in view on the console.

    Args:
        summary: returns the text to show (e.g. "queued 12 · in flight 1 · done 340 ·
            quarantined 2 · rate 7/60 s · ETA 1 m 43 s"). It is called on the status
            line's own thread (every ``refresh_seconds`` on a terminal, every
            ``plain_every_seconds`` elsewhere) and on the threads calling :meth:`start`
            and :meth:`stop`, never while a lock of the output is held: it must be safe to
            call from any thread and should be quick. If it raises, the last text it gave
            is kept (with a note), a ``status_failed`` warning is logged once, and the
            status line goes on.
        output: the console format's :class:`ConsoleOutput` (``dropcut.logs.setup(...)
            .console``; json and journal have none, and no status line).
        refresh_seconds: seconds between redraws on a terminal.
        plain_every_seconds: not a terminal: seconds between plain ``status`` lines, each
            printed only if the text changed since the last one.
        log: the structlog logger the plain ``status`` lines go through (default:
            ``structlog.get_logger()``, the configured chain, so they are redacted and
            filtered by level like every other line; below ``info`` they are not shown).

    On a terminal :meth:`start` draws the line and a thread redraws it; the log lines are
    printed above it by the same output, so they never tear it. Not on a terminal there is
    no cursor control at all: :meth:`start` prints the summary as a plain ``status`` line,
    and the thread prints it again every ``plain_every_seconds`` when it changed.
    :meth:`stop` erases the drawn line, shows the cursor, and prints the last summary as a
    plain ``status`` line. Both may be called from any thread; :meth:`stop` also runs at
    interpreter exit if it was not called.
    """

    def __init__(
        self,
        summary: Callable[[], str],
        output: ConsoleOutput,
        *,
        refresh_seconds: float = 1.0,
        plain_every_seconds: float = 60.0,
        log: Any = None,
    ) -> None:
        if refresh_seconds <= 0 or plain_every_seconds <= 0:
            raise ValueError("refresh_seconds and plain_every_seconds must be > 0")
        self._summary = summary
        self._output = output
        self._refresh = refresh_seconds
        self._plain_every = plain_every_seconds
        self._log = log if log is not None else structlog.get_logger()
        self._guard = threading.Lock()  # start/stop/tick, in that order before the output's
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = "new"  # → "running" → "stopped"
        self._text = ""
        self._last_plain: str | None = None
        self._failing = False

    @property
    def drawn(self) -> bool:
        """True when the status is a line drawn at the bottom of a terminal, False when
        it is printed as plain lines."""
        return self._output.is_terminal

    @property
    def text(self) -> str:
        """The summary last read (empty before :meth:`start`)."""
        return self._text

    def start(self) -> None:
        """Show the summary (drawn on a terminal, else one plain ``status`` line) and
        start the thread that keeps it up to date. Once only.

        Raises:
            RuntimeError: started before.
        """
        text = self._read()
        with self._guard:
            if self._state != "new":
                raise RuntimeError("a StatusLine starts once")
            self._state = "stopped"  # unless it can be shown
            self._text = text
            if self.drawn:
                self._output.show_status(text)
            else:
                self._print(text)
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name="dropcut-status", daemon=True)
            self._thread.start()
        atexit.register(self.stop)

    def stop(self, final: str | None = None, *, timeout: float = 2.0) -> None:
        """Stop updating, erase the drawn line (the cursor shown again), and print the last
        summary as a plain ``status`` line: ``final`` if given, else :func:`summary` read
        once more. Waits at most ``timeout`` seconds for a ``summary`` call still running
        on the thread. Does nothing if not running (never started, or stopped)."""
        with self._guard:
            if self._state != "running":
                return
            self._state = "stopped"
            self._wake.set()
            thread = self._thread
        atexit.unregister(self.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._output.hide_status()
        text = printable(final) if final is not None else self._read()
        self._text = text
        self._print(text)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        interval = self._refresh if self.drawn else self._plain_every
        next_at = time.monotonic() + interval
        while not self._wake.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + interval, time.monotonic())
            text = self._read()
            with self._guard:
                if self._state != "running":
                    return
                self._text = text
                try:
                    if self.drawn:
                        self._output.show_status(text)
                    elif text != self._last_plain:
                        self._print(text)
                except (OSError, ValueError):  # the terminal went away: nothing to draw on
                    return

    def _read(self) -> str:
        """The summary now, printable; on an error the last one with a note."""
        try:
            text = printable(str(self._summary()))
        except Exception as exc:
            if not self._failing:
                self._failing = True
                self._log.warning("status_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            base = self._text.split(" (status unavailable", 1)[0]
            return f"{base} (status unavailable: {type(exc).__name__})" if base else "status unavailable"
        self._failing = False
        return text

    def _print(self, text: str) -> None:
        self._last_plain = text
        self._log.info("status", summary=text)

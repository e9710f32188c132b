"""structlog set-up: one processor chain for our events and everybody else's.

Our events are named (``file_admitted``, ``upload_started``…) with fields bound, never
sentences. Records from the standard ``logging`` module (httpx, watchdog: ``library_log``),
Python warnings (``python_warning``) and uncaught exceptions are turned into events of the
same chain, so with ``log_format=json`` every line the process writes is one JSON object
with ``event`` and ``timestamp``. (The inspection pool's worker processes log nothing:
what libraries say there is handed back and logged by :mod:`dropcut.admit` as the same
events.) The redactor removes secrets (the API key) from every value, and again from the
rendered line as the very last step of every format (json, console, journal), so that a
traceback the console renderer formats itself, or a value a renderer escapes, cannot carry
the key out either.

``log_format=console`` renders with :mod:`dropcut.console` (one short line an event) and
writes through one :class:`~dropcut.console.ConsoleOutput`, which :func:`setup` returns so
that the daemon can draw a :class:`~dropcut.console.StatusLine` below the lines; json and
journal have none.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from dropcut.console import ConsoleOutput, ConsoleRenderer

REDACTED = "[redacted]"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


MIN_SECRET = 4
"""Shorter secrets are not redacted (they would blank out ordinary words)."""


def _escaped_forms(secret: str) -> set[str]:
    """``secret`` as it may appear inside rendered text: itself, JSON-escaped (the json
    format, a JSON document inside a value) and Python-escaped (``repr()`` of a str or of
    bytes, e.g. h11's "Illegal header value b'…'"), each up to two levels deep (a repr
    inside a JSON line)."""
    forms = {secret}
    for _ in range(2):
        for value in list(forms):
            forms.add(json.dumps(value)[1:-1])
            forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
            py = value.encode("unicode_escape").decode("ascii")
            forms.update((py, py.replace("'", "\\'"), py.replace('"', '\\"')))
    return forms


class Redactor:
    """A processor that replaces every occurrence of a secret in string values.

    :meth:`scrub` also serves any text printed or stored outside the log chain (the
    renderer's output, ``dropcut status``). Secrets shorter than :data:`MIN_SECRET`
    characters are ignored.
    """

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def set_secrets(self, *secrets: str | None) -> None:
        """Replace the secrets to redact; each is also redacted in its JSON- and
        Python-escaped spellings."""
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET:
                forms |= {f for f in _escaped_forms(secret) if len(f) >= MIN_SECRET}
        # longest first: an escaped spelling may contain a shorter one
        self._secrets = tuple(sorted(forms, key=lambda f: (-len(f), f)))

    def scrub(self, value: Any) -> Any:
        """``value`` with every secret replaced by ``[redacted]``: strings, and the
        strings inside dicts (keys too), lists and tuples; other values unchanged."""
        if not self._secrets:
            return value
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, Mapping):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        return value

    def scrub_text(self, text: str) -> str:
        """``text`` with every secret replaced (the typed form of :meth:`scrub`)."""
        result = self.scrub(text)
        assert isinstance(result, str)
        return result

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        if not self._secrets:
            return event_dict
        return {k: self.scrub(v) for k, v in event_dict.items()}


class _ScrubbedRenderer:
    """The final processor: the renderer's output with every secret replaced, so that
    whatever the renderer adds (a traceback it formats, escaped values) is redacted too."""

    def __init__(self, renderer: Processor, redactor: Redactor) -> None:
        self._renderer = renderer
        self._redactor = redactor

    def __call__(
        self, logger: WrappedLogger, method: str, event_dict: EventDict
    ) -> Mapping[str, Any] | str | bytes | bytearray | tuple[Any, ...]:
        out = self._renderer(logger, method, event_dict)
        if isinstance(out, str):
            return self._redactor.scrub_text(out)
        if isinstance(out, bytes | bytearray):
            return self._redactor.scrub_text(bytes(out).decode("utf-8", "surrogateescape")).encode(
                "utf-8", "surrogateescape"
            )
        return out


class _StdlibBridge(logging.Handler):
    """Feeds records of other libraries into the structlog chain."""

    def __init__(self) -> None:
        super().__init__()
        self._log = structlog.get_logger("dropcut.stdlib")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["exc_info"] = record.exc_info
            event = "python_warning" if record.name == "py.warnings" else "library_log"
            level = logging.getLevelName(record.levelno).lower()
            level = level if level in ("debug", "info", "warning", "error", "critical") else "info"
            getattr(self._log, level)(event, message=record.getMessage(), **fields)
        except Exception:  # never let logging kill the caller
            self.handleError(record)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning``: a Python warning becomes a ``python_warning`` event."""
    try:
        structlog.get_logger("py.warnings").warning(
            "python_warning",
            message=str(message),
            logger="py.warnings",
            category=category.__name__,
            where=f"{filename}:{lineno}",
        )
    except Exception:  # never let a warning kill the caller
        pass


def set_log_level(level: str) -> None:
    """Change the level :func:`configure` set, keeping the rest of the set-up
    (the output stream, the format, the redactor)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]))
    logging.getLogger().setLevel(max(LEVELS[level], logging.INFO))


def _add_logger_name(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("logger", "dropcut")
    return event_dict


@dataclass(frozen=True)
class LogSetup:
    """What :func:`setup` configured."""

    redactor: Redactor
    """Give it the API key (again after a reload)."""
    console: ConsoleOutput | None
    """``log_format="console"``: the output every line goes through, for a
    :class:`dropcut.console.StatusLine`. None for json and journal: no status line."""


def configure(
    log_format: str,
    level: str = "info",
    *,
    stream: TextIO | None = None,
    redactor: Redactor | None = None,
) -> Redactor:
    """:func:`setup`, returning only the redactor (the daemon gives it the API key, again
    after a reload).

    Raises:
        dropcut.systemd.JournalUnavailableError: ``log_format="journal"`` without
            systemd-python.
    """
    return setup(log_format, level, stream=stream, redactor=redactor).redactor


def setup(
    log_format: str,
    level: str = "info",
    *,
    stream: TextIO | None = None,
    redactor: Redactor | None = None,
) -> LogSetup:
    """Configure structlog, stdlib logging, warnings and the hooks for uncaught exceptions
    (``sys.excepthook``, ``threading.excepthook``, ``sys.unraisablehook``) to write
    ``log_format`` (``"json"``, ``"journal"``, anything else: ``"console"``) at ``level``
    and above to ``stream`` (default: ``sys.stderr``). Returns the redactor and, for the
    console format, its :class:`~dropcut.console.ConsoleOutput` (see :class:`LogSetup`).

    Raises:
        dropcut.systemd.JournalUnavailableError: ``log_format="journal"`` without
            systemd-python.
        KeyError: ``level`` is not one of :data:`LEVELS`.
    """
    redactor = redactor or Redactor()
    out = stream or sys.stderr
    console: ConsoleOutput | None = None
    renderer: Processor
    if log_format == "json":
        renderer = _ScrubbedRenderer(
            structlog.processors.JSONRenderer(sort_keys=False, default=str), redactor
        )
    elif log_format == "journal":
        from dropcut.systemd import JournalRenderer

        # sends the entry itself: it scrubs every field as its last step
        renderer = JournalRenderer(scrub=redactor.scrub_text)
    else:
        # one short line an event, plain tracebacks below it (a traceback rich formatted
        # would be wrapped, and a key split across two lines could not be found by the
        # scrubbing of the output); a status line, if any, drawn below by the same output
        console = ConsoleOutput(out)
        renderer = _ScrubbedRenderer(ConsoleRenderer(console), redactor)
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if log_format != "console" else _noop,
        redactor,
        renderer,  # redacts its own output: the last step for every format
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(out) if console is None else _OutputFactory(console),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(LEVELS[level], logging.INFO))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.INFO)
    logging.captureWarnings(False)  # in case someone did: warnings are ours, structured
    warnings.showwarning = _show_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_crash
    sys.unraisablehook = _log_unraisable
    return LogSetup(redactor=redactor, console=console)


class _OutputFactory:
    """structlog's logger factory for the console format: every logger is the one output."""

    def __init__(self, output: ConsoleOutput) -> None:
        self._output = output

    def __call__(self, *args: Any) -> ConsoleOutput:
        return self._output


def _noop(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    return event_dict


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    structlog.get_logger().critical("daemon_crashed", exc_info=(exc_type, exc, tb))


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread else "?"
    if args.exc_value is None:
        return
    structlog.get_logger().error(
        "thread_crashed",
        thread=name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` (an exception in ``__del__``, a finalizer, a callback
    nobody can catch): an ``unraisable_exception`` event, redacted like every other,
    instead of Python's own print to stderr."""
    exc = unraisable.exc_value
    fields: dict[str, Any] = {"message": unraisable.err_msg or "Exception ignored in"}
    if unraisable.object is not None:
        try:
            fields["object"] = repr(unraisable.object)
        except Exception:
            fields["object"] = "<unrepresentable>"
    if exc is not None:
        fields["exc_info"] = (unraisable.exc_type, exc, unraisable.exc_traceback)
    structlog.get_logger().error("unraisable_exception", **fields)

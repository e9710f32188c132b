"""What libraries say in an inspection worker process, handed back to the daemon's log.

A worker of the inspection pool has no logging of its own: Python warnings, ``logging``
records and text that C libraries write straight to file descriptors 1 and 2 (libtiff) would
reach the daemon's stderr as plain text. :class:`Capture` collects them file by file as
:class:`Note` s, which :mod:`dropcut.admit` logs as JSON events naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

NOTES_PER_FILE = 20  # what libraries say about one file, at most (then how many more)
NOTE_CHARS = 4000  # one note's message, at most


@dataclass(frozen=True, slots=True)
class Note:
    """Something a library said while :func:`dropcut.inspect.inspect_some` inspected in a process of its
    own (``capture=True``), handed back for the daemon to log:

    * ``kind="warning"``: a Python warning; ``source`` its category, ``where`` file:line;
    * ``kind="log"``: a ``logging`` record; ``source`` the logger, ``exception`` its
      traceback if it has one;
    * ``kind="output"``: text written straight to stdout or stderr (libtiff writes its
      errors there); ``source`` is ``"stdout/stderr"``.

    ``rel_path`` is the file being inspected, None between files."""

    rel_path: str | None
    kind: str
    source: str
    level: str
    message: str
    where: str | None = None
    exception: str | None = None


def _clip(text: str) -> str:
    return text if len(text) <= NOTE_CHARS else text[:NOTE_CHARS] + f"... ({len(text)} characters)"


class Capture(logging.Handler):
    """Collects, file by file, what libraries say while files are inspected: Python
    warnings, ``logging`` records and whatever is written to file descriptors 1 and 2.

    Only for a process that does nothing else meanwhile (a worker of the inspection
    pool): it redirects the process's stdout and stderr and records every warning, which
    would steal the output and warnings of other threads."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)  # as the daemon's root logger (see dropcut.logs)
        self.notes: list[Note] = []
        self._rel: str | None = None
        self._count = 0  # notes about the current file
        self._dropped = 0
        self._sink = -1
        self._saved: list[tuple[int, int]] = []  # (fd, its duplicate to put back)
        self._root_level = logging.NOTSET

    # --- the process's stdout and stderr, its root logger ----------------------------

    def __enter__(self) -> Capture:
        _flush_std()
        try:
            self._sink = os.memfd_create("dropcut-inspect-output", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            try:
                self._sink = _temporary_fd()
            except OSError:
                self._sink = -1  # inspect anyway; output (if any) goes where it went
        if self._sink >= 0:
            for fd in (1, 2):
                try:
                    saved = os.dup(fd)
                except OSError:
                    continue  # not open: nothing to put back
                os.dup2(self._sink, fd)
                self._saved.append((fd, saved))
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(min(root.level, logging.INFO))
        root.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._root_level)
        self._take_output()
        for fd, saved in self._saved:
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = []
        if self._sink >= 0:
            os.close(self._sink)
            self._sink = -1

    def _take_output(self) -> None:
        """What was written to stdout or stderr since last time, as one note."""
        if self._sink < 0:
            return
        _flush_std()
        size = os.fstat(self._sink).st_size
        if not size:
            return
        data = os.pread(self._sink, min(size, NOTE_CHARS), 0)
        os.ftruncate(self._sink, 0)
        os.lseek(self._sink, 0, os.SEEK_SET)  # the offset is shared with fds 1 and 2
        text = data.decode("utf-8", "replace").strip()
        if size > len(data):
            text += f"... ({size} bytes)"
        if text:
            self._add("output", "stdout/stderr", "warning", text)

    # --- per file ----------------------------------------------------------------

    @contextlib.contextmanager
    def file(self, rel: str) -> Iterator[None]:
        """Notes made inside are about ``rel``."""
        self._take_output()  # written before this file: not about it
        self._rel, self._count, self._dropped = rel, 0, 0
        caught: list[warnings.WarningMessage] = []
        try:
            # Every warning is recorded and none printed (the filters in force still
            # apply: once per place and file, and an "error" filter still raises).
            with warnings.catch_warnings(record=True) as recorded:
                caught = recorded
                yield
        finally:
            for w in caught:
                where = f"{w.filename}:{w.lineno}"
                self._add("warning", w.category.__name__, "warning", str(w.message), where=where)
            self._take_output()
            if self._dropped:
                self._count = 0
                self._add("log", __name__, "warning", f"{self._dropped} more notes on this file left out")
            self._rel = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exception = None
            if record.exc_info and record.exc_info[1] is not None:
                exception = logging.Formatter().formatException(record.exc_info)
            level = record.levelname.lower()
            level = level if level in ("debug", "info", "warning", "error", "critical") else "info"
            self._add("log", record.name, level, record.getMessage(), exception=exception)
        except Exception:
            self.handleError(record)

    def _add(
        self,
        kind: str,
        source: str,
        level: str,
        message: str,
        *,
        where: str | None = None,
        exception: str | None = None,
    ) -> None:
        if self._rel is not None:
            if self._count >= NOTES_PER_FILE:
                self._dropped += 1
                return
            self._count += 1
        clipped = None if exception is None else _clip(exception)
        self.notes.append(Note(self._rel, kind, source, level, _clip(message), where, clipped))


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _temporary_fd() -> int:
    with tempfile.TemporaryFile() as tmp:
        return os.dup(tmp.fileno())

"""Notifications: people hear about what needs them without reading the logs.

Messages are one JSON object each (schema below), sent to ``notify_command`` (run with the
JSON on its standard input) and/or ``notify_url`` (an HTTP POST of the same bytes). Neither
ever stops the daemon: :meth:`Notifications.emit` never blocks and never raises, a failed
delivery is logged (``notify_failed``) and dropped, and every wait has a time limit.

The pure part (no I/O): the message builders (:func:`file_quarantined`,
:func:`condition_message`, :func:`credit_low`, :func:`budget_reached`, :func:`batch_held`),
:class:`QuarantineBatch` (the batching decision, its clock handed in), :func:`payload`
(the bytes sent: stamped, scrubbed of secrets, always valid UTF-8 JSON),
:func:`child_environment` and :func:`retry_delay`. The rest, :class:`Notifications`, runs
them on the event loop.

The message (``"schema": 1``; every message has the first five keys):

========================  ====================================================================
``schema``                1 (a change that breaks a receiver gets a new number)
``event``                 one of :data:`EVENTS`
``at``                    when it happened, ISO 8601 local time with offset
``host``                  the machine's name
``summary``               one human sentence (what a chat message or a mail subject shows)
files_quarantined         ``count`` (files quarantined since the last message), ``files``
                          (the first :data:`MAX_LISTED` of them, each ``{file, code, detail,
                          status, at}``), ``codes`` (``{code: how many}`` over all ``count``)
condition_started/ended   ``code``, ``detail``, ``since`` (ISO), ``lasted_s``, ``waiting``
credit_low                ``credit``, ``warn_below``
budget_reached            ``budget``, ``period`` (``day`` | ``month``), ``resets_at`` (ISO),
                          ``waiting``
batch_held                ``folder`` (relative to the inbox, ``""`` = the inbox itself),
                          ``held``, ``credits``, ``seconds``
========================  ====================================================================

Batching (:class:`QuarantineBatch`): quarantined files are collected and sent together,
at most one message per ``notify_batch_seconds``; the first file of a quiet period opens
the window and the message goes when it closes (trailing, not leading: a folder of bad
files, or an outage that exhausts the retries of many files, arrives over seconds, and
should be one message, not a lone first file followed by the rest; a quarantined file
waits safely in the quarantine, so a minute's delay costs nothing, while the urgent
events, which need someone to act, go at once). ``notify_batch_seconds = 0``: each file
is sent on its own, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import httpx
import structlog

from dropcut import __version__
from dropcut.conditions import Condition, Report
from dropcut.logs import Redactor
from dropcut.overview import human_duration, iso, sentence

if TYPE_CHECKING:
    from dropcut.settings import Settings

SCHEMA = 1
EVENTS = (
    "files_quarantined",
    "condition_started",
    "condition_ended",
    "credit_low",
    "budget_reached",
    "batch_held",
)
ENVELOPE = ("schema", "event", "at", "host", "summary")
"""The keys every message has, in this order; then the event's own fields."""

FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "files_quarantined": ("count", "files", "codes"),
        "condition_started": ("code", "detail", "since", "lasted_s", "waiting"),
        "condition_ended": ("code", "detail", "since", "lasted_s", "waiting"),
        "credit_low": ("credit", "warn_below"),
        "budget_reached": ("budget", "period", "resets_at", "waiting"),
        "batch_held": ("folder", "held", "credits", "seconds"),
    }
)
"""Each event's own fields (after :data:`ENVELOPE`), as documented in the README."""

FILE_FIELDS = ("file", "code", "detail", "status", "at")
"""The fields of one entry of ``files`` in ``files_quarantined``."""

QUARANTINED = "file_quarantined"
"""The event :func:`file_quarantined` makes: handed to :meth:`Notifications.emit`, it goes
into the batch (receivers only ever see ``files_quarantined``)."""

MAX_LISTED = 100  # files listed in one message (``count`` and ``codes`` count them all)
MAX_DETAIL = 500  # characters of a file's detail
SUMMARY_NAMES = 3  # files named in the summary
MAX_OUTPUT = 2000  # characters of a command's stdout / stderr kept in the log event
MAX_QUEUED = 100  # messages waiting per receiver; more: the oldest is dropped
CLOSE_GRACE_SECONDS = 5.0
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
KILL_WAIT_SECONDS = 2.0  # for a killed command to be gone
ANSWER_BYTES = 1024  # of an HTTP receiver's answer, kept for the log

STRIPPED_NAMES = frozenset({"CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"})
"""Variables a command never gets: where systemd keeps the credentials, and what would let
it speak to systemd for the daemon. So are ``DROPCUT_*`` (any case) and every variable
whose value holds a secret."""


# --- options ------------------------------------------------------------------------------


def parse_command(text: str) -> list[str]:
    """``notify_command`` as the argv it runs (``shlex`` rules, no shell); ``[]`` for an
    empty one. Raises ``ValueError`` naming the problem (an unclosed quote)."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"notify_command cannot be split into words: {exc}") from None


def check_url(text: str) -> str:
    """``notify_url`` stripped (``""``: none). Raises ``ValueError`` unless it is an
    ``http://`` or ``https://`` URL with a host."""
    text = text.strip()
    if not text:
        return ""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"notify_url is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("notify_url must be an http:// or https:// URL with a host")
    return text


@dataclass(frozen=True)
class NotifyOptions:
    """The settings of the notifications (``notify_*``), checked.

    ``command``: run once a message, the JSON on its stdin (``""``: none); ``url``: POSTed
    to (``""``: none); ``batch_seconds`` (≥ 0): at most one ``files_quarantined`` message
    this often; ``timeout_seconds`` (> 0): the time limit of one run of the command, of one
    try of the URL; ``retries`` (≥ 0): tries of the URL after the first.

    Raises ``ValueError`` naming the setting that is wrong.
    """

    command: str = ""
    url: str = ""
    batch_seconds: float = 60.0
    timeout_seconds: float = 10.0
    retries: int = 3

    def __post_init__(self) -> None:
        parse_command(self.command)
        object.__setattr__(self, "url", check_url(self.url))
        if not self.batch_seconds >= 0:
            raise ValueError(f"notify_batch_seconds {self.batch_seconds}: expected >= 0")
        if not self.timeout_seconds > 0:
            raise ValueError(f"notify_timeout_seconds {self.timeout_seconds}: expected > 0")
        if self.retries < 0:
            raise ValueError(f"notify_retries {self.retries}: expected >= 0")

    @classmethod
    def of(cls, settings: Settings) -> NotifyOptions:
        """The ``notify_*`` settings. Raises ``ValueError`` as the constructor does."""
        return cls(
            command=settings.notify_command,
            url=settings.notify_url,
            batch_seconds=settings.notify_batch_seconds,
            timeout_seconds=settings.notify_timeout_seconds,
            retries=settings.notify_retries,
        )

    @property
    def argv(self) -> list[str]:
        return parse_command(self.command)

    @property
    def enabled(self) -> bool:
        """Is there anywhere to send to?"""
        return bool(self.argv or self.url)


# --- the messages -------------------------------------------------------------------------


def message(event: str, summary: str, *, now: float, **fields: Any) -> dict[str, Any]:
    """A message without ``host`` (the sender stamps it): ``schema``, ``event``, ``at``
    (``now``, wall seconds), ``summary``, then ``fields``."""
    return {"schema": SCHEMA, "event": event, "at": iso(now), "summary": summary, **fields}


def file_quarantined(
    file: str, code: str, detail: str, *, status: int | None = None, now: float
) -> dict[str, Any]:
    """One quarantined file (``file`` relative to the inbox), for :meth:`Notifications.emit`,
    which adds it to the batch."""
    return {
        "event": QUARANTINED,
        "file": file,
        "code": code,
        "detail": _cut(detail, MAX_DETAIL),
        "status": status,
        "at": iso(now),
    }


def files_quarantined(
    files: Sequence[Mapping[str, Any]],
    *,
    count: int | None = None,
    codes: Mapping[str, int] | None = None,
    now: float,
) -> dict[str, Any]:
    """The batch message: ``files`` (entries with :data:`FILE_FIELDS`), ``count`` all the
    files (default ``len(files)``: more may have been quarantined than are listed),
    ``codes`` how many of each code (default: counted over ``files``)."""
    listed = [{k: f.get(k) for k in FILE_FIELDS} for f in files]
    total = len(listed) if count is None else count
    by_code = dict(codes) if codes is not None else dict(Counter(str(f["code"]) for f in listed))
    names = [f"{f['file']} ({f['code']})" for f in listed[:SUMMARY_NAMES]]
    if total == 1 and listed:
        f = listed[0]
        summary = f"{f['file']} was quarantined: {f['code']}" + (f" — {f['detail']}" if f["detail"] else "")
    else:
        more = total - len(names)
        summary = (
            f"{total} files were quarantined: " + ", ".join(names) + (f" and {more} more" if more else "")
        )
    return message("files_quarantined", summary, now=now, count=total, files=listed, codes=by_code)


_ENDED = {
    "api_unreachable": "the API can be reached again",
    "account_paused": "the API accepts the account again; the queue goes on",
    "disk_full": "the disk has room again; the queue goes on",
    "outbox_unwritable": "the outbox takes writes again; the queue goes on",
    "watch_degraded": "the inbox is watched again",
    "budget_reached": "the budget allows requests again; the queue goes on",
    "batch_held": "the held batch was approved or discarded",
}


def condition_started(condition: Condition, *, now: float) -> dict[str, Any]:
    """A condition began (the queue paused, the API unreachable…): ``dropcut status``'s
    sentence as the summary."""
    return message(
        "condition_started",
        sentence(condition, now),
        now=now,
        **_condition_fields(condition, max(0.0, now - condition.since)),
    )


def condition_ended(condition: Condition, *, lasted: float, now: float) -> dict[str, Any]:
    """A condition is over (the queue resumed…), after ``lasted`` seconds."""
    what = _ENDED.get(condition.code, f"{condition.code.replace('_', ' ')} is over")
    summary = f"{what} (after {human_duration(lasted)})"
    if condition.waiting:
        summary += f"; {condition.waiting} file{'s' if condition.waiting != 1 else ''} wait"
    return message("condition_ended", summary, now=now, **_condition_fields(condition, lasted))


def condition_message(report: Report, *, now: float) -> dict[str, Any] | None:
    """The message for one of :class:`~dropcut.conditions.ConditionBoard`'s reports: its
    start and its end; None for ``continues`` (the log repeats those, people are not)."""
    if report.kind == "started":
        return condition_started(report.condition, now=now)
    if report.kind == "ended":
        return condition_ended(report.condition, lasted=report.lasted, now=now)
    return None


def _condition_fields(c: Condition, lasted: float) -> dict[str, Any]:
    return {
        "code": c.code,
        "detail": c.detail,
        "since": iso(c.since),
        "lasted_s": round(lasted),
        "waiting": c.waiting,
    }


def credit_low(credit: int | None, warn_below: int, *, now: float) -> dict[str, Any]:
    summary = (
        f"the API credit is low: {credit if credit is not None else 'none'} left (warning below {warn_below})"
    )
    return message("credit_low", summary, now=now, credit=credit, warn_below=warn_below)


def budget_reached(
    budget: int, period: Literal["day", "month"], resets_at: float, waiting: int, *, now: float
) -> dict[str, Any]:
    """The ``budget`` of requests a ``period`` is spent; the queue waits until ``resets_at``
    (wall seconds)."""
    summary = (
        f"the budget of {budget} requests a {period} is spent: the queue is paused until {iso(resets_at)}"
    )
    if waiting:
        summary += f"; {waiting} file{'s' if waiting != 1 else ''} wait"
    return message(
        "budget_reached",
        summary,
        now=now,
        budget=budget,
        period=period,
        resets_at=iso(resets_at),
        waiting=waiting,
    )


def batch_held(folder: str, held: int, credits: int, seconds: float, *, now: float) -> dict[str, Any]:
    """``held`` new files of ``folder`` (relative to the inbox; ``""`` the inbox itself)
    wait for approval: sending them would cost ``credits`` and take ``seconds`` at the
    allowance."""
    where = f"{folder}/" if folder not in ("", ".") else "the inbox"
    arg = f" {shlex.quote(folder)}" if folder not in ("", ".") else ""
    summary = (
        f"{held} new file{'s' if held != 1 else ''} in {where} are held: sending them would cost "
        f"{credits} credits and take about {human_duration(seconds)}; run `dropcut approve{arg}` "
        f"or `dropcut discard{arg}`"
    )
    return message(
        "batch_held", summary, now=now, folder=folder, held=held, credits=credits, seconds=round(seconds)
    )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- batching -----------------------------------------------------------------------------


class QuarantineBatch:
    """The quarantined files not yet told, and when to tell them (pure: ``now`` is handed
    in, wall seconds).

    The first file after a message opens a window of ``window`` seconds; when it closes,
    :meth:`take` gives one ``files_quarantined`` message for every file of the window.
    Two messages are thus at least ``window`` apart, and no file waits longer than
    ``window``. The first :data:`MAX_LISTED` files are listed; all are counted.
    Raises ``ValueError`` for a window < 0.
    """

    def __init__(self, window: float, *, max_listed: int = MAX_LISTED) -> None:
        self.window = window
        self._max_listed = max_listed
        self._files: list[dict[str, Any]] = []
        self._codes: Counter[str] = Counter()
        self._count = 0
        self._opened: float | None = None

    @property
    def window(self) -> float:
        return self._window

    @window.setter
    def window(self, seconds: float) -> None:
        """A new window applies to the files waiting too (a shorter one sends sooner)."""
        if not seconds >= 0:
            raise ValueError(f"batch window {seconds}: expected >= 0 seconds")
        self._window = float(seconds)

    @property
    def count(self) -> int:
        """Files waiting."""
        return self._count

    def add(self, entry: Mapping[str, Any], now: float) -> float:
        """Add one file (a :func:`file_quarantined` event, or its :data:`FILE_FIELDS`);
        returns when the batch is due."""
        if self._opened is None:
            self._opened = now
        self._count += 1
        self._codes[str(entry.get("code"))] += 1
        if len(self._files) < self._max_listed:
            self._files.append({k: entry.get(k) for k in FILE_FIELDS})
        return self._opened + self._window

    def due(self) -> float | None:
        """When the waiting files are to be sent; None when none wait."""
        return None if self._opened is None else self._opened + self._window

    def take(self, now: float, *, force: bool = False) -> dict[str, Any] | None:
        """The message for the waiting files if it is due at ``now`` (or ``force``: at a
        stop), and a new empty batch; else None."""
        due = self.due()
        if due is None or (now < due and not force):
            return None
        out = files_quarantined(self._files, count=self._count, codes=dict(self._codes), now=now)
        self._files, self._codes, self._count, self._opened = [], Counter(), 0, None
        return out


# --- what is sent -------------------------------------------------------------------------


def _valid_text(value: Any) -> Any:
    """Strings made encodable (a file name's undecodable bytes, kept by Python as lone
    surrogates, become U+FFFD), inside dicts and lists too."""
    if isinstance(value, str):
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    return value


def payload(event: Mapping[str, Any], *, host: str, redactor: Redactor) -> bytes:
    """The bytes sent for ``event``: one line of UTF-8 JSON, keys :data:`ENVELOPE` first
    (``schema`` and ``host`` stamped, ``at`` and ``summary`` kept or filled in), every
    secret of ``redactor`` replaced by ``[redacted]`` — in the values, and in the text
    again in any escaped spelling.

    Raises ``ValueError`` when a secret could only be removed by breaking the JSON (it
    straddles a value's quotes, or is a number): such a message is not sent.
    """
    body = {k: v for k, v in event.items() if k not in ENVELOPE}
    name = str(event.get("event") or "unknown")
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "event": name,
        "at": event.get("at") or iso(time.time()),
        "host": host,
        "summary": event.get("summary") or name.replace("_", " "),
        **body,
    }
    # plain JSON values first (a Path, a datetime as text), so that every string is seen
    plain = json.loads(json.dumps(data, default=str, allow_nan=False))
    clean = redactor.scrub(_valid_text(plain))
    text = json.dumps(clean, ensure_ascii=False, separators=(",", ":"))
    scrubbed = redactor.scrub_text(text)
    if scrubbed != text:
        try:
            json.loads(scrubbed)
        except ValueError:
            raise ValueError("a secret cannot be removed from this message without breaking it") from None
    return (scrubbed + "\n").encode("utf-8")


def child_environment(environ: Mapping[str, str], redactor: Redactor) -> dict[str, str]:
    """``environ`` for the command: without ``DROPCUT_*`` (any case), the variables of
    :data:`STRIPPED_NAMES`, and any variable whose name or value holds a secret of
    ``redactor`` (in any spelling it redacts)."""
    out = {}
    for name, value in environ.items():
        if name.upper().startswith("DROPCUT_") or name in STRIPPED_NAMES:
            continue
        if redactor.scrub(name) != name or redactor.scrub(value) != value:
            continue
        out[name] = value
    return out


def retry_delay(attempt: int, base: float = RETRY_BASE_SECONDS, cap: float = RETRY_MAX_SECONDS) -> float:
    """Seconds to wait after failed try number ``attempt`` (1-based): ``base``, doubling,
    at most ``cap``."""
    return float(min(cap, base * 2 ** max(0, attempt - 1)))


def _origin(url: str) -> str:
    """Where a URL goes, without its path and query (a webhook's path is its secret)."""
    u = httpx.URL(url)
    return f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")


# --- delivery -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    event: str
    body: bytes


class _Channel:
    """One receiver: its queue of messages and the task that delivers them in order."""

    receiver = ""

    def __init__(self, owner: Notifications, max_queued: int) -> None:
        self.owner = owner
        self.queue: asyncio.Queue[_Message] = asyncio.Queue(maxsize=max_queued)
        self.task: asyncio.Task[None] | None = None
        self.busy = False

    def put(self, msg: _Message) -> None:
        if self.queue.full():
            old = self.queue.get_nowait()
            self.queue.task_done()
            self.owner._dropped(old, self.receiver, "too many messages waiting")
        self.queue.put_nowait(msg)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"notify-{self.receiver}")

    async def _run(self) -> None:
        while True:
            msg = await self.queue.get()
            self.busy = True
            try:
                await self.deliver(msg)
            except Exception as exc:  # a bug here must not end the deliveries
                self.owner._failed(
                    msg, self.receiver, reason="internal", detail=f"{type(exc).__name__}: {exc}"
                )
            finally:
                self.busy = False
                self.queue.task_done()

    def waiting(self) -> int:
        return self.queue.qsize() + (1 if self.busy else 0)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        await self.close()

    async def close(self) -> None:
        pass

    async def deliver(self, msg: _Message) -> None:
        raise NotImplementedError


class _CommandChannel(_Channel):
    receiver = "command"

    async def deliver(self, msg: _Message) -> None:
        owner = self.owner
        argv = owner.options.argv
        if not argv:
            return
        limit = owner.options.timeout_seconds
        target = argv[0]
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=child_environment(owner.environ(), owner.redactor),
                start_new_session=True,  # its own process group: a time limit kills it all
            )
        except OSError as exc:
            owner._failed(
                msg, self.receiver, target=target, reason="cannot_start", detail=exc.strerror or str(exc)
            )
            return
        try:
            out, err, code = await asyncio.wait_for(_talk(proc, msg.body), limit)
        except TimeoutError:
            await _kill(proc)
            owner._failed(
                msg,
                self.receiver,
                target=target,
                reason="timeout",
                detail=f"still running after {limit:g} s (notify_timeout_seconds): killed",
                pid=proc.pid,
            )
            return
        finally:
            if proc.returncode is None:  # cancelled (a stop): nothing may outlive us
                await _kill(proc)
        fields = {"stdout": owner._output(out), "stderr": owner._output(err)}
        fields = {k: v for k, v in fields.items() if v}
        duration_ms = round((time.monotonic() - started) * 1000)
        if code == 0:
            owner._sent(msg, self.receiver, target=target, duration_ms=duration_ms, **fields)
        else:
            owner._failed(
                msg,
                self.receiver,
                target=target,
                reason="exit_status",
                returncode=code,
                duration_ms=duration_ms,
                **fields,
            )


async def _talk(proc: asyncio.subprocess.Process, body: bytes) -> tuple[bytes, bytes, int]:
    """Write ``body`` to the command's stdin, keep the start of its stdout and stderr (the
    rest is read and dropped: a chatty command cannot fill the memory), wait for its exit."""

    async def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(body)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):  # it did not read it all: its business
            pass
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    assert proc.stdout is not None and proc.stderr is not None
    out, err, _ = await asyncio.gather(_read_capped(proc.stdout), _read_capped(proc.stderr), feed())
    return out, err, await proc.wait()


async def _read_capped(stream: asyncio.StreamReader, cap: int = MAX_OUTPUT * 4) -> bytes:
    """The first ``cap`` bytes of ``stream`` (enough for :data:`MAX_OUTPUT` characters of
    any UTF-8), read to its end."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
    return bytes(kept)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (what it started too), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()  # in case it left its group
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), KILL_WAIT_SECONDS)


class _UrlChannel(_Channel):
    receiver = "url"

    def __init__(self, owner: Notifications, max_queued: int) -> None:
        super().__init__(owner, max_queued)
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def deliver(self, msg: _Message) -> None:
        owner = self.owner
        url = owner.options.url
        if not url:
            return
        target = _origin(url)
        tries = owner.options.retries + 1
        for attempt in range(1, tries + 1):
            limit = owner.options.timeout_seconds
            started = time.monotonic()
            retryable = True
            status: int | None = None
            try:
                code, answer = await asyncio.wait_for(self._post(url, msg.body, limit), limit)
            except (TimeoutError, httpx.TimeoutException):
                reason, detail = "timeout", f"no answer within {limit:g} s (notify_timeout_seconds)"
            except httpx.HTTPError as exc:
                reason, detail = "transport", f"{type(exc).__name__}: {exc}".replace(url, target)
            else:
                status = code
                if 200 <= code < 300:
                    owner._sent(
                        msg,
                        self.receiver,
                        target=target,
                        status=code,
                        attempt=attempt,
                        duration_ms=round((time.monotonic() - started) * 1000),
                    )
                    return
                reason, detail = "http_status", f"HTTP {code}" + (f": {answer}" if answer else "")
                retryable = code in (408, 425, 429) or code >= 500
            last = attempt >= tries or not retryable
            delay = None if last else retry_delay(attempt, owner.retry_base_seconds, owner.retry_max_seconds)
            owner._failed(
                msg,
                self.receiver,
                target=target,
                reason=reason,
                detail=detail,
                status=status,
                attempt=attempt,
                tries=tries,
                retry_in_s=delay,
                given_up=last,
            )
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def _post(self, url: str, body: bytes, limit: float) -> tuple[int, str]:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False, headers={"User-Agent": f"dropcut/{__version__}"}
            )
        async with self._client.stream(
            "POST", url, content=body, headers={"Content-Type": "application/json"}, timeout=limit
        ) as response:
            head = bytearray()
            async for chunk in response.aiter_raw():
                head += chunk
                if len(head) >= ANSWER_BYTES:
                    break
            return response.status_code, bytes(head[:ANSWER_BYTES]).decode("utf-8", "replace").strip()


class Notifications:
    """Sends the messages (see the module's text) to the command and / or the URL of
    ``options``, each receiver on its own task with its own queue, so that one that hangs
    or fails holds up neither the other nor the daemon.

    ``secrets``: what must never leave (the API key, the status page's token): stripped
    from every message and from the command's environment (see :func:`child_environment`).
    ``host``: the machine's name in the messages (default: ``socket.gethostname()``).
    ``clock``: wall seconds (the daemon's :class:`~dropcut.clock.RunClock`), for ``at`` and
    the batch window. ``max_queued``: messages waiting per receiver. ``retry_base_seconds``,
    ``retry_max_seconds``: the URL's backoff. ``environ``: the environment the command's is
    made from (default: ``os.environ`` as it is at each run).

    Use: :meth:`start` on the event loop, :meth:`emit` from anywhere, :meth:`apply` after a
    reload, ``await`` :meth:`aclose` at the stop. Raises ``ValueError`` only for
    ``max_queued`` < 1.
    """

    def __init__(
        self,
        options: NotifyOptions | None = None,
        *,
        secrets: Iterable[str | None] = (),
        host: str | None = None,
        clock: Callable[[], float] = time.time,
        max_queued: int = MAX_QUEUED,
        retry_base_seconds: float = RETRY_BASE_SECONDS,
        retry_max_seconds: float = RETRY_MAX_SECONDS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued {max_queued}: expected >= 1")
        self.options = options or NotifyOptions()
        self.redactor = Redactor()
        self.redactor.set_secrets(*secrets)
        self.host = host or socket.gethostname()
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self._clock = clock
        self._max_queued = max_queued
        self._environ = environ
        self._batch = QuarantineBatch(self.options.batch_seconds)
        self._channels: dict[str, _Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._stopping: set[asyncio.Task[None]] = set()
        self._log = structlog.get_logger()
        self.sent = 0
        """Deliveries that succeeded (one message to one receiver)."""
        self.failed = 0
        """Deliveries given up (after the URL's retries)."""
        self.dropped = 0
        """Messages dropped before delivery: too many waiting, or no safe payload."""
        self._sync_channels()

    # --- the daemon's side ------------------------------------------------------------

    def start(self) -> None:
        """Start delivering (on the running event loop). Idempotent."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        for channel in self._channels.values():
            channel.start()
        self._schedule_flush()

    def emit(self, event: Mapping[str, Any]) -> None:
        """Send ``event`` (a message of the builders above; :func:`file_quarantined` goes
        into the batch). Never blocks, never raises; callable from any thread. Does
        nothing when no receiver is set or after :meth:`aclose`."""
        try:
            if self._closed or not self.options.enabled:
                return
            if self._loop is not None and threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(self._emit, dict(event))
            else:
                self._emit(dict(event))
        except Exception as exc:  # never let a notification harm the caller
            self._log_failed(
                str(event.get("event")) if isinstance(event, Mapping) else "?",
                "all",
                reason="internal",
                detail=f"{type(exc).__name__}: {exc}",
            )

    def apply(self, options: NotifyOptions, *, secrets: Iterable[str | None] | None = None) -> None:
        """Put new settings in force (a reload): receivers added or removed (the messages
        waiting for a removed one are dropped), a changed command or URL used from the next
        message on, a new batch window for the files waiting too. ``secrets``: the new
        ones (None: keep). Call it on the event loop (the daemon's reload runs there)."""
        self.options = options
        if secrets is not None:
            self.redactor.set_secrets(*secrets)
        self._batch.window = options.batch_seconds
        self._sync_channels()
        if self._loop is not None and not self._closed:
            self._schedule_flush()

    async def aclose(self, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Stop: send the files waiting in the batch, deliver what is queued for at most
        ``grace`` seconds, then give up the rest (``notify_abandoned``), killing a command
        still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        final = self._batch.take(self._clock(), force=True)
        if final is not None:
            self._send(final)
        if not self._channels:
            return
        self.start()
        joins = [asyncio.ensure_future(c.queue.join()) for c in self._channels.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*joins), grace)
        for join in joins:
            join.cancel()
        abandoned = {name: c.waiting() for name, c in self._channels.items() if c.waiting()}
        for channel in self._channels.values():
            await channel.stop()
        if abandoned:
            self.dropped += sum(abandoned.values())
            self._log.warning("notify_abandoned", waiting=abandoned, grace_s=grace)

    # --- inside -----------------------------------------------------------------------

    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def _sync_channels(self) -> None:
        wanted = {"command": bool(self.options.argv), "url": bool(self.options.url)}
        kinds: dict[str, type[_Channel]] = {"command": _CommandChannel, "url": _UrlChannel}
        for name, on in wanted.items():
            channel = self._channels.get(name)
            if on and channel is None:
                channel = self._channels[name] = kinds[name](self, self._max_queued)
                if self._loop is not None and not self._closed:
                    channel.start()
            elif not on and channel is not None:
                del self._channels[name]
                lost = channel.queue.qsize()
                if lost:
                    self.dropped += lost
                    self._log.info("notify_dropped", receiver=name, count=lost, reason="receiver removed")
                if self._loop is not None and channel.task is not None:
                    stopping = self._loop.create_task(channel.stop())
                    self._stopping.add(stopping)  # held until done (the loop keeps weak references)
                    stopping.add_done_callback(self._stopping.discard)
                # never started: nothing runs, nothing to close

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            if event.get("event") == QUARANTINED:
                first = self._batch.count == 0
                self._batch.add(event, self._clock())
                if first:
                    self._schedule_flush()
                return
            self._send(event)
        except Exception as exc:
            self._log_failed(
                str(event.get("event")), "all", reason="internal", detail=f"{type(exc).__name__}: {exc}"
            )

    def _schedule_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._batch.due()
        if due is None or self._loop is None:
            return
        self._timer = self._loop.call_later(max(0.0, due - self._clock()), self._flush)

    def _flush(self) -> None:
        self._timer = None
        msg = self._batch.take(self._clock())
        if msg is None:
            self._schedule_flush()  # the clocks disagree by a hair: a little later
        else:
            self._send(msg)

    def _send(self, event: Mapping[str, Any]) -> None:
        name = str(event.get("event") or "unknown")
        try:
            body = payload(event, host=self.host, redactor=self.redactor)
        except ValueError as exc:
            self.dropped += 1
            self._log.warning("notify_dropped", kind=name, reason=str(exc))
            return
        msg = _Message(name, body)
        for channel in self._channels.values():
            channel.put(msg)

    def _output(self, data: bytes) -> str:
        text = data.decode("utf-8", "replace").strip()
        return self.redactor.scrub_text(_cut(text, MAX_OUTPUT))

    def _sent(self, msg: _Message, receiver: str, **fields: Any) -> None:
        self.sent += 1
        self._log.info("notify_sent", kind=msg.event, receiver=receiver, **fields)

    def _failed(self, msg: _Message, receiver: str, **fields: Any) -> None:
        if fields.get("given_up", True):
            self.failed += 1
        self._log_failed(msg.event, receiver, **fields)

    def _log_failed(self, kind: str, receiver: str, **fields: Any) -> None:
        fields = {k: self.redactor.scrub(v) for k, v in fields.items() if v is not None or k == "retry_in_s"}
        self._log.warning("notify_failed", kind=kind, receiver=receiver, **fields)

    def _dropped(self, msg: _Message, receiver: str, reason: str) -> None:
        self.dropped += 1
        self._log.warning(
            "notify_dropped", kind=msg.event, receiver=receiver, reason=reason, dropped=self.dropped
        )

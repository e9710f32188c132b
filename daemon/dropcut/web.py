"""The HTTP side: the status page (``/``), its thumbnails (``/thumb/<job>/<before|after>``),
its Retry button (``POST /retry``) and the Prometheus metrics (``/metrics``), on
``http_listen`` (``127.0.0.1:9840`` by default; ``""``: none of it).

The server is the standard library's threaded HTTP server on daemon threads: each request
reads the queue database on a connection of its own (read-only; the Retry button's
request opens a writable one, as ``dropcut retry`` does from another process), so the
event loop never waits for the page, and the page never waits for the event loop.

Security
--------
* **Who may ask.** Bound to loopback without a token, only requests whose ``Host`` names a
  loopback address (or ``localhost``, or the bound address) are answered: a web page cannot
  reach the listener by pointing a name of its own at 127.0.0.1 (DNS rebinding). With
  ``http_token`` set (required for any other address: :func:`dropcut.settings.startup_problems`),
  every request carries it: ``Authorization: Bearer <token>`` (a Prometheus scrape), or a
  session cookie set when the page is opened once as ``/?token=<token>``; that visit is
  redirected to ``/`` at once, so the token leaves the address bar and the history. The
  cookie (``HttpOnly; SameSite=Strict``) holds an HMAC of the token, not the token.
  Compared with :func:`hmac.compare_digest`.
* **Retry is a POST** with a CSRF field (an HMAC of a secret drawn when the process
  starts) *and* an ``Origin`` (or, lacking one, ``Referer``) naming this very host; any
  other request to ``/retry`` is refused (403), and nothing moves.
* **What the page shows.** Names below the inbox, outbox and quarantine only; error
  details are scrubbed of the API key and the token, of the configured folders' absolute
  paths (shown as ``inbox/…``) and of any other absolute path. A thumbnail is found from
  the job's record, never from a name in the URL (:mod:`dropcut.thumbs`).
* **Headers.** ``Content-Security-Policy: default-src 'none'`` (images from this server,
  inline style only, no script, forms only to this server, no framing),
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin``,
  ``Cache-Control: no-store`` for the page. Nothing is logged per request: a URL may hold
  the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import math
import os
import re
import secrets
import socket
import socketserver
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog
from pydantic import SecretStr

from dropcut import __version__
from dropcut.metrics import CONTENT_TYPE as METRICS_TYPE
from dropcut.metrics import Metrics
from dropcut.overview import Overview, clock_time, human_duration, read_overview, sentence
from dropcut.paths import Layout
from dropcut.pgqueue import DB_ERRORS, UNAVAILABLE, PgJobQueue, Queue
from dropcut.queue import Job, JobQueue, connect
from dropcut.retry import quarantined_as, retry_job
from dropcut.settings import ConfigError, Settings, is_loopback
from dropcut.thumbs import Kind, Thumbnails

PAGE_SIZE = 24
"""Outputs (and quarantined files) a page shows."""
REFRESH_SECONDS = 10
COOKIE = "dropcut_session"
COOKIE_SECONDS = 30 * 86400
MAX_BODY = 4096  # bytes of a POST (the Retry form is ~150)
REQUEST_TIMEOUT = 15.0  # seconds a connection may take for a request (a slow client)
OUTPUT_STATES = ("published", "done")
THUMB = re.compile(r"^/thumb/([0-9]{1,18})/(before|after)$")
NOTES = {
    "retried": "The file is back in the inbox and will be sent again.",
    "gone": "That file is no longer in the quarantine.",
    "failed": "The file could not be moved back to the inbox (see the log).",
    "unavailable": "The shared queue's database cannot be reached just now; try again.",
}
# An absolute path in an error detail (at least two components; not part of a URL).
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[^\s'\"/:,;)]+(?:/[^\s'\"/:,;)]+)+/?")


@dataclass(frozen=True)
class Request:
    """What the site gets from the server: ``headers`` case-insensitive (``get``)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Any
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------


@contextlib.contextmanager
def reading(settings: Settings, shared: PgJobQueue | None = None) -> Iterator[Queue]:
    """A read-only queue on a connection of its own (closed after); with the shared
    queue, ``shared`` (the status page's long-lived one, left open)."""
    if shared is not None:
        yield shared
        return
    conn = connect(Layout.of(settings).database, readonly=True)
    try:
        yield JobQueue(conn)
    finally:
        conn.close()


def recent_ids(
    conn: sqlite3.Connection, states: tuple[str, ...], *, limit: int, offset: int = 0
) -> list[int]:
    """The ids of jobs in ``states``, the most recently changed first: a page of ``limit``
    after ``offset``, as :meth:`JobQueue.recent` orders them.

    One ordered index scan per state, merged (``MERGE (UNION ALL)`` over the ``jobs_recent``
    index), rather than ``state IN (…) ORDER BY``, which sorts every row of those states
    first: with 95,000 done jobs the last page takes 26 ms instead of 320 ms."""
    scans = " UNION ALL ".join("SELECT id, updated_at FROM jobs WHERE state=?" for _ in states)
    rows = conn.execute(
        f"{scans} ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?", (*states, limit, offset)
    ).fetchall()
    return [int(row[0]) for row in rows]


def recent(conn: sqlite3.Connection, states: tuple[str, ...], *, limit: int, offset: int = 0) -> list[Job]:
    """The jobs of :func:`recent_ids` (one that changed meanwhile may be left out)."""
    queue = JobQueue(conn)
    jobs = (queue.get(job_id) for job_id in recent_ids(conn, states, limit=limit, offset=offset))
    return [job for job in jobs if job is not None and job.state in states]


def snapshot(settings: Settings, now: float | None = None, *, shared: PgJobQueue | None = None) -> Overview:
    """The :class:`Overview` as the database says it now (for the metrics). Raises
    ``sqlite3.Error`` when it cannot be read (the shared queue ``shared``:
    :class:`~dropcut.pgqueue.QueueUnavailable`)."""
    with reading(settings, shared) as queue:
        return read_overview(
            queue,
            limit=settings.rate_limit_requests,
            period=settings.rate_limit_period_seconds,
            now=time.time() if now is None else now,
        )


class Scrubber:
    """Makes a text fit for the page: secrets replaced, the configured folders' absolute
    paths shown by their role (``inbox/…``), any other absolute path replaced."""

    def __init__(self, settings: Settings, secrets: Callable[[str], str], token: SecretStr | None) -> None:
        roots: dict[str, str] = {}
        for label in ("inbox", "outbox", "quarantine", "archive", "state_dir"):
            path = getattr(settings, label)
            name = "state" if label == "state_dir" else label
            for spelling in {str(path), os.path.realpath(path)}:
                roots[spelling.rstrip("/")] = name
        # the longest first: a folder inside another is named by its own role
        self._roots = sorted(roots.items(), key=lambda item: -len(item[0]))
        self._secrets = secrets
        self._token = token.get_secret_value() if token is not None else None

    def __call__(self, text: str) -> str:
        text = self._secrets(text)
        if self._token:
            text = text.replace(self._token, "[redacted]")
        for root, name in self._roots:
            text = re.sub(re.escape(root) + r"(?=/|\b|$)", name, text)
        return _ABSOLUTE.sub("…", text)


# --- the site --------------------------------------------------------------------------------


class StatusSite:
    """Answers requests (:meth:`handle`); no sockets here (see :class:`StatusServer`).

    ``settings`` gives the settings in force (a reload may change the rate limit);
    ``token`` the one every request must carry, or None (loopback only); ``bound_host`` the
    address the server listens on (also a valid ``Host``); ``scrub`` replaces secrets in
    texts (the daemon's redactor)."""

    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        metrics: Metrics,
        token: SecretStr | None,
        bound_host: str,
        scrub: Callable[[str], str] = lambda text: text,
        version: str = __version__,
        clock: Callable[[], float] = time.time,
        page_size: int = PAGE_SIZE,
        shared: PgJobQueue | None = None,
    ) -> None:
        first = settings()
        self._shared = shared  # the shared queue (queue_url): one connection, long-lived
        self._settings = settings
        self._metrics = metrics
        self._token = token
        self._bound_host = bound_host.lower()
        self._version = version
        self._clock = clock
        self._page_size = page_size
        self._scrub = Scrubber(first, scrub, token)
        self.thumbs = Thumbnails(
            Layout.of(first), max_pixels=first.max_pixels, timeout=first.decode_timeout_seconds
        )
        self.thumbs.prepare()
        secret = secrets.token_bytes(32)
        self._csrf = hmac.new(secret, b"dropcut retry", hashlib.sha256).hexdigest()
        self._session = None if token is None else session_value(token)
        self._log = structlog.get_logger()

    # --- the entry point -----------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        if self._token is None and not self._host_allowed(req):
            return _text(421, "This server answers only requests to its loopback address.\n")
        if self._token is not None:
            if req.method == "GET" and req.path == "/" and "token" in req.query:
                return self._log_in(req.query["token"])
            if not self._authorized(req):
                return self._unauthorized(req)
        if req.path == "/":
            return self._page(req) if req.method == "GET" else _not_allowed("GET")
        if req.path == "/metrics":
            return self._scrape() if req.method == "GET" else _not_allowed("GET")
        if req.path == "/retry":
            return self._retry(req) if req.method == "POST" else _not_allowed("POST", 403)
        found = THUMB.match(req.path)
        if found:
            if req.method != "GET":
                return _not_allowed("GET")
            kind: Kind = "before" if found.group(2) == "before" else "after"
            return self._thumb(int(found.group(1)), kind)
        return _text(404, "Not found.\n")

    # --- who may ask ---------------------------------------------------------------------

    def _host_allowed(self, req: Request) -> bool:
        host = _hostname(req.headers.get("Host") or "")
        return host is not None and (is_loopback(host) or host == self._bound_host)

    def _authorized(self, req: Request) -> bool:
        token = self._token
        assert token is not None and self._session is not None
        auth = req.headers.get("Authorization") or ""
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()
        ):
            return True
        cookie = _cookie(req.headers.get("Cookie") or "", COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode())

    def _log_in(self, given: str) -> Response:
        assert self._token is not None and self._session is not None
        if not hmac.compare_digest(given.encode(), self._token.get_secret_value().encode()):
            return self._unauthorized(None)
        cookie = f"{COOKIE}={self._session}; Path=/; Max-Age={COOKIE_SECONDS}; HttpOnly; SameSite=Strict"
        return Response(303, b"", "text/plain", [("Location", "/"), ("Set-Cookie", cookie)])

    def _unauthorized(self, req: Request | None) -> Response:
        challenge = [("WWW-Authenticate", 'Bearer realm="dropcut"')]
        if req is not None and req.path == "/metrics":
            return _text(401, "A token is needed: Authorization: Bearer <http_token>.\n", challenge)
        body = _document(
            "dropcut: token needed",
            "<main><h1>dropcut</h1><p>This status page needs its token. Open it once as "
            "<code>/?token=&lt;http_token&gt;</code>; a cookie keeps you signed in, and the "
            "token leaves the address bar at once.</p></main>",
        )
        return Response(401, body, headers=challenge)

    def _same_origin(self, req: Request) -> bool:
        host = (req.headers.get("Host") or "").lower()
        origin = req.headers.get("Origin")
        if origin is None:
            origin = req.headers.get("Referer")
        if not origin or origin == "null" or not host:
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host

    # --- the routes ----------------------------------------------------------------------

    def _scrape(self) -> Response:
        return Response(200, self._metrics.exposition(), METRICS_TYPE)

    def _thumb(self, job_id: int, kind: Kind) -> Response:
        try:
            with reading(self._settings(), self._shared) as queue:
                job = queue.get(job_id)
        except DB_ERRORS:
            return _text(503, "The queue cannot be read just now.\n")
        if job is None or (kind == "after" and job.state not in OUTPUT_STATES):
            return _text(404, "No such thumbnail.\n")
        thumb = self.thumbs.get(job, kind)
        # a placeholder may become a thumbnail (an output being written): not kept
        cache = "private, max-age=300" if thumb.content_type == "image/jpeg" else "no-store"
        return Response(200, thumb.data, thumb.content_type, [("Cache-Control", cache)])

    def _retry(self, req: Request) -> Response:
        if not self._same_origin(req):
            return _text(403, "Refused: a cross-site request (no Origin of this site).\n")
        content_type = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _text(403, "Refused: not the Retry form.\n")
        try:
            form = _first(parse_qs(req.body.decode("latin-1"), max_num_fields=10))
        except ValueError:  # more fields than the form has
            return _text(403, "Refused: not the Retry form.\n")
        if not hmac.compare_digest((form.get("csrf") or "").encode(), self._csrf.encode()):
            return _text(403, "Refused: the form's CSRF token is missing or stale; reload the page.\n")
        try:
            job_id = int(form.get("job", ""))
        except ValueError:
            return _text(400, "Which file? (no job)\n")
        qpage = _page_number(form.get("qpage"))
        settings = self._settings()
        queue: Queue = self._shared or JobQueue.open(Layout.of(settings).database)
        try:
            job = queue.get(job_id)
            if job is None or job.state != "quarantined":
                note = "gone"
            else:
                result = retry_job(settings, cast(JobQueue, queue), job)
                note = "retried" if result.ok else "failed"
                self._log.info(
                    "retry_requested",
                    source="status page",
                    file=result.quarantined_as,
                    back_as=result.back_as,
                    problem=result.problem,
                )
        except UNAVAILABLE:
            note = "unavailable"
        finally:
            if queue is not self._shared:
                queue.close()
        location = "/?" + urlencode({"qpage": qpage, "note": note}) + "#quarantine"
        return Response(303, b"", "text/plain", [("Location", location)])

    def _page(self, req: Request) -> Response:
        settings = self._settings()
        now = self._clock()
        size = self._page_size
        try:
            conn = None if self._shared is not None else connect(Layout.of(settings).database, readonly=True)
            try:
                queue: Queue = self._shared if self._shared is not None else JobQueue(conn)  # type: ignore[arg-type]
                limit, period = settings.rate_limit_requests, settings.rate_limit_period_seconds
                ov = read_overview(queue, limit=limit, period=period, now=now)
                outputs_total = sum(ov.jobs.get(s, 0) for s in OUTPUT_STATES)
                q_total = ov.jobs.get("quarantined", 0)
                page = min(_page_number(req.query.get("page")), _pages(outputs_total, size))
                qpage = min(_page_number(req.query.get("qpage")), _pages(q_total, size))
                if conn is None:  # the shared queue
                    outputs = queue.recent(OUTPUT_STATES, limit=size, offset=(page - 1) * size)
                    held = queue.recent(("quarantined",), limit=size, offset=(qpage - 1) * size)
                else:
                    outputs = recent(conn, OUTPUT_STATES, limit=size, offset=(page - 1) * size)
                    held = recent(conn, ("quarantined",), limit=size, offset=(qpage - 1) * size)
                errors = {job.id: queue.job_error(job.id) or {} for job in held}
                lite = cast(JobQueue, queue)  # (quarantined_as uses the Queue methods only)
                names = {job.id: quarantined_as(lite, job.id) or job.rel_path for job in held}
            finally:
                if conn is not None:
                    conn.close()
        except DB_ERRORS as exc:
            text = (
                f"<main><h1>dropcut</h1><p>The queue cannot be read: {_e(self._scrub(str(exc)))}</p></main>"
            )
            body = _document("dropcut", text)
            return Response(503, body, headers=[("Cache-Control", "no-store"), ("Retry-After", "5")])
        view = _View(
            overview=ov,
            now=now,
            version=self._version,
            page=page,
            pages=_pages(outputs_total, size),
            outputs=outputs,
            outputs_total=outputs_total,
            qpage=qpage,
            qpages=_pages(q_total, size),
            quarantined=held,
            quarantined_total=q_total,
            errors=errors,
            names=names,
            csrf=self._csrf,
            note=NOTES.get(req.query.get("note", "")),
            scrub=self._scrub,
        )
        return Response(200, view.render(), headers=[("Cache-Control", "no-store")])


# --- the page ----------------------------------------------------------------------------------

CSS = """
:root{color-scheme:light;--ink:#1d2733;--muted:#5f6b7a;--line:#dde3ea;--ok:#1e7d45;--warn:#a35c00;
--bad:#b3261e;--card:#fff;--bg:#f4f6f9;--accent:#2457c5}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
sans-serif;color:var(--ink);background:var(--bg)}
header{display:flex;align-items:baseline;gap:1rem;padding:.9rem 1.5rem;background:#16202c;color:#fff}
header h1{margin:0;font-size:1.25rem;letter-spacing:.02em}header .meta{color:#b8c4d3;font-size:.85rem}
main{padding:1rem 1.5rem 2rem;max-width:1400px}
h2{font-size:1.05rem;margin:1.6rem 0 .6rem}h2 small{color:var(--muted);font-weight:normal}
.banner{padding:.7rem 1rem;border-radius:8px;margin:.4rem 0;border:1px solid}
.banner.ok{background:#e8f5ec;border-color:#b7dfc4;color:var(--ok)}
.banner.warn{background:#fff4e0;border-color:#f3d39b;color:var(--warn)}
.banner.bad{background:#fdecea;border-color:#f2b8b5;color:var(--bad)}
.banner.note{background:#e8effc;border-color:#b9cdf3;color:var(--accent)}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:.8rem}
.stat{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.7rem .9rem}
.stat h3{margin:0 0 .3rem;font-size:.78rem;text-transform:uppercase;letter-spacing:.06em;color:var(--muted)}
.stat .big{font-size:1.5rem;font-weight:600}.stat p{margin:.15rem 0;font-size:.88rem;color:var(--muted)}
.counts{display:flex;flex-wrap:wrap;gap:.25rem .9rem;font-size:.9rem}.counts b{font-size:1.05rem}
.bar{height:7px;background:#e6ebf1;border-radius:4px;overflow:hidden;margin:.35rem 0}
.bar span{display:block;height:100%;background:var(--accent)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.8rem}
.out{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.6rem}
.pair{display:flex;gap:.4rem;align-items:center}
.pair img{width:136px;height:136px;object-fit:contain;background:#f0f2f5;border-radius:4px;flex:1 1 0;
min-width:0}.pair .arrow{color:var(--muted)}
.out .name{margin-top:.4rem;font-size:.85rem;overflow-wrap:anywhere}
.out .when{font-size:.78rem;color:var(--muted)}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);
border-radius:8px}
th,td{text-align:left;padding:.5rem .7rem;border-bottom:1px solid var(--line);vertical-align:top;
font-size:.88rem}
th{font-size:.75rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
td.file{overflow-wrap:anywhere}.code{font-family:ui-monospace,monospace;font-size:.82rem;color:var(--bad)}
button{font:inherit;font-size:.85rem;padding:.3rem .9rem;border-radius:6px;border:1px solid var(--accent);
background:var(--accent);color:#fff;cursor:pointer}button:hover{filter:brightness(1.1)}
.pager{display:flex;gap:.6rem;align-items:center;margin:.6rem 0;font-size:.88rem}
.pager a{color:var(--accent);text-decoration:none}.pager .off{color:#aab3bf}
.empty{color:var(--muted);font-style:italic}footer{color:var(--muted);font-size:.8rem;padding:0 1.5rem 1.5rem}
footer a{color:var(--muted)}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _document(title: str, body: str, refresh: str | None = None) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{_e(refresh)}">' if refresh else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f'<link rel=icon href="data:,">{meta}<title>{_e(title)}</title><style>{CSS}</style></head>'
        f"<body>{body}</body></html>"
    ).encode()


@dataclass
class _View:
    overview: Overview
    now: float
    version: str
    page: int
    pages: int
    outputs: list[Job]
    outputs_total: int
    qpage: int
    qpages: int
    quarantined: list[Job]
    quarantined_total: int
    errors: dict[int, dict[str, Any]]
    names: dict[int, str]
    csrf: str
    note: str | None
    scrub: Callable[[str], str]

    def link(self, page: int, qpage: int, anchor: str = "") -> str:
        return "/?" + urlencode({"page": page, "qpage": qpage}) + anchor

    def render(self) -> bytes:
        ov = self.overview
        refresh = f"{REFRESH_SECONDS}; url={self.link(self.page, self.qpage)}"
        header = (
            f"<header><h1>dropcut</h1><span class=meta>version {_e(self.version)} · "
            f"updated {_e(time.strftime('%H:%M:%S', time.localtime(self.now)))} · "
            f"refreshes every {REFRESH_SECONDS} s</span></header>"
        )
        body = [header, "<main>"]
        if self.note:
            body.append(f'<div class="banner note">{_e(self.note)}</div>')
        body.append(self.conditions(ov))
        body.append(self.stats(ov))
        body.append(self.outputs_section())
        body.append(self.quarantine_section())
        body.append("</main>")
        body.append(
            '<footer>Prometheus metrics: <a href="/metrics">/metrics</a> · '
            "times are this machine's local time</footer>"
        )
        return _document("dropcut status", "".join(body), refresh)

    def conditions(self, ov: Overview) -> str:
        out = ['<section id=conditions aria-label="conditions">']
        if ov.paused is not None:
            code = ov.paused.get("code") or "unknown"
            detail = ov.paused.get("detail") or ""
            since = ov.paused.get("since")
            when = f" since {clock_time(float(since), self.now)}" if isinstance(since, int | float) else ""
            text = f"Paused{when}: {code}" + (f" — {detail}" if detail else "")
            out.append(f'<div class="banner bad"><b>{_e(self.scrub(text))}</b></div>')
        for condition in ov.conditions:
            if ov.paused is not None and condition.code == "account_paused":
                continue  # said above, with the pause's own words
            out.append(f'<div class="banner warn">⚠ {_e(self.scrub(sentence(condition, self.now)))}</div>')
        if ov.paused is None and not ov.conditions:
            out.append('<div class="banner ok">✓ Running: nothing is wrong.</div>')
        out.append("</section>")
        return "".join(out)

    def stats(self, ov: Overview) -> str:
        jobs = ov.jobs
        rate = ov.rate
        shown = {**jobs, "done": jobs.get("done", 0) + jobs.get("published", 0)}
        counts = "".join(
            f"<span>{_e(label)} <b>{shown.get(state, 0):,}</b></span>"
            for label, state in (
                ("queued", "queued"),
                ("in flight", "inflight"),
                ("done", "done"),
                ("quarantined", "quarantined"),
                ("cancelled", "cancelled"),
                # a large batch's held and discarded files, when there are any
                *((state, state) for state in ("held", "discarded") if jobs.get(state)),
            )
        )
        share = min(1.0, rate.window / rate.limit) if rate.limit else 0.0
        spans = " · ".join(
            f"last {name} {used:,} of {rate.allowance(span):,}"
            for name, used, span in (
                ("minute", rate.minute, 60.0),
                ("hour", rate.hour, 3600.0),
                ("day", rate.day, 86400.0),
            )
        )
        if ov.eta_seconds is not None:
            eta = f"about {human_duration(ov.eta_seconds)}"
            eta_note = f"{_files(ov.backlog)} to send, at the allowance"
        elif ov.backlog:
            eta, eta_note = "unknown", f"{_files(ov.backlog)} waiting; paused"
        else:
            eta, eta_note = "—", "nothing waits"
        credit = ov.credit or {}
        if credit:
            value = credit.get("credit")
            credit_big = "—" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
            lines = []
            if credit.get("expiration_date"):
                lines.append(f"expires {credit['expiration_date']} UTC")
            checked = credit.get("checked_at")
            if isinstance(checked, int | float):
                lines.append(f"checked {clock_time(float(checked), self.now)}")
            credit_note = " · ".join(lines)
        else:
            credit_big, credit_note = "—", "not checked yet"
        last = (
            f"{clock_time(ov.last_success, self.now)} ({human_duration(self.now - ov.last_success)} ago)"
            if ov.last_success is not None
            else "none yet"
        )
        return (
            "<section class=stats aria-label=summary>"
            f"<div class=stat><h3>Queue</h3><div class=counts>{counts}</div>"
            f"<p>last output: {_e(last)}</p></div>"
            f"<div class=stat><h3>Rate</h3><div class=big>{rate.window} / {rate.limit}</div>"
            f'<div class=bar><span style="width:{share * 100:.0f}%"></span></div>'
            f"<p>in the window of {rate.period:g} s</p><p>{_e(spans)}</p></div>"
            f"<div class=stat><h3>ETA</h3><div class=big>{_e(eta)}</div><p>{_e(eta_note)}</p></div>"
            f"<div class=stat><h3>Credit</h3><div class=big>{_e(credit_big)}</div>"
            f"<p>{_e(credit_note)}</p></div>"
            "</section>"
        )

    def pager(self, which: str, current: int, pages: int) -> str:
        if pages <= 1:
            return ""

        def to(n: int) -> str:
            page, qpage = (n, self.qpage) if which == "outputs" else (self.page, n)
            return self.link(page, qpage, f"#{which}")

        def a(n: int, label: str, enabled: bool) -> str:
            return f'<a href="{_e(to(n))}">{label}</a>' if enabled else f"<span class=off>{label}</span>"

        return (
            f'<nav class=pager aria-label="{_e(which)} pages">'
            f"{a(1, '« first', current > 1)}{a(current - 1, '‹ newer', current > 1)}"
            f"<span>page {current} of {pages}</span>"
            f"{a(current + 1, 'older ›', current < pages)}{a(pages, 'last »', current < pages)}</nav>"
        )

    def outputs_section(self) -> str:
        out = [
            f"<section id=outputs><h2>Latest outputs <small>{self.outputs_total:,} in all</small></h2>",
            self.pager("outputs", self.page, self.pages),
        ]
        if not self.outputs:
            out.append("<p class=empty>No outputs yet.</p>")
        else:
            out.append("<div class=grid>")
            for job in self.outputs:
                name, output = _e(job.rel_path), _e(job.output_rel or "")
                out.append(
                    f'<figure class=out data-job="{job.id}" style="margin:0">'
                    "<div class=pair>"
                    f'<img class="thumb before" src="/thumb/{job.id}/before" alt="before: {name}" '
                    'loading="lazy" width=136 height=136>'
                    "<span class=arrow>→</span>"
                    f'<img class="thumb after" src="/thumb/{job.id}/after" alt="after: {output}" '
                    'loading="lazy" width=136 height=136>'
                    "</div>"
                    f"<figcaption><div class=name>{name} → outbox/{output}</div>"
                    f"<div class=when>{_e(clock_time(job.updated_at, self.now))}</div></figcaption></figure>"
                )
            out.append("</div>")
        out.append(self.pager("outputs", self.page, self.pages))
        out.append("</section>")
        return "".join(out)

    def quarantine_section(self) -> str:
        out = [
            f"<section id=quarantine><h2>Quarantine <small>{_files(self.quarantined_total)}</small></h2>",
            self.pager("quarantine", self.qpage, self.qpages),
        ]
        if not self.quarantined:
            out.append("<p class=empty>Nothing is quarantined.</p>")
        else:
            out.append(
                "<table><thead><tr><th>file</th><th>why</th><th>when</th><th></th></tr></thead><tbody>"
            )
            for job in self.quarantined:
                error = self.errors.get(job.id, {})
                code = str(error.get("code") or "unknown")
                status = error.get("status")
                source = error.get("source")
                label = code + (f" ({status})" if status else "") + (f", {source}" if source else "")
                detail = self.scrub(str(error.get("detail") or ""))
                name = self.names.get(job.id, job.rel_path)
                out.append(
                    f'<tr data-job="{job.id}"><td class=file>quarantine/{_e(name)}</td>'
                    f"<td><div class=code>{_e(label)}</div>{_e(detail)}</td>"
                    f"<td>{_e(clock_time(job.updated_at, self.now))}</td>"
                    '<td><form method=post action="/retry">'
                    f'<input type=hidden name=csrf value="{_e(self.csrf)}">'
                    f'<input type=hidden name=job value="{job.id}">'
                    f'<input type=hidden name=qpage value="{self.qpage}">'
                    f'<button type=submit title="put it back in the inbox">Retry</button></form></td></tr>'
                )
            out.append("</tbody></table>")
        out.append(self.pager("quarantine", self.qpage, self.qpages))
        out.append("</section>")
        return "".join(out)


# --- small helpers -------------------------------------------------------------------------------


def session_value(token: SecretStr) -> str:
    """What the session cookie holds: an HMAC of the token (the token itself never leaves
    the request that gave it)."""
    return hmac.new(
        token.get_secret_value().encode(), b"dropcut status page session", hashlib.sha256
    ).hexdigest()


def _files(n: int) -> str:
    return f"{n:,} file" if n == 1 else f"{n:,} files"


def _text(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8", headers or [])


def _not_allowed(allow: str, status: int = 405) -> Response:
    return _text(status, f"Method not allowed (use {allow}).\n", [("Allow", allow)])


def _first(values: Mapping[str, list[str]]) -> dict[str, str]:
    return {k: v[0] for k, v in values.items() if v}


def _page_number(value: str | None) -> int:
    try:
        number = int(value or "1")
    except ValueError:
        return 1
    return max(1, min(number, 10**9))


def _pages(total: int, size: int) -> int:
    return max(1, math.ceil(total / size))


def _hostname(host: str) -> str | None:
    """The name in a ``Host`` header (``[::1]:9840`` → ``::1``), lower case."""
    host = host.strip().lower()
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(header: str, name: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


# --- the server ----------------------------------------------------------------------------------

SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)


class _Handler(BaseHTTPRequestHandler):
    server_version = "dropcut"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms stall
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        body = b""
        if self.command == "POST":
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._send(_text(411, "A Content-Length is needed.\n"), close=True)
                return
            if int(length) > MAX_BODY:
                self._send(_text(413, "Too large.\n"), close=True)
                return
            body = self.rfile.read(int(length))
        try:
            query = _first(parse_qs(parts.query, max_num_fields=20))
        except ValueError:  # more fields than any page takes
            self._send(_text(400, "Too many parameters.\n"))
            return
        request = Request(self.command, parts.path, query, self.headers, body)
        try:
            response = self.server.site.handle(request)
        except Exception:
            structlog.get_logger().exception("http_request_failed", method=self.command, path=parts.path)
            response = _text(500, "Internal error (see the log).\n")
        self._send(response)

    def _send(self, response: Response, close: bool = False) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in response.headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a request's URL may hold the token (``/?token=``)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[Any, ...], family: int, site: StatusSite) -> None:
        self.address_family = family
        self.site = site
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            with contextlib.suppress(OSError):  # "::" serves IPv4 too where the system allows
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # (not HTTPServer.server_bind: its getfqdn() may wait for a reverse DNS lookup)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class StatusServer:
    """The listener, bound on construction (raises OSError: the port is taken, the address
    is not this machine's…); :meth:`start` serves on a daemon thread, :meth:`stop` ends it."""

    def __init__(self, site: StatusSite, host: str, port: int) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        self.site = site
        self._httpd = _Server(address, family, site)
        bound = self._httpd.socket.getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="dropcut-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()  # (returns once serve_forever did: at most a poll interval)
            self._thread = None
        self._httpd.server_close()
        self.site.thumbs.close()


def serve(
    settings: Settings,
    *,
    current: Callable[[], Settings],
    metrics: Metrics,
    scrub: Callable[[str], str] = lambda text: text,
    shared: PgJobQueue | None = None,
) -> StatusServer | None:
    """Bind ``settings.http_listen`` and serve the status page and the metrics on it; None
    when ``http_listen`` is ``""``. Logs ``http_listening`` with the URL (never the token).
    ``current`` gives the settings in force at each request (after a reload).

    Raises:
        ConfigError: the address cannot be bound (the port is taken…), or the token
            cannot be read, or is missing for an address that is not loopback.
    """
    address = settings.http_address()
    if address is None:
        return None
    host, port = address
    token = settings.resolve_http_token()
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"http_listen {settings.http_listen} is not a loopback address: it needs http_token"
        )
    site = StatusSite(
        settings=current, metrics=metrics, token=token, bound_host=host, scrub=scrub, shared=shared
    )
    try:
        server = StatusServer(site, host, port)
    except OSError as exc:
        raise ConfigError(f"http_listen {settings.http_listen}: {exc.strerror or exc}") from None
    server.start()
    structlog.get_logger().info(
        "http_listening", url=server.url, port=server.port, token_required=token is not None
    )
    return server


__all__ = [
    "PAGE_SIZE",
    "Request",
    "Response",
    "Scrubber",
    "StatusServer",
    "StatusSite",
    "reading",
    "recent",
    "recent_ids",
    "serve",
    "session_value",
    "snapshot",
]


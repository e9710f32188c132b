"""Prometheus metrics: counters the pipeline increments (through :class:`Metrics`, a
:class:`~dropcut.observe.Recorder`) and gauges read at scrape time from the queue database
(:func:`~dropcut.overview.read_overview`) and from the daemon's watch.

Everything lives in one :class:`~prometheus_client.CollectorRegistry` per :class:`Metrics`
(never the library's global one): two daemons in one process (the tests) count apart.

=========================================  =========  ==================  ===========================
name                                       type       labels              meaning
=========================================  =========  ==================  ===========================
``dropcut_jobs``                           gauge      ``state``           jobs in each queue state
``dropcut_files_total``                    counter    ``outcome``         files that left the pipeline
``dropcut_api_requests_total``             counter    ``endpoint,status`` image requests ("none": no
                                                                          answer)
``dropcut_api_request_duration_seconds``   histogram                      their duration
``dropcut_rate_window_used``               gauge                          requests in the sliding window
``dropcut_rate_window_limit``              gauge                          … and the most it allows
``dropcut_bytes_sent_total``               counter                        request bodies (files, proxies)
``dropcut_bytes_received_total``           counter                        answer bodies
``dropcut_credit_remaining``               gauge                          credit at the last check
``dropcut_credit_expiry_timestamp_seconds`` gauge                         when the credit expires
``dropcut_paused``                         gauge      ``reason``          1 while the queue is paused
``dropcut_condition``                      gauge      ``code``            1 for each condition that holds
``dropcut_watch_up``                       gauge      ``mode``            1 while the inbox is watched
``dropcut_last_success_timestamp_seconds`` gauge                          the last output's publication
``dropcut_build_info``                     gauge      ``version``         always 1
=========================================  =========  ==================  ===========================

Gauges with nothing to say are left out rather than made up: no credit series before the
first credit check, no ``dropcut_paused`` series while the queue runs, no last success
before the first one.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from dropcut.conditions import CODES
from dropcut.observe import OUTCOMES, Outcome
from dropcut.overview import Overview
from dropcut.queue import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The exposition format's media type (Prometheus text format 0.0.4)."""

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
"""Seconds: a proxy's round trip is well under a second; a 10 MB upload, or a server
waiting until the request times out, takes up to ``request_timeout_seconds``."""

WatchState = tuple[str, bool]
"""``(mode, up)``: how the inbox is watched (``native`` or ``poll``), and whether it is."""


class Metrics:
    """The daemon's metrics. ``overview`` reads a fresh :class:`Overview` (called at each
    scrape, on the HTTP server's thread: it opens its own database connection; may raise
    ``sqlite3.Error``, and the gauges it feeds are then left out of that scrape);
    ``watch`` says how the inbox is watched (called at each scrape); ``version`` is
    dropcut's.

    :meth:`request_finished` and :meth:`file_finished` (the Recorder) are called on the
    event loop: they only add to counts under a lock, and never raise.

    The counters are kept here rather than in prometheus_client's ``Counter`` objects,
    which would add a ``_created`` series to each (turning that off is a switch of the
    whole library, for every user of it in the process)."""

    def __init__(
        self,
        *,
        overview: Callable[[], Overview],
        watch: Callable[[], WatchState],
        version: str,
    ) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._requests: dict[tuple[str, str], int] = {}
        self._buckets = [0] * len(DURATION_BUCKETS)  # per bucket (not cumulative)
        self._duration_count = 0
        self._duration_sum = 0.0
        self._sent = 0
        self._received = 0
        self._overview = overview
        self._watch = watch
        self._version = version
        self._log = structlog.get_logger()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # --- the Recorder ----------------------------------------------------------------------

    def request_finished(self, record: RequestRecord) -> None:
        status = "none" if record.status is None else str(record.status)
        seconds = max(0.0, record.seconds)
        index = bisect.bisect_left(DURATION_BUCKETS, seconds)  # le: the first bound >= seconds
        with self._lock:
            key = (record.endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            if index < len(self._buckets):
                self._buckets[index] += 1
            self._duration_count += 1
            self._duration_sum += seconds
            self._sent += max(0, record.sent)
            self._received += max(0, record.received)

    def file_finished(self, outcome: Outcome) -> None:
        with self._lock:
            self._files[outcome] = self._files.get(outcome, 0) + 1

    # --- the exposition --------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text a scrape gets (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """Every metric, as a scrape sees it."""
        info = GaugeMetricFamily("dropcut_build_info", "dropcut's version (always 1).", labels=["version"])
        info.add_metric([self._version], 1)
        yield info
        yield from self._counters()
        mode, up = self._watch()
        watch = GaugeMetricFamily(
            "dropcut_watch_up",
            "1 while the inbox is watched (native events or polling), else 0.",
            labels=["mode"],
        )
        watch.add_metric([mode], 1 if up else 0)
        yield watch
        try:
            overview = self._overview()
        except sqlite3.Error as exc:
            self._log.debug("metrics_read_failed", detail=str(exc))
            return
        yield from overview_metrics(overview)

    def _counters(self) -> Iterator[Metric]:
        with self._lock:
            files = dict(self._files)
            requests = dict(self._requests)
            buckets = list(self._buckets)
            count, total = self._duration_count, self._duration_sum
            sent, received = self._sent, self._received
        family = CounterMetricFamily(
            "dropcut_files",
            "Files that left the pipeline, by outcome: published (outputs from a request), "
            "reused (outputs from the result cache, no request), quarantined, cancelled.",
            labels=["outcome"],
        )
        for outcome, n in files.items():
            family.add_metric([outcome], n)
        yield family
        family = CounterMetricFamily(
            "dropcut_api_requests",
            "Image requests to the withoutBG API, by endpoint and HTTP status ('none': no answer).",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), n in sorted(requests.items()):
            family.add_metric([endpoint, status], n)
        yield family
        cumulative, running = [], 0
        for bound, n in zip(DURATION_BUCKETS, buckets, strict=True):
            running += n
            cumulative.append((repr(float(bound)), running))
        cumulative.append(("+Inf", count))
        yield HistogramMetricFamily(
            "dropcut_api_request_duration_seconds",
            "How long image requests to the API took, from the upload's start to the whole answer.",
            buckets=cumulative,
            sum_value=total,
        )
        yield CounterMetricFamily(
            "dropcut_bytes_sent",
            "Bytes of image uploaded to the API (the files or their proxies).",
            value=sent,
        )
        yield CounterMetricFamily(
            "dropcut_bytes_received",
            "Bytes of answers received from the API (cut-outs, mattes, error bodies).",
            value=received,
        )


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


def overview_metrics(overview: Overview) -> Iterator[Metric]:
    """The gauges that come from the queue database."""
    jobs = GaugeMetricFamily("dropcut_jobs", "Jobs in each state of the queue.", labels=["state"])
    for state, count in overview.jobs.items():
        jobs.add_metric([state], count)
    yield jobs
    yield GaugeMetricFamily(
        "dropcut_rate_window_used",
        "Requests started in the current sliding window (the last rate_limit_period_seconds).",
        value=overview.rate.window,
    )
    yield GaugeMetricFamily(
        "dropcut_rate_window_limit",
        "Requests the API allows in one window (rate_limit_requests).",
        value=overview.rate.limit,
    )
    credit = overview.credit or {}
    remaining = _number(credit.get("credit"))
    if remaining is not None:
        yield GaugeMetricFamily(
            "dropcut_credit_remaining", "The account's credit at the last check.", value=remaining
        )
    expiry = expiry_timestamp(credit.get("expiration_date"))
    if expiry is not None:
        yield GaugeMetricFamily(
            "dropcut_credit_expiry_timestamp_seconds",
            "When the account's credit expires (Unix time), as the last check said.",
            value=expiry,
        )
    paused = GaugeMetricFamily(
        "dropcut_paused",
        "1 while the queue is paused, labelled with why (the pause's code).",
        labels=["reason"],
    )
    if overview.paused is not None:
        paused.add_metric([str(overview.paused.get("code") or "unknown")], 1)
    yield paused
    conditions = GaugeMetricFamily(
        "dropcut_condition",
        "1 for each condition that holds now (see dropcut status), else 0.",
        labels=["code"],
    )
    holding = {c.code for c in overview.conditions}
    for code in sorted(set(CODES) | holding):
        conditions.add_metric([code], 1 if code in holding else 0)
    yield conditions
    if overview.last_success is not None:
        yield GaugeMetricFamily(
            "dropcut_last_success_timestamp_seconds",
            "When the last output was published (Unix time).",
            value=overview.last_success,
        )


def expiry_timestamp(expiration: Any) -> float | None:
    """The API's ``expiration_date`` (``2027-09-05 23:59:59`` or ``2027-09-05``, UTC) as
    Unix time: a date alone expires at the end of that day. None when absent or unreadable."""
    if not isinstance(expiration, str) or not expiration:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            when = datetime.strptime(expiration, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return when.timestamp() + (86400 if fmt == "%Y-%m-%d" else 0)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)

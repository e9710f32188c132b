"""The Prometheus metrics, scraped over HTTP from a real daemon that ran against the fake
API and parsed with prometheus-client's own parser: the counts equal what happened."""

from __future__ import annotations

import collections
import socket
import sqlite3
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dropcut import __version__
from dropcut.client import REMOVE_PATH
from dropcut.conditions import CODES
from dropcut.metrics import Metrics, expiry_timestamp
from dropcut.queue import RequestRecord
from dropcut.settings import ConfigError
from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, **headers: str) -> tuple[Samples, dict[str, str]]:
    """``/metrics`` parsed: {(sample name, sorted labels): value}, and each family's type."""
    answer = httpx.get(url + "metrics", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(answer.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def listening(run: InProcessDaemon) -> str:
    event: dict[str, Any] = wait_for(lambda: (run.logs.events("http_listening") or [None])[0], 15)
    return str(event["url"]).replace("0.0.0.0", "127.0.0.1")


@pytest.mark.slow
def test_the_metrics_count_what_happened_in_a_real_run(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, http_listen="127.0.0.1:0")
    began = time.time()
    with InProcessDaemon(settings) as run:
        url = listening(run)
        # 1. a file the API refuses (422: quarantined, source "api")
        api.fail_next(1, 422)
        drop(folders.inbox, "refused.jpg", image_bytes("JPEG", (40, 30), seed=10))
        wait_for(lambda: (folders.quarantine / "refused.jpg").exists())
        # 2. three good files, the first request of which gets a 500 (retried)
        api.fail_next(1, 500)
        good = {
            name: image_bytes("JPEG", (64, 48), seed=n) for n, name in enumerate(("a.jpg", "b.jpg", "c.jpg"))
        }
        for name, data in good.items():
            drop(folders.inbox, name, data)
        wait_for(lambda: all((folders.archive / name).exists() for name in good))
        # 3. the same content as a.jpg under another name: from the result cache, no request
        drop(folders.inbox, "copy-of-a.jpg", good["a.jpg"])
        # 4. a file refused locally (not an image: 415, no request)
        drop(folders.inbox, "notes.jpg", b"not a photo at all\n" * 20)
        wait_for(lambda: (folders.archive / "copy-of-a.jpg").exists())
        wait_for(lambda: (folders.quarantine / "notes.jpg").exists())
        # the credit check after the last request has reached the database
        wait_for(lambda: value(scrape(url)[0], "dropcut_credit_remaining") == api.credit, 10)
        samples, types = scrape(url)
    records = api.records()

    # what the fake API saw: 5 requests (the 422, the 500, three 200s)
    statuses = collections.Counter(str(r.status) for r in records)
    assert statuses == {"200": 3, "422": 1, "500": 1}
    assert series(samples, "dropcut_api_requests_total") == {
        (("endpoint", REMOVE_PATH), ("status", status)): float(n) for status, n in statuses.items()
    }
    assert types["dropcut_api_requests"] == "counter"
    assert value(samples, "dropcut_api_request_duration_seconds_count") == len(records)
    assert value(samples, "dropcut_api_request_duration_seconds_bucket", le="+Inf") == len(records)
    assert 0 < (value(samples, "dropcut_api_request_duration_seconds_sum") or 0) < 10 * len(records)
    assert types["dropcut_api_request_duration_seconds"] == "histogram"
    # bytes: what the fake received (cutout mode: the files themselves), and at least the
    # three cut-outs it sent back (the outputs are its answers as they came)
    assert value(samples, "dropcut_bytes_sent_total") == sum(r.size or 0 for r in records)
    outputs = sum((folders.outbox / f"{name[:-4]}.png").stat().st_size for name in good)
    received = value(samples, "dropcut_bytes_received_total") or 0
    assert outputs <= received <= outputs + 2 * 8192  # (+ the two error bodies)

    # files: 3 published, 1 reused, 2 quarantined (one by the API, one locally)
    assert series(samples, "dropcut_files_total") == {
        (("outcome", "published"),): 3.0,
        (("outcome", "reused"),): 1.0,
        (("outcome", "quarantined"),): 2.0,
        (("outcome", "cancelled"),): 0.0,
    }
    assert value(samples, "dropcut_jobs", state="done") == 4
    assert value(samples, "dropcut_jobs", state="quarantined") == 2
    assert value(samples, "dropcut_jobs", state="queued") == 0
    assert types["dropcut_jobs"] == "gauge"

    # the gauges of the state
    assert value(samples, "dropcut_build_info", version=__version__) == 1
    assert value(samples, "dropcut_watch_up", mode="native") == 1
    assert value(samples, "dropcut_credit_remaining") == api.credit
    assert value(samples, "dropcut_credit_expiry_timestamp_seconds") == expiry_timestamp(
        "2027-09-05 23:59:59"
    )
    last = value(samples, "dropcut_last_success_timestamp_seconds") or 0
    assert began <= last <= time.time()
    assert value(samples, "dropcut_rate_window_limit") == 50
    assert 0 <= (value(samples, "dropcut_rate_window_used") or 0) <= 5
    assert series(samples, "dropcut_paused") == {}  # not paused: no series
    assert series(samples, "dropcut_condition") == {(("code", code),): 0.0 for code in CODES}
    # every name follows the conventions: counters end in _total, no _created series
    for (name, _), _v in samples.items():
        assert name.startswith("dropcut_") and not name.endswith("_created"), name


@pytest.mark.slow
def test_a_paused_account_shows_in_the_metrics(folders: Folders, api: FakeWithoutBG) -> None:
    api.credit = 0  # 402: the queue pauses, nothing is quarantined
    with InProcessDaemon(folders.settings(api.url, http_listen="127.0.0.1:0")) as run:
        url = listening(run)
        drop(folders.inbox, "a.jpg", image_bytes("JPEG", seed=1))
        paused = wait_for(lambda: run.logs.events("queue_paused"))[0]
        wait_for(lambda: series(scrape(url)[0], "dropcut_paused"))
        samples, _ = scrape(url)
        assert series(samples, "dropcut_paused") == {(("reason", paused["code"]),): 1.0}
        assert value(samples, "dropcut_api_requests_total", endpoint=REMOVE_PATH, status="402") == 1
        assert value(samples, "dropcut_files_total", outcome="quarantined") == 0
        assert value(samples, "dropcut_jobs", state="queued") == 1
        wait_for(lambda: value(scrape(url)[0], "dropcut_condition", code="account_paused") == 1)


def test_a_taken_port_stops_the_start_with_one_line(folders: Folders, api: FakeWithoutBG) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = InProcessDaemon(folders.settings(api.url, http_listen=f"127.0.0.1:{port}"))
        with pytest.raises(ConfigError) as caught:
            run.start()
        with pytest.raises(ConfigError):
            run.stop()  # (the thread has ended; stop() raises what ended it)
    message = str(caught.value)
    assert message == f"http_listen 127.0.0.1:{port}: Address already in use"
    assert "\n" not in message
    assert not api.records()


def test_an_empty_http_listen_opens_no_listener(folders: Folders, api: FakeWithoutBG) -> None:
    with InProcessDaemon(folders.settings(api.url)) as run:  # (tests.support: http_listen = "")
        assert run.daemon.http is None
        assert run.daemon.metrics is not None  # still counted: nothing else changes
    assert not run.logs.events("http_listening")


def unreadable() -> Any:
    raise sqlite3.OperationalError("unable to open database file")


def test_requests_without_an_answer_and_durations_fall_in_their_buckets() -> None:
    metrics = Metrics(overview=unreadable, watch=lambda: ("poll", False), version="9")
    metrics.request_finished(RequestRecord(0.0, "/v1.0/alpha-channel", None, 0.25, 1000, 0))
    metrics.request_finished(RequestRecord(0.0, "/v1.0/alpha-channel", 200, 0.26, 2000, 500))
    metrics.request_finished(RequestRecord(0.0, "/v1.0/alpha-channel", 200, 500.0, 0, 0))
    collected = {m.name: m for m in metrics.registry.collect()}
    histogram = collected["dropcut_api_request_duration_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in histogram if "le" in s.labels}
    assert buckets["0.25"] == 1 and buckets["0.5"] == 2 and buckets["120.0"] == 2 and buckets["+Inf"] == 3
    requests = {s.labels["status"]: s.value for s in collected["dropcut_api_requests"].samples}
    assert requests == {"none": 1, "200": 2}
    # the database could not be read: its gauges are left out, the rest is there
    assert "dropcut_jobs" not in collected
    assert [s.value for s in collected["dropcut_watch_up"].samples] == [0]
    assert [s.labels for s in collected["dropcut_build_info"].samples] == [{"version": "9"}]


def test_the_expiry_date_reads_as_utc() -> None:
    assert expiry_timestamp("2027-09-05 23:59:59") == 1820188799.0
    assert expiry_timestamp("2027-09-05") == 1820188800.0  # a date alone: the end of that day
    assert expiry_timestamp("soon") is None and expiry_timestamp(None) is None

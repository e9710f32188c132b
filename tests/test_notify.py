"""Notifications (issue 14, item 3): the messages and their schema, the batching of
quarantined files with a fake clock, and real deliveries: a real command (a Python script
that records its stdin and its environment) and a real local HTTP server, batching for
real, a failing and a hanging receiver of each kind (the sender goes on), and no key in the
command's environment or in any payload."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shlex
import shutil
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dropcut.conditions import Condition, Report
from dropcut.logs import REDACTED, Redactor, configure
from dropcut.notify import (
    ENVELOPE,
    EVENTS,
    FIELDS,
    FILE_FIELDS,
    QUARANTINED,
    SCHEMA,
    Notifications,
    NotifyOptions,
    QuarantineBatch,
    batch_held,
    budget_reached,
    child_environment,
    condition_message,
    credit_low,
    file_quarantined,
    files_quarantined,
    payload,
    retry_delay,
)
from tests.support import LogCapture, wait_for

KEY = "sk-live-7f3a9c2e5b1d4f6a8c0e"
T0 = 1_700_000_000.0


# --- the messages ---------------------------------------------------------------------------


def _every_event(now: float = T0) -> dict[str, dict[str, Any]]:
    cond = Condition("account_paused", "HTTP 402 no credit", since=now - 90, waiting=12)
    return {
        "files_quarantined": files_quarantined(
            [file_quarantined("shop/a.jpg", "unsupported_format", "not an image", status=415, now=now)],
            now=now,
        ),
        "condition_started": condition_message(Report("started", cond, 90), now=now) or {},
        "condition_ended": condition_message(Report("ended", cond, 754), now=now) or {},
        "credit_low": credit_low(42, 50, now=now),
        "budget_reached": budget_reached(500, "day", now + 3600, 40, now=now),
        "batch_held": batch_held("shoot 2", 50, 50, 428.6, now=now),
    }


def test_every_event_has_the_envelope_and_exactly_its_documented_fields() -> None:
    redactor = Redactor()
    events = _every_event()
    assert sorted(events) == sorted(EVENTS) == sorted(FIELDS)
    for name, event in events.items():
        sent = json.loads(payload(event, host="nas01", redactor=redactor))
        assert list(sent)[: len(ENVELOPE)] == list(ENVELOPE), name
        assert set(sent) - set(ENVELOPE) == set(FIELDS[name]), name
        assert sent["schema"] == SCHEMA == 1
        assert sent["event"] == name
        assert sent["host"] == "nas01"
        assert sent["at"].startswith("2023-11-1"), sent["at"]  # ISO 8601, local time
        assert isinstance(sent["summary"], str) and sent["summary"] and "\n" not in sent["summary"]
    files = json.loads(payload(events["files_quarantined"], host="h", redactor=redactor))
    assert list(files["files"][0]) == list(FILE_FIELDS)
    assert files["files"][0]["status"] == 415 and files["count"] == 1
    assert files["codes"] == {"unsupported_format": 1}
    assert files["summary"] == "shop/a.jpg was quarantined: unsupported_format — not an image"
    started = json.loads(payload(events["condition_started"], host="h", redactor=redactor))
    assert (started["code"], started["lasted_s"], started["waiting"]) == ("account_paused", 90, 12)
    assert "12 files wait" in started["summary"] and "HTTP 402 no credit" in started["summary"]
    ended = json.loads(payload(events["condition_ended"], host="h", redactor=redactor))
    assert ended["lasted_s"] == 754 and "after 12 min 34 s" in ended["summary"]
    held = json.loads(payload(events["batch_held"], host="h", redactor=redactor))
    assert "dropcut approve 'shoot 2'" in held["summary"] and held["seconds"] == 429
    budget = json.loads(payload(events["budget_reached"], host="h", redactor=redactor))
    assert budget["period"] == "day" and budget["waiting"] == 40


def test_a_condition_that_continues_is_not_a_message() -> None:
    cond = Condition("api_unreachable", "connect_error", since=T0)
    assert condition_message(Report("continues", cond, 300), now=T0 + 300) is None


def test_the_payload_carries_no_secret_and_is_always_valid_utf8_json() -> None:
    redactor = Redactor()
    redactor.set_secrets(KEY)
    event = file_quarantined(
        "bad\udcffname.jpg",  # a file name with an undecodable byte
        "http_400",
        f'the API said: invalid key "{KEY}" (X-API-Key: {json.dumps(KEY)})',
        now=T0,
    )
    body = payload(files_quarantined([event], now=T0), host="h", redactor=redactor)
    text = body.decode("utf-8")  # strict: no lone surrogate got through
    assert KEY not in text
    sent = json.loads(text)
    assert REDACTED in sent["files"][0]["detail"]
    assert sent["files"][0]["file"] == "bad\ufffdname.jpg"
    assert body.endswith(b"\n") and body.count(b"\n") == 1


def test_a_secret_that_cannot_be_cut_out_of_the_json_stops_the_message() -> None:
    redactor = Redactor()
    redactor.set_secrets("12345678")  # a key made of digits, and a number equal to it
    with pytest.raises(ValueError, match="secret"):
        payload(credit_low(12345678, 50, now=T0), host="h", redactor=redactor)


def test_the_command_environment_has_no_secret_and_no_dropcut_variable() -> None:
    redactor = Redactor()
    redactor.set_secrets(KEY)
    environ = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "DROPCUT_API_KEY": KEY,
        "DROPCUT_INBOX": "/srv/inbox",
        "dropcut_http_token": "abcdefghijklmnopqrstu",
        "CREDENTIALS_DIRECTORY": "/run/credentials/dropcut.service",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "SOME_OTHER_TOOL_TOKEN": f"Bearer {KEY}",
        "ESCAPED": json.dumps({"k": KEY}),
    }
    assert child_environment(environ, redactor) == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"command": "sh -c 'unclosed"}, "notify_command"),
        ({"url": "ftp://example.com/x"}, "notify_url"),
        ({"url": "not a url"}, "notify_url"),
        ({"batch_seconds": -1}, "notify_batch_seconds"),
        ({"timeout_seconds": 0}, "notify_timeout_seconds"),
        ({"retries": -1}, "notify_retries"),
    ],
)
def test_options_refuse_what_cannot_work(values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NotifyOptions(**values)


def test_options_defaults_and_an_argv_without_a_shell() -> None:
    o = NotifyOptions()
    assert (o.command, o.url, o.batch_seconds, o.timeout_seconds, o.retries) == ("", "", 60.0, 10.0, 3)
    assert not o.enabled
    o = NotifyOptions(command="notify-send 'dropcut says' --urgency=low")
    assert o.argv == ["notify-send", "dropcut says", "--urgency=low"] and o.enabled


def test_retry_delay_doubles_up_to_its_cap() -> None:
    assert [retry_delay(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# --- the batching decision, with a fake clock ------------------------------------------------


def _q(name: str, code: str = "unsupported_format") -> dict[str, Any]:
    return file_quarantined(name, code, f"why {name}", now=T0)


def test_the_first_file_opens_a_window_and_one_message_lists_all_of_it() -> None:
    batch = QuarantineBatch(60.0)
    assert batch.due() is None and batch.take(T0) is None
    for i in range(5):
        due = batch.add(_q(f"f{i}.jpg", "too_many_pixels" if i % 2 else "unsupported_format"), T0 + i)
        assert due == T0 + 60  # the window is the first file's, not a sliding one
    assert batch.take(T0 + 59.9) is None
    sent = batch.take(T0 + 60)
    assert sent is not None and sent["event"] == "files_quarantined"
    assert sent["count"] == 5 and [f["file"] for f in sent["files"]] == [f"f{i}.jpg" for i in range(5)]
    assert sent["codes"] == {"unsupported_format": 3, "too_many_pixels": 2}
    assert sent["summary"].startswith("5 files were quarantined: f0.jpg (unsupported_format), f1.jpg")
    assert sent["summary"].endswith("and 2 more")
    assert batch.take(T0 + 1000) is None and batch.count == 0
    assert batch.add(_q("late.jpg"), T0 + 100) == T0 + 160  # a quiet period: a new window


def test_many_files_are_counted_all_and_listed_up_to_a_limit() -> None:
    batch = QuarantineBatch(10.0, max_listed=100)
    for i in range(250):
        batch.add(_q(f"f{i}.jpg"), T0)
    sent = batch.take(T0 + 10)
    assert sent is not None and sent["count"] == 250 and len(sent["files"]) == 100
    assert sent["codes"] == {"unsupported_format": 250}


@pytest.mark.parametrize("seed", range(5))
def test_at_most_one_message_a_window_and_no_file_waits_longer(seed: int) -> None:
    rng, window = random.Random(seed), 60.0
    batch = QuarantineBatch(window)
    arrivals: dict[str, float] = {}
    sends: list[tuple[float, list[str]]] = []
    t = T0
    for i in range(300):
        t += rng.expovariate(1 / 20)  # a file every 20 s on average, in bursts and lulls
        # what the timer sends before this file arrives
        while (due := batch.due()) is not None and due <= t:
            sent = batch.take(due)
            assert sent is not None
            sends.append((due, [f["file"] for f in sent["files"]]))
        arrivals[f"f{i}"] = t
        batch.add(_q(f"f{i}"), t)
    final = batch.take(t, force=True)
    assert final is not None
    sends.append((t, [f["file"] for f in final["files"]]))
    told = [name for _, names in sends for name in names]
    assert sorted(told) == sorted(arrivals) and len(told) == len(set(told))  # each once
    times = [at for at, _ in sends]
    assert all(b - a >= window for a, b in itertools.pairwise(times[:-1]))  # the last: a stop
    for at, names in sends[:-1]:
        assert all(at - arrivals[n] <= window for n in names)


def test_a_new_window_applies_to_the_files_waiting_and_zero_sends_at_once() -> None:
    batch = QuarantineBatch(60.0)
    batch.add(_q("a.jpg"), T0)
    batch.window = 5.0
    assert batch.due() == T0 + 5
    assert batch.take(T0 + 5) is not None
    batch.window = 0
    assert batch.add(_q("b.jpg"), T0 + 7) == T0 + 7
    assert batch.take(T0 + 7) is not None
    with pytest.raises(ValueError):
        batch.window = -1


# --- real receivers ---------------------------------------------------------------------------

RECEIVER = """\
import json, os, pathlib, subprocess, sys, time
out = pathlib.Path(sys.argv[1])
data = sys.stdin.buffer.read()
with open(out / "received.jsonl", "ab") as fh:
    fh.write(data)
with open(out / "environ.jsonl", "a") as fh:
    fh.write(json.dumps(dict(os.environ)) + "\\n")
event = json.loads(data)["event"]
if event == "batch_held":  # this receiver hangs on it, with a child of its own
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    (out / "pids").write_text(f"{os.getpid()} {child.pid}")
    time.sleep(3600)
if event == "credit_low":
    print("mail server says no", file=sys.stderr)
    print("some output")
    sys.exit(3)
"""


class LoopThread:
    """An event loop in a thread: the sender runs there while the test waits with
    :func:`tests.support.wait_for`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def on_loop() -> Any:
            return fn()

        return self.run(on_loop())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Receiver:
    """A real HTTP server on 127.0.0.1: records each POST; answers with ``statuses`` in
    turn (then 200), or holds every answer while ``hang`` is set."""

    def __init__(self, statuses: list[int] | None = None, *, hang: bool = False) -> None:
        self.statuses = list(statuses or [])
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.hang = threading.Event()
        if hang:
            self.hang.set()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.bodies.append(body)
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                if receiver.hang.is_set():
                    receiver._release.wait(30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN-in-the-path"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b) for b in list(self.bodies)]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


class Harness:
    def __init__(self, tmp_path: Path, logs: LogCapture) -> None:
        self.tmp = tmp_path
        self.logs = logs
        self.loop = LoopThread()
        self.script = tmp_path / "receiver.py"
        self.script.write_text(RECEIVER)
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.command = shlex.join([sys.executable, str(self.script), str(self.out)])
        self.receivers: list[Receiver] = []
        self.made: list[Notifications] = []

    def receiver(self, statuses: list[int] | None = None, *, hang: bool = False) -> Receiver:
        r = Receiver(statuses, hang=hang)
        self.receivers.append(r)
        return r

    def start(self, options: NotifyOptions, **kwargs: Any) -> Notifications:
        kwargs.setdefault("secrets", [KEY])
        kwargs.setdefault("host", "testhost")
        kwargs.setdefault("retry_base_seconds", 0.05)
        n = Notifications(options, **kwargs)
        self.loop.call(n.start)
        self.made.append(n)
        return n

    def emit(self, n: Notifications, event: dict[str, Any]) -> None:
        self.loop.call(lambda: n.emit(event))

    def received(self) -> list[dict[str, Any]]:
        path = self.out / "received.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def environs(self) -> list[dict[str, str]]:
        path = self.out / "environ.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        for n in self.made:
            self.loop.run(n.aclose(grace=1.0))
        self.loop.close()
        for r in self.receivers:
            r.close()


@pytest.fixture
def logs() -> LogCapture:
    capture = LogCapture()
    configure("json", "debug", stream=capture, redactor=Redactor())  # no secret known: see all
    return capture


@pytest.fixture
def harness(tmp_path: Path, logs: LogCapture) -> Iterator[Harness]:
    h = Harness(tmp_path, logs)
    yield h
    h.close()


def _quick(**values: Any) -> NotifyOptions:
    values.setdefault("batch_seconds", 0.3)
    values.setdefault("timeout_seconds", 2.0)
    values.setdefault("retries", 3)
    return NotifyOptions(**values)


def test_a_real_command_and_a_real_server_receive_the_json_and_never_the_key(
    harness: Harness, logs: LogCapture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DROPCUT_API_KEY", KEY)
    monkeypatch.setenv("DROPCUT_INBOX", str(tmp_path / "inbox"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("SOME_TOOL_AUTH", f"key={KEY}")
    monkeypatch.setenv("KEPT_FOR_THE_COMMAND", "yes")
    server = harness.receiver()
    n = harness.start(_quick(command=harness.command, url=server.url))
    cond = Condition("account_paused", f"HTTP 401: key {KEY} refused", since=time.time() - 5, waiting=3)
    harness.emit(n, condition_message(Report("started", cond, 5), now=time.time()) or {})
    harness.emit(n, file_quarantined("shop/a.jpg", "http_400", f"echoed X-API-Key: {KEY}", now=time.time()))

    wait_for(lambda: len(harness.received()) == 2 and len(server.bodies) == 2, timeout=20)
    by_command, by_url = harness.received(), server.events()
    assert by_command == by_url  # the same JSON to both
    assert [m["event"] for m in by_command] == ["condition_started", "files_quarantined"]
    assert by_command[0]["code"] == "account_paused" and by_command[0]["waiting"] == 3
    assert by_command[1]["files"][0]["file"] == "shop/a.jpg"
    assert server.headers[0]["content-type"] == "application/json"
    assert server.headers[0]["user-agent"].startswith("dropcut/")
    for body in [*server.bodies, (harness.out / "received.jsonl").read_bytes()]:
        assert KEY.encode() not in body
    for environ in harness.environs():
        assert not any(k.upper().startswith("DROPCUT_") for k in environ)
        assert "CREDENTIALS_DIRECTORY" not in environ and "SOME_TOOL_AUTH" not in environ
        assert KEY not in json.dumps(environ)
        assert environ["KEPT_FOR_THE_COMMAND"] == "yes" and environ.get("PATH")
    wait_for(lambda: len(logs.events("notify_sent")) == 4)
    assert {(e["kind"], e["receiver"]) for e in logs.events("notify_sent")} == {
        ("condition_started", "command"),
        ("condition_started", "url"),
        ("files_quarantined", "command"),
        ("files_quarantined", "url"),
    }
    assert "T0KEN" not in logs.text()  # a webhook's path is its secret: the log names the host only
    assert (n.sent, n.failed, n.dropped) == (4, 0, 0)


def test_five_quarantined_files_make_one_message_listing_five(harness: Harness) -> None:
    server = harness.receiver()
    n = harness.start(_quick(command=harness.command, url=server.url, batch_seconds=0.5))
    started = time.monotonic()
    for i in range(5):
        harness.emit(
            n, file_quarantined(f"batch/{i}.jpg", "unsupported_format", "not an image", now=time.time())
        )
    wait_for(lambda: harness.received() and server.bodies)
    assert time.monotonic() - started >= 0.45  # sent when the window closed, not at the first file
    harness.emit(n, credit_low(3, 50, now=time.time()))  # other events: at once, on their own
    wait_for(lambda: len(server.bodies) == 2)
    msg = server.events()[0]
    assert msg["event"] == "files_quarantined" and msg["count"] == 5
    assert [f["file"] for f in msg["files"]] == [f"batch/{i}.jpg" for i in range(5)]
    assert server.events()[1]["event"] == "credit_low"
    wait_for(lambda: len(harness.received()) == 2)
    assert [m["event"] for m in harness.received()] == ["files_quarantined", "credit_low"]


def test_http_500_then_200_is_retried(harness: Harness, logs: LogCapture) -> None:
    server = harness.receiver([500, 503])
    n = harness.start(_quick(url=server.url, retries=3))
    harness.emit(n, credit_low(3, 50, now=time.time()))
    wait_for(lambda: logs.events("notify_sent"))
    assert len(server.bodies) == 3 and server.bodies[0] == server.bodies[2]
    failed = logs.events("notify_failed")
    assert [(e["status"], e["attempt"], e["retry_in_s"], e["given_up"]) for e in failed] == [
        (500, 1, 0.05, False),
        (503, 2, 0.1, False),
    ]
    assert logs.events("notify_sent")[0]["attempt"] == 3
    assert (n.sent, n.failed) == (1, 0)


def test_a_receiver_that_always_fails_is_given_up_and_the_next_message_goes(
    harness: Harness, logs: LogCapture
) -> None:
    server = harness.receiver([500, 500, 500, 404, 200])
    n = harness.start(_quick(url=server.url, retries=2))
    harness.emit(n, credit_low(3, 50, now=time.time()))  # 500, 500, 500: given up
    harness.emit(n, batch_held("", 50, 50, 400, now=time.time()))  # 404: not retried
    harness.emit(n, budget_reached(10, "month", time.time() + 60, 5, now=time.time()))  # 200
    wait_for(lambda: logs.events("notify_sent"))
    given_up = [e for e in logs.events("notify_failed") if e["given_up"]]
    assert [(e["kind"], e["status"], e["attempt"]) for e in given_up] == [
        ("credit_low", 500, 3),
        ("batch_held", 404, 1),
    ]
    assert logs.events("notify_sent")[0]["kind"] == "budget_reached"
    assert len(server.bodies) == 5 and (n.sent, n.failed) == (1, 2)
    assert all(e["level"] == "warning" for e in logs.events("notify_failed"))


def test_a_hanging_command_is_killed_at_its_time_limit_and_the_next_message_arrives(
    harness: Harness, logs: LogCapture
) -> None:
    n = harness.start(_quick(command=harness.command, timeout_seconds=1.0))
    harness.emit(n, batch_held("shop", 50, 50, 400, now=time.time()))  # the script hangs on this one
    harness.emit(n, credit_low(3, 50, now=time.time()))  # this one it refuses, exit status 3
    harness.emit(n, budget_reached(10, "day", time.time() + 60, 5, now=time.time()))
    wait_for(lambda: logs.events("notify_sent"), timeout=20)
    timeout, refused = logs.events("notify_failed")
    assert (timeout["kind"], timeout["reason"]) == ("batch_held", "timeout")
    assert (refused["kind"], refused["reason"], refused["returncode"]) == ("credit_low", "exit_status", 3)
    assert refused["stderr"] == "mail server says no" and refused["stdout"] == "some output"
    assert logs.events("notify_sent")[0]["kind"] == "budget_reached"
    # the whole process group was killed: the script and the child it started
    pids = [int(p) for p in (harness.out / "pids").read_text().split()]
    wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10)


def test_a_hanging_server_times_out_and_holds_up_neither_the_command_nor_the_caller(
    harness: Harness, logs: LogCapture
) -> None:
    server = harness.receiver(hang=True)
    n = harness.start(_quick(command=harness.command, url=server.url, timeout_seconds=0.5, retries=1))
    t = time.monotonic()
    harness.emit(n, budget_reached(10, "day", time.time() + 60, 5, now=time.time()))
    harness.emit(n, condition_message(_report("ended"), now=time.time()) or {})
    assert time.monotonic() - t < 0.5  # emit does not wait for anybody
    wait_for(lambda: len(harness.received()) == 2, timeout=10)  # the command is not held up
    wait_for(lambda: len([e for e in logs.events("notify_failed") if e["given_up"]]) == 2, timeout=20)
    failed = logs.events("notify_failed")
    assert {e["reason"] for e in failed} == {"timeout"} and len(failed) == 4  # 2 messages x 2 tries
    server.hang.clear()
    harness.emit(n, credit_low(1, 50, now=time.time()))
    wait_for(
        lambda: any(e["kind"] == "credit_low" for e in logs.events("notify_sent") if e["receiver"] == "url")
    )


def test_emit_never_blocks_and_drops_the_oldest_when_too_many_wait(
    harness: Harness, logs: LogCapture
) -> None:
    server = harness.receiver(hang=True)
    n = harness.start(_quick(url=server.url, timeout_seconds=5.0, retries=0), max_queued=3)
    t = time.monotonic()
    for credit in range(10):
        harness.emit(n, credit_low(credit, 50, now=time.time()))
    assert time.monotonic() - t < 1.0
    wait_for(lambda: len(server.bodies) == 1)  # credit 0 is on its way, held by the server
    assert n.dropped == 6  # 1..6 dropped: the newest three (7, 8, 9) wait
    dropped = logs.events("notify_dropped")
    assert len(dropped) == 6 and dropped[-1]["dropped"] == 6
    server.hang.clear()
    server._release.set()
    wait_for(lambda: len(server.bodies) == 4)
    assert [m["credit"] for m in server.events()] == [0, 7, 8, 9]


def test_emit_from_another_thread_and_when_nothing_is_set(harness: Harness) -> None:
    server = harness.receiver()
    n = harness.start(_quick(url=server.url))
    n.emit(credit_low(5, 50, now=time.time()))  # from the test's thread, not the loop's
    wait_for(lambda: server.bodies)
    n.emit({"event": "credit_low", "credit": float("nan")})  # no JSON for it: dropped, not raised
    n.emit(None)  # type: ignore[arg-type]
    wait_for(lambda: n.dropped == 1)
    idle = harness.start(NotifyOptions())
    idle.emit(credit_low(5, 50, now=time.time()))
    assert (idle.sent, idle.failed, idle.dropped) == (0, 0, 0)


def test_the_stop_sends_the_waiting_batch_then_gives_up_within_its_grace(
    harness: Harness, logs: LogCapture
) -> None:
    quick = harness.receiver()
    n = harness.start(_quick(url=quick.url, batch_seconds=3600))
    harness.emit(n, file_quarantined("a.jpg", "unsupported_format", "x", now=time.time()))
    harness.emit(n, file_quarantined("b.jpg", "unsupported_format", "y", now=time.time()))
    harness.loop.run(n.aclose(grace=5.0))
    assert [m["count"] for m in quick.events()] == [2]  # not an hour later: at the stop
    n.emit(credit_low(1, 50, now=time.time()))  # after the stop: nothing, no error

    stuck = harness.receiver(hang=True)
    m = harness.start(_quick(command=harness.command, url=stuck.url, timeout_seconds=30))
    harness.emit(m, batch_held("x", 5, 5, 40, now=time.time()))  # both receivers hang on it
    wait_for(lambda: stuck.bodies and (harness.out / "pids").exists())
    t = time.monotonic()
    harness.loop.run(m.aclose(grace=0.5))
    assert time.monotonic() - t < 5
    abandoned = logs.events("notify_abandoned")
    assert abandoned and abandoned[0]["waiting"] == {"command": 1, "url": 1}
    pids = [int(p) for p in (harness.out / "pids").read_text().split()]
    wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10)  # no command outlives the stop


def test_a_reload_changes_the_receivers_the_window_and_the_secrets(harness: Harness) -> None:
    server = harness.receiver()
    n = harness.start(_quick(url=server.url, batch_seconds=3600))
    harness.emit(n, file_quarantined("a.jpg", "unsupported_format", "x", now=time.time()))
    new_key = "sk-live-NEWKEY-0123456789"
    harness.loop.call(
        lambda: n.apply(
            _quick(url=server.url, command=harness.command, batch_seconds=0.2), secrets=[new_key, KEY]
        )
    )
    wait_for(lambda: server.bodies)  # the shorter window applies to the file waiting
    harness.emit(n, credit_low(1, 50, now=time.time()))
    harness.emit(n, file_quarantined("b.jpg", "x", f"{new_key} and {KEY}", now=time.time()))
    wait_for(lambda: len(harness.received()) == 2 and len(server.bodies) == 3)
    text = (harness.out / "received.jsonl").read_text() + b"".join(server.bodies).decode()
    assert new_key not in text and KEY not in text
    harness.loop.call(lambda: n.apply(_quick(command=harness.command)))  # the URL removed
    harness.emit(n, credit_low(2, 50, now=time.time()))
    wait_for(lambda: len(harness.received()) == 3)
    assert len(server.bodies) == 3


# --- the README's examples, for real -------------------------------------------------------------

README_CHAT = (
    'notify_command = "sh -c \'jq -c \\"{text: .summary}\\" | curl -fsS --max-time 8 '
    "-H content-type:application/json --data-binary @- {url}'\""
)
README_MAIL = "notify_command = \"sh -c 'jq -r .summary | mail -s dropcut admin@example.com'\""


@pytest.mark.skipif(not (shutil.which("jq") and shutil.which("curl")), reason="needs jq and curl")
def test_the_readme_chat_webhook_example_works(harness: Harness, logs: LogCapture) -> None:
    server = harness.receiver()
    line = README_CHAT.replace("{url}", server.url)
    command = tomllib.loads(line)["notify_command"]
    n = harness.start(_quick(command=command))
    harness.emit(n, credit_low(7, 50, now=time.time()))
    wait_for(lambda: server.bodies)
    assert server.events() == [{"text": "the API credit is low: 7 left (warning below 50)"}]
    assert server.headers[0]["content-type"] == "application/json"
    wait_for(lambda: logs.events("notify_sent"))


@pytest.mark.skipif(not shutil.which("jq"), reason="needs jq")
def test_the_readme_mail_example_works(
    harness: Harness, logs: LogCapture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_mail = bin_dir / "mail"  # a stand-in for mail(1): records its arguments and its input
    fake_mail.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/mail-args\ncat > {tmp_path}/mail-body\n'
    )
    fake_mail.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    command = tomllib.loads(README_MAIL)["notify_command"]
    n = harness.start(_quick(command=command))
    harness.emit(n, batch_held("shop", 250, 250, 2100, now=time.time()))
    wait_for(lambda: logs.events("notify_sent"))
    assert (tmp_path / "mail-args").read_text().split("\n")[:3] == ["-s", "dropcut", "admin@example.com"]
    assert (tmp_path / "mail-body").read_text().startswith("250 new files in shop/ are held")


# --- helpers ------------------------------------------------------------------------------------


def _report(kind: str) -> Report:
    cond = Condition("disk_full", "outbox: 12 MiB free", since=time.time() - 30, waiting=4)
    return Report(kind, cond, 30)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie nobody reaps counts as gone)?"""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


def test_quarantined_is_the_input_event_and_never_sent_as_is() -> None:
    assert file_quarantined("a.jpg", "c", "d", now=T0)["event"] == QUARANTINED
    assert QUARANTINED not in EVENTS

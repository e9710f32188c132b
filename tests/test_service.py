"""The daemon's lifecycle: sd_notify messages, the watchdog, reload."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dropcut.settings import load_settings
from dropcut.systemd import Notifier
from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def first(self, prefix: str) -> int:
        return next(i for i, m in enumerate(self.lines()) if m.startswith(prefix))

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_notify_ready_status_watchdog_stopping(
    tmp_path: Path, notify: NotifySocket, api: FakeWithoutBG, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = Folders.make(tmp_path / "f")
    drop(folders.inbox, "before.jpg", image_bytes(seed=1))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    notifier = Notifier()
    assert notifier.backend == "libsystemd"  # systemd-python's sd_notify, as in production
    run = InProcessDaemon(folders.settings(api.url), notifier=notifier).start()
    try:
        wait_for(lambda: "READY=1" in notify.lines())
        # READY only once the queue is open, the start-up scan is in and the watch is live
        started = run.logs.events("daemon_started")[0]
        assert started["found"] == 1 and run.logs.events("watch_started")
        wait_for(lambda: (folders.outbox / "before.png").exists())
        wait_for(lambda: any("done 1" in m for m in notify.lines() if m.startswith("STATUS=")))
        wait_for(lambda: notify.lines().count("WATCHDOG=1") >= 5)
        status = [m for m in notify.lines() if m.startswith("STATUS=")]
        assert all("queued" in s and "in flight" in s and "quarantined" in s for s in status)
    finally:
        run.stop()
    lines = notify.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert lines[-1] == "STOPPING=1" or lines.index("STOPPING=1") > notify.first("WATCHDOG=1")


def test_hung_loop_stops_watchdog_pings(tmp_path: Path, notify: NotifySocket, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path / "f")
    notifier = Notifier(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    with InProcessDaemon(folders.settings(api.url), notifier=notifier) as run:
        wait_for(lambda: notify.lines().count("WATCHDOG=1") >= 3)
        hang = 1.5
        run.call(lambda: time.sleep(hang))  # the event loop itself blocks
        before = time.monotonic()
        wait_for(lambda: any(t > before + hang for t, m in notify.messages if m == "WATCHDOG=1"), timeout=10)
    pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= hang * 0.9, "no ping while the loop hung"
    normal = sorted(gaps)[len(gaps) // 2]
    assert normal <= 0.15, f"pings every half WATCHDOG_USEC normally, got median {normal:.3f} s"


def write_config(path: Path, folders: Folders, api_url: str, **values: object) -> Path:
    base: dict[str, object] = {
        "inbox": str(folders.inbox),
        "outbox": str(folders.outbox),
        "quarantine": str(folders.quarantine),
        "archive": str(folders.archive),
        "state_dir": str(folders.state),
        "api_url": api_url,
        "api_key": API_KEY,
        "debounce_seconds": 0.2,
        "watch_mode": "native",
        "credit_check_interval_seconds": 0.3,
        "rate_limit_requests": 50,
        "rate_limit_period_seconds": 1.0,
        "log_format": "json",
    }
    base.update(values)
    lines = []
    for key, value in base.items():
        lines.append(f"{key} = {value!r}".replace("'", '"') if isinstance(value, str) else f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reload_applies_key_rate_and_debounce(
    tmp_path: Path, notify: NotifySocket, api: FakeWithoutBG
) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(tmp_path / "dropcut.toml", folders, api.url, api_key="old-wrong-key")
    notifier = Notifier(env={"NOTIFY_SOCKET": str(notify.path)})
    settings = load_settings(config)
    with InProcessDaemon(settings, config_path=config, notifier=notifier) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=2))
        wait_for(lambda: run.logs.events("queue_paused"))  # 401 with the old key
        write_config(config, folders, api.url, rate_limit_requests=5, debounce_seconds=0.4)
        run.call(run.daemon.request_reload)
        reloaded = wait_for(lambda: run.logs.events("config_reloaded"))[0]
        assert {"api_key", "rate_limit_requests", "debounce_seconds"} <= set(reloaded["changed"])
        wait_for(lambda: (folders.outbox / "a.png").exists())  # the new key resumed the queue
        assert run.daemon.pacer.limit == 5
        assert run.daemon.admission.settings.debounce_seconds == 0.4
    lines = notify.lines()
    reloading = next(i for i, m in enumerate(lines) if m.startswith("RELOADING=1"))
    assert "READY=1" in lines[reloading + 1 :]
    assert "old-wrong-key" not in run.logs.text()


def test_reload_refuses_folder_changes(tmp_path: Path, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(tmp_path / "dropcut.toml", folders, api.url)
    with InProcessDaemon(load_settings(config), config_path=config) as run:
        other = tmp_path / "other-outbox"
        write_config(config, folders, api.url, outbox=str(other), rate_limit_requests=3)
        run.call(run.daemon.request_reload)
        refused = wait_for(lambda: run.logs.events("reload_refused"))[0]
        assert refused["keys"] == ["outbox"]
        assert run.daemon.pacer.limit == 50  # the old configuration stays, whole
        drop(folders.inbox, "a.jpg", image_bytes(seed=3))
        wait_for(lambda: (folders.outbox / "a.png").exists())
    assert not other.exists()


def test_reload_with_broken_config_keeps_running(tmp_path: Path, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(tmp_path / "dropcut.toml", folders, api.url)
    with InProcessDaemon(load_settings(config), config_path=config) as run:
        config.write_text("rate_limit_requests = 'many'\n")
        run.call(run.daemon.request_reload)
        wait_for(lambda: run.logs.events("reload_failed"))
        drop(folders.inbox, "a.jpg", image_bytes(seed=4))
        wait_for(lambda: (folders.outbox / "a.png").exists())

"""The daemon's lifecycle: sd_notify messages, the watchdog, reload."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from PIL import Image

from dropcut.dispatch import retry_policy
from dropcut.recipes import OutputSpec, folder_recipes, recipe_key
from dropcut.service import Daemon
from dropcut.settings import RESTART_KEYS, Settings, load_settings
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


def write_config(path: Path, where: Folders, api_url: str, /, **values: object) -> Path:
    base: dict[str, object] = {
        "inbox": str(where.inbox),
        "outbox": str(where.outbox),
        "quarantine": str(where.quarantine),
        "archive": str(where.archive),
        "state_dir": str(where.state),
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
        if value is None:
            continue  # None: the key is left out (its default)
        if isinstance(value, RawToml):
            lines.append(f"{key} = {value.toml}")
        elif isinstance(value, str | Path):
            lines.append(f"{key} = {json.dumps(str(value))}")
        elif isinstance(value, list | tuple | bool):
            lines.append(f"{key} = {json.dumps(value if isinstance(value, bool) else list(value))}")
        else:
            lines.append(f"{key} = {value}")
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


# --- what a reload puts in force ------------------------------------------------------------


# Every key a reload accepts, with a new value (the start values are in write_config and in
# RELOAD_START). The test checks each in the component that uses it; a key that is neither
# here nor in RESTART_KEYS fails the test, so a new setting needs a decision.
class RawToml(str):
    """A value written into the TOML file as ``toml`` and compared as the string it is
    (for recipes: their :func:`recipe_key`, which is what the running daemon is checked by)."""

    toml: str

    def __new__(cls, value: str, toml: str) -> RawToml:
        self = super().__new__(cls, value)
        self.toml = toml
        return self


def folders_key(folders: dict[str, tuple[OutputSpec, ...]]) -> str:
    return ";".join(f"{name}={recipe_key(specs)}" for name, specs in sorted(folders.items()))


RELOAD_START: dict[str, object] = {
    "watch_mode": "poll",
    "poll_interval_seconds": 60.0,  # no poll during the test unless the reload applies 0.2
    "rescan_interval_seconds": 300.0,
    "log_level": "info",
}
RELOADED: dict[str, object] = {
    "api_key": None,  # the new key comes from api_key_file
    "api_key_file": "<written by the test>",
    "rate_limit_requests": 9,
    "decode_timeout_seconds": 20.0,
    "api_max_upload_bytes": 5000000,
    "multi_frame": "quarantine",
    "strip_gps": False,
    "max_decode_bytes": 16777216,
    "rate_limit_period_seconds": 2.0,
    "rate_limit_margin_seconds": 0.02,
    "credit_check_interval_seconds": 0.7,
    "credit_warn_below": 10**6,
    "max_attempts": 9,
    "retry_base_delay_seconds": 0.07,
    "retry_max_delay_seconds": 0.9,
    "poll_interval_seconds": 0.2,
    "rescan_interval_seconds": 0.5,
    "debounce_seconds": 0.1,
    "max_settle_seconds": 99.0,
    "corrupt_grace_seconds": 3.0,
    "ignore_patterns": ["*.skip", ".*"],
    "ignore_dirs": ["skipped", ".*"],
    "max_file_bytes": 5_000_000,
    "max_pixels": 7_000_000,
    "on_success": "delete",
    "result_cache_bytes": 12345,
    "shutdown_grace_seconds": 4.0,
    "log_level": "debug",
    "condition_report_seconds": 7.0,
    "budget_per_day": 100,
    "budget_per_month": 1000,
    "budget_timezone": "Europe/Berlin",
    "hold_batches_over": 20,
    "notify_command": "cat",
    "notify_url": "http://127.0.0.1:9/hook",
    "notify_batch_seconds": 5.0,
    "notify_timeout_seconds": 3.0,
    "notify_retries": 1,
    "batch_window_seconds": 60.0,
    "outputs": RawToml(recipe_key([OutputSpec(preset="white-jpeg")]), '[{preset = "white-jpeg"}]'),
    "folders": RawToml(
        folders_key({"web": (OutputSpec(preset="webp"),)}), '{web = {outputs = [{preset = "webp"}]}}'
    ),
}


def in_force(d: Daemon) -> dict[str, object]:
    """Each reloadable key as the running component that uses it sees it."""
    policy = retry_policy(d.dispatcher.settings)
    key = d.settings.resolve_api_key()
    return {
        "api_key": d.settings.api_key,
        "api_key_file": str(d.settings.api_key_file),
        "resolved_key": key.get_secret_value() if key else None,
        "rate_limit_requests": d.pacer.limit,
        "rate_limit_period_seconds": d.pacer.period,
        "rate_limit_margin_seconds": d.pacer.margin,
        "credit_check_interval_seconds": d.dispatcher.settings.credit_check_interval_seconds,
        "credit_warn_below": d.dispatcher.settings.credit_warn_below,
        "max_attempts": policy.max_attempts,
        "retry_base_delay_seconds": policy.base_delay,
        "retry_max_delay_seconds": policy.max_delay,
        "poll_interval_seconds": d.admission.settings.poll_interval_seconds,
        "rescan_interval_seconds": d.settings.rescan_interval_seconds,
        "debounce_seconds": d.admission.settings.debounce_seconds,
        "max_settle_seconds": d.admission.settings.max_settle_seconds,
        "corrupt_grace_seconds": d.admission.settings.corrupt_grace_seconds,
        "ignore_patterns": list(d.admission.settings.ignore_patterns),
        "ignore_dirs": list(d.admission.settings.ignore_dirs),
        "max_file_bytes": d.admission.settings.max_file_bytes,
        "max_pixels": d.admission.settings.max_pixels,
        "outputs": recipe_key(d.admission.settings.outputs),
        "folders": folders_key(folder_recipes(d.admission.settings.folders)),
        "decode_timeout_seconds": d.admission.settings.decode_timeout_seconds,
        "api_max_upload_bytes": d.admission.settings.api_max_upload_bytes,
        "multi_frame": d.admission.settings.multi_frame,
        "strip_gps": d.dispatcher.settings.strip_gps,
        "max_decode_bytes": d.admission.settings.max_decode_bytes,
        "on_success": d.publisher.on_success,
        "result_cache_bytes": d.cache.max_bytes,
        "shutdown_grace_seconds": d.settings.shutdown_grace_seconds,
        "condition_report_seconds": d.monitor.report_every,
        "budget_per_day": d.dispatcher.settings.budget_per_day,
        "budget_per_month": d.dispatcher.settings.budget_per_month,
        "budget_timezone": d.dispatcher.settings.budget_timezone,
        "hold_batches_over": d.admission.settings.hold_batches_over,
        "notify_command": d.notifications.options.command,
        "notify_url": d.notifications.options.url,
        "notify_batch_seconds": d.notifications.options.batch_seconds,
        "notify_timeout_seconds": d.notifications.options.timeout_seconds,
        "notify_retries": d.notifications.options.retries,
        "batch_window_seconds": d.admission.settings.batch_window_seconds,
        "log_level": "debug" if structlog.get_logger().is_enabled_for(logging.DEBUG) else "not debug",
    }


def test_every_setting_is_reloadable_or_needs_a_restart() -> None:
    fields = set(Settings.model_fields)
    assert not set(RESTART_KEYS) & set(RELOADED)
    assert fields == set(RESTART_KEYS) | set(RELOADED), "decide: put it in force on reload, or RESTART_KEYS"


def test_reload_puts_every_other_key_in_force(tmp_path: Path, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(tmp_path / "dropcut.toml", folders, api.url, **RELOAD_START)
    key_file = tmp_path / "api-key"
    key_file.write_text("new-key\n")
    new = {**RELOADED, "api_key_file": str(key_file)}
    with InProcessDaemon(load_settings(config), config_path=config) as run:
        d = run.daemon
        assert not [k for k in RELOADED if in_force(d)[k] == new[k]], "start values must differ"
        api.api_key = "new-key"  # from now on the server takes the new key only
        write_config(config, folders, api.url, **{**RELOAD_START, **new})
        run.call(d.request_reload)
        reloaded = wait_for(lambda: run.logs.events("config_reloaded"))[0]
        assert not run.logs.events("reload_refused")
        assert set(reloaded["changed"]) == set(RELOADED)
        effective = in_force(d)
        assert effective["resolved_key"] == "new-key"
        assert {k: effective[k] for k in RELOADED} == new

        # and the daemon acts on them:
        # poll_interval_seconds: the poll watch is rebuilt with 0.2 s
        restarted = wait_for(lambda: run.logs.events("watch_restarted"), timeout=10)[0]
        assert restarted["poll_interval_s"] == 0.2
        # log_level and rescan_interval_seconds: debug lines of rescans every 0.5 s
        wait_for(lambda: len(run.logs.events("rescan_done")) >= 2, timeout=10)
        # credit_warn_below: the credit check that the reload set off warns
        wait_for(lambda: run.logs.events("credit_low"), timeout=10)
        # ignore_patterns
        drop(folders.inbox, "c.skip", b"not an image")
        wait_for(lambda: any(e.get("file") == "c.skip" for e in run.logs.events("file_ignored")))
        # api_key_file (the server refuses the old key), on_success = delete, and outputs:
        # the white JPEG recipe
        drop(folders.inbox, "b.jpg", image_bytes(seed=5))
        wait_for(lambda: (folders.outbox / "b.jpg").exists() and not (folders.inbox / "b.jpg").exists())
        with Image.open(folders.outbox / "b.jpg") as out:
            assert out.format == "JPEG" and out.mode == "RGB"
        assert not (folders.archive / "b.jpg").exists()
        assert not run.logs.events("queue_paused")
    assert "new-key" not in run.logs.text()


def test_reload_of_the_period_moves_the_default_margin_with_it(tmp_path: Path, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(tmp_path / "dropcut.toml", folders, api.url, rate_limit_period_seconds=1.2)
    with InProcessDaemon(load_settings(config), config_path=config) as run:
        assert (run.daemon.pacer.period, run.daemon.pacer.margin) == (1.2, 1.2 / 240)
        write_config(config, folders, api.url, rate_limit_period_seconds=2.4)
        run.call(run.daemon.request_reload)
        wait_for(lambda: run.logs.events("config_reloaded"))
        assert not run.logs.events("reload_refused")
        assert (run.daemon.pacer.period, run.daemon.pacer.margin) == (2.4, 2.4 / 240)


def test_reload_of_the_poll_interval_rebuilds_the_poll_watch(tmp_path: Path, api: FakeWithoutBG) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(
        tmp_path / "dropcut.toml", folders, api.url, watch_mode="poll", poll_interval_seconds=60.0
    )
    with InProcessDaemon(load_settings(config), config_path=config) as run:
        write_config(config, folders, api.url, watch_mode="poll", poll_interval_seconds=0.2)
        run.call(run.daemon.request_reload)
        wait_for(lambda: run.logs.events("config_reloaded"))
        drop(folders.inbox, "a.jpg", image_bytes(seed=6))
        # polled every 60 s (and rescanned every 300 s), it would take a minute to be seen
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=10)


# (key, value, keys named by reload_refused): each needs a restart.
RESTART_CHANGES = [
    ("api_url", "http://127.0.0.1:9", ["api_url"]),
    ("request_timeout_seconds", 3.0, ["request_timeout_seconds"]),
    ("max_in_flight", 9, ["max_in_flight"]),
    ("log_format", "console", ["log_format"]),
    ("watch_mode", "poll", ["watch_mode"]),
]


def test_reload_refuses_keys_that_need_a_restart_and_keeps_the_old_configuration(
    tmp_path: Path, api: FakeWithoutBG
) -> None:
    folders = Folders.make(tmp_path / "f")
    config = write_config(tmp_path / "dropcut.toml", folders, api.url)
    with InProcessDaemon(load_settings(config), config_path=config) as run:
        d = run.daemon
        before = d.settings
        for n, (key, value, named) in enumerate(RESTART_CHANGES, start=1):
            # with a change a reload could apply: the old configuration stays, whole
            values: dict[str, object] = {key: value, "rate_limit_requests": 3, "debounce_seconds": 0.1}
            write_config(config, folders, str(values.pop("api_url", api.url)), **values)
            run.call(d.request_reload)
            refused = wait_for(lambda n=n: run.logs.events("reload_refused")[n - 1 :])[0]
            assert refused["keys"] == named, key
            assert d.settings is before
            assert d.pacer.limit == 50 and d.admission.settings.debounce_seconds == 0.2
        assert not run.logs.events("config_reloaded")
        drop(folders.inbox, "a.jpg", image_bytes(seed=7))
        wait_for(lambda: (folders.outbox / "a.png").exists())

"""Helpers for tests that run the real daemon: folders, images, in-process and subprocess
runs, waiting on conditions with deadlines."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from PIL import Image

from dropcut.logs import configure
from dropcut.service import Daemon
from dropcut.settings import Settings

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


@dataclass
class Folders:
    root: Path
    inbox: Path
    outbox: Path
    quarantine: Path
    archive: Path
    state: Path

    @classmethod
    def make(cls, root: Path) -> Self:
        f = cls(
            root=root,
            inbox=root / "inbox",
            outbox=root / "outbox",
            quarantine=root / "quarantine",
            archive=root / "archive",
            state=root / "state",
        )
        f.inbox.mkdir(parents=True, exist_ok=True)
        return f

    def values(self, api_url: str, **overrides: Any) -> dict[str, Any]:
        """Fast test settings for these folders (short debounce, quick retries)."""
        values: dict[str, Any] = {
            "inbox": self.inbox,
            "outbox": self.outbox,
            "quarantine": self.quarantine,
            "archive": self.archive,
            "state_dir": self.state,
            "api_url": api_url,
            "api_key": API_KEY,
            # The pipeline's tests send the file as it is: what the fake received is the
            # input (its sha256, its name). The matte path has its own tests (test_matte.py).
            "api_mode": "cutout",
            "debounce_seconds": 0.2,
            "corrupt_grace_seconds": 0.0,
            "watch_mode": "native",
            "rate_limit_requests": 50,
            "rate_limit_period_seconds": 1.0,
            "retry_base_delay_seconds": 0.05,
            "retry_max_delay_seconds": 0.2,
            "credit_check_interval_seconds": 0.5,
            "request_timeout_seconds": 10.0,
            "log_format": "json",
            # tests run side by side: no fixed port (the HTTP side's tests pick port 0)
            "http_listen": "",
        }
        values.update(overrides)
        return values

    def settings(self, api_url: str, **overrides: Any) -> Settings:
        return Settings(**self.values(api_url, **overrides))

    def env(self, api_url: str, **overrides: Any) -> dict[str, str]:
        """The same settings as DROPCUT_* variables for a subprocess."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DROPCUT_")}
        env.update({f"DROPCUT_{k.upper()}": str(v) for k, v in self.values(api_url, **overrides).items()})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def files(self, root: Path) -> list[str]:
        return sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and ".dropcut-staging" not in p.parts
        )


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), seed: int | None = None) -> bytes:
    """A small valid image with unique content (random noise from ``seed``)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])]
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def drop(inbox: Path, rel: str, data: bytes) -> Path:
    """Write a file the way a careful client does: a temporary name, then a rename."""
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


class LogCapture(io.StringIO):
    """A text stream the daemon logs JSON lines into; parsed on demand (thread-safe)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            return super().write(s)

    def isatty(self) -> bool:
        return False

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            text = self.getvalue()
        out = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [e for e in out if name is None or e.get("event") == name]

    def text(self) -> str:
        with self._lock:
            return self.getvalue()


class InProcessDaemon:
    """The real daemon on its own event loop in a thread (signals are replaced by calls)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.logs = LogCapture()
        redactor = configure("json", settings.log_level, stream=self.logs)
        self.daemon = Daemon(settings, redactor=redactor, **kwargs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.result: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.result = self.loop.run_until_complete(self.daemon.serve())
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.close()

    def start(self, timeout: float = 15.0) -> InProcessDaemon:
        self._thread.start()
        wait_for(
            lambda: self.daemon.started or self.error is not None or not self._thread.is_alive(), timeout
        )
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "daemon did not stop"
        if self.error is not None:
            raise self.error
        return self.result

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the daemon's loop."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn)

    def __enter__(self) -> InProcessDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class DaemonProcess:
    """``dropcut run`` as a real subprocess; stderr JSON lines collected by a thread."""

    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        """What runs dropcut's CLI (a wrapper's ``python -c`` in some tests)."""
        return [sys.executable, "-m", "dropcut.cli"]

    def start(self) -> DaemonProcess:
        self.proc = subprocess.Popen(
            [*self.command(), "run", *self.args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return json_events(list(self.lines), name)

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(lambda: (self.events(name) or [None])[0], timeout)  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode if self.proc is not None else 0


def json_events(lines: Iterable[str], name: str | None = None) -> list[dict[str, Any]]:
    """The JSON log events among ``lines`` (other lines skipped), optionally one kind."""
    out = []
    for line in lines:
        if name is not None and name not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and (name is None or event.get("event") == name):
            out.append(event)
    return out


def make_immutable(made: list[Path], path: Path) -> None:
    """``chattr +i path`` (EPERM even for root), remembered in ``made`` (the ``immutable``
    fixture clears them); skips the test where the flag cannot be set."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        import pytest

        pytest.skip(f"cannot set the immutable flag here: {done.stderr.strip()}")
    made.append(path)

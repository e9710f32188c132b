"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_api import FakeWithoutBG
from tests.pg import pg, pg_db, pg_password_file  # noqa: F401  (fixtures: the PostgreSQL cluster)
from tests.support import API_KEY, DaemonProcess, Folders


@pytest.fixture
def fake_api() -> Iterator[FakeWithoutBG]:
    """A running fake withoutBG server (7 requests / 60 s, API key ``test-key``)."""
    with FakeWithoutBG(rate_limit=7, rate_period=60.0, api_key="test-key") as api:
        yield api


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    """inbox (created), outbox, quarantine, archive and state folders below tmp_path."""
    return Folders.make(tmp_path)


@pytest.fixture
def api() -> Iterator[FakeWithoutBG]:
    """A fast fake server (50 requests / s) that the daemon's test settings point at."""
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0) as server:
        yield server


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start ``dropcut run`` processes (``make`` builds one from the environment: a
    :class:`DaemonProcess` or a subclass) and wait for ``daemon_started``; any still
    running at the end is killed (by pid)."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str], make: Callable[[dict[str, str]], DaemonProcess] = DaemonProcess) -> Any:
        proc = make(env).start()
        started.append(proc)
        proc.wait_event("daemon_started", timeout=20)
        return proc

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Folders made immutable (EPERM even for root) during a test, by
    :func:`tests.support.make_immutable`; cleared afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)

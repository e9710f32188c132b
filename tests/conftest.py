"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders


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

"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_api import FakeWithoutBG


@pytest.fixture
def fake_api() -> Iterator[FakeWithoutBG]:
    """A running fake withoutBG server (7 requests / 60 s, API key ``test-key``)."""
    with FakeWithoutBG(rate_limit=7, rate_period=60.0, api_key="test-key") as api:
        yield api

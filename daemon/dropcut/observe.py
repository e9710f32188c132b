"""What the pipeline tells whoever counts (the Prometheus metrics) and whoever alerts people
(the notifications): two small interfaces the stages call at those moments, so that counting
lives in :mod:`dropcut.metrics` and delivering in :mod:`dropcut.notify`, not in the stages.

A :class:`Recorder` must be quick and must not raise: it is called on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from dropcut.queue import RequestRecord

Outcome = Literal["published", "reused", "quarantined", "cancelled"]
"""How a file left the pipeline: ``published`` (outputs from a request), ``reused``
(outputs from the result cache, no request), ``quarantined`` (refused, at inspection or by
the API), ``cancelled`` (deleted or replaced before it was done)."""

OUTCOMES: tuple[Outcome, ...] = ("published", "reused", "quarantined", "cancelled")


class Recorder(Protocol):
    def request_finished(self, record: RequestRecord) -> None:
        """One request to the API ended (answered or not)."""

    def file_finished(self, outcome: Outcome) -> None:
        """One file left the pipeline."""


class NoRecorder:
    """Counts nothing (the HTTP side is off, or in tests of the stages)."""

    def request_finished(self, record: RequestRecord) -> None:
        pass

    def file_finished(self, outcome: Outcome) -> None:
        pass


class Alerts(Protocol):
    """Where the messages for people go (:class:`dropcut.notify.Notifications`): quick,
    never blocking, never raising."""

    def emit(self, event: Mapping[str, Any]) -> None:
        """Send a message built by :mod:`dropcut.notify`'s builders."""


class NoAlerts:
    """Sends nothing (no ``notify_command`` / ``notify_url``, or in tests of the stages)."""

    def emit(self, event: Mapping[str, Any]) -> None:
        pass

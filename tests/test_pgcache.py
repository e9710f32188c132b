"""The shared result cache (issue 13, item 4): a result stored by one daemon is found by
another (no second request), bounded least-recently-used in the database, and the
database being away never fails a call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dropcut.pgcache import PgResultCache
from dropcut.pgqueue import PgJobQueue, QueueUnavailable
from tests.pg import PASSWORD, Cluster
from tests.support import wait_for

A, B, C, D, E = (ch * 64 for ch in "abcde")


class Daemons:
    """Queues and caches of several daemons (each its own connection and folder)."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.queues: list[PgJobQueue] = []

    def cache(self, name: str, *, max_bytes: int = 10_000, share_max_bytes: int = 1 << 20) -> PgResultCache:
        queue = PgJobQueue(
            self.url,
            password=PASSWORD,
            site=f"site-{name}",  # results are shared by content, across sites
            daemon_id=name,
            key_id="k",
            reconnect_max_seconds=0.5,
        )
        self.queues.append(queue)
        return PgResultCache(
            self.root / name / "results", max_bytes=max_bytes, queue=queue, share_max_bytes=share_max_bytes
        )

    def close(self) -> None:
        for queue in self.queues:
            queue.close()


@pytest.fixture
def daemons(pg_db: str, tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(pg_db, tmp_path)
    yield made
    made.close()


def result(tmp_path: Path, size: int, fill: bytes = b"x") -> Path:
    path = tmp_path / f"result-{size}-{fill.decode()}.png"
    path.write_bytes(fill * size)
    return path


def keys_in_db(cache: PgResultCache) -> set[str]:
    with cache._queue.transaction() as db:
        return {row[0] for row in db.execute("SELECT result_key FROM results")}


def test_a_result_stored_on_one_machine_is_found_on_another(daemons: Daemons, tmp_path: Path) -> None:
    one, two = daemons.cache("one"), daemons.cache("two")
    assert two.get(A) is None
    one.store(A, result(tmp_path, 1000, b"m"))
    found = two.get(A)
    assert found is not None and found.parent == two.directory
    assert found.read_bytes() == b"m" * 1000
    assert two.total_bytes == 1000 and two.path(A) == found
    assert not list(two.directory.glob("*.tmp"))
    assert two.get(A) == found  # from its own folder now
    assert one.shared_bytes() == 1000


def test_the_database_keeps_the_most_recently_used_within_max_bytes(daemons: Daemons, tmp_path: Path) -> None:
    one, two = daemons.cache("one", max_bytes=2500), daemons.cache("two", max_bytes=2500)
    one.store(A, result(tmp_path, 1000, b"a"))
    one.store(B, result(tmp_path, 1000, b"b"))
    assert two.get(A) is not None  # used on another machine: B is now the oldest
    one.store(C, result(tmp_path, 1000, b"c"))
    assert keys_in_db(one) == {A, C}
    assert one.shared_bytes() == 2000
    three = daemons.cache("three")
    assert three.get(B) is None and three.get(C) is not None
    # a smaller bound (a reload) evicts at once
    one.max_bytes = 1500
    one.evict()
    assert keys_in_db(one) == {C} and one.total_bytes == 1000


def test_large_results_stay_local_and_no_cache_means_no_cache(daemons: Daemons, tmp_path: Path) -> None:
    one = daemons.cache("one", share_max_bytes=500)
    one.store(A, result(tmp_path, 1000))
    assert one.get(A) is not None and daemons.cache("two").get(A) is None
    off = daemons.cache("off", max_bytes=0)
    off.store(B, result(tmp_path, 10))
    assert off.get(B) is None and keys_in_db(one) == set()


def test_the_database_away_never_fails_the_cache_and_it_shares_later(
    pg: Cluster, daemons: Daemons, tmp_path: Path
) -> None:
    one, two = daemons.cache("one"), daemons.cache("two")
    one.store(A, result(tmp_path, 100, b"a"))
    try:
        pg.stop()
        one.store(D, result(tmp_path, 100, b"d"))  # kept locally
        assert one.get(D) is not None and one.get(A) is not None
        assert two.get(D) is None and two.get(A) is None  # away: a miss, not an error
        with pytest.raises(QueueUnavailable):
            one.shared_bytes()
    finally:
        pg.start()

    def back() -> bool:
        try:
            return one.shared_bytes() >= 0 and two.shared_bytes() >= 0
        except QueueUnavailable:
            return False

    wait_for(back, timeout=30, interval=0.1)
    one.store(E, result(tmp_path, 100, b"e"))  # shares what it could not share before
    assert keys_in_db(one) == {A, D, E}
    found = two.get(D)
    assert found is not None and found.read_bytes() == b"d" * 100

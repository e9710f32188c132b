"""The shared queue wired into the daemon (issue 13): real ``dropcut run`` processes on one
PostgreSQL database (the throw-away cluster of :mod:`tests.pg`) and one API key, against a
strict fake API.

* three daemons, two sites (one of them served by two daemons on one inbox): no 429, the
  key's allowance used to the last slot, no file queued or sent twice, the same photo on
  both sites paid once (the shared result cache), ``dropcut status`` showing them all;
* ``kill -9`` of one daemon of the doubled site mid-batch: its jobs are done by the other
  once its lease is over, nothing lost or doubled;
* PostgreSQL stopped for 20 s mid-batch: every file done, none quarantined;
* ``dropcut queue migrate`` of a populated SQLite queue, and the daemon going on with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.fake_api import FakeWithoutBG
from tests.pg import PASSWORD, Cluster
from tests.support import API_KEY, REPO, DaemonProcess, Folders, drop, image_bytes, wait_for

LIMIT, PERIOD = 7, 3.0  # the strict fake's allowance (a short period: the tests stay short)
LEASE = 5.0  # the shortest lease_seconds allows: a dead daemon's jobs come back after it


@dataclass
class Site:
    """Folders of one site: one inbox, outbox, quarantine and archive (a NAS share that
    each of its daemons mounts), and a state folder per daemon."""

    name: str
    root: Path

    def folders(self, daemon: str) -> Folders:
        return Folders(
            root=self.root,
            inbox=self.root / "inbox",
            outbox=self.root / "outbox",
            quarantine=self.root / "quarantine",
            archive=self.root / "archive",
            state=self.root / f"state-{daemon}",
        )

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def outputs(self) -> list[str]:
        return self.folders("").files(self.outbox)


@dataclass
class Shared:
    """What the daemons of a test share: the database, its password file, the fake API."""

    url: str
    password_file: Path
    api: FakeWithoutBG
    tmp: Path

    def site(self, name: str) -> Site:
        site = Site(name, self.tmp / name)
        site.inbox.mkdir(parents=True, exist_ok=True)
        return site

    def env(self, site: Site, daemon: str, **overrides: Any) -> dict[str, str]:
        values: dict[str, Any] = {
            "queue_url": self.url,
            "queue_password_file": self.password_file,
            "site": site.name,
            "lease_seconds": LEASE,
            "request_timeout_seconds": LEASE,
            "rate_limit_requests": LIMIT,
            "rate_limit_period_seconds": PERIOD,
            "max_in_flight": 4,
            "hold_batches_over": 0,
            "credit_check_interval_seconds": 5.0,
            **overrides,
        }
        return site.folders(daemon).env(self.api.url, **values)

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, password=PASSWORD, autocommit=True) as conn:
            return conn.execute(query.encode(), args or None).fetchall()

    def jobs(self, site: str) -> Counter[str]:
        return Counter(
            {
                str(s): int(n)
                for s, n in self.sql("SELECT state, COUNT(*) FROM jobs WHERE site=%s GROUP BY state", site)
            }
        )


@pytest.fixture
def shared(pg: Cluster, pg_db: str, pg_password_file: Path, tmp_path: Path) -> Iterator[Shared]:
    with FakeWithoutBG(api_key=API_KEY, rate_limit=LIMIT, rate_period=PERIOD) as api:
        yield Shared(pg_db, pg_password_file, api, tmp_path)


def photos(site: Site, names: list[str], seed: int) -> dict[str, bytes]:
    """Distinct small JPEGs, written into the site's inbox; returns name -> bytes."""
    made = {name: image_bytes(seed=seed + i) for i, name in enumerate(names)}
    for name, data in made.items():
        drop(site.inbox, name, data)
    return made


def share(starts: list[float], limit: int, period: float) -> float:
    """The share of the allowance used (as tests/test_pgpace.py and the benchmarks count
    it): the ideal span of N requests (the first ``limit`` at once, ``limit`` more every
    ``period``) over the span they took."""
    starts = sorted(starts)
    ideal = math.floor((len(starts) - 1) / limit) * period
    return ideal / (starts[-1] - starts[0])


def max_in_window(arrivals: list[float], period: float) -> int:
    arrivals = sorted(arrivals)
    best, first = 0, 0
    for i, t in enumerate(arrivals):
        while arrivals[first] <= t - period:
            first += 1
        best = max(best, i - first + 1)
    return best


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dropcut.cli", *args], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def start_all(spawn: Callable[..., DaemonProcess], envs: list[dict[str, str]]) -> list[DaemonProcess]:
    """Start the daemons at once (each waits for ``daemon_started``)."""
    procs = [DaemonProcess(env).start() for env in envs]
    for proc in procs:
        spawn_adopt(spawn, proc)
    for proc in procs:
        proc.wait_event("daemon_started", timeout=30)
    return procs


def spawn_adopt(spawn: Any, proc: DaemonProcess) -> None:
    """Hand a started process to the ``spawn`` fixture, which kills it at the end."""
    spawn(proc.env, make=lambda env: _Adopted(proc))


class _Adopted(DaemonProcess):
    def __init__(self, proc: DaemonProcess) -> None:
        super().__init__(proc.env)
        self.__dict__.update(proc.__dict__)

    def start(self) -> DaemonProcess:
        return self


def no_errors(proc: DaemonProcess) -> None:
    crashed = [e for e in proc.events() if e.get("event") in ("stage_crashed", "job_crashed", "job_failed")]
    assert not crashed, crashed


@pytest.mark.slow
def test_three_daemons_two_sites_one_key(shared: Shared, spawn: Any) -> None:
    """Three daemons on one API key: studio (two daemons, one inbox) and office (one). The
    strict fake sees no 429 and the key's allowance used to the last slot; every file is
    queued once and sent once; the same photo later dropped on the other site costs no
    request; ``dropcut status`` shows both sites and all three daemons."""
    studio, office = shared.site("studio"), shared.site("office")
    n = LIMIT * 6 + 1  # (the share's ideal span is whole windows: 7 m + 1 requests)
    made = {
        **{
            f"studio/{k}": v
            for k, v in photos(studio, [f"s{i:02}.jpg" for i in range(n * 2 // 3)], 100).items()
        },
        **{
            f"office/{k}": v
            for k, v in photos(office, [f"o{i:02}.jpg" for i in range(n - n * 2 // 3)], 500).items()
        },
    }
    envs = [
        shared.env(studio, "a"),
        shared.env(studio, "b"),
        shared.env(office, "c", http_listen="127.0.0.1:0"),
    ]
    procs = start_all(spawn, envs)
    wait_for(lambda: len(studio.outputs()) + len(office.outputs()) >= n, timeout=60)
    wait_for(lambda: shared.jobs("studio")["done"] + shared.jobs("office")["done"] == n, timeout=20)

    records = shared.api.records()
    statuses = Counter(r.status for r in records)
    assert statuses == {200: n}, statuses  # no 429, no second request for anything
    uploaded = Counter(r.sha256 for r in records)
    assert sorted(uploaded.values()) == [1] * n  # every file sent once
    assert set(uploaded) == {hashlib.sha256(v).hexdigest() for v in made.values()}
    arrivals = [r.arrived for r in records]
    assert max_in_window(arrivals, PERIOD) <= LIMIT
    used = share(arrivals, LIMIT, PERIOD)
    print(f"share of the allowance: {used:.4f} ({n} requests, 3 daemons)")
    assert used >= 0.98, used
    # each file queued once, though two daemons of the studio saw it
    assert shared.sql("SELECT COUNT(*) FROM jobs")[0][0] == n
    assert sorted(studio.outputs()) == sorted(
        k.split("/", 1)[1].replace(".jpg", ".png") for k in made if k.startswith("studio/")
    )
    # both daemons of the studio did some of its work
    studio_done = [sum(1 for e in p.events("output_written")) for p in procs[:2]]
    assert all(studio_done), studio_done

    # the same photo on the other site: from the shared result cache, no request
    again = made["studio/s00.jpg"]
    drop(office.inbox, "copy-of-s00.jpg", again)
    wait_for(lambda: (office.outbox / "copy-of-s00.png").exists(), timeout=20)
    assert len(shared.api.records()) == n
    assert any(e.get("file") == "copy-of-s00.jpg" for e in procs[2].events("result_reused"))

    # dropcut status: every site and daemon, the key's window
    done = cli(envs[0], "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["shared"]["sites"]) == {"studio", "office"}
    daemons = report["shared"]["daemons"]
    assert len(daemons) == 3 and all(d["alive"] for d in daemons), daemons
    assert sorted(d["site"] for d in daemons) == ["office", "studio", "studio"]
    assert sum(d["this_machine"] for d in daemons) == 1
    # the status page and the metrics of the office's daemon: its site, from the database
    page_url = procs[2].wait_event("http_listening")["url"]
    page = httpx.get(page_url, timeout=10)
    assert page.status_code == 200 and "copy-of-s00.jpg" in page.text
    metrics = httpx.get(page_url + "metrics", timeout=10).text
    assert 'dropcut_jobs{state="done"} ' + str(n - n * 2 // 3 + 1) in metrics, metrics
    assert 'dropcut_condition{code="queue_unavailable"} 0.0' in metrics
    assert report["shared"]["window"]["limit"] == LIMIT
    assert PASSWORD not in done.stdout
    text = cli(envs[2], "status")
    assert text.returncode == 0, text.stderr
    assert "site studio:" in text.stdout and "site office:" in text.stdout, text.stdout
    assert text.stdout.count("\n  daemon ") == 3, text.stdout

    for proc in procs:
        assert proc.stop() == 0
        no_errors(proc)
    stopped = shared.sql("SELECT COUNT(*) FROM daemons WHERE stopped_at IS NOT NULL")[0][0]
    assert stopped == 3


def daemon_id_of(shared: Shared, proc: DaemonProcess) -> str:
    started = proc.wait_event("queue_opened")
    return str(started["daemon"])


@pytest.mark.slow
def test_kill_9_of_one_daemon_its_jobs_are_done_by_the_other_after_the_lease(
    shared: Shared, spawn: Any
) -> None:
    """Two daemons serve the studio from one inbox; one is killed (SIGKILL) while it holds
    jobs. They stay its own until its lease is over, then the other daemon does them:
    every file gets its one output, none is lost, none is published twice, and only a
    request that was on its way at the kill is sent again."""
    shared.api.latency = 0.8  # requests take a while: some are on their way at the kill
    studio = shared.site("studio")
    n = 20
    made = photos(studio, [f"p{i:02}.jpg" for i in range(n)], 900)
    a, b = start_all(spawn, [shared.env(studio, "a"), shared.env(studio, "b")])
    a_id = daemon_id_of(shared, a)

    def a_holds() -> list[tuple[Any, ...]]:
        return shared.sql(
            "SELECT id, rel_path, sha256, lease_until - extract(epoch from clock_timestamp()) FROM jobs "
            "WHERE lease_owner=%s AND state='inflight'",
            a_id,
        )

    wait_for(lambda: len(studio.outputs()) >= 3 and len(a_holds()) >= 2, timeout=30, interval=0.01)
    a.kill9()
    killed_at = time.time()
    held = a_holds()
    assert held, "the killed daemon held no job"
    lease_left = min(float(row[3]) for row in held)
    assert 0 < lease_left <= LEASE
    # Not taken at once: still the dead daemon's while its lease lasts.
    if lease_left > 1.5:
        time.sleep(0.5)  # (b claims and renews meanwhile: it must not take them)
        assert {row[0] for row in a_holds()} == {row[0] for row in held}

    wait_for(lambda: len(studio.outputs()) == n, timeout=60)
    wait_for(lambda: shared.jobs("studio")["done"] == n, timeout=20)
    assert sorted(studio.outputs()) == sorted(name.replace(".jpg", ".png") for name in made)
    assert not studio.quarantine.exists() or not studio.folders("").files(studio.quarantine)
    assert shared.sql("SELECT COUNT(*) FROM jobs")[0][0] == n

    records = shared.api.records()
    assert not [r for r in records if r.status == 429]
    sent = Counter(r.sha256 for r in records if r.status == 200)
    assert set(sent) == {hashlib.sha256(v).hexdigest() for v in made.values()}
    twice = {sha for sha, count in sent.items() if count > 1}
    held_shas = {str(row[2]) for row in held}
    assert twice <= held_shas, (twice, held_shas)  # only what was on its way at the kill
    assert max(sent.values()) <= 2
    # the dead daemon's jobs went out again only once its lease was over
    for r in records:
        if r.sha256 in held_shas and r.arrived > killed_at:
            assert r.arrived >= killed_at + lease_left - 0.5, (r, killed_at, lease_left)
    # and by the other daemon, which published them
    written = {e["file"] for e in b.events("output_written")}
    assert {str(row[1]) for row in held} <= written
    assert b.stop() == 0
    no_errors(b)


@pytest.mark.slow
def test_postgresql_stopped_for_20_s_mid_batch(shared: Shared, pg: Cluster, spawn: Any) -> None:
    """The database goes away for 20 s in the middle of a batch, then comes back: the
    daemons show the condition queue_unavailable meanwhile, keep running, and afterwards
    finish every file; nothing is quarantined or lost, nothing published twice."""
    shared.api.latency = 0.3
    studio, office = shared.site("studio"), shared.site("office")
    per_site = 14
    made = {
        **{
            f"studio/{k}": v
            for k, v in photos(studio, [f"s{i:02}.jpg" for i in range(per_site)], 1300).items()
        },
        **{
            f"office/{k}": v
            for k, v in photos(office, [f"o{i:02}.jpg" for i in range(per_site)], 1700).items()
        },
    }
    procs = start_all(
        spawn,
        [
            shared.env(studio, "a"),
            shared.env(studio, "b"),
            shared.env(office, "c", http_listen="127.0.0.1:0"),
        ],
    )
    page_url = procs[2].wait_event("http_listening")["url"]
    wait_for(lambda: len(studio.outputs()) + len(office.outputs()) >= 6, timeout=30)
    pg.stop()
    stopped_at = time.monotonic()
    try:
        for proc in procs:
            wait_for(
                lambda proc=proc: any(
                    e.get("code") == "queue_unavailable" for e in proc.events("condition_started")
                ),
                timeout=15,
            )
        # the page says why it cannot show the queue; the metrics show the condition
        page = httpx.get(page_url, timeout=10)
        assert page.status_code == 503 and "queue database" in page.text, page.text
        assert PASSWORD not in page.text
        metrics = httpx.get(page_url + "metrics", timeout=10).text
        assert 'dropcut_condition{code="queue_unavailable"} 1.0' in metrics, metrics
        while time.monotonic() < stopped_at + 20:  # the outage lasts 20 s; the daemons live on
            assert all(p.proc is not None and p.proc.poll() is None for p in procs)
            time.sleep(0.5)
    finally:
        pg.start()
    wait_for(lambda: len(studio.outputs()) + len(office.outputs()) == 2 * per_site, timeout=60)
    wait_for(
        lambda: shared.jobs("studio")["done"] + shared.jobs("office")["done"] == 2 * per_site, timeout=30
    )
    for site in (studio, office):
        assert not site.quarantine.exists() or not site.folders("").files(site.quarantine)
    assert shared.sql("SELECT COUNT(*) FROM jobs WHERE state <> 'done'")[0][0] == 0
    expected = {k.split("/", 1)[1].replace(".jpg", ".png") for k in made}
    assert set(studio.outputs()) | set(office.outputs()) == expected
    records = shared.api.records()
    assert not [r for r in records if r.status == 429]
    sent = Counter(r.sha256 for r in records if r.status == 200)
    assert set(sent) == {hashlib.sha256(v).hexdigest() for v in made.values()}
    assert max(sent.values()) <= 2  # (an answer that came while the database was away: maybe again)
    for proc in procs:
        wait_for(
            lambda proc=proc: any(
                e.get("code") == "queue_unavailable" for e in proc.events("condition_ended")
            ),
            timeout=10,
        )
        assert not proc.events("file_quarantined")
        assert proc.stop() == 0
        no_errors(proc)


@pytest.mark.slow
def test_queue_migrate_moves_a_populated_sqlite_queue(shared: Shared, spawn: Any) -> None:
    """A daemon's SQLite queue with done, quarantined and pending jobs (a day's budget
    stopped it) is moved with ``dropcut queue migrate --to URL``; the daemon then runs on
    the shared queue and finishes the pending ones, without sending the done ones again;
    ``dropcut retry`` works on the moved quarantine."""
    shared.api.rate_limit = 50
    studio = shared.site("studio")
    folders = studio.folders("a")
    lite_env = folders.env(
        shared.api.url, budget_per_day=3, queue_password_file=shared.password_file, site=studio.name
    )
    made = photos(studio, [f"p{i}.jpg" for i in range(6)], 2100)
    drop(studio.inbox, "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    lite = spawn(lite_env)
    lite.wait_event("budget_reached", timeout=30)
    wait_for(lambda: len(studio.outputs()) == 3 and lite.events("file_quarantined"), timeout=30)

    refused = cli(lite_env, "queue", "migrate", "--to", shared.url)
    assert refused.returncode == 1 and "is running: stop it first" in refused.stderr, refused.stderr
    assert lite.stop() == 0
    leaked = cli(lite_env, "queue", "migrate", "--to", shared.url.replace("dropcut@", f"dropcut:{PASSWORD}@"))
    assert leaked.returncode == 2 and PASSWORD not in leaked.stderr + leaked.stdout, leaked

    done = cli(lite_env, "queue", "migrate", "--to", shared.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("migrated 7 jobs"), done.stdout
    assert PASSWORD not in done.stdout
    assert (folders.state / "queue.sqlite3.migrated").exists()
    assert not (folders.state / "queue.sqlite3").exists()
    again = cli(lite_env, "queue", "migrate", "--to", shared.url)
    assert again.returncode == 1 and "nothing to migrate" in again.stderr, again.stderr
    assert shared.jobs("studio") == Counter({"done": 3, "queued": 3, "quarantined": 1})

    env = shared.env(studio, "a", rate_limit_requests=50, rate_limit_period_seconds=1.0)
    daemon = spawn(env)
    wait_for(lambda: len(studio.outputs()) == 6, timeout=30)
    wait_for(lambda: shared.jobs("studio")["done"] == 6, timeout=20)
    sent = Counter(r.sha256 for r in shared.api.records() if r.status == 200)
    assert set(sent) == {hashlib.sha256(v).hexdigest() for v in made.values()}
    assert max(sent.values()) == 1
    # the request log came along: the day's budget counts the requests made before
    budget = cli(env, "budget")
    assert budget.returncode == 0, budget.stderr
    assert "this day: 6 requests" in budget.stdout, budget.stdout
    # the quarantine came along: retry from the shared queue
    retried = cli(env, "retry", "broken.jpg")
    assert retried.returncode == 0, retried.stderr
    assert "requeued broken.jpg -> inbox/broken.jpg" in retried.stdout
    wait_for(lambda: len(daemon.events("file_quarantined")) >= 1, timeout=20)
    assert daemon.stop() == 0
    no_errors(daemon)


def test_a_daemon_that_cannot_reach_the_database_at_start_exits_1(
    folders: Folders, api: FakeWithoutBG, pg_password_file: Path
) -> None:
    """No database at start: exit 1 (systemd starts it again), one line that says why,
    no password in it; ``dropcut status`` says it too."""
    from tests.pg import free_port

    url = f"postgresql://dropcut@127.0.0.1:{free_port()}/dropcut"
    env = folders.env(api.url, queue_url=url, queue_password_file=pg_password_file, site="studio")
    proc = DaemonProcess(env).start()
    assert proc.wait(30) == 1
    failed = proc.events("daemon_start_failed")
    assert failed and "unavailable" in failed[0]["reason"], proc.lines
    assert not proc.events("daemon_started")
    assert PASSWORD not in "\n".join(proc.lines)
    status = cli(env, "status")
    assert status.returncode == 1 and "cannot read the queue" in status.stderr, status

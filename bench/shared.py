"""Benchmark: several daemons on one API key through the shared PostgreSQL queue (issue 13).

Side by side, on the same strict fake server (7 requests per 6 s, the real allowance
compressed ten times) with a simulated latency of 0.5 s and the same backlog per run
(43 photos: ``7 m + 1``, so that the share's ideal span is whole windows):

* ``sqlite, 1 daemon``: today's single machine (the SQLite queue in ``state_dir``);
* ``shared, 1 daemon``: the same daemon on the shared queue (its cost alone);
* ``shared, 3 daemons``: three daemons on one key, two sites (``studio`` served by two
  daemons on one inbox, ``office`` by one), the photos split between the sites.

Per run: the share of the allowance used (the ideal span of N requests, the first 7 at
once and 7 more every period, over the span they took), the 429s, the most requests in any
window, the files sent twice. For the shared runs also: database transactions per job
(``pg_stat_database.xact_commit`` of the queue's database over the run, every connection
of every daemon: claims, leases, heartbeats, the rate window, the cache), and what the
design keeps in PostgreSQL per job (rows and bytes of each table, with the matte: the
runs use ``api_mode = "matte"``), extrapolated to a site doing 10,080 photos a day (7 a
minute, all day). Then the claim's latency alone: ``PgJobQueue.claim`` on a queue of
1,000 jobs, from this process.

Needs PostgreSQL's server binaries (Debian's ``postgresql``): a throw-away cluster is made
in a temporary folder (:mod:`tests.pg`) and removed at the end.

Run: ``python -m bench.shared`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    LIMIT,
    PERIOD,
    BenchError,
    DaemonProc,
    Dirs,
    count_pngs,
    daemon_env,
    fake_api,
    machine,
    md_table,
    percentile,
    report,
    verdict,
    wait_until,
)
from bench.images import photo_jpeg

FILES = LIMIT * 6 + 1
LATENCY = 0.5
TARGET_SHARE = 0.98
LEASE = 20.0
PER_DAY = 10_080  # 7 a minute for 24 hours
TABLES = ("jobs", "outputs", "meta", "requests", "daemons", "rate_keys", "rate_slots", "results")


def share(arrivals: list[float]) -> float:
    arrivals = sorted(arrivals)
    ideal = math.floor((len(arrivals) - 1) / LIMIT) * PERIOD
    return ideal / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")


def max_in_window(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - PERIOD:
            j += 1
        best = max(best, i - j + 1)
    return best


class Database:
    """A throw-away cluster (tests.pg) and one database in it for each run."""

    def __init__(self) -> None:
        from tests.pg import _start_cluster

        self.root = Path(tempfile.mkdtemp(prefix="dropcut-bench-pg-"))
        os.chmod(self.root, 0o755)
        try:
            self.cluster = _start_cluster(self.root)
        except BaseException as exc:  # (pytest.skip when the server is not installed)
            shutil.rmtree(self.root, ignore_errors=True)
            raise BenchError(f"no PostgreSQL server to run on: {exc}") from None
        self.password_file = self.root / "queue-password"
        from tests.pg import PASSWORD

        self.password = PASSWORD
        self.password_file.write_text(PASSWORD + "\n")

    def fresh(self) -> str:
        return self.cluster.url(self.cluster.fresh_db())

    def connect(self, url: str) -> psycopg.Connection[Any]:
        return psycopg.connect(url, password=self.password, autocommit=True)

    def close(self) -> None:
        self.cluster.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def commits(db: Database, url: str) -> int:
    with db.connect(url) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
        return int(row[0])


def footprint(db: Database, url: str) -> dict[str, dict[str, float]]:
    """Rows and bytes (table, indexes, TOAST) of each table of the shared queue."""
    out = {}
    with db.connect(url) as conn:
        conn.execute("VACUUM ANALYZE")
        for table in TABLES:
            rows = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # (constants)
            size = conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()
            body = (0,)
            if table == "results":
                body = conn.execute(
                    "SELECT COALESCE(SUM(octet_length(body)), 0) FROM results"
                ).fetchone() or (0,)
            assert rows is not None and size is not None
            out[table] = {"rows": int(rows[0]), "bytes": int(size[0]), "payload": int(body[0])}
    return out


def run(name: str, daemons: int, db: Database | None, work: str) -> dict[str, Any]:
    """One run: ``daemons`` daemons (1 or 3) on a fresh queue, FILES photos in the inboxes
    before they start; returns its figures."""
    api = fake_api(rate_limit=LIMIT, rate_period=PERIOD, latency=LATENCY)
    api.start()
    procs: list[DaemonProc] = []
    url = db.fresh() if db is not None else None
    try:
        common: dict[str, Any] = {
            "api_mode": "matte",
            "lease_seconds": LEASE,
            "request_timeout_seconds": LEASE,
        }
        if url is not None and db is not None:
            common.update(queue_url=url, queue_password_file=db.password_file)
        layout = [("studio", "a")] if daemons == 1 else [("studio", "a"), ("studio", "b"), ("office", "c")]
        roots: dict[str, Dirs] = {}
        envs = []
        for site, daemon in layout:
            if site not in roots:
                roots[site] = Dirs.fresh(f"{work}/{site}")
            dirs = roots[site]
            own = Dirs.make(dirs.root)
            own.state = dirs.root / f"state-{daemon}"
            envs.append(daemon_env(own, api.url, site=site, **common))
        sites = list(roots.values())
        for i in range(FILES):
            (sites[i % len(sites)].inbox / f"photo{i:02d}.jpg").write_bytes(photo_jpeg(7000 + i))
        before = commits(db, url) if db is not None and url is not None else 0
        started = time.monotonic()
        procs = [DaemonProc(env, Path(env["DROPCUT_STATE_DIR"]) / "daemon.log").start() for env in envs]

        def done() -> bool:
            for proc in procs:
                proc.check_alive()
            return sum(count_pngs(d.outbox) for d in sites) >= FILES

        wait_until(done, timeout=FILES / LIMIT * PERIOD * 3 + 60, what=f"{FILES} outputs ({name})")
        elapsed = time.monotonic() - started
        records = api.records()
        after = commits(db, url) if db is not None and url is not None else 0
        sizes = footprint(db, url) if db is not None and url is not None else None
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop()
        api.stop()
    ok = [r for r in records if r.status == 200]
    sent = Counter(r.sha256 for r in ok)
    figures: dict[str, Any] = {
        "name": name,
        "daemons": daemons,
        "requests": len(ok),
        "n429": sum(1 for r in records if r.status == 429),
        "share": share([r.arrived for r in ok]),
        "max_in_window": max_in_window([r.arrived for r in records if r.status != 429]),
        "sent_twice": sum(1 for n in sent.values() if n > 1),
        "seconds": round(elapsed, 1),
    }
    if sizes is not None:
        figures["transactions_per_job"] = round((after - before) / FILES, 1)
        figures["tables"] = sizes
    return figures


def claim_latency(db: Database, jobs: int = 1000, claims: int = 200) -> dict[str, float]:
    """``PgJobQueue.claim`` (one round trip of a transaction) on a site with ``jobs``
    queued, from this process: milliseconds, p50 and p95."""
    from dropcut.pgqueue import PgJobQueue
    from dropcut.queue import NewJob

    url = db.fresh()
    queue = PgJobQueue(url, password=db.password, site="studio", daemon_id="bench/claims", key_id="k")
    try:
        new = [
            NewJob(f"p{i:05d}.jpg", f"{i:064x}", 1000, i, i, 1, "jpeg", 0.0, ctime_ns=i) for i in range(jobs)
        ]
        queue.enqueue_many(new, requeue_done=False)
        times = []
        for _ in range(claims):
            t0 = time.perf_counter()
            job = queue.claim()
            times.append((time.perf_counter() - t0) * 1000)
            assert job is not None
    finally:
        queue.close()
    return {"p50_ms": round(percentile(times, 50), 2), "p95_ms": round(percentile(times, 95), 2)}


def synthetic_footprint(db: Database, matte_bytes: int, jobs: int = 10_000) -> dict[str, float]:
    """Bytes per job (table, indexes, TOAST) of the tables that grow with the jobs, for
    ``jobs`` done jobs with an output name, a logged request and a cached matte of
    ``matte_bytes`` each (the small runs above are below the tables' page granularity)."""
    from dropcut.pgqueue import PgJobQueue
    from dropcut.queue import NewJob

    url = db.fresh()
    queue = PgJobQueue(url, password=db.password, site="studio", daemon_id="bench/size", key_id="k" * 64)
    rule = (lambda rel: [[rel.rsplit(".", 1)[0] + ".png"]], str.lower)
    try:
        for start in range(0, jobs, 500):
            batch = [
                NewJob(
                    f"shoot-{i // 500:03d}/IMG_{i:05d}.jpg",
                    os.urandom(32).hex(),
                    6_000_000,
                    i,
                    i,
                    1,
                    "jpeg",
                    time.time(),
                    ctime_ns=i,
                )
                for i in range(start, min(jobs, start + 500))
            ]
            queue.enqueue_many(batch, requeue_done=False, outputs=rule)
        entry = (
            '[{"attempt": 1, "at": 1764500000.123, "status": 200, "detail": null, "transport_error": null, '
            '"body_problem": null, "duration_ms": 2140}]'
        )
        with queue.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state='done', output_rel = replace(rel_path, '.jpg', '.png'), "
                "history = %s::jsonb, archived_as = rel_path",
                (entry,),
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO requests (key_id, site, started, endpoint, status, seconds, sent, received) "
                    "VALUES (%s, 'studio', %s, '/v1.0/alpha-channel', 200, 2.1, 180000, %s)",
                    [("k" * 64, time.time() + i, matte_bytes) for i in range(jobs)],
                )
                cur.executemany(
                    "INSERT INTO results (result_key, body, stored_at, used_at) VALUES (%s, %s, 0, 0)",
                    [(f"{os.urandom(32).hex()}-matte-1024", os.urandom(matte_bytes)) for _ in range(jobs)],
                )
    finally:
        queue.close()
    sizes = footprint(db, url)
    return {t: sizes[t]["bytes"] / jobs for t in ("jobs", "outputs", "requests", "results")}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    db = Database()
    try:
        runs = [
            run("sqlite, 1 daemon", 1, None, "shared-sqlite"),
            run("shared, 1 daemon", 1, db, "shared-one"),
            run("shared, 3 daemons", 3, db, "shared-three"),
        ]
        claims = claim_latency(db)
        three = runs[-1]["tables"]
        matte = int(three["results"]["payload"] / max(1, three["results"]["rows"]))
        per_job = synthetic_footprint(db, matte)
    finally:
        db.close()
    rows = [
        [
            r["name"],
            r["requests"],
            f"{r['share']:.3f}",
            r["n429"],
            f"{r['max_in_window']}/{LIMIT}",
            r["sent_twice"],
            r.get("transactions_per_job", "—"),
            r["seconds"],
            verdict(r["share"] >= TARGET_SHARE and r["n429"] == 0),
        ]
        for r in runs
    ]
    table = md_table(
        ["run", "requests", "share of allowance", "429s", "most in a window", "sent twice",
         "db transactions / job", "s", f"share >= {TARGET_SHARE} and no 429"],
        rows,
    )  # fmt: skip
    keeps = {
        "jobs": "for ever (as in SQLite: done jobs keep a file from being sent again)",
        "outputs": "for ever (the names given)",
        "requests": "40 days (the budgets)",
        "results": "up to result_cache_bytes, least recently used dropped",
    }
    cost = md_table(
        ["table", "rows / job", "bytes / job (with indexes)", f"a day at {PER_DAY:,} photos", "kept"],
        [
            [t, "1", f"{size:,.0f}", f"{PER_DAY:,} rows, {size * PER_DAY / 2**20:,.1f} MiB", keeps[t]]
            for t, size in per_job.items()
        ],
    )
    fixed = ", ".join(f"{t} {three[t]['rows']} rows" for t in ("meta", "daemons", "rate_keys", "rate_slots"))
    total = sum(per_job.values())
    notes = [
        f"{FILES} photos of 320x240 per run; fake latency {LATENCY} s; 7 requests per {PERIOD:g} s",
        f"claim latency (PgJobQueue.claim, 1,000 jobs queued, local socket): p50 {claims['p50_ms']} ms, "
        f"p95 {claims['p95_ms']} ms",
        f"a matte in the shared cache: {matte:,} bytes of PNG on average (of 320x240 photos; the "
        "bytes per job above are measured on 10,000 synthetic done jobs with mattes of that size)",
        f"per day at {PER_DAY:,} photos: about {total * PER_DAY / 2**20:,.0f} MiB written; the other "
        f"tables do not grow with the jobs (after the 3-daemon run: {fixed}; rate_slots holds "
        "the last window only)",
    ]
    report(
        "shared",
        "Several machines, one API key: SQLite alone vs the shared queue",
        {
            "machine": machine(),
            "runs": runs,
            "claims": claims,
            "per_job_bytes": per_job,
            "matte_bytes": matte,
        },
        table + "\n\n" + cost,
        notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

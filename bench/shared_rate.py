"""Benchmark: one API key's rate limit shared by several daemons (issue 13, item 3).

The pacer alone (no queue, no files): daemon-like senders (``tests/pgpace_worker.py``, one
process each, ``max_in_flight`` = 4 requests at a time, each request sent by dropcut's
client with ``mark_sent`` from its ``on_sent`` as the dispatcher does) on the strict fake
(7 requests per 6 s: the real allowance ten times faster; 0.5 s latency), for seven
windows each:

* ``1 sender, shared``: one daemon on the key through :class:`dropcut.pgpace.SharedPacer`;
* ``3 senders, shared``: three daemons on one key, one shared window;
* ``3 senders, own pacer``: today, each daemon paced by its own :class:`dropcut.pace.Pacer`
  to the whole allowance (the senders do not back off on a 429 here: the count says how
  often the key's window was overrun).

Per run: accepted requests, 429s, the most accepted in any 6 s, and the share of the
allowance used, two ways: *reuse* (each of the 7 places in the window is taken again one
period later at best: period ÷ the mean time from request i to request i + 7) and *span*
(``bench/rate.py``'s "achieved rate": the ideal span of N requests over the span from the
first to the last; it also counts how spread out the first and last burst arrived).

Needs PostgreSQL's server binaries (a throw-away cluster, :mod:`tests.pg`). The margin is
the daemon's default (period / 240 = 25 ms).

Run: ``python -m bench.shared_rate`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import LIMIT, PERIOD, REPO, BenchError, fake_api, machine, md_table, report, verdict

LATENCY = 0.5
WINDOWS = 7
IN_FLIGHT = 4
TARGET = 0.98


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


def reuse_share(times: list[float], limit: int, period: float) -> float:
    times = sorted(times)
    gaps = [b - a for a, b in zip(times, times[limit:], strict=False)]
    return period / (sum(gaps) / len(gaps)) if gaps else float("nan")


def span_share(times: list[float], limit: int, period: float) -> float:
    times = sorted(times)
    if len(times) < 2:
        return float("nan")
    return math.floor((len(times) - 1) / limit) * period / (times[-1] - times[0])


class Cluster:
    """A throw-away PostgreSQL cluster with the shared schema, one database per run."""

    def __init__(self) -> None:
        from tests.pg import _start_cluster

        self.root = Path(tempfile.mkdtemp(prefix="dropcut-bench-pgpace-"))
        os.chmod(self.root, 0o755)
        try:
            self.cluster = _start_cluster(self.root)
        except BaseException as exc:  # (pytest.skip when the server is not installed)
            shutil.rmtree(self.root, ignore_errors=True)
            raise BenchError(f"no PostgreSQL server to run on: {exc}") from None

    def fresh(self) -> str:
        from tests.pg import PASSWORD

        from dropcut.pgpace import SCHEMA_STEP
        from dropcut.pgschema import conninfo, migrate

        info = conninfo(self.cluster.url(self.cluster.fresh_db()), PASSWORD)
        with psycopg.connect(info, autocommit=True) as conn:
            migrate(conn)
            conn.execute(SCHEMA_STEP.encode())  # (idempotent: a no-op once pgschema has it)
        return info

    def close(self) -> None:
        self.cluster.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def sender_command(info: str, url: str, *, seed: int, start: float, seconds: float, local: bool) -> list[str]:
    from dropcut.pgschema import key_id

    return [
        sys.executable, "-m", "tests.pgpace_worker", "fake",
        "--conninfo", info, "--key-id", key_id("bench-key"), "--api-key", "bench-key",
        "--limit", str(LIMIT), "--period", str(PERIOD), "--margin", str(PERIOD / 240),
        "--url", url, "--in-flight", str(IN_FLIGHT), "--seed", str(seed),
        "--start-at", str(start), "--until", str(start + seconds),
        *(["--local"] if local else []),
    ]  # fmt: skip


def run_senders(db: Cluster, senders: int, *, local: bool, windows: int) -> dict[str, Any]:
    info = db.fresh()
    seconds = windows * PERIOD
    with fake_api(rate_limit=LIMIT, rate_period=PERIOD, latency=LATENCY) as api:
        start = time.time() + 3.0  # (the processes import and connect meanwhile)
        procs = [
            subprocess.Popen(
                sender_command(info, api.url, seed=n, start=start, seconds=seconds, local=local),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            for n in range(senders)
        ]
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise BenchError(f"a sender failed: {err[-2000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        records = api.records()
    accepted = sorted(r.arrived for r in records if r.status not in (401, 402, 403, 429))
    uploads = sorted(u for o in outs for u in o["uploads"])
    return {
        "senders": senders,
        "pacer": "own Pacer each" if local else "SharedPacer",
        "accepted": len(accepted),
        "answers_429": sum(1 for r in records if r.status == 429),
        "max_in_window": max_in_window(accepted, PERIOD),
        "reuse_share": round(reuse_share(accepted, LIMIT, PERIOD), 4),
        "span_share": round(span_share(accepted, LIMIT, PERIOD), 4),
        "per_sender": [o["statuses"].get("200", 0) for o in outs],
        "upload_ms_median": round(1000 * uploads[len(uploads) // 2], 1) if uploads else None,
        "seconds": seconds,
    }


def run(windows: int = WINDOWS) -> str:
    db = Cluster()
    try:
        results = {}
        for name, senders, local in (
            ("1 sender, shared", 1, False),
            ("3 senders, shared", 3, False),
            ("3 senders, own pacer", 3, True),
        ):
            results[name] = run_senders(db, senders, local=local, windows=windows)
            print(f"  {name}: {results[name]}", flush=True)
    finally:
        db.close()
    rows = [
        [
            name,
            r["accepted"],
            r["answers_429"],
            r["max_in_window"],
            f"{r['reuse_share']:.3f}",
            f"{r['span_share']:.3f}",
            " / ".join(str(n) for n in r["per_sender"]),
        ]
        for name, r in results.items()
    ]
    table = md_table(
        ["run", "accepted", "429s", "max in any 6 s", "share (reuse)", "share (span)", "sent per sender"],
        rows,
    )
    shared = [results["1 sender, shared"], results["3 senders, shared"]]
    ok = all(r["answers_429"] == 0 and r["reuse_share"] >= TARGET for r in shared)
    notes = [
        f"strict fake, {LIMIT} requests per {PERIOD:g} s, {LATENCY:g} s latency; {windows} windows per run; "
        f"each sender {IN_FLIGHT} requests at a time; margin period/240 (the daemon's default).",
        "share (reuse) = period ÷ mean(arrival[i+7] − arrival[i]); share (span) = bench/rate.py's "
        "floor((N−1)/7)·period ÷ (last − first accepted arrival).",
        "'own pacer': the senders do not back off on 429 (the daemon would hold and retry): the 429s "
        "count how often three full allowances overran the key's one.",
        f"target (shared) ≥ {TARGET} of the allowance and 0 × 429: {verdict(ok)}.",
    ]
    data = {"machine": machine(), "windows": windows, "results": results}
    return report("shared_rate", "Shared rate limit: daemons on one API key", data, table, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_rate", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=WINDOWS)
    args = parser.parse_args(argv)
    run(args.windows)


if __name__ == "__main__":
    main()

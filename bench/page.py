"""Benchmark: the status page and /metrics with 100,000 jobs.

A queue database is written directly (as ``bench.idle`` does: processing 100,000 files
first would take days of API time) with 100,000 jobs — 95 % done (with an output name and
an archived input), 3 % quarantined (with an error record), 1.5 % queued, 0.5 % cancelled —
each with a history entry as the daemon writes it, plus a day of request log (7 requests a
minute: 10,080 rows), a credit record, a pause-free state and one condition. Then the
page is asked for through the real HTTP server (httpx, keep-alive) and the time of each
answer is taken: the first page of outputs, one in the middle, the last one (the deepest
OFFSET), the last page of the quarantine, and a /metrics scrape. Thumbnails are not part
of it (each is made once, on first sight, then read from the cache).

Target: every page ≤ 0.25 s (the page refreshes every 10 s; a scrape every 15 s).

Run: ``python -m bench.page`` (about 15 s; ``--jobs N`` for another size).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from dropcut import __version__
from dropcut.metrics import Metrics
from dropcut.queue import connect
from dropcut.settings import Settings
from dropcut.web import PAGE_SIZE, StatusServer, StatusSite, snapshot

TARGET_SECONDS = 0.25
SHARES = (("done", 0.95), ("quarantined", 0.03), ("queued", 0.015), ("cancelled", 0.005))
COLUMNS = (
    "rel_path, sha256, size, mtime_ns, ctime_ns, inode, device, format, state, attempts, next_attempt_at, "
    "first_seen, updated_at, output_rel, error, history, seq, archived_as"
)


def build_database(
    path: Path,
    jobs: int,
    *,
    now: float | None = None,
    seed: int = 1,
    shares: Sequence[tuple[str, float]] = SHARES,
) -> dict[str, int]:
    """Write a queue database of ``jobs`` jobs at ``path`` (see the module's text;
    ``shares``: the states drawn, with their weights); returns how many jobs each state
    got. The newest job changed a second ago, the oldest ~``jobs`` minutes ago (100,000
    jobs: about 70 days)."""
    now = time.time() if now is None else now
    rng = random.Random(seed)
    conn = connect(path)
    counts = {state: 0 for state, _ in shares}
    rows: list[tuple[Any, ...]] = []
    states = [state for state, _ in shares]
    weights = [share for _, share in shares]
    for n in range(jobs):
        state = rng.choices(states, weights)[0]
        counts[state] += 1
        folder = f"shoot-{n // 500:03d}"
        rel = f"{folder}/IMG_{n:06d}.jpg"
        updated = now - (jobs - n) * 60.0 + rng.random()
        sha = f"{rng.getrandbits(256):064x}"
        history = [{"attempt": 1, "at": updated - 2, "status": 200, "duration_ms": 812, "bytes": 240_000}]
        error = None
        output = None
        archived = None
        if state == "done":
            output = f"{folder}/IMG_{n:06d}.png"
            archived = rel
        elif state == "quarantined":
            error = {
                "status": 422,
                "code": "corrupt_image",
                "detail": "cannot decode: image file is truncated (12 bytes not processed)",
                "source": "local",
                "quarantined_as": rel,
            }
        rows.append(
            (
                rel,
                sha,
                2_400_000 + n,
                int(updated * 1e9),
                int(updated * 1e9),
                1000 + n,
                2049,
                "JPEG",
                state,
                1 if state == "done" else 0,
                0.0,
                updated - 5,
                updated,
                output,
                None if error is None else json.dumps(error),
                json.dumps(history),
                n + 1,
                archived,
            )
        )
    marks = ", ".join("?" for _ in COLUMNS.split(", "))
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO jobs ({COLUMNS}) VALUES ({marks})", rows)
    conn.executemany(
        "INSERT INTO requests (started, endpoint, status, seconds, sent, received) VALUES (?, ?, ?, ?, ?, ?)",
        [(now - i * (60 / 7), "/v1.0/alpha-channel", 200, 0.8, 240_000, 9_000) for i in range(7 * 60 * 24)],
    )
    meta = {
        "credit": {"credit": 41_250, "expiration_date": "2027-09-05 23:59:59", "checked_at": now - 30},
        "last_success": now - 1,
        "conditions": [
            {
                "code": "api_unreachable",
                "detail": "connect_error — connection refused",
                "since": now - 90,
                "waiting": 3,
            }
        ],
    }
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
    )
    conn.execute("COMMIT")
    conn.close()
    return counts


def measure(root: Path, jobs: int, repeat: int = 9) -> dict[str, Any]:
    folders = {name: root / name for name in ("inbox", "outbox", "quarantine", "archive", "state")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        inbox=folders["inbox"],
        outbox=folders["outbox"],
        quarantine=folders["quarantine"],
        archive=folders["archive"],
        state_dir=folders["state"],
        api_key="bench-key-0123456789",
        http_listen="127.0.0.1:0",
    )
    began = time.perf_counter()
    counts = build_database(folders["state"] / "queue.sqlite3", jobs)
    built = time.perf_counter() - began
    metrics = Metrics(
        overview=lambda: snapshot(settings), watch=lambda: ("native", True), version=__version__
    )
    site = StatusSite(settings=lambda: settings, metrics=metrics, token=None, bound_host="127.0.0.1")
    server = StatusServer(site, "127.0.0.1", 0)
    server.start()
    output_pages = -(-(counts["done"]) // PAGE_SIZE)
    q_pages = -(-(counts["quarantined"]) // PAGE_SIZE)
    urls = {
        "page 1": "/",
        f"outputs page {output_pages // 2}": f"/?page={output_pages // 2}",
        f"outputs page {output_pages} (last)": f"/?page={output_pages}",
        f"quarantine page {q_pages} (last)": f"/?qpage={q_pages}",
        "/metrics": "/metrics",
    }
    figures: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=server.url.rstrip("/"), timeout=30) as client:
            for label, url in urls.items():
                times, size = [], 0
                for _ in range(repeat):
                    t = time.perf_counter()
                    answer = client.get(url)
                    times.append(time.perf_counter() - t)
                    answer.raise_for_status()
                    size = len(answer.content)
                figures[label] = {
                    "median_s": statistics.median(times),
                    "max_s": max(times),
                    "bytes": size,
                }
    finally:
        server.stop()
    return {"jobs": jobs, "states": counts, "build_s": built, "requests": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.page", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dropcut-page-") as tmp:
        result = measure(Path(tmp), args.jobs, args.repeat)
    print(f"{result['jobs']:,} jobs {result['states']} (database written in {result['build_s']:.1f} s)")
    print(f"| request | median | max | bytes | target ≤ {TARGET_SECONDS} s |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for label, f in result["requests"].items():
        worst = max(worst, f["median_s"])
        ok = "ok" if f["median_s"] <= TARGET_SECONDS else "MISSED"
        median, most = f["median_s"] * 1000, f["max_s"] * 1000
        print(f"| {label} | {median:.0f} ms | {most:.0f} ms | {f['bytes']:,} | {ok} |")
    return 0 if worst <= TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())

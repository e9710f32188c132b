"""Benchmark 1: rate utilisation, dropcut beside the seed's throttled loop.

The same backlog of 60 photos, the same fake server (strict sliding window, 7 requests per
6 s, i.e. ten times faster than the real 7 per minute), at simulated request latencies of
0.1 s, 0.5 s and 2 s.

* dropcut: ``python -m dropcut.cli run`` with default settings except the folders, the
  API URL and key, ``rate_limit_period_seconds = 6`` and ``debounce_seconds = 0.5``;
  the 60 files are in the inbox before it starts.
* baseline: :mod:`bench.baseline`, the documentation's loop (sleep period/7 after each
  request, back off on 429).

Achieved rate: the ideal span for N accepted requests under the window — the first 7 at
once, 7 more every period, so ``floor((N - 1) / 7) * period`` between the first and the
last — divided by the actual span between the first and the last accepted arrival at the
server. 1.0 means every slot of the allowance was used.

Run: ``python -m bench.rate`` (about 3 minutes; the baseline runs beside dropcut, each
against its own server).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from pathlib import Path
from typing import Any

from bench.baseline import BaselineRun, throttled_batch
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
    report,
    verdict,
    wait_until,
)
from bench.images import photo_jpeg

LATENCIES = (0.1, 0.5, 2.0)
FILES = 60
TARGET_FRACTION = 0.98


def backlog(folder: Path, files: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = folder / f"photo{i:02d}.jpg"
        path.write_bytes(photo_jpeg(1000 + i))
        paths.append(path)
    return paths


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


def analyse(records: list[Any], *, started: float, finished: float, period: float) -> dict[str, Any]:
    counted = sorted(r.arrived for r in records if r.status not in (401, 402, 403, 429))
    n429 = sum(1 for r in records if r.status == 429)
    n = len(counted)
    span = counted[-1] - counted[0] if n > 1 else float("nan")
    ideal = math.floor((n - 1) / LIMIT) * period if n > 1 else float("nan")
    return {
        "accepted": n,
        "ok_200": sum(1 for r in records if r.status == 200),
        "answers_429": n429,
        "requests": len(records),
        "span_s": round(span, 3),
        "ideal_span_s": ideal,
        "fraction": round(ideal / span, 4) if span and span > 0 else None,
        "per_period": round((n - 1) * period / span, 3) if span and span > 0 else None,
        "max_in_window": max_in_window(counted, period),
        "wall_s": round(finished - started, 2),
    }


def run_dropcut(latency: float, files: int) -> dict[str, Any]:
    dirs = Dirs.fresh(f"rate-dropcut-{latency:g}")
    backlog(dirs.inbox, files)
    with fake_api(rate_limit=LIMIT, rate_period=PERIOD, latency=latency) as api:
        daemon = DaemonProc(daemon_env(dirs, api.url), dirs.root / "daemon.log").start()
        try:

            def done() -> bool:
                daemon.check_alive()
                return count_pngs(dirs.outbox) >= files

            wait_until(done, timeout=60 + 2 * files * PERIOD / LIMIT, what=f"{files} outputs")
            finished = time.time()
            hwm = daemon.memory_kib().get("VmHWM", 0)
        finally:
            daemon.stop()
        records = api.records()
    result = analyse(records, started=daemon.started_at, finished=finished, period=PERIOD)
    result["peak_rss_mib"] = round(hwm / 1024, 1)
    return result


def run_baseline(latency: float, files: int) -> dict[str, Any]:
    dirs = Dirs.fresh(f"rate-baseline-{latency:g}")
    inputs = backlog(dirs.inbox, files)
    with fake_api(rate_limit=LIMIT, rate_period=PERIOD, latency=latency) as api:
        run: BaselineRun = throttled_batch(api.url, inputs, dirs.outbox, period=PERIOD)
        records = api.records()
    if run.failed or run.written != files:
        raise BenchError(f"baseline at {latency} s: {run.written} written, failed: {run.failed}")
    return analyse(records, started=run.started, finished=run.finished, period=PERIOD)


def run(latencies: tuple[float, ...] = LATENCIES, files: int = FILES, *, sequential: bool = False) -> str:
    m = machine()
    baseline: dict[float, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def baseline_worker(latency: float) -> None:
        try:
            baseline[latency] = run_baseline(latency, files)
        except BaseException as exc:  # reported after the dropcut runs
            errors.append(exc)

    threads = [threading.Thread(target=baseline_worker, args=(lat,), daemon=True) for lat in latencies]
    if not sequential:
        for t in threads:
            t.start()
    dropcut = {}
    for latency in latencies:
        dropcut[latency] = run_dropcut(latency, files)
        print(f"  dropcut at {latency:g} s latency: {dropcut[latency]}", flush=True)
    for t in threads:
        if sequential:
            t.start()
            t.join()
        else:
            t.join()
    if errors:
        raise errors[0]

    rows = []
    for latency in latencies:
        for name, res in (("dropcut", dropcut[latency]), ("baseline loop", baseline[latency])):
            rows.append(
                [
                    f"{latency:g} s",
                    name,
                    f"{res['fraction']:.3f}",
                    f"{res['per_period']:.2f}",
                    res["answers_429"],
                    res["max_in_window"],
                    f"{res['span_s']:.1f} s (ideal {res['ideal_span_s']:g} s)",
                    f"{res['wall_s']:.1f} s",
                ]
            )
    table = md_table(
        [
            "latency",
            "runner",
            "achieved rate (of allowance)",
            "req / period",
            "429s",
            "max in any 6 s",
            "first→last accepted",
            "wall time",
        ],
        rows,
    )
    worst = min(dropcut[lat]["fraction"] for lat in latencies)
    no429 = all(dropcut[lat]["answers_429"] == 0 for lat in latencies)
    notes = [
        f"{files} files, server: strict sliding window of {LIMIT} requests per {PERIOD:g} s.",
        "achieved rate = floor((N-1)/7)·period ÷ (last − first accepted arrival); "
        f"req/period = (N−1)·period ÷ that span (ideal for N={files}: "
        f"{(files - 1) * LIMIT / (math.floor((files - 1) / LIMIT) * LIMIT):.3f}, a burst of 7 at each end).",
        "wall time: from launch (dropcut: process start, incl. imports and the 0.5 s debounce) "
        "to the last cut-out written.",
        f"target (dropcut) ≥ {TARGET_FRACTION} of the allowance and 0 × 429 at every latency: "
        f"worst {worst:.3f}, 429s {'none' if no429 else 'some'} — "
        f"{verdict(worst >= TARGET_FRACTION and no429)}.",
    ]
    data = {"machine": m, "files": files, "dropcut": dropcut, "baseline": baseline}
    return report("rate", "1. Rate utilisation", data, table, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rate", description=__doc__.splitlines()[0])
    parser.add_argument("--latencies", default=",".join(f"{x:g}" for x in LATENCIES))
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--sequential", action="store_true", help="run the baseline after dropcut")
    args = parser.parse_args(argv)
    run(tuple(float(x) for x in args.latencies.split(",")), args.files, sequential=args.sequential)


if __name__ == "__main__":
    main()

"""Benchmark 2: detection latency, native watching and polling.

200 photos are dropped one by one into a running daemon, the way a careful client does it
(written under a hidden temporary name, then renamed in), one every ``--spacing`` seconds.
For each file: the time from the rename to its upload reaching the fake server, minus the
configured debounce. The rate limit is lifted here (server and daemon allow 100,000
requests per second) so that pacing is not what is measured.

Settings: defaults except the folders, the API, that rate limit, ``watch_mode`` and
``debounce_seconds = 0.5`` and, for polling, ``poll_interval_seconds = 2``.

Run: ``python -m bench.detect`` (about a minute).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from typing import Any

from bench.common import (
    DEBOUNCE,
    BenchError,
    DaemonProc,
    Dirs,
    daemon_env,
    fake_api,
    machine,
    md_table,
    percentile,
    report,
    verdict,
    wait_until,
)
from bench.images import unique_png

FILES = 200
SPACING = 0.1
POLL_INTERVAL = 2.0
SLACK = 0.25  # the target: p95 <= 250 ms (native), <= poll interval + 250 ms (polling)
OPEN_RATE = 100_000


def run_mode(
    mode: str, files: int, spacing: float, debounce: float, poll_interval: float, *, recommended: bool = False
) -> dict[str, Any]:
    dirs = Dirs.fresh(f"detect-{mode}")
    payloads = [unique_png(900_000 + i) for i in range(files)]
    renamed: dict[str, float] = {}
    with fake_api(rate_limit=OPEN_RATE, rate_period=1.0) as api:
        env = daemon_env(
            dirs,
            api.url,
            watch_mode=mode,
            debounce_seconds=debounce,
            poll_interval_seconds=poll_interval,
            rate_limit_requests=OPEN_RATE,
            rate_limit_period_seconds=1,
        )
        daemon = DaemonProc(env, dirs.root / "daemon.log", recommended=recommended).start()
        try:
            daemon.wait_event("daemon_started")
            time.sleep(1.0)
            next_at = time.monotonic()
            for i, data in enumerate(payloads):
                name = f"drop{i:03d}.png"
                tmp = dirs.inbox / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, dirs.inbox / name)
                renamed[name] = time.time()
                next_at += spacing
                time.sleep(max(0.0, next_at - time.monotonic()))

            def all_started() -> bool:
                daemon.check_alive()
                return len({r.filename for r in api.records()}) >= files

            wait_until(all_started, timeout=60 + poll_interval * 3, what=f"{files} uploads")
            cpu = daemon.cpu_seconds()
        finally:
            daemon.stop()
        records = api.records()
    arrival: dict[str, float] = {}
    for r in records:
        if r.filename is not None and r.filename not in arrival:
            arrival[r.filename] = r.arrived
    missing = set(renamed) - set(arrival)
    if missing:
        raise BenchError(f"{mode}: no upload for {sorted(missing)[:5]}")
    lat = [arrival[name] - renamed[name] - debounce for name in renamed]
    stages = stage_times(daemon, renamed, debounce)
    return {
        "mode": mode,
        "files": files,
        "spacing_s": spacing,
        "debounce_s": debounce,
        "poll_interval_s": poll_interval if mode == "poll" else None,
        "p50_ms": round(percentile(lat, 50) * 1000),
        "p95_ms": round(percentile(lat, 95) * 1000),
        "max_ms": round(max(lat) * 1000),
        "min_ms": round(min(lat) * 1000),
        "non_200": sum(1 for r in records if r.status != 200),
        "cpu_s": round(cpu, 2),
        "stages_p50_ms": {k: round(percentile(v, 50) * 1000) for k, v in stages.items()},
        "stages_p95_ms": {k: round(percentile(v, 95) * 1000) for k, v in stages.items()},
        "latencies_ms": [round(x * 1000, 1) for x in lat],
    }


def _ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["timestamp"]).timestamp()


def stage_times(daemon: DaemonProc, renamed: dict[str, float], debounce: float) -> dict[str, list[float]]:
    """Where the time goes, from the daemon's log: rename → admitted (inspected) minus the
    debounce, admitted → queued, queued → upload started."""
    first: dict[str, dict[str, float]] = {}
    for name in ("file_admitted", "job_queued", "upload_started"):
        seen: dict[str, float] = {}
        for event in daemon.events(name):
            seen.setdefault(event["file"], _ts(event))
        first[name] = seen
    out: dict[str, list[float]] = {"settled": [], "queued": [], "claimed": []}
    for rel, t in renamed.items():
        adm, que, up = (first[n].get(rel) for n in ("file_admitted", "job_queued", "upload_started"))
        if adm is None or que is None or up is None:
            continue
        out["settled"].append(adm - t - debounce)
        out["queued"].append(que - adm)
        out["claimed"].append(up - que)
    return out


def run(
    files: int = FILES,
    spacing: float = SPACING,
    debounce: float = DEBOUNCE,
    poll_interval: float = POLL_INTERVAL,
    modes: tuple[str, ...] = ("native", "poll"),
    *,
    recommended: bool = False,
) -> str:
    m = machine()
    results = {}
    for mode in modes:
        results[mode] = run_mode(mode, files, spacing, debounce, poll_interval, recommended=recommended)
        r = results[mode]
        print(f"  {mode}: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, max {r['max_ms']} ms", flush=True)
    rows = []
    verdicts = []
    for mode, r in results.items():
        bound = SLACK + (poll_interval if mode == "poll" else 0.0)
        ok = r["p95_ms"] <= bound * 1000
        verdicts.append(ok)
        label = "native (inotify)" if mode == "native" else f"polling every {poll_interval:g} s"
        rows.append(
            [
                label,
                f"{r['p50_ms']} ms",
                f"{r['p95_ms']} ms",
                f"{r['max_ms']} ms",
                f"≤ {round(bound * 1000)} ms",
                verdict(ok),
            ]
        )
    table = md_table(["watching", "p50", "p95", "max", "target p95", ""], rows)
    notes = [
        f"{files} files dropped {spacing:g} s apart (written as a hidden .tmp, then renamed); "
        f"latency = server arrival of the upload − rename − debounce ({debounce:g} s).",
    ]
    data: dict[str, Any] = {"machine": m, "results": results}
    return report("detect", "2. Detection latency", data, table, notes, recommended=recommended)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.detect", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--spacing", type=float, default=SPACING)
    parser.add_argument("--debounce", type=float, default=DEBOUNCE)
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL)
    parser.add_argument("--modes", default="native,poll")
    parser.add_argument("--recommended", action="store_true", help="with bench/recommended.py's patches")
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    run(args.files, args.spacing, args.debounce, args.poll_interval, modes, recommended=args.recommended)


if __name__ == "__main__":
    main()

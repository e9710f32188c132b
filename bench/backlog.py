"""Benchmark 3: a backlog of 100,000 files present before the daemon starts.

100,000 distinct small valid PNGs in a nested tree (10 x 100 leaf folders, 1,010 folders),
made once and cached under /tmp (their generation is not measured). The API is paused:
the queue database is created beforehand with the pause dropcut itself persists after a
402 (``meta.paused = {"code": "no_credit", ...}``) and the fake server reports a credit of
0, so the daemon's start-up credit check keeps the pause and not one upload is sent. The
inbox is therefore never modified and can be reused.

Measured: the time from launching ``dropcut run`` until all 100,000 files are jobs in the
queue (the database polled read-only every 0.25 s), peak RSS (VmHWM), CPU time, the size
of the queue database, and how long ``dropcut status`` takes on it (run while the daemon
idles on the full queue).

Settings: defaults except the folders, the API, ``debounce_seconds = 0.5``.

Run: ``python -m bench.backlog`` (about 3.5 minutes; the first run also writes the tree).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    RESULTS,
    BenchError,
    DaemonProc,
    Dirs,
    daemon_env,
    fake_api,
    machine,
    md_table,
    remove_tree,
    report,
    tree_figures,
    verdict,
)
from bench.images import cached_tree

FILES = 100_000
TARGET_SECONDS = 60.0
TARGET_RSS_MIB = 200.0
TARGET_STATUS_SECONDS = 1.0


def persist_pause(database: Path) -> None:
    from dropcut.queue import JobQueue

    queue = JobQueue.open(database)
    try:
        queue.set_meta(
            "paused",
            {"code": "no_credit", "status": 402, "detail": "paused for the benchmark", "since": time.time()},
        )
    finally:
        queue.close()


def count_jobs(database: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def db_bytes(database: Path) -> dict[str, int]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(database) + suffix)
        out[suffix or "db"] = path.stat().st_size if path.exists() else 0
    return out


def time_status(env: dict[str, str], runs: int = 3) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dropcut.cli", "status"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise BenchError(f"dropcut status failed: {done.stderr}")
    return times


def run(
    files: int = FILES, *, keep_state: bool = False, profile: bool = False, recommended: bool = False
) -> str:
    m = machine()
    tree, generated = cached_tree(files)
    dirs = Dirs.fresh("backlog", inbox=tree)
    dirs.state.mkdir(parents=True)
    persist_pause(dirs.database)
    samples: list[tuple[float, int, int]] = []  # (seconds since launch, jobs, RSS KiB)
    with fake_api(credit=0) as api:
        env = daemon_env(dirs, api.url)
        spy = RESULTS / "backlog.pyspy.txt" if profile else None
        daemon = DaemonProc(env, dirs.root / "daemon.log", profile=spy, recommended=recommended).start()
        try:
            deadline = time.monotonic() + 600
            queued_after = None
            while time.monotonic() < deadline:
                daemon.check_alive()
                n = count_jobs(dirs.database)
                now = time.monotonic() - daemon.started_mono
                samples.append((round(now, 2), n, daemon.memory_kib().get("VmRSS", 0)))
                if n >= files:
                    queued_after = now
                    break
                time.sleep(0.25)
            if queued_after is None:
                raise BenchError(f"only {samples[-1][1]} of {files} queued after 600 s")
            cpu_at_queued = daemon.cpu_seconds()
            tree_at_queued = tree_figures(daemon.pid)
            started_event = daemon.wait_event("daemon_started")
            time.sleep(1.0)
            status_times = time_status(env)
            sizes = db_bytes(dirs.database)
            mem = daemon.memory_kib()
            cpu = daemon.cpu_seconds()
        finally:
            daemon.stop(timeout=60)
        sizes_after_stop = db_bytes(dirs.database)
        posts = len(api.records())
    if posts:
        raise BenchError(f"{posts} uploads were sent although the API was paused")
    result: dict[str, Any] = {
        "files": files,
        "folders": 1010,
        "generated_in_s": None if generated is None else round(generated, 1),
        "all_queued_s": round(queued_after, 2),
        "daemon_started_found": started_event.get("found"),
        "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
        "cpu_s_until_queued": round(cpu_at_queued, 2),
        "processes": tree_at_queued["processes"],
        "peak_rss_sum_mib": round(tree_at_queued["peak_rss_sum_kib"] / 1024, 1),
        "cpu_s_tree_until_queued": round(tree_at_queued["cpu_s"], 2),
        "cpu_s_total": round(cpu, 2),
        "db_mib": round(sizes["db"] / 2**20, 1),
        "wal_mib": round(sizes["-wal"] / 2**20, 1),
        "db_mib_after_stop": round((sizes_after_stop["db"] + sizes_after_stop["-wal"]) / 2**20, 1),
        "status_s": [round(t, 3) for t in status_times],
        "status_median_s": round(statistics.median(status_times), 3),
        "samples": samples,
    }
    if not keep_state:
        remove_tree(dirs.root)
    ok_time = queued_after <= TARGET_SECONDS
    ok_rss = result["peak_rss_sum_mib"] <= TARGET_RSS_MIB
    ok_status = max(status_times) <= TARGET_STATUS_SECONDS
    rows = [
        ["time until all queued", f"{queued_after:.1f} s", f"≤ {TARGET_SECONDS:g} s", verdict(ok_time)],
        [
            "peak RSS (VmHWM)",
            f"{result['peak_rss_mib']} MiB daemon; {result['peak_rss_sum_mib']} MiB summed over "
            f"its {result['processes']} processes (inspection workers)",
            f"≤ {TARGET_RSS_MIB:g} MB",
            verdict(ok_rss),
        ],
        [
            "queue database",
            f"{result['db_mib']} MiB + {result['wal_mib']} MiB WAL "
            f"({result['db_mib_after_stop']} MiB after stop)",
            "—",
            "",
        ],
        [
            "`dropcut status`",
            f"{result['status_median_s']:.2f} s (max {max(status_times):.2f} s)",
            f"≤ {TARGET_STATUS_SECONDS:g} s",
            verdict(ok_status),
        ],
        [
            "CPU time until all queued",
            f"{result['cpu_s_until_queued']} s daemon, {result['cpu_s_tree_until_queued']} s all processes",
            "—",
            "",
        ],
    ]
    table = md_table(["", "measured", "target", ""], rows)
    notes = [
        f"{files:,} distinct 8x8 PNGs (about 100 bytes each) in 1,010 folders; "
        "API paused by a persisted `no_credit` pause and a server credit of 0 (0 uploads sent).",
        "time from launching `dropcut run` (imports, start-up scan, 0.5 s debounce, inspection: "
        "read, sha256, spool copy, full decode) to the 100,000th row in the jobs table.",
    ]
    data: dict[str, Any] = {"machine": m, "result": result}
    return report("backlog", "3. Backlog at start", data, table, notes, recommended=recommended)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--keep-state", action="store_true", help="keep the state folder for inspection")
    parser.add_argument("--profile", action="store_true", help="record results/backlog.pyspy.txt with py-spy")
    parser.add_argument("--recommended", action="store_true", help="with bench/recommended.py's patches")
    args = parser.parse_args(argv)
    run(args.files, keep_state=args.keep_state, profile=args.profile, recommended=args.recommended)


if __name__ == "__main__":
    main()

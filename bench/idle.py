"""Benchmark 5: the cost of doing nothing.

10,000 files already done, nothing new: the inbox holds 10,000 small PNGs in 1,010
folders (``on_success = keep``, so they stay in the watched tree — the harder case; with
the default ``archive`` the inbox would be empty) and the queue database holds a ``done``
job for each, with the file's signature, as dropcut leaves it after processing them (the
database is written directly by the benchmark: uploading 10,000 files first would take
hours of compressed API time). The daemon starts, its start-up scan finds every file
known, and then CPU time (user + system, all threads, /proc/<pid>/stat) is measured over
60 s, with native watching and with polling every 5 s.

Settings: defaults except the folders, the API, ``on_success = keep``, ``watch_mode`` and
``poll_interval_seconds = 5`` (polling).

Run: ``python -m bench.idle`` (about 2.5 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    BenchError,
    DaemonProc,
    Dirs,
    daemon_env,
    fake_api,
    machine,
    md_table,
    report,
    verdict,
)
from bench.images import cached_tree, tree_paths

FILES = 10_000
WINDOW = 60.0
POLL_INTERVAL = 5.0
TARGET_NATIVE_S = 0.5
TARGET_POLL_SHARE = 0.02


def mark_done(tree: Path, files: int, database: Path) -> None:
    """A done job for every file of the tree, as dropcut records it after publishing."""
    from dropcut.queue import JobQueue, NewJob

    jobs = []
    for rel in tree_paths(files):
        st = os.stat(tree / rel, follow_symlinks=False)
        data = (tree / rel).read_bytes()
        jobs.append(
            NewJob(
                rel_path=rel,
                sha256=hashlib.sha256(data).hexdigest(),
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
                inode=st.st_ino,
                device=st.st_dev,
                format="PNG",
                first_seen=time.time(),
            )
        )
    queue = JobQueue.open(database)
    try:
        queue.enqueue_many(jobs, requeue_done=False)
    finally:
        queue.close()
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("UPDATE jobs SET state='done', attempts=1")
    finally:
        conn.close()


def settle_down(daemon: DaemonProc, quiet: float = 0.05, span: float = 3.0, timeout: float = 120.0) -> float:
    """Wait until the daemon used less than ``quiet`` CPU seconds over ``span`` seconds;
    returns the seconds waited."""
    started = time.monotonic()
    last = daemon.cpu_seconds()
    while time.monotonic() - started < timeout:
        time.sleep(span)
        daemon.check_alive()
        now = daemon.cpu_seconds()
        if now - last < quiet:
            return time.monotonic() - started
        last = now
    raise BenchError(f"the daemon did not go quiet within {timeout:g} s")


def run_mode(
    mode: str,
    files: int,
    window: float,
    poll_interval: float,
    *,
    profile: bool = False,
    recommended: bool = False,
) -> dict[str, Any]:
    tree, _ = cached_tree(files)
    dirs = Dirs.fresh(f"idle-{mode}", inbox=tree)
    dirs.state.mkdir(parents=True)
    mark_done(tree, files, dirs.database)
    with fake_api() as api:
        env = daemon_env(
            dirs, api.url, on_success="keep", watch_mode=mode, poll_interval_seconds=poll_interval
        )
        spy = RESULTS / f"idle-{mode}.pyspy.txt" if profile else None
        daemon = DaemonProc(env, dirs.root / "daemon.log", profile=spy, recommended=recommended).start()
        try:
            started = daemon.wait_event("daemon_started", timeout=60)
            waited = settle_down(daemon)
            startup_cpu = daemon.cpu_seconds()
            lines_before = sum(1 for _ in daemon.log_path.open("rb"))
            t0 = time.monotonic()
            c0 = daemon.cpu_seconds()
            time.sleep(window)
            cpu = daemon.cpu_seconds() - c0
            elapsed = time.monotonic() - t0
            lines = sum(1 for _ in daemon.log_path.open("rb")) - lines_before
            rss = daemon.memory_kib()
        finally:
            daemon.stop()
        posts = len(api.records())
    if posts:
        raise BenchError(f"{mode}: {posts} uploads although every file was done")
    return {
        "mode": mode,
        "files": files,
        "found_at_start": started.get("found"),
        "startup_cpu_s": round(startup_cpu, 2),
        "settled_after_s": round(waited, 1),
        "window_s": round(elapsed, 1),
        "cpu_s": round(cpu, 3),
        "core_share": round(cpu / elapsed, 5),
        "log_lines_in_window": lines,
        "rss_mib": round(rss["VmRSS"] / 1024, 1),
        "poll_interval_s": poll_interval if mode == "poll" else None,
    }


def run(
    files: int = FILES,
    window: float = WINDOW,
    poll_interval: float = POLL_INTERVAL,
    *,
    profile: bool = False,
    recommended: bool = False,
) -> str:
    m = machine()
    native = run_mode("native", files, window, poll_interval, profile=profile, recommended=recommended)
    print(f"  native: {native}", flush=True)
    poll = run_mode("poll", files, window, poll_interval, profile=profile, recommended=recommended)
    print(f"  poll: {poll}", flush=True)
    ok_native = native["cpu_s"] <= TARGET_NATIVE_S * window / 60
    ok_poll = poll["core_share"] <= TARGET_POLL_SHARE
    rows = [
        [
            "native (inotify)",
            f"{native['cpu_s']:.2f} s",
            f"{100 * native['core_share']:.2f} %",
            f"≤ {TARGET_NATIVE_S:g} s",
            verdict(ok_native),
            f"{native['startup_cpu_s']:.1f} s",
            f"{native['rss_mib']} MiB",
        ],
        [
            f"polling every {poll_interval:g} s",
            f"{poll['cpu_s']:.2f} s",
            f"{100 * poll['core_share']:.2f} %",
            f"≤ {100 * TARGET_POLL_SHARE:g} % of a core",
            verdict(ok_poll),
            f"{poll['startup_cpu_s']:.1f} s",
            f"{poll['rss_mib']} MiB",
        ],
    ]
    table = md_table(
        ["watching", f"CPU in {window:g} s", "of one core", "target", "", "start-up CPU", "RSS"], rows
    )
    notes = [
        f"{files:,} done files kept in a watched tree of 1,010 folders; measured after the start-up "
        "scan (which finds every file known) has finished.",
        "start-up CPU = imports + that scan; the same scan repeats every `rescan_interval_seconds` "
        "(default 300 s), outside this 60 s window.",
    ]
    data: dict[str, Any] = {"machine": m, "native": native, "poll": poll}
    return report("idle", "5. Idle cost", data, table, notes, recommended=recommended)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--window", type=float, default=WINDOW)
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL)
    parser.add_argument("--profile", action="store_true", help="record results/idle-<mode>.pyspy.txt")
    parser.add_argument("--recommended", action="store_true", help="with bench/recommended.py's patches")
    args = parser.parse_args(argv)
    run(args.files, args.window, args.poll_interval, profile=args.profile, recommended=args.recommended)


if __name__ == "__main__":
    main()

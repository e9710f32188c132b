"""Benchmark 4: large files through the whole pipeline, and the daemon's peak memory.

20 JPEGs of 9.0-9.9 MB (noise at quality 100, about 1,500 x 1,500 pixels; the fake server
answers each with a PNG cut-out of about 7 MB) are in the inbox when the daemon starts;
the server allows 7 requests per 6 s. Measured: the daemon's peak RSS (VmHWM of
``dropcut run``, all threads), sampled RSS, wall time until the 20th cut-out is written.

Settings: defaults except the folders, the API, ``rate_limit_period_seconds = 6`` and
``debounce_seconds = 0.5``.

Run: ``python -m bench.large`` (under a minute; the first run also writes the files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Any

from bench.common import (
    LIMIT,
    PERIOD,
    RESULTS,
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
from bench.images import cached_large_files

FILES = 20
LOW, HIGH = 9_000_000, 9_950_000
TARGET_RSS_MIB = 150.0


def run(files: int = FILES, *, profile: bool = False, recommended: bool = False) -> str:
    m = machine()
    sources = cached_large_files(files, LOW, HIGH)
    dirs = Dirs.fresh("large")
    for src in sources:
        shutil.copyfile(src, dirs.inbox / src.name)
    sizes = [src.stat().st_size for src in sources]
    rss_samples: list[int] = []
    with fake_api(rate_limit=LIMIT, rate_period=PERIOD) as api:
        env = daemon_env(dirs, api.url)
        spy = RESULTS / "large.pyspy.txt" if profile else None
        daemon = DaemonProc(env, dirs.root / "daemon.log", profile=spy, recommended=recommended).start()
        try:

            def done() -> bool:
                daemon.check_alive()
                rss_samples.append(daemon.memory_kib().get("VmRSS", 0))
                return count_pngs(dirs.outbox) >= files

            wait_until(done, timeout=300, what=f"{files} large outputs", interval=0.1)
            wall = time.monotonic() - daemon.started_mono
            mem = daemon.memory_kib()
            cpu = daemon.cpu_seconds()
        finally:
            daemon.stop()
        records = api.records()
    outputs = [p.stat().st_size for p in dirs.outbox.glob("*.png")]
    result: dict[str, Any] = {
        "files": files,
        "input_mb": [round(s / 1e6, 2) for s in sizes],
        "output_mb_mean": round(sum(outputs) / len(outputs) / 1e6, 2) if outputs else None,
        "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
        "rss_p50_mib": round(sorted(rss_samples)[len(rss_samples) // 2] / 1024, 1) if rss_samples else None,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 2),
        "uploads": len(records),
        "answers_429": sum(1 for r in records if r.status == 429),
    }
    ok = result["peak_rss_mib"] <= TARGET_RSS_MIB
    rows = [
        [
            f"{files} × {min(sizes) / 1e6:.1f}–{max(sizes) / 1e6:.1f} MB JPEG",
            f"{result['peak_rss_mib']} MiB",
            f"{result['rss_p50_mib']} MiB",
            f"≤ {TARGET_RSS_MIB:g} MB",
            verdict(ok),
            f"{result['wall_s']} s",
        ]
    ]
    table = md_table(["input", "peak RSS (VmHWM)", "median RSS", "target", "", "wall time"], rows)
    notes = [
        f"uploads and downloads streamed in 64 KiB chunks; cut-outs average {result['output_mb_mean']} MB; "
        f"{result['uploads']} uploads, {result['answers_429']} × 429.",
    ]
    data: dict[str, Any] = {"machine": m, "result": result}
    for p in dirs.outbox.glob("*.png"):
        os.unlink(p)
    return report("large", "4. Large files", data, table, notes, recommended=recommended)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--profile", action="store_true", help="record results/large.pyspy.txt with py-spy")
    parser.add_argument("--recommended", action="store_true", help="with bench/recommended.py's patches")
    args = parser.parse_args(argv)
    run(args.files, profile=args.profile, recommended=args.recommended)


if __name__ == "__main__":
    main()

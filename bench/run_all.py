"""Run the benchmarks and print every table: ``python -m bench.run_all [NAME ...]``.

NAME is any of rate, detect, backlog, large, idle, matte, render, outputs (default: all, in that
order; about 15 minutes on a 2-core machine). The tables are also written to bench/results/ (one
``<name>.md`` and ``<name>.json`` each, and ``summary.md`` for the whole run).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from bench import backlog, detect, idle, large, matte, outputs, rate, render
from bench.common import RESULTS, machine, machine_line

BENCHMARKS: dict[str, Callable[[], str]] = {
    "rate": rate.run,
    "detect": detect.run,
    "backlog": backlog.run,
    "large": large.run,
    "idle": idle.run,
    "matte": matte.run,
    "render": render.run,
    "outputs": outputs.run,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHMARKS) + " (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})")
    names = args.names or list(BENCHMARKS)
    m = machine()
    print(f"dropcut benchmarks: {', '.join(names)}\n{machine_line(m)}\n", flush=True)
    started = time.monotonic()
    parts = []
    for name in names:
        t0 = time.monotonic()
        print(f"## {name} …", flush=True)
        parts.append(BENCHMARKS[name]())
        print(f"({name}: {time.monotonic() - t0:.0f} s)\n", flush=True)
    total = time.monotonic() - started
    after = os.getloadavg()[0]
    summary = (
        f"# dropcut benchmarks\n\n{machine_line(m)} (before), {after:.2f} (after) · "
        f"{total / 60:.1f} min\n\n" + "\n".join(parts)
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.md").write_text(summary)
    print(f"all done in {total / 60:.1f} min; tables in {RESULTS / 'summary.md'}")


if __name__ == "__main__":
    main()

"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as tables.

The benchmarks write one with ``--profile`` (``results/<bench>.pyspy.txt``)::

    python -m bench.profile bench/results/backlog.pyspy.txt [--top 25] [--grep dropcut]

Prints the functions with the most samples on top of the stack (self) and anywhere in it
(inclusive), as a share of all samples (py-spy samples only threads that are running).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    short = "/".join(Path(path).parts[-2:]) if "/" in path else path
    return f"{m.group('func')} ({short})"


def summarise(path: Path, top: int = 25, grep: str | None = None) -> str:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if not m:
            continue
        count = int(m.group("count"))
        frames = [f for f in m.group("stack").split(";") if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        total += count
        self_t[names[-1]] += count
        for name in set(names):
            incl[name] += count
    if total == 0:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples", "", "| self | function |", "| --- | --- |"]
    for name, n in self_t.most_common(top):
        out.append(f"| {100 * n / total:.1f} % | `{name}` |")
    out += ["", "| inclusive | function |", "| --- | --- |"]
    shown = 0
    for name, n in incl.most_common():
        if grep and grep not in name:
            continue
        out.append(f"| {100 * n / total:.1f} % | `{name}` |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--grep", default=None, help="only functions whose name or file contains this")
    args = parser.parse_args(argv)
    print(summarise(args.profile, args.top, args.grep))


if __name__ == "__main__":
    main()

"""What every benchmark shares: folders, the daemon as a subprocess, /proc readings,
the fake server, tables and result files.

Time is compressed ten times against the real API: the allowance of 7 requests per 60 s
becomes 7 per 6 s (``PERIOD``), and the default debounce of 5 s becomes 0.5 s.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support import Folders, json_events

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CACHE = Path(os.environ.get("DROPCUT_BENCH_CACHE", "/tmp/dropcut-bench-cache"))
WORK = Path(os.environ.get("DROPCUT_BENCH_WORK", "/tmp/dropcut-bench-work"))

API_KEY = "bench-key"
LIMIT = 7  # the API's allowance: 7 requests ...
PERIOD = 6.0  # ... per 60 s, compressed ten times
DEBOUNCE = 0.5  # the default 5 s, compressed ten times
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not be run to the end (the daemon died, a wait timed out)."""


# --- the machine ------------------------------------------------------------------------


def _meminfo_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _fstype(path: Path) -> str:
    target = os.path.realpath(path)
    best, fstype = "", "?"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                point = left.split()[4]
                inside = point == "/" or target == point or target.startswith(point + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, right.split()[0]
    except OSError:
        pass
    return fstype


def machine() -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "ram_gib": round(_meminfo_gib(), 1),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "work_fs": _fstype(WORK),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(m: dict[str, Any] | None = None) -> str:
    m = m or machine()
    return (
        f"{m['date']} · {m['cores']} cores ({m['cpu']}) · {m['ram_gib']} GiB RAM · "
        f"Linux {m['kernel']} · Python {m['python']} · files on {m['work_fs']} · "
        f"load {m['load_average'][0]:.2f}"
    )


# --- folders ------------------------------------------------------------------------------


class Dirs(Folders):
    """The test harness's folders (:class:`tests.support.Folders`), under ``WORK/name``."""

    @classmethod
    def fresh(cls, name: str, inbox: Path | None = None) -> Dirs:
        """Empty folders under ``WORK/name`` (the inbox may be given: a cached tree)."""
        root = WORK / name
        remove_tree(root)
        root.mkdir(parents=True)
        dirs = cls.make(root)
        if inbox is not None:
            dirs.inbox = inbox
        return dirs

    @property
    def database(self) -> Path:
        return self.state / "queue.sqlite3"


def remove_tree(path: Path) -> None:
    """``rm -rf`` (much faster than shutil.rmtree for 100,000 files)."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def count_pngs(folder: Path) -> int:
    """Finished outputs below ``folder`` (the staging folder is not counted)."""
    n = 0
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name != ".dropcut-staging":
                    stack.append(Path(entry.path))
            elif entry.name.endswith(".png"):
                n += 1
    return n


# --- the daemon as a subprocess --------------------------------------------------------------


def daemon_env(dirs: Dirs, api_url: str, **overrides: Any) -> dict[str, str]:
    """``DROPCUT_*`` for a run with default settings except the folders, the API, the
    compressed period and debounce, JSON logs, and ``overrides``."""
    values: dict[str, Any] = {
        "inbox": dirs.inbox,
        "outbox": dirs.outbox,
        "quarantine": dirs.quarantine,
        "archive": dirs.archive,
        "state_dir": dirs.state,
        "api_url": api_url,
        "api_key": API_KEY,
        "rate_limit_period_seconds": PERIOD,
        "debounce_seconds": DEBOUNCE,
        "log_format": "json",
        # a backlog benchmark drops thousands of files at once: no large-batch hold; and no
        # status page on a fixed port
        "hold_batches_over": 0,
        "http_listen": "",
    }
    values.update(overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPCUT_")}
    env.update({f"DROPCUT_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_status_kib(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/<pid>/status in KiB (VmRSS now, VmHWM peak)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Vm"):
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (the daemon's inspection workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                text = fh.read()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def tree_figures(pid: int) -> dict[str, float]:
    """Peak RSS and CPU of ``pid`` and every live process below it: ``peak_rss_sum_kib``
    adds each process's own peak (an upper bound of the tree's peak at any moment)."""
    pids = [pid, *descendants(pid)]
    hwm = 0
    cpu = 0.0
    for p in pids:
        try:
            hwm += proc_status_kib(p).get("VmHWM", 0)
            cpu += proc_cpu_seconds(p)
        except OSError:
            continue
    return {"processes": len(pids), "peak_rss_sum_kib": hwm, "cpu_s": cpu}


class DaemonProc:
    """``python -m dropcut.cli run`` with ``env``; its log goes to ``log_path``."""

    def __init__(
        self, env: dict[str, str], log_path: Path, profile: Path | None = None, *, recommended: bool = False
    ) -> None:
        self.env = env
        self.recommended = recommended
        self.log_path = log_path
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.spy: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.time() at launch
        self.started_mono = 0.0

    def start(self) -> DaemonProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.recommended" if self.recommended else "dropcut.cli"]
            + ([] if self.recommended else ["run"]),
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if self.profile is not None:
            self.profile.parent.mkdir(parents=True, exist_ok=True)
            self.spy = subprocess.Popen(
                [
                    *(py_spy(), "record", "--pid", str(self.proc.pid), "--format", "raw", "--threads"),
                    *("--rate", "100", "--nonblocking", "--gil", "--output", str(self.profile)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise BenchError(f"the daemon exited early ({self.proc and self.proc.returncode}):\n{tail}")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory_kib(self) -> dict[str, int]:
        return proc_status_kib(self.pid)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Log events so far (only lines naming ``name`` are parsed)."""
        out: list[dict[str, Any]] = []
        try:
            fh = self.log_path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return out
        with fh:
            return json_events(fh, name)

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self.check_alive()
            events = self.events(name)
            return events[0] if events else None

        result: dict[str, Any] = wait_until(found, timeout, f"log event {name}")
        return result

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise BenchError("the daemon did not stop on SIGTERM") from None
            finally:
                if self.spy is not None:
                    self.spy.wait(60)
        return self.proc.returncode

    def __enter__(self) -> DaemonProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def py_spy() -> str:
    """py-spy next to this interpreter (``pip install py-spy``), else from PATH."""
    local = Path(sys.executable).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    return found


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def fake_api(**knobs: Any) -> Any:
    """The fake withoutBG server of the test-suite (in this process, on 127.0.0.1)."""
    sys.path.insert(0, str(REPO))
    from tests.fake_api import FakeWithoutBG

    return FakeWithoutBG(api_key=API_KEY, **knobs)


# --- figures ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (like numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def save(name: str, data: dict[str, Any], table: str) -> Path:
    """Write ``results/<name>.json`` and ``.md`` (latest) and a dated copy of the JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = json.dumps(data, indent=2, default=str)
    (RESULTS / f"{name}.json").write_text(payload + "\n")
    (RESULTS / f"{name}-{stamp}.json").write_text(payload + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return RESULTS / f"{name}.md"


def report(
    name: str,
    title: str,
    data: dict[str, Any],
    table: str,
    notes: Sequence[str] = (),
    *,
    recommended: bool = False,
) -> str:
    """Print and save one benchmark's table; returns the markdown. A run through
    ``bench/recommended.py`` is saved and titled apart."""
    data["recommended"] = recommended
    if recommended:
        name, title = f"{name}-recommended", f"{title} (with bench/recommended.py)"
    text = f"### {title}\n\n{machine_line(data.get('machine'))}\n\n{table}\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    save(name, data, text)
    print(text, flush=True)
    return text


def clear_work(name: str) -> None:
    remove_tree(WORK / name)


def copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)

"""``dropcut run | status | check | retry``.

Exit codes: 0 success or clean stop; 1 unexpected failure; 2 bad configuration (systemd
does not restart on it: ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sqlite3
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropcut import __version__

# The rest of dropcut is imported where it is used: a worker process of the backlog's
# inspection pool imports this module again (multiprocessing re-imports the main module),
# and needs none of it.
if TYPE_CHECKING:
    from dropcut.logs import Redactor
    from dropcut.queue import JobQueue
    from dropcut.settings import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropcut", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dropcut {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: $DROPCUT_CONFIG); DROPCUT_* variables override it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument(
        "--take-terminal",
        action="store_true",
        help="started by another program in a terminal (`make run`): run in a process group of "
        "its own that the terminal's Ctrl-C reaches alone, so that the program that started "
        "dropcut sees its clean exit instead of dying of the SIGINT too",
    )
    status = sub.add_parser("status", parents=[common], help="jobs per state, pause, last error")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check", parents=[common], help="validate and print the effective configuration")
    retry = sub.add_parser("retry", parents=[common], help="put quarantined files back in the queue")
    retry.add_argument("paths", nargs="*", type=Path, help="quarantined files (paths or inbox-relative)")
    retry.add_argument("--all", action="store_true", help="every quarantined file")
    budget = sub.add_parser(
        "budget", parents=[common], help="the spend guard: requests used against budget_per_day / _month"
    )
    budget.add_argument("action", nargs="?", choices=("show", "raise"), default="show")
    budget.add_argument("requests", nargs="?", type=int, help="with raise: how many more requests to allow")
    sub.add_parser(
        "resume", parents=[common], help="lift the budget caps until the current day and month end"
    )
    for name, what in (("approve", "send"), ("discard", "never send (they stay in the inbox)")):
        held = sub.add_parser(name, parents=[common], help=f"held files of a large batch: {what}")
        held.add_argument(
            "folder", nargs="?", default=None, help="an inbox folder (default: every held file)"
        )
    rerender = sub.add_parser(
        "rerender",
        parents=[common],
        help="render done inputs again with today's recipes, from their cached mattes",
    )
    rerender.add_argument(
        "paths", nargs="*", type=Path, help="inputs (archive or inbox paths, or inbox-relative)"
    )
    rerender.add_argument("--all", action="store_true", help="every done input")
    rerender.add_argument(
        "--since",
        type=date.fromisoformat,
        default=None,
        help="only inputs queued on or after DATE (YYYY-MM-DD)",
    )
    return parser


PR_GET_DUMPABLE = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # before the configuration (and with it the API key) is read
    from dropcut.harden import disable_core_dumps

    dump_problems = disable_core_dumps() if args.command == "run" else []
    from dropcut.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "run":
        return _run(settings, args, dump_problems)
    handler = {
        "status": _status,
        "check": _check,
        "retry": _retry,
        "rerender": _rerender,
        "budget": _budget,
        "resume": _resume,
        "approve": _release_held,
        "discard": _release_held,
    }[args.command]
    return handler(settings, args)


def _run(settings: Settings, args: argparse.Namespace, dump_problems: Sequence[str] = ()) -> int:
    from dropcut.settings import ConfigError, startup_problems

    problems = startup_problems(settings)
    if problems:
        print(f"dropcut: cannot start: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_CONFIG
    from dropcut.logs import setup
    from dropcut.service import AlreadyRunning, Daemon
    from dropcut.systemd import JournalUnavailableError

    try:
        logs = setup(settings.log_format or "json", settings.log_level)
        redactor = logs.redactor
    except JournalUnavailableError as exc:
        print(f"dropcut: cannot start: log_format=journal: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = settings.resolve_api_key()  # checked by startup_problems; the file may change
    except ConfigError as exc:
        print(f"dropcut: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    redactor.set_secrets(key.get_secret_value() if key else None)  # before anything is logged
    if dump_problems:
        import structlog

        structlog.get_logger().warning("core_dumps_not_disabled", problems=list(dump_problems))
    daemon = Daemon(settings, config_path=args.config, redactor=redactor, console=logs.console)

    # --take-terminal (`make run`). A Ctrl-C sends SIGINT to the terminal's whole foreground
    # process group: to make (and its recipe's shell) as well as to dropcut. However cleanly
    # dropcut stops, GNU make then waits for it and kills itself with the same signal (exit
    # 130; "*** [run] Interrupt" when a shell between them died of it too). In a process
    # group of its own that is the terminal's foreground group, dropcut alone gets the
    # Ctrl-C, and make sees its exit 0. Taken only by a process in the foreground group that
    # does not lead it (a shell with job control gave it its own already; `make run &` is
    # not in the foreground), and given back at the end.
    import signal

    def hand_terminal(fd: int, group: int) -> None:
        # a process outside the foreground group that sets it is sent SIGTTOU, which would
        # stop it, unless the signal is blocked
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            os.tcsetpgrp(fd, group)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    tty, parent_group = None, os.getpgrp()
    if getattr(args, "take_terminal", False) and parent_group != os.getpid():
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            fd = None  # no controlling terminal: no Ctrl-C to take
        if fd is not None:
            try:
                if os.tcgetpgrp(fd) == parent_group:
                    os.setpgid(0, 0)
                    try:
                        hand_terminal(fd, os.getpid())
                    except OSError:
                        os.setpgid(0, parent_group)  # not left in a group no Ctrl-C reaches
                        raise
                    tty = fd
                    # Ctrl-Z would stop dropcut's group alone, which neither make nor the
                    # shell waiting for make would notice or continue: a hung terminal.
                    # (The inspection workers, started later, inherit the ignored signal.)
                    signal.signal(signal.SIGTSTP, signal.SIG_IGN)
            except OSError:
                pass  # run as started: Ctrl-C reaches make too
            finally:
                if tty is None:
                    os.close(fd)
    try:
        daemon.run()
    except (ConfigError, AlreadyRunning) as exc:
        print(f"dropcut: cannot start: {redactor.scrub_text(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if tty is not None:
            try:
                hand_terminal(tty, parent_group)
            except OSError:
                pass  # the group that started dropcut is gone
            os.close(tty)
    return daemon.exit_code


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from dropcut.settings import startup_problems

    problems = startup_problems(settings)
    print(json.dumps(settings.redacted(), indent=2))
    for problem in problems:
        print(f"dropcut: {problem}", file=sys.stderr)
    if not problems:
        print("dropcut: configuration OK", file=sys.stderr)
    return EXIT_CONFIG if problems else EXIT_OK


def status_report(settings: Settings) -> dict[str, Any]:
    """What ``dropcut status`` shows, as data, with the API key scrubbed out of every
    value (the queue may hold error details written by older versions, which did not
    scrub them).

    Raises:
        sqlite3.Error: the queue database cannot be read.
    """
    scrubbed = _status_redactor(settings).scrub(_status_data(settings))
    assert isinstance(scrubbed, dict)
    return scrubbed


def _status_redactor(settings: Settings) -> Redactor:
    """A redactor for the key the settings resolve to; for a key that is refused
    (:class:`~dropcut.settings.ApiKeyError`), its visible pieces, which is what an HTTP
    library's error text would have quoted."""
    from dropcut.logs import Redactor
    from dropcut.settings import ApiKeyError, ConfigError

    redactor = Redactor()
    try:
        key = settings.resolve_api_key()
    except ApiKeyError as exc:
        redactor.set_secrets(*exc.fragments)
    except ConfigError:
        pass  # an unreadable key file: nothing to scrub with
    else:
        redactor.set_secrets(key.get_secret_value() if key else None)
    return redactor


def _status_data(settings: Settings) -> dict[str, Any]:
    from dropcut.overview import iso, read_overview
    from dropcut.queue import JobQueue, connect

    db = settings.state_dir / "queue.sqlite3"
    running = _daemon_running(settings)
    if not db.exists():
        return {"database": str(db), "exists": False, "running": running}
    conn = connect(db, readonly=True)
    try:
        queue = JobQueue(conn)
        overview = read_overview(
            queue,
            limit=settings.rate_limit_requests,
            period=settings.rate_limit_period_seconds,
            now=time.time(),
        )
        row = conn.execute(
            "SELECT rel_path, error, updated_at FROM jobs WHERE error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    last_error = None
    if row is not None:
        error = json.loads(row["error"])
        last_error = {"file": row["rel_path"], "error": error, "at": iso(row["updated_at"])}
    return {
        "database": str(db),
        "exists": True,
        "running": running,
        **overview.to_json(),
        "last_error": last_error,
    }


def _daemon_running(settings: Settings) -> bool | None:
    """Does a daemon hold the lock of this ``state_dir``? None: cannot tell (no access)."""
    from dropcut.paths import Layout

    try:
        fd = os.open(Layout.of(settings).lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from dropcut.overview import human_duration, pause_hint

    try:
        report = status_report(settings)
    except sqlite3.Error as exc:
        print(f"dropcut: cannot read the queue: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    width = min(120, shutil.get_terminal_size((120, 24)).columns)

    def say(text: str, indent: str = "  ") -> None:
        print(textwrap.fill(text, width=width, subsequent_indent=indent, break_on_hyphens=False))

    running = {True: "running", False: "not running", None: "unknown (cannot read its lock)"}
    say(f"dropcut: {running[report['running']]} — state in {settings.state_dir}")
    if not report["exists"]:
        say(f"no queue yet at {report['database']}")
        return EXIT_OK
    jobs = report["jobs"]
    say("jobs:  " + "  ".join(f"{state} {n}" for state, n in jobs.items() if n or state in CORE_STATES))
    backlog, eta = report["backlog"], report["eta_seconds"]
    if not backlog:
        say("backlog: none")
    elif report["running"] is False:
        say(f"backlog: {backlog} files; they wait for the daemon (not running)")
    elif eta is None:
        say(f"backlog: {backlog} files; no estimate while nothing is sent (see the conditions)")
    elif eta == 0:
        say(f"backlog: {backlog} files; all go within the current window of the allowance")
    else:
        say(f"backlog: {backlog} files; done in about {human_duration(eta)} at the allowance")
    if jobs.get("held"):
        say(
            f"held: {jobs['held']} files of a large batch wait for `dropcut approve [FOLDER]` "
            "(or `dropcut discard [FOLDER]`: they stay in the inbox, unsent)"
        )
    rate = report["rate"]
    used, allowed = rate["used"], rate["allowance"]
    say(
        f"requests: {used['minute']}/{allowed['minute']} in the last minute, "
        f"{used['hour']}/{allowed['hour']} in the last hour, {used['day']}/{allowed['day']} in the last day "
        f"(allowance {rate['limit']} per {rate['period_seconds']:g} s)"
    )
    say(f"last success: {report['last_success'] or 'never'}")
    if report.get("frames_skipped"):
        say(f"cut to their first frame (multi-page or animated): {report['frames_skipped']} files")
    credit = report["credit"]
    if credit:
        line = f"credit: {credit.get('credit', 'unknown')}"
        if credit.get("expiration_date"):
            line += f", expires {credit['expiration_date']}"
        if credit.get("checked_at"):
            line += f" (checked {credit['checked_at']})"
        say(line)
    else:
        say("credit: not checked yet")
    conditions = report["conditions"]
    if conditions:
        when = "now" if report["running"] else "when the daemon last ran"
        say(f"conditions ({when}):")
        for c in conditions:
            say(f"  - {c['sentence']}", indent="    ")
    paused = report["paused"]
    if paused:
        say(f"PAUSED since {iso_of(paused.get('since')) or 'unknown'}: {_words(paused)}")
        if paused.get("location"):
            say(f"  redirected to: {paused['location']} (check api_url)", indent="    ")
        hint = pause_hint(paused.get("code"))
        if hint:
            say(f"  what to do: {hint}", indent="    ")
    elif not conditions:
        say("not paused; no conditions")
    last = report["last_error"]
    if last:
        say(f"last error: {last['file']}: {_words(last['error'])} ({last['at']})")
    return EXIT_OK


CORE_STATES = ("queued", "inflight", "done", "quarantined")  # listed even at 0


def iso_of(ts: Any) -> str | None:
    from dropcut.overview import iso

    return iso(float(ts)) if isinstance(ts, int | float) else None


def _words(error: Any) -> str:
    """An error record in words, with no ``None`` in them: ``HTTP 402 no_credit — detail``,
    or ``refused here, not sent (415) unsupported_format — detail`` for a local refusal."""
    if not isinstance(error, dict):
        return str(error)
    parts = []
    if error.get("source") == "local":
        parts.append("refused here, not sent" + (f" ({error['status']})" if error.get("status") else ""))
    elif error.get("status") is not None:
        parts.append(f"HTTP {error['status']}")
    if error.get("code"):
        parts.append(str(error["code"]))
    text = " ".join(parts) or "error"
    if error.get("detail"):
        text += f" — {error['detail']}"
    return text


def _relative(settings: Settings, path: Path, other: Path | None = None) -> str:
    """``path`` relative to the quarantine (or ``other``) or the inbox, as the queue names it."""
    from dropcut.retry import relative

    return relative(settings, path, other)


def _retry(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut retry``: see :mod:`dropcut.retry` (the status page's Retry button does the
    same). Exit 1 when a file was not quarantined or could not be put back."""
    if not args.all and not args.paths:
        print("dropcut: retry needs PATH… or --all", file=sys.stderr)
        return EXIT_CONFIG
    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        for path in args.paths:
            print(f"dropcut: {path}: not quarantined (no queue yet)", file=sys.stderr)
        if args.all:
            print("dropcut: no queue yet: nothing is quarantined", file=sys.stderr)
        return EXIT_FAILURE
    from dropcut.queue import JobQueue
    from dropcut.retry import retry_job, select

    queue = JobQueue.open(db)
    failed = 0
    try:
        wanted = None if args.all else {_relative(settings, p) for p in args.paths}
        jobs, missing = select(queue, wanted)
        for name in missing:
            print(f"dropcut: {name}: not quarantined", file=sys.stderr)
            failed += 1
        for job in jobs:
            result = retry_job(settings, queue, job)
            if result.back_as is None:
                print(f"dropcut: {result.quarantined_as}: {result.problem}", file=sys.stderr)
                failed += 1
            else:
                print(f"requeued {result.quarantined_as} -> inbox/{result.back_as}")
    finally:
        queue.close()
    return EXIT_FAILURE if failed else EXIT_OK


def _budget(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut budget [show]`` and ``dropcut budget raise N`` (N more requests in the
    current day and month: a raise ends with its period)."""
    from dropcut.budget import PERIODS, period_bounds, period_key
    from dropcut.queue import JobQueue

    if args.action == "raise" and (args.requests is None or args.requests < 1):
        print("dropcut: budget raise needs a number of requests >= 1", file=sys.stderr)
        return EXIT_CONFIG
    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        print(f"dropcut: no queue yet at {db}", file=sys.stderr)
        return EXIT_FAILURE
    tz, now = settings.budget_tz(), time.time()
    queue = JobQueue.open(db)
    try:
        stored = _budget_record(queue, {period_key(now, tz, p) for p in PERIODS})
        if args.action == "raise":
            for period in PERIODS:
                key = period_key(now, tz, period)
                stored["raised"][key] = int(stored["raised"].get(key, 0)) + args.requests
            queue.set_meta("budget", stored)
            print(f"raised the caps of today and this month by {args.requests} requests")
        for period in PERIODS:
            cap = settings.budget_per_day if period == "day" else settings.budget_per_month
            start, end = period_bounds(now, tz, period)
            key = period_key(now, tz, period)
            used = queue.requests_since(start)
            if key in stored["lifted"]:
                limit = "no cap (lifted by dropcut resume)"
            elif cap is None:
                limit = "no cap"
            else:
                extra = int(stored["raised"].get(key, 0))
                limit = f"cap {cap + extra}" + (f" ({cap} + {extra} raised)" if extra else "")
            resets = datetime.fromtimestamp(end, tz).isoformat(timespec="minutes")
            print(f"this {period}: {used} requests, {limit}; resets {resets}")
    finally:
        queue.close()
    return EXIT_OK


def _resume(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut resume``: the budget caps are off until the current day and month end."""
    from dropcut.budget import PERIODS, period_key
    from dropcut.queue import JobQueue

    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        print(f"dropcut: no queue yet at {db}", file=sys.stderr)
        return EXIT_FAILURE
    now, tz = time.time(), settings.budget_tz()
    keys = [period_key(now, tz, p) for p in PERIODS]
    queue = JobQueue.open(db)
    try:
        stored = _budget_record(queue, set(keys))
        stored["lifted"] = sorted(set(stored["lifted"]) | set(keys))
        queue.set_meta("budget", stored)
    finally:
        queue.close()
    print(f"budget caps lifted until the end of {' and '.join(k.split(':', 1)[1] for k in keys)}")
    return EXIT_OK


def _release_held(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut approve [FOLDER]`` / ``dropcut discard [FOLDER]``: held files are queued,
    or remembered as not to be sent (nothing is moved or deleted)."""
    from dropcut.queue import JobQueue

    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        print(f"dropcut: no queue yet at {db}", file=sys.stderr)
        return EXIT_FAILURE
    folder = _relative(settings, Path(args.folder), settings.inbox).strip("/") if args.folder else None
    if folder == ".":
        folder = None
    queue = JobQueue.open(db)
    try:
        held = queue.held_folders()
        n = queue.release_held(folder, to="queued" if args.command == "approve" else "discarded")
    finally:
        queue.close()
    where = f" in {folder}/" if folder else ""
    files = f"{n} held file{'s' if n != 1 else ''}{where}"
    if n == 0:
        listed = ", ".join(f"{f or '(inbox top)'}: {c}" for f, c in held)
        now = f"held now: {listed}" if listed else "nothing is held"
        print(f"dropcut: no held files{where} ({now})", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "approve":
        print(f"approved {files}: they are queued and will be sent")
    else:
        print(f"discarded {files}: they stay in the inbox and will not be sent")
    return EXIT_OK


def _budget_record(queue: JobQueue, current: set[str]) -> dict[str, Any]:
    """The stored raises and lifts (``meta`` ``budget``) of the ``current`` periods (see
    :func:`dropcut.budget.period_key`): those of past periods are dropped."""
    stored = queue.get_meta("budget")
    stored = stored if isinstance(stored, dict) else {}
    raised = stored.get("raised")
    raised = {k: int(v) for k, v in raised.items() if k in current} if isinstance(raised, dict) else {}
    lifted = [k for k in stored.get("lifted") or [] if isinstance(k, str) and k in current]
    return {"raised": raised, "lifted": lifted}


def _rerender(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut rerender``: see :mod:`dropcut.rerender`. Exit 1 when an input could not be
    rendered again (each said why) or none matched."""
    if not args.all and not args.paths:
        print("dropcut: rerender needs PATH… or --all", file=sys.stderr)
        return EXIT_CONFIG
    if settings.api_mode != "matte":
        print('dropcut: rerender renders from cached mattes: it needs api_mode = "matte"', file=sys.stderr)
        return EXIT_CONFIG
    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        print("dropcut: no queue yet: nothing was done", file=sys.stderr)
        return EXIT_FAILURE
    from dropcut.queue import JobQueue
    from dropcut.rerender import rerender, select

    wanted = None if args.all else {_relative(settings, p, settings.archive) for p in args.paths}
    since = None if args.since is None else datetime.combine(args.since, datetime.min.time()).astimezone()
    queue = JobQueue.open(db)
    try:
        jobs = select(queue.done_jobs(), wanted, since, updated=lambda job: job.first_seen)
        results = rerender(settings, queue, jobs)
    finally:
        queue.close()
    failed = 0
    for result in results:
        if result.problem is None:
            print(f"rerendered {result.rel_path} -> {', '.join(result.outputs)}")
        else:
            print(f"dropcut: {result.rel_path}: {result.problem}", file=sys.stderr)
            failed += 1
    found = {r.rel_path for r in results}
    for missing in sorted((wanted or set()) - found - {j.archived_as for j in jobs if j.archived_as}):
        print(f"dropcut: {missing}: no done input of that name", file=sys.stderr)
        failed += 1
    if not results and wanted is None:
        print("dropcut: nothing to render again", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE if failed else EXIT_OK


def _q_rel(queue: JobQueue, job_id: int) -> str | None:
    from dropcut.retry import quarantined_as

    return quarantined_as(queue, job_id)


if __name__ == "__main__":
    raise SystemExit(main())

"""``dropcut run | status | check | retry``.

Exit codes: 0 success or clean stop; 1 unexpected failure; 2 bad configuration (systemd
does not restart on it: ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path, PurePosixPath
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
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    status = sub.add_parser("status", parents=[common], help="jobs per state, pause, last error")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check", parents=[common], help="validate and print the effective configuration")
    retry = sub.add_parser("retry", parents=[common], help="put quarantined files back in the queue")
    retry.add_argument("paths", nargs="*", type=Path, help="quarantined files (paths or inbox-relative)")
    retry.add_argument("--all", action="store_true", help="every quarantined file")
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
    handler = {"status": _status, "check": _check, "retry": _retry, "rerender": _rerender}[args.command]
    return handler(settings, args)


def _run(settings: Settings, args: argparse.Namespace, dump_problems: Sequence[str] = ()) -> int:
    from dropcut.settings import ConfigError, startup_problems

    problems = startup_problems(settings)
    if problems:
        print(f"dropcut: cannot start: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_CONFIG
    from dropcut.logs import configure
    from dropcut.service import AlreadyRunning, Daemon
    from dropcut.systemd import JournalUnavailableError

    try:
        redactor = configure(settings.log_format or "json", settings.log_level)
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
    daemon = Daemon(settings, config_path=args.config, redactor=redactor)
    try:
        daemon.run()
    except (ConfigError, AlreadyRunning) as exc:
        print(f"dropcut: cannot start: {redactor.scrub_text(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
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
    from dropcut.queue import JobQueue, connect

    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        return {"database": str(db), "exists": False}
    conn = connect(db, readonly=True)
    try:
        queue = JobQueue(conn)
        counts = queue.counts()
        try:
            frames_skipped = queue.frames_skipped()
        except sqlite3.OperationalError:  # a database the daemon has not migrated yet
            frames_skipped = 0
        paused = queue.get_meta("paused")
        credit = queue.get_meta("credit")
        row = conn.execute(
            "SELECT rel_path, error, updated_at FROM jobs WHERE error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    last_error = None
    if row is not None:
        last_error = {
            "file": row["rel_path"],
            "error": json.loads(row["error"]),
            "at": _iso(row["updated_at"]),
        }
    return {
        "database": str(db),
        "exists": True,
        "jobs": counts,
        "frames_skipped": frames_skipped,
        "paused": paused,
        "credit": credit,
        "last_error": last_error,
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _status(settings: Settings, args: argparse.Namespace) -> int:
    try:
        report = status_report(settings)
    except sqlite3.Error as exc:
        print(f"dropcut: cannot read the queue: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    if not report["exists"]:
        print(f"no queue yet at {report['database']}")
        return EXIT_OK
    jobs = report["jobs"]
    print("jobs:  " + "  ".join(f"{state} {n}" for state, n in jobs.items()))
    if report.get("frames_skipped"):
        print(f"cut to their first frame (multi-page or animated): {report['frames_skipped']} files")
    paused = report["paused"]
    if paused:
        print(f"PAUSED since {_iso(paused.get('since'))}: {paused.get('code')} — {paused.get('detail')}")
        if paused.get("location"):
            print(f"  redirected to: {paused['location']} (check api_url)")
    else:
        print("running (not paused)")
    credit = report["credit"]
    if credit:
        print(
            f"credit: {credit.get('credit')} (expires {credit.get('expiration_date')}, "
            f"checked {_iso(credit.get('checked_at'))})"
        )
    last = report["last_error"]
    if last:
        err = last["error"]
        print(f"last error: {last['file']}: {err.get('status')} {err.get('code')} — {err.get('detail')}")
    return EXIT_OK


def _relative(settings: Settings, path: Path, other: Path | None = None) -> str:
    """``path`` relative to the quarantine (or ``other``) or the inbox, as the queue names it."""
    full = Path(os.path.abspath(path))
    for root in (other or settings.quarantine, settings.inbox):
        if full.is_relative_to(root):
            return str(PurePosixPath(*full.relative_to(root).parts))
    return str(PurePosixPath(*path.parts))


def _retry(settings: Settings, args: argparse.Namespace) -> int:
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
    from dropcut.paths import error_json_rel, numbered_candidates
    from dropcut.publish import move_in
    from dropcut.queue import JobQueue

    queue = JobQueue.open(db)
    failed = 0
    try:
        jobs = queue.quarantined_jobs()
        if not args.all:
            wanted = {_relative(settings, p) for p in args.paths}
            jobs = [j for j in jobs if j.rel_path in wanted or _q_rel(queue, j.id) in wanted]
            found = {j.rel_path for j in jobs} | {_q_rel(queue, j.id) for j in jobs}
            for missing in sorted(wanted - found):
                print(f"dropcut: {missing}: not quarantined", file=sys.stderr)
                failed += 1
        for job in jobs:
            q_rel = _q_rel(queue, job.id) or job.rel_path
            # Forget the job first: a running daemon that sees the file come back must
            # not take it for the quarantined job it was.
            row = queue.forget(job.id)
            try:
                back = move_in(settings.quarantine, q_rel, settings.inbox, numbered_candidates(job.rel_path))
            except OSError as exc:
                if row is not None:
                    queue.restore(row)  # still quarantined: a later retry can find it
                print(f"dropcut: {q_rel}: cannot move back: {exc.strerror}", file=sys.stderr)
                failed += 1
                continue
            if back is None:
                print(f"dropcut: {q_rel}: no longer in the quarantine folder", file=sys.stderr)
                failed += 1
                continue
            (settings.quarantine / error_json_rel(q_rel)).unlink(missing_ok=True)
            print(f"requeued {q_rel} -> inbox/{back}")
    finally:
        queue.close()
    return EXIT_FAILURE if failed else EXIT_OK


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
    error = queue.job_error(job_id)
    value = error.get("quarantined_as") if error else None
    return str(value) if value else None


if __name__ == "__main__":
    raise SystemExit(main())

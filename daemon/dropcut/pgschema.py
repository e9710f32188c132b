"""The shared queue's database: connecting, and the versioned schema (issue 13).

``queue_url = "postgresql://user@host:5432/db"`` makes several daemons share one queue.
The password never is in the URL as configured: it comes from ``queue_password_file`` or
the systemd credential ``dropcut-queue-password`` (:func:`conninfo`), and the URL shown in
logs and ``dropcut status`` is :func:`display_url` (no password, whatever was given).

The schema is created and migrated by dropcut itself: :data:`MIGRATIONS` is the ordered
list of steps, ``schema_version`` records how many ran. :func:`migrate` takes a
transaction-level advisory lock first, so two daemons starting at once migrate once.

Times in these tables are epoch seconds of the **database server's** clock
(``extract(epoch from clock_timestamp())``): machines sharing a key must agree on "now" for
the rate window, and their own clocks may differ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PASSWORD_CREDENTIAL = "dropcut-queue-password"
MIGRATE_LOCK = 0x64726F70  # pg_advisory_xact_lock key: "drop"
CONNECT_TIMEOUT_SECONDS = 5

#: Each entry: one step of the schema, run once, in order, in one transaction.
MIGRATIONS: tuple[str, ...] = (
    # 1: jobs, output names, meta, the request log, the daemons, the shared rate window,
    #    the shared result cache
    """
    CREATE TABLE jobs (
        id BIGSERIAL PRIMARY KEY,
        site TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        mtime_ns BIGINT NOT NULL,
        inode BIGINT NOT NULL,
        device BIGINT NOT NULL,
        format TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        first_seen DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        output_rel TEXT,
        error JSONB,
        history JSONB NOT NULL DEFAULT '[]',
        seq BIGINT NOT NULL DEFAULT 0,
        ctime_ns BIGINT NOT NULL DEFAULT 0,
        held_as TEXT,
        frames INTEGER NOT NULL DEFAULT 1,
        recipe TEXT,
        archived_as TEXT,
        admitted_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION,
        UNIQUE (site, rel_path, sha256)
    );
    CREATE INDEX jobs_site_state ON jobs (site, state, next_attempt_at);
    CREATE INDEX jobs_site_sha ON jobs (site, sha256, state);
    CREATE INDEX jobs_site_path ON jobs (site, rel_path);
    CREATE INDEX jobs_site_seq ON jobs (site, seq);
    CREATE INDEX jobs_site_recent ON jobs (site, state, updated_at);
    CREATE INDEX jobs_lease ON jobs (site, lease_until) WHERE state = 'inflight';
    CREATE TABLE outputs (
        site TEXT NOT NULL,
        out_key TEXT NOT NULL,
        out_rel TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        PRIMARY KEY (site, out_key)
    );
    CREATE INDEX outputs_owner ON outputs (site, rel_path);
    CREATE TABLE meta (
        site TEXT NOT NULL,
        key TEXT NOT NULL,
        value JSONB NOT NULL,
        PRIMARY KEY (site, key)
    );
    CREATE TABLE requests (
        key_id TEXT NOT NULL,
        site TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        endpoint TEXT NOT NULL,
        status INTEGER,
        seconds DOUBLE PRECISION NOT NULL,
        sent BIGINT NOT NULL,
        received BIGINT NOT NULL
    );
    CREATE INDEX requests_started ON requests (key_id, started);
    CREATE TABLE daemons (
        id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        stopped_at DOUBLE PRECISION
    );
    CREATE TABLE rate_keys (
        key_id TEXT PRIMARY KEY,
        hold_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        outage_streak INTEGER NOT NULL DEFAULT 0,
        outage_step_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        pause JSONB
    );
    CREATE TABLE rate_slots (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES rate_keys (key_id),
        started DOUBLE PRECISION NOT NULL,
        sent DOUBLE PRECISION,
        owner TEXT NOT NULL
    );
    CREATE INDEX rate_slots_key ON rate_slots (key_id, started);
    CREATE TABLE results (
        result_key TEXT PRIMARY KEY,
        body BYTEA NOT NULL,
        stored_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: rate_slots.released — when a slot's request was over (answered or failed); NULL =
    #    in flight. During an outage a slot is granted only when no other slot of the key
    #    is open: the one probe across all daemons (a probe's body is `sent` long before its
    #    answer). The partial index serves each daemon's closing of its own stale slots.
    #    (IF NOT EXISTS: databases given the column by an earlier stopgap migrate cleanly.)
    """
    ALTER TABLE rate_slots ADD COLUMN IF NOT EXISTS released DOUBLE PRECISION;
    CREATE INDEX IF NOT EXISTS rate_slots_owner ON rate_slots (owner) WHERE released IS NULL;
    """,
)


def key_id(api_key: str) -> str:
    """What the shared tables know of an API key: a hash of it (sha256 of
    ``"dropcut-rate:" + key``), never the key."""
    import hashlib

    return hashlib.sha256(b"dropcut-rate:" + api_key.encode()).hexdigest()


def display_url(url: str) -> str:
    """``url`` without a password, for logs, errors and ``dropcut status``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_password(password_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The queue's password from ``password_file``, else the systemd credential
    ``dropcut-queue-password``; None when neither holds one. Surrounding whitespace is
    dropped. Raises ``OSError`` when a file exists but cannot be read."""
    env = os.environ if environ is None else environ
    candidates = [password_file] if password_file is not None else []
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(env["CREDENTIALS_DIRECTORY"]) / PASSWORD_CREDENTIAL)
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        if text:
            return text
    return None


def conninfo(url: str, password: str | None, *, application: str = "dropcut") -> str:
    """A libpq connection string for ``url`` with ``password`` (a password inside the URL
    is ignored: it would end up in logs and process listings), a connect timeout, and
    keepalives so that a dead server is noticed. Raises ``psycopg.ProgrammingError`` for a
    malformed URL."""
    params = conninfo_to_dict(url)
    params.pop("password", None)
    if password is not None:
        params["password"] = password
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    params.setdefault("application_name", application)
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 10)
    params.setdefault("keepalives_interval", 5)
    params.setdefault("keepalives_count", 3)
    return make_conninfo("", **params)


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema up to date; returns the version now. Safe when several daemons
    start at once (a transaction-level advisory lock serialises them). ``conn`` must be in
    autocommit mode or idle; the steps run in one transaction each."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = int(row[0]) if row is not None else 0
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        for step, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute(sql.encode())  # (a constant of this module)
            conn.execute("UPDATE schema_version SET version = %s", (step,))
        return len(MIGRATIONS) if version < len(MIGRATIONS) else version


def db_now(conn: psycopg.Connection[Any]) -> float:
    """The database server's clock, in epoch seconds."""
    row = conn.execute("SELECT extract(epoch from clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])

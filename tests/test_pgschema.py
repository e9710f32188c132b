"""The shared queue's schema and connection (issue 13, item 1): created and migrated by
dropcut itself, versioned, once when several daemons start at once; the password never
in a URL that is shown."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from dropcut.pgschema import MIGRATIONS, conninfo, display_url, key_id, migrate, read_password
from tests.pg import PASSWORD, Cluster


def test_migrate_creates_the_schema_once_with_eight_daemons_starting_at_once(pg: Cluster, pg_db: str) -> None:
    versions: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        try:
            with psycopg.connect(conninfo(pg_db, PASSWORD), autocommit=True) as conn:
                barrier.wait()
                versions.append(migrate(conn))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert versions == [len(MIGRATIONS)] * 8
    with psycopg.connect(conninfo(pg_db, PASSWORD), autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        wanted = {"jobs", "outputs", "meta", "requests", "daemons", "rate_keys", "rate_slots", "results"}
        assert wanted <= tables
        assert migrate(conn) == len(MIGRATIONS)  # again: nothing to do


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://dropcut:s3cret@db.example:5432/q", "postgresql://dropcut@db.example:5432/q"),
        ("postgresql://dropcut@db.example/q", "postgresql://dropcut@db.example/q"),
        ("postgresql://u:p@[::1]:5433/q?sslmode=require", "postgresql://u@[::1]:5433/q?sslmode=require"),
    ],
)
def test_display_url_never_shows_a_password(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_the_password_comes_from_the_file_or_the_credential_never_the_url(
    pg: Cluster, tmp_path: Path
) -> None:
    info = conninfo(pg.url(password=False).replace("dropcut@", "dropcut:wrong@"), PASSWORD)
    assert "wrong" not in info
    with psycopg.connect(info) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("dropcut",)
    (tmp_path / "pw").write_text(f"  {PASSWORD}\n")
    assert read_password(tmp_path / "pw", environ={}) == PASSWORD
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "dropcut-queue-password").write_text("from-systemd\n")
    assert read_password(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}) == "from-systemd"
    assert read_password(tmp_path / "missing", environ={}) is None


def test_key_id_is_a_hash_not_the_key() -> None:
    kid = key_id("sk-live-123456")
    assert len(kid) == 64 and "123456" not in kid and kid != key_id("sk-live-123457")

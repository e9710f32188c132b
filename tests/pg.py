"""A throw-away PostgreSQL cluster for the shared queue's tests (issue 13).

Debian's ``postgresql`` package (installed by ``.ci/run``) provides the server binaries;
the tests create a cluster in a temporary folder with ``initdb``, start it with
``pg_ctl`` on a free loopback port (and a socket in the same folder), and remove it at the
end. PostgreSQL refuses to run as root: when the tests are root, the cluster belongs to
the unprivileged ``postgres`` user (created by the package) and the commands run as that
user with ``runuser``.

TCP connections need a password (``scram-sha-256``), as a real shared queue would: the
fixture creates the role ``dropcut`` with :data:`PASSWORD` and the database ``dropcut``.

Use the ``pg`` fixture (session-wide: one cluster for the run) and :meth:`Cluster.fresh_db`
for a database of one's own; :meth:`Cluster.stop` / :meth:`Cluster.start` take the server
away and bring it back (the outage tests).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "dropcut-test-password-7f3a"
USER = "dropcut"


def pg_bin() -> Path | None:
    """The newest installed server's ``bin`` folder, or None."""
    root = Path("/usr/lib/postgresql")
    versions = sorted((p for p in root.glob("*/bin") if (p / "initdb").exists()), key=lambda p: p.parent.name)
    return versions[-1] if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    bin: Path
    data: Path
    port: int
    run_as: str | None  # the user the server runs as (root cannot), or None: ourselves

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=check)

    def start(self) -> None:
        self.run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.data / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c shared_buffers=32MB",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def psql(self, sql: str, db: str = "postgres") -> str:
        done = self.run(
            str(self.bin / "psql"), "-h", str(self.data), "-p", str(self.port), "-U", "postgres", "-d", db,
            "-v", "ON_ERROR_STOP=1", "-Atc", sql,
        )  # fmt: skip
        return done.stdout

    def url(self, db: str = USER, *, password: bool = False) -> str:
        """``postgresql://dropcut@127.0.0.1:PORT/db`` (the password only when asked: the
        daemon takes it from a file)."""
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{db}"

    def fresh_db(self) -> str:
        """A new empty database owned by ``dropcut``; returns its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} OWNER {USER}")
        return name


def _start_cluster(root: Path) -> Cluster:
    binaries = pg_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        run_as = "postgres"
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    pwfile = root / "pw"
    pwfile.write_text("postgres-superuser-pw\n")
    if run_as:
        shutil.chown(pwfile, run_as, run_as)
    cluster = Cluster(binaries, data, free_port(), run_as)
    cluster.run(
        str(binaries / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
    )  # fmt: skip
    cluster.start()
    cluster.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
    cluster.psql(f"CREATE DATABASE {USER} OWNER {USER}")
    return cluster


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """One cluster for the test session, removed at its end."""
    root = Path(tempfile.mkdtemp(prefix="dropcut-pg-"))
    os.chmod(root, 0o755)
    cluster = None
    try:
        cluster = _start_cluster(root)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(root)


@pytest.fixture
def pg_db(pg: Cluster) -> str:
    """The URL of a new empty database (no password in it), for one test."""
    return pg.url(pg.fresh_db())


@pytest.fixture
def pg_password_file(tmp_path: Path) -> Path:
    path = tmp_path / "queue-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path

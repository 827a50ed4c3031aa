"""A private, throwaway PostgreSQL server for tests: initdb into a temporary directory as the
``postgres`` user, listening only on a Unix socket in that directory (no TCP at all), stopped
and deleted in close(). Debian's ``postgresql`` package provides the binaries.

Each test gets its own database (``database()``), dropped when the test ends, so tests never
see each other's rows and the server starts once per session.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

START_TIMEOUT = 60       # s: initdb + first start on a loaded 2-core VM
_seq = itertools.count()


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return Path(found[-1]).parent


class PgServer:
    def __init__(self, durable: bool = False) -> None:
        """durable=False turns off fsync (tests); the benchmark measures with it on."""
        self.bin = pg_bin()
        self.user = "postgres"
        pw = pwd.getpwnam(self.user)
        self.dir = Path(tempfile.mkdtemp(prefix="hostagent-pg-"))
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self.port = 5432 + 10000 + os.getpid() % 20000   # only names the socket file
        self._started = False
        try:
            self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                               "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            self._as_postgres([
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                "-w", "-t", str(START_TIMEOUT), "-o",
                f"-c listen_addresses='' -k {self.socket_dir} -p {self.port}"
                + ("" if durable else " -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off"), "start"])
            self._started = True
        except BaseException:
            self.close()
            raise

    def _as_postgres(self, argv: list[str]) -> subprocess.CompletedProcess:
        r = subprocess.run(["runuser", "-u", self.user, "--", *argv], capture_output=True,
                           text=True, timeout=START_TIMEOUT + 30)
        if r.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n{log[-2000:]}")
        return r

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql)

    def database(self) -> str:
        """A new empty database; its DSN."""
        name = f"t{os.getpid()}_{next(_seq)}_{int(time.time() * 1000) % 100000}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop(self, dsn: str) -> None:
        name = dsn.split("/", 3)[3].split("?", 1)[0]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._started:
            subprocess.run(["runuser", "-u", self.user, "--", str(self.bin / "pg_ctl"), "-D",
                            str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"],
                           capture_output=True, timeout=60, check=False)
            self._started = False
        shutil.rmtree(self.dir, ignore_errors=True)


# -- fixtures (import them into a test module to use them) --------------------------------------

@pytest.fixture(scope="session")
def pg_server():
    server = PgServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh collector database URL: SQLite in the test's directory, or a new database on
    the session's PostgreSQL server (dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/events.db"
        return
    server = request.getfixturevalue("pg_server")
    dsn = server.database()
    try:
        yield dsn
    finally:
        server.drop(dsn)

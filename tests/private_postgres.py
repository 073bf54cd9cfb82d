"""A PostgreSQL server of a test's own, on a free port, to stop and restart at will.

The machine's shared PostgreSQL (5432) is never touched. ``initdb`` refuses to run as root, so
when the tests run as root the server's commands run as the ``postgres`` OS user (``runuser``),
in a temporary directory owned by it. Authentication is ``trust`` on 127.0.0.1 only.

    with PrivatePostgres() as postgres:
        postgres.create_database("chat")
        env["DATABASE_URL"] = postgres.url("chat")
        ...
        postgres.stop()   # an outage: every connection drops (``immediate``: like a crash)
        postgres.start()  # back, with everything that was committed
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import psycopg

from chatserver.fakes.base import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"
START_TIMEOUT_SECS = 30


class PrivatePostgres:
    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as
        # the postgres user, who must be able to reach the directory.
        self.root = Path(tempfile.mkdtemp(prefix="abuse-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam(OS_USER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.root.chmod(0o700)
        self._initialised = False

    @staticmethod
    def available() -> bool:
        return (PG_BIN / "initdb").exists() and (PG_BIN / "pg_ctl").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgres://{OS_USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> subprocess.CompletedProcess[bytes]:
        prefix = ["runuser", "-u", OS_USER, "--"] if self._as_postgres else []
        return subprocess.run(
            [*prefix, *command], check=True, capture_output=True, timeout=START_TIMEOUT_SECS + 10
        )

    def start(self) -> PrivatePostgres:
        if not self._initialised:
            self._run(
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                OS_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._initialised = True
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c max_connections=100",
            ]
        )
        # -w: pg_ctl returns once the server accepts connections (or fails after -t seconds).
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            str(START_TIMEOUT_SECS),
            "start",
        )
        return self

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` drops every connection at once, as a crash would; what was committed
        is still there after ``start`` (the write-ahead log is replayed)."""
        if self.running():
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        if not self._initialised:
            return False
        prefix = ["runuser", "-u", OS_USER, "--"] if self._as_postgres else []
        status = subprocess.run(
            [*prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            check=False,
            timeout=10,
        )
        return status.returncode == 0

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')  # a name of the test's own
        return self.url(name)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

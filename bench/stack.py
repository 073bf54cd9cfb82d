"""What the benchmark starts and must stop again: a fresh database, one server process, and the
channel layer's keys in the shared Redis (under a prefix of this run only).

The server is started exactly as deployments start it (``manage.py serve``); the database is
provisioned with the same commands an operator uses, plus a bulk insert of chats that stand for
devices which already talked to a counsellor (each mapped to a Zammad ticket).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import system

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
REGION_SLUG = "bench"
LANGUAGE = "de"
# Nothing listens there: no scenario makes the server call Zammad (no worker runs), but a region
# needs a Zammad URL to count as configured.
ZAMMAD_URL = "http://127.0.0.1:9"
SERVER_READY_TIMEOUT_SECS = 60
SERVER_STOP_TIMEOUT_SECS = 20


def device_id(index: int) -> str:
    return f"bench-{index}"


def ticket_id(index: int) -> int:
    """Ticket ids as the fake Zammad hands them out: 1, 2, 3, ..."""
    return index + 1


@dataclass
class Secrets:
    webhook_token: str = field(default_factory=lambda: secrets.token_hex(16))
    signature_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    zammad_token: str = field(default_factory=lambda: secrets.token_hex(16))


class Database:
    """A PostgreSQL database of the benchmark's own, dropped and created fresh, owned by a role
    of the same name that the server logs in as.

    The machine's PostgreSQL is shared (``max_connections`` 100 for everyone), so the database
    gets a connection limit: a server that leaks connections hits that limit ("too many
    connections for database") instead of locking every other user of the machine out.
    The limit binds the server's role only; superusers (the monitor) are exempt.
    """

    def __init__(
        self, name: str, connection_limit: int, admin_url: str = POSTGRES_ADMIN_URL
    ) -> None:
        # A guard against dropping a database someone else uses (tests use "test").
        if not name.startswith("chatbench") or not name.replace("_", "").isalnum():
            raise ValueError("the benchmark database's name must start with 'chatbench'")
        self.name = name
        self.connection_limit = connection_limit
        self.admin_url = admin_url
        self.created = False

    @property
    def url(self) -> str:
        return self.url_of(self.name)

    @staticmethod
    def url_of(name: str) -> str:
        """The URL the server logs in with, to the database of that name."""
        return f"postgres://{name}@127.0.0.1:5432/{name}"

    def _admin(self, *statements: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            for sql in statements:
                connection.execute(sql)  # fixed, checked identifiers

    def create(self) -> Database:
        self.created = True
        self._admin(
            f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)',
            f'DROP ROLE IF EXISTS "{self.name}"',
            f'CREATE ROLE "{self.name}" LOGIN',
            f'CREATE DATABASE "{self.name}" OWNER "{self.name}" '
            f"CONNECTION LIMIT {int(self.connection_limit)}",
        )
        return self

    def drop(self) -> None:
        if self.created:
            self._admin(
                f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)',
                f'DROP ROLE IF EXISTS "{self.name}"',
            )
            self.created = False

    def server_version(self) -> str:
        with psycopg.connect(self.admin_url) as connection:
            row = connection.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def max_connections(self) -> int:
        with psycopg.connect(self.admin_url) as connection:
            row = connection.execute("SHOW max_connections").fetchone()
        return int(row[0]) if row else 0


def server_env(
    database: Database, prefix: str, overrides: dict[str, str] | None = None
) -> dict[str, str]:
    """The server's environment: the machine's Redis under a prefix of this run, rate limits
    off (all load comes from one address), quiet logs, no bot and no worker."""
    env = server_env_base()
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "chatserver.settings",
            "DATABASE_URL": database.url,
            "REDIS_URL": REDIS_URL,
            "CHANNEL_PREFIX": prefix,
            "CHAT_RATE_LIMITS_ENABLED": "false",
            "LOG_LEVEL": "WARNING",
            "CHATBOT_URL": "",
        }
    )
    env.update(overrides or {})
    return env


def server_env_base() -> dict[str, str]:
    """The environment of any server process the benchmark starts."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            # The benchmark's own modules (bench.server_settings, bench.provision, the reference
            # servers) for a server running from an exported commit; its own packages come first.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    return env


def source_tree(rev: str | None, workdir: Path) -> Path:
    """Where the server runs from: this checkout, or a clean export of commit ``rev`` (so that
    a measurement is of one commit, whatever is being edited in the checkout meanwhile)."""
    if rev is None:
        return ROOT
    tree = workdir / "src"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True, timeout=120)
    return tree


def manage(env: dict[str, str], tree: Path, *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=tree, env=env, check=True, timeout=300)


def provision(env: dict[str, str], tree: Path, keys: Secrets, devices: int) -> dict[str, Any]:
    """Schema, the region (with the operator's command) and one chat per device, each with a
    Zammad ticket, so that webhooks for ticket ``i + 1`` reach device ``bench-i``. Returns the
    settings the server will run with."""
    manage(env, tree, "migrate", "--noinput", "-v", "0")
    manage(
        env,
        tree,
        "create_region",
        f"--slug={REGION_SLUG}",
        "--name=Benchmark",
        f"--default-language={LANGUAGE}",
        f"--zammad-url={ZAMMAD_URL}",
        f"--zammad-token={keys.zammad_token}",
        f"--webhook-token={keys.webhook_token}",
        f"--signature-secret={keys.signature_secret}",
    )
    output = subprocess.run(
        [sys.executable, "-m", "bench.provision", str(devices)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    settings: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return settings


class Server:
    """One server process: the chat server's daphne, started as deployments start it
    (``manage.py serve``), or a reference server's command."""

    def __init__(
        self,
        env: dict[str, str],
        tree: Path,
        port: int,
        log_path: Path,
        argv: list[str] | None = None,
    ) -> None:
        self.env = env
        self.tree = tree
        self.port = port
        self.log_path = log_path
        # Another command (the reference servers): it must answer GET /healthz with 200.
        self.argv = argv or [
            sys.executable,
            "manage.py",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.tree,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=system.raise_open_files_limit,  # no threads yet
            )
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_SECS
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /healthz; see {self.log_path}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {self.process.returncode}:\n{self.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as answer:  # noqa: S310
                return bool(answer.status == 200)
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(SERVER_STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def new_prefix() -> str:
    return f"chatbench{secrets.token_hex(4)}"


def redis_server_version() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def delete_layer_keys(prefix: str) -> int:
    """Remove what this run's channel layer left in the shared Redis (groups expire only after
    a day). Only keys under this run's own prefix are touched."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()

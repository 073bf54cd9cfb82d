"""Fixtures: the fakes as real HTTP servers, regions pointing at them, a worker, and real
daphne processes for the end-to-end tier. PostgreSQL and Redis are the real, local ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chatserver import chatbot as chatbot_client
from chatserver import limits, poll_cache, reads, worker
from chatserver import zammad as zammad_client
from chatserver.fakes.base import free_port
from chatserver.fakes.chatbot import FakeChatbot, FakeChatbotServer
from chatserver.fakes.zammad import FakeZammad, FakeZammadServer
from chatserver.layer import ChatChannelLayer
from chatserver.models import Region

from .helpers import Capture, wait_for_sync

pytest_plugins = ["tests.abuse_report"]  # prints the fault and abuse suite's figures
ROOT = Path(__file__).resolve().parent.parent
ZAMMAD_TOKEN = "zammad-test-token"
WEBHOOK_TOKEN = "webhook-test-token"
SIGNATURE_SECRET = "signature-test-secret"


@pytest.fixture(scope="session")
def zammad_server() -> Iterator[FakeZammadServer]:
    server = FakeZammad.start_threaded(token=ZAMMAD_TOKEN, retry_time_factor=0.01)
    yield server
    server.stop()


@pytest.fixture
def zammad(zammad_server: FakeZammadServer) -> Iterator[FakeZammadServer]:
    zammad_server.reset()
    yield zammad_server
    zammad_server.reset()


@pytest.fixture(scope="session")
def bot_server() -> Iterator[FakeChatbotServer]:
    server = FakeChatbot.start_threaded()
    yield server
    server.stop()


@pytest.fixture
def bot(bot_server: FakeChatbotServer, settings: Any) -> Iterator[FakeChatbotServer]:
    """The fake bot, and the server configured to use it."""
    bot_server.reset()
    settings.CHATBOT_URL = bot_server.url
    yield bot_server
    bot_server.reset()


@pytest.fixture(autouse=True)
async def _close_client_sessions() -> AsyncIterator[None]:
    """Each test runs on its own event loop; the clients' per-loop sessions close with it."""
    yield
    await zammad_client.close_sessions()
    await chatbot_client.close_sessions()
    await limits.close_clients()
    await poll_cache.close()
    await reads.close_pools()
    layer = get_channel_layer()
    if isinstance(layer, ChatChannelLayer):
        await layer.stop()


@pytest.fixture(autouse=True)
def _no_bot_or_limits_by_default(settings: Any) -> None:
    """Tests that need the bot or the rate limits switch them on (``bot``, ``rate_limits``)."""
    settings.CHATBOT_URL = ""
    settings.CHAT_RATE_LIMITS_ENABLED = False


@pytest.fixture
def rate_limits(settings: Any) -> Any:
    settings.CHAT_RATE_LIMITS_ENABLED = True
    return settings


def make_region(zammad_url: str, **fields: Any) -> Region:
    defaults: dict[str, Any] = {
        "slug": "augsburg",
        "name": "Augsburg",
        "default_language": "de",
        "zammad_url": zammad_url,
        "zammad_token": ZAMMAD_TOKEN,
        "webhook_token": WEBHOOK_TOKEN,
        "signature_secret": SIGNATURE_SECRET,
        "beta_percentage": 100,
    }
    defaults.update(fields)
    return Region.objects.create(**defaults)


async def amake_region(zammad_url: str, **fields: Any) -> Region:
    return await sync_to_async(make_region)(zammad_url, **fields)


@pytest.fixture
def region(db: Any, zammad: FakeZammadServer) -> Region:
    return make_region(zammad.url)


@pytest.fixture
def live_region(transactional_db: Any, zammad: FakeZammadServer) -> Region:
    """A region committed to the database, visible to daphne processes and workers."""
    return make_region(zammad.url)


async def drain(limit: int = 500) -> int:
    """Run due background work in this process until none is left; returns how many ran."""
    ran = 0
    while ran < limit and await worker.run_one():
        ran += 1
    return ran


# --- real daphne processes ---------------------------------------------------------------------


class Daphne:
    def __init__(self, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Daphne:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=None,
        )
        wait_for_sync(self._ready, timeout=30, what=f"daphne on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daphne exited with {self.process.returncode}")
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as answer:  # noqa: S310
                return bool(answer.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def server_env(**overrides: str) -> dict[str, str]:
    """The environment of a server process sharing this test session's database and Redis."""
    database = settings.DATABASES["default"]
    env = dict(os.environ)
    if "postgresql" in database["ENGINE"]:
        env["DATABASE_URL"] = (
            f"postgres://{database['USER']}@{database['HOST'] or '127.0.0.1'}:"
            f"{database['PORT'] or 5432}/{database['NAME']}"
        )
    else:
        env["SQLITE_PATH"] = str(database["NAME"])  # the test database, a file (settings)
    env.update(
        {
            "LOG_LEVEL": "WARNING",
            "CHAT_RATE_LIMITS_ENABLED": "false",
            "DJANGO_SETTINGS_MODULE": "chatserver.settings",
        }
    )
    env.update(overrides)
    return env


def skip_without_shared_services() -> None:
    """A daphne process shares the test's database and Redis only with PostgreSQL and Redis."""
    if not settings.REDIS_URL or "postgresql" not in settings.DATABASES["default"]["ENGINE"]:
        pytest.skip("needs REDIS_URL and DATABASE_URL (PostgreSQL) shared with daphne")


@pytest.fixture(scope="session")
def daphne_pair(django_db_setup: Any) -> Iterator[tuple[Daphne, Daphne]]:
    """Two real daphne processes on the real Redis and the test database."""
    skip_without_shared_services()
    env = server_env(CHATBOT_URL="")
    first = Daphne(free_port(), env).start()
    second = Daphne(free_port(), env).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class PrivateRedis:
    """A redis-server of the test's own on a free port, to stop and restart at will (the
    machine's shared Redis is never touched)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_sync(self._ready, timeout=10, what="private redis")
        return self

    def _ready(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path).start()
    yield redis
    redis.stop()


@pytest.fixture
def capture(zammad: FakeZammadServer) -> Iterator[Capture]:
    """The fake Zammad's webhook, captured instead of delivered (tests replay it)."""
    capture = Capture()
    capture.server.start()
    zammad.set_webhook(
        url=f"{capture.server.url}/hook",
        signature_secret=SIGNATURE_SECRET,
        trigger_on_customer=False,
    )
    yield capture
    zammad.set_webhook(url=None)
    capture.server.stop()

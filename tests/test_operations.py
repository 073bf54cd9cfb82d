"""The operating interface (operations.md): /healthz, /readyz, /metrics, check_region, the log
context, and sockets closing with 1001 when daphne is told to stop."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import AsyncClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from chatserver import health
from chatserver.asgi import application
from chatserver.fakes.base import free_port
from chatserver.fakes.chatbot import FakeChatbotServer
from chatserver.fakes.zammad import FakeZammadServer
from chatserver.logging import ContextFilter, JsonFormatter, log_context
from chatserver.models import Region

from .conftest import (
    ROOT,
    SIGNATURE_SECRET,
    WEBHOOK_TOKEN,
    ZAMMAD_TOKEN,
    Daphne,
    PrivateRedis,
    amake_region,
    server_env,
    skip_without_shared_services,
)
from .helpers import wait_for

DEVICE = "operations-device-0001"
CHAT = f"/api/v3/augsburg/de/chat/{DEVICE}/"
HOOK = f"/api/v3/webhook/zammad/?token={WEBHOOK_TOKEN}"
WRONG_TOKEN = "not-the-zammad-token"

SERIES = {
    "chat_sockets_open",
    "chat_messages_total",
    "chat_webhooks_total",
    "chat_pending_work",
    "chat_pending_work_oldest_seconds",
    "chat_push_latency_seconds_bucket",
    "chat_push_latency_seconds_count",
    "chat_upstream_seconds_bucket",
    "chat_upstream_errors_total",
}


@pytest.fixture(autouse=True)
def _fresh_health_cache() -> Iterator[None]:
    health.clear_cache()
    yield
    health.clear_cache()


async def get_json(path: str) -> tuple[int, dict[str, Any]]:
    response = await AsyncClient().get(path)
    return response.status_code, json.loads(response.content)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape() -> Samples:
    response = await AsyncClient().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- /healthz and /readyz ---------------------------------------------------------------------


async def test_healthz_and_request_id() -> None:
    response = await AsyncClient().get("/healthz")
    assert response.status_code == 200
    request_id = response["X-Request-Id"]
    assert len(request_id) == 12 and int(request_id, 16) >= 0
    again = await AsyncClient().get("/healthz")
    assert again["X-Request-Id"] != request_id


@pytest.mark.django_db(transaction=True)
async def test_readyz_all_ok(live_region: Region, bot: FakeChatbotServer) -> None:
    status, body = await get_json("/readyz")
    assert status == 200
    redis = {"ok": True} if settings.REDIS_URL else {"ok": True, "in_process": True}
    assert body == {
        "ready": True,
        "checks": {
            "database": {"ok": True},
            "redis": redis,
            "regions": {"augsburg": {"zammad": {"ok": True}, "bot": {"ok": True}}},
        },
    }


@pytest.mark.django_db(transaction=True)
async def test_readyz_without_bot_or_regions() -> None:
    status, body = await get_json("/readyz")
    assert status == 200
    assert body["ready"] is True
    assert body["checks"]["regions"] == {}


@pytest.mark.django_db(transaction=True)
async def test_readyz_reports_a_wrong_token_but_stays_ready(
    live_region: Region, zammad: FakeZammadServer
) -> None:
    await amake_region(
        zammad.url, slug="wrong", zammad_token=WRONG_TOKEN, webhook_token="another-webhook-token"
    )
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200
    assert WRONG_TOKEN not in response.content.decode()
    regions = json.loads(response.content)["checks"]["regions"]
    assert regions["augsburg"]["zammad"] == {"ok": True}
    wrong = regions["wrong"]["zammad"]
    assert wrong["ok"] is False
    assert "token" in wrong["detail"] and "401" in wrong["detail"]
    assert regions["wrong"]["bot"] == {"ok": True, "configured": False}


@pytest.mark.django_db(transaction=True)
async def test_readyz_says_why_zammad_cannot_be_reached(
    live_region: Region, zammad: FakeZammadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed_port = free_port()
    await amake_region(
        f"http://127.0.0.1:{closed_port}", slug="nowhere", webhook_token="nowhere-webhook-token"
    )
    monkeypatch.setattr(health, "ZAMMAD_TIMEOUT_SECS", 0.3)
    zammad.fail_next(1, status=None, stall_secs=30, path_prefix="/api/v1/users/me")
    status, body = await get_json("/readyz")
    assert status == 200
    regions = body["checks"]["regions"]
    assert regions["augsburg"]["zammad"] == {
        "ok": False,
        "detail": "Zammad did not answer within 0.3 s",
    }
    assert regions["nowhere"]["zammad"]["ok"] is False
    assert regions["nowhere"]["zammad"]["detail"].startswith(
        f"connection refused by 127.0.0.1:{closed_port}"
    )


@pytest.mark.django_db(transaction=True)
async def test_readyz_region_checks_are_cached(
    live_region: Region, zammad: FakeZammadServer
) -> None:
    for _ in range(3):
        status, _body = await get_json("/readyz")
        assert status == 200
    assert len(zammad.received("/api/v1/users/me")) == 1
    health.clear_cache()
    await get_json("/readyz")
    assert len(zammad.received("/api/v1/users/me")) == 2


@pytest.mark.e2e
def test_readyz_is_503_when_redis_is_gone(transactional_db: Any, tmp_path: Any) -> None:
    if "postgresql" not in settings.DATABASES["default"]["ENGINE"]:
        pytest.skip("a daphne process shares the test database only on PostgreSQL")
    redis = PrivateRedis(tmp_path).start()
    server = Daphne(free_port(), server_env(REDIS_URL=redis.url, CHATBOT_URL="")).start()
    try:
        status, body = http_json(f"{server.url}/readyz")
        assert status == 200
        assert body["checks"]["redis"] == {"ok": True}
        redis.stop()
        status, body = http_json(f"{server.url}/readyz")
        assert status == 503
        assert body["ready"] is False
        assert body["checks"]["database"] == {"ok": True}
        assert body["checks"]["redis"] == {
            "ok": False,
            "detail": f"connection refused by 127.0.0.1:{redis.port}: is Redis running there?",
        }
    finally:
        server.stop()
        redis.stop()


@pytest.mark.e2e
def test_readyz_is_503_when_the_database_is_gone() -> None:
    closed_port = free_port()
    env = server_env(
        DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed_port}/chat",
        REDIS_URL="",
        CHATBOT_URL="",
    )
    server = Daphne(free_port(), env).start()  # /healthz does not touch the database
    try:
        status, body = http_json(f"{server.url}/readyz")
    finally:
        server.stop()
    assert status == 503
    checks = body["checks"]
    assert body["ready"] is False
    assert checks["database"]["ok"] is False
    assert checks["database"]["detail"].startswith("cannot use the database: ")
    assert f"port {closed_port} failed: Connection refused" in checks["database"]["detail"]
    assert checks["redis"] == {"ok": True, "in_process": True}
    assert checks["regions"] == {}


def http_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --- /metrics ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_metrics_exposes_the_named_series() -> None:
    samples = await scrape()
    names = {name for name, _labels in samples}
    assert names >= SERIES, SERIES - names
    # Labelled series are there before their first use.
    for direction, route in (("in", "rest"), ("in", "socket"), ("out", "webhook"), ("out", "bot")):
        assert ("chat_messages_total", frozenset({("direction", direction), ("route", route)})) in (
            samples
        )
    for service in ("zammad", "bot"):
        assert value(samples, "chat_upstream_seconds_count", service=service) >= 0
        assert (
            "chat_upstream_errors_total",
            frozenset({("service", service), ("kind", "connection")}),
        ) in samples
    assert ("chat_webhooks_total", frozenset({("outcome", "message")})) in samples


@pytest.mark.django_db(transaction=True)
async def test_message_counter_and_pending_work_move(live_region: Region) -> None:
    before = await scrape()
    response = await AsyncClient().post(CHAT, {"message": "Hello"})
    assert response.status_code == 200
    health.clear_cache()  # the queue gauges are read at most every few seconds
    after = await scrape()
    rest = {"direction": "in", "route": "rest"}
    assert value(after, "chat_messages_total", **rest) == (
        value(before, "chat_messages_total", **rest) + 1
    )
    # Forwarding the message to Zammad is queued work; nothing runs it in this test.
    assert value(after, "chat_pending_work") >= 1
    assert value(after, "chat_pending_work_oldest_seconds") >= 0


@pytest.mark.django_db(transaction=True)
async def test_webhook_outcomes_are_counted(live_region: Region) -> None:
    before = await scrape()
    body = json.dumps({"ticket": {"id": 987654}}).encode()
    signature = "sha1=" + hmac.new(SIGNATURE_SECRET.encode(), body, hashlib.sha1).hexdigest()
    client = AsyncClient()
    accepted = await client.post(
        HOOK, body, content_type="application/json", headers={"X-Hub-Signature": signature}
    )
    assert accepted.status_code == 200
    assert json.loads(accepted.content)["outcome"] == "unknown_ticket"
    refused = await client.post(
        "/api/v3/webhook/zammad/?token=wrong", body, content_type="application/json"
    )
    assert refused.status_code == 404
    after = await scrape()
    for outcome in ("unknown_ticket", "rejected_not_found"):
        assert value(after, "chat_webhooks_total", outcome=outcome) == (
            value(before, "chat_webhooks_total", outcome=outcome) + 1
        )


@pytest.mark.django_db(transaction=True)
async def test_sockets_open_goes_up_and_down(live_region: Region) -> None:
    baseline = value(await scrape(), "chat_sockets_open")
    communicator = WebsocketCommunicator(application, f"/ws/v3/augsburg/de/chat/{DEVICE}/")
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    try:
        history = json.loads(await communicator.receive_from(5))
        assert history["type"] == "chat.history"
        assert value(await scrape(), "chat_sockets_open") == baseline + 1
    finally:
        await communicator.disconnect()

    async def closed() -> bool:
        return value(await scrape(), "chat_sockets_open") == baseline

    await wait_for(closed, timeout=5, what="chat_sockets_open back down")


# --- check_region -----------------------------------------------------------------------------


def check_region(*args: str) -> tuple[int, str, str]:
    """In this process (any database): exit status, stdout, stderr as the command line has them."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        call_command("check_region", *args, stdout=stdout, stderr=stderr)
    except CommandError as error:
        return error.returncode, stdout.getvalue(), str(error)
    return 0, stdout.getvalue(), stderr.getvalue()


def run_check_region(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check_region", *args],
        cwd=ROOT,
        env=server_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_region_all_well(region: Region, bot: FakeChatbotServer) -> None:
    status, out, _err = check_region("augsburg")
    assert status == 0, out
    lines = out.splitlines()
    assert lines[1].startswith(f"ok    Zammad at {region.zammad_url} accepted the token")
    assert lines[3] == f"ok    Bot at {bot.url} is healthy"
    assert lines[-1] == "Region augsburg: all 2 checks passed."
    assert ZAMMAD_TOKEN not in out


def test_check_region_wrong_token(zammad: FakeZammadServer, db: Any) -> None:
    Region.objects.create(
        slug="wrong", name="Wrong", zammad_url=zammad.url, zammad_token=WRONG_TOKEN
    )
    status, out, err = check_region("wrong")
    assert status == 1
    assert (
        f"FAIL  Zammad at {zammad.url}: Zammad refused the token (HTTP 401): check the region's "
        "Zammad token"
    ) in out.splitlines()
    assert "note  Bot: not configured (CHATBOT_URL is unset): no automatic answers" in out
    assert err == "Region wrong: 1 of 1 checks failed."
    assert WRONG_TOKEN not in out + err


def test_check_region_bot_down(region: Region, settings: Any) -> None:
    settings.CHATBOT_URL = f"http://127.0.0.1:{free_port()}"
    status, out, err = check_region("augsburg", "--timeout", "2")
    assert status == 1
    assert f"FAIL  Bot at {settings.CHATBOT_URL}: connection refused by 127.0.0.1:" in out
    assert err == "Region augsburg: 1 of 2 checks failed."


def test_check_region_unknown_slug(region: Region) -> None:
    status, _out, err = check_region("atlantis")
    assert status == 1
    assert err.startswith("There is no region 'atlantis'. Known regions: augsburg.")


@pytest.mark.django_db(transaction=True)
def test_check_region_exit_status(live_region: Region, zammad: FakeZammadServer) -> None:
    """The real command line: what a deployment script sees."""
    if "postgresql" not in settings.DATABASES["default"]["ENGINE"]:
        pytest.skip("a separate process shares the test database only on PostgreSQL")
    Region.objects.create(
        slug="wrong",
        name="Wrong",
        zammad_url=zammad.url,
        zammad_token=WRONG_TOKEN,
        webhook_token="wrong-webhook-token",
    )
    assert run_check_region("augsburg", CHATBOT_URL="").returncode == 0
    wrong = run_check_region("wrong", CHATBOT_URL="")
    assert wrong.returncode == 1
    assert "Region wrong: 1 of 1 checks failed." in wrong.stderr
    unknown = run_check_region("atlantis")
    assert unknown.returncode == 1
    assert "There is no region 'atlantis'" in unknown.stderr


def test_check_region_help() -> None:
    result = run_check_region("--help")
    assert result.returncode == 0
    assert "exit status 0 when all is well" in " ".join(result.stdout.split())


# --- log context --------------------------------------------------------------------------------


class Capture(logging.Handler):
    """A handler like the console one: the context filter, then a formatter."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.stream = io.StringIO()
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.stream.write(self.format(record) + "\n")


@pytest.fixture
def captured() -> Iterator[Capture]:
    config: dict[str, Any] = settings.LOGGING
    plain = config["formatters"]["plain"]["format"]
    handler = Capture(logging.Formatter(plain))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.mark.django_db(transaction=True)
async def test_log_lines_carry_request_and_delivery_ids(
    live_region: Region, captured: Capture
) -> None:
    response = await AsyncClient().post(CHAT, {"message": "Hello"})
    request_id = response["X-Request-Id"]
    lines = [
        record for record in captured.records if getattr(record, "request_id", None) == request_id
    ]
    # The request line, and the action's line written in a database thread.
    assert {record.name for record in lines} >= {"chatserver.requests", "chatserver.actions"}
    assert f"[request_id={request_id}]" in captured.stream.getvalue()
    assert DEVICE not in captured.stream.getvalue()  # shortened to 8 characters

    body = json.dumps({"ticket": {"id": 4242}}).encode()
    signature = "sha1=" + hmac.new(SIGNATURE_SECRET.encode(), body, hashlib.sha1).hexdigest()
    hook = await AsyncClient().post(
        HOOK,
        body,
        content_type="application/json",
        headers={"X-Hub-Signature": signature, "X-Zammad-Delivery": "delivery-77"},
    )
    request_line = next(
        record
        for record in captured.records
        if record.name == "chatserver.requests"
        and getattr(record, "request_id", None) == hook["X-Request-Id"]
    )
    assert getattr(request_line, "delivery_id", None) == "delivery-77"
    assert WEBHOOK_TOKEN not in captured.stream.getvalue()


def test_log_context_nests_and_json_format() -> None:
    handler = Capture(JsonFormatter())
    logger = logging.getLogger("tests.operations.context")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(request_id="abc123"), log_context(chat_id=42, delivery_id=None):
            logger.info("inside %s", "both")
        with log_context(request_id="abc123"):
            pass
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in handler.stream.getvalue().splitlines())
    assert inside["message"] == "inside both"
    assert inside["request_id"] == "abc123" and inside["chat_id"] == "42"
    assert "delivery_id" not in inside
    assert set(outside) == {"time", "level", "logger", "message"}


# --- graceful shutdown ------------------------------------------------------------------------


@pytest.fixture
async def daphne(live_region: Region) -> AsyncIterator[Daphne]:
    skip_without_shared_services()
    server = Daphne(free_port(), server_env(CHATBOT_URL=""))
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.kill)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
async def test_sigterm_closes_sockets_with_1001(daphne: Daphne) -> None:
    url = f"{daphne.ws_url}/ws/v3/augsburg/de/chat/{DEVICE}/"
    async with websockets.connect(url) as first, websockets.connect(url) as second:
        for socket in (first, second):
            history = json.loads(await asyncio.wait_for(socket.recv(), 5))
            assert history["type"] == "chat.history"
        process = daphne.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        for socket in (first, second):
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), 10)
            assert socket.close_code == 1001
            assert socket.close_reason == "server restarting"
    assert await asyncio.to_thread(process.wait, 10) == 0


def test_djangos_request_log_shortens_device_ids(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.utils.log import log_response  # what Django calls for every 4xx and 5xx

    device = "0123456789abcdef-full-device-id"
    request = RequestFactory().get(f"/api/v3/augsburg/de/chat/{device}/?token=secret")
    logger = logging.getLogger("django.request")
    with caplog.at_level(logging.ERROR, logger="django.request"):
        for record_filter in logging.getLogger("django.request").filters:
            caplog.handler.addFilter(record_filter)
        log_response(
            "Service Unavailable: %s",
            request.path,
            response=HttpResponse(status=503),
            request=request,
            logger=logger,
        )
    text = caplog.text
    assert "Service Unavailable" in text
    assert device not in text
    assert "secret" not in text

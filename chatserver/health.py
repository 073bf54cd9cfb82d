"""Readiness and metrics endpoints (operations.md, "Health and metrics"), and the checks behind
them, which ``manage.py check_region`` shares.

``/readyz`` answers 503 only when this process cannot serve: the database or Redis is away. A
region whose Zammad refuses the token, or a bot that is down, is reported in plain words but keeps
the process ready; taking every web process out of rotation would not bring Zammad back. The
region checks call out over the network, so their result is cached for a few seconds and an
orchestrator or a dashboard can poll ``/readyz`` as often as it likes.

Every ``detail`` is written for whoever is on call: what failed and what to look at. Details are
built from host names, ports, HTTP statuses and timeouts, never from URLs that may carry
credentials, and never from tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import metrics, worker
from .chatbot import ChatbotClient
from .errors import UpstreamError
from .models import Region
from .zammad import ZammadClient

DATABASE_TIMEOUT_SECS = 3.0
REDIS_TIMEOUT_SECS = 1.0
ZAMMAD_TIMEOUT_SECS = 3.0
BOT_TIMEOUT_SECS = 3.0
REGION_CACHE_SECS = 5.0
PENDING_WORK_CACHE_SECS = 2.0
DETAIL_MAX_CHARS = 300

Check = dict[str, Any]


def passed(**extra: Any) -> Check:
    return {"ok": True, **extra}


def failed(detail: str) -> Check:
    return {"ok": False, "detail": detail[:DETAIL_MAX_CHARS]}


# --- the process: database and Redis ------------------------------------------------------------


def _select_one() -> None:
    """Over a connection of its own: the pool waits and retries, which would hide the cause."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return
    import psycopg

    params = connection.get_connection_params()
    keys = ("dbname", "user", "password", "host", "port")
    try:
        with psycopg.connect(
            **{key: params[key] for key in keys if key in params},
            connect_timeout=max(1, int(DATABASE_TIMEOUT_SECS) - 1),
        ) as direct:
            direct.execute("SELECT 1").fetchone()
    except psycopg.Error as error:
        raise DatabaseError(str(error)) from error


async def check_database() -> Check:
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECS):
            await database_sync_to_async(_select_one)()
    except TimeoutError:
        return failed(f"the database did not answer within {DATABASE_TIMEOUT_SECS:g} s")
    except DatabaseError as error:
        # psycopg's and sqlite's messages name host and port or the file, never a password.
        return failed(f"cannot use the database: {_first_line(error)}")
    return passed()


async def check_redis() -> Check:
    """PING over a connection of its own: the channel layer's pool retries and waits, which would
    hide an outage for longer than a readiness probe may take."""
    url: str = settings.REDIS_URL
    if not url:
        return passed(in_process=True)
    where = host_port(url, default_port=6379)
    client = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_TIMEOUT_SECS,
        socket_timeout=REDIS_TIMEOUT_SECS,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_SECS * 2):
            await client.ping()
    except (TimeoutError, RedisTimeoutError):
        return failed(f"Redis at {where} did not answer within {REDIS_TIMEOUT_SECS:g} s")
    except AuthenticationError:
        return failed(f"Redis at {where} refused the credentials: check REDIS_URL")
    except RedisConnectionError as error:
        return failed(_connection_words(error, where, "Redis"))
    except RedisError as error:
        return failed(f"Redis at {where} refused the check: {_first_line(error)}")
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
    return passed()


# --- regions: Zammad and the bot ----------------------------------------------------------------


@dataclass(frozen=True)
class RegionTarget:
    slug: str
    zammad_url: str
    zammad_token: str
    ticket_group: str

    def __repr__(self) -> str:
        return f"RegionTarget({self.slug!r}, {self.zammad_url!r})"  # no token in logs


def configured_regions() -> list[RegionTarget]:
    return [
        RegionTarget(region.slug, region.zammad_url, region.zammad_token, region.ticket_group)
        for region in Region.objects.order_by("slug")
        if region.is_configured
    ]


async def check_zammad(
    url: str, token: str, *, timeout_secs: float = ZAMMAD_TIMEOUT_SECS
) -> tuple[Check, dict[str, Any] | None]:
    """``users/me`` with the region's token; also returns the user when it worked."""
    try:
        user = await ZammadClient(url, token, timeout_secs=timeout_secs).me()
    except UpstreamError as error:
        return failed(zammad_problem(error, url, timeout_secs)), None
    return passed(), user


def zammad_problem(error: UpstreamError, url: str, timeout_secs: float) -> str:
    status = error.status
    if status == 401:
        return "Zammad refused the token (HTTP 401): check the region's Zammad token"
    if status == 403:
        return (
            "Zammad refused the token's user (HTTP 403): check that the token is active and "
            "its user may use the API"
        )
    if status == 404:
        return (
            "Zammad has no API at this address (HTTP 404 for /api/v1/users/me): check the "
            "region's Zammad URL (without /api/v1)"
        )
    if status is not None and 300 <= status < 400:
        return (
            f"Zammad redirected the call (HTTP {status}): check the region's Zammad URL "
            "(https, the right host, no login page in front)"
        )
    if status in {408, 429}:
        return f"Zammad asked to come back later (HTTP {status}): it is busy or rate limiting"
    if status is not None and status >= 500:
        return (
            f"Zammad failed (HTTP {status}): Zammad or a proxy in front of it is in trouble, "
            "try again shortly"
        )
    if status is not None:
        return f"Zammad refused the call (HTTP {status}): {error.detail}"
    return _transport_words(error, host_port(url, default_port=None), "Zammad", timeout_secs) or (
        f"Zammad's answer is not what its API gives ({error.detail}): check that the region's "
        "Zammad URL points at Zammad"
    )


async def check_bot(url: str, *, timeout_secs: float = BOT_TIMEOUT_SECS) -> Check:
    if not url:
        return passed(configured=False)
    try:
        report = await ChatbotClient(url).health(timeout_secs=timeout_secs)
    except UpstreamError as error:
        where = host_port(url, default_port=None)
        words = _transport_words(error, where, "the bot", timeout_secs)
        if words is None:
            status = f" (HTTP {error.status})" if error.status is not None else ""
            words = f"the bot at {where} gave no usable health report: {error.detail}{status}"
        return failed(words)
    reported = report.get("status")
    if reported != "healthy":
        troubled = [
            name
            for name, part in report.items()
            if isinstance(part, dict) and part.get("status") not in {None, "healthy"}
        ]
        parts = f" ({', '.join(troubled)} unhealthy)" if troubled else ""
        return failed(f"the bot reports itself {reported}{parts}: automatic answers may fail")
    return passed()


async def check_regions() -> dict[str, dict[str, Check]]:
    """Every configured region's Zammad, and the bot once for all of them, concurrently."""
    targets = await database_sync_to_async(configured_regions)()
    bot_url: str = settings.CHATBOT_URL
    key = _fingerprint(targets, bot_url)
    cached = _region_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < REGION_CACHE_SECS:
        return cached[1]
    results = await asyncio.gather(
        check_bot(bot_url, timeout_secs=BOT_TIMEOUT_SECS),
        *(
            check_zammad(target.zammad_url, target.zammad_token, timeout_secs=ZAMMAD_TIMEOUT_SECS)
            for target in targets
        ),
    )
    bot, zammads = results[0], results[1:]
    regions = {
        target.slug: {"zammad": zammad, "bot": bot}
        for target, (zammad, _user) in zip(targets, zammads, strict=True)
    }
    _region_cache.clear()
    _region_cache[key] = (time.monotonic(), regions)
    return regions


# One entry: the result for the current configuration. A changed token, URL or region set misses
# the cache at once; only an unchanged configuration waits out REGION_CACHE_SECS.
_region_cache: dict[Hashable, tuple[float, dict[str, dict[str, Check]]]] = {}


def clear_cache() -> None:
    _region_cache.clear()
    _pending_work_refreshed.clear()


def _fingerprint(targets: list[RegionTarget], bot_url: str) -> Hashable:
    return (
        bot_url,
        tuple(
            (
                target.slug,
                target.zammad_url,
                hashlib.sha256(target.zammad_token.encode()).hexdigest(),
                target.ticket_group,
            )
            for target in targets
        ),
    )


# --- words for connection trouble -----------------------------------------------------------


def _transport_words(
    error: BaseException, where: str, service: str, timeout_secs: float
) -> str | None:
    """Plain words for a failure below HTTP, found in the error's cause chain."""
    for cause in _causes(error):
        if isinstance(cause, aiohttp.InvalidURL):
            return f"the address of {service} is not a valid URL: check its configuration"
        if isinstance(cause, aiohttp.ClientConnectorDNSError):
            return f"cannot resolve the host name of {service} ({where}): check the URL and DNS"
        if isinstance(cause, aiohttp.ClientSSLError):
            return f"TLS with {service} at {where} failed: {_first_line(cause)}"
        if isinstance(cause, aiohttp.ClientConnectorError):
            return _connection_words(cause.os_error, where, service)
        if isinstance(cause, TimeoutError):
            return f"{service} did not answer within {timeout_secs:g} s"
        if isinstance(cause, aiohttp.ClientError):
            return f"the connection to {service} at {where} broke off ({type(cause).__name__})"
    if isinstance(error, UpstreamError) and error.status is None and "within" in error.detail:
        # The bot client reports its own deadline without a cause.
        return f"{service} did not answer within {timeout_secs:g} s"
    return None


def _connection_words(error: BaseException, where: str, service: str) -> str:
    if _is_refused(error):
        return f"connection refused by {where}: is {service} running there?"
    return f"cannot connect to {service} at {where}: {_first_line(error)}"


def _is_refused(error: BaseException) -> bool:
    # redis-py raises its ConnectionError inside ``except OSError`` without ``from``: the refused
    # connection is only the implicit context there.
    return any(
        isinstance(cause, ConnectionRefusedError)
        or getattr(cause, "errno", None) == errno.ECONNREFUSED
        for cause in _causes(error, implicit=True)
    )


def _causes(error: BaseException, *, implicit: bool = False) -> list[BaseException]:
    """The error and what it was raised from; with ``implicit``, also what was being handled
    when it was raised (not by default: an exception that merely happened earlier says little)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (current.__context__ if implicit else None)
    return chain


def host_port(url: str, *, default_port: int | None) -> str:
    """``host:port`` of a URL, without user, password, path or query."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "an invalid address"
    if port is None:
        port = default_port or {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


# --- endpoints ----------------------------------------------------------------------------------


async def readyz(request: HttpRequest) -> HttpResponse:
    database, redis = await asyncio.gather(check_database(), check_redis())
    regions = await check_regions() if database["ok"] else {}
    ready = bool(database["ok"] and redis["ok"])
    body = {
        "ready": ready,
        "checks": {"database": database, "redis": redis, "regions": regions},
    }
    response = JsonResponse(body, status=200 if ready else 503)
    response["Cache-Control"] = "no-store"
    return response


async def metrics_view(request: HttpRequest) -> HttpResponse:
    await refresh_pending_work()
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


_pending_work_refreshed: list[float] = []


async def refresh_pending_work() -> None:
    """The queue gauges, read from the database at most every few seconds. The worker sets them
    too; every process reports the same shared queue, so aggregate them with ``max``."""
    now = time.monotonic()
    if _pending_work_refreshed and now - _pending_work_refreshed[0] < PENDING_WORK_CACHE_SECS:
        return
    _pending_work_refreshed[:] = [now]
    # A database outage shows in /readyz; the scrape keeps the last values meanwhile.
    with contextlib.suppress(DatabaseError, TimeoutError):
        async with asyncio.timeout(DATABASE_TIMEOUT_SECS):
            depth, oldest_secs = await database_sync_to_async(worker.queue_depth)()
        metrics.PENDING_WORK.set(depth)
        metrics.PENDING_WORK_OLDEST.set(oldest_secs)


# --- labelled series show from the start ------------------------------------------------------

# Labelled series appear only after their first use; dashboards and alerts want zeros instead.
MESSAGE_ROUTES = (("in", "rest"), ("in", "socket"), ("out", "webhook"), ("out", "bot"))
WEBHOOK_OUTCOMES = (
    "message",
    "known",
    "duplicate",
    "ticket_changed",
    "unknown_ticket",
    "ignored_own",
    "ignored_internal",
    "ignored_other",
    "rejected_not_found",
    "rejected_unauthorized",
    "rejected_invalid_webhook",
    "rejected_too_large",
)
UPSTREAM_ERROR_KINDS = {
    "zammad": ("connection", "timeout", "http_4xx", "http_5xx", "redirect", "bad_response"),
    "bot": ("connection", "connect_timeout", "timeout", "http_5xx", "refused", "bad_response"),
}


def _initialise_series() -> None:
    for direction, route in MESSAGE_ROUTES:
        metrics.MESSAGES.labels(direction, route)
    for outcome in WEBHOOK_OUTCOMES:
        metrics.WEBHOOKS.labels(outcome)
    for service, kinds in UPSTREAM_ERROR_KINDS.items():
        metrics.UPSTREAM_SECONDS.labels(service)
        for kind in kinds:
            metrics.UPSTREAM_ERRORS.labels(service, kind)


_initialise_series()

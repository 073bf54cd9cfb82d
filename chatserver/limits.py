"""Rate limits (fixed windows, in Redis when configured so they hold across processes) and
connection limits per device and per client IP.

``CHAT_RATE_LIMITS_ENABLED=false`` switches every one of them off, for load tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from django.conf import settings
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from .errors import RateLimited

logger = logging.getLogger(__name__)

_clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
_local_windows: dict[str, tuple[int, int]] = {}


def _redis() -> aioredis.Redis | None:
    if not settings.REDIS_URL:
        return None
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2
        )
    return client


async def check_rate(key: str, limit: int, window_secs: int | None = None) -> None:
    """Count one hit on ``key``; raise ``RateLimited`` past ``limit`` hits in the window."""
    if not settings.CHAT_RATE_LIMITS_ENABLED:
        return
    window = window_secs or settings.RATE_LIMIT_WINDOW_SECS
    now = int(time.time())
    slot = now // window
    retry_after = (slot + 1) * window - now
    client = _redis()
    if client is None:
        count = _count_locally(f"{key}:{slot}", slot)
    else:
        try:
            redis_key = f"ratelimit:{key}:{slot}"
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(redis_key)
                pipe.expire(redis_key, window + 1)
                count = int((await pipe.execute())[0])
        except RedisError:
            # Limits protect the service; an unreachable Redis must not take the chat down.
            logger.warning("rate limit not checked: Redis unreachable")
            return
    if count > limit:
        raise RateLimited(retry_after)


def _count_locally(key: str, slot: int) -> int:
    stored_slot, count = _local_windows.get(key, (slot, 0))
    count = count + 1 if stored_slot == slot else 1
    _local_windows[key] = (slot, count)
    if len(_local_windows) > 100_000:
        _local_windows.clear()
    return count


class ConnectionLimits:
    """Open sockets of this process per device and per client IP."""

    def __init__(self) -> None:
        self.per_device: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()

    def acquire(self, device: str, ip: str) -> None:
        if settings.CHAT_RATE_LIMITS_ENABLED and (
            self.per_device[device] >= settings.WS_MAX_CONNECTIONS_PER_DEVICE
            or self.per_ip[ip] >= settings.WS_MAX_CONNECTIONS_PER_IP
        ):
            raise RateLimited(settings.RATE_LIMIT_WINDOW_SECS, "Too many connections.")
        self.per_device[device] += 1
        self.per_ip[ip] += 1

    def release(self, device: str, ip: str) -> None:
        self.per_device[device] -= 1
        self.per_ip[ip] -= 1
        if self.per_device[device] <= 0:
            del self.per_device[device]
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


connections = ConnectionLimits()


def client_ip(scope_client: tuple[str, int] | list[object] | None, headers: dict[str, str]) -> str:
    """The proxy's header only when a trusted proxy is configured to set it; the proxy appends
    the address it saw, so the last entry is the one that cannot be forged."""
    header = settings.TRUSTED_PROXY_HEADER.lower()
    lowered = {name.lower(): value for name, value in headers.items()}
    if header and lowered.get(header):
        return lowered[header].split(",")[-1].strip()
    if scope_client:
        return str(scope_client[0])
    return "unknown"

"""Rate limits (fixed windows, in Redis when configured so they hold across processes) and
connection limits per device and per client IP.

``CHAT_RATE_LIMITS_ENABLED=false`` switches every one of them off, for load tests.
"""

from __future__ import annotations

import asyncio
import logging
import time

from django.conf import settings
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from .errors import RateLimited

logger = logging.getLogger(__name__)

_clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
_local_windows: dict[str, tuple[int, int]] = {}


async def close_clients() -> None:
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


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
            redis_key = f"{settings.CHANNEL_PREFIX}:ratelimit:{key}:{slot}"
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


# Checks every key's count, then adds the connection to every key, atomically: two sockets that
# connect at once on two processes cannot both take the last place.
_ACQUIRE = """
local now, expiry, ttl, member = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[4 + i]) then return 0 end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, member)
  redis.call('EXPIRE', key, ttl)
end
return 1
"""
CONNECTION_TTL_SECS = 90


class ConnectionLimits:
    """Open sockets per device and per client IP, across all processes.

    Each socket is a member of two sorted sets in Redis (its device's and its IP's), scored with
    an expiry that this process refreshes while the socket lives, so the places of a process
    that died free themselves. Without Redis, the counts are this process's own.
    """

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, str]] = {}  # member -> (device key, ip)
        self._refresher: asyncio.Task[None] | None = None

    def _keys(self, device: str, ip: str) -> list[str]:
        prefix = settings.CHANNEL_PREFIX
        return [f"{prefix}:conn:device:{device}", f"{prefix}:conn:ip:{ip}"]

    async def acquire(self, device: str, ip: str, member: str) -> None:
        if not settings.CHAT_RATE_LIMITS_ENABLED:
            # Not counted at all: nothing to release or refresh in Redis for this socket.
            return
        limits = [settings.WS_MAX_CONNECTIONS_PER_DEVICE, settings.WS_MAX_CONNECTIONS_PER_IP]
        if not await self._take(device, ip, member, limits):
            raise RateLimited(settings.RATE_LIMIT_WINDOW_SECS, "Too many connections.")
        self.held[member] = (device, ip)
        self._ensure_refresher()

    async def _take(self, device: str, ip: str, member: str, limits: list[int]) -> bool:
        client = _redis()
        if client is None:
            held = list(self.held.values())
            return (
                sum(1 for held_device, _ in held if held_device == device) < limits[0]
                and sum(1 for _, held_ip in held if held_ip == ip) < limits[1]
            )
        now = time.time()
        try:
            taken = await client.eval(
                _ACQUIRE, 2, *self._keys(device, ip),
                now, now + CONNECTION_TTL_SECS, CONNECTION_TTL_SECS, member, *limits,
            )  # fmt: skip
        except RedisError:
            logger.warning("connection limit not checked: Redis unreachable")
            return True
        return bool(taken)

    async def release(self, member: str) -> None:
        held = self.held.pop(member, None)
        client = _redis()
        if held is None or client is None:
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key in self._keys(*held):
                    pipe.zrem(key, member)
                await pipe.execute()
        except RedisError:
            pass  # the member expires on its own

    def _ensure_refresher(self) -> None:
        loop = asyncio.get_running_loop()
        if self._refresher is None or self._refresher.done() or self._refresher.get_loop() != loop:
            self._refresher = loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        """Keep this process's sockets counted while they live (one pipeline for all)."""
        while self.held:
            await asyncio.sleep(CONNECTION_TTL_SECS / 3)
            client = _redis()
            if client is None:
                continue
            expiry = time.time() + CONNECTION_TTL_SECS
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for member, (device, ip) in list(self.held.items()):
                        for key in self._keys(device, ip):
                            pipe.zadd(key, {member: expiry})
                            pipe.expire(key, CONNECTION_TTL_SECS)
                    await pipe.execute()
            except RedisError:
                logger.warning("connection counts not refreshed: Redis unreachable")


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

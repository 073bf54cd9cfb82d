"""channels-redis, configured for load and made to survive Redis restarts.

As shipped, channels-redis with redis-py 8 fails in three ways under real load (pitfalls.md):
a pool of 100 connections that raises ``Too many connections`` instead of waiting, a socket
timeout equal to the blocking receive's timeout that kills idle consumers, and consumers that die
with the first Redis error, or never learn that a restarted Redis forgot their groups. This layer
waits for a pooled connection instead, sets the socket timeout above the blocking receive, and
after a Redis outage or restart sends one ``layer.reconnected`` event to every socket's consumer,
so that each re-joins its group and catches up from the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

RECONNECTED = {"type": "layer.reconnected"}
WATCH_INTERVAL_SECS = 1.0
MARKER_TTL_SECS = 300


class ChatChannelLayer(RedisChannelLayer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watched: set[str] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._healthy = asyncio.Event()
        self._marker = f"{self.prefix}:alive:{self.client_prefix}"

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        address = host.pop("address")
        return aioredis.BlockingConnectionPool.from_url(
            address,
            max_connections=host.pop("max_connections", settings.REDIS_MAX_CONNECTIONS),
            # How long a command waits for a free pooled connection.
            timeout=host.pop("pool_timeout", 20),
            # Above the blocking receive's 5 s, so an idle receive is not a timeout.
            socket_timeout=host.pop("socket_timeout", self.brpop_timeout + 10),
            socket_connect_timeout=host.pop("socket_connect_timeout", 5),
            health_check_interval=host.pop("health_check_interval", 30),
            # A pooled connection from before a Redis restart fails once; retry on a new one.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            **host,
        )

    # --- outages --------------------------------------------------------------------------------

    def watch(self, channel: str) -> None:
        """Wake ``channel``'s consumer with ``RECONNECTED`` after every Redis outage."""
        self._watched.add(channel)
        loop = asyncio.get_running_loop()
        if self._watchdog is None or self._watchdog.done() or self._watchdog.get_loop() != loop:
            self._healthy = asyncio.Event()
            self._healthy.set()
            self._watchdog = loop.create_task(self._watch_redis())

    def unwatch(self, channel: str) -> None:
        self._watched.discard(channel)

    async def receive(self, channel: str) -> dict[str, Any]:
        while True:
            try:
                message: dict[str, Any] = await super().receive(channel)
            except (RedisError, OSError) as error:
                if self._watchdog is None or self._watchdog.done():
                    raise
                # Without this the consumer would die with its socket. Wait until the watchdog
                # sees Redis again; it then wakes every watched consumer with RECONNECTED.
                if self._healthy.is_set():
                    logger.warning("channel layer lost Redis: %s", error)
                    self._healthy.clear()
                await self._healthy.wait()
                continue
            return message

    async def _watch_redis(self) -> None:
        """Notice outages and restarts. redis-py retries commands across a short outage, so a
        consumer may never see an error; but a restarted Redis has forgotten every group, and
        pushes published meanwhile are gone. A marker key of this process tells: when it has
        vanished, or a check failed, every watched consumer is woken to re-join and catch up."""
        seen_marker = False
        while self._watched or not seen_marker:
            try:
                restarted = False
                for index in range(self.ring_size):
                    previous = await self.connection(index).set(
                        self._marker, "1", ex=MARKER_TTL_SECS, get=True
                    )
                    restarted = restarted or (previous is None and seen_marker)
                seen_marker = True
                if restarted or not self._healthy.is_set():
                    logger.warning(
                        "channel layer: Redis is back; %s sockets catch up", len(self._watched)
                    )
                    for channel in list(self._watched):
                        self.receive_buffer[channel].put_nowait(dict(RECONNECTED))
                    self._healthy.set()
            except (RedisError, OSError) as error:
                if self._healthy.is_set():
                    logger.warning("channel layer lost Redis: %s", error)
                    self._healthy.clear()
            await asyncio.sleep(WATCH_INTERVAL_SECS)

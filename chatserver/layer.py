"""channels-redis, configured for load and made to survive Redis restarts.

As shipped, channels-redis with redis-py 8 fails in three ways under real load (pitfalls.md):
a pool of 100 connections that raises ``Too many connections`` instead of waiting, a socket
timeout equal to the blocking receive's timeout that kills idle consumers, and consumers that die
with the first Redis error. This layer waits for a pooled connection instead, sets the socket
timeout above the blocking receive, and turns a Redis outage into one ``layer.reconnected`` event
per waiting consumer once Redis answers again, so that each re-joins its group (a restarted Redis
has forgotten it) and catches up from the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis import asyncio as aioredis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

RECONNECTED = {"type": "layer.reconnected"}
_RECOVERY_MAX_WAIT_SECS = 2.0


class ChatChannelLayer(RedisChannelLayer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recovery: asyncio.Future[None] | None = None

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
            **host,
        )

    async def receive(self, channel: str) -> dict[str, Any]:
        try:
            message: dict[str, Any] = await super().receive(channel)
        except (RedisError, OSError) as error:
            await self._wait_for_redis(error)
            return dict(RECONNECTED)
        return message

    async def _wait_for_redis(self, error: BaseException) -> None:
        """One ping loop per process however many consumers noticed the outage; when Redis
        answers, every consumer still waiting for a message is woken with ``RECONNECTED``."""
        if self._recovery is None or self._recovery.done():
            logger.warning("channel layer lost Redis (%s); reconnecting", error)
            self._recovery = asyncio.ensure_future(self._ping_until_up())
        await asyncio.shield(self._recovery)

    async def _ping_until_up(self) -> None:
        delay = 0.05
        while True:
            try:
                for index in range(self.ring_size):
                    await self.connection(index).ping()
                break
            except (RedisError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECOVERY_MAX_WAIT_SECS)
        logger.warning("channel layer reconnected to Redis")
        for buffer in list(self.receive_buffer.values()):
            buffer.put_nowait(dict(RECONNECTED))

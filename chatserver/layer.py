"""channels-redis, configured for load and made to survive Redis restarts.

As shipped, channels-redis with redis-py 8 fails in three ways under real load (pitfalls.md):
a pool of 100 connections that raises ``Too many connections`` instead of waiting, a socket
timeout equal to the blocking receive's timeout that kills idle consumers, and consumers that die
with the first Redis error, or never learn that a restarted Redis forgot their groups. This layer
waits for a pooled connection instead, sets the socket timeout above the blocking receive, and
after a Redis outage or restart sends one ``layer.reconnected`` event to every socket's consumer,
so that each re-joins its group and catches up from the store.

Receiving is simpler than channels-redis's own: one reader task per process pops the process's
channel and hands each message to its consumer's inbox, so a waiting consumer is a single
``queue.get()``: cheap in memory, and cancelled at once when its socket closes (channels-redis's
lock hand-over kept a closed consumer alive until its blocking pop returned, up to 5 s). A
consumer may ``attach`` the queue it already reads its socket's events from (daphne's), so that
it waits on one queue with one task instead of two of each (``consumers/chat.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .batching import GroupCommit

logger = logging.getLogger(__name__)

RECONNECTED = {"type": "layer.reconnected"}
# channels-redis's group_send script, for many messages whose keys may repeat: expired messages
# go first (as channels-redis does before sending), then each message is added unless its
# channel is full. Scores rise by a microsecond per message, so a channel's messages are
# popped in the order they were sent.
SEND_MANY_SCRIPT = """
local count = #KEYS
local now = tonumber(ARGV[2 * count + 1])
local expiry = tonumber(ARGV[2 * count + 2])
local over_capacity = 0
for i = 1, count do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, math.floor(now) - expiry)
    if redis.call('ZCARD', KEYS[i]) < tonumber(ARGV[count + i]) then
        redis.call('ZADD', KEYS[i], now + i * 0.000001, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""
# In place of the pushes dropped for a consumer that fell ``capacity`` events behind.
OVERFLOWED = {"type": "layer.overflowed"}
WATCH_INTERVAL_SECS = 1.0
MARKER_TTL_SECS = 300
READER_RETRY_SECS = 0.5
READ_BATCH = 200


GROUP_WRITE_BATCH = 500


@dataclass(frozen=True)
class _GroupWrite:
    key: str
    channel: str
    join: bool  # else leave


class ChatChannelLayer(RedisChannelLayer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The inbox of each consumer channel of this process; a consumer's inbox goes with it.
        self._inboxes: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        # Channels whose consumer has an OVERFLOWED event still to handle.
        self._overflowed: set[str] = set()
        # Events one consumer may have waiting in this process (``capacity`` bounds each Redis
        # queue).
        self.inbox_capacity: int = self.capacity
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._healthy = asyncio.Event()
        self._marker = f"{self.prefix}:alive:{self.client_prefix}"
        # Group joins and leaves, batched into one pipeline per round trip, per shard.
        self._group_writes: dict[int, GroupCommit[_GroupWrite, None]] = {}

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

    # --- receiving ------------------------------------------------------------------------------

    async def receive(self, channel: str) -> dict[str, Any]:
        if "!" not in channel:  # a shared channel (workers), not a socket's: as shipped
            message: dict[str, Any] = await super().receive(channel)
            return message
        self._start_tasks()
        inbox = self._inboxes.get(channel)
        if inbox is None:
            inbox = self._inboxes[channel] = asyncio.Queue()
        return await inbox.get()

    def attach(self, channel: str, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        """Deliver the messages of ``channel`` to ``inbox``, a queue its consumer reads anyway."""
        self._start_tasks()
        self._inboxes[channel] = inbox

    def discard(self, channel: str) -> None:
        """The consumer of ``channel`` has ended: forget its inbox."""
        self._inboxes.pop(channel, None)
        self._overflowed.discard(channel)

    def overflow_handled(self, channel: str) -> None:
        """The consumer of ``channel`` is catching up: a new overflow needs a new event."""
        self._overflowed.discard(channel)

    def _deliver(self, channel: str, message: dict[str, Any]) -> None:
        inbox = self._inboxes.get(channel)
        if inbox is None:
            return  # its consumer has gone
        if inbox.qsize() >= self.inbox_capacity and message["type"] != RECONNECTED["type"]:
            # A consumer this far behind catches up from the store instead, once for all the
            # pushes dropped until it does: every pushed message is stored before it is pushed.
            if channel in self._overflowed:
                return
            self._overflowed.add(channel)
            message = dict(OVERFLOWED)
        inbox.put_nowait(message)

    def _start_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done() or self._reader.get_loop() != loop:
            if self._reader is not None and self._reader.get_loop() != loop:
                # A new event loop (tests run one per test): asyncio queues belong to the loop
                # that made them, so the old ones cannot be carried over.
                self._inboxes = {}
                self._overflowed = set()
            self._healthy = asyncio.Event()
            self._healthy.set()
            self._reader = loop.create_task(self._read())
            self._watchdog = loop.create_task(self._watch_redis())

    async def _read(self) -> None:
        """Pop this process's channel and hand each message to its consumer's queue.

        Up to ``READ_BATCH`` messages a round trip (blocking only while the queue is empty):
        channels-redis takes one at a time with four round trips each, so under a burst pushes
        waited in Redis for the length of the burst (docs/performance.md). Its backup queue
        (at-least-once for a process that dies between popping and pushing) is left out: every
        pushed message is in the store, and sockets catch up from there."""
        process_channel = f"specific.{self.client_prefix}!"
        index = self.consistent_hash(process_channel)
        key = self.prefix + process_channel
        while True:
            try:
                connection = self.connection(index)
                popped = await connection.zpopmin(key, READ_BATCH)
                if not popped:
                    blocked = await connection.bzpopmin(key, timeout=self.brpop_timeout)
                    popped = [(blocked[1], blocked[2])] if blocked else []
            except (RedisError, OSError) as error:
                if self._healthy.is_set():
                    logger.warning("channel layer lost Redis: %s", error)
                    self._healthy.clear()
                await asyncio.sleep(READER_RETRY_SECS)
                continue
            for content, _score in popped:
                message: dict[str, Any] = self.deserialize(content)
                channels = message.pop("__asgi_channel__", process_channel)
                for channel in channels if isinstance(channels, list) else [channels]:
                    self._deliver(channel, message)

    # --- sending --------------------------------------------------------------------------------

    async def group_send_many(self, sends: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """``group_send`` for many messages: two round trips per Redis host for all of them
        (the groups' members in one pipeline, every message in one script) where
        ``group_send`` takes four per message. A channel gets its messages in the order given."""
        now = time.time()
        members: dict[str, list[str]] = {}
        groups_by_index: dict[int, list[str]] = defaultdict(list)
        for group in dict.fromkeys(group for group, _ in sends):
            groups_by_index[self.consistent_hash(group)].append(group)
        for index, groups in groups_by_index.items():
            pipe = self.connection(index).pipeline(transaction=False)
            for group in groups:
                key = self._group_key(group)
                pipe.zremrangebyscore(key, min=0, max=int(now) - self.group_expiry)
                pipe.zrange(key, 0, -1)
            replies = await pipe.execute()
            for group, channels in zip(groups, replies[1::2], strict=True):
                members[group] = [channel.decode() for channel in channels]
        adds: dict[int, list[tuple[str, bytes, int]]] = defaultdict(list)
        for group, message in sends:
            by_index, payloads, capacities = self._map_channel_keys_to_connection(
                members[group], message
            )
            for index, keys in by_index.items():
                adds[index].extend((key, payloads[key], capacities[key]) for key in keys)
        for index, items in adds.items():
            keys = [key for key, _, _ in items]
            over = await self.connection(index).eval(
                SEND_MANY_SCRIPT,
                len(keys),
                *keys,
                *[payload for _, payload, _ in items],
                *[capacity for _, _, capacity in items],
                now,
                self.expiry,
            )
            if over:
                logger.info("%s of %s messages over a channel's capacity", over, len(items))

    # --- groups ---------------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        assert self.require_valid_group_name(group), "Group name not valid"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        await self._write_group(group, channel, join=True)

    async def group_discard(self, group: str, channel: str) -> None:
        assert self.require_valid_group_name(group), "Group name not valid"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        await self._write_group(group, channel, join=False)

    async def _write_group(self, group: str, channel: str, *, join: bool) -> None:
        """Joins and leaves go to Redis together, one pipeline at a time per shard.

        channels-redis sends each on its own (a join as two round trips), and every command
        waits for a pooled connection and makes a task for its write timeout: a reconnect
        storm's thousands of leaves and joins cost more CPU than anything else of the layer.
        The ones that arrive while a pipeline is out go in the next; a lone one waits no
        longer than before."""
        index = self.consistent_hash(group)
        writes = self._group_writes.get(index)
        if writes is None:
            writes = self._group_writes[index] = GroupCommit(
                functools.partial(self._send_group_writes, index), GROUP_WRITE_BATCH
            )
        await writes.submit(_GroupWrite(self._group_key(group), channel, join))

    async def _send_group_writes(self, index: int, batch: list[_GroupWrite]) -> list[None]:
        # Should Redis be away, GroupCommit hands each caller the error, as before.
        async with self.connection(index).pipeline(transaction=False) as pipe:
            now = time.time()
            for write in batch:
                if write.join:
                    pipe.zadd(write.key, {write.channel: now})
                    pipe.expire(write.key, self.group_expiry)
                else:
                    pipe.zrem(write.key, write.channel)
            await pipe.execute()
        return [None] * len(batch)

    # --- outages --------------------------------------------------------------------------------

    async def _watch_redis(self) -> None:
        """Notice outages and restarts. redis-py retries commands across a short outage, so a
        consumer may never see an error; but a restarted Redis has forgotten every group, and
        pushes published meanwhile are gone. A marker key of this process tells: when it has
        vanished, or a check failed, every consumer is woken to re-join and catch up."""
        seen_marker = False
        while True:
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
                        "channel layer: Redis is back; %s sockets catch up", len(self._inboxes)
                    )
                    for channel in list(self._inboxes):
                        self._deliver(channel, dict(RECONNECTED))
                    self._healthy.set()
            except (RedisError, OSError) as error:
                if self._healthy.is_set():
                    logger.warning("channel layer lost Redis: %s", error)
                    self._healthy.clear()
            await asyncio.sleep(WATCH_INTERVAL_SECS)

    async def stop(self) -> None:
        """Stop this loop's reader and watchdog and close its connections (tests and shutdown:
        a pop blocked in Redis ends when its connection closes)."""
        loop = asyncio.get_running_loop()
        # Group writes end by themselves once their last joins and leaves are sent.
        for writes in self._group_writes.values():
            await writes.wait_idle(timeout_secs=2)
        tasks = [task for task in (self._reader, self._watchdog) if task is not None]
        for task in tasks:
            task.cancel()
        layer = self._layers.pop(loop, None)
        if layer is not None:
            await layer.flush()
        mine = [task for task in tasks if task.get_loop() == loop]
        if mine:
            await asyncio.wait(mine, timeout=2)
        self._reader = self._watchdog = None
        self._group_writes = {}
        self._inboxes = {}
        self._overflowed = set()

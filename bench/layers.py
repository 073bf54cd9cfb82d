"""A prototype of the receive path docs/performance.md recommends, to measure it before the
server adopts it (``bench/run --fixes --server-env BENCH_LAYER=batched``).

channels-redis receives a process's events one at a time, each with four sequential Redis
round trips (EVAL to restore a backup queue, BZPOPMIN, ZADD to the backup queue, ZPOPMIN to
clear it), and each round trip waits for its turn on an event loop that is busy with HTTP
requests. Under a webhook burst the events pile up in Redis (1,800 of 2,000 in the measured
burst) and wait until the burst is over.

This layer takes up to ``BATCH`` events per round trip instead (ZPOPMIN with a count; BZPOPMIN
only when the queue is empty) and hands the extra ones straight to their sockets' buffers. It
drops channels-redis's backup queue, i.e. its at-least-once step for a process that dies
between popping and handling an event: the server does not rely on it, because every pushed
message is in the store and a socket catches up from there (``prev_id``, ``after``).
"""

from __future__ import annotations

from typing import Any

from chatserver.layer import ChatChannelLayer

BATCH = 200


class BatchedChatChannelLayer(ChatChannelLayer):
    async def receive_single(self, channel: str) -> tuple[Any, dict[str, Any]]:
        if "!" not in channel:
            result: tuple[Any, dict[str, Any]] = await super().receive_single(channel)
            return result
        index = self.consistent_hash(channel)
        key = self.prefix + channel
        connection = self.connection(index)
        popped = await connection.zpopmin(key, BATCH)
        while not popped:
            blocked = await connection.bzpopmin(key, timeout=self.brpop_timeout)
            if blocked is not None:
                popped = [(blocked[1], blocked[2])]
        first, *rest = [self._unpack(channel, content) for content, _ in popped]
        for targets, message in rest:
            # A group event for several sockets of this process names them all.
            for target in targets if isinstance(targets, list) else [targets]:
                self.receive_buffer[target].put_nowait(message)
        return first

    def _unpack(self, channel: str, content: bytes) -> tuple[Any, dict[str, Any]]:
        message: dict[str, Any] = self.deserialize(content)
        return message.pop("__asgi_channel__", channel), message

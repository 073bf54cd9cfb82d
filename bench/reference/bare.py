"""The bare reference: a ``websockets`` server and Redis pub/sub, nothing else.

``python -m bench.reference.bare --port P --prefix X`` (``REDIS_URL`` from the environment).
One ``PubSub`` connection for the whole process and a dict channel -> sockets; the first socket
of a device subscribes ``<prefix>:d.<device>``, the last one to leave unsubscribes. A push is a
``PUBLISH`` of the frame's text to that channel (the generator publishes); the reader task
forwards it to the device's sockets with ``websockets.broadcast``. ``GET /healthz`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from http import HTTPStatus
from typing import Any

from redis import asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

READY = '{"type": "ready"}'
PONG = '{"type": "pong"}'


def channel_name(prefix: str, device: str) -> str:
    return f"{prefix}:d.{device}"


class Hub:
    def __init__(self, redis_url: str, prefix: str) -> None:
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.sockets: dict[str, set[ServerConnection]] = {}

    async def start(self) -> None:
        # The PubSub opens its one connection here, before any socket can race to open it.
        await self.pubsub.subscribe(f"{self.prefix}:hub")

    async def join(self, channel: str, socket: ServerConnection) -> None:
        members = self.sockets.get(channel)
        if members is None:
            members = self.sockets[channel] = set()
            await self.pubsub.subscribe(channel)
        members.add(socket)

    async def leave(self, channel: str, socket: ServerConnection) -> None:
        members = self.sockets.get(channel)
        if members is None:
            return
        members.discard(socket)
        if not members:
            del self.sockets[channel]
            await self.pubsub.unsubscribe(channel)

    async def run(self) -> None:
        async for message in self.pubsub.listen():
            if message.get("type") != "message":
                continue
            channel = message["channel"].decode()
            members = self.sockets.get(channel)
            if members:
                broadcast(members, message["data"].decode())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()


def health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None


async def main(port: int, prefix: str) -> None:
    hub = Hub(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), prefix)
    await hub.start()
    reader = asyncio.create_task(hub.run())

    async def handler(socket: ServerConnection) -> None:
        parts = socket.request.path.strip("/").split("/") if socket.request else []
        if len(parts) != 2 or parts[0] != "ws" or not parts[1]:
            await socket.close(4404)
            return
        channel = channel_name(prefix, parts[1])
        await hub.join(channel, socket)
        try:
            await socket.send(READY)
            async for raw in socket:
                if isinstance(raw, str) and raw.startswith('{"type": "ping"'):
                    await socket.send(PONG)
        finally:
            await hub.leave(channel, socket)

    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    server_options: dict[str, Any] = {"compression": None, "process_request": health}
    async with serve(handler, "127.0.0.1", port, **server_options):
        await stop
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    await hub.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    options = parser.parse_args()
    asyncio.run(main(options.port, options.prefix))

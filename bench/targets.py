"""What a run measures: the chat server, or a reference server (``bench/reference``), each as
server processes, a fleet of device sockets to them and a pusher that makes pushes happen.

The chat server is pushed to the way production does it: signed Zammad webhooks through its
webhook view (never anything shorter). The stock Channels reference is pushed to over HTTP
(``POST /push/<device>/``, a view doing ``group_send``), the bare reference by a ``PUBLISH``
from the generator.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from bench import payloads, stack
from bench.clients import (
    Deliver,
    Fleet,
    Sent,
    chat_path,
    http_session,
    post_one,
    post_webhooks,
    post_webhooks_paced,
    send_all,
    send_paced,
    spread_over,
)
from bench.reference.bare import channel_name

READY_PREFIX = '{"type": "ready"'
# channels-redis's capacity for the stock reference's second variant.
RAISED_CAPACITY = 10_000


class Pusher(Protocol):
    how: str  # how a push is made, for the report
    noun: str  # what the generator sends: "webhook", "push request", "PUBLISH"

    def delivery(self, device: int) -> payloads.Delivery: ...

    async def send_all(
        self, items: Sequence[payloads.Delivery], *, concurrency: int
    ) -> list[Sent]: ...

    async def send_paced(
        self, items: Sequence[payloads.Delivery], *, rate: float, max_in_flight: int
    ) -> list[Sent]: ...

    async def warm_up(self) -> None: ...


class WebhookPusher:
    """Signed Zammad webhooks to the chat server's webhook view; with several server processes,
    each webhook goes to one of them, independently of where the device's socket is."""

    how = "a signed Zammad webhook, POST /api/v3/webhook/zammad/"
    noun = "webhook"

    def __init__(self, urls: list[str], signature_secret: str, devices: int) -> None:
        self.urls = urls
        self.signature_secret = signature_secret
        self.devices = devices
        self.pick = spread_over(len(urls))
        self._zammad: payloads.Zammad | None = None

    @property
    def zammad(self) -> payloads.Zammad:
        """The fake Zammad's records for every device (built on first use: ~1 s per 1,000)."""
        if self._zammad is None:
            self._zammad = payloads.Zammad(self.devices, self.signature_secret)
        return self._zammad

    def url_of(self, delivery: payloads.Delivery) -> str:
        return self.urls[self.pick(delivery)]

    def cross_process(self, items: Sequence[payloads.Delivery]) -> int:
        """Webhooks taken by another process than the one holding the device's socket."""
        count = len(self.urls)
        return sum(1 for item in items if self.pick(item) != item.device % count)

    def delivery(self, device: int) -> payloads.Delivery:
        return self.zammad.agent_reply(device)

    async def send_all(self, items: Sequence[payloads.Delivery], *, concurrency: int) -> list[Sent]:
        return await post_webhooks(self.url_of, items, concurrency=concurrency)

    async def send_paced(
        self, items: Sequence[payloads.Delivery], *, rate: float, max_in_flight: int
    ) -> list[Sent]:
        return await post_webhooks_paced(self.url_of, items, rate=rate, max_in_flight=max_in_flight)

    async def warm_up(self) -> None:
        for url in self.urls:
            [sent] = await post_webhooks(
                url, [payloads.unknown_ticket(self.signature_secret)], concurrency=1
            )
            if not sent.ok:
                raise RuntimeError(f"the warm-up webhook failed: {sent.status or sent.error}")


class _ReferencePusher:
    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def delivery(self, device: int) -> payloads.Delivery:
        headers = {"Content-Type": "application/json"}
        return payloads.Delivery(device, next(self._ids), b"", headers)

    @staticmethod
    def frame(sent: Sent) -> bytes:
        return payloads.reference_frame(
            sent.delivery.article_id, sent.delivery.device, sent.sent_at
        )


class StockPusher(_ReferencePusher):
    """``POST /push/<device>/`` to the stock reference (a Django async view, ``group_send``)."""

    how = "POST /push/<device>/ (Django async view, group_send)"
    noun = "push request"

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base

    def _deliver(self, session: aiohttp.ClientSession) -> Deliver:
        async def deliver(sent: Sent) -> None:
            url = f"{self.base}/push/{stack.device_id(sent.delivery.device)}/"
            await post_one(session, url, sent, self.frame(sent))

        return deliver

    async def send_all(self, items: Sequence[payloads.Delivery], *, concurrency: int) -> list[Sent]:
        async with http_session(concurrency, 30) as session:
            return await send_all(items, self._deliver(session), concurrency=concurrency)

    async def send_paced(
        self, items: Sequence[payloads.Delivery], *, rate: float, max_in_flight: int
    ) -> list[Sent]:
        async with http_session(max_in_flight, 30) as session:
            return await send_paced(
                items,
                self._deliver(session),
                rate=rate,
                max_in_flight=max_in_flight,
            )

    async def warm_up(self) -> None:
        async with http_session(1, 30) as session:
            sent = Sent(self.delivery(-1), time.perf_counter())
            await self._deliver(session)(sent)
        if not sent.ok:
            raise RuntimeError(f"the warm-up push failed: {sent.status or sent.error}")


class BarePusher(_ReferencePusher):
    """``PUBLISH <prefix>:d.<device>`` from the generator, at most ``concurrency`` in flight
    (a pool of as many Redis connections)."""

    how = "PUBLISH to the device's Redis channel, from the generator"
    noun = "PUBLISH"

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def _deliver(self, redis: aioredis.Redis) -> Deliver:
        async def deliver(sent: Sent) -> None:
            channel = channel_name(self.prefix, stack.device_id(sent.delivery.device))
            try:
                await redis.publish(channel, self.frame(sent))
            except (RedisError, OSError) as error:
                sent.error = type(error).__name__
            else:
                sent.status, sent.outcome = 200, "message"
            sent.answered_at = time.perf_counter()

        return deliver

    async def send_all(self, items: Sequence[payloads.Delivery], *, concurrency: int) -> list[Sent]:
        redis = aioredis.Redis.from_url(stack.REDIS_URL, max_connections=concurrency)
        try:
            return await send_all(items, self._deliver(redis), concurrency=concurrency)
        finally:
            await redis.aclose()

    async def send_paced(
        self, items: Sequence[payloads.Delivery], *, rate: float, max_in_flight: int
    ) -> list[Sent]:
        redis = aioredis.Redis.from_url(stack.REDIS_URL, max_connections=max_in_flight)
        try:
            return await send_paced(
                items, self._deliver(redis), rate=rate, max_in_flight=max_in_flight
            )
        finally:
            await redis.aclose()

    async def warm_up(self) -> None:
        [sent] = await self.send_all([self.delivery(-1)], concurrency=1)
        if not sent.ok:
            raise RuntimeError(f"the warm-up publish failed: {sent.error}")


# --- targets ------------------------------------------------------------------------------------


@dataclass
class Target:
    """One column of the comparison: server processes, the sockets' fleet, the pusher."""

    key: str  # "server", "stock", "stock-capacity", "bare"
    label: str
    servers: list[stack.Server]
    fleet: Fleet
    pusher: Pusher
    layer_prefix: str
    settings: list[tuple[str, object]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


REFERENCES = {
    "stock": "stock Channels (defaults)",
    "stock-capacity": f"stock Channels (capacity {RAISED_CAPACITY:,})",
    "bare": "bare websockets + pub/sub",
}


def reference_env(prefix: str, capacity: int | None) -> dict[str, str]:
    env = stack.server_env_base()
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "bench.reference.stock.settings",
            "REDIS_URL": stack.REDIS_URL,
            "STOCK_PREFIX": prefix,
        }
    )
    env.pop("STOCK_CAPACITY", None)
    if capacity is not None:
        env["STOCK_CAPACITY"] = str(capacity)
    return env


def start_reference(key: str, port: int, workdir: Path) -> Target:
    """Start one reference server (one process) under a Redis prefix of its own."""
    prefix = stack.new_prefix()
    log = workdir / f"{key}.log"
    if key == "bare":
        argv = [
            sys.executable,
            "-m",
            "bench.reference.bare",
            "--port",
            str(port),
            "--prefix",
            prefix,
        ]
        env = reference_env(prefix, None)
        pusher: Pusher = BarePusher(prefix)
        settings: list[tuple[str, object]] = [
            ("server", "1 process: python -m bench.reference.bare (websockets, compression off)"),
            ("pub/sub", f"one PubSub connection per process, channels {prefix}:d.<device>"),
        ]
    else:
        capacity = RAISED_CAPACITY if key == "stock-capacity" else None
        argv = [
            sys.executable,
            "-m",
            "daphne",
            # Access log off, as the chat server runs (daphne's default logs every request).
            "-v",
            "0",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "bench.reference.stock.asgi:application",
        ]
        env = reference_env(prefix, capacity)
        base = f"http://127.0.0.1:{port}"
        pusher = StockPusher(base)
        settings = [
            (
                "server",
                "1 daphne process: daphne -v 0 bench.reference.stock.asgi:application "
                "(daphne's defaults, access log off)",
            ),
            (
                "channel layer",
                f"channels_redis.core.RedisChannelLayer, prefix {prefix}, capacity "
                f"{capacity if capacity is not None else '100 (default)'}, else defaults",
            ),
        ]
    server = stack.Server(env, stack.ROOT, port, log, argv=argv)
    target = Target(
        key=key,
        label=REFERENCES[key],
        servers=[server],
        fleet=Fleet([server.ws_url], lambda device: f"/ws/{device}/", first_frame=READY_PREFIX),
        pusher=pusher,
        layer_prefix=prefix,
        settings=settings,
    )
    server.start()
    return target


def server_label(processes: int) -> str:
    return "this server" + (f" ({processes} processes)" if processes > 1 else "")


def chat_server_target(
    servers: list[stack.Server], keys: stack.Secrets, devices: int, prefix: str
) -> Target:
    urls = [f"{s.url}/api/v3/webhook/zammad/?token={keys.webhook_token}" for s in servers]
    return Target(
        key="server",
        label=server_label(len(servers)),
        servers=servers,
        fleet=Fleet(
            [server.ws_url for server in servers], chat_path(stack.REGION_SLUG, stack.LANGUAGE)
        ),
        pusher=WebhookPusher(urls, keys.signature_secret, devices),
        layer_prefix=prefix,
    )

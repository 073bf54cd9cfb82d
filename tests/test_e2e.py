"""End to end: real daphne processes on the real Redis and PostgreSQL, the fake Zammad over
HTTP, clients speaking WebSocket and REST over the network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatserver.fakes.base import free_port
from chatserver.models import Region

from .conftest import SIGNATURE_SECRET, WEBHOOK_TOKEN, Daphne, PrivateRedis, drain, server_env
from .helpers import check_frame, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REPLY_TIMEOUT_SECS = 10


class Client:
    """A device's socket, as an app holds it."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.last_id = 0

    async def frame(self, timeout: float = REPLY_TIMEOUT_SECS) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.connection.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        check_frame(frame)
        if frame["type"] == "chat.message":
            self.last_id = max(self.last_id, frame["message"]["id"])
        if frame["type"] == "chat.history":
            self.last_id = max([self.last_id, *(m["id"] for m in frame["messages"])])
        return frame

    async def next_of(self, kind: str, timeout: float = REPLY_TIMEOUT_SECS) -> dict[str, Any]:
        while True:
            frame = await self.frame(timeout)
            if frame["type"] == kind:
                return frame

    async def messages(self, count: int) -> list[dict[str, Any]]:
        return [(await self.next_of("chat.message"))["message"] for _ in range(count)]


async def read_until_closed(client: Client) -> None:
    while True:
        await client.frame()


@asynccontextmanager
async def device(server: Daphne, device_id: str, after: int | None = None) -> AsyncIterator[Client]:
    query = f"?after={after}" if after is not None else ""
    url = f"{server.ws_url}/ws/v3/augsburg/de/chat/{device_id}/{query}"
    async with connect(url, open_timeout=10) as connection:
        client = Client(connection)
        yield client


async def post(http: aiohttp.ClientSession, server: Daphne, device_id: str, text: str) -> Any:
    url = f"{server.url}/api/v3/augsburg/de/chat/{device_id}/"
    async with http.post(url, data={"message": text}) as answer:
        assert answer.status == 200
        return await answer.json()


async def open_ticket(
    http: aiohttp.ClientSession, server: Daphne, zammad: Any, device_id: str
) -> int:
    await post(http, server, device_id, "Hallo")
    await drain()
    ticket_ids = [t["id"] for t in zammad.tickets() if device_id in t["title"]]
    assert len(ticket_ids) == 1
    return int(ticket_ids[0])


def webhook_to(zammad: Any, server: Daphne) -> None:
    zammad.set_webhook(
        url=f"{server.url}/api/v3/webhook/zammad/?token={WEBHOOK_TOKEN}",
        signature_secret=SIGNATURE_SECRET,
        trigger_on_customer=True,
    )


async def test_reply_posted_to_a_reaches_socket_on_b(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region, zammad: Any, http: Any
) -> None:
    first, second = daphne_pair
    webhook_to(zammad, first)
    ticket_id = await open_ticket(http, first, zammad, "e2e-device-a")
    async with device(second, "e2e-device-a") as client:
        history = await client.next_of("chat.history")
        assert [m["content"] for m in history["messages"]] == ["Hallo"]
        zammad.agent_reply(ticket_id, "<p>Antwort</p>")
        [reply] = await client.messages(1)
        assert reply["content"] == "<p>Antwort</p>"
        assert reply["role"] == "agent"


async def test_rest_post_on_a_is_live_on_b(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region, http: Any
) -> None:
    first, second = daphne_pair
    async with device(second, "e2e-device-b") as one, device(second, "e2e-device-b") as two:
        await one.next_of("chat.history")
        await two.next_of("chat.history")
        await post(http, first, "e2e-device-b", "über REST")
        for client in (one, two):
            [message] = await client.messages(1)
            assert message["content"] == "über REST"


async def metric(http: aiohttp.ClientSession, server: Daphne, line_start: str) -> float:
    async with http.get(f"{server.url}/metrics") as answer:
        for line in (await answer.text()).splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_reply_written_on_a_reaches_the_polls_b_answers_from_memory(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region, zammad: Any, http: Any
) -> None:
    """B remembers the chat and answers its polls without a query, until PostgreSQL tells it
    that A wrote the counsellor's reply."""
    first, second = daphne_pair
    webhook_to(zammad, first)
    ticket_id = await open_ticket(http, first, zammad, "e2e-device-poll")
    url = f"{second.url}/api/v3/augsburg/de/chat/e2e-device-poll/"

    async def poll(etag: str = "") -> tuple[int, str, list[str]]:
        async with http.get(url, headers={"If-None-Match": etag} if etag else {}) as answer:
            if answer.status == 304:
                return 304, answer.headers["ETag"], []
            contents = [m["content"] for m in (await answer.json())["messages"]]
            return answer.status, answer.headers["ETag"], contents

    # B listens from its start, before any poll.
    await wait_for(lambda: metric(http, second, "chat_poll_cache_listening "), what="B to listen")
    status, etag, contents = await poll()
    assert (status, contents) == (200, ["Hallo"])
    from_memory = await metric(http, second, 'chat_poll_answers_total{source="memory"}')
    assert (await poll(etag))[0] == 304
    assert await poll() == (200, etag, ["Hallo"])
    assert await metric(http, second, 'chat_poll_answers_total{source="memory"}') == (
        from_memory + 2
    )
    zammad.agent_reply(ticket_id, "<p>Antwort</p>")

    async def changed() -> tuple[int, str, list[str]] | None:
        answer = await poll(etag)
        return answer if answer[0] == 200 else None

    status, new_etag, contents = await wait_for(changed, what="the reply in B's polls")
    assert contents == ["Hallo", "<p>Antwort</p>"]
    assert new_etag != etag


async def test_socket_send_is_echoed_to_the_other_process(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region
) -> None:
    first, second = daphne_pair
    async with device(first, "e2e-device-c") as sender, device(second, "e2e-device-c") as other:
        await sender.next_of("chat.history")
        await other.next_of("chat.history")
        await sender.connection.send(
            json.dumps({"type": "chat.send", "client_id": "c-1", "message": "hi"})
        )
        ack = await sender.next_of("chat.ack")
        [echo] = await other.messages(1)
        assert echo["id"] == ack["id"]
        assert echo["client_id"] == "c-1"


async def test_reconnect_with_after_gets_exactly_what_was_missed(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region, zammad: Any, http: Any
) -> None:
    first, second = daphne_pair
    webhook_to(zammad, first)
    ticket_id = await open_ticket(http, first, zammad, "e2e-device-d")
    async with device(second, "e2e-device-d") as client:
        await client.next_of("chat.history")
        last_seen = client.last_id
    for text in ("eins", "zwei", "drei"):
        zammad.agent_reply(ticket_id, f"<p>{text}</p>")
    zammad.wait_deliveries_idle(REPLY_TIMEOUT_SECS)
    async with device(second, "e2e-device-d", after=last_seen) as client:
        history = await client.next_of("chat.history")
        # Zammad delivers webhooks concurrently; ids follow arrival, not Zammad's order.
        contents = [m["content"] for m in history["messages"]]
        assert sorted(contents) == ["<p>drei</p>", "<p>eins</p>", "<p>zwei</p>"]
        ids = [m["id"] for m in history["messages"]]
        assert ids == sorted(ids)
        assert all(i > last_seen for i in ids)


async def test_oversized_frame_closes_with_1009(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region
) -> None:
    first, _ = daphne_pair
    async with device(first, "e2e-device-e") as client:
        await client.next_of("chat.history")
        big = json.dumps({"type": "chat.send", "client_id": "c", "message": "x" * 70_000})
        await client.connection.send(big)
        with pytest.raises(ConnectionClosed) as closed:
            await read_until_closed(client)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_idle_socket_outlives_the_blocking_receive_timeout(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region, http: Any
) -> None:
    """redis-py's socket timeout must not kill consumers that wait longer than 5 s."""
    first, second = daphne_pair
    async with device(second, "e2e-device-f") as client:
        await client.next_of("chat.history")
        with pytest.raises(TimeoutError):
            await client.frame(timeout=7)
        await post(http, first, "e2e-device-f", "still there?")
        [message] = await client.messages(1)
        assert message["content"] == "still there?"


async def test_killed_process_loses_nothing_for_a_client_that_resumes_elsewhere(
    daphne_pair: tuple[Daphne, Daphne], live_region: Region, zammad: Any, http: Any
) -> None:
    _, second = daphne_pair
    doomed = Daphne(free_port(), server_env(CHATBOT_URL="")).start()
    try:
        webhook_to(zammad, second)
        ticket_id = await open_ticket(http, second, zammad, "e2e-device-g")
        async with device(doomed, "e2e-device-g") as client:
            await client.next_of("chat.history")
            last_seen = client.last_id
            zammad.set_delivery_mode("hold")
            zammad.agent_reply(ticket_id, "<p>in flight</p>")
            doomed.kill()
            zammad.release_deliveries()
            with pytest.raises(ConnectionClosed):
                await read_until_closed(client)
    finally:
        doomed.stop()
    zammad.wait_deliveries_idle(REPLY_TIMEOUT_SECS)
    async with device(second, "e2e-device-g", after=last_seen) as client:
        history = await client.next_of("chat.history")
        assert [m["content"] for m in history["messages"]] == ["<p>in flight</p>"]


async def test_redis_restart_under_live_sockets(
    live_region: Region, private_redis: PrivateRedis, http: Any
) -> None:
    server = Daphne(free_port(), server_env(CHATBOT_URL="", REDIS_URL=private_redis.url)).start()
    try:
        async with device(server, "e2e-device-h") as client:
            await client.next_of("chat.history")
            await post(http, server, "e2e-device-h", "before")
            assert [m["content"] for m in await client.messages(1)] == ["before"]
            last_seen = client.last_id

            private_redis.stop()
            during = [await post(http, server, "e2e-device-h", f"during {n}") for n in range(3)]
            assert all(len(data["messages"]) >= 2 for data in during)
            private_redis.start()

            # The socket recovers on its own: it re-joins its group and catches up.
            recovered = await client.messages(3)
            assert [m["content"] for m in recovered] == ["during 0", "during 1", "during 2"]
            await post(http, server, "e2e-device-h", "after")
            assert [m["content"] for m in await client.messages(1)] == ["after"]

        async with device(server, "e2e-device-h", after=last_seen) as resumed:
            history = await resumed.next_of("chat.history")
            assert [m["content"] for m in history["messages"]] == [
                "during 0",
                "during 1",
                "during 2",
                "after",
            ]
    finally:
        server.stop()


async def test_limits_hold_across_processes(live_region: Region) -> None:
    if not settings.REDIS_URL:
        pytest.skip("processes share their limits through Redis (REDIS_URL)")
    env = server_env(
        CHATBOT_URL="",
        CHAT_RATE_LIMITS_ENABLED="true",
        WS_MAX_CONNECTIONS_PER_DEVICE="1",
        RATE_LIMIT_SENDS_PER_DEVICE="2",
        CHANNEL_PREFIX=f"limits-{free_port()}",
    )
    first = Daphne(free_port(), env).start()
    second = Daphne(free_port(), env).start()
    try:
        async with device(first, "e2e-device-i") as client:
            await client.next_of("chat.history")
            # The device's one place is taken on the first process: the second refuses.
            async with device(second, "e2e-device-i") as refused:
                with pytest.raises(ConnectionClosed) as closed:
                    await read_until_closed(refused)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4429
            for number in range(3):
                frame = {"type": "chat.send", "client_id": f"c{number}", "message": "x"}
                await client.connection.send(json.dumps(frame))
            acks = [await client.next_of("chat.ack") for _ in range(2)]
            error = await client.next_of("error")
            assert [ack["client_id"] for ack in acks] == ["c0", "c1"]
            assert error["code"] == "rate_limited"

        # Closed on the first process: the place is free for the second, once the first has
        # seen the close (a client retries as it would after any 4429).
        async def reconnects() -> bool:
            try:
                async with device(second, "e2e-device-i") as moved:
                    await moved.next_of("chat.history")
                    return True
            except ConnectionClosed:
                return False

        await wait_for(reconnects, timeout=10, what="the freed place")
    finally:
        first.stop()
        second.stop()

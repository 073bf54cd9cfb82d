"""Durability (chatbot.md section E) under faults: Zammad down, a worker killed with SIGKILL in
the middle of a delivery, two workers on one queue, a message Zammad refuses for good, an expired
chat. Real PostgreSQL and Redis, the fake Zammad over real HTTP; worker processes where a process
has to die or compete, the worker loop in the test otherwise. No sleeping: every wait is on a
condition with a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import AsyncClient
from django.utils import timezone

from chatserver import worker
from chatserver.fakes.zammad import FakeZammadServer
from chatserver.models import Chat, Message, Region, Work

from .conftest import ROOT, drain, server_env
from .helpers import check_conversation, wait_for
from .test_consumer import Socket

pytestmark = pytest.mark.django_db(transaction=True)

ARTICLES = "/api/v1/ticket_articles"


def rest_path(device: str) -> str:
    return f"/api/v3/augsburg/de/chat/{device}/"


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    """``helpers.wait_for`` with a coroutine condition (its signature cannot type those)."""
    poll: Any = condition
    await wait_for(poll, what=what, timeout=timeout)


@pytest.fixture
async def sockets() -> AsyncIterator[list[Socket]]:
    opened: list[Socket] = []
    yield opened
    for socket in opened:
        await socket.close()


async def open_socket(sockets: list[Socket], device: str) -> Socket:
    socket = await Socket(f"/ws/v3/augsburg/de/chat/{device}/").connect()
    sockets.append(socket)
    assert (await socket.receive())["type"] == "chat.history"
    return socket


async def socket_send(socket: Socket, client_id: str, text: str) -> int:
    await socket.send({"type": "chat.send", "client_id": client_id, "message": text})
    ack = await socket.receive_type("chat.ack")
    assert ack["client_id"] == client_id and ack["status"] == "pending"
    message_id: int = ack["id"]
    return message_id


async def rest_send(client: AsyncClient, device: str, text: str) -> int:
    answer = await client.post(rest_path(device), {"message": text})
    assert answer.status_code == 200, answer.content
    data = json.loads(answer.content)
    check_conversation(data)
    mine = [m for m in data["messages"] if m["content"] == text]
    assert len(mine) == 1
    message_id: int = mine[0]["id"]
    return message_id


async def rest_statuses(client: AsyncClient, device: str) -> dict[int, str]:
    answer = await client.get(rest_path(device))
    assert answer.status_code == 200, answer.content
    data = json.loads(answer.content)
    check_conversation(data)
    return {m["id"]: m["status"] for m in data["messages"]}


def marked_ids(articles: list[dict[str, Any]]) -> list[int]:
    """The local message ids of the server's own articles, in Zammad's order."""
    return [a["preferences"]["integreat_chat"]["message_id"] for a in articles]


def zammad_by_ticket(zammad: FakeZammadServer) -> dict[int, list[dict[str, Any]]]:
    return {int(t["id"]): zammad.articles(int(t["id"])) for t in zammad.tickets()}


async def all_sent(ids: list[int]) -> bool:
    sent = Message.objects.filter(pk__in=ids, status=Message.Status.SENT)
    return await sent.acount() == len(ids)


async def all_work_done() -> bool:
    """Sent is recorded before the worker finishes the item (a second transaction)."""
    return not await Work.objects.exclude(state=Work.State.DONE).aexists()


async def ticket_of(device: str) -> int | None:
    chat = await Chat.objects.aget(device_id=device, is_current=True)
    return chat.zammad_ticket_id


@contextlib.asynccontextmanager
async def running_worker(concurrency: int = 8) -> AsyncIterator[None]:
    """The real worker loop as a task in this process."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run_worker(stop, concurrency))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 10)


class WorkerProcess:
    """``manage.py chat_worker`` in its own process, on the test database."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "chat_worker"], cwd=ROOT, env=env
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def worker_processes() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        process.stop()


def worker_env(**overrides: str) -> dict[str, str]:
    return server_env(CHATBOT_URL="", WORKER_POLL_INTERVAL_SECS="0.05", **overrides)


# --- Zammad down -----------------------------------------------------------------------------


async def test_zammad_down_then_back_delivers_everything_once_in_order(
    region: Region, zammad: FakeZammadServer, settings: Any, sockets: list[Socket]
) -> None:
    settings.WORKER_MAX_BACKOFF_SECS = 0.2  # retries come quickly, not after minutes
    settings.WORKER_POLL_INTERVAL_SECS = 0.02
    devices = [f"down-device-{number}" for number in range(5)]
    client = AsyncClient()
    socket = await open_socket(sockets, devices[0])  # one device on a socket, four on REST
    zammad.go_down()
    sent: dict[str, list[int]] = {device: [] for device in devices}
    async with running_worker():
        for round_ in range(4):
            for device in devices:
                text = f"{device} message {round_}"
                if device == devices[0]:
                    message_id = await socket_send(socket, f"c{round_}", text)
                else:
                    message_id = await rest_send(client, device, text)
                sent[device].append(message_id)

        # Every chat's first delivery has failed and been retried while Zammad was down.
        async def retried_while_down() -> bool:
            firsts = Work.objects.filter(message_id__in=[ids[0] for ids in sent.values()])
            return await firsts.filter(attempts__gte=2).acount() == len(devices)

        await until(retried_while_down, "retries while Zammad is down")
        for device in devices:
            assert set((await rest_statuses(client, device)).values()) == {"pending"}
        assert zammad.tickets() == []

        zammad.come_back()
        every_id = [message_id for ids in sent.values() for message_id in ids]
        await until(lambda: all_sent(every_id), "all 20 messages sent", timeout=20)

    tickets = zammad_by_ticket(zammad)
    assert len(tickets) == 5
    for device in devices:
        ticket_id = await ticket_of(device)
        assert ticket_id is not None
        articles = tickets[ticket_id]
        assert marked_ids(articles) == sent[device]  # each once, in the chat's order
        assert [a["body"] for a in articles] == [f"{device} message {n}" for n in range(4)]
        assert await rest_statuses(client, device) == dict.fromkeys(sent[device], "sent")
    status_frames: list[tuple[int, str]] = []
    while len(status_frames) < 4:
        frame = await socket.receive_type("chat.status")
        status_frames.append((frame["id"], frame["status"]))
    assert status_frames == [(message_id, "sent") for message_id in sent[devices[0]]]


# --- a worker killed in the middle of a delivery ---------------------------------------------


@pytest.mark.parametrize("reached_zammad", [True, False], ids=["created", "not-created"])
async def test_worker_killed_mid_delivery(
    live_region: Region,
    zammad: FakeZammadServer,
    worker_processes: list[WorkerProcess],
    reached_zammad: bool,
) -> None:
    """The fake stalls the article request that the first worker process is making, then the
    process dies with SIGKILL. When the fake is woken it either stores the article anyway
    (``created``: the request had reached Zammad, only the answer got lost) or answers 500 to
    nobody (``not-created``). A new worker takes the item over once its lease has run out and
    must neither lose nor double it."""
    device = f"kill-device-{int(reached_zammad)}"
    client = AsyncClient()
    first_id = await rest_send(client, device, "eins")
    await drain()  # the ticket and the first article exist
    ticket_id = await ticket_of(device)
    assert ticket_id is not None
    zammad.fail_next(1, status=None if reached_zammad else 500, stall_secs=60, path_prefix=ARTICLES)
    ids = [
        first_id,
        await rest_send(client, device, "zwei"),
        await rest_send(client, device, "drei"),
    ]
    env = worker_env(WORKER_LEASE_SECS="2")

    def posts_of(message_id: int) -> list[dict[str, Any]]:
        return [
            request
            for request in zammad.received(ARTICLES)
            if request["method"] == "POST"
            and request["json"]["preferences"]["integreat_chat"]["message_id"] == message_id
        ]

    doomed = WorkerProcess(env)
    worker_processes.append(doomed)
    await wait_for(lambda: posts_of(ids[1]), what="the worker inside the call", timeout=30)
    doomed.kill()
    zammad.come_back()  # wakes the stalled request: stored or refused, with nobody listening
    zammad.wait_deliveries_idle()  # ... and has finished answering it
    assert len(zammad.articles(ticket_id)) == (2 if reached_zammad else 1)
    stuck = await Work.objects.aget(message_id=ids[1])
    assert (stuck.state, stuck.attempts) == (Work.State.RUNNING, 1)

    worker_processes.append(WorkerProcess(env))
    await until(lambda: all_sent(ids), "every message sent", timeout=30)
    await until(all_work_done, "every work item done")

    articles = zammad.articles(ticket_id)
    assert marked_ids(articles) == ids
    assert [a["body"] for a in articles] == ["eins", "zwei", "drei"]
    taken_over = await Work.objects.aget(message_id=ids[1])
    assert (taken_over.state, taken_over.attempts) == (Work.State.DONE, 2)
    # The re-run looked for its article first; it posted again only if Zammad did not have it.
    assert len(posts_of(ids[1])) == (1 if reached_zammad else 2)
    message = await Message.objects.aget(pk=ids[1])
    assert message.zammad_article_id == articles[1]["id"]
    assert await rest_statuses(client, device) == dict.fromkeys(ids, "sent")


async def test_worker_killed_while_creating_the_ticket(
    live_region: Region, zammad: FakeZammadServer, worker_processes: list[WorkerProcess]
) -> None:
    device = "kill-ticket-0001"
    ids = [await rest_send(AsyncClient(), device, "eins")]
    zammad.fail_next(1, status=None, stall_secs=60, path_prefix="/api/v1/tickets")
    env = worker_env(WORKER_LEASE_SECS="2")
    doomed = WorkerProcess(env)
    worker_processes.append(doomed)
    await wait_for(
        lambda: zammad.received("/api/v1/tickets"), what="the worker inside the call", timeout=30
    )
    doomed.kill()
    zammad.come_back()  # the stalled request creates the ticket, for nobody
    zammad.wait_deliveries_idle()
    assert len(zammad.tickets()) == 1
    worker_processes.append(WorkerProcess(env))
    await until(lambda: all_sent(ids), "the message sent", timeout=30)
    # Neither the message nor the ticket is doubled: the re-run finds the ticket.
    assert sum(len(articles) for articles in zammad_by_ticket(zammad).values()) == 1
    assert len(zammad.tickets()) == 1


# --- two workers on one queue ------------------------------------------------------------------


async def test_two_worker_processes_share_the_queue(
    live_region: Region, zammad: FakeZammadServer, worker_processes: list[WorkerProcess]
) -> None:
    env = worker_env()
    worker_processes.extend([WorkerProcess(env), WorkerProcess(env)])
    devices = [f"pair-device-{number}" for number in range(5)]
    client = AsyncClient()
    sent: dict[str, list[int]] = {device: [] for device in devices}
    for round_ in range(6):
        for device in devices:
            sent[device].append(await rest_send(client, device, f"{device} message {round_}"))
    every_id = [message_id for ids in sent.values() for message_id in ids]
    assert len(every_id) == 30
    await until(lambda: all_sent(every_id), "all 30 messages sent", timeout=30)
    assert all(process.process.poll() is None for process in worker_processes)

    tickets = zammad_by_ticket(zammad)
    assert len(tickets) == len(devices)  # one ticket per chat, none opened twice
    for device in devices:
        ticket_id = await ticket_of(device)
        assert ticket_id is not None
        assert marked_ids(tickets[ticket_id]) == sent[device]
    posts = [r for r in zammad.received(ARTICLES) if r["method"] == "POST"]
    assert len(posts) == 30  # no article was even attempted twice
    await until(all_work_done, "every work item done")


# --- a message Zammad refuses for good -----------------------------------------------------------


async def test_refused_message_fails_and_the_next_ones_go_through(
    region: Region, zammad: FakeZammadServer, sockets: list[Socket]
) -> None:
    device = "refused-device-0001"
    client = AsyncClient()
    socket = await open_socket(sockets, device)
    first = await socket_send(socket, "c1", "eins")
    await drain()
    assert await socket.receive_type("chat.status") == {
        "type": "chat.status",
        "id": first,
        "status": "sent",
    }
    zammad.fail_next(1, status=422, path_prefix=ARTICLES)
    refused = await socket_send(socket, "c2", "zwei")
    after = await rest_send(client, device, "drei")
    await drain()
    frames = [await socket.receive_type("chat.status") for _ in range(2)]
    assert frames == [
        {"type": "chat.status", "id": refused, "status": "failed"},
        {"type": "chat.status", "id": after, "status": "sent"},
    ]
    assert await rest_statuses(client, device) == {first: "sent", refused: "failed", after: "sent"}
    work = await Work.objects.aget(message_id=refused)
    assert (work.state, work.attempts) == (Work.State.FAILED, 1)  # permanent: not retried
    assert "422" in work.last_error
    ticket_id = await ticket_of(device)
    assert ticket_id is not None
    assert marked_ids(zammad.articles(ticket_id)) == [first, after]
    assert await drain() == 0  # nothing left to retry


# --- an expired chat --------------------------------------------------------------------------


async def test_message_after_expiry_opens_a_new_chat_and_ticket(
    region: Region, zammad: FakeZammadServer, sockets: list[Socket]
) -> None:
    device = "expiry-device-0001"
    client = AsyncClient()
    old_id = await rest_send(client, device, "alt")
    await drain()
    old_chat = await Chat.objects.aget(device_id=device)
    assert old_chat.zammad_ticket_id is not None
    await Chat.objects.filter(pk=old_chat.pk).aupdate(
        expires_at=timezone.now() - timedelta(minutes=1)
    )

    answer = await client.get(rest_path(device))
    assert answer.status_code == 404
    assert json.loads(answer.content) == {"error": "Chat not found."}
    socket = await Socket(f"/ws/v3/augsburg/de/chat/{device}/").connect()
    sockets.append(socket)
    history = await socket.receive()
    assert history["messages"] == [] and history["last_id"] == 0

    new_id = await rest_send(client, device, "neu")
    await drain()
    chats = [chat async for chat in Chat.objects.filter(device_id=device).order_by("id")]
    assert [(chat.pk, chat.is_current) for chat in chats] == [
        (old_chat.pk, False),
        (chats[1].pk, True),
    ]
    new_ticket = chats[1].zammad_ticket_id
    assert new_ticket is not None and new_ticket != old_chat.zammad_ticket_id
    tickets = zammad_by_ticket(zammad)
    assert {ticket_id: marked_ids(articles) for ticket_id, articles in tickets.items()} == {
        old_chat.zammad_ticket_id: [old_id],
        new_ticket: [new_id],
    }
    answer = await client.get(rest_path(device))
    data = json.loads(answer.content)
    check_conversation(data)
    assert [m["content"] for m in data["messages"]] == ["neu"]
    assert data["ticket_url"] == f"{zammad.url}/#ticket/zoom/{new_ticket}"

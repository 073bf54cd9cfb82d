"""The bot and translation flows of chatbot.md (sections B, C, D) from end to end: a device on a
socket or REST, the server's background work against the fake Zammad and the fake bot over real
HTTP, real PostgreSQL and Redis. Background work runs in the test (``drain``) or in a worker task;
the last test runs real daphne and worker processes. Every captured frame is schema-checked."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from websockets.asyncio.client import ClientConnection, connect

from chatserver.fakes.base import free_port
from chatserver.fakes.chatbot import HUMAN_HANDOVER_ANSWER, FakeChatbotServer
from chatserver.fakes.zammad import FakeZammadServer
from chatserver.models import Chat, Message, Region, WebhookDelivery, Work

from .conftest import (
    SIGNATURE_SECRET,
    WEBHOOK_TOKEN,
    Daphne,
    drain,
    server_env,
    skip_without_shared_services,
)
from .helpers import Capture, check_conversation, check_frame, wait_for
from .test_consumer import Socket
from .test_durability import WorkerProcess, running_worker, until
from .test_webhook import replay

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER_PATH = "/chatanswers/extract_answer/"
TRANSLATE_PATH = "/chatanswers/translate_message/"
AUTOMATIC_SUBJECT = "automatically generated message"
HOOK = f"/api/v3/webhook/zammad/?token={WEBHOOK_TOKEN}"
LINK = (
    '<ul><li><a href="https://integreat.app/augsburg/{language}/"'
    ' rel="noopener noreferrer nofollow">Integreat</a></li></ul>'
)


def ws_path(language: str, device: str) -> str:
    return f"/ws/v3/augsburg/{language}/chat/{device}/"


def rest_path(language: str, device: str) -> str:
    return f"/api/v3/augsburg/{language}/chat/{device}/"


def bot_answer(question: str, language: str) -> str:
    """The fake bot's deterministic answer as a device sees it: sanitised (links get a rel)."""
    return f"<p>Automatic answer ({language}): {question}</p>" + LINK.format(language=language)


@pytest.fixture
async def sockets() -> AsyncIterator[list[Socket]]:
    opened: list[Socket] = []
    yield opened
    for socket in opened:
        await socket.close()


async def open_socket(sockets: list[Socket], path: str) -> Socket:
    socket = await Socket(path).connect()
    sockets.append(socket)
    history = await socket.receive()
    assert history["type"] == "chat.history"
    return socket


async def frames_until(
    socket: Socket, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
) -> list[dict[str, Any]]:
    """Frames (each schema-checked by ``Socket.receive``) until ``done`` holds for them."""
    frames: list[dict[str, Any]] = []
    while not done(frames):
        frames.append(await socket.receive(timeout))
    return frames


def typing_false(frames: list[dict[str, Any]]) -> bool:
    return any(f == {"type": "chat.typing", "chatbot_typing": False} for f in frames)


def statuses(frames: list[dict[str, Any]]) -> dict[int, str]:
    return {f["id"]: f["status"] for f in frames if f["type"] == "chat.status"}


async def send_frames(socket: Socket, client_id: str, text: str) -> list[dict[str, Any]]:
    """Send one message; the ack and the echo of the device's own message, checked."""
    await socket.send({"type": "chat.send", "client_id": client_id, "message": text})
    ack = await socket.receive()
    assert ack["type"] == "chat.ack" and ack["client_id"] == client_id, ack
    assert ack["status"] == "pending"
    own = await socket.receive()
    assert own["type"] == "chat.message", own
    assert own["message"]["id"] == ack["id"]
    assert own["message"]["role"] == "user" and own["message"]["client_id"] == client_id
    assert own["message"]["automatic_answer"] is False
    return [ack, own]


async def conversation(client: AsyncClient, path: str) -> dict[str, Any]:
    answer = await client.get(path)
    assert answer.status_code == 200, answer.content
    data: dict[str, Any] = json.loads(answer.content)
    check_conversation(data)
    return data


def bot_calls(bot: FakeChatbotServer, path: str = ANSWER_PATH) -> list[Any]:
    return [call["json"] for call in bot.received() if call["path"] == path]


def only_ticket(zammad: FakeZammadServer) -> int:
    [ticket] = zammad.tickets()
    return int(ticket["id"])


def own_mark(article: dict[str, Any]) -> dict[str, Any]:
    mark: dict[str, Any] = article["preferences"]["integreat_chat"]
    return mark


async def no_work_left() -> bool:
    unfinished = Work.objects.filter(state__in=[Work.State.QUEUED, Work.State.RUNNING])
    return not await unfinished.aexists()


# --- B: a device's question and the bot's answer ---------------------------------------------


async def test_answered_question(
    region: Region, zammad: FakeZammadServer, bot: FakeChatbotServer, sockets: list[Socket]
) -> None:
    device = "flow-answer-0001"
    socket = await open_socket(sockets, ws_path("de", device))
    ack, own = await send_frames(socket, "q-1", "Wie <b>geht</b> es?")
    assert own["message"]["content"] == "Wie &lt;b&gt;geht&lt;/b&gt; es?"
    assert await socket.receive() == {"type": "chat.typing", "chatbot_typing": True}

    await drain()
    frames = await frames_until(socket, lambda fs: typing_false(fs) and len(statuses(fs)) == 2)
    kinds = [f["type"] for f in frames]
    answers = [f["message"] for f in frames if f["type"] == "chat.message"]
    assert len(answers) == 1, frames
    answer = answers[0]
    # The answer is pushed before the typing indicator goes away.
    assert kinds.index("chat.message") < kinds.index("chat.typing")
    assert answer["role"] == "agent" and answer["user_is_author"] is False
    assert answer["automatic_answer"] is True
    assert answer["content"] == bot_answer("Wie &lt;b&gt;geht&lt;/b&gt; es?", "de")
    assert "client_id" not in answer
    assert statuses(frames) == {ack["id"]: "sent", answer["id"]: "sent"}
    assert await socket.nothing_pending()

    data = await conversation(AsyncClient(), rest_path("de", device))
    assert data["chatbot_typing"] is False
    pushed = [{k: v for k, v in own["message"].items() if k != "client_id"}, answer]
    assert data["messages"] == [dict(m, status="sent") for m in pushed]

    # The bot was asked once, with the device's text (unescaped), language and region.
    assert bot_calls(bot) == [
        {
            "messages": [{"role": "user", "content": "Wie <b>geht</b> es?"}],
            "language": "de",
            "region": "augsburg",
        }
    ]
    assert bot_calls(bot, TRANSLATE_PATH) == []  # chat language == region language
    question, posted = zammad.articles(only_ticket(zammad))
    assert question["sender"] == "Customer" and question["body"] == own["message"]["content"]
    assert posted["sender"] == "Agent"
    assert posted["subject"] == AUTOMATIC_SUBJECT
    assert posted["internal"] is False
    assert posted["content_type"] == "text/html"
    assert posted["body"] == answer["content"]
    assert own_mark(posted) == {"message_id": answer["id"]}


async def test_question_in_another_language_gets_internal_translation(
    region: Region, zammad: FakeZammadServer, bot: FakeChatbotServer, sockets: list[Socket]
) -> None:
    device = "flow-arabic-0001"
    question = "مرحبا، أين مكتب الهجرة؟"
    socket = await open_socket(sockets, ws_path("ar", device))
    ack, _own = await send_frames(socket, "q-1", question)
    assert await socket.receive() == {"type": "chat.typing", "chatbot_typing": True}

    await drain()
    frames = await frames_until(socket, lambda fs: typing_false(fs) and len(statuses(fs)) == 2)
    [answer] = [f["message"] for f in frames if f["type"] == "chat.message"]
    assert answer["content"] == bot_answer(question, "ar")
    assert answer["automatic_answer"] is True

    ticket_id = only_ticket(zammad)
    customer, note, public = zammad.articles(ticket_id)
    assert customer["sender"] == "Customer" and customer["body"] == question
    assert note["internal"] is True
    assert note["sender"] == "Agent"
    assert note["subject"] == AUTOMATIC_SUBJECT
    assert note["body"] == f"[de] {question}"
    assert own_mark(note) == {"translation_of": ack["id"]}
    assert public["internal"] is False and public["body"] == answer["content"]
    assert bot_calls(bot, TRANSLATE_PATH) == [
        {"message": question, "source_language": "ar", "target_language": "de"}
    ]
    assert [call["language"] for call in bot_calls(bot)] == ["ar"]

    # A counsellor's internal note and a reconciliation with Zammad's full article list: still
    # nothing internal reaches the device.
    zammad.agent_reply(ticket_id, "<p>Intern: bitte zurückrufen</p>", internal=True)
    chat = await Chat.objects.aget(device_id=device)
    await sync_to_async(Work.objects.create)(
        chat=chat, kind=Work.Kind.SYNC_TICKET, lane=Work.Lane.SYNC
    )
    assert await drain() == 1
    data = await conversation(AsyncClient(), rest_path("ar", device))
    assert [m["id"] for m in data["messages"]] == [ack["id"], answer["id"]]
    assert await socket.nothing_pending()
    seen = json.dumps(frames + data["messages"], ensure_ascii=False)
    assert "[de]" not in seen and "Intern" not in seen


# --- C: a counsellor's reply ------------------------------------------------------------------


@pytest.fixture
def capture() -> Iterator[Capture]:
    capture = Capture()
    capture.server.start()
    yield capture
    capture.server.stop()


def signed(raw: bytes) -> str:
    return "sha1=" + hmac.new(SIGNATURE_SECRET.encode(), raw, hashlib.sha1).hexdigest()


async def test_counsellor_reply_is_translated_into_the_chat_language(
    region: Region,
    zammad: FakeZammadServer,
    bot: FakeChatbotServer,
    capture: Capture,
    sockets: list[Socket],
) -> None:
    device = "flow-reply-0001"
    client = AsyncClient()
    await client.post(rest_path("ar", device), {"message": "سؤال"})
    await drain()  # ticket, question, its internal translation, the bot's answer
    ticket_id = only_ticket(zammad)
    before = await conversation(client, rest_path("ar", device))
    assert len(before["messages"]) == 2
    socket = await open_socket(sockets, ws_path("ar", device))
    zammad.set_webhook(
        url=f"{capture.server.url}/hook",
        signature_secret=SIGNATURE_SECRET,
        trigger_on_customer=False,
    )

    reply = "<p>Guten Tag, wie kann ich helfen?</p>"
    zammad.agent_reply(ticket_id, reply)
    [delivery] = capture.wait(1)
    assert (await replay(client, delivery)).status_code == 200
    original = await socket.receive()
    assert original["type"] == "chat.message"
    assert original["message"]["content"] == reply
    assert original["message"]["automatic_answer"] is False
    assert original["message"]["status"] == "sent"

    await drain()  # the translation, then its public article
    frames = await frames_until(socket, lambda fs: len(statuses(fs)) == 1)
    [translation] = [f["message"] for f in frames if f["type"] == "chat.message"]
    assert translation["content"] == f"[ar] {reply}"
    assert translation["automatic_answer"] is True and translation["role"] == "agent"
    assert statuses(frames) == {translation["id"]: "sent"}
    assert bot_calls(bot, TRANSLATE_PATH)[-1] == {
        "message": reply,
        "source_language": "de",
        "target_language": "ar",
    }
    posted = zammad.articles(ticket_id)[-1]
    assert posted["internal"] is False
    assert posted["sender"] == "Agent"
    assert posted["subject"] == AUTOMATIC_SUBJECT
    assert posted["body"] == translation["content"]
    assert own_mark(posted) == {"message_id": translation["id"]}

    # Zammad's trigger skips articles with the marker subject: no webhook for the translation.
    zammad.wait_deliveries_idle()
    assert len(capture.deliveries) == 1
    # Were one delivered anyway (another trigger, a hand-made one), it is the server's own.
    payload = json.loads(delivery["body"])
    payload["article"] = posted
    payload["ticket"]["article_ids"] = [a["id"] for a in zammad.articles(ticket_id)]
    raw = json.dumps(payload).encode()
    delivery_id = str(uuid.uuid4())
    answer = await client.post(
        HOOK,
        raw,
        content_type="application/json",
        headers={"X-Hub-Signature": signed(raw), "X-Zammad-Delivery": delivery_id},
    )
    assert answer.status_code == 200
    assert (await WebhookDelivery.objects.aget(delivery_id=delivery_id)).outcome == "ignored_own"
    await drain()
    after = await conversation(client, rest_path("ar", device))
    assert [m["id"] for m in after["messages"]] == [
        *(m["id"] for m in before["messages"]),
        original["message"]["id"],
        translation["id"],
    ]
    assert await socket.nothing_pending()


# --- B.3: the user asks for a human -------------------------------------------------------------


async def test_talk_to_a_human_switches_the_bot_off(
    region: Region, zammad: FakeZammadServer, bot: FakeChatbotServer, sockets: list[Socket]
) -> None:
    device = "flow-human-0001"
    socket = await open_socket(sockets, ws_path("de", device))
    await send_frames(socket, "q-1", "Can I talk to a human, please?")
    assert await socket.receive() == {"type": "chat.typing", "chatbot_typing": True}
    await drain()
    frames = await frames_until(socket, lambda fs: typing_false(fs) and len(statuses(fs)) == 2)
    [handover] = [f["message"] for f in frames if f["type"] == "chat.message"]
    assert handover["content"] == HUMAN_HANDOVER_ANSWER
    assert handover["automatic_answer"] is True
    [ticket] = zammad.tickets()
    assert ticket["automatic_answers"] is False
    updates = [r["json"] for r in zammad.received(f"/api/v1/tickets/{ticket['id']}")]
    assert updates == [{"automatic_answers": False}]

    ack, _own = await send_frames(socket, "q-2", "Hallo? Ist da jemand?")
    await drain()
    frames = await frames_until(socket, lambda fs: len(statuses(fs)) == 1)
    assert frames == [{"type": "chat.status", "id": ack["id"], "status": "sent"}]
    assert await socket.nothing_pending()  # no chat.typing at all
    assert len(bot_calls(bot)) == 1
    assert await Work.objects.filter(kind=Work.Kind.ANSWER).acount() == 1
    data = await conversation(AsyncClient(), rest_path("de", device))
    assert data["chatbot_typing"] is False
    assert len(data["messages"]) == 3
    assert len(zammad.articles(ticket["id"])) == 3


async def test_message_queued_behind_the_handover_gets_no_bot_answer(
    region: Region,
    zammad: FakeZammadServer,
    bot: FakeChatbotServer,
    settings: Any,
    sockets: list[Socket],
) -> None:
    """The user asks for a human and writes again while the bot composes the hand-over: the
    answer queued for the second message must not ask the bot (which would switch automatic
    answers back on against the user's request)."""
    settings.WORKER_POLL_INTERVAL_SECS = 0.02
    device = "flow-human-0002"
    socket = await open_socket(sockets, ws_path("de", device))
    bot.configure(fail="stall", fail_count=1, fail_on=["answer"])
    async with running_worker():
        try:
            await socket.send(
                {"type": "chat.send", "client_id": "q-1", "message": "I want to talk to a human"}
            )
            await socket.receive_type("chat.ack")
            await bot.wait_received_async(1, 10)  # the hand-over answer is being composed
            await socket.send({"type": "chat.send", "client_id": "q-2", "message": "Hallo?"})
            await socket.receive_type("chat.ack")
            assert await Work.objects.filter(kind=Work.Kind.ANSWER).acount() == 2
        finally:
            bot.release()
        await until(no_work_left, "all work done", timeout=15)
    frames = await frames_until(socket, typing_false)
    answers = [
        f["message"]
        for f in frames
        if f["type"] == "chat.message" and f["message"]["role"] == "agent"
    ]
    assert [m["content"] for m in answers] == [HUMAN_HANDOVER_ANSWER]
    assert len(bot_calls(bot)) == 1
    chat = await Chat.objects.aget(device_id=device)
    assert chat.automatic_answers is False and chat.bot_typing is False
    [ticket] = zammad.tickets()
    assert ticket["automatic_answers"] is False
    data = await conversation(AsyncClient(), rest_path("de", device))
    assert [m["automatic_answer"] for m in data["messages"]] == [False, False, True]
    assert data["chatbot_typing"] is False


async def test_counsellor_taking_over_during_the_bot_call_drops_the_late_answer(
    region: Region,
    zammad: FakeZammadServer,
    bot: FakeChatbotServer,
    capture: Capture,
    settings: Any,
) -> None:
    """While the bot composes, a counsellor switches automatic answers off in Zammad and
    replies; the webhook carries the ticket's flag. The bot's late answer is dropped and does
    not switch automatic answers back on."""
    settings.WORKER_POLL_INTERVAL_SECS = 0.02
    device = "flow-takeover-0001"
    client = AsyncClient()
    bot.configure(fail="stall", fail_count=1, fail_on=["answer"])
    async with running_worker():
        try:
            await client.post(rest_path("de", device), {"message": "Wo ist das Amt?"})
            await bot.wait_received_async(1, 10)
            await wait_for(lambda: ticket_with_article(zammad), what="the ticket")
            ticket_id = only_ticket(zammad)
            zammad.set_webhook(
                url=f"{capture.server.url}/hook",
                signature_secret=SIGNATURE_SECRET,
                trigger_on_customer=False,
            )
            async with (
                aiohttp.ClientSession() as http,
                http.put(
                    f"{zammad.url}/api/v1/tickets/{ticket_id}",
                    json={"automatic_answers": False},
                    headers={"Authorization": f"Token token={zammad.token}"},
                ) as response,
            ):
                assert response.status == 200
            zammad.agent_reply(ticket_id, "<p>Ich übernehme.</p>")
            [delivery] = capture.wait(1)
            assert (await replay(client, delivery)).status_code == 200
        finally:
            bot.release()
        await until(no_work_left, "all work done", timeout=15)
    data = await conversation(client, rest_path("de", device))
    assert [(m["role"], m["automatic_answer"]) for m in data["messages"]] == [
        ("user", False),
        ("agent", False),
    ]
    assert data["chatbot_typing"] is False
    assert (await Chat.objects.aget(device_id=device)).automatic_answers is False
    assert zammad.tickets()[0]["automatic_answers"] is False
    assert [a["subject"] for a in zammad.articles(ticket_id)] == ["app user message", None]


def ticket_with_article(zammad: FakeZammadServer) -> bool:
    return any(ticket["article_count"] for ticket in zammad.tickets())


# --- B.4: bot errors and timeouts ---------------------------------------------------------------


@pytest.mark.parametrize("failure", ["error", "timeout"])
async def test_bot_failure_clears_typing_and_posts_nothing(
    region: Region,
    zammad: FakeZammadServer,
    bot: FakeChatbotServer,
    sockets: list[Socket],
    settings: Any,
    failure: str,
) -> None:
    device = f"flow-bot-{failure}"
    if failure == "error":
        bot.configure(fail="error", fail_count=1, fail_on=["answer"])  # status: error in a 200
    else:
        settings.CHATBOT_ANSWER_TIMEOUT_SECS = 0.5
        bot.configure(fail="stall", fail_count=1, fail_on=["answer"])  # no answer until reset
    socket = await open_socket(sockets, ws_path("de", device))
    ack, _own = await send_frames(socket, "q-1", "Wo ist das Rathaus?")
    assert await socket.receive() == {"type": "chat.typing", "chatbot_typing": True}
    started = time.monotonic()
    await drain()
    elapsed = time.monotonic() - started
    frames = await frames_until(socket, typing_false)
    assert frames == [
        {"type": "chat.status", "id": ack["id"], "status": "sent"},
        {"type": "chat.typing", "chatbot_typing": False},
    ]
    assert await socket.nothing_pending()
    assert len(bot_calls(bot)) == 1
    if failure == "timeout":
        assert 0.5 <= elapsed < 5
    # Not retried: the deadline bounds an answer, and status: error is the bot's final word.
    [work] = [w async for w in Work.objects.filter(kind=Work.Kind.ANSWER)]
    assert (work.state, work.attempts) == (Work.State.DONE, 1)
    [article] = zammad.articles(only_ticket(zammad))
    assert article["sender"] == "Customer"
    data = await conversation(AsyncClient(), rest_path("de", device))
    assert data["chatbot_typing"] is False
    assert [m["id"] for m in data["messages"]] == [ack["id"]]


# --- B.4: several messages while the bot works ----------------------------------------------------


async def test_burst_before_the_answer_starts_gets_one_answer(
    region: Region, zammad: FakeZammadServer, bot: FakeChatbotServer
) -> None:
    """A message joins an answer that is queued and not started yet (``_request_answer``)."""
    client = AsyncClient()
    for text in ("eins", "zwei", "drei"):
        data = json.loads(
            (await client.post(rest_path("de", "flow-burst-0001"), {"message": text})).content
        )
        assert data["chatbot_typing"] is True
    await drain()
    calls = bot_calls(bot)
    assert len(calls) == 1
    assert [m["content"] for m in calls[0]["messages"]] == ["eins", "zwei", "drei"]
    data = await conversation(client, rest_path("de", "flow-burst-0001"))
    assert [m["automatic_answer"] for m in data["messages"]] == [False, False, False, True]
    assert data["chatbot_typing"] is False


async def test_burst_while_the_bot_is_slow_gets_at_most_two_answers(
    region: Region, zammad: FakeZammadServer, bot: FakeChatbotServer, settings: Any
) -> None:
    """What the code guarantees: a new message joins a queued answer, and a chat's answers run
    one at a time (bot lane). So a burst that starts while an answer is running gets exactly
    two bot calls: the running one, and one queued answer that every later message joins and
    that asks about all of them. Never one call per message."""
    settings.WORKER_POLL_INTERVAL_SECS = 0.02
    path = rest_path("de", "flow-burst-0002")
    client = AsyncClient()
    bot.configure(fail="stall", fail_count=1, fail_on=["answer"])
    async with running_worker():
        try:
            await client.post(path, {"message": "eins"})
            await bot.wait_received_async(1, 10)  # the first answer is running, stalled
            for text in ("zwei", "drei"):
                data = json.loads((await client.post(path, {"message": text})).content)
                assert data["chatbot_typing"] is True
            assert await Work.objects.filter(kind=Work.Kind.ANSWER).acount() == 2
        finally:
            bot.release()
        await until(no_work_left, "all work done", timeout=15)
    calls = bot_calls(bot)
    assert [[m["content"] for m in call["messages"]] for call in calls] == [
        ["eins"],
        ["eins", "zwei", "drei"],
    ]
    data = await conversation(client, path)
    assert [m["content"] for m in data["messages"] if m["automatic_answer"]] == [
        bot_answer("eins", "de"),
        bot_answer("drei", "de"),
    ]
    assert data["chatbot_typing"] is False


# --- the server process never waits on the bot ------------------------------------------------


async def ws_receive(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    check_frame(frame)
    return frame


async def ws_receive_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        frame = await ws_receive(ws)
        if frame["type"] == kind:
            return frame


@pytest.mark.e2e
async def test_server_never_waits_on_the_bot(
    live_region: Region, zammad: FakeZammadServer, bot: FakeChatbotServer
) -> None:
    """A real daphne and a real worker process; the bot never answers while we measure (its
    answer calls stall until released, longer than any 30 s delay). Another device's socket
    send -> ack and a REST POST stay fast."""
    skip_without_shared_services()
    bot.configure(fail="stall", fail_on=["answer"])
    env = server_env(CHATBOT_URL=bot.url, WORKER_POLL_INTERVAL_SECS="0.05")
    daphne = Daphne(free_port(), env)
    worker_process: WorkerProcess | None = None
    try:
        daphne.start()
        worker_process = WorkerProcess(env)
        base = f"{daphne.ws_url}/ws/v3/augsburg/de/chat"
        async with connect(f"{base}/e2e-asker-0001/") as asker:
            assert (await ws_receive(asker))["type"] == "chat.history"
            await asker.send(json.dumps({"type": "chat.send", "client_id": "a", "message": "?"}))
            assert (await ws_receive_type(asker, "chat.typing"))["chatbot_typing"] is True
            await bot.wait_received_async(1, 30)  # the worker is inside the bot call now

            async with connect(f"{base}/e2e-other-0001/") as other:
                assert (await ws_receive(other))["type"] == "chat.history"
                socket_secs = []
                for number in range(3):
                    started = time.monotonic()
                    await other.send(
                        json.dumps({"type": "chat.send", "client_id": f"o{number}", "message": "x"})
                    )
                    ack = await ws_receive_type(other, "chat.ack")
                    socket_secs.append(time.monotonic() - started)
                    assert ack["client_id"] == f"o{number}"
            rest_secs = []
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    started = time.monotonic()
                    async with http.post(
                        f"{daphne.url}/api/v3/augsburg/de/chat/e2e-rest-0001/",
                        data={"message": "x"},
                    ) as response:
                        assert response.status == 200
                        check_conversation(await response.json())
                    rest_secs.append(time.monotonic() - started)
            # Still no answer for anyone: everything above happened while the bot stalled.
            assert not await Message.objects.filter(automatic=True).aexists()
            assert await Work.objects.filter(
                kind=Work.Kind.ANSWER, state=Work.State.RUNNING
            ).aexists()
        assert max(socket_secs) < 1, socket_secs
        assert max(rest_secs) < 1, rest_secs
    finally:
        bot.configure(fail=None)
        bot.release()
        if worker_process is not None:
            worker_process.stop()
        daphne.stop()

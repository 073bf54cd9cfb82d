"""Zammad's webhook, with deliveries made by the fake Zammad's emitter (real payloads, real
signatures), captured over HTTP and replayed into the server in every order and number."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import DatabaseError
from django.test import AsyncClient

from chatserver import actions
from chatserver.asgi import application
from chatserver.errors import InvalidWebhook, NotFound, WebhookUnauthorized
from chatserver.models import Message, Region, WebhookDelivery, Work
from chatserver.publish import Outbox

from .conftest import SIGNATURE_SECRET, WEBHOOK_TOKEN, drain
from .helpers import Capture, check_conversation, check_frame

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = "webhook-device-0001"
CHAT = f"/api/v3/augsburg/de/chat/{DEVICE}/"
HOOK = f"/api/v3/webhook/zammad/?token={WEBHOOK_TOKEN}"


async def replay(client: AsyncClient, delivery: dict[str, Any], path: str = HOOK) -> Any:
    headers = delivery["headers"]
    forwarded = {
        name: value
        for name, value in headers.items()
        if name.lower() in {"x-zammad-delivery", "x-hub-signature", "x-zammad-trigger"}
    }
    return await client.post(
        path, delivery["body"], content_type="application/json", headers=forwarded
    )


async def open_ticket(client: AsyncClient, zammad: Any) -> int:
    await client.post(CHAT, {"message": "Hallo"})
    await drain()
    [ticket] = zammad.tickets()
    return int(ticket["id"])


async def agent_messages(client: AsyncClient) -> list[str]:
    data = json.loads((await client.get(CHAT)).content)
    check_conversation(data)
    return [m["content"] for m in data["messages"] if m["role"] == "agent"]


async def test_agent_reply_arrives_through_signed_webhook(
    region: Region, zammad: Any, capture: Capture
) -> None:
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    zammad.agent_reply(ticket_id, "<p>Guten Tag! <script>alert(1)</script><b>Wie</b></p>")
    [delivery] = capture.wait(1)
    assert delivery["headers"]["X-Hub-Signature"].startswith("sha1=")
    answer = await replay(client, delivery)
    assert answer.status_code == 200
    data = json.loads((await client.get(CHAT)).content)
    agent = data["messages"][-1]
    assert agent["role"] == "agent"
    assert agent["user_is_author"] is False
    assert agent["automatic_answer"] is False
    assert agent["status"] == "sent"
    assert agent["content"] == "<p>Guten Tag! <b>Wie</b></p>"


async def test_duplicate_delivery_is_processed_once(
    region: Region, zammad: Any, capture: Capture
) -> None:
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    zammad.agent_reply(ticket_id, "<p>Once</p>")
    [delivery] = capture.wait(1)
    for _ in range(3):
        assert (await replay(client, delivery)).status_code == 200
    assert await agent_messages(client) == ["<p>Once</p>"]
    outcomes = [d.outcome async for d in WebhookDelivery.objects.all()]
    assert outcomes == ["message"]


async def test_reordered_late_and_lost_deliveries_give_every_article_once(
    region: Region, zammad: Any, capture: Capture
) -> None:
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    for text in ("one", "two", "three", "four"):
        zammad.agent_reply(ticket_id, f"<p>{text}</p>")
    deliveries = capture.wait(4)
    # "two" never arrives; "four" comes first, then "three", then "one", then "four" again.
    for index in (3, 2, 0, 3):
        assert (await replay(client, deliveries[index])).status_code == 200
    await drain()  # the reconciliation that "four" (listing "two") asked for
    contents = sorted(await agent_messages(client))
    assert contents == sorted(f"<p>{t}</p>" for t in ("one", "two", "three", "four"))
    await drain()
    assert len(await agent_messages(client)) == 4


async def test_empty_article_reconciles(region: Region, zammad: Any, capture: Capture) -> None:
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    zammad.set_delivery_mode("empty_article")
    zammad.agent_reply(ticket_id, "<p>From an empty webhook</p>")
    [delivery] = capture.wait(1)
    assert json.loads(delivery["body"])["article"] == {}
    assert (await replay(client, delivery)).status_code == 200
    assert await agent_messages(client) == []
    await drain()
    assert await agent_messages(client) == ["<p>From an empty webhook</p>"]
    assert (await replay(client, delivery)).status_code == 200
    await drain()
    assert await agent_messages(client) == ["<p>From an empty webhook</p>"]


async def test_own_internal_and_unknown_articles_are_ignored(
    region: Region, zammad: Any, capture: Capture
) -> None:
    client = AsyncClient()
    zammad.set_webhook(
        url=f"{capture.server.url}/hook",
        signature_secret=SIGNATURE_SECRET,
        trigger_on_customer=True,
    )
    ticket_id = await open_ticket(client, zammad)
    zammad.agent_reply(ticket_id, "<p>internal note</p>", internal=True)
    deliveries = capture.wait(2)  # the server's own customer article, then the note
    for delivery in deliveries:
        assert (await replay(client, delivery)).status_code == 200
    await drain()
    data = json.loads((await client.get(CHAT)).content)
    assert [m["content"] for m in data["messages"]] == ["Hallo"]
    outcomes = sorted([d.outcome async for d in WebhookDelivery.objects.all()])
    assert outcomes == ["ignored_internal", "ignored_own"]


async def test_unknown_ticket_is_acknowledged(region: Region, zammad: Any) -> None:
    client = AsyncClient()
    raw = json.dumps({"ticket": {"id": 424242, "article_ids": []}, "article": {}}).encode()
    answer = await client.post(
        HOOK, raw, content_type="application/json", headers={"X-Hub-Signature": _sign(raw)}
    )
    assert answer.status_code == 200
    assert await Message.objects.acount() == 0


def _sign(raw: bytes) -> str:
    return "sha1=" + hmac.new(SIGNATURE_SECRET.encode(), raw, hashlib.sha1).hexdigest()


async def test_wrong_token_and_bad_signature_touch_nothing(
    region: Region, zammad: Any, capture: Capture
) -> None:
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    zammad.agent_reply(ticket_id, "<p>secret</p>")
    [delivery] = capture.wait(1)
    for path in ("/api/v3/webhook/zammad/", "/api/v3/webhook/zammad/?token=wrong"):
        answer = await replay(client, delivery, path)
        assert answer.status_code == 404
        assert json.loads(answer.content) == {"error": "Not found."}
    forged = dict(delivery, headers=dict(delivery["headers"], **{"X-Hub-Signature": "sha1=00"}))
    answer = await replay(client, forged)
    assert answer.status_code == 401
    unsigned = dict(delivery, headers={"X-Zammad-Delivery": "x"})
    assert (await replay(client, unsigned)).status_code == 401
    assert await WebhookDelivery.objects.acount() == 0
    assert await agent_messages(client) == []
    assert await Work.objects.filter(kind="sync_ticket").acount() == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"{}",
        b'{"ticket": {}}',
        b'{"ticket": {"id": "7"}}',
        b'{"ticket": {"id": 7}, "article": [1]}',
        b'{"ticket": {"id": 7}, "article": {"x": 1}}',
        b"\xff\xfe",
    ],
)
async def test_malformed_bodies_are_400(region: Region, raw: bytes) -> None:
    client = AsyncClient()
    answer = await client.post(
        HOOK, raw, content_type="application/json", headers={"X-Hub-Signature": _sign(raw)}
    )
    assert answer.status_code == 400
    assert set(json.loads(answer.content)) == {"error"}
    assert await WebhookDelivery.objects.acount() == 0


async def test_control_characters_in_an_attachment_are_cleaned_not_refused(
    live_region: Region, zammad: Any, capture: Capture
) -> None:
    """A file name with a NUL, as pasted into Zammad: PostgreSQL refuses NUL in JSON, which
    failed every delivery of the reply, so it never arrived."""
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    zammad.agent_reply(ticket_id, "<p>see attached</p>")
    [delivery] = capture.wait(1)
    payload = json.loads(delivery["body"])
    payload["article"]["attachments"] = [
        {
            "id": 5,
            "filename": "a\u0000b.pdf",
            "size": "3",
            "preferences": {"Content-Type": "\u0000"},
        }
    ]
    raw = json.dumps(payload).encode()
    headers = dict(delivery["headers"], **{"X-Hub-Signature": _sign(raw)})
    answer = await replay(client, dict(delivery, body=raw, headers=headers))
    assert json.loads(answer.content) == {"status": "ok", "outcome": "message"}
    messages = json.loads((await client.get(CHAT)).content)["messages"]
    [attachment] = messages[-1]["attachments"]
    assert (attachment["name"], attachment["mime_type"]) == ("ab.pdf", "application/octet-stream")


async def test_oversized_body_is_refused(region: Region, settings: Any) -> None:
    settings.WEBHOOK_MAX_BODY_BYTES = 1000
    raw = json.dumps({"ticket": {"id": 1}, "padding": "x" * 2000}).encode()
    answer = await AsyncClient().post(
        HOOK, raw, content_type="application/json", headers={"X-Hub-Signature": _sign(raw)}
    )
    assert answer.status_code == 413


async def test_deliveries_are_remembered_for_the_retention_window(
    region: Region, settings: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from chatserver.worker import purge_old_records

    settings.WEBHOOK_DELIVERY_RETENTION_DAYS = 7
    now = timezone.now()
    old = await WebhookDelivery.objects.acreate(
        region=region, delivery_id="old", outcome="message", received_at=now - timedelta(days=8)
    )
    recent = await WebhookDelivery.objects.acreate(
        region=region, delivery_id="recent", outcome="message", received_at=now - timedelta(days=6)
    )
    deliveries, _ = await sync_to_async(purge_old_records)()
    assert deliveries == 1
    remaining = [d.delivery_id async for d in WebhookDelivery.objects.all()]
    assert remaining == [recent.delivery_id]
    assert old.delivery_id not in remaining


async def _agent_pushes(communicator: WebsocketCommunicator, count: int) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        frame = json.loads(await communicator.receive_from(timeout=10))
        check_frame(frame)
        if frame["type"] == "chat.message" and frame["message"]["role"] == "agent":
            frames.append(frame["message"])
    return frames


async def test_concurrent_deliveries_are_written_in_batches_once_each_in_order(
    live_region: Region, zammad: Any, capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zammad's retries and a burst at once: every reply stored once, pushed once, in order."""
    batches: list[int] = []
    apply = actions._webhooks._apply

    async def counting(items: list[actions.Delivery]) -> Any:
        batches.append(len(items))
        return await apply(items)

    monkeypatch.setattr(actions._webhooks, "_apply", counting)
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    communicator = WebsocketCommunicator(application, f"/ws/v3/augsburg/de/chat/{DEVICE}/")
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    json.loads(await communicator.receive_from(timeout=10))  # chat.history
    texts = [f"<p>reply {number}</p>" for number in range(12)]
    for text in texts:
        zammad.agent_reply(ticket_id, text)
    deliveries = await capture.wait_async(len(texts))
    # Each delivery twice (Zammad retries), all at once.
    answers = await asyncio.gather(*(replay(client, d) for d in deliveries + deliveries))
    assert [answer.status_code for answer in answers] == [200] * 2 * len(texts)
    outcomes = sorted(json.loads(answer.content)["outcome"] for answer in answers)
    assert outcomes.count("message") == len(texts)
    assert set(outcomes) <= {"message", "duplicate", "known"}
    assert len(batches) < 2 * len(texts), "the deliveries were not batched"
    pushed = await _agent_pushes(communicator, len(texts))
    assert sorted(message["content"] for message in pushed) == sorted(texts)
    ids = [message["id"] for message in pushed]
    assert ids == sorted(ids), "pushes out of order"
    assert await agent_messages(client) == [message["content"] for message in pushed]
    await communicator.disconnect()


async def test_a_delivery_that_fails_in_a_batch_fails_alone(
    live_region: Region, zammad: Any, capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    for text in ("fine", "poison", "also fine"):
        zammad.agent_reply(ticket_id, f"<p>{text}</p>")
    deliveries = await capture.wait_async(3)
    ticket_change = actions._ticket_change

    def failing(chat: Any, change: Any, messaged: set[int]) -> Any:
        if "poison" in str(change.article.get("body")):
            raise DatabaseError("value out of range")  # as a database would refuse a row
        return ticket_change(chat, change, messaged)

    monkeypatch.setattr(actions, "_ticket_change", failing)
    answers = await asyncio.gather(*(replay(client, d) for d in deliveries))
    statuses = {
        json.loads(d["body"])["article"]["body"]: answer.status_code
        for d, answer in zip(deliveries, answers, strict=True)
    }
    assert statuses == {"<p>fine</p>": 200, "<p>poison</p>": 503, "<p>also fine</p>": 200}
    assert sorted(await agent_messages(client)) == ["<p>also fine</p>", "<p>fine</p>"]
    # Zammad retries the failed one; once the database takes it, it is stored.
    monkeypatch.setattr(actions, "_ticket_change", ticket_change)
    [poison] = [d for d in deliveries if b"poison" in d["body"]]
    assert (await replay(client, poison)).status_code == 200
    assert (await agent_messages(client)).count("<p>poison</p>") == 1


async def test_one_batch_of_good_bad_and_repeated_deliveries(
    live_region: Region, zammad: Any, capture: Capture
) -> None:
    """Every kind of delivery in one batch (as a burst brings them): each gets its own answer,
    and only the good ones change anything."""
    client = AsyncClient()
    ticket_id = await open_ticket(client, zammad)
    for text in ("first", "second"):
        zammad.agent_reply(ticket_id, f"<p>{text}</p>")
    first, second = await capture.wait_async(2)

    def delivery(captured: dict[str, Any], **changes: Any) -> actions.Delivery:
        headers = captured["headers"]
        fields = {
            "token": WEBHOOK_TOKEN,
            "body": captured["body"],
            "signature": headers["X-Hub-Signature"],
            "delivery_id": headers["X-Zammad-Delivery"],
            **changes,
        }
        return actions.Delivery(**fields)

    malformed = b'{"ticket": {"id": "7"}}'
    unknown = json.dumps({"ticket": {"id": ticket_id + 1000}, "article": {}}).encode()
    batch = [
        delivery(first, token="wrong"),
        delivery(first, signature="sha1=00"),
        delivery(first, body=malformed, signature=_sign(malformed), delivery_id="m"),
        delivery(first),
        delivery(first),  # Zammad's retry, in the same batch
        delivery(second, delivery_id=None),
        delivery(second, delivery_id="again"),  # the same article, another delivery id
        delivery(first, body=unknown, signature=_sign(unknown), delivery_id="u"),
    ]
    outcomes = await sync_to_async(actions._apply_webhooks)(batch, Outbox())
    assert [
        type(outcome) if isinstance(outcome, Exception) else outcome for outcome in outcomes
    ] == [
        NotFound,
        WebhookUnauthorized,
        InvalidWebhook,
        "message",
        "duplicate",
        "message",
        "known",
        "unknown_ticket",
    ]
    assert await agent_messages(client) == ["<p>first</p>", "<p>second</p>"]
    recorded = [d.outcome async for d in WebhookDelivery.objects.order_by("id")]
    assert recorded == ["message", "message", "known", "unknown_ticket"]

"""The Zammad client against the fake Zammad over real HTTP: every call and the error mapping."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatserver import zammad
from chatserver.errors import PermanentUpstreamError, TemporaryUpstreamError, UpstreamError
from chatserver.fakes.zammad import INTEGRATION_LOGIN, FakeZammad, FakeZammadServer
from chatserver.zammad import OutgoingAttachment, ZammadClient, close_sessions

TOKEN = "client-test-token-4f1d"
GROUP = "integreat-chat"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# Research 4.1: every key of a REST article, in Zammad's order.
ARTICLE_KEYS = [
    "id",
    "ticket_id",
    "type_id",
    "sender_id",
    "from",
    "to",
    "cc",
    "subject",
    "reply_to",
    "message_id",
    "message_id_md5",
    "in_reply_to",
    "content_type",
    "references",
    "body",
    "internal",
    "preferences",
    "updated_by_id",
    "created_by_id",
    "origin_by_id",
    "created_at",
    "updated_at",
    "attachments",
    "type",
    "sender",
    "created_by",
    "updated_by",
    "time_unit",
]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeZammadServer]:
    server = FakeZammad.start_threaded(token=TOKEN)
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server: FakeZammadServer) -> Iterator[FakeZammadServer]:
    fake_server.reset()
    yield fake_server
    fake_server.reset()


@pytest.fixture
async def client(fake: FakeZammadServer) -> AsyncIterator[ZammadClient]:
    yield ZammadClient(fake.url, TOKEN, timeout_secs=2)
    await close_sessions()


def error_count(kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "chat_upstream_errors_total", {"service": "zammad", "kind": kind}
    )
    return value or 0.0


def call_count() -> float:
    return REGISTRY.get_sample_value("chat_upstream_seconds_count", {"service": "zammad"}) or 0.0


async def open_ticket(client: ZammadClient) -> dict[str, Any]:
    return await client.create_ticket(
        title="[Integreat Chat] [de] device-1", group=GROUP, customer=INTEGRATION_LOGIN
    )


# --- every call --------------------------------------------------------------------------------


async def test_me_is_the_integration_user_and_headers_are_sent(
    client: ZammadClient, fake: FakeZammadServer
) -> None:
    calls_before = call_count()

    me = await client.me()

    assert me["login"] == INTEGRATION_LOGIN
    assert me["id"] == 3
    assert call_count() == calls_before + 1
    (request,) = fake.received("/api/v1/users/me")
    assert request["method"] == "GET"
    assert request["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in request["headers"]  # the fake never keeps the token


async def test_ticket_create_show_update(client: ZammadClient, fake: FakeZammadServer) -> None:
    created = await open_ticket(client)

    assert isinstance(created["id"], int)
    assert isinstance(created["number"], str)
    assert created["state_id"] == 1
    assert created["article_ids"] == []
    assert created["automatic_answers"] is True
    assert created["evaluation_consent"] is False
    assert TIMESTAMP.match(created["created_at"])
    (request,) = fake.received("/api/v1/tickets")
    assert request["json"] == {
        "title": "[Integreat Chat] [de] device-1",
        "group": GROUP,
        "customer": INTEGRATION_LOGIN,
    }

    shown = await client.get_ticket(created["id"])
    assert shown["title"] == created["title"]
    assert "article_ids" not in shown  # as in the recorded GET /tickets/{id}

    updated = await client.update_ticket(
        created["id"], {"evaluation_consent": True, "automatic_answers": False}
    )
    assert updated["evaluation_consent"] is True
    assert updated["automatic_answers"] is False
    assert updated["close_at"] is None

    closed = await client.update_ticket(created["id"], {"state": "closed"})
    assert closed["state_id"] == 4
    assert TIMESTAMP.match(closed["close_at"])


async def test_create_article_and_list_articles(
    client: ZammadClient, fake: FakeZammadServer
) -> None:
    ticket = await open_ticket(client)
    marker = {"integreat_chat": {"message_id": 42}}

    article = await client.create_article(
        ticket_id=ticket["id"],
        body="<p>Hallo</p>",
        sender="Customer",
        subject="app user message",
        internal=False,
        preferences=marker,
    )
    reply = fake.agent_reply(ticket["id"], "<p>Guten Tag</p>")
    translation = await client.create_article(
        ticket_id=ticket["id"],
        body="Hello",
        sender="Agent",
        subject="automatically generated message",
        internal=True,
    )

    assert list(article) == ARTICLE_KEYS
    assert article["sender"] == "Customer"
    assert article["type"] == "web"
    assert article["content_type"] == "text/html"
    assert article["preferences"] == marker
    assert article["created_by"] == INTEGRATION_LOGIN
    assert TIMESTAMP.match(article["created_at"])
    (sent, _) = [r["json"] for r in fake.received("/api/v1/ticket_articles")]
    assert sent == {
        "ticket_id": ticket["id"],
        "body": "<p>Hallo</p>",
        "content_type": "text/html",
        "type": "web",
        "internal": False,
        "sender": "Customer",
        "subject": "app user message",
        "preferences": marker,
    }

    articles = await client.list_articles(ticket["id"])

    assert [a["id"] for a in articles] == [article["id"], reply["id"], translation["id"]]
    assert [a["sender"] for a in articles] == ["Customer", "Agent", "Agent"]
    assert [a["internal"] for a in articles] == [False, False, True]
    assert articles[0]["preferences"] == marker


async def test_attachment_upload_then_streamed_download_is_byte_identical(
    client: ZammadClient,
) -> None:
    ticket = await open_ticket(client)
    content = os.urandom(300 * 1024)  # several socket reads, so chunks really stream
    article = await client.create_article(
        ticket_id=ticket["id"],
        body="photo",
        sender="Customer",
        subject="app user message",
        internal=False,
        attachments=[OutgoingAttachment("photo.jpg", content, "image/jpeg")],
    )
    (attachment,) = article["attachments"]
    assert attachment["filename"] == "photo.jpg"
    assert attachment["size"] == str(len(content))
    assert attachment["preferences"] == {"Mime-Type": "image/jpeg"}

    chunks = []
    async with client.open_attachment(ticket["id"], article["id"], attachment["id"]) as stream:
        assert stream.content_type == "image/jpeg"
        assert stream.content_length == len(content)
        async for chunk in stream.chunks():
            chunks.append(chunk)

    assert len(chunks) > 1
    assert b"".join(chunks) == content


async def test_attachment_of_another_article_is_refused(client: ZammadClient) -> None:
    ticket = await open_ticket(client)
    article = await client.create_article(
        ticket_id=ticket["id"],
        body="file",
        sender="Customer",
        subject="app user message",
        internal=False,
        attachments=[OutgoingAttachment("a.txt", b"hello", "text/plain")],
    )
    attachment_id = article["attachments"][0]["id"]

    with pytest.raises(PermanentUpstreamError) as wrong_ticket:
        async with client.open_attachment(ticket["id"] + 1, article["id"], attachment_id):
            pass
    with pytest.raises(PermanentUpstreamError) as unknown:
        async with client.open_attachment(ticket["id"], article["id"], attachment_id + 99):
            pass

    assert wrong_ticket.value.status == 403
    assert "article_id/ticket_id is not matching" in wrong_ticket.value.detail
    assert unknown.value.status == 404


# --- error mapping -----------------------------------------------------------------------------


def assert_plain(error: UpstreamError) -> None:
    assert error.service == "zammad"
    assert TOKEN not in str(error)
    assert "<" not in error.detail  # never a piece of an HTML page


async def test_wrong_token_is_permanent_401(fake: FakeZammadServer) -> None:
    wrong = "wrong-token-9c2e"
    client = ZammadClient(fake.url, wrong, timeout_secs=2)
    before = error_count("http_4xx")
    try:
        with pytest.raises(PermanentUpstreamError) as caught:
            await client.me()
    finally:
        await close_sessions()

    assert caught.value.status == 401
    assert "Can't find User for Token" in caught.value.detail
    assert wrong not in str(caught.value)
    assert wrong not in repr(client)
    assert error_count("http_4xx") == before + 1


async def test_missing_token_is_permanent_403(fake: FakeZammadServer) -> None:
    client = ZammadClient(fake.url, "", timeout_secs=2)
    try:
        with pytest.raises(PermanentUpstreamError) as caught:
            await client.me()
    finally:
        await close_sessions()

    assert caught.value.status == 403
    assert "Authentication required" in caught.value.detail


async def test_validation_error_is_permanent_422(client: ZammadClient) -> None:
    with pytest.raises(PermanentUpstreamError) as caught:
        await client.create_ticket(title="t", group="no-such-group", customer=INTEGRATION_LOGIN)

    assert caught.value.status == 422
    assert caught.value.detail == (
        "POST /api/v1/tickets answered 422: No lookup value found for 'group': \"no-such-group\""
    )
    assert_plain(caught.value)


async def test_unknown_ticket_is_permanent_404(client: ZammadClient) -> None:
    with pytest.raises(PermanentUpstreamError) as caught:
        await client.get_ticket(999)

    assert caught.value.status == 404
    assert not caught.value.temporary


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (500, None, "http_5xx"),
        (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", "http_5xx"),
        (429, "Retry later", "http_4xx"),  # rate limits pass: retried, not given up
    ],
)
async def test_server_errors_are_temporary(
    client: ZammadClient, fake: FakeZammadServer, status: int, body: str | None, kind: str
) -> None:
    fake.fail_next(1, status=status, body=body)
    before = error_count(kind)

    with pytest.raises(TemporaryUpstreamError) as caught:
        await client.me()

    assert caught.value.status == status
    assert caught.value.temporary
    assert error_count(kind) == before + 1
    assert_plain(caught.value)
    assert (await client.me())["login"] == INTEGRATION_LOGIN  # only the next call failed


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("<!doctype html><title>Maintenance</title>", "text/html"),
        ('{"id": 3, "login": "trunc', "application/json"),
        ('{"error": "not a user"}', "application/json"),
        ("[]", "application/json"),
    ],
)
async def test_garbage_or_wrongly_shaped_answers_are_temporary(
    client: ZammadClient, fake: FakeZammadServer, body: str, content_type: str
) -> None:
    fake.fail_next(1, status=200, body=body, content_type=content_type)
    before = error_count("bad_response")

    with pytest.raises(TemporaryUpstreamError) as caught:
        await client.me()

    assert caught.value.status is None
    assert error_count("bad_response") == before + 1
    assert_plain(caught.value)


@pytest.mark.parametrize(
    "body", ['{"articles": []}', '[{"id": "101"}]', "[1, 2]", '[{"id": true}]']
)
async def test_article_list_must_be_a_list_of_objects_with_int_ids(
    client: ZammadClient, fake: FakeZammadServer, body: str
) -> None:
    fake.fail_next(1, status=200, body=body, content_type="application/json")

    with pytest.raises(TemporaryUpstreamError, match="expected a list of articles"):
        await client.list_articles(1)


async def test_stall_past_the_timeout_is_temporary(fake: FakeZammadServer) -> None:
    client = ZammadClient(fake.url, TOKEN, timeout_secs=0.2)
    fake.fail_next(1, status=None, stall_secs=10)
    before = error_count("timeout")
    started = time.monotonic()
    try:
        with pytest.raises(TemporaryUpstreamError) as caught:
            await client.me()
    finally:
        await close_sessions()

    assert time.monotonic() - started < 2
    assert "no answer in time" in caught.value.detail
    assert error_count("timeout") == before + 1


async def test_down_is_temporary_and_coming_back_works(
    client: ZammadClient, fake: FakeZammadServer
) -> None:
    fake.go_down()
    before = error_count("connection")

    with pytest.raises(TemporaryUpstreamError) as caught:
        await client.me()

    assert "connection failed" in caught.value.detail
    assert error_count("connection") == before + 1
    fake.come_back()
    assert (await client.me())["login"] == INTEGRATION_LOGIN


async def test_nothing_listening_is_temporary(fake: FakeZammadServer) -> None:
    from chatserver.fakes.base import free_port

    client = ZammadClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout_secs=2)
    try:
        with pytest.raises(TemporaryUpstreamError):
            await client.get_ticket(1)
    finally:
        await close_sessions()


async def test_failed_download_is_a_typed_error(
    client: ZammadClient, fake: FakeZammadServer
) -> None:
    fake.fail_next(1, status=503, path_prefix="/api/v1/ticket_attachment/")

    with pytest.raises(TemporaryUpstreamError) as caught:
        async with client.open_attachment(1, 101, 501):
            pass

    assert caught.value.status == 503


# --- sessions and settings ---------------------------------------------------------------------


async def test_one_session_per_loop_closed_by_close_sessions(client: ZammadClient) -> None:
    await client.me()
    first = zammad._session()
    await client.me()
    assert zammad._session() is first

    def other_loop_session() -> object:
        async def grab() -> object:
            session = zammad._session()
            await close_sessions()
            return session

        return asyncio.run(grab())

    assert await asyncio.to_thread(other_loop_session) is not first

    await close_sessions()
    assert first.closed
    assert zammad._session() is not first


async def test_timeout_comes_from_settings(fake: FakeZammadServer, settings: Any) -> None:
    settings.ZAMMAD_TIMEOUT_SECS = 3.5

    assert ZammadClient(fake.url, TOKEN).timeout_secs == 3.5
    assert ZammadClient(fake.url, TOKEN, timeout_secs=0.5).timeout_secs == 0.5

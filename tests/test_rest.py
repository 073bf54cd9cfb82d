"""REST v3, row by row of wire-contract.md section 2, against real PostgreSQL and the fake
Zammad over real HTTP (the worker runs in the test, by ``drain``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.test import AsyncClient

from chatserver.models import BetaRoll, Chat, Message, Region, Work

from .conftest import ZAMMAD_TOKEN, amake_region, drain
from .helpers import check_conversation

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = "3f1c7d2e-8b4a-4c1e-9d2f-0a1b2c3d4e5f"
CHAT = f"/api/v3/augsburg/de/chat/{DEVICE}/"
LEGACY = f"/augsburg/de/wp-json/extensions/v3/chat/{DEVICE}/"


@pytest.fixture
def client() -> AsyncClient:
    return AsyncClient()


def body(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.content)
    return data


# --- is_chat_enabled ----------------------------------------------------------------------------


async def test_is_chat_enabled_rolls_once_per_device(client: AsyncClient, region: Region) -> None:
    await Region.objects.filter(pk=region.pk).aupdate(beta_percentage=50)
    first = body(await client.get(f"/api/v3/augsburg/{DEVICE}/is_chat_enabled/"))
    for _ in range(5):
        again = body(await client.get(f"/api/v3/augsburg/{DEVICE}/is_chat_enabled/"))
        assert again == first
    assert set(first) == {"is_chat_enabled"}
    assert await BetaRoll.objects.filter(device_id=DEVICE).acount() == 1


async def test_is_chat_enabled_percentages(client: AsyncClient, region: Region) -> None:
    assert body(await client.get(f"/api/v3/augsburg/{DEVICE}/is_chat_enabled/")) == {
        "is_chat_enabled": True
    }
    await Region.objects.filter(pk=region.pk).aupdate(beta_percentage=0)
    answer = await client.get("/api/v3/augsburg/other-device/is_chat_enabled/")
    assert body(answer) == {"is_chat_enabled": False}


async def test_is_chat_enabled_unknown_and_unconfigured(
    client: AsyncClient, region: Region
) -> None:
    answer = await client.get(f"/api/v3/nowhere/{DEVICE}/is_chat_enabled/")
    assert answer.status_code == 404
    assert body(answer) == {"error": "Not found."}
    await Region.objects.filter(pk=region.pk).aupdate(zammad_token="")
    answer = await client.get(f"/api/v3/augsburg/{DEVICE}/is_chat_enabled/")
    assert answer.status_code == 200
    assert body(answer) == {"is_chat_enabled": False}


# --- chat GET and POST ----------------------------------------------------------------------


async def test_get_without_chat_is_404(client: AsyncClient, region: Region) -> None:
    answer = await client.get(CHAT)
    assert answer.status_code == 404
    assert body(answer) == {"error": "Chat not found."}
    assert answer["Access-Control-Allow-Origin"] == "*"


async def test_post_creates_chat_and_forwards_to_zammad(
    client: AsyncClient, region: Region, zammad: Any
) -> None:
    answer = await client.post(CHAT, {"message": "Hallo, ich brauche Hilfe <b>bitte</b>"})
    assert answer.status_code == 200
    data = body(answer)
    check_conversation(data)
    [message] = data["messages"]
    assert message["role"] == "user"
    assert message["user_is_author"] is True
    assert message["automatic_answer"] is False
    assert message["content"] == "Hallo, ich brauche Hilfe &lt;b&gt;bitte&lt;/b&gt;"
    assert message["status"] == "pending"
    assert data["chatbot_typing"] is False
    assert data["evaluation_consent"] is False

    await drain()
    [ticket] = zammad.tickets()
    assert ticket["title"] == f"[Integreat Chat] [de] {DEVICE}"
    [article] = zammad.articles(ticket["id"])
    assert article["sender"] == "Customer"
    assert article["type"] == "web"
    assert article["subject"] == "app user message"
    assert article["content_type"] == "text/html"
    assert article["internal"] is False
    assert article["body"] == message["content"]

    data = body(await client.get(CHAT))
    check_conversation(data)
    assert data["messages"][0]["status"] == "sent"
    assert data["ticket_url"] == f"{zammad.url}/#ticket/zoom/{ticket['id']}"


async def test_post_forms_json_and_legacy_alias(client: AsyncClient, region: Region) -> None:
    multipart = await client.post(CHAT, {"message": "one"})
    urlencoded = await client.post(
        CHAT, "message=two", content_type="application/x-www-form-urlencoded"
    )
    as_json = await client.post(CHAT, {"message": "three"}, content_type="application/json")
    legacy = await client.post(LEGACY, {"message": "four"})
    for answer in (multipart, urlencoded, as_json, legacy):
        assert answer.status_code == 200, answer.content
    data = body(await client.get(LEGACY))
    check_conversation(data)
    assert [m["content"] for m in data["messages"]] == ["one", "two", "three", "four"]


async def test_client_id_and_idempotency_key_never_double(
    client: AsyncClient, region: Region, zammad: Any
) -> None:
    first = body(await client.post(CHAT, {"message": "once", "client_id": "c-1"}))
    again = body(await client.post(CHAT, {"message": "once", "client_id": "c-1"}))
    assert first == again
    header = body(await client.post(CHAT, {"message": "twice"}, headers={"Idempotency-Key": "k-1"}))
    header_again = body(
        await client.post(CHAT, {"message": "twice"}, headers={"Idempotency-Key": "k-1"})
    )
    assert header == header_again
    assert await Message.objects.acount() == 2
    await drain()
    [ticket] = zammad.tickets()
    assert [a["body"] for a in zammad.articles(ticket["id"])] == ["once", "twice"]


async def test_after_and_etag(client: AsyncClient, region: Region) -> None:
    await client.post(CHAT, {"message": "first"})
    posted = body(await client.post(CHAT, {"message": "second"}))
    first_id = posted["messages"][0]["id"]
    newer = body(await client.get(CHAT, {"after": str(first_id)}))
    assert [m["content"] for m in newer["messages"]] == ["second"]
    answer = await client.get(CHAT)
    etag = answer["ETag"]
    unchanged = await client.get(CHAT, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    await client.post(CHAT, {"message": "third"})
    changed = await client.get(CHAT, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed["ETag"] != etag


async def test_consent_only(client: AsyncClient, region: Region, zammad: Any) -> None:
    answer = await client.post(CHAT, {"evaluation_consent": "true"})
    assert answer.status_code == 404
    assert body(answer) == {"error": "Chat not found."}
    await client.post(CHAT, {"message": "hello"})
    answer = await client.post(CHAT, {"evaluation_consent": "true"})
    assert answer.status_code == 200
    assert body(answer)["evaluation_consent"] is True
    assert len(body(answer)["messages"]) == 1
    await drain()
    [ticket] = zammad.tickets()
    assert zammad.fake.tickets[ticket["id"]]["evaluation_consent"] is True


async def test_zammad_down_gives_pending_then_delivers(
    client: AsyncClient, region: Region, zammad: Any
) -> None:
    zammad.go_down()
    data = body(await client.post(CHAT, {"message": "while down"}))
    assert data["messages"][0]["status"] == "pending"
    await drain()
    assert await Message.objects.filter(status="pending").acount() == 1
    work = await Work.objects.aget(kind="forward_message")
    assert work.state == "queued" and work.attempts == 1 and "zammad" in work.last_error
    zammad.come_back()
    await Work.objects.aupdate(run_after=work.created_at)  # the retry, now
    await drain()
    [ticket] = zammad.tickets()
    assert [a["body"] for a in zammad.articles(ticket["id"])] == ["while down"]
    assert body(await client.get(CHAT))["messages"][0]["status"] == "sent"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        (f"/api/v3/nowhere/de/chat/{DEVICE}/", 404, "Not found."),
        (f"/api/v3/augsburg/DE!/chat/{DEVICE}/", 404, "Not found."),
        (f"/api/v3/augsburg/deutsch/chat/{DEVICE}/", 404, "Not found."),
        (f"/api/v3/augsburg/de/chat/{'a' * 65}/", 404, "Not found."),
        ("/api/v3/augsburg/de/chat/bad%00id/", 404, "Not found."),
        ("/api/v3/augsburg/de/chat/bad/id/", 404, "Not found."),
        ("/api/v3/augsburg/de/chat/bad.id/", 404, "Not found."),
    ],
)
async def test_bad_paths(
    client: AsyncClient, region: Region, path: str, status: int, error: str
) -> None:
    for method in (client.get, client.post):
        answer = await method(path, {"message": "x"} if method == client.post else None)
        assert answer.status_code == status, path
        assert body(answer) == {"error": error}
    assert await Chat.objects.acount() == 0


@pytest.mark.parametrize(
    "fields",
    [{}, {"message": ""}, {"message": "   \n "}, {"message": "a" * 10_001}],
)
async def test_bad_bodies_store_nothing(
    client: AsyncClient, region: Region, zammad: Any, fields: dict[str, str]
) -> None:
    answer = await client.post(CHAT, fields)
    assert answer.status_code == 400
    assert set(body(answer)) == {"error"}
    assert await Message.objects.acount() == 0
    await drain()
    assert zammad.received("/api/v1") == []


async def test_message_of_10000_characters_is_fine(client: AsyncClient, region: Region) -> None:
    answer = await client.post(CHAT, {"message": "a" * 10_000})
    assert answer.status_code == 200


async def test_unconfigured_region_is_503(client: AsyncClient, region: Region, zammad: Any) -> None:
    await amake_region(zammad.url, slug="artland", webhook_token="other", zammad_token="")
    for method in (client.get, client.post):
        answer = await method(f"/api/v3/artland/de/chat/{DEVICE}/")
        assert answer.status_code == 503
        assert body(answer) == {"error": "No chat server is configured for your region."}
    await Region.objects.filter(slug="augsburg").aupdate(chat_enabled=False)
    assert (await client.get(CHAT)).status_code == 503


async def test_expired_chat_is_404_and_next_post_opens_a_new_one(
    client: AsyncClient, region: Region, zammad: Any
) -> None:
    await client.post(CHAT, {"message": "old"})
    await drain()
    old = await Chat.objects.aget()
    await Chat.objects.filter(pk=old.pk).aupdate(expires_at=old.created_at)
    assert (await client.get(CHAT)).status_code == 404
    data = body(await client.post(CHAT, {"message": "new"}))
    assert [m["content"] for m in data["messages"]] == ["new"]
    await drain()
    assert len(zammad.tickets()) == 2


async def test_zammad_token_wrong_fails_message_for_good(
    client: AsyncClient, zammad: Any, db: Any
) -> None:
    await amake_region(zammad.url, zammad_token="wrong-" + ZAMMAD_TOKEN)
    data = body(await client.post(CHAT, {"message": "hello"}))
    assert data["messages"][0]["status"] == "pending"
    await drain()
    data = body(await client.get(CHAT))
    assert data["messages"][0]["status"] == "failed"
    work = await Work.objects.aget(kind="forward_message")
    assert work.state == "failed"
    assert ZAMMAD_TOKEN not in work.last_error


# --- rate limits ----------------------------------------------------------------------------


async def test_rest_rate_limit_per_device(region: Region, rate_limits: Any) -> None:
    rate_limits.RATE_LIMIT_REST_PER_DEVICE = 3
    device = f"limited-{uuid.uuid4()}"
    client = AsyncClient()
    path = f"/api/v3/augsburg/de/chat/{device}/"
    assert (await client.post(path, {"message": "hi"})).status_code == 200
    for _ in range(2):
        assert (await client.get(path)).status_code == 200
    refused = await client.get(path)
    assert refused.status_code == 429
    assert body(refused) == {"error": "Too many requests."}
    assert 1 <= int(refused["Retry-After"]) <= 60
    refused_post = await client.post(path, {"message": "more"})
    assert refused_post.status_code == 429
    assert await Message.objects.filter(chat__device_id=device).acount() == 1
    # Another device is not affected.
    assert (
        await client.get(f"/api/v3/augsburg/{uuid.uuid4()}/is_chat_enabled/")
    ).status_code == 200


class ClientAt(AsyncClient):
    """A test client whose requests come from ``ip``."""

    def __init__(self, ip: str) -> None:
        super().__init__()
        self.ip = ip

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope: dict[str, Any] = super()._base_scope(**request)  # type: ignore[misc]
        scope["client"] = [self.ip, 0]
        return scope


async def test_rest_rate_limit_per_ip_honours_only_a_trusted_proxy(
    region: Region, rate_limits: Any
) -> None:
    rate_limits.RATE_LIMIT_REST_PER_IP = 2
    spoofed = {"X-Forwarded-For": f"203.0.113.{uuid.uuid4().int % 250}"}
    client = ClientAt(f"198.51.100.{uuid.uuid4().int % 250}")
    # Untrusted header: every request counts against the real peer address.
    for _ in range(2):
        answer = await client.get(
            f"/api/v3/augsburg/{uuid.uuid4()}/is_chat_enabled/", headers=spoofed
        )
        assert answer.status_code == 200
    answer = await client.get(f"/api/v3/augsburg/{uuid.uuid4()}/is_chat_enabled/", headers=spoofed)
    assert answer.status_code == 429
    # Trusted proxy: the header's address is the client, and it has its own budget.
    rate_limits.TRUSTED_PROXY_HEADER = "X-Forwarded-For"
    answer = await client.get(f"/api/v3/augsburg/{uuid.uuid4()}/is_chat_enabled/", headers=spoofed)
    assert answer.status_code == 200


async def test_webhook_is_not_rate_limited(region: Region, rate_limits: Any) -> None:
    rate_limits.RATE_LIMIT_REST_PER_IP = 1
    client = AsyncClient()
    for _ in range(3):
        answer = await client.post(
            "/api/v3/webhook/zammad/?token=wrong", b"{}", content_type="application/json"
        )
        assert answer.status_code == 404


async def test_api_answers_carry_the_headers_of_the_full_middleware(
    client: AsyncClient, region: Region
) -> None:
    """API requests skip the admin's middleware (chatserver.middleware.ApiMiddleware) but keep
    the security headers and Content-Length that the full stack adds (the admin login page
    shows what that stack sets)."""
    await client.post(CHAT, {"message": "Hallo"})
    full = await client.get("/admin/login/")
    for path, status in ((CHAT, 200), ("/healthz", 200), ("/api/v3/nowhere/x", 404)):
        answer = await client.get(path)
        assert answer.status_code == status, path
        for header in ("X-Content-Type-Options", "Referrer-Policy", "Cross-Origin-Opener-Policy"):
            assert answer[header] == full[header], (path, header)
        assert answer["X-Frame-Options"] == "DENY"
        assert int(answer["Content-Length"]) == len(answer.content)
        assert "Set-Cookie" not in answer, path  # no session, no CSRF cookie

"""The fake Zammad itself: API shapes and errors as recorded from a real Zammad, the webhook
emitter (signature, retries, delivery modes) and the /__fake__ controls.

Plain HTTP from the test thread; the webhook receiver is a small aiohttp app in its own thread,
so blocking controls never wait on the test's own loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any

import pytest
from aiohttp import web

from chatserver.fakes.base import ThreadedServer, free_port
from chatserver.fakes.zammad import (
    AGENT_LOGIN,
    INTEGRATION_LOGIN,
    TRIGGER_NAME,
    FakeZammad,
    FakeZammadServer,
)

TOKEN = "fake-test-token-77aa"
SECRET = "signature-secret-b3"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BOT_SUBJECT = "automatically generated message"
# Field sets of the responses recorded from a real Zammad (shared/zammad-samples).
USER_KEYS = frozenset(
    {
        "active",
        "address",
        "authorization_ids",
        "city",
        "country",
        "created_at",
        "created_by_id",
        "department",
        "email",
        "fax",
        "firstname",
        "group_ids",
        "id",
        "image",
        "image_source",
        "last_login",
        "lastname",
        "login",
        "login_failed",
        "mobile",
        "note",
        "organization_id",
        "organization_ids",
        "out_of_office",
        "out_of_office_end_at",
        "out_of_office_replacement_id",
        "out_of_office_start_at",
        "overview_sorting_ids",
        "phone",
        "preferences",
        "role_ids",
        "source",
        "street",
        "two_factor_preference_ids",
        "updated_at",
        "updated_by_id",
        "verified",
        "vip",
        "web",
        "zip",
    }
)
# GET /tickets/{id}; create and update add article_ids and ticket_time_accounting_ids.
TICKET_SHOW_KEYS = frozenset(
    {
        "id",
        "group_id",
        "priority_id",
        "state_id",
        "organization_id",
        "number",
        "title",
        "owner_id",
        "customer_id",
        "note",
        "first_response_at",
        "first_response_escalation_at",
        "first_response_in_min",
        "first_response_diff_in_min",
        "close_at",
        "close_escalation_at",
        "close_in_min",
        "close_diff_in_min",
        "update_escalation_at",
        "update_in_min",
        "update_diff_in_min",
        "last_close_at",
        "last_contact_at",
        "last_contact_agent_at",
        "last_contact_customer_at",
        "last_owner_update_at",
        "create_article_type_id",
        "create_article_sender_id",
        "article_count",
        "escalation_at",
        "pending_time",
        "type",
        "time_unit",
        "preferences",
        "updated_by_id",
        "created_by_id",
        "created_at",
        "updated_at",
    }
)
TICKET_KEYS = TICKET_SHOW_KEYS | {"article_ids", "ticket_time_accounting_ids"}
CUSTOM_KEYS = {"automatic_answers", "evaluation_consent", "initial_response_sent"}
# Retry waits of 10, 20, 30, 40 s become 20, 40, 60, 80 ms.
RETRY_TIME_FACTOR = 0.002


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeZammadServer]:
    server = FakeZammad.start_threaded(token=TOKEN, retry_time_factor=RETRY_TIME_FACTOR)
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server: FakeZammadServer) -> Iterator[FakeZammadServer]:
    fake_server.reset()
    yield fake_server
    fake_server.reset()


@dataclass
class Answer:
    status: int
    headers: Message[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    auth: str | None = f"Token token={TOKEN}",
) -> Answer:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 (always the test server's http URL)
        base + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as answer:  # noqa: S310 (a test URL)
            return Answer(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.headers, error.read())


def api(fake: FakeZammadServer, method: str, path: str, body: Any = None, **kw: Any) -> Answer:
    return request(fake.url, method, "/api/v1" + path, body, **kw)


def control(fake: FakeZammadServer, method: str, path: str, body: Any = None) -> Answer:
    return request(fake.url, method, "/__fake__/" + path, body, auth=None)


def open_ticket(fake: FakeZammadServer, **fields: Any) -> dict[str, Any]:
    body = {"title": "[Integreat Chat] [de] dev-1", "group": "integreat-chat"}
    body["customer"] = INTEGRATION_LOGIN
    answer = api(fake, "POST", "/tickets", {**body, **fields})
    assert answer.status == 201, answer.body
    ticket: dict[str, Any] = answer.json
    return ticket


def customer_article(fake: FakeZammadServer, ticket_id: int, body: str = "Hallo") -> Answer:
    return api(
        fake,
        "POST",
        "/ticket_articles",
        {
            "ticket_id": ticket_id,
            "body": body,
            "content_type": "text/html",
            "type": "web",
            "internal": False,
            "sender": "Customer",
            "subject": "app user message",
        },
    )


class Receiver:
    """A webhook endpoint answering scripted statuses (then 200), in its own thread."""

    def __init__(self, statuses: tuple[int, ...] = (), stall_secs: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.stall_secs = stall_secs
        self.hits: list[tuple[dict[str, str], bytes]] = []
        self._changed = threading.Condition()
        self.server = ThreadedServer(self._make_app)

    @property
    def url(self) -> str:
        return f"{self.server.url}/api/v3/webhook/zammad/?token=abc"

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v3/webhook/zammad/", self._hook)
        return app

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._changed:
            self.hits.append((dict(request.headers), body))
            status = self.statuses.pop(0) if self.statuses else 200
            self._changed.notify_all()
        if self.stall_secs:
            await asyncio.sleep(self.stall_secs)
        return web.Response(status=status, text="Thanks!")  # not JSON: Zammad does not care

    def wait_hits(self, count: int, timeout: float = 5.0) -> list[tuple[dict[str, str], bytes]]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.hits) >= count, timeout):
                raise AssertionError(f"{len(self.hits)} webhook(s) after {timeout} s, not {count}")
            return list(self.hits)

    def payloads(self) -> list[dict[str, Any]]:
        with self._changed:
            return [json.loads(body) for _, body in self.hits]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.server.start()
    yield hook
    hook.server.stop()


def start_receiver(statuses: tuple[int, ...] = (), stall_secs: float = 0.0) -> Receiver:
    hook = Receiver(statuses, stall_secs)
    hook.server.start()
    return hook


def assert_keys_sorted(value: Any) -> None:
    if isinstance(value, dict):
        assert list(value) == sorted(value)
        for item in value.values():
            assert_keys_sorted(item)
    elif isinstance(value, list):
        for item in value:
            assert_keys_sorted(item)


# --- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth", [f"Token token={TOKEN}", f'Token token="{TOKEN}"', f"Bearer {TOKEN}"]
)
def test_accepted_token_forms(fake: FakeZammadServer, auth: str) -> None:
    answer = api(fake, "GET", "/users/me", auth=auth)

    assert answer.status == 200
    assert answer.json["login"] == INTEGRATION_LOGIN


@pytest.mark.parametrize(
    ("auth", "status", "error"),
    [
        (None, 403, "Authentication required"),
        ("Token token=", 403, "Authentication required"),
        ("Token token=nope", 401, "Can't find User for Token"),
        ("Bearer nope", 401, "The provided token is invalid."),
        ("Basic dXNlcjpwYXNz", 401, "Invalid BasicAuth credentials"),
    ],
)
def test_refused_credentials(
    fake: FakeZammadServer, auth: str | None, status: int, error: str
) -> None:
    answer = api(fake, "GET", "/users/me", auth=auth)

    assert answer.status == status
    assert answer.json == {"error": error, "error_human": error}
    assert answer.headers["X-Failure"] == error
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"


def test_unknown_api_route_is_a_json_404(fake: FakeZammadServer) -> None:
    answer = api(fake, "DELETE", "/tickets/1")

    assert answer.status == 404
    assert answer.json["error"] == "No route matches [DELETE] /api/v1/tickets/1"


# --- shapes from the recorded samples ----------------------------------------------------------


def test_users_me_has_the_recorded_fields(fake: FakeZammadServer) -> None:
    me = api(fake, "GET", "/users/me").json

    assert set(me) == USER_KEYS
    assert me["email"] == me["login"] == INTEGRATION_LOGIN
    assert TIMESTAMP.match(me["created_at"])


def test_ticket_shapes_follow_the_recorded_responses(fake: FakeZammadServer) -> None:
    created = open_ticket(fake)
    shown = api(fake, "GET", f"/tickets/{created['id']}").json
    updated = api(fake, "PUT", f"/tickets/{created['id']}", {"title": "New title"}).json

    assert set(created) == TICKET_KEYS | CUSTOM_KEYS
    assert set(shown) == TICKET_SHOW_KEYS | CUSTOM_KEYS
    assert set(updated) == TICKET_KEYS | CUSTOM_KEYS
    assert created["number"] == str(10000 + created["id"])
    assert created["state_id"] == 1
    assert created["customer_id"] == 3
    assert created["automatic_answers"] is True
    assert created["evaluation_consent"] is False
    assert created["close_at"] is None
    assert updated["title"] == "New title"


def test_ticket_with_a_nested_article(fake: FakeZammadServer) -> None:
    ticket = open_ticket(fake, article={"body": "first", "type": "web", "sender": "Customer"})

    assert ticket["article_count"] == 1
    (article,) = api(fake, "GET", f"/ticket_articles/by_ticket/{ticket['id']}").json
    assert ticket["article_ids"] == [article["id"]]
    assert ticket["create_article_type_id"] == 11
    assert ticket["create_article_sender_id"] == 2


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"title": ""}, "The required value 'title' is missing."),
        ({"group": None}, "The required value 'group_id' is missing."),
        ({"group": "Sales"}, "No lookup value found for 'group': \"Sales\""),
        ({"customer": "who@example.com"}, "No lookup value found for 'customer': "),
        ({"state": "limbo"}, "No lookup value found for 'state': \"limbo\""),
        ({"article": {"body": None}}, "Need at least an 'article body' field."),
    ],
)
def test_ticket_validation(fake: FakeZammadServer, fields: dict[str, Any], error: str) -> None:
    body = {"title": "t", "group": "Users", "customer": INTEGRATION_LOGIN, **fields}

    answer = api(fake, "POST", "/tickets", body)

    assert answer.status == 422
    assert answer.json["error"].startswith(error)
    assert answer.json["error_human"] == answer.json["error"]
    assert fake.tickets() == []


def test_ticket_update_state_and_attributes(fake: FakeZammadServer) -> None:
    ticket = open_ticket(fake)

    updated = api(
        fake,
        "PUT",
        f"/tickets/{ticket['id']}",
        {"automatic_answers": False, "evaluation_consent": True, "state": "closed", "x": 1},
    ).json

    assert updated["automatic_answers"] is False
    assert updated["evaluation_consent"] is True
    assert updated["state_id"] == 4
    assert TIMESTAMP.match(updated["close_at"])
    assert updated["last_close_at"] == updated["close_at"]
    assert "x" not in updated
    assert api(fake, "PUT", "/tickets/999", {"state": "open"}).status == 404
    assert api(fake, "GET", "/tickets/999").json["error"] == "Couldn't find Ticket with 'id'=999"


def test_article_create_and_read(fake: FakeZammadServer) -> None:
    ticket = open_ticket(fake)
    marker = {"integreat_chat": {"message_id": 7}}

    answer = api(
        fake,
        "POST",
        "/ticket_articles",
        {
            "ticket_id": ticket["id"],
            "body": "<p>Frage</p>",
            "content_type": "text/html",
            "type": "web",
            "internal": False,
            "sender": "Customer",
            "subject": "app user message",
            "preferences": marker,
        },
    )

    assert answer.status == 201
    article = answer.json
    assert article["ticket_id"] == ticket["id"]
    assert article["sender"] == "Customer"
    assert article["sender_id"] == 2
    assert article["type"] == "web"
    assert article["type_id"] == 11
    assert article["from"] == f"Integreat CMS <{INTEGRATION_LOGIN}>"
    assert article["created_by"] == article["updated_by"] == INTEGRATION_LOGIN
    assert article["preferences"] == marker
    assert article["attachments"] == []
    assert article["to"] is None
    assert article["time_unit"] is None
    assert TIMESTAMP.match(article["created_at"])
    assert api(fake, "GET", f"/ticket_articles/{article['id']}").json == article
    assert api(fake, "GET", "/ticket_articles/99999").status == 404
    # Defaults: a note by the agent, plain text, public.
    plain = api(fake, "POST", "/ticket_articles", {"ticket_id": ticket["id"], "body": ""}).json
    assert (plain["type"], plain["sender"], plain["content_type"], plain["internal"]) == (
        "note",
        "Agent",
        "text/plain",
        False,
    )


def test_by_ticket_lists_every_article_sorted_by_id(fake: FakeZammadServer) -> None:
    first = open_ticket(fake)
    second = open_ticket(fake)
    ids = []
    for ticket in (first, second, first):
        ids.append(customer_article(fake, ticket["id"]).json["id"])
    ids.append(fake.agent_reply(first["id"], "note to self", internal=True)["id"])

    listed = api(fake, "GET", f"/ticket_articles/by_ticket/{first['id']}").json

    assert [a["id"] for a in listed] == [ids[0], ids[2], ids[3]]
    assert listed[-1]["internal"] is True
    assert listed[-1]["created_by"] == AGENT_LOGIN
    assert api(fake, "GET", f"/tickets/{first['id']}").json["article_count"] == 3
    assert api(fake, "GET", "/ticket_articles/by_ticket/999").status == 404


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"body": None}, "Need at least an 'article body' field."),
        ({"sender": "Robot"}, "No lookup value found for 'sender': \"Robot\""),
        (
            {"attachments": [{"data": "SGk=", "mime-type": "text/plain"}]},
            "Attachment needs 'filename' param for attachment with index '0'",
        ),
        (
            {"attachments": [{"filename": "a", "data": "SGk=", "mime-type": "text/plain"}, {}]},
            "Attachment needs 'filename' param for attachment with index '1'",
        ),
        (
            {"attachments": [{"filename": "a", "mime-type": "text/plain"}]},
            "Attachment needs 'data' param for attachment with index '0'",
        ),
        (
            {"attachments": [{"filename": "a", "data": "SGk="}]},
            "Attachment needs 'mime-type' param for attachment with index '0'",
        ),
        (
            {"attachments": [{"filename": "a", "data": "not base64!", "mime-type": "x/y"}]},
            "Invalid base64 for attachment with index '0'",
        ),
    ],
)
def test_article_validation(fake: FakeZammadServer, body: dict[str, Any], error: str) -> None:
    ticket = open_ticket(fake)

    answer = api(fake, "POST", "/ticket_articles", {"ticket_id": ticket["id"], "body": "b", **body})

    assert answer.status == 422
    assert answer.json == {"error": error, "error_human": error}
    assert fake.articles(ticket["id"]) == []


def test_attachments_round_trip(fake: FakeZammadServer) -> None:
    ticket = open_ticket(fake)
    content = bytes(range(256)) * 40
    encoded = base64.encodebytes(content).decode()  # with newlines, which Zammad removes
    article = api(
        fake,
        "POST",
        "/ticket_articles",
        {
            "ticket_id": ticket["id"],
            "body": "see file",
            "attachments": [
                {"filename": "data.bin", "data": encoded, "mime-type": "application/pdf"},
                {
                    "filename": "a.txt",
                    "data": "SGk=",
                    "mime-type": "text/plain",
                    "charset": "utf-8",
                },
            ],
        },
    ).json
    pdf, txt = article["attachments"]
    base = f"/ticket_attachment/{ticket['id']}/{article['id']}"

    download = api(fake, "GET", f"{base}/{pdf['id']}")

    assert pdf == {
        "id": pdf["id"],
        "filename": "data.bin",
        "size": str(len(content)),
        "preferences": {"Mime-Type": "application/pdf"},
    }
    assert txt["preferences"] == {"Mime-Type": "text/plain", "Charset": "utf-8"}
    assert download.status == 200
    assert download.body == content
    assert download.headers["Content-Type"] == "application/pdf"
    assert download.headers["Content-Disposition"] == 'inline; filename="data.bin"'
    as_file = api(fake, "GET", f"{base}/{pdf['id']}?disposition=attachment")
    assert as_file.headers["Content-Disposition"] == 'attachment; filename="data.bin"'
    assert api(fake, "GET", f"{base}/{pdf['id']}?disposition=x").status == 403

    other = open_ticket(fake)
    wrong_ticket = api(fake, "GET", f"/ticket_attachment/{other['id']}/{article['id']}/{pdf['id']}")
    assert wrong_ticket.status == 403
    assert wrong_ticket.json["error"] == "No access, article_id/ticket_id is not matching."
    reply = fake.agent_reply(ticket["id"], "x", attachments=[{"filename": "r.txt", "data": b"r"}])
    wrong_article = api(fake, "GET", f"/ticket_attachment/{ticket['id']}/{reply['id']}/{pdf['id']}")
    assert wrong_article.status == 403
    assert wrong_article.json["error"] == "Requested file id is not linked with article_id."
    assert api(fake, "GET", f"{base}/99999").status == 404
    assert api(fake, "GET", f"/ticket_attachment/{ticket['id']}/99999/{pdf['id']}").status == 404


def test_agent_reply_on_a_new_ticket_and_state_rules(fake: FakeZammadServer) -> None:
    ticket = open_ticket(fake)

    reply = fake.agent_reply(
        ticket["id"],
        "<p>Hi</p>",
        attachments=[{"filename": "r.png", "data": b"\x89PNG", "mime-type": "image/png"}],
    )

    assert (reply["sender"], reply["type"], reply["internal"]) == ("Agent", "note", False)
    assert reply["from"] == "Emma Taylor"
    assert reply["content_type"] == "text/html"
    assert reply["attachments"][0]["preferences"] == {"Mime-Type": "image/png"}
    # A note does not open the ticket; an agent's public web article does (ResetsTicketState).
    assert api(fake, "GET", f"/tickets/{ticket['id']}").json["state_id"] == 1
    api(fake, "POST", "/ticket_articles", {"ticket_id": ticket["id"], "body": "a", "type": "web"})
    assert api(fake, "GET", f"/tickets/{ticket['id']}").json["state_id"] == 2
    # A customer article on a closed ticket does not reopen it.
    closed = fake.close_ticket(ticket["id"])
    assert closed["state_id"] == 4
    customer_article(fake, ticket["id"])
    assert api(fake, "GET", f"/tickets/{ticket['id']}").json["state_id"] == 4


# --- faults --------------------------------------------------------------------------------------


def test_fail_next_counts_and_prefixes(fake: FakeZammadServer) -> None:
    fake.fail_next(2, status=500, path_prefix="/api/v1/tickets")

    assert api(fake, "GET", "/users/me").status == 200
    failed = api(fake, "POST", "/tickets", {})
    assert failed.status == 500
    assert failed.json["error"].endswith("Please contact your administrator.")
    assert "error_human" not in failed.json
    assert api(fake, "GET", "/tickets/1").status == 500
    assert api(fake, "GET", "/tickets/1").status == 404  # back to normal


def test_a_stall_without_status_answers_normally_afterwards(fake: FakeZammadServer) -> None:
    fake.fail_next(1, status=None, stall_secs=0.1)

    started = time.monotonic()
    answer = api(fake, "GET", "/users/me")

    assert answer.status == 200
    assert time.monotonic() - started >= 0.1


def test_down_drops_api_connections_but_controls_keep_working(fake: FakeZammadServer) -> None:
    fake.go_down()

    with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
        api(fake, "GET", "/users/me")
    assert control(fake, "GET", "state").json["down"] is True

    fake.come_back()
    assert api(fake, "GET", "/users/me").status == 200


def test_received_records_requests_without_the_token(fake: FakeZammadServer) -> None:
    open_ticket(fake)
    api(fake, "GET", "/users/me", auth="Token token=wrong")

    received = fake.received()

    assert [(r["method"], r["path"]) for r in received] == [
        ("POST", "/api/v1/tickets"),
        ("GET", "/api/v1/users/me"),
    ]
    assert received[0]["json"]["customer"] == INTEGRATION_LOGIN
    assert all("Authorization" not in r["headers"] for r in received)
    assert fake.received("/api/v1/users") == received[1:]


# --- the webhook emitter -------------------------------------------------------------------------


def test_webhook_payload_headers_and_signature(fake: FakeZammadServer, receiver: Receiver) -> None:
    fake.set_webhook(receiver.url, signature_secret=SECRET)
    ticket = open_ticket(fake)
    fake.wait_deliveries_idle()
    assert receiver.hits == []  # creating a ticket is not an update

    reply = fake.agent_reply(
        ticket["id"], "<p>Grüße</p>", attachments=[{"filename": "f.txt", "data": b"hi"}]
    )
    ((headers, raw),) = receiver.wait_hits(1)

    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["User-Agent"] == "Zammad User Agent"
    assert headers["X-Zammad-Trigger"] == TRIGGER_NAME
    uuid.UUID(headers["X-Zammad-Delivery"])
    expected = hmac.new(SECRET.encode(), raw, hashlib.sha1).hexdigest()
    assert headers["X-Hub-Signature"] == f"sha1={expected}"
    payload = json.loads(raw)
    assert list(payload) == ["article", "ticket"]
    assert_keys_sorted(payload)
    assert "Grüße".encode() in raw  # UTF-8 as is, like Ruby's to_json
    article, ticket_payload = payload["article"], payload["ticket"]
    assert article["id"] == reply["id"]
    assert article["sender"] == "Agent"
    assert article["type"] == "note"
    assert article["created_by"]["login"] == AGENT_LOGIN
    assert article["created_by"]["roles"] == ["Agent"]
    assert not {"preferences", "last_login", "login_failed", "group_ids"} & set(
        article["created_by"]
    )
    (attachment,) = article["attachments"]
    assert attachment["url"] == (
        f"{fake.url}/api/v1/ticket_attachment/{ticket['id']}/{reply['id']}/{attachment['id']}"
    )
    assert ticket_payload["id"] == ticket["id"]
    assert ticket_payload["state"] == "new"
    assert ticket_payload["group"]["name"] == "integreat-chat"
    assert ticket_payload["priority"]["name"] == "2 normal"
    assert ticket_payload["customer"]["login"] == INTEGRATION_LOGIN
    assert ticket_payload["owner"]["login"] == "-"
    assert ticket_payload["organization"] == {}
    assert ticket_payload["automatic_answers"] is True
    fake.wait_deliveries_idle()  # the receiver has answered; let the fake log the status
    (delivery,) = fake.deliveries()
    assert delivery["delivery_id"] == headers["X-Zammad-Delivery"]
    assert (delivery["status"], delivery["ok"], delivery["attempt"]) == (200, True, 1)
    assert delivery["body"].encode() == raw


def test_trigger_fires_like_integreats(fake: FakeZammadServer, receiver: Receiver) -> None:
    fake.set_webhook(receiver.url)
    ticket = open_ticket(fake)

    customer_article(fake, ticket["id"])  # the server's own customer article: fires
    bot = {"ticket_id": ticket["id"], "body": "bot", "sender": "Agent", "subject": BOT_SUBJECT}
    assert api(fake, "POST", "/ticket_articles", bot).status == 201  # does not fire
    assert api(fake, "PUT", f"/tickets/{ticket['id']}", {"evaluation_consent": True}).status == 200
    fake.agent_reply(ticket["id"], "internal", internal=True)  # fires: no internal filter
    fake.close_ticket(ticket["id"])  # a state change: fires with an empty article
    fake.wait_deliveries_idle()

    payloads = receiver.payloads()
    assert [p["article"].get("sender") for p in payloads] == ["Customer", "Agent", None]
    assert payloads[-1]["article"] == {}
    assert payloads[-1]["ticket"]["state"] == "closed"
    assert len({h["X-Zammad-Delivery"] for h, _ in receiver.hits}) == 3


def test_trigger_can_be_limited_to_agent_articles(
    fake: FakeZammadServer, receiver: Receiver
) -> None:
    fake.set_webhook(receiver.url, trigger_on_customer=False)
    ticket = open_ticket(fake)

    customer_article(fake, ticket["id"])
    fake.agent_reply(ticket["id"], "answer")
    fake.wait_deliveries_idle()

    assert [p["article"]["sender"] for p in receiver.payloads()] == ["Agent"]
    assert "X-Hub-Signature" not in receiver.hits[0][0]  # no secret, no signature


def test_state_change_over_the_api_fires(fake: FakeZammadServer, receiver: Receiver) -> None:
    fake.set_webhook(receiver.url)
    ticket = open_ticket(fake)

    api(fake, "PUT", f"/tickets/{ticket['id']}", {"state": "closed"})
    api(fake, "PUT", f"/tickets/{ticket['id']}", {"state": "closed"})  # no change, no webhook
    fake.wait_deliveries_idle()

    (payload,) = receiver.payloads()
    assert payload["article"] == {}
    assert payload["ticket"]["state"] == "closed"


def test_failed_delivery_is_retried_with_the_same_delivery_id(fake: FakeZammadServer) -> None:
    hook = start_receiver(statuses=(500, 404))
    try:
        fake.set_webhook(hook.url, signature_secret=SECRET)
        ticket = open_ticket(fake)
        fake.agent_reply(ticket["id"], "answer")
        fake.wait_deliveries_idle()
        hits = hook.wait_hits(3)
    finally:
        hook.server.stop()

    assert len(hits) == 3
    assert len({headers["X-Zammad-Delivery"] for headers, _ in hits}) == 1
    for headers, raw in hits:
        expected = hmac.new(SECRET.encode(), raw, hashlib.sha1).hexdigest()
        assert headers["X-Hub-Signature"] == f"sha1={expected}"
    assert [(d["attempt"], d["status"], d["ok"]) for d in fake.deliveries()] == [
        (1, 500, False),
        (2, 404, False),
        (3, 200, True),
    ]


def test_delivery_gives_up_after_four_retries(fake: FakeZammadServer) -> None:
    hook = start_receiver(statuses=(503,) * 10)
    try:
        fake.set_webhook(hook.url)
        ticket = open_ticket(fake)
        fake.agent_reply(ticket["id"], "answer")
        fake.wait_deliveries_idle()
    finally:
        hook.server.stop()

    assert [d["status"] for d in fake.deliveries()] == [503] * 5
    assert len(hook.hits) == 5


def test_unreachable_and_slow_receivers_count_as_failures(fake: FakeZammadServer) -> None:
    fake.set_webhook(f"http://127.0.0.1:{free_port()}/hook")
    ticket = open_ticket(fake)
    fake.agent_reply(ticket["id"], "answer")
    fake.wait_deliveries_idle()

    unreachable = fake.deliveries()
    assert len(unreachable) == 5
    assert all(d["status"] is None and d["error"] for d in unreachable)

    slow = start_receiver(stall_secs=0.3)
    try:
        fake.reset()
        fake.set_webhook(slow.url, read_timeout_secs=0.05)
        ticket = open_ticket(fake)
        fake.agent_reply(ticket["id"], "answer")
        fake.wait_deliveries_idle()
        timed_out = fake.deliveries()
    finally:
        slow.server.stop()
    assert len(timed_out) == 5
    assert all("Timeout" in d["error"] for d in timed_out)


def test_duplicate_mode_sends_each_delivery_twice(
    fake: FakeZammadServer, receiver: Receiver
) -> None:
    fake.set_webhook(receiver.url)
    fake.set_delivery_mode("duplicate")
    ticket = open_ticket(fake)

    fake.agent_reply(ticket["id"], "answer")
    fake.wait_deliveries_idle()

    first, second = receiver.wait_hits(2)
    assert first[0]["X-Zammad-Delivery"] == second[0]["X-Zammad-Delivery"]
    assert json.loads(first[1]) == json.loads(second[1])
    assert [d["attempt"] for d in fake.deliveries()] == [1, 1]


@pytest.mark.parametrize(("mode", "reverse"), [("hold", False), ("reorder", True)])
def test_held_deliveries_wait_for_release(
    fake: FakeZammadServer, receiver: Receiver, mode: str, reverse: bool
) -> None:
    fake.set_webhook(receiver.url)
    fake.set_delivery_mode(mode)
    ticket = open_ticket(fake)
    ids = [fake.agent_reply(ticket["id"], f"answer {n}")["id"] for n in range(3)]
    fake.wait_deliveries_idle()  # held deliveries do not count as busy
    assert receiver.hits == []
    assert fake.state()["held_deliveries"] == 3

    assert fake.release_deliveries() == 3
    receiver.wait_hits(3)
    fake.wait_deliveries_idle()

    sent = [p["article"]["id"] for p in receiver.payloads()]
    assert sent == (ids[::-1] if reverse else ids)


def test_empty_article_and_bad_signature_modes(fake: FakeZammadServer, receiver: Receiver) -> None:
    fake.set_webhook(receiver.url, signature_secret=SECRET)
    ticket = open_ticket(fake)
    fake.set_delivery_mode("empty_article")
    fake.agent_reply(ticket["id"], "answer")
    fake.wait_deliveries_idle()
    fake.set_delivery_mode("bad_signature")
    fake.agent_reply(ticket["id"], "answer")
    fake.wait_deliveries_idle()

    (empty_headers, empty_raw), (bad_headers, bad_raw) = receiver.wait_hits(2)

    empty = json.loads(empty_raw)
    assert empty["article"] == {}
    assert empty["ticket"]["id"] == ticket["id"]
    good = hmac.new(SECRET.encode(), empty_raw, hashlib.sha1).hexdigest()
    assert empty_headers["X-Hub-Signature"] == f"sha1={good}"
    right = hmac.new(SECRET.encode(), bad_raw, hashlib.sha1).hexdigest()
    assert bad_headers["X-Hub-Signature"].startswith("sha1=")
    assert bad_headers["X-Hub-Signature"] != f"sha1={right}"


def test_delay_mode_delivers_later(fake: FakeZammadServer, receiver: Receiver) -> None:
    fake.set_webhook(receiver.url)
    fake.set_delivery_mode("delay", delay_secs=0.15)
    ticket = open_ticket(fake)

    started = time.monotonic()
    fake.agent_reply(ticket["id"], "answer")
    receiver.wait_hits(1)

    assert time.monotonic() - started >= 0.15


def test_unknown_delivery_mode_is_refused(fake: FakeZammadServer) -> None:
    answer = control(fake, "PUT", "delivery_mode", {"mode": "sideways"})

    assert answer.status == 422
    assert "Unknown delivery mode" in answer.json["error"]


# --- HTTP controls and the console ---------------------------------------------------------------


def test_http_controls(fake: FakeZammadServer, receiver: Receiver) -> None:
    assert control(fake, "PUT", "webhook", {"url": receiver.url, "signature_secret": "s"}).json == {
        "url": receiver.url,
        "signature_secret": "**********",
        "trigger_on_customer": True,
        "retry_time_factor": RETRY_TIME_FACTOR,
        "read_timeout_secs": 30.0,
    }
    ticket = open_ticket(fake)
    assert control(fake, "PUT", "delivery_mode", {"mode": "hold"}).status == 200

    encoded = base64.b64encode(b"pdf").decode()
    reply = control(
        fake,
        "POST",
        f"tickets/{ticket['id']}/reply",
        {
            "body": "<p>Hi</p>",
            "attachments": [{"filename": "a.pdf", "data": encoded, "mime-type": "application/pdf"}],
        },
    )
    assert reply.status == 201
    assert reply.json["attachments"][0]["size"] == "3"
    closed = control(fake, "POST", f"tickets/{ticket['id']}/close")
    assert closed.json["state_id"] == 4
    assert control(fake, "POST", "tickets/999/reply", {"body": "x"}).status == 404
    assert control(fake, "POST", "deliveries/release").json == {"released": 2}
    assert control(fake, "POST", "deliveries/wait_idle", {"timeout": 5}).json == {"idle": True}
    assert len(control(fake, "GET", "deliveries").json) == 2
    articles = control(fake, "GET", f"tickets/{ticket['id']}/articles").json
    assert [a["id"] for a in articles] == [reply.json["id"]]

    assert control(fake, "POST", "fail", {"count": 1, "status": 502}).status == 200
    assert api(fake, "GET", "/users/me").status == 502
    assert control(fake, "POST", "down").json == {"down": True}
    assert control(fake, "POST", "up").json == {"down": False}
    assert len(control(fake, "GET", "received?path_prefix=/api/v1/users").json) == 1

    state = control(fake, "GET", "state").json
    assert state["tickets"][0]["state"] == "closed"
    assert state["tickets"][0]["articles"][0]["body"] == "<p>Hi</p>"
    assert {u["login"] for u in state["users"]} >= {INTEGRATION_LOGIN, AGENT_LOGIN}

    assert control(fake, "POST", "reset").json == {"reset": True}
    after = control(fake, "GET", "state").json
    assert after["tickets"] == []
    assert after["webhook"]["url"] is None
    assert control(fake, "GET", "received").json == []


def test_console_page(fake: FakeZammadServer) -> None:
    page = control(fake, "GET", "")

    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    text = page.body.decode()
    assert 'fetch("state")' in text
    assert "/reply" in text
    assert request(fake.url, "GET", "/__fake__", auth=None).body == page.body  # redirected
    # No CDN: the console works offline.
    assert "http://" not in text
    assert "https://" not in text

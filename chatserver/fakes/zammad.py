"""A fake Zammad: a real aiohttp server speaking the REST calls the chat server makes.

Shapes come from responses recorded on a real Zammad (shared/zammad-samples) and from the research
notes (shared/research/zammad.md, sections 4-7 and 10): ticket numbers are strings, timestamps carry
milliseconds and ``Z``, unset fields are present as null, errors are ``{"error", "error_human"}``.

Besides the API it has what a real Zammad has and tests need:

- a webhook emitter that behaves like the trigger Integreat deployments configure ("on every
  ticket update whose article subject does not contain 'automatically generated message'"):
  asynchronous, after the API answer, signed, retried 4 times with the same delivery id, and
  with switches to duplicate, delay, hold, reorder, empty or mis-sign deliveries;
- fault injection (fail or stall the next N calls, drop every connection while "down");
- controls under ``/__fake__/`` (JSON) and a small agent console at ``GET /__fake__/`` for demos.

It is never used outside development and tests. All state lives on the server's event loop;
``FakeZammadServer`` runs it in a thread and offers blocking controls for tests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import dataclasses
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from chatserver.fakes.base import ThreadedServer

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ApiHandler = Callable[[web.Request, "ApiCall"], Awaitable[web.StreamResponse]]

DEFAULT_TOKEN = "test-token"
INTEGRATION_LOGIN = "tech+integreat-cms@tuerantuer.org"
AGENT_LOGIN = "emma.taylor@example.com"
DEFAULT_GROUPS = ("Users", "integreat-chat")
TRIGGER_NAME = "Notify Integreat CMS on ticket update"
# Integreat's trigger ignores articles with this subject; that is what stops webhook loops.
AUTOMATIC_SUBJECT_MARKER = "automatically generated message"

# Zammad's ActiveJob: 1 try + 4 retries, waiting attempt * 10 s in between (research 6.3).
WEBHOOK_RETRIES = 4
WEBHOOK_RETRY_STEP_SECS = 10.0
WEBHOOK_CONNECT_TIMEOUT_SECS = 4.0
WEBHOOK_READ_TIMEOUT_SECS = 30.0

DELIVERY_MODES = frozenset(
    {"normal", "duplicate", "reorder", "hold", "delay", "empty_article", "bad_signature"}
)

# Seeds as in a fresh Zammad (research 3.4 and 4.1). State tuples: id, name, state type.
STATES = (
    (1, "new", "new"),
    (2, "open", "open"),
    (3, "pending reminder", "pending reminder"),
    (4, "closed", "closed"),
    (5, "merged", "merged"),
    (6, "removed", "removed"),
    (7, "pending close", "pending action"),
)
PRIORITIES = ((1, "1 low"), (2, "2 normal"), (3, "3 high"))
SENDERS = ((1, "Agent"), (2, "Customer"), (3, "System"))
ARTICLE_TYPES = (
    (1, "email"),
    (2, "sms"),
    (3, "chat"),
    (4, "fax"),
    (5, "phone"),
    (6, "twitter status"),
    (7, "twitter direct-message"),
    (8, "facebook feed post"),
    (9, "facebook feed comment"),
    (10, "note"),
    (11, "web"),
    (12, "telegram personal-message"),
)
ROLES = ((1, "Admin"), (2, "Agent"), (3, "Customer"))
# An agent's public article of these types moves a "new" ticket to "open" (ResetsTicketState).
COMMUNICATION_TYPES = frozenset({"email", "sms", "chat", "fax", "phone", "web", "twitter status"})
# Integreat's ticket object attributes, with their defaults.
CUSTOM_ATTRIBUTES: Mapping[str, Any] = {
    "automatic_answers": True,
    "evaluation_consent": False,
    "initial_response_sent": False,
}
# Left out of user objects in webhook payloads (research 6.4).
SENSITIVE_USER_KEYS = frozenset(
    {
        "last_login",
        "login_failed",
        "password",
        "preferences",
        "group_ids",
        "groups",
        "authorization_ids",
        "authorizations",
    }
)
# Distinct id ranges, so a chat server mixing up ticket, article and attachment ids gets a 404
# instead of silently reading the wrong record.
FIRST_TICKET_ID = 1
FIRST_ARTICLE_ID = 101
FIRST_ATTACHMENT_ID = 501


def now_iso() -> str:
    """Zammad's timestamp format: UTC, milliseconds, ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FakeError(Exception):
    """A request the fake refuses, answered as Zammad's ``{"error", "error_human"}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message, "error_human": message}, status=status)
    if status in (401, 403):
        response.headers["X-Failure"] = message
    return response


def _fault_response(status: int, body: str | None, content_type: str | None) -> web.Response:
    if body is not None:  # garbage on purpose: an HTML error page, broken JSON, a wrong shape
        return web.Response(
            status=status, body=body.encode(), content_type=content_type or "text/html"
        )
    if status >= 500:
        # What Zammad shows non-admins for an internal error: no error_human.
        message = f"Error ID {uuid.uuid4().hex[:8]}: Please contact your administrator."
        return web.json_response({"error": message}, status=status)
    return error_response(status, f"Injected failure {status}")


@dataclass
class StoredAttachment:
    id: int
    ticket_id: int
    article_id: int
    filename: str
    data: bytes
    preferences: dict[str, Any]


@dataclass
class ArticleDraft:
    """A validated article, not yet stored: validation happens before anything is written."""

    body: str
    type_name: str
    sender_name: str
    internal: bool
    content_type: str
    subject: str | None
    to: str | None
    cc: str | None
    preferences: dict[str, Any]
    origin_by_id: int | None
    attachments: list[tuple[str, bytes, dict[str, Any]]]


@dataclass
class Change:
    """A ticket update that runs the triggers once the API answer has been sent."""

    ticket_id: int
    article_id: int | None


@dataclass
class ApiCall:
    """One API request: who made it, and the ticket updates whose triggers run afterwards."""

    user: dict[str, Any]
    changes: list[Change]


@dataclass
class Fault:
    remaining: int
    status: int | None
    stall_secs: float | None
    path_prefix: str | None
    body: str | None
    content_type: str | None


@dataclass
class WebhookConfig:
    url: str | None = None
    signature_secret: str | None = None
    trigger_on_customer: bool = True
    retry_time_factor: float = 1.0
    read_timeout_secs: float = WEBHOOK_READ_TIMEOUT_SECS


@dataclass
class Delivery:
    """One trigger firing; retries reuse it, so the delivery id stays the same (research 6.3)."""

    delivery_id: str
    trigger: str
    ticket_id: int
    article_id: int | None
    empty_article: bool = False
    bad_signature: bool = False
    delay_secs: float = 0.0
    attempts: int = field(default=0)


class FakeZammad:
    """State and behaviour of the fake; every method runs on the server's event loop."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        webhook_url: str | None = None,
        signature_secret: str | None = None,
        trigger_on_customer: bool = True,
        retry_time_factor: float = 1.0,
        webhook_read_timeout_secs: float = WEBHOOK_READ_TIMEOUT_SECS,
        groups: Sequence[str] = DEFAULT_GROUPS,
        public_url: str = "http://127.0.0.1",
    ) -> None:
        self.token = token
        self.group_names = tuple(groups)
        # Absolute base for attachment URLs in webhook payloads ({http_type}://{fqdn}).
        self.public_url = public_url.rstrip("/")
        self._initial_webhook = WebhookConfig(
            url=webhook_url,
            signature_secret=signature_secret,
            trigger_on_customer=trigger_on_customer,
            retry_time_factor=retry_time_factor,
            read_timeout_secs=webhook_read_timeout_secs,
        )
        self._http: aiohttp.ClientSession | None = None
        self._delivery_tasks: set[asyncio.Task[None]] = set()
        self._stall_release = asyncio.Event()
        self._activity = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._seed()

    # -- seed data and state ------------------------------------------------------------------

    def _seed(self) -> None:
        created = now_iso()
        self.webhook = copy.copy(self._initial_webhook)
        self.delivery_mode = "normal"
        self.delay_secs = 0.0
        self.down = False
        self.faults: list[Fault] = []
        self.admin_resources: dict[str, dict[int, dict[str, Any]]] = {}
        self.migrations_executed = 0
        self.held: list[Delivery] = []
        self.received_log: list[dict[str, Any]] = []
        self.delivery_log: list[dict[str, Any]] = []
        self.groups: dict[int, dict[str, Any]] = {
            index: _group(index, name, created) for index, name in enumerate(self.group_names, 1)
        }
        all_groups = {str(group_id): ["full"] for group_id in self.groups}
        self.users: dict[int, dict[str, Any]] = {
            user["id"]: user
            for user in (
                _user(1, "-", "-", "", "", [], {}, created, active=False),
                _user(2, "nicole.braun@zammad.org", "Nicole", "Braun", None, [3], {}, created),
                _user(3, INTEGRATION_LOGIN, "Integreat", "CMS", None, [2, 3], all_groups, created),
                _user(5, AGENT_LOGIN, "Emma", "Taylor", None, [2], all_groups, created),
            )
        }
        self.integration_user = self.users[3]
        self.agent_user = self.users[5]
        self.tickets: dict[int, dict[str, Any]] = {}
        self.articles: dict[int, dict[str, Any]] = {}
        self.attachments: dict[int, StoredAttachment] = {}
        self._next_ticket_id = FIRST_TICKET_ID
        self._next_article_id = FIRST_ARTICLE_ID
        self._next_attachment_id = FIRST_ATTACHMENT_ID

    async def reset(self) -> None:
        """Back to the state right after start: no tickets, no faults, the initial webhook."""
        for task in list(self._delivery_tasks):
            task.cancel()
        if self._delivery_tasks:
            await asyncio.gather(*self._delivery_tasks, return_exceptions=True)
        self._wake_stalls()
        self._seed()

    def _wake_stalls(self) -> None:
        self._stall_release.set()
        self._stall_release = asyncio.Event()

    # -- lookups ------------------------------------------------------------------------------

    def _ticket(self, ticket_id: int) -> dict[str, Any]:
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            raise FakeError(404, f"Couldn't find Ticket with 'id'={ticket_id}")
        return ticket

    def _lookup(
        self, table: Sequence[tuple[Any, ...]], association: str, value: Any
    ) -> tuple[Any, ...]:
        """A seed row by id or by name; Zammad answers an unknown one with 422."""
        for row in table:
            if value in (row[0], row[1]) and not isinstance(value, bool):
                return row
        raise FakeError(422, f"No lookup value found for '{association}': {json.dumps(value)}")

    def _user_by(self, value: Any, association: str) -> dict[str, Any]:
        if isinstance(value, int) and not isinstance(value, bool) and value in self.users:
            return self.users[value]
        if isinstance(value, str):
            wanted = value.strip().lower()
            for user in self.users.values():
                if wanted in (user["login"], (user["email"] or "").lower()):
                    return user
        raise FakeError(422, f"No lookup value found for '{association}': {json.dumps(value)}")

    def _group_by(self, value: Any) -> dict[str, Any]:
        rows = [(group["id"], group["name"]) for group in self.groups.values()]
        return self.groups[self._lookup(rows, "group", value)[0]]

    @staticmethod
    def _state_type(state_id: int) -> str:
        return next(state_type for sid, _, state_type in STATES if sid == state_id)

    # -- REST shapes --------------------------------------------------------------------------

    def ticket_json(
        self, ticket: dict[str, Any], *, with_article_ids: bool = True
    ) -> dict[str, Any]:
        # Recorded responses: create and update carry article_ids, show does not.
        shaped = copy.deepcopy(ticket)
        if not with_article_ids:
            del shaped["article_ids"], shaped["ticket_time_accounting_ids"]
        return shaped

    def article_json(self, article: dict[str, Any]) -> dict[str, Any]:
        shaped = copy.deepcopy(article)
        shaped["attachments"] = [
            {
                "id": stored.id,
                "filename": stored.filename,
                "size": str(len(stored.data)),  # a string of digits, as Zammad sends it
                "preferences": copy.deepcopy(stored.preferences),
            }
            for stored in self._attachments_of(article["id"])
        ]
        shaped["type"] = self._lookup(ARTICLE_TYPES, "type", article["type_id"])[1]
        shaped["sender"] = self._lookup(SENDERS, "sender", article["sender_id"])[1]
        # Logins in the REST API; objects in the webhook payload.
        shaped["created_by"] = self.users[article["created_by_id"]]["login"]
        shaped["updated_by"] = self.users[article["updated_by_id"]]["login"]
        shaped["time_unit"] = None
        return shaped

    def _attachments_of(self, article_id: int) -> list[StoredAttachment]:
        return [item for item in self.attachments.values() if item.article_id == article_id]

    def articles_of(self, ticket_id: int) -> list[dict[str, Any]]:
        return [
            self.article_json(article)
            for _, article in sorted(self.articles.items())
            if article["ticket_id"] == ticket_id
        ]

    # -- tickets ------------------------------------------------------------------------------

    def create_ticket(self, data: Mapping[str, Any], author: dict[str, Any]) -> dict[str, Any]:
        """POST /tickets. Creation is not an "update", so Integreat's trigger does not fire."""
        if not data.get("title"):
            raise FakeError(422, "The required value 'title' is missing.")
        group_value = data.get("group_id", data.get("group"))
        if group_value is None:
            raise FakeError(422, "The required value 'group_id' is missing.")
        group = self._group_by(group_value)
        customer = self._customer_of(data)
        state = self._lookup(STATES, "state", data.get("state_id", data.get("state", "new")))
        priority = self._lookup(
            PRIORITIES, "priority", data.get("priority_id", data.get("priority", "2 normal"))
        )
        owner = self._user_by(data.get("owner_id", data.get("owner", 1)), "owner")
        draft = self.parse_article(data["article"], author) if data.get("article") else None

        ticket_id = self._next_ticket_id
        self._next_ticket_id += 1
        stamp = now_iso()
        ticket: dict[str, Any] = {
            "id": ticket_id,
            "group_id": group["id"],
            "priority_id": priority[0],
            "state_id": state[0],
            "organization_id": customer["organization_id"],
            "number": str(10000 + ticket_id),
            "title": str(data["title"]),
            "owner_id": owner["id"],
            "customer_id": customer["id"],
            "note": data.get("note"),
            "first_response_at": None,
            "first_response_escalation_at": None,
            "first_response_in_min": None,
            "first_response_diff_in_min": None,
            "close_at": None,
            "close_escalation_at": None,
            "close_in_min": None,
            "close_diff_in_min": None,
            "update_escalation_at": None,
            "update_in_min": None,
            "update_diff_in_min": None,
            "last_close_at": None,
            "last_contact_at": None,
            "last_contact_agent_at": None,
            "last_contact_customer_at": None,
            "last_owner_update_at": None,
            "create_article_type_id": None,
            "create_article_sender_id": None,
            "article_count": 0,
            "escalation_at": None,
            "pending_time": data.get("pending_time"),
            "type": None,
            "time_unit": None,
            "preferences": {},
            "updated_by_id": author["id"],
            "created_by_id": author["id"],
            "created_at": stamp,
            "updated_at": stamp,
            # Custom object attributes are extra table columns, so they follow the standard ones.
            **{name: data.get(name, default) for name, default in CUSTOM_ATTRIBUTES.items()},
            "article_ids": [],
            "ticket_time_accounting_ids": [],
        }
        self.tickets[ticket_id] = ticket
        if draft is not None:
            self.store_article(ticket, draft, author)
        return ticket

    def _customer_of(self, data: Mapping[str, Any]) -> dict[str, Any]:
        if data.get("customer_id") is not None:
            value = data["customer_id"]
            if isinstance(value, str) and value.startswith("guess:"):
                return self._user_by(value.removeprefix("guess:"), "customer_id")
            return self._user_by(value, "customer_id")
        if data.get("customer") is not None:
            return self._user_by(data["customer"], "customer")
        raise FakeError(422, "The required value 'customer_id' is missing.")

    def update_ticket(
        self, ticket: dict[str, Any], data: Mapping[str, Any], author: dict[str, Any]
    ) -> Change | None:
        """PUT /tickets/{id}: any subset of fields, optionally with a nested article."""
        updates: dict[str, Any] = {}
        if "title" in data:
            if not data["title"]:
                raise FakeError(422, "The required value 'title' is missing.")
            updates["title"] = str(data["title"])
        if "group_id" in data or "group" in data:
            updates["group_id"] = self._group_by(data.get("group_id", data.get("group")))["id"]
        if "state_id" in data or "state" in data:
            updates["state_id"] = self._lookup(
                STATES, "state", data.get("state_id", data.get("state"))
            )[0]
        if "priority_id" in data or "priority" in data:
            updates["priority_id"] = self._lookup(
                PRIORITIES, "priority", data.get("priority_id", data.get("priority"))
            )[0]
        if "owner_id" in data or "owner" in data:
            updates["owner_id"] = self._user_by(data.get("owner_id", data.get("owner")), "owner")[
                "id"
            ]
        if "customer_id" in data or "customer" in data:
            updates["customer_id"] = self._customer_of(data)["id"]
        for name in ("note", "pending_time", *CUSTOM_ATTRIBUTES):
            if name in data:
                updates[name] = data[name]
        # Unknown attributes are dropped, as Zammad's param cleanup does.
        draft = self.parse_article(data["article"], author) if data.get("article") else None

        state_changed = self._apply_ticket_updates(ticket, updates, author)
        article = self.store_article(ticket, draft, author) if draft is not None else None
        if article is not None:
            return Change(ticket["id"], article["id"])
        if state_changed:
            return Change(ticket["id"], None)
        return None

    def _apply_ticket_updates(
        self, ticket: dict[str, Any], updates: Mapping[str, Any], author: dict[str, Any]
    ) -> bool:
        stamp = now_iso()
        old_state = ticket["state_id"]
        ticket.update(updates)
        ticket["updated_at"] = stamp
        ticket["updated_by_id"] = author["id"]
        if "owner_id" in updates:
            ticket["last_owner_update_at"] = stamp
        state_changed = bool(ticket["state_id"] != old_state)
        if state_changed and self._state_type(ticket["state_id"]) == "closed":
            # close_at is the first close, last_close_at every close.
            ticket["close_at"] = ticket["close_at"] or stamp
            ticket["last_close_at"] = stamp
        return state_changed

    # -- articles -----------------------------------------------------------------------------

    def parse_article(self, data: Any, author: dict[str, Any]) -> ArticleDraft:
        """Validate an article the way Zammad's CreatesTicketArticles does (research 4.2, 5.1)."""
        if not isinstance(data, Mapping):
            raise FakeError(422, "Need at least an 'article body' field.")
        body = data.get("body")
        if body is None:
            raise FakeError(422, "Need at least an 'article body' field.")
        if not isinstance(body, str):
            body = json.dumps(body)
        type_row = self._lookup(
            ARTICLE_TYPES, "type", data.get("type_id", data.get("type", "note"))
        )
        default_sender = "Agent" if 2 in author["role_ids"] else "Customer"
        sender_row = self._lookup(
            SENDERS, "sender", data.get("sender_id", data.get("sender", default_sender))
        )
        preferences = data.get("preferences") or {}
        if not isinstance(preferences, Mapping):
            raise FakeError(422, "The value of 'preferences' must be an object.")
        origin_by_id = data.get("origin_by_id")
        if origin_by_id is not None:
            origin_by_id = self._user_by(origin_by_id, "origin_by_id")["id"]
        return ArticleDraft(
            body=body,
            type_name=type_row[1],
            sender_name=sender_row[1],
            internal=_as_bool(data.get("internal", False)),
            content_type=str(data.get("content_type") or "text/plain"),
            subject=_optional_str(data.get("subject")),
            to=_optional_str(data.get("to")),
            cc=_optional_str(data.get("cc")),
            preferences=copy.deepcopy(dict(preferences)),
            origin_by_id=origin_by_id,
            attachments=_parse_attachments(data.get("attachments")),
        )

    def store_article(
        self, ticket: dict[str, Any], draft: ArticleDraft, author: dict[str, Any]
    ) -> dict[str, Any]:
        article_id = self._next_article_id
        self._next_article_id += 1
        stamp = now_iso()
        origin = self.users[draft.origin_by_id] if draft.origin_by_id else author
        full_name = f"{origin['firstname']} {origin['lastname']}".strip()
        # A customer's web/phone article shows "Name <email>", everything else just the name.
        if draft.sender_name == "Customer" and draft.type_name in ("web", "phone"):
            sender_from = f"{full_name} <{origin['email']}>"
        else:
            sender_from = full_name
        article: dict[str, Any] = {
            "id": article_id,
            "ticket_id": ticket["id"],
            "type_id": self._lookup(ARTICLE_TYPES, "type", draft.type_name)[0],
            "sender_id": self._lookup(SENDERS, "sender", draft.sender_name)[0],
            "from": sender_from,
            "to": draft.to,
            "cc": draft.cc,
            "subject": draft.subject,
            "reply_to": None,
            "message_id": None,
            "message_id_md5": None,
            "in_reply_to": None,
            "content_type": draft.content_type,
            "references": None,
            "body": draft.body,
            "internal": draft.internal,
            "preferences": draft.preferences,
            "updated_by_id": author["id"],
            "created_by_id": author["id"],
            "origin_by_id": draft.origin_by_id,
            "created_at": stamp,
            "updated_at": stamp,
        }
        self.articles[article_id] = article
        for filename, data, preferences in draft.attachments:
            attachment_id = self._next_attachment_id
            self._next_attachment_id += 1
            self.attachments[attachment_id] = StoredAttachment(
                attachment_id, ticket["id"], article_id, filename, data, preferences
            )
        self._ticket_after_article(ticket, article, draft, author, stamp)
        return article

    def _ticket_after_article(
        self,
        ticket: dict[str, Any],
        article: dict[str, Any],
        draft: ArticleDraft,
        author: dict[str, Any],
        stamp: str,
    ) -> None:
        ticket["article_ids"].append(article["id"])
        ticket["article_count"] += 1
        ticket["create_article_type_id"] = ticket["create_article_type_id"] or article["type_id"]
        ticket["create_article_sender_id"] = (
            ticket["create_article_sender_id"] or article["sender_id"]
        )
        ticket["updated_at"] = stamp
        ticket["updated_by_id"] = author["id"]
        if draft.internal:
            return
        if draft.sender_name == "Customer":
            ticket["last_contact_at"] = ticket["last_contact_customer_at"] = stamp
        elif draft.sender_name == "Agent":
            ticket["last_contact_at"] = ticket["last_contact_agent_at"] = stamp
            ticket["first_response_at"] = ticket["first_response_at"] or stamp
            # Zammad's ResetsTicketState; notes do not count. No reopen for customer follow-ups:
            # a real Zammad does not reopen a closed ticket on a REST article either (research 3.5).
            if draft.type_name in COMMUNICATION_TYPES and ticket["state_id"] == 1:
                ticket["state_id"] = 2

    # -- the API ------------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> dict[str, Any]:
        header = request.headers.get("Authorization", "").strip()
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "token":
            # Rails' authenticate_with_http_token: token=abc, token="abc" or a bare abc.
            if credentials.startswith("token="):
                credentials = credentials.removeprefix("token=").split(",")[0].strip()
            token = credentials.strip('"')
            wrong = "Can't find User for Token"
        elif scheme.lower() == "bearer":
            token = credentials
            wrong = "The provided token is invalid."
        elif scheme.lower() == "basic":
            raise FakeError(401, "Invalid BasicAuth credentials")
        else:
            token = ""
            wrong = ""
        if not token:
            raise FakeError(403, "Authentication required")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise FakeError(401, wrong)
        return self.integration_user

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise FakeError(400, f"Invalid JSON in the request body: {exc}") from exc
        if not isinstance(parsed, dict):
            raise FakeError(422, "The request body must be a JSON object.")
        return parsed

    async def _api_users_me(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        return web.json_response(call.user)

    async def _api_user_show(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        user_id = int(request.match_info["id"])
        if user_id not in self.users:
            raise FakeError(404, f"Couldn't find User with 'id'={user_id}")
        return web.json_response(self.users[user_id])

    async def _api_ticket_create(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        data = await self._json_body(request)
        ticket = self.create_ticket(data, call.user)
        return web.json_response(self.ticket_json(ticket), status=201)

    async def _api_ticket_search(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        """Zammad's search without Elasticsearch: the query as a substring of the title; with
        ``expand=true`` the answer is a list of tickets."""
        query = request.query.get("query", "").strip('"').lower()
        found = [
            self.ticket_json(ticket, with_article_ids=False)
            for ticket in self.tickets.values()
            if query and query in str(ticket["title"]).lower()
        ]
        if request.query.get("expand") == "true":
            return web.json_response(found)
        return web.json_response(
            {"tickets": [t["id"] for t in found], "tickets_count": len(found), "assets": {}}
        )

    async def _api_ticket_show(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        ticket = self._ticket(int(request.match_info["id"]))
        return web.json_response(self.ticket_json(ticket, with_article_ids=False))

    async def _api_ticket_update(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        ticket = self._ticket(int(request.match_info["id"]))
        data = await self._json_body(request)
        change = self.update_ticket(ticket, data, call.user)
        if change is not None:
            call.changes.append(change)
        return web.json_response(self.ticket_json(ticket))

    # --- admin resources (provisioning) ---------------------------------------------------------

    def _resources(self, kind: str) -> dict[int, dict[str, Any]]:
        if kind == "groups":
            return self.groups
        return self.admin_resources.setdefault(kind, {})

    def _shown(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        shown = copy.deepcopy(item)
        for secret in ("signature_token", "basic_auth_password", "bearer_token"):
            if shown.get(secret):
                shown[secret] = "**********"  # Zammad never returns webhook secrets
        return shown

    async def _api_resource_list(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        kind = request.match_info["kind"]
        items = self._resources(kind).values()
        return web.json_response([self._shown(kind, item) for item in items])

    async def _api_resource_create(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        kind = request.match_info["kind"]
        data = await self._json_body(request)
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise FakeError(422, "Need at least a 'name'.")
        items = self._resources(kind)
        if any(item.get("name") == data["name"] for item in items.values()):
            raise FakeError(422, f"Name '{data['name']}' is already used.")
        item_id = max(items, default=0) + 1
        items[item_id] = {**data, "id": item_id, "active": data.get("active", True)}
        return web.json_response(self._shown(kind, items[item_id]), status=201)

    async def _api_resource_update(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        kind = request.match_info["kind"]
        items = self._resources(kind)
        item_id = int(request.match_info["id"])
        if item_id not in items:
            raise FakeError(404, f"Couldn't find {kind} with 'id'={item_id}")
        items[item_id].update(await self._json_body(request))
        items[item_id]["id"] = item_id
        return web.json_response(self._shown(kind, items[item_id]))

    async def _api_execute_migrations(
        self, request: web.Request, call: ApiCall
    ) -> web.StreamResponse:
        self.migrations_executed += 1
        return web.json_response({})

    async def _api_ticket_states(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        return web.json_response(
            [{"id": sid, "name": name, "state_type": kind} for sid, name, kind in STATES]
        )

    async def _api_article_create(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        data = await self._json_body(request)
        ticket_id = data.get("ticket_id")
        if ticket_id is None:
            raise FakeError(404, "Couldn't find Ticket without an ID")
        try:
            ticket = self._ticket(int(ticket_id))
        except (TypeError, ValueError) as exc:
            raise FakeError(404, f"Couldn't find Ticket with 'id'={ticket_id}") from exc
        author = call.user
        article = self.store_article(ticket, self.parse_article(data, author), author)
        call.changes.append(Change(ticket["id"], article["id"]))
        return web.json_response(self.article_json(article), status=201)

    async def _api_articles_by_ticket(
        self, request: web.Request, call: ApiCall
    ) -> web.StreamResponse:
        ticket = self._ticket(int(request.match_info["id"]))
        return web.json_response(self.articles_of(ticket["id"]))

    async def _api_article_show(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        article_id = int(request.match_info["id"])
        if article_id not in self.articles:
            raise FakeError(404, f"Couldn't find Ticket::Article with 'id'={article_id}")
        return web.json_response(self.article_json(self.articles[article_id]))

    async def _api_attachment(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        ticket_id = int(request.match_info["ticket_id"])
        article_id = int(request.match_info["article_id"])
        attachment_id = int(request.match_info["id"])
        article = self.articles.get(article_id)
        if article is None:
            raise FakeError(404, f"Couldn't find Ticket::Article with 'id'={article_id}")
        if article["ticket_id"] != ticket_id:
            raise FakeError(403, "No access, article_id/ticket_id is not matching.")
        stored = self.attachments.get(attachment_id)
        if stored is None:
            raise FakeError(404, f"Couldn't find Store with 'id'={attachment_id}")
        if stored.article_id != article_id:
            raise FakeError(403, "Requested file id is not linked with article_id.")
        disposition = request.query.get("disposition", "inline")
        if disposition not in ("inline", "attachment"):
            raise FakeError(
                403,
                f"Invalid disposition {disposition} requested. "
                "Only inline and attachment are allowed.",
            )
        content_type = (
            stored.preferences.get("Content-Type")
            or stored.preferences.get("Mime-Type")
            or "application/octet-stream"
        )
        return web.Response(
            body=stored.data,
            headers={
                "Content-Type": content_type,
                "Content-Disposition": f'{disposition}; filename="{stored.filename}"',
            },
        )

    async def _api_no_route(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        raise FakeError(404, f"No route matches [{request.method}] {request.path}")

    def _api(self, handler: ApiHandler) -> Handler:
        """An API route: recorded, subject to faults and auth, triggers run after the answer."""

        async def serve(request: web.Request) -> web.StreamResponse:
            self._record(request, await request.read())
            call = ApiCall(user=self.integration_user, changes=[])
            # Counted as webhook activity until its triggers are dispatched, so that
            # wait_deliveries_idle cannot slip in between the answer and the dispatch.
            self._begin_activity()
            try:
                response = await self._answer_api(request, call, handler)
                if call.changes:
                    # Zammad runs triggers after the commit, in a background job: send the
                    # answer out completely before any webhook can leave.
                    await response.prepare(request)
                    await response.write_eof()
                    self.dispatch(call.changes)
                return response
            finally:
                self._end_activity()

        return serve

    async def _answer_api(
        self, request: web.Request, call: ApiCall, handler: ApiHandler
    ) -> web.StreamResponse:
        """Faults, authentication and errors around every /api request."""
        if self.down:
            # "Down" drops the connection without an answer, like a crashed or restarting host.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        fault = self._take_fault(request.path)
        if fault is not None and fault.stall_secs:
            # Woken early by come_back/reset/shutdown, so a stalled request never holds up a test.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stall_release.wait(), fault.stall_secs)
        if fault is not None and fault.status is not None:
            return _fault_response(fault.status, fault.body, fault.content_type)
        # No fault, or a pure stall (status None): answer as usual.
        try:
            call.user = self._authenticate(request)
            return await handler(request, call)
        except FakeError as exc:
            return error_response(exc.status, exc.message)

    def _take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.path_prefix is None or path.startswith(fault.path_prefix):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _record(self, request: web.Request, raw: bytes) -> None:
        try:
            body: Any = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.received_log.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "json": body,
                "headers": {
                    name: value
                    for name, value in request.headers.items()
                    if name.lower() != "authorization"
                },
                "at": now_iso(),
            }
        )

    # -- the webhook emitter ------------------------------------------------------------------

    def dispatch(self, changes: Sequence[Change]) -> None:
        """Run the trigger for each change and queue the deliveries it fires."""
        config = self.webhook
        for change in changes:
            if config.url is None or not self._trigger_matches(change):
                continue
            delivery = Delivery(
                delivery_id=str(uuid.uuid4()),
                trigger=TRIGGER_NAME,
                ticket_id=change.ticket_id,
                article_id=change.article_id,
                empty_article=self.delivery_mode == "empty_article",
                bad_signature=self.delivery_mode == "bad_signature",
                delay_secs=self.delay_secs if self.delivery_mode == "delay" else 0.0,
            )
            if self.delivery_mode in ("hold", "reorder"):
                self.held.append(delivery)
            elif self.delivery_mode == "duplicate":
                # Two jobs with one delivery id, each with its own attempts and retries.
                self._spawn(self._deliver(delivery))
                self._spawn(self._deliver(dataclasses.replace(delivery)))
            else:
                self._spawn(self._deliver(delivery))

    def _trigger_matches(self, change: Change) -> bool:
        if change.article_id is None:  # a state change without an article
            return True
        article = self.articles[change.article_id]
        if AUTOMATIC_SUBJECT_MARKER in (article["subject"] or "").lower():
            return False
        return self.webhook.trigger_on_customer or article["sender_id"] == 1

    async def release_deliveries(self) -> int:
        """Send the held deliveries (newest first in "reorder" mode), one after the other."""
        held, self.held = self.held, []
        if self.delivery_mode == "reorder":
            held.reverse()
        self._spawn(self._release_in_order(held))
        return len(held)

    async def _release_in_order(self, held: list[Delivery]) -> None:
        # Each delivery's first attempt finishes before the next starts, so the receiver sees
        # exactly the intended order; retries then continue in the background.
        for delivery in held:
            first_attempt_done = asyncio.Event()
            self._spawn(self._deliver(delivery, first_attempt_done))
            await first_attempt_done.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._delivery_tasks.add(task)
        self._begin_activity()

        def finished(done: asyncio.Task[None]) -> None:
            self._delivery_tasks.discard(done)
            self._end_activity()

        task.add_done_callback(finished)

    def _begin_activity(self) -> None:
        self._activity += 1
        self._idle.clear()

    def _end_activity(self) -> None:
        self._activity -= 1
        if self._activity == 0:
            self._idle.set()

    async def wait_deliveries_idle(self, limit_secs: float) -> None:
        """Until no delivery is being sent or waiting (for a retry or a delay) and no API request
        is being answered, whose triggers could still fire. Held deliveries do not count."""
        try:
            await asyncio.wait_for(self._idle.wait(), limit_secs)
        except TimeoutError:
            raise TimeoutError(f"webhook deliveries still busy after {limit_secs} s") from None

    async def _deliver(
        self, delivery: Delivery, first_attempt_done: asyncio.Event | None = None
    ) -> None:
        try:
            if delivery.delay_secs:
                await asyncio.sleep(delivery.delay_secs)
            for retry in range(WEBHOOK_RETRIES + 1):
                if retry:
                    await asyncio.sleep(
                        retry * WEBHOOK_RETRY_STEP_SECS * self.webhook.retry_time_factor
                    )
                ok = await self._attempt(delivery)
                if first_attempt_done is not None:
                    first_attempt_done.set()
                if ok is None or ok:  # dropped (record gone, webhook off) or delivered
                    return
        finally:
            if first_attempt_done is not None:
                first_attempt_done.set()

    async def _attempt(self, delivery: Delivery) -> bool | None:
        """One POST; None when the job is dropped, as Zammad drops jobs of deleted records."""
        config = self.webhook
        ticket = self.tickets.get(delivery.ticket_id)
        if config.url is None or ticket is None:
            return None
        article: dict[str, Any] | None = None
        if delivery.article_id is not None and not delivery.empty_article:
            article = self.articles.get(delivery.article_id)
            if article is None:
                return None
        # Built on every attempt from the current records, as Zammad's job does.
        payload = {
            "article": self._article_payload(article),
            "ticket": self._ticket_payload(ticket),
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        raw = body.encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Zammad User Agent",
            "X-Zammad-Trigger": delivery.trigger,
            "X-Zammad-Delivery": delivery.delivery_id,
        }
        secret = config.signature_secret
        if delivery.bad_signature:
            secret = (secret or "") + "-not-the-secret"
        if secret:
            digest = hmac.new(secret.encode(), raw, hashlib.sha1).hexdigest()
            headers["X-Hub-Signature"] = f"sha1={digest}"
        delivery.attempts += 1
        entry: dict[str, Any] = {
            "delivery_id": delivery.delivery_id,
            "trigger": delivery.trigger,
            "attempt": delivery.attempts,
            "url": config.url,
            "status": None,
            "error": None,
            "ok": False,
            "headers": headers,
            "payload": payload,
            "body": body,  # the exact text sent and signed, for replaying it elsewhere
            "at": now_iso(),
        }
        self.delivery_log.append(entry)
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=WEBHOOK_CONNECT_TIMEOUT_SECS,
            sock_read=config.read_timeout_secs,
        )
        try:
            async with self._session().post(
                config.url, data=raw, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                entry["status"] = response.status
                await response.read()  # ignored, like Zammad does, but drained for keep-alive
        except (TimeoutError, aiohttp.ClientError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return False
        entry["ok"] = 200 <= response.status < 300
        return bool(entry["ok"])

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    def _user_payload(self, user_id: int | None) -> dict[str, Any]:
        user = self.users.get(user_id) if user_id is not None else None
        if user is None:
            return {}
        shaped = {k: copy.deepcopy(v) for k, v in user.items() if k not in SENSITIVE_USER_KEYS}
        shaped["roles"] = [name for rid, name in ROLES if rid in user["role_ids"]]
        return shaped

    def _ticket_payload(self, ticket: dict[str, Any]) -> dict[str, Any]:
        shaped = self.ticket_json(ticket)
        shaped["state"] = self._lookup(STATES, "state", ticket["state_id"])[1]
        shaped["create_article_type"] = (
            self._lookup(ARTICLE_TYPES, "type", ticket["create_article_type_id"])[1]
            if ticket["create_article_type_id"]
            else None
        )
        shaped["create_article_sender"] = (
            self._lookup(SENDERS, "sender", ticket["create_article_sender_id"])[1]
            if ticket["create_article_sender_id"]
            else None
        )
        priority_id, priority_name = self._lookup(PRIORITIES, "priority", ticket["priority_id"])
        shaped["priority"] = _priority(priority_id, priority_name, ticket["created_at"])
        shaped["group"] = copy.deepcopy(self.groups[ticket["group_id"]])
        shaped["organization"] = {}  # the fake has no organizations
        for name in ("owner", "customer", "created_by", "updated_by"):
            shaped[name] = self._user_payload(ticket[f"{name}_id"])
        return shaped

    def _article_payload(self, article: dict[str, Any] | None) -> dict[str, Any]:
        if article is None:
            return {}
        shaped = self.article_json(article)
        del shaped["time_unit"]
        origin = self.users.get(article["origin_by_id"]) if article["origin_by_id"] else None
        shaped["origin_by"] = origin["login"] if origin else None
        shaped["created_by"] = self._user_payload(article["created_by_id"])
        shaped["updated_by"] = self._user_payload(article["updated_by_id"])
        shaped["accounted_time"] = 0
        for item in shaped["attachments"]:
            item["url"] = (
                f"{self.public_url}/api/v1/ticket_attachment/"
                f"{article['ticket_id']}/{article['id']}/{item['id']}"
            )
        return shaped

    # -- controls (also used by FakeZammadServer and the console) -----------------------------

    async def agent_reply(
        self,
        ticket_id: int,
        body: str,
        *,
        internal: bool = False,
        content_type: str = "text/html",
        attachments: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Emma answers in the Zammad UI: a note by an agent, then the triggers run."""
        ticket = self._ticket(ticket_id)
        data: dict[str, Any] = {
            "body": body,
            "type": "note",
            "sender": "Agent",
            "internal": internal,
            "content_type": content_type,
            "attachments": [_control_attachment(item) for item in attachments or ()],
        }
        article = self.store_article(
            ticket, self.parse_article(data, self.agent_user), self.agent_user
        )
        self.dispatch([Change(ticket_id, article["id"])])
        return self.article_json(article)

    async def close_ticket(self, ticket_id: int) -> dict[str, Any]:
        """Emma closes the ticket in the UI."""
        ticket = self._ticket(ticket_id)
        change = self.update_ticket(ticket, {"state": "closed"}, self.agent_user)
        if change is not None:
            self.dispatch([change])
        return self.ticket_json(ticket)

    async def fail_next(
        self,
        count: int,
        status: int | None = 500,
        stall_secs: float | None = None,
        path_prefix: str | None = None,
        body: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """The next ``count`` API requests (under ``path_prefix``) fail: optionally after
        stalling, with ``status`` (None: answer normally after the stall) and optionally a raw
        ``body`` instead of Zammad's error JSON."""
        if count > 0:
            self.faults.append(Fault(count, status, stall_secs, path_prefix, body, content_type))

    async def go_down(self) -> None:
        self.down = True

    async def come_back(self) -> None:
        self.down = False
        self._wake_stalls()

    async def set_webhook(
        self,
        *,
        url: str | None,
        signature_secret: str | None = None,
        trigger_on_customer: bool = True,
        retry_time_factor: float | None = None,
        read_timeout_secs: float | None = None,
    ) -> None:
        self.webhook = WebhookConfig(
            url=url,
            signature_secret=signature_secret,
            trigger_on_customer=trigger_on_customer,
            retry_time_factor=(
                self.webhook.retry_time_factor if retry_time_factor is None else retry_time_factor
            ),
            read_timeout_secs=(
                self.webhook.read_timeout_secs if read_timeout_secs is None else read_timeout_secs
            ),
        )

    async def set_delivery_mode(self, mode: str, delay_secs: float = 0.0) -> None:
        if mode not in DELIVERY_MODES:
            raise FakeError(422, f"Unknown delivery mode {mode!r}; one of {sorted(DELIVERY_MODES)}")
        self.delivery_mode = mode
        self.delay_secs = delay_secs

    def state(self) -> dict[str, Any]:
        return {
            "users": [
                {key: user[key] for key in ("id", "login", "firstname", "lastname", "role_ids")}
                for user in self.users.values()
            ],
            "groups": [group["name"] for group in self.groups.values()],
            "tickets": [
                {
                    **self.ticket_json(ticket),
                    "state": self._lookup(STATES, "state", ticket["state_id"])[1],
                    "articles": self.articles_of(ticket["id"]),
                }
                for ticket in self.tickets.values()
            ],
            "webhook": {
                "url": self.webhook.url,
                "signature_secret": "**********" if self.webhook.signature_secret else None,
                "trigger_on_customer": self.webhook.trigger_on_customer,
                "retry_time_factor": self.webhook.retry_time_factor,
                "read_timeout_secs": self.webhook.read_timeout_secs,
            },
            "delivery_mode": self.delivery_mode,
            "delay_secs": self.delay_secs,
            "held_deliveries": len(self.held),
            "down": self.down,
            "faults": len(self.faults),
        }

    # -- the application ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        @web.middleware
        async def fake_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except FakeError as exc:
                return error_response(exc.status, exc.message)

        app = web.Application(middlewares=[fake_errors])
        api = "/api/v1"
        routes: list[tuple[str, str, ApiHandler]] = [
            ("GET", f"{api}/users/me", self._api_users_me),
            ("GET", f"{api}/users/{{id:\\d+}}", self._api_user_show),
            ("POST", f"{api}/tickets", self._api_ticket_create),
            ("GET", f"{api}/tickets/search", self._api_ticket_search),
            ("GET", f"{api}/tickets/{{id:\\d+}}", self._api_ticket_show),
            ("PUT", f"{api}/tickets/{{id:\\d+}}", self._api_ticket_update),
            ("GET", f"{api}/ticket_states", self._api_ticket_states),
            ("POST", f"{api}/ticket_articles", self._api_article_create),
            ("GET", f"{api}/ticket_articles/by_ticket/{{id:\\d+}}", self._api_articles_by_ticket),
            ("GET", f"{api}/ticket_articles/{{id:\\d+}}", self._api_article_show),
            (
                "GET",
                f"{api}/ticket_attachment/{{ticket_id:\\d+}}/{{article_id:\\d+}}/{{id:\\d+}}",
                self._api_attachment,
            ),
            # Admin resources the provisioning command (``setup_zammad``) manages by name.
            (
                "GET",
                f"{api}/{{kind:groups|webhooks|triggers|object_manager_attributes}}",
                self._api_resource_list,
            ),
            (
                "POST",
                f"{api}/{{kind:groups|webhooks|triggers|object_manager_attributes}}",
                self._api_resource_create,
            ),
            (
                "PUT",
                f"{api}/{{kind:groups|webhooks|triggers|object_manager_attributes}}/{{id:\\d+}}",
                self._api_resource_update,
            ),
            (
                "POST",
                f"{api}/object_manager_attributes_execute_migrations",
                self._api_execute_migrations,
            ),
            # Anything else under /api answers like Zammad's routing error, after auth.
            ("*", "/api/{tail:.*}", self._api_no_route),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._api(handler))
        _add_control_routes(app, self)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        # Before aiohttp waits for running handlers: let stalled requests finish now.
        self._wake_stalls()

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in list(self._delivery_tasks):
            task.cancel()
        if self._delivery_tasks:
            await asyncio.gather(*self._delivery_tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    @classmethod
    def start_threaded(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = DEFAULT_TOKEN,
        webhook_url: str | None = None,
        signature_secret: str | None = None,
        *,
        trigger_on_customer: bool = True,
        retry_time_factor: float = 1.0,
        webhook_read_timeout_secs: float = WEBHOOK_READ_TIMEOUT_SECS,
        groups: Sequence[str] = DEFAULT_GROUPS,
    ) -> FakeZammadServer:
        fake = cls(
            token=token,
            webhook_url=webhook_url,
            signature_secret=signature_secret,
            trigger_on_customer=trigger_on_customer,
            retry_time_factor=retry_time_factor,
            webhook_read_timeout_secs=webhook_read_timeout_secs,
            groups=groups,
        )
        server = ThreadedServer(fake.make_app, host, port)
        fake.public_url = server.url  # the port is chosen before the server starts
        server.start()
        return FakeZammadServer(server, fake)


class FakeZammadServer:
    """A running fake with blocking controls for tests; each runs on the server's loop.

    Do not call these from a coroutine that also serves something the fake waits for (a webhook
    receiver on the same loop): they block the calling thread until the fake is done.
    """

    def __init__(self, server: ThreadedServer, fake: FakeZammad) -> None:
        self.server = server
        self.fake = fake

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.fake.token

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return self.server.call(coro, timeout)

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> FakeZammadServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def agent_reply(
        self,
        ticket_id: int,
        body: str,
        *,
        internal: bool = False,
        content_type: str = "text/html",
        attachments: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """``attachments``: ``{"filename", "data" (bytes or base64 text), "mime-type"}`` each."""
        return self.call(
            self.fake.agent_reply(
                ticket_id,
                body,
                internal=internal,
                content_type=content_type,
                attachments=attachments,
            )
        )

    def close_ticket(self, ticket_id: int) -> dict[str, Any]:
        return self.call(self.fake.close_ticket(ticket_id))

    def fail_next(
        self,
        n: int,
        status: int | None = 500,
        stall_secs: float | None = None,
        path_prefix: str | None = None,
        *,
        body: str | None = None,
        content_type: str | None = None,
    ) -> None:
        self.call(self.fake.fail_next(n, status, stall_secs, path_prefix, body, content_type))

    def go_down(self) -> None:
        self.call(self.fake.go_down())

    def come_back(self) -> None:
        self.call(self.fake.come_back())

    def set_webhook(
        self,
        url: str | None,
        signature_secret: str | None = None,
        trigger_on_customer: bool = True,
        *,
        retry_time_factor: float | None = None,
        read_timeout_secs: float | None = None,
    ) -> None:
        self.call(
            self.fake.set_webhook(
                url=url,
                signature_secret=signature_secret,
                trigger_on_customer=trigger_on_customer,
                retry_time_factor=retry_time_factor,
                read_timeout_secs=read_timeout_secs,
            )
        )

    def set_delivery_mode(self, mode: str, delay_secs: float = 0.0) -> None:
        self.call(self.fake.set_delivery_mode(mode, delay_secs))

    def release_deliveries(self) -> int:
        return self.call(self.fake.release_deliveries())

    def wait_deliveries_idle(self, timeout: float = 5.0) -> None:
        self.call(self.fake.wait_deliveries_idle(timeout), timeout + 5)

    def received(self, path_prefix: str | None = None) -> list[dict[str, Any]]:
        return self.call(_snapshot(lambda: _filter_prefix(self.fake.received_log, path_prefix)))

    def deliveries(self) -> list[dict[str, Any]]:
        return self.call(_snapshot(lambda: self.fake.delivery_log))

    def tickets(self) -> list[dict[str, Any]]:
        return self.call(
            _snapshot(lambda: [self.fake.ticket_json(t) for t in self.fake.tickets.values()])
        )

    def articles(self, ticket_id: int) -> list[dict[str, Any]]:
        return self.call(_snapshot(lambda: self.fake.articles_of(ticket_id)))

    def state(self) -> dict[str, Any]:
        return self.call(_snapshot(self.fake.state))

    def reset(self) -> None:
        self.call(self.fake.reset())


async def _snapshot(read: Callable[[], T]) -> T:
    """A deep copy taken on the server's loop, so tests never see state change under them."""
    return copy.deepcopy(read())


def _filter_prefix(entries: list[dict[str, Any]], path_prefix: str | None) -> list[dict[str, Any]]:
    return [
        entry for entry in entries if path_prefix is None or entry["path"].startswith(path_prefix)
    ]


# -- control routes and console --------------------------------------------------------------------


def _add_control_routes(app: web.Application, fake: FakeZammad) -> None:
    async def read_json(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise FakeError(400, f"Invalid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise FakeError(400, "Expected a JSON object.")
        return parsed

    async def console(request: web.Request) -> web.StreamResponse:
        return web.Response(text=CONSOLE_HTML, content_type="text/html")

    async def state(request: web.Request) -> web.StreamResponse:
        return web.json_response(fake.state())

    async def tickets(request: web.Request) -> web.StreamResponse:
        return web.json_response([fake.ticket_json(t) for t in fake.tickets.values()])

    async def articles(request: web.Request) -> web.StreamResponse:
        ticket = fake._ticket(int(request.match_info["id"]))
        return web.json_response(fake.articles_of(ticket["id"]))

    async def reply(request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        article = await fake.agent_reply(
            int(request.match_info["id"]),
            str(data.get("body", "")),
            internal=_as_bool(data.get("internal", False)),
            content_type=str(data.get("content_type", "text/html")),
            attachments=data.get("attachments"),
        )
        return web.json_response(article, status=201)

    async def close(request: web.Request) -> web.StreamResponse:
        return web.json_response(await fake.close_ticket(int(request.match_info["id"])))

    async def fail(request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        await fake.fail_next(
            int(data.get("count", 1)),
            data.get("status", 500),
            data.get("stall_secs"),
            data.get("path_prefix"),
            data.get("body"),
            data.get("content_type"),
        )
        return web.json_response({"faults": len(fake.faults)})

    async def down(request: web.Request) -> web.StreamResponse:
        await fake.go_down()
        return web.json_response({"down": True})

    async def up(request: web.Request) -> web.StreamResponse:
        await fake.come_back()
        return web.json_response({"down": False})

    async def webhook(request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        await fake.set_webhook(
            url=data.get("url"),
            signature_secret=data.get("signature_secret"),
            trigger_on_customer=_as_bool(data.get("trigger_on_customer", True)),
            retry_time_factor=data.get("retry_time_factor"),
            read_timeout_secs=data.get("read_timeout_secs"),
        )
        return web.json_response(fake.state()["webhook"])

    async def delivery_mode(request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        await fake.set_delivery_mode(
            str(data.get("mode", "normal")), float(data.get("delay_secs", 0))
        )
        return web.json_response({"mode": fake.delivery_mode, "delay_secs": fake.delay_secs})

    async def release(request: web.Request) -> web.StreamResponse:
        return web.json_response({"released": await fake.release_deliveries()})

    async def wait_idle(request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        try:
            await fake.wait_deliveries_idle(float(data.get("timeout", 10)))
        except TimeoutError as exc:
            raise FakeError(408, str(exc)) from exc
        return web.json_response({"idle": True})

    async def received(request: web.Request) -> web.StreamResponse:
        prefix = request.query.get("path_prefix")
        return web.json_response(_filter_prefix(fake.received_log, prefix))

    async def deliveries(request: web.Request) -> web.StreamResponse:
        return web.json_response(fake.delivery_log)

    async def reset(request: web.Request) -> web.StreamResponse:
        await fake.reset()
        return web.json_response({"reset": True})

    async def to_console(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{prefix}/")

    prefix = "/__fake__"
    app.router.add_get("/", to_console)
    app.router.add_get(prefix, to_console)
    app.router.add_get(f"{prefix}/", console)
    app.router.add_get(f"{prefix}/state", state)
    app.router.add_get(f"{prefix}/tickets", tickets)
    app.router.add_get(f"{prefix}/tickets/{{id:\\d+}}/articles", articles)
    app.router.add_post(f"{prefix}/tickets/{{id:\\d+}}/reply", reply)
    app.router.add_post(f"{prefix}/tickets/{{id:\\d+}}/close", close)
    app.router.add_post(f"{prefix}/fail", fail)
    app.router.add_post(f"{prefix}/down", down)
    app.router.add_post(f"{prefix}/up", up)
    app.router.add_put(f"{prefix}/webhook", webhook)
    app.router.add_put(f"{prefix}/delivery_mode", delivery_mode)
    app.router.add_post(f"{prefix}/deliveries/release", release)
    app.router.add_post(f"{prefix}/deliveries/wait_idle", wait_idle)
    app.router.add_get(f"{prefix}/received", received)
    app.router.add_get(f"{prefix}/deliveries", deliveries)
    app.router.add_post(f"{prefix}/reset", reset)


CONSOLE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Fake Zammad agent console</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
  .ticket { border: 1px solid #ccc; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
  .meta { color: #666; font-size: 13px; }
  .article { padding: .4rem .6rem; margin: .3rem 0; border-left: 4px solid #4a90d9;
             background: #f4f8fc; white-space: pre-wrap; }
  .article.customer { border-color: #7b7; background: #f4fbf4; }
  .article.internal { border-color: #e0a030; background: #fff8e8; }
  textarea { width: 100%; min-height: 4rem; }
  #error { color: #b00; }
</style>
</head>
<body>
<h1>Fake Zammad</h1>
<p class="meta">Development and tests only. Replies are written by agent Emma Taylor.
The list refreshes every two seconds.</p>
<p id="error"></p>
<div id="tickets"></div>
<script>
"use strict";
const openForms = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, attrs || {});
  for (const child of children) {
    node.append(child);
  }
  return node;
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body || {}),
  });
  if (!response.ok) {
    document.getElementById("error").textContent = "Failed: " + (await response.text());
  }
  await refresh();
}

function renderTicket(ticket) {
  const box = el("div", {className: "ticket"},
    el("strong", {}, "#" + ticket.number + " " + ticket.title),
    el("div", {className: "meta"}, "id " + ticket.id + " · state " + ticket.state +
       " · automatic answers " + ticket.automatic_answers));
  for (const article of ticket.articles) {
    const kind = article.internal ? "internal" : (article.sender === "Customer" ? "customer" : "");
    // Bodies are shown as text on purpose: they are whatever the chat server sent.
    box.append(el("div", {className: "article " + kind},
      el("div", {className: "meta"}, article.sender + (article.internal ? " (internal)" : "") +
         " · " + article.created_at + " · " + (article.subject || "")),
      article.body,
      ...article.attachments.map(a => el("div", {className: "meta"},
        "📎 " + a.filename + " (" + a.size + " bytes)"))));
  }
  const text = el("textarea", {placeholder: "Reply as agent"});
  text.value = openForms.get(ticket.id) || "";
  text.addEventListener("input", () => openForms.set(ticket.id, text.value));
  const internal = el("input", {type: "checkbox"});
  const send = el("button", {type: "submit"}, "Send reply");
  const close = el("button", {type: "button"}, "Close ticket");
  close.addEventListener("click", () => post("tickets/" + ticket.id + "/close"));
  const form = el("form", {}, text, el("label", {}, internal, " internal note "), send, " ", close);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    openForms.delete(ticket.id);
    post("tickets/" + ticket.id + "/reply", {body: text.value, internal: internal.checked});
  });
  box.append(form);
  return box;
}

async function refresh() {
  if (document.activeElement && document.activeElement.tagName === "TEXTAREA") {
    return;  // do not rebuild the page under someone typing
  }
  const response = await fetch("state");
  const state = await response.json();
  const list = document.getElementById("tickets");
  list.replaceChildren(...state.tickets.slice().reverse().map(renderTicket));
  if (!state.tickets.length) {
    list.append(el("p", {className: "meta"}, "No tickets yet."));
  }
}

refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""


# -- small helpers ------------------------------------------------------------------------------


def _user(
    user_id: int,
    login: str,
    firstname: str,
    lastname: str,
    email: str | None,
    role_ids: list[int],
    group_ids: dict[str, list[str]],
    created: str,
    *,
    active: bool = True,
) -> dict[str, Any]:
    """A user with every field of the recorded users_create/users_me responses, in their order."""
    return {
        "id": user_id,
        "organization_id": None,
        "login": login,
        "firstname": firstname,
        "lastname": lastname,
        "email": login if email is None else email,
        "image": None,
        "image_source": None,
        "web": "",
        "phone": "",
        "fax": "",
        "mobile": "",
        "department": None,
        "street": "",
        "zip": "",
        "city": "",
        "country": "",
        "address": None,
        "vip": False,
        "verified": False,
        "active": active,
        "note": "",
        "last_login": None,
        "source": None,
        "login_failed": 0,
        "out_of_office": False,
        "out_of_office_start_at": None,
        "out_of_office_end_at": None,
        "out_of_office_replacement_id": None,
        "preferences": {"locale": "en-us"},
        "updated_by_id": 1,
        "created_by_id": 1,
        "created_at": created,
        "updated_at": created,
        "role_ids": role_ids,
        "two_factor_preference_ids": [],
        "organization_ids": [],
        "authorization_ids": [],
        "overview_sorting_ids": [],
        "group_ids": group_ids,
    }


def _group(group_id: int, name: str, created: str) -> dict[str, Any]:
    """A group as in the recorded groups_show response."""
    return {
        "id": group_id,
        "signature_id": 1,
        "email_address_id": None,
        "name": name,
        "name_last": name,
        "parent_id": None,
        "assignment_timeout": None,
        "follow_up_possible": "yes",
        "reopen_time_in_days": None,
        "follow_up_assignment": True,
        "active": True,
        "shared_drafts": True,
        "note": "Standard Group/Pool for Tickets." if name == "Users" else None,
        "updated_by_id": 1,
        "created_by_id": 1,
        "created_at": created,
        "updated_at": created,
        "user_ids": [3, 5],
    }


def _priority(priority_id: int, name: str, created: str) -> dict[str, Any]:
    return {
        "id": priority_id,
        "name": name,
        "default_create": priority_id == 2,
        "ui_icon": None,
        "ui_color": None,
        "note": None,
        "active": True,
        "updated_by_id": 1,
        "created_by_id": 1,
        "created_at": created,
        "updated_at": created,
    }


def _as_bool(value: Any) -> bool:
    # Rails casts "true"/"false"/"1"/"0" in JSON params to booleans.
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "t", "yes", "on")
    return bool(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _parse_attachments(items: Any) -> list[tuple[str, bytes, dict[str, Any]]]:
    """Inline base64 attachments; the 422 texts are Zammad's (research 5.1)."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise FakeError(422, "Attachments must be a list.")
    parsed = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise FakeError(
                422, f"Attachment needs 'filename' param for attachment with index '{index}'"
            )
        for key in ("filename", "data", "mime-type"):
            if not item.get(key):
                raise FakeError(
                    422, f"Attachment needs '{key}' param for attachment with index '{index}'"
                )
        try:
            # Zammad removes newlines, then decodes strictly.
            data = base64.b64decode(
                str(item["data"]).replace("\n", "").replace("\r", ""), validate=True
            )
        except (binascii.Error, ValueError) as exc:
            raise FakeError(422, f"Invalid base64 for attachment with index '{index}'") from exc
        preferences: dict[str, Any] = {"Mime-Type": str(item["mime-type"])}
        if item.get("charset"):
            preferences["Charset"] = str(item["charset"])
        parsed.append((str(item["filename"]), data, preferences))
    return parsed


def _control_attachment(item: Mapping[str, Any]) -> dict[str, Any]:
    """An agent_reply attachment: data as bytes (tests) or base64 text (HTTP controls)."""
    data = item.get("data", b"")
    encoded = base64.b64encode(data).decode() if isinstance(data, bytes) else str(data)
    return {
        "filename": item.get("filename"),
        "data": encoded,
        # The agent UI always knows a type; default it so tests can leave it out.
        "mime-type": item.get("mime-type") or item.get("mime_type") or "application/octet-stream",
    }

"""What happens on the request path: reading a conversation, storing a device's message,
taking a Zammad webhook. Views and consumers call these and nothing else.

Each action writes in one transaction with the chat row locked, collects its events in an
``Outbox`` and publishes them after the commit. Calls to Zammad and the bot never happen here:
they are durable background work (``background.py``), queued in the same transaction.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import random  # the beta roll is not security-relevant
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import metrics, poll_cache, queries, validation
from .attachments import NewAttachment
from .batching import GroupCommit
from .content import clean_text, sanitize_html, text_to_html
from .db import database_sync_to_async
from .errors import (
    ChatError,
    ChatNotFound,
    InvalidMessage,
    InvalidWebhook,
    NotConfigured,
    NotFound,
    WebhookUnauthorized,
)
from .events import Conversation, conversation, rest_conversation
from .models import (
    BetaRoll,
    Chat,
    Message,
    Region,
    Upload,
    WebhookDelivery,
    Work,
    new_attachment_token,
)
from .publish import Outbox

logger = logging.getLogger(__name__)

# The subject that marks the server's own bot answers and translations in Zammad.
AUTOMATIC_SUBJECT = "automatically generated message"
USER_SUBJECT = "app user message"
# preferences[OWN_MARK] = {"message_id": ...} on every article the server writes: how a retry
# after a crash recognises an article that already reached Zammad.
OWN_MARK = "integreat_chat"

Route = Literal["rest", "socket"]


def log_device(device_id: str) -> str:
    """Device ids are bearer secrets: logs carry only their first 8 characters."""
    return device_id[:8]


def bot_enabled() -> bool:
    return bool(settings.CHATBOT_URL)


# --- regions and chats ----------------------------------------------------------------------


def get_region(slug: str) -> Region:
    region = Region.objects.filter(slug=validation.region_slug(slug)).first()
    if region is None:
        raise NotFound
    return region


def configured_region(slug: str) -> Region:
    region = get_region(slug)
    if not region.is_configured:
        raise NotConfigured
    return region


def current_chat(region: Region, device_id: str, *, lock: bool = False) -> Chat | None:
    chats = Chat.objects.filter(region=region, device_id=device_id, is_current=True)
    if lock:
        chats = chats.select_for_update()
    chat = chats.first()
    if chat is None or chat.is_expired:
        return None
    chat.region = region
    return chat


def _open_chat(region: Region, device_id: str, language: str) -> Chat:
    """A new current chat; an expired one stops being current. Concurrent openers meet at the
    unique constraint, and the loser takes the winner's chat."""
    now = timezone.now()
    try:
        with transaction.atomic():
            Chat.objects.filter(region=region, device_id=device_id, is_current=True).update(
                is_current=False
            )
            chat = Chat.objects.create(
                region=region,
                device_id=device_id,
                language=language,
                created_at=now,
                last_activity_at=now,
                expires_at=Chat.expiry_from(now),
            )
    except IntegrityError:
        existing = current_chat(region, device_id, lock=True)
        if existing is None:
            raise
        return existing
    logger.info("chat %s opened for device %s", chat.pk, log_device(device_id))
    return chat


def _touch(chat: Chat) -> None:
    now = timezone.now()
    chat.last_activity_at = now
    chat.expires_at = Chat.expiry_from(now)


def append_message(chat: Chat, outbox: Outbox, **fields: Any) -> Message:
    """Add a message to a locked chat and publish it after the commit."""
    message = Message.objects.create(chat=chat, **fields)
    prev_id = chat.last_message_id
    chat.last_message_id = message.pk
    chat.version += 1
    outbox.message(chat, message, prev_id)
    return message


# What actions change on a chat.
CHAT_STATE_FIELDS = [
    "language",
    "last_activity_at",
    "expires_at",
    "automatic_answers",
    "evaluation_consent",
    "bot_typing",
    "version",
    "last_message_id",
    "ignored_article_ids",
    "zammad_ticket_id",
]


def save_chat(chat: Chat) -> None:
    chat.save(update_fields=CHAT_STATE_FIELDS)
    poll_cache.forget_on_commit([chat.device_id])


def new_work(
    chat: Chat,
    kind: Work.Kind,
    message: Message | None = None,
    payload: dict[str, Any] | None = None,
) -> Work:
    """Background work for a chat, not saved yet."""
    lane = {
        Work.Kind.ANSWER: Work.Lane.BOT,
        Work.Kind.TRANSLATE_REPLY: Work.Lane.BOT,
        Work.Kind.SYNC_TICKET: Work.Lane.SYNC,
    }.get(kind, Work.Lane.ZAMMAD)
    return Work(chat=chat, kind=kind, lane=lane, message=message, payload=payload or {})


def enqueue(
    chat: Chat,
    kind: Work.Kind,
    message: Message | None = None,
    payload: dict[str, Any] | None = None,
) -> Work:
    work = new_work(chat, kind, message, payload)
    work.save()
    return work


def _request_answer(chat: Chat, outbox: Outbox) -> None:
    """One bot answer for a burst: a new message joins an answer that has not started yet."""
    if not (bot_enabled() and chat.automatic_answers):
        return
    queued = Work.objects.filter(chat=chat, kind=Work.Kind.ANSWER, state=Work.State.QUEUED)
    if not queued.exists():
        enqueue(chat, Work.Kind.ANSWER)
    set_typing(chat, True, outbox)


def set_typing(chat: Chat, typing: bool, outbox: Outbox) -> None:
    if chat.bot_typing != typing:
        chat.bot_typing = typing
        chat.version += 1
        outbox.typing(chat)


# --- is_chat_enabled ------------------------------------------------------------------------


@database_sync_to_async
def is_chat_enabled(region_slug: str, device_id: str) -> bool:
    region = get_region(region_slug)
    if not region.is_configured:
        return False
    roll = BetaRoll.objects.filter(region=region, device_id=device_id).first()
    if roll is None:
        enabled = random.random() * 100 < region.beta_percentage
        try:
            with transaction.atomic():
                roll = BetaRoll.objects.create(region=region, device_id=device_id, enabled=enabled)
        except IntegrityError:
            roll = BetaRoll.objects.get(region=region, device_id=device_id)
    return roll.enabled


# --- sockets --------------------------------------------------------------------------------

# How long a socket's connect trusts a region it has seen configured: a reconnect storm opens
# thousands of sockets a second on a handful of regions.
SOCKET_REGION_TTL_SECS = 10.0
_socket_regions: dict[str, tuple[float, int]] = {}  # slug -> (valid until, region id)
# Lookups in flight, shared by the sockets that connect meanwhile: when thousands reconnect at
# once to a process that has not seen their region yet, each asking on its own queued every
# history read behind thousands of region lookups in the database threads (10,000 sockets:
# none connected in time).
_region_lookups: dict[str, asyncio.Task[int]] = {}


async def socket_region(region_slug: str) -> int:
    """The id of a region a socket may open on (else NotFound or NotConfigured).

    Only configured regions are remembered, for ``SOCKET_REGION_TTL_SECS``; the socket's
    ``read_socket_conversation`` checks the region again, so a region switched off meanwhile
    still refuses the socket, with the same close code."""
    remembered = _socket_regions.get(region_slug)
    if remembered is not None and remembered[0] > time.monotonic():
        return remembered[1]
    lookup = _region_lookups.get(region_slug)
    if lookup is None or lookup.get_loop() is not asyncio.get_running_loop():
        lookup = asyncio.ensure_future(_look_up_region(region_slug))
        _region_lookups[region_slug] = lookup
        lookup.add_done_callback(functools.partial(_region_looked_up, region_slug))
    # Shielded: a socket that closes while it waits does not cancel the others' lookup.
    return await asyncio.shield(lookup)


async def _look_up_region(region_slug: str) -> int:
    region_id = await _configured_region_id(region_slug)
    _socket_regions[region_slug] = (time.monotonic() + SOCKET_REGION_TTL_SECS, region_id)
    return region_id


def _region_looked_up(region_slug: str, lookup: asyncio.Task[int]) -> None:
    if _region_lookups.get(region_slug) is lookup:
        del _region_lookups[region_slug]
    if not lookup.cancelled():
        lookup.exception()  # retrieved here, should every socket waiting for it have closed


@database_sync_to_async
def _configured_region_id(region_slug: str) -> int:
    return configured_region(region_slug).pk


@dataclass(frozen=True)
class SocketSnapshot:
    region_id: int  # the region the conversation was read from
    conversation: Conversation
    last_id: int


async def read_socket_conversation(
    region_slug: str, device_id: str, *, after: int | None = None
) -> SocketSnapshot:
    """A socket's history on connect: the current chat's messages with ``id > after``, or an
    empty conversation; NotFound or NotConfigured as ``read_conversation``.

    Sockets opening at the same time share hops to a database thread (``_socket_reads``): read
    one by one, about 1 ms a read, 10,000 sockets opening at once waited 10 s, longer than
    clients wait."""
    try:
        snapshot = await _socket_reads.submit((region_slug, device_id, after))
    except (NotFound, NotConfigured):
        _socket_regions.pop(region_slug, None)
        raise
    _socket_regions[region_slug] = (time.monotonic() + SOCKET_REGION_TTL_SECS, snapshot.region_id)
    return snapshot


@database_sync_to_async
def _read_socket_conversations(
    reads: list[tuple[str, str, int | None]],
) -> list[SocketSnapshot | ChatError]:
    """The ``read_socket_conversation`` of each of ``reads``: two queries for all of them."""
    results: list[SocketSnapshot | ChatError | None] = [None] * len(reads)
    wanted: dict[tuple[str, str], list[int]] = {}  # (slug, device) -> indexes of reads
    for index, (region_slug, device_id, _after) in enumerate(reads):
        try:
            wanted.setdefault((validation.region_slug(region_slug), device_id), []).append(index)
        except ChatError as error:
            results[index] = error
    chats = {
        (chat.region.slug, chat.device_id): chat
        for chat in queries.socket_chats(
            sorted({slug for slug, _ in wanted}), sorted({device for _, device in wanted})
        )
    }
    # Every stored message moves last_message_id on: a device that has seen it missed none.
    missed: dict[int, int] = {}  # chat id -> the lowest ``after`` asked for it
    for key, indexes in wanted.items():
        chat_or_none = chats.get(key)
        if chat_or_none is None or chat_or_none.is_expired:
            continue
        for index in indexes:
            after = reads[index][2] or 0
            if after < chat_or_none.last_message_id:
                missed[chat_or_none.pk] = min(after, missed.get(chat_or_none.pk, after))
    messages: dict[int, list[Message]] = {}
    for message in queries.messages_after_each(missed):
        messages.setdefault(message.chat_id, []).append(message)
    regions: dict[str, int | ChatError] = {}
    for key, indexes in wanted.items():
        slug, current = key[0], chats.get(key)
        for index in indexes:
            if current is not None and not current.region.is_configured:
                results[index] = NotConfigured()
            elif current is None or current.is_expired:
                if slug not in regions:
                    try:
                        regions[slug] = configured_region(slug).pk
                    except ChatError as error:
                        regions[slug] = error
                region = regions[slug]
                if isinstance(region, ChatError):
                    results[index] = region
                else:
                    empty: Conversation = {
                        "messages": [],
                        "evaluation_consent": False,
                        "chatbot_typing": False,
                        "ticket_url": None,
                    }
                    results[index] = SocketSnapshot(region, empty, 0)
            else:
                after = reads[index][2] or 0
                own = [message for message in messages.get(current.pk, []) if message.pk > after]
                results[index] = SocketSnapshot(
                    current.region_id, conversation(current, own), current.last_message_id
                )
    answered: list[SocketSnapshot | ChatError] = []
    for result in results:
        assert result is not None  # every read has its error or its snapshot
        answered.append(result)
    return answered


SOCKET_READ_BATCH = 100
_socket_reads: GroupCommit[tuple[str, str, int | None], SocketSnapshot] = GroupCommit(
    _read_socket_conversations, SOCKET_READ_BATCH
)


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    body: bytes | None  # the REST answer (JSON); None: unchanged since the client's ETag
    etag: str


_ANSWERED_FROM_MEMORY = metrics.POLL_ANSWERS.labels("memory")
_ANSWERED_FROM_STORE = metrics.POLL_ANSWERS.labels("store")


def _matches(if_none_match: str | None, etag: str) -> bool:
    return if_none_match is not None and etag in {tag.strip() for tag in if_none_match.split(",")}


async def read_conversation(
    region_slug: str, device_id: str, *, after: int | None = None, if_none_match: str | None = None
) -> Snapshot:
    """The current chat's messages (only those with ``id > after``). Never calls Zammad.

    A poll is the hot path. A chat unchanged since this process last read it is answered from
    memory (``poll_cache``); otherwise the chat and its region come in one query, and a poll
    answered by its ETag needs no other (both hand-written, ``queries``, read from the event
    loop)."""
    slug = validation.region_slug(region_slug)
    polls = poll_cache.cache()
    if polls is not None and (remembered := polls.recall(slug, device_id)) is not None:
        etag = remembered.etag(after)
        unchanged = _matches(if_none_match, etag)
        body = None if unchanged else remembered.bodies.get(after or 0)
        if unchanged or body is not None:
            _ANSWERED_FROM_MEMORY.inc()
            return Snapshot(body, etag)
    _ANSWERED_FROM_STORE.inc()
    ticket = polls.ticket() if polls is not None else None
    chat = await queries.current_chat(slug, device_id)
    if chat is not None and not chat.region.is_configured:
        raise NotConfigured
    if chat is None or chat.is_expired:
        # NotFound or NotConfigured before "Chat not found."
        await database_sync_to_async(configured_region)(slug)
        raise ChatNotFound
    found = poll_cache.Remembered(chat.pk, chat.version, chat.expires_at.timestamp())
    etag = found.etag(after)
    if _matches(if_none_match, etag):
        body = None
    else:
        body = rest_conversation(conversation(chat, await queries.messages(chat, after)))
        found.bodies[after or 0] = body
    if polls is not None:
        polls.remember(ticket, slug, device_id, found)
    return Snapshot(body, etag)


@database_sync_to_async
def messages_after(chat_region_id: int, device_id: str, after: int) -> list[tuple[Chat, Message]]:
    """Messages a socket missed, for catching up after a lost push or a layer outage."""
    chat = (
        Chat.objects.select_related("region")
        .filter(region_id=chat_region_id, device_id=device_id, is_current=True)
        .first()
    )
    if chat is None:
        return []
    return [(chat, message) for message in chat.messages.filter(id__gt=after)]


# --- a device's message -----------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    chat: Chat
    message: Message | None  # None for a consent-only POST
    duplicate: bool  # the client_id was stored before; nothing new happened


async def send_message(
    region_slug: str,
    language: str,
    device_id: str,
    *,
    text: str | None,
    consent: bool | None = None,
    client_id: str | None = None,
    attachments: Sequence[NewAttachment] = (),
    route: Route = "rest",
) -> SendResult:
    outbox = Outbox()
    result = await database_sync_to_async(_store_message)(
        region_slug, language, device_id, text, consent, client_id, attachments, route, outbox
    )
    await outbox.send()
    return result


def _store_message(
    region_slug: str,
    language: str,
    device_id: str,
    text: str | None,
    consent: bool | None,
    client_id: str | None,
    attachments: Sequence[NewAttachment],
    route: Route,
    outbox: Outbox,
) -> SendResult:
    region = configured_region(region_slug)
    if text is None and not attachments and consent is None:
        raise InvalidMessage("The request has no message.")
    with transaction.atomic():
        chat = current_chat(region, device_id, lock=True)
        if text is None and not attachments:
            # Only the evaluation consent: it belongs to an existing conversation.
            if chat is None:
                raise ChatNotFound
            _set_consent(chat, consent, outbox)
            save_chat(chat)
            return SendResult(chat, None, duplicate=False)
        if chat is not None and client_id is not None:
            stored = chat.messages.filter(client_id=client_id).first()
            if stored is not None:
                return SendResult(chat, stored, duplicate=True)
        if chat is None:
            chat = _open_chat(region, device_id, language)
        chat.language = language
        _touch(chat)
        uploads = [
            Upload(
                token=new_attachment_token(),
                name=item.name,
                mime_type=item.mime_type,
                data=item.data,
            )
            for item in attachments
        ]
        message = append_message(
            chat,
            outbox,
            role=Message.Role.USER,
            content=text_to_html(text or ""),
            status=Message.Status.PENDING,
            client_id=client_id,
            attachments=[
                {
                    "name": upload.name,
                    "size": len(upload.data),
                    "mime_type": upload.mime_type,
                    "token": upload.token,
                }
                for upload in uploads
            ],
        )
        for upload in uploads:
            upload.message = message
        Upload.objects.bulk_create(uploads)
        enqueue(chat, Work.Kind.FORWARD_MESSAGE, message)
        if text is not None:
            if bot_enabled() and language != region.default_language:
                enqueue(chat, Work.Kind.TRANSLATE_QUESTION, message)
            _request_answer(chat, outbox)
        _set_consent(chat, consent, outbox)
        save_chat(chat)
    metrics.MESSAGES.labels("in", route).inc()
    logger.info(
        "message %s stored for chat %s (device %s, %s)",
        message.pk,
        chat.pk,
        log_device(device_id),
        route,
    )
    return SendResult(chat, message, duplicate=False)


def _set_consent(chat: Chat, consent: bool | None, outbox: Outbox) -> None:
    if consent is None or consent == chat.evaluation_consent:
        return
    chat.evaluation_consent = consent
    chat.version += 1
    enqueue(chat, Work.Kind.SET_ATTRIBUTES, payload={"evaluation_consent": consent})


# --- Zammad's webhook -----------------------------------------------------------------------


def classify_article(article: dict[str, Any]) -> Literal["internal", "own", "counsellor", "other"]:
    """Only public articles by an agent without the marker are counsellor messages. Devices
    never write to Zammad directly, so every customer article is the server's own."""
    if article.get("internal", True) is not False:
        return "internal"
    subject = article.get("subject") or ""
    if article.get("sender") == "Customer" or AUTOMATIC_SUBJECT in str(subject):
        return "own"
    if article.get("sender") == "Agent":
        return "counsellor"
    return "other"


def own_message_id(article: dict[str, Any]) -> int | None:
    preferences = article.get("preferences")
    mark = preferences.get(OWN_MARK) if isinstance(preferences, dict) else None
    message_id = mark.get("message_id") if isinstance(mark, dict) else None
    return message_id if isinstance(message_id, int) else None


def _attachments_of(article: dict[str, Any]) -> list[dict[str, Any]]:
    stored = []
    for item in article.get("attachments") or []:
        if not isinstance(item, dict) or not is_record_id(item.get("id")):
            continue
        preferences = item.get("preferences")
        if not isinstance(preferences, dict):
            preferences = {}
        size = str(item.get("size") or "0")
        size = size if size.isascii() and size.isdigit() and len(size) < 19 else "0"
        mime_type = preferences.get("Content-Type") or preferences.get("Mime-Type")
        stored.append(
            {
                # Cleaned like a message's text: PostgreSQL refuses NUL in JSON, which would
                # fail every delivery of the article.
                "name": clean_text(str(item.get("filename") or "")) or "attachment",
                "size": int(size),
                "mime_type": clean_text(str(mime_type or "")) or "application/octet-stream",
                "token": new_attachment_token(),
                "article_id": article["id"],
                "attachment_id": item["id"],
            }
        )
    return stored


def _created_at(article: dict[str, Any]) -> datetime:
    value = article.get("created_at")
    try:
        parsed = parse_datetime(value) if isinstance(value, str) else None
    except ValueError:  # well-formed but impossible, like February 30
        parsed = None
    return parsed if parsed is not None and parsed.tzinfo is not None else timezone.now()


def ingest_counsellor_article(
    chat: Chat, article: dict[str, Any], outbox: Outbox
) -> Message | None:
    """A counsellor's public article becomes a message once, whichever route brings it."""
    if chat.messages.filter(zammad_article_id=article["id"]).exists():
        return None
    message = counsellor_message(chat, article)
    message.save()
    for work in _appended(chat, message, outbox):
        work.save()
    return message


def counsellor_message(chat: Chat, article: dict[str, Any]) -> Message:
    """The (unsaved) message of a counsellor's public article."""
    # Cleaned like a device's text: PostgreSQL refuses NUL, and no client should get controls.
    body = clean_text(str(article.get("body") or ""))
    content = (
        sanitize_html(body) if article.get("content_type") == "text/html" else text_to_html(body)
    )
    return Message(
        chat=chat,
        role=Message.Role.AGENT,
        content=content,
        status=Message.Status.SENT,
        zammad_article_id=article["id"],
        created_at=_created_at(article),
        attachments=_attachments_of(article),
    )


def _appended(chat: Chat, message: Message, outbox: Outbox) -> list[Work]:
    """Bookkeeping for a counsellor's message just stored in a locked chat; returns the work it
    needs (unsaved)."""
    prev_id = chat.last_message_id
    chat.last_message_id = message.pk
    chat.version += 1
    outbox.message(chat, message, prev_id)
    metrics.MESSAGES.labels("out", "webhook").inc()
    if bot_enabled() and chat.language != chat.region.default_language:
        return [new_work(chat, Work.Kind.TRANSLATE_REPLY, message)]
    return []


def known_article_ids(chat: Chat) -> set[int]:
    ids = set(
        chat.messages.filter(zammad_article_id__isnull=False).values_list(
            "zammad_article_id", flat=True
        )
    )
    return {article_id for article_id in ids if article_id is not None} | set(
        chat.ignored_article_ids
    )


def ignore_article(chat: Chat, article_id: int) -> None:
    if article_id not in chat.ignored_article_ids:
        chat.ignored_article_ids = [*chat.ignored_article_ids, article_id]


def signature_matches(secret: str, body: bytes, header: str | None) -> bool:
    expected = "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return hmac.compare_digest(expected.encode(), (header or "").strip().encode())


def is_record_id(value: object) -> bool:
    """A Zammad id: a positive integer that fits the database's 64 bits."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63


def _loads(body: bytes) -> Any:
    """orjson, a quarter of the standard library's time; what it refuses and the standard
    library takes (lone surrogates as JSON escapes, which Zammad passes on from what agents
    paste; integers over 64 bits) goes to the standard library."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse_webhook(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        payload = _loads(body)
    except (ValueError, RecursionError) as error:  # also UnicodeDecodeError; too deep
        raise InvalidWebhook("The body is not valid JSON.") from error
    if not isinstance(payload, dict):
        raise InvalidWebhook("The body is not a JSON object.")
    ticket = payload.get("ticket")
    if not isinstance(ticket, dict) or not is_record_id(ticket.get("id")):
        raise InvalidWebhook("The body has no ticket with an id.")
    article = payload.get("article") or {}
    if not isinstance(article, dict):
        raise InvalidWebhook("The article is not a JSON object.")
    if article and not is_record_id(article.get("id")):
        raise InvalidWebhook("The article has no id.")
    return ticket, article


def _valid_token(token: str | None) -> bool:
    return bool(token) and len(token or "") <= 200 and (token or "").isprintable()


def region_for_token(token: str | None, regions: dict[str, Region]) -> Region:
    """The region whose webhook token this is, among ``regions`` (by token)."""
    region = regions.get(token or "") if _valid_token(token) else None
    # Compare again in constant time: the index lookup alone says nothing about timing safety.
    if region is None or not hmac.compare_digest(
        region.webhook_token.encode(), (token or "").encode()
    ):
        raise NotFound
    return region


@dataclass(frozen=True)
class Delivery:
    """One delivery of Zammad's trigger webhook, as it came in."""

    token: str | None
    body: bytes
    signature: str | None
    delivery_id: str | None


@dataclass(frozen=True)
class _TicketChange:
    """A delivery whose token, signature and body checked out."""

    region: Region
    ticket: dict[str, Any]
    article: dict[str, Any]
    delivery_id: str | None


async def receive_webhook(delivery: Delivery) -> str:
    """Take one delivery of Zammad's trigger webhook; returns its outcome.

    Deliveries that arrive while a batch is being written are written together in the next one
    (``GroupCommit``): one transaction, one commit and one publish round for all of them."""
    return await _webhooks.submit(delivery)


async def _receive_webhooks(deliveries: list[Delivery]) -> list[str | Exception]:
    outbox = Outbox()
    outcomes = await database_sync_to_async(_apply_webhooks)(deliveries, outbox)
    await outbox.send()
    for outcome in outcomes:
        if isinstance(outcome, str):
            metrics.WEBHOOKS.labels(outcome).inc()
    return outcomes


WEBHOOK_BATCH = 200
_webhooks: GroupCommit[Delivery, str] = GroupCommit(_receive_webhooks, WEBHOOK_BATCH)


def _apply_webhooks(deliveries: list[Delivery], outbox: Outbox) -> list[str | Exception]:
    """Check every delivery, then apply the good ones in one transaction. Should that
    transaction fail, each is tried in one of its own, so that one bad delivery fails alone."""
    outcomes: list[str | Exception] = [""] * len(deliveries)
    tokens = {delivery.token or "" for delivery in deliveries if _valid_token(delivery.token)}
    regions = queries.regions_by_token(list(tokens))
    changes: dict[int, _TicketChange] = {}
    for index, delivery in enumerate(deliveries):
        try:
            changes[index] = _checked(delivery, regions)
        except ChatError as error:
            outcomes[index] = error
    try:
        with transaction.atomic():
            applied = _apply_ticket_changes(list(changes.values()), outbox)
        outcomes_of: dict[int, str | Exception] = dict(zip(changes, applied, strict=True))
    except DatabaseError:
        if len(changes) <= 1:
            raise
        logger.warning("a batch of %s webhooks failed; applying them one by one", len(changes))
        outcomes_of = {index: _apply_alone(change, outbox) for index, change in changes.items()}
    for index, outcome in outcomes_of.items():
        outcomes[index] = outcome
    return outcomes


def _apply_alone(change: _TicketChange, outbox: Outbox) -> str | Exception:
    try:
        with transaction.atomic():
            return _apply_ticket_changes([change], outbox)[0]
    except DatabaseError as error:
        return error


def _checked(delivery: Delivery, regions: dict[str, Region]) -> _TicketChange:
    region = region_for_token(delivery.token, regions)
    if region.signature_secret and not signature_matches(
        region.signature_secret, delivery.body, delivery.signature
    ):
        raise WebhookUnauthorized
    ticket, article = parse_webhook(delivery.body)
    delivery_id = (delivery.delivery_id or "").strip()[:100] or None
    return _TicketChange(region, ticket, article, delivery_id)


def _apply_ticket_changes(changes: list[_TicketChange], outbox: Outbox) -> list[str]:
    """Apply checked deliveries, in order, with a fixed number of statements for the batch
    (but one update per chat): the deliveries seen before, the chats (locked) and the articles
    they have, then one write each for messages, work, chats and deliveries."""
    if not changes:
        return []
    state = queries.ticket_state(
        list({change.region.pk for change in changes}),
        list({change.delivery_id for change in changes if change.delivery_id}),
        list({change.ticket["id"] for change in changes}),
    )
    seen = state.seen
    chats = {(chat.region_id, chat.zammad_ticket_id): chat for chat in state.chats}
    messaged: dict[int, set[int]] = {chat.pk: set() for chat in state.chats}
    for chat_id, article_id in state.article_ids:
        messaged[chat_id].add(article_id)
    outcomes: list[str] = []
    deliveries: list[WebhookDelivery] = []
    new_messages: list[Message] = []
    to_sync: dict[int, Chat] = {}
    touched: dict[int, Chat] = {}
    for change in changes:
        if change.delivery_id is not None:
            if (change.region.pk, change.delivery_id) in seen:
                outcomes.append("duplicate")
                continue
            seen.add((change.region.pk, change.delivery_id))
        chat = chats.get((change.region.pk, change.ticket["id"]))
        if chat is None:
            outcome = "unknown_ticket"
        else:
            chat.region = change.region
            touched[chat.pk] = chat
            outcome, message, sync = _ticket_change(chat, change, messaged[chat.pk])
            if message is not None:
                new_messages.append(message)
            if sync:
                to_sync[chat.pk] = chat
        outcomes.append(outcome)
        deliveries.append(
            WebhookDelivery(
                region=change.region,
                delivery_id=change.delivery_id,
                ticket_id=change.ticket["id"],
                article_id=change.article.get("id"),
                outcome=outcome,
            )
        )
    # Message ids follow list order, so each chat's messages keep the order they came in.
    queries.insert(new_messages)
    work = [item for message in new_messages for item in _appended(message.chat, message, outbox)]
    syncing = queries.chats_with_queued(list(to_sync), Work.Kind.SYNC_TICKET)
    work += [
        new_work(chat, Work.Kind.SYNC_TICKET) for chat in to_sync.values() if chat.pk not in syncing
    ]
    queries.insert(work)
    queries.save_chats(list(touched.values()), CHAT_STATE_FIELDS)
    # A delivery that another process recorded meanwhile has had its effect there: ignored.
    queries.insert(deliveries, ignore_conflicts=True)
    return outcomes


def _ticket_change(
    chat: Chat, change: _TicketChange, messaged: set[int]
) -> tuple[str, Message | None, bool]:
    """What one delivery does to its (locked) chat: the outcome, a counsellor's new message
    (unsaved), and whether the chat needs reconciling with Zammad's article list."""
    ticket, article = change.ticket, change.article
    outcome = "ticket_changed"
    message = None
    if isinstance(ticket.get("automatic_answers"), bool):
        chat.automatic_answers = ticket["automatic_answers"]
    if article:
        kind = classify_article(article)
        if kind == "counsellor":
            if article["id"] in messaged:
                outcome = "known"
            else:
                outcome = "message"
                message = counsellor_message(chat, article)
                messaged.add(article["id"])
        else:
            outcome = f"ignored_{kind}"
            if kind in {"internal", "other"}:
                ignore_article(chat, article["id"])
    # Late, lost or reordered deliveries: when the ticket lists an article that the server has
    # not seen, reconcile with Zammad's article list in the background.
    listed = ticket.get("article_ids")
    unseen = (
        {item for item in listed if isinstance(item, int)}
        - messaged
        - set(chat.ignored_article_ids)
        - {article.get("id")}
        if isinstance(listed, list)
        else None
    )
    return outcome, message, not article or unseen is None or bool(unseen)


# --- attachments ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttachmentRef:
    name: str
    mime_type: str
    ticket_id: int | None  # None: not in Zammad yet, ``data`` holds it
    article_id: int | None
    attachment_id: int | None
    data: bytes | None
    region: Region


@database_sync_to_async
def find_attachment(region_slug: str, device_id: str, token: str) -> AttachmentRef:
    """An attachment of the device's current chat, by its unguessable token (else NotFound)."""
    region = configured_region(region_slug)
    chat = current_chat(region, device_id)
    if chat is None or not token:
        raise NotFound
    # A scan over the chat's few messages with attachments (works on SQLite, too).
    for message in chat.messages.exclude(attachments=[]):
        for item in message.attachments:
            if item.get("token") != token:
                continue
            upload = None
            if item.get("attachment_id") is None:
                upload = Upload.objects.filter(message=message, token=token).first()
                if upload is None:
                    break
            return AttachmentRef(
                name=item["name"],
                mime_type=item["mime_type"],
                ticket_id=chat.zammad_ticket_id,
                article_id=item.get("article_id"),
                attachment_id=item.get("attachment_id"),
                data=bytes(upload.data) if upload is not None else None,
                region=region,
            )
    raise NotFound

"""The durable steps behind a chat: each ``Work`` kind has one handler here.

Handlers run in a worker (``worker.py``), outside any transaction while they call Zammad or
the bot, and record the outcome in a short transaction with the chat row locked. A handler may
run again after a crash at any point, so each first checks whether its effect already happened
(the article id on the message, the ``integreat_chat`` mark in Zammad's article list).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils.dateparse import parse_datetime

from . import metrics
from .actions import (
    AUTOMATIC_SUBJECT,
    OWN_MARK,
    USER_SUBJECT,
    append_message,
    classify_article,
    enqueue,
    ignore_article,
    ingest_counsellor_article,
    known_article_ids,
    own_message_id,
    save_chat,
    set_typing,
)
from .chatbot import ChatbotClient
from .content import html_to_text, sanitize_html
from .errors import UpstreamError
from .logging import log_context
from .models import Chat, Message, Region, Upload, Work
from .publish import Outbox
from .zammad import OutgoingAttachment, ZammadClient

logger = logging.getLogger(__name__)

_customer_logins: dict[tuple[str, str], str] = {}
# Zammad's clock and ours: a ticket opened for this chat is not older than the chat by more.
TICKET_CLOCK_SKEW = timedelta(minutes=5)


def zammad_for(region: Region) -> ZammadClient:
    return ZammadClient(region.zammad_url, region.zammad_token)


def chatbot() -> ChatbotClient:
    return ChatbotClient(settings.CHATBOT_URL)


async def customer_login(region: Region) -> str:
    """The integration user (``users/me``) is the customer of every chat ticket."""
    key = (region.zammad_url, region.zammad_token)
    if key not in _customer_logins:
        me = await zammad_for(region).me()
        _customer_logins[key] = str(me["login"])
    return _customer_logins[key]


@database_sync_to_async
def load_work(work_id: int) -> Work:
    return Work.objects.select_related("chat__region", "message").get(pk=work_id)


def _locked_chat(chat_id: int) -> Chat:
    return Chat.objects.select_for_update().select_related("region").get(pk=chat_id)


# --- Zammad lane ------------------------------------------------------------------------------


async def ensure_ticket(chat: Chat, *, maybe_created: bool = False) -> int:
    """The chat's ticket, opened on first use. ``maybe_created``: an earlier attempt may have
    opened it before its worker died or its call timed out; Zammad has no idempotency key, so
    look for it first (by title, opened since the chat, not another chat's)."""
    if chat.zammad_ticket_id is not None:
        return chat.zammad_ticket_id
    region = chat.region
    client = zammad_for(region)
    title = f"[Integreat Chat] [{chat.language}] {chat.device_id}"
    ticket = None
    if maybe_created:
        ticket = await _find_ticket(client, chat, title)
    if ticket is None:
        ticket = await client.create_ticket(
            title=title,
            group=region.ticket_group or settings.CHAT_ZAMMAD_TICKET_GROUP,
            customer=await customer_login(region),
        )
    ticket_id = int(ticket["id"])
    await database_sync_to_async(_record_ticket)(chat.pk, ticket_id)
    chat.zammad_ticket_id = ticket_id
    return ticket_id


async def _find_ticket(client: ZammadClient, chat: Chat, title: str) -> dict[str, Any] | None:
    candidates = [
        ticket
        for ticket in await client.search_tickets(f'"{title}"')
        if ticket.get("title") == title
        and (_created_at(ticket) or chat.created_at) >= chat.created_at - TICKET_CLOCK_SKEW
    ]
    taken = await database_sync_to_async(_tickets_of_other_chats)(
        chat, [int(ticket["id"]) for ticket in candidates]
    )
    mine = [ticket for ticket in candidates if int(ticket["id"]) not in taken]
    return min(mine, key=lambda ticket: int(ticket["id"])) if mine else None


def _tickets_of_other_chats(chat: Chat, ticket_ids: list[int]) -> set[int]:
    others = Chat.objects.filter(region_id=chat.region_id, zammad_ticket_id__in=ticket_ids)
    found = others.exclude(pk=chat.pk).values_list("zammad_ticket_id", flat=True)
    return {ticket_id for ticket_id in found if ticket_id is not None}


def _created_at(ticket: dict[str, Any]) -> datetime | None:
    value = ticket.get("created_at")
    try:
        return parse_datetime(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _record_ticket(chat_id: int, ticket_id: int) -> None:
    with transaction.atomic():
        chat = _locked_chat(chat_id)
        chat.zammad_ticket_id = ticket_id
        chat.version += 1  # the conversation's ticket_url
        save_chat(chat)


async def _find_own_article(
    client: ZammadClient, ticket_id: int, mark: str, value: int
) -> dict[str, Any] | None:
    for article in await client.list_articles(ticket_id):
        preferences = article.get("preferences")
        own = preferences.get(OWN_MARK) if isinstance(preferences, dict) else None
        if isinstance(own, dict) and own.get(mark) == value:
            return article
    return None


async def post_message(work: Work) -> None:
    """A stored message (a device's, or a bot answer or translation) becomes an article."""
    message = work.message
    assert message is not None
    if message.zammad_article_id is not None:
        await _mark_sent(message.pk, {"id": message.zammad_article_id})
        return
    chat = work.chat
    ticket_id = await ensure_ticket(chat, maybe_created=work.attempts > 1)
    client = zammad_for(chat.region)
    article = None
    if work.attempts > 1:
        # An earlier attempt may have reached Zammad before its worker died.
        article = await _find_own_article(client, ticket_id, "message_id", message.pk)
    if article is None:
        from_device = message.role == Message.Role.USER
        article = await client.create_article(
            ticket_id=ticket_id,
            body=message.content,
            sender="Customer" if from_device else "Agent",
            subject=USER_SUBJECT if from_device else AUTOMATIC_SUBJECT,
            internal=False,
            article_type="web" if from_device else "note",
            attachments=await database_sync_to_async(_outgoing_attachments)(message.pk),
            preferences={OWN_MARK: {"message_id": message.pk}},
        )
    await _mark_sent(message.pk, article)


def _outgoing_attachments(message_id: int) -> list[OutgoingAttachment]:
    return [
        OutgoingAttachment(
            filename=upload.name, data=bytes(upload.data), mime_type=upload.mime_type
        )
        for upload in Upload.objects.filter(message_id=message_id).order_by("id")
    ]


def _link_attachments(message: Message, article: dict[str, Any]) -> None:
    """Zammad has the files now: downloads come from there, the server's copies go."""
    stored = [item for item in article.get("attachments") or [] if isinstance(item, dict)]
    for item, zammad_item in zip(message.attachments, stored, strict=False):
        item["article_id"] = article["id"]
        item["attachment_id"] = zammad_item.get("id")
    Upload.objects.filter(message=message).delete()


def _mark_sent_sync(message_id: int, article: dict[str, Any], outbox: Outbox) -> None:
    with transaction.atomic():
        chat_id = Message.objects.values_list("chat_id", flat=True).get(pk=message_id)
        chat = _locked_chat(chat_id)
        message = Message.objects.get(pk=message_id)
        changed = message.status != Message.Status.SENT
        message.zammad_article_id = int(article["id"])
        message.status = Message.Status.SENT
        if message.attachments and "attachments" in article:
            _link_attachments(message, article)
        message.save(update_fields=["zammad_article_id", "status", "attachments"])
        if changed:
            chat.version += 1
            save_chat(chat)
            outbox.status(chat, message)


async def _mark_sent(message_id: int, article: dict[str, Any]) -> None:
    outbox = Outbox()
    await database_sync_to_async(_mark_sent_sync)(message_id, article, outbox)
    await outbox.send()


async def mark_failed(work: Work) -> None:
    """Zammad refused a message for good: the device sees ``failed``."""
    if work.message is None or work.kind not in {
        Work.Kind.FORWARD_MESSAGE,
        Work.Kind.POST_MESSAGE,
    }:
        return
    outbox = Outbox()
    await database_sync_to_async(_mark_failed_sync)(work.message.pk, outbox)
    await outbox.send()


def _mark_failed_sync(message_id: int, outbox: Outbox) -> None:
    with transaction.atomic():
        chat_id = Message.objects.values_list("chat_id", flat=True).get(pk=message_id)
        chat = _locked_chat(chat_id)
        message = Message.objects.get(pk=message_id)
        if message.status == Message.Status.PENDING:
            message.status = Message.Status.FAILED
            message.save(update_fields=["status"])
            chat.version += 1
            save_chat(chat)
            outbox.status(chat, message)


async def translate_question(work: Work) -> None:
    """The question in the region's language, as an internal note for the counsellors."""
    message = work.message
    assert message is not None
    chat = work.chat
    region = chat.region
    text = html_to_text(message.content)
    translation = await chatbot().translate(
        text, source_language=chat.language, target_language=region.default_language
    )
    if translation.strip() == text.strip():
        return
    ticket_id = await ensure_ticket(chat, maybe_created=work.attempts > 1)
    client = zammad_for(region)
    article = None
    if work.attempts > 1:
        article = await _find_own_article(client, ticket_id, "translation_of", message.pk)
    if article is None:
        article = await client.create_article(
            ticket_id=ticket_id,
            body=sanitize_html(translation),
            sender="Agent",
            subject=AUTOMATIC_SUBJECT,
            internal=True,
            article_type="note",
            preferences={OWN_MARK: {"translation_of": message.pk}},
        )
    await database_sync_to_async(_ignore)(chat.pk, int(article["id"]))


def _ignore(chat_id: int, article_id: int) -> None:
    with transaction.atomic():
        chat = _locked_chat(chat_id)
        ignore_article(chat, article_id)
        chat.save(update_fields=["ignored_article_ids"])


async def set_attributes(work: Work) -> None:
    ticket_id = await ensure_ticket(work.chat, maybe_created=work.attempts > 1)
    await zammad_for(work.chat.region).update_ticket(ticket_id, dict(work.payload))


async def sync_ticket(work: Work) -> None:
    """Reconcile with Zammad's article list: every public article exactly once."""
    chat = work.chat
    if chat.zammad_ticket_id is None:
        return
    articles = await zammad_for(chat.region).list_articles(chat.zammad_ticket_id)
    outbox = Outbox()
    await database_sync_to_async(_apply_articles)(chat.pk, articles, outbox)
    await outbox.send()


def _apply_articles(chat_id: int, articles: list[dict[str, Any]], outbox: Outbox) -> None:
    with transaction.atomic():
        chat = _locked_chat(chat_id)
        known = known_article_ids(chat)
        for article in sorted(articles, key=lambda item: int(item["id"])):
            if article["id"] in known:
                continue
            kind = classify_article(article)
            if kind == "counsellor":
                ingest_counsellor_article(chat, article, outbox)
                continue
            message_id = own_message_id(article) if kind == "own" else None
            message = (
                chat.messages.filter(pk=message_id, zammad_article_id__isnull=True).first()
                if message_id is not None
                else None
            )
            if message is None:
                ignore_article(chat, article["id"])
                continue
            # The server wrote it, and crashed before it could record so.
            message.zammad_article_id = article["id"]
            if message.status == Message.Status.PENDING:
                message.status = Message.Status.SENT
                outbox.status(chat, message)
            if message.attachments:
                _link_attachments(message, article)
            message.save(update_fields=["zammad_article_id", "status", "attachments"])
            chat.version += 1
        save_chat(chat)


# --- bot lane ---------------------------------------------------------------------------------


async def answer(work: Work) -> None:
    """Ask the bot about the chat's recent questions; its answer becomes a message."""
    chat = work.chat
    questions = await database_sync_to_async(_recent_questions)(chat.pk)
    outbox = Outbox()
    if not await database_sync_to_async(_automatic_answers_on)(chat.pk):
        # Switched off after this answer was queued (the answer before it handed over to a
        # human, or a counsellor took over): only counsellors answer now.
        await database_sync_to_async(_answer_done)(work.pk, chat.pk, None, None, outbox)
        await outbox.send()
        return
    try:
        reply = await chatbot().answer(
            questions,
            language=chat.language,
            region=chat.region.slug,
            deadline_secs=settings.CHATBOT_ANSWER_TIMEOUT_SECS,
        )
    except UpstreamError as error:
        # The deadline bounds an answer: no retry, the typing indicator goes away.
        logger.warning("no bot answer for chat %s: %s", chat.pk, error)
        await database_sync_to_async(_answer_done)(work.pk, chat.pk, None, None, outbox)
        await outbox.send()
        return
    await database_sync_to_async(_answer_done)(
        work.pk, chat.pk, sanitize_html(reply.answer), reply.automatic_answers, outbox
    )
    await outbox.send()


def _automatic_answers_on(chat_id: int) -> bool:
    return bool(Chat.objects.values_list("automatic_answers", flat=True).get(pk=chat_id))


def _recent_questions(chat_id: int) -> list[str]:
    contents = (
        Message.objects.filter(chat_id=chat_id, role=Message.Role.USER)
        .order_by("-id")
        .values_list("content", flat=True)[: settings.CHAT_BOT_HISTORY_MESSAGES]
    )
    return [html_to_text(content) for content in reversed(contents)]


def _answer_done(
    work_id: int,
    chat_id: int,
    content: str | None,
    automatic_answers: bool | None,
    outbox: Outbox,
) -> None:
    with transaction.atomic():
        chat = _locked_chat(chat_id)
        if not chat.automatic_answers:
            # Switched off while the bot worked: the answer and its flag come too late.
            content, automatic_answers = None, None
        if content is not None and content.strip():
            message = append_message(
                chat,
                outbox,
                role=Message.Role.AGENT,
                content=content,
                automatic=True,
                status=Message.Status.PENDING,
            )
            enqueue(chat, Work.Kind.POST_MESSAGE, message)
            metrics.MESSAGES.labels("out", "bot").inc()
        if automatic_answers is not None and automatic_answers != chat.automatic_answers:
            chat.automatic_answers = automatic_answers
            enqueue(
                chat, Work.Kind.SET_ATTRIBUTES, payload={"automatic_answers": automatic_answers}
            )
        more = (
            Work.objects.filter(chat=chat, kind=Work.Kind.ANSWER, state=Work.State.QUEUED)
            .exclude(pk=work_id)
            .exists()
        )
        set_typing(chat, more and chat.automatic_answers, outbox)
        save_chat(chat)


async def translate_reply(work: Work) -> None:
    """A counsellor's reply in the chat's language, as an automatic message."""
    message = work.message
    assert message is not None
    chat = work.chat
    translation = await chatbot().translate(
        message.content,
        source_language=chat.region.default_language,
        target_language=chat.language,
    )
    if not translation.strip():
        return
    outbox = Outbox()
    await database_sync_to_async(_store_translation)(
        chat.pk, message.pk, sanitize_html(translation), outbox
    )
    await outbox.send()


def _store_translation(chat_id: int, original_id: int, content: str, outbox: Outbox) -> None:
    with transaction.atomic():
        chat = _locked_chat(chat_id)
        if Message.objects.filter(translation_of_id=original_id).exists():
            return
        message = append_message(
            chat,
            outbox,
            role=Message.Role.AGENT,
            content=content,
            automatic=True,
            status=Message.Status.PENDING,
            translation_of_id=original_id,
        )
        enqueue(chat, Work.Kind.POST_MESSAGE, message)
        metrics.MESSAGES.labels("out", "bot").inc()
        save_chat(chat)


HANDLERS: dict[str, Callable[[Work], Awaitable[None]]] = {
    Work.Kind.FORWARD_MESSAGE: post_message,
    Work.Kind.POST_MESSAGE: post_message,
    Work.Kind.TRANSLATE_QUESTION: translate_question,
    Work.Kind.SET_ATTRIBUTES: set_attributes,
    Work.Kind.SYNC_TICKET: sync_ticket,
    Work.Kind.ANSWER: answer,
    Work.Kind.TRANSLATE_REPLY: translate_reply,
}


async def run(work_id: int) -> Work:
    work = await load_work(work_id)
    with log_context(chat_id=work.chat_id, work_id=work.pk):
        await HANDLERS[work.kind](work)
    return work

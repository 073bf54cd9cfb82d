"""Schemas of everything that leaves the server: REST conversations, socket frames and the
channel-layer events behind them. Tests check every captured frame against these.
"""

import json
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

from .models import Chat, Message


class AttachmentOut(TypedDict):
    name: str
    size: int
    mime_type: str
    url: str


class MessageOut(TypedDict):
    id: int
    role: Literal["user", "agent"]
    content: str
    user_is_author: bool
    automatic_answer: bool
    created_at: str
    attachments: list[AttachmentOut]
    status: Literal["pending", "sent", "failed"]
    client_id: NotRequired[str]


class Conversation(TypedDict):
    messages: list[MessageOut]
    evaluation_consent: bool
    chatbot_typing: bool
    ticket_url: str | None


# --- channel-layer events (group_send); the consumer turns each into one frame -----------------


class MessageEvent(TypedDict):
    type: Literal["chat.message"]
    message: MessageOut
    prev_id: int  # the chat's previous message id: a socket that has not seen it catches up
    published_at: float  # time.time() at publish, for the push latency histogram


class StatusEvent(TypedDict):
    type: Literal["chat.status"]
    id: int
    status: str


class TypingEvent(TypedDict):
    type: Literal["chat.typing"]
    chatbot_typing: bool


ChatEvent = MessageEvent | StatusEvent | TypingEvent


# --- frames -------------------------------------------------------------------------------------


class HistoryFrame(TypedDict):
    type: Literal["chat.history"]
    messages: list[MessageOut]
    chatbot_typing: bool
    evaluation_consent: bool
    last_id: int


class MessageFrame(TypedDict):
    type: Literal["chat.message"]
    message: MessageOut


class AckFrame(TypedDict):
    type: Literal["chat.ack"]
    client_id: str
    id: int
    status: str


class ErrorFrame(TypedDict):
    type: Literal["error"]
    code: str
    detail: str
    client_id: NotRequired[str]
    retry_after: NotRequired[int]


def iso_millis(moment: datetime) -> str:
    """``2026-11-26T10:00:00.000Z``: UTC with milliseconds and ``Z``, as the CMS sends it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def attachment_url(chat: Chat, token: str) -> str:
    return f"/api/v3/{chat.region.slug}/{chat.language}/chat/{chat.device_id}/attachments/{token}/"


def message_out(message: Message, chat: Chat) -> MessageOut:
    out: MessageOut = {
        "id": message.pk,
        "role": "user" if message.role == Message.Role.USER else "agent",
        "content": message.content,
        "user_is_author": message.role == Message.Role.USER,
        "automatic_answer": message.automatic,
        "created_at": iso_millis(message.created_at),
        "attachments": [
            {
                "name": item["name"],
                "size": item["size"],
                "mime_type": item["mime_type"],
                "url": attachment_url(chat, item["token"]),
            }
            for item in message.attachments
            if item.get("token")
        ],
        "status": message.status,  # type: ignore[typeddict-item]
    }
    if message.client_id:
        out["client_id"] = message.client_id
    return out


def rest_message(message: MessageOut) -> dict[str, Any]:
    """REST shows the CMS fields; ``client_id`` only travels in socket frames."""
    return {key: value for key, value in message.items() if key != "client_id"}


def rest_conversation(conversation: Conversation) -> bytes:
    """A conversation as the REST endpoints answer it (JSON, as Django's ``JsonResponse``)."""
    body = dict[str, Any](conversation)
    body["messages"] = [rest_message(message) for message in conversation["messages"]]
    return json.dumps(body, ensure_ascii=False).encode()


def conversation(chat: Chat, messages: list[Message]) -> Conversation:
    return {
        "messages": [message_out(message, chat) for message in messages],
        "evaluation_consent": chat.evaluation_consent,
        "chatbot_typing": chat.bot_typing,
        "ticket_url": (
            chat.region.ticket_url(chat.zammad_ticket_id) if chat.zammad_ticket_id else None
        ),
    }

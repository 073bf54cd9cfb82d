"""The one way out: every event a socket receives is published here, after the commit.

Actions collect events in an ``Outbox`` while they write; ``Outbox.add`` registers each event
with ``transaction.on_commit``, so a rolled-back write publishes nothing, and ``send`` hands the
committed events to the channel layer. Pushes through the layer are best effort: a socket that
misses one catches up from the store (``prev_id`` in message events, ``after`` on reconnect).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from channels.layers import get_channel_layer
from django.db import transaction

from .events import ChatEvent, MessageEvent, StatusEvent, TypingEvent, message_out
from .models import Chat, Message, device_key

logger = logging.getLogger(__name__)


def chat_group(region_id: int, device_id: str) -> str:
    """The group of a device's sockets, built from the region id and a digest of the device id
    (never from raw client text, and always a valid group name)."""
    return f"chat.{region_id}.{device_key(device_id)}"


class Outbox:
    def __init__(self) -> None:
        self._committed: list[tuple[str, ChatEvent]] = []

    def add(self, chat: Chat, event: ChatEvent) -> None:
        group = chat_group(chat.region_id, chat.device_id)
        transaction.on_commit(lambda: self._committed.append((group, event)))

    def message(self, chat: Chat, message: Message, prev_id: int) -> None:
        event: MessageEvent = {
            "type": "chat.message",
            "message": message_out(message, chat),
            "prev_id": prev_id,
            "published_at": time.time(),
        }
        self.add(chat, event)

    def status(self, chat: Chat, message: Message) -> None:
        event: StatusEvent = {"type": "chat.status", "id": message.pk, "status": message.status}
        self.add(chat, event)

    def typing(self, chat: Chat) -> None:
        event: TypingEvent = {"type": "chat.typing", "chatbot_typing": chat.bot_typing}
        self.add(chat, event)

    async def send(self) -> None:
        events, self._committed = self._committed, []
        if not events:
            return
        layer = get_channel_layer()
        if layer is None:
            return
        sends = [(group, dict[str, Any](event)) for group, event in events]
        try:
            if hasattr(layer, "group_send_many"):  # chatserver.layer: one round for all
                await layer.group_send_many(sends)
            else:
                for group, message in sends:
                    await layer.group_send(group, message)
        except Exception:
            # The store has the messages; the devices get them on their next resume.
            logger.warning(
                "publishing %s events to the channel layer failed", len(sends), exc_info=True
            )

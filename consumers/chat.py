"""One WebSocket per device: history on connect, sends acked, pushes forwarded.

Thin: frames are validated here, the work is done by ``chatserver.actions``, and typed errors
become error frames or close codes in ``_refuse``. Every socket remembers the highest message
id it has sent; a push that does not follow on from it (a lost push, a Redis outage) makes the
socket catch up from the store instead, so nothing is missed and nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from asgiref.typing import WebSocketDisconnectEvent
from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError

from chatserver import actions, limits, metrics, validation
from chatserver.errors import ChatError, InvalidFrame, InvalidMessage, RateLimited, Unavailable
from chatserver.events import (
    AckFrame,
    ErrorFrame,
    HistoryFrame,
    MessageEvent,
    MessageFrame,
    MessageOut,
    StatusEvent,
    TypingEvent,
    message_out,
)
from chatserver.layer import ChatChannelLayer
from chatserver.models import device_key
from chatserver.publish import chat_group

logger = logging.getLogger(__name__)


class ChatConsumer(AsyncWebsocketConsumer):
    region_slug: str
    language: str
    device_id: str
    region_id: int
    group: str | None = None
    opened = False
    last_id: int = 0
    ip: str = ""
    counted = False

    # --- the consumer's loop ------------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' loop, on one queue with one task.

        Channels waits on two tasks per socket, one for the socket's events and one for the
        channel layer's, with an ``asyncio.wait`` around them: with the layer's own queue per
        socket that was about a sixth of a socket's memory. daphne (and the test communicator)
        hand the application a queue's ``get`` as ``receive``; the layer delivers this
        consumer's messages to that same queue, so one ``await receive()`` waits for both."""
        inbox = getattr(receive, "__self__", None)
        layer = get_channel_layer(self.channel_layer_alias)
        if not isinstance(inbox, asyncio.Queue) or not isinstance(layer, ChatChannelLayer):
            await super().__call__(scope, receive, send)
            return
        self.scope = scope
        self.channel_layer = layer
        self.channel_name = await layer.new_channel()
        self.base_send = send
        layer.attach(self.channel_name, inbox)
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            layer.discard(self.channel_name)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its ``aclose_old_connections()`` before every handler: a
        hop to the database thread for every frame and every push. The handlers reach the
        database only through ``database_sync_to_async``, which closes stale connections
        itself, in the thread that holds them."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # --- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.accept()
        try:
            await self._open()
        except ChatError as error:
            await self._refuse(error)
        except DatabaseError:
            logger.warning("database unavailable for a socket connect", exc_info=True)
            await self._refuse(Unavailable())

    async def _open(self) -> None:
        kwargs = self.scope["url_route"]["kwargs"]
        self.language = validation.language(kwargs["language"])
        self.device_id = validation.device_id(kwargs["device_id"])
        self.region_slug = kwargs["region"]
        after = _after(self.scope.get("query_string", b""))
        headers = {
            name.decode("latin1"): value.decode("latin1")
            for name, value in self.scope.get("headers", [])
        }
        self.ip = limits.client_ip(self.scope.get("client"), headers)
        region_id = await actions.socket_region(self.region_slug)
        await limits.connections.acquire(device_key(self.device_id), self.ip, self.channel_name)
        self.counted = True
        metrics.SOCKETS_OPEN.inc()
        # Joined first, read second: a message committed in between arrives twice and the
        # second copy is dropped by ``last_id``; none can fall between the two.
        await self._join(region_id)
        snapshot = await actions.read_socket_conversation(
            self.region_slug, self.device_id, after=after
        )
        if snapshot.region_id != region_id:
            # The region was created again since socket_region remembered it.
            await self._join(snapshot.region_id)
            snapshot = await actions.read_socket_conversation(
                self.region_slug, self.device_id, after=after
            )
        conversation = snapshot.conversation
        self.last_id = max(snapshot.last_id, after or 0)
        frame: HistoryFrame = {
            "type": "chat.history",
            "messages": conversation["messages"],
            "chatbot_typing": conversation["chatbot_typing"],
            "evaluation_consent": conversation["evaluation_consent"],
            "last_id": snapshot.last_id,
        }
        await self._send(frame)
        self.opened = True

    async def _join(self, region_id: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        self.region_id = region_id
        self.group = chat_group(region_id, self.device_id)
        await self.channel_layer.group_add(self.group, self.channel_name)

    async def websocket_disconnect(self, message: WebSocketDisconnectEvent) -> None:
        """Channels' own, without its hop to the database thread (see ``dispatch``): this
        consumer joins no ``groups`` of channels' kind."""
        await self.disconnect(message["code"])
        raise StopConsumer

    async def disconnect(self, code: int) -> None:
        if hasattr(self.channel_layer, "discard"):
            self.channel_layer.discard(self.channel_name)
        if self.group is not None:
            with contextlib.suppress(Exception):  # Redis may be away; the group expires anyway
                await self.channel_layer.group_discard(self.group, self.channel_name)
        if self.counted:
            await limits.connections.release(self.channel_name)
            metrics.SOCKETS_OPEN.dec()
            self.counted = False

    # --- client frames ------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        client_id = None
        try:
            frame = _parse(text_data)
            if frame["type"] == "ping":
                await self._send({"type": "pong"})
                return
            client_id = frame.get("client_id") if isinstance(frame.get("client_id"), str) else None
            await self._chat_send(frame)
        except ChatError as error:
            await self._refuse(error, client_id)
        except DatabaseError:
            logger.warning("database unavailable for a socket send", exc_info=True)
            await self._refuse(Unavailable(), client_id)

    async def _chat_send(self, frame: dict[str, Any]) -> None:
        client_id = frame.get("client_id")
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= 64:
            raise InvalidFrame("chat.send needs a client_id of 1 to 64 characters.")
        text = frame.get("message")
        if text is not None and not isinstance(text, str):
            raise InvalidMessage("message must be a text.")
        text = validation.message_text(text)
        if text is None:
            raise InvalidMessage("The message is empty.")
        await limits.check_rate(
            f"send:{device_key(self.device_id)}", settings.RATE_LIMIT_SENDS_PER_DEVICE
        )
        result = await actions.send_message(
            self.region_slug,
            self.language,
            self.device_id,
            text=text,
            consent=validation.consent(frame.get("evaluation_consent")),
            client_id=validation.client_id(client_id),
            route="socket",
        )
        assert result.message is not None
        ack: AckFrame = {
            "type": "chat.ack",
            "client_id": client_id,
            "id": result.message.pk,
            "status": result.message.status,
        }
        await self._send(ack)

    # --- channel-layer events -----------------------------------------------------------------

    async def chat_message(self, event: MessageEvent) -> None:
        message = event["message"]
        if message["id"] <= self.last_id:
            return
        if event["prev_id"] > self.last_id:
            await self._catch_up()
            return
        await self._push(message)
        metrics.PUSH_LATENCY.observe(max(0.0, time.time() - event["published_at"]))

    async def chat_status(self, event: StatusEvent) -> None:
        await self._send({"type": "chat.status", "id": event["id"], "status": event["status"]})

    async def chat_typing(self, event: TypingEvent) -> None:
        await self._send({"type": "chat.typing", "chatbot_typing": event["chatbot_typing"]})

    async def layer_reconnected(self, event: dict[str, Any]) -> None:
        """Redis came back: it may have forgotten the group and lost pushes meanwhile."""
        if self.group is None:
            return
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception:
            # Away again: the layer sends another reconnected event when it is back.
            logger.warning("re-joining the group failed", exc_info=True)
        await self._catch_up()

    async def layer_overflowed(self, event: dict[str, Any]) -> None:
        """This socket fell so far behind that the layer dropped pushes for it."""
        if hasattr(self.channel_layer, "overflow_handled"):
            self.channel_layer.overflow_handled(self.channel_name)
        await self._catch_up()

    async def _catch_up(self) -> None:
        missed = await actions.messages_after(self.region_id, self.device_id, self.last_id)
        for chat, message in missed:
            await self._push(message_out(message, chat))

    async def _push(self, message: MessageOut) -> None:
        frame: MessageFrame = {"type": "chat.message", "message": message}
        self.last_id = max(self.last_id, message["id"])
        await self._send(frame)

    # --- out ----------------------------------------------------------------------------------

    async def _send(self, frame: Any) -> None:
        # The socket may have closed while this frame was being prepared (a slow database
        # call): its disconnect is next in line, and the device catches up when it reconnects.
        with contextlib.suppress(Disconnected):
            await self.send(text_data=json.dumps(frame, ensure_ascii=False))

    async def _refuse(self, error: ChatError, client_id: str | None = None) -> None:
        """The one place where typed errors become error frames or close codes."""
        if error.close_code is not None and not self.opened:
            await self.close(code=error.close_code)
            return
        frame: ErrorFrame = {"type": "error", "code": error.code, "detail": error.detail}
        if client_id is not None:
            frame["client_id"] = client_id
        if isinstance(error, RateLimited):
            frame["retry_after"] = error.retry_after_secs
        await self._send(frame)


def _parse(text_data: str | None) -> dict[str, Any]:
    if text_data is None:
        raise InvalidFrame("Only text frames are accepted.")
    try:
        frame = json.loads(text_data)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise InvalidFrame("The frame is not valid JSON.") from error
    if not isinstance(frame, dict):
        raise InvalidFrame
    kind = frame.get("type")
    # A list or object as type is unhashable: test the type before the set.
    if not isinstance(kind, str) or kind not in {"chat.send", "ping"}:
        raise InvalidFrame
    return frame


def _after(query_string: bytes) -> int | None:
    values = parse_qs(query_string.decode("latin1")).get("after")
    if not values or not values[0].isdigit() or len(values[0]) > 18:
        return None
    return int(values[0])

"""Helpers shared by the test tiers: waiting on events, and frame schemas."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, get_type_hints

from aiohttp import web

from chatserver import events
from chatserver.fakes.base import ThreadedServer

T = TypeVar("T")


async def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float = 10,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_for_sync(
    condition: Callable[[], T | None], *, timeout: float = 10, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


FRAME_SCHEMAS: dict[str, Any] = {
    "chat.history": events.HistoryFrame,
    "chat.message": events.MessageFrame,
    "chat.ack": events.AckFrame,
    "chat.status": None,
    "chat.typing": None,
    "error": events.ErrorFrame,
    "pong": None,
}
STATUS_KEYS = {"type", "id", "status"}
TYPING_KEYS = {"type", "chatbot_typing"}
MESSAGE_KEYS = {
    "id",
    "role",
    "content",
    "user_is_author",
    "automatic_answer",
    "created_at",
    "attachments",
    "status",
}


def check_message(message: dict[str, Any], *, rest: bool = False) -> None:
    allowed = MESSAGE_KEYS if rest else MESSAGE_KEYS | {"client_id"}
    assert MESSAGE_KEYS <= set(message) <= allowed, set(message) ^ MESSAGE_KEYS
    assert isinstance(message["id"], int)
    assert message["role"] in {"user", "agent"}
    assert message["user_is_author"] is (message["role"] == "user")
    assert isinstance(message["automatic_answer"], bool)
    assert message["status"] in {"pending", "sent", "failed"}
    created = message["created_at"]
    assert len(created) == 24 and created.endswith("Z") and created[19] == ".", created
    for attachment in message["attachments"]:
        assert set(attachment) == {"name", "size", "mime_type", "url"}


def check_conversation(body: dict[str, Any]) -> None:
    assert set(body) == {"messages", "evaluation_consent", "chatbot_typing", "ticket_url"}
    assert isinstance(body["evaluation_consent"], bool)
    assert isinstance(body["chatbot_typing"], bool)
    ids = [message["id"] for message in body["messages"]]
    assert ids == sorted(ids)
    for message in body["messages"]:
        check_message(message, rest=True)


def check_frame(frame: dict[str, Any]) -> None:
    """Every frame a test captures is checked against its schema in ``chatserver.events``."""
    kind = frame.get("type")
    assert kind in FRAME_SCHEMAS, frame
    if kind == "chat.status":
        assert set(frame) == STATUS_KEYS and frame["status"] in {"sent", "failed", "pending"}
        return
    if kind == "chat.typing":
        assert set(frame) == TYPING_KEYS and isinstance(frame["chatbot_typing"], bool)
        return
    if kind == "pong":
        assert set(frame) == {"type"}
        return
    schema = FRAME_SCHEMAS[kind]
    hints = get_type_hints(schema)
    required = schema.__required_keys__
    assert required <= set(frame) <= set(hints), (kind, set(frame))
    if kind == "chat.history":
        for message in frame["messages"]:
            check_message(message)
        assert isinstance(frame["last_id"], int)
    if kind == "chat.message":
        check_message(frame["message"])
    if kind == "chat.ack":
        assert isinstance(frame["id"], int) and frame["status"] in {"sent", "pending"}
    if kind == "error":
        assert frame["code"] in {
            "invalid_frame",
            "invalid_message",
            "rate_limited",
            "not_configured",
            "unavailable",
        }, frame


class Capture:
    """A webhook endpoint that records what the fake Zammad sends, byte for byte (the ``capture``
    fixture points the fake's webhook at it)."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = ThreadedServer(self._app)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        return app

    async def _receive(self, request: web.Request) -> web.Response:
        raw = await request.read()
        with self.lock:
            self.deliveries.append({"headers": dict(request.headers), "body": raw})
        return web.Response(text="Thanks!")

    def wait(self, count: int) -> list[dict[str, Any]]:
        wait_for_sync(lambda: len(self.deliveries) >= count, what=f"{count} deliveries")
        with self.lock:
            return list(self.deliveries[:count])

    async def wait_async(self, count: int) -> list[dict[str, Any]]:
        await wait_for(lambda: len(self.deliveries) >= count, what=f"{count} deliveries")
        with self.lock:
            return list(self.deliveries[:count])

"""The WebSocket protocol (wire-contract.md section 3) through Channels' communicator: every
frame type, error code and close code, each captured frame checked against its schema."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import AsyncClient

from chatserver import actions
from chatserver.asgi import application
from chatserver.events import rest_message
from chatserver.layer import ChatChannelLayer
from chatserver.models import Message, Region

from .conftest import amake_region, drain
from .helpers import check_frame

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = "socket-device-0001"
PATH = f"/ws/v3/augsburg/de/chat/{DEVICE}/"


class Socket:
    def __init__(
        self,
        path: str = PATH,
        headers: list[tuple[bytes, bytes]] | None = None,
        client: tuple[str, int] | None = None,
    ):
        self.communicator = WebsocketCommunicator(application, path, headers=headers or [])
        if client is not None:
            self.communicator.scope["client"] = client

    async def connect(self) -> Socket:
        connected, _ = await self.communicator.connect(timeout=5)
        assert connected
        return self

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.communicator.receive_from(timeout))
        check_frame(frame)
        return frame

    async def receive_type(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        while True:
            frame = await self.receive(timeout)
            if frame["type"] == kind:
                return frame

    async def send(self, frame: Any) -> None:
        await self.communicator.send_to(text_data=json.dumps(frame))

    async def nothing_pending(self) -> bool:
        return await self.communicator.receive_nothing(timeout=0.2)

    async def closed_with(self) -> int:
        output = await self.communicator.receive_output(5)
        if output["type"] == "websocket.send":
            output = await self.communicator.receive_output(5)
        assert output["type"] == "websocket.close", output
        code: int = output["code"]
        return code

    async def close(self) -> None:
        # Generously: the consumer's disconnect frees its places in Redis before it ends.
        await self.communicator.disconnect(timeout=5)


@pytest.fixture
async def sockets() -> AsyncIterator[list[Socket]]:
    opened: list[Socket] = []
    yield opened
    for socket in opened:
        await socket.close()


async def open_socket(sockets: list[Socket], path: str = PATH, **kwargs: Any) -> Socket:
    socket = await Socket(path, **kwargs).connect()
    sockets.append(socket)
    return socket


async def test_history_on_connect(region: Region, sockets: list[Socket]) -> None:
    socket = await open_socket(sockets)
    history = await socket.receive()
    assert history == {
        "type": "chat.history",
        "messages": [],
        "chatbot_typing": False,
        "evaluation_consent": False,
        "last_id": 0,
    }


async def test_send_ack_and_echo_to_every_socket(region: Region, sockets: list[Socket]) -> None:
    first = await open_socket(sockets)
    second = await open_socket(sockets)
    await first.receive_type("chat.history")
    await second.receive_type("chat.history")
    await first.send({"type": "chat.send", "client_id": "c-1", "message": "Hallo"})
    ack = await first.receive_type("chat.ack")
    assert ack["client_id"] == "c-1"
    assert ack["status"] == "pending"
    for socket in (first, second):
        pushed = await socket.receive_type("chat.message")
        assert pushed["message"]["id"] == ack["id"]
        assert pushed["message"]["client_id"] == "c-1"
        assert pushed["message"]["content"] == "Hallo"
    # The same client_id again: acked with the same id, nothing else.
    await first.send({"type": "chat.send", "client_id": "c-1", "message": "Hallo"})
    again = await first.receive_type("chat.ack")
    assert again["id"] == ack["id"]
    assert await second.nothing_pending()
    assert await Message.objects.acount() == 1


async def test_status_sent_after_zammad_has_it(
    region: Region, zammad: Any, sockets: list[Socket]
) -> None:
    socket = await open_socket(sockets)
    await socket.receive_type("chat.history")
    await socket.send({"type": "chat.send", "client_id": "c-1", "message": "Hallo"})
    ack = await socket.receive_type("chat.ack")
    await drain()
    status = await socket.receive_type("chat.status")
    assert status == {"type": "chat.status", "id": ack["id"], "status": "sent"}


async def test_rest_post_shows_up_live(region: Region, sockets: list[Socket]) -> None:
    socket = await open_socket(sockets)
    await socket.receive_type("chat.history")
    await AsyncClient().post(f"/api/v3/augsburg/de/chat/{DEVICE}/", {"message": "via REST"})
    pushed = await socket.receive_type("chat.message")
    assert pushed["message"]["content"] == "via REST"
    assert "client_id" not in pushed["message"]


async def test_resume_with_after(region: Region, sockets: list[Socket]) -> None:
    client = AsyncClient()
    path = f"/api/v3/augsburg/de/chat/{DEVICE}/"
    ids = []
    for text in ("one", "two", "three"):
        data = json.loads((await client.post(path, {"message": text})).content)
        ids.append(data["messages"][-1]["id"])
    socket = await open_socket(sockets, f"{PATH}?after={ids[0]}")
    history = await socket.receive()
    assert [m["content"] for m in history["messages"]] == ["two", "three"]
    assert history["last_id"] == ids[-1]


async def test_history_is_what_rest_shows(region: Region, sockets: list[Socket]) -> None:
    """The socket reads its history with its own queries: the same messages as REST's GET."""
    client = AsyncClient()
    path = f"/api/v3/augsburg/de/chat/{DEVICE}/"
    photo = SimpleUploadedFile("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png")
    await client.post(path, {"message": "with a photo", "attachment": [photo]})
    await client.post(path, {"message": "plain"})
    shown = json.loads((await client.get(path)).content)["messages"]
    history = await (await open_socket(sockets)).receive()
    assert [rest_message(message) for message in history["messages"]] == shown
    assert history["messages"][0]["attachments"][0]["name"] == "photo.png"
    assert history["last_id"] == shown[-1]["id"]
    resumed = await open_socket(sockets, f"{PATH}?after={shown[0]['id']}")
    assert (await resumed.receive())["messages"] == history["messages"][1:]


async def test_sockets_connecting_at_once_look_their_region_up_once(
    db: Any, zammad: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    region = await amake_region(zammad.url, slug="looked-up-once")  # not remembered yet
    looked_up = []
    look_up = actions._configured_region_id

    async def counted(slug: str) -> int:
        looked_up.append(slug)
        region_id: int = await look_up(slug)
        return region_id

    monkeypatch.setattr(actions, "_configured_region_id", counted)
    ids = await asyncio.gather(*(actions.socket_region(region.slug) for _ in range(20)))
    assert ids == [region.pk] * 20
    assert looked_up == [region.slug]
    await actions.socket_region(region.slug)  # remembered
    assert looked_up == [region.slug]


async def test_socket_too_far_behind_catches_up_from_the_store(
    region: Region, sockets: list[Socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the layer's capacity a socket's pushes are dropped for one catch-up event; once
    the socket has caught up, the next overflow brings a new one."""
    socket = await open_socket(sockets)
    await socket.receive_type("chat.history")
    layer = get_channel_layer()
    if not isinstance(layer, ChatChannelLayer):
        pytest.skip("capacity and catch-up events are the Redis layer's (REDIS_URL)")
    # Every push overflows: a message can only reach the socket through a catch-up.
    monkeypatch.setattr(layer, "inbox_capacity", 0)
    client = AsyncClient()
    pushed = []
    for text in ("one", "two", "three"):
        await client.post(f"/api/v3/augsburg/de/chat/{DEVICE}/", {"message": text})
        pushed.append((await socket.receive_type("chat.message"))["message"]["content"])
    assert pushed == ["one", "two", "three"]
    assert await socket.nothing_pending()


async def test_ping_pong_and_bad_frames_keep_socket_open(
    region: Region, sockets: list[Socket]
) -> None:
    socket = await open_socket(sockets)
    await socket.receive_type("chat.history")
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}
    cases: list[tuple[Any, str]] = [
        ("not json", "invalid_frame"),
        ([1, 2], "invalid_frame"),
        ({"type": "nope"}, "invalid_frame"),
        ({"no": "type"}, "invalid_frame"),
        ({"type": "chat.send", "message": "no client id"}, "invalid_frame"),
        ({"type": "chat.send", "client_id": "x" * 65, "message": "hi"}, "invalid_frame"),
        ({"type": "chat.send", "client_id": "c", "message": ""}, "invalid_message"),
        ({"type": "chat.send", "client_id": "c", "message": "  "}, "invalid_message"),
        ({"type": "chat.send", "client_id": "c", "message": 7}, "invalid_message"),
        ({"type": "chat.send", "client_id": "c", "message": "a" * 10_001}, "invalid_message"),
    ]
    for frame, code in cases:
        if isinstance(frame, str):
            await socket.communicator.send_to(text_data=frame)
        else:
            await socket.send(frame)
        error = await socket.receive()
        assert error["type"] == "error" and error["code"] == code, (frame, error)
        assert error["detail"]
    await socket.communicator.send_to(bytes_data=b"\x00\x01")
    assert (await socket.receive())["code"] == "invalid_frame"
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}
    assert await Message.objects.acount() == 0


async def test_error_frame_carries_client_id(region: Region, sockets: list[Socket]) -> None:
    socket = await open_socket(sockets)
    await socket.receive_type("chat.history")
    await socket.send({"type": "chat.send", "client_id": "c-9", "message": ""})
    error = await socket.receive()
    assert error["client_id"] == "c-9"


async def test_send_rate_limit(region: Region, sockets: list[Socket], rate_limits: Any) -> None:
    rate_limits.RATE_LIMIT_SENDS_PER_DEVICE = 3
    socket = await open_socket(sockets, f"/ws/v3/augsburg/de/chat/rate-{uuid.uuid4()}/")
    await socket.receive_type("chat.history")
    for number in range(3):
        await socket.send({"type": "chat.send", "client_id": f"c{number}", "message": "x"})
        await socket.receive_type("chat.ack")
    await socket.send({"type": "chat.send", "client_id": "c9", "message": "x"})
    error = await socket.receive_type("error")
    assert error["code"] == "rate_limited"
    assert isinstance(error["retry_after"], int) and error["retry_after"] >= 1
    assert error["client_id"] == "c9"


async def test_not_configured_while_open(region: Region, sockets: list[Socket]) -> None:
    socket = await open_socket(sockets)
    await socket.receive_type("chat.history")
    await Region.objects.filter(pk=region.pk).aupdate(chat_enabled=False)
    await socket.send({"type": "chat.send", "client_id": "c", "message": "hi"})
    error = await socket.receive_type("error")
    assert error["code"] == "not_configured"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/ws/v3/nowhere/de/chat/dev-1/", 4404),
        ("/ws/v3/augsburg/de/chat/bad.device/", 4400),
        (f"/ws/v3/augsburg/de/chat/{'a' * 65}/", 4400),
        ("/ws/v3/augsburg/DEUTSCH/chat/dev-1/", 4400),
        ("/ws/v3/artland/de/chat/dev-1/", 4503),
    ],
)
async def test_close_codes(region: Region, zammad: Any, path: str, code: int) -> None:
    await amake_region(zammad.url, slug="artland", webhook_token="w2", chat_enabled=False)
    socket = Socket(path)
    connected, _ = await socket.communicator.connect(timeout=5)
    assert connected
    assert await socket.closed_with() == code
    await socket.close()


async def test_connection_limit_per_device(
    region: Region, sockets: list[Socket], rate_limits: Any
) -> None:
    rate_limits.WS_MAX_CONNECTIONS_PER_DEVICE = 2
    path = f"/ws/v3/augsburg/de/chat/limited-{uuid.uuid4()}/"
    for _ in range(2):
        opened = await open_socket(sockets, path)
        await opened.receive_type("chat.history")  # its place is taken
    third = Socket(path)
    await third.communicator.connect(timeout=5)
    assert await third.closed_with() == 4429
    await third.close()


async def test_connection_limit_per_ip(
    region: Region, sockets: list[Socket], rate_limits: Any
) -> None:
    rate_limits.WS_MAX_CONNECTIONS_PER_IP = 2
    address = (f"198.51.100.{uuid.uuid4().int % 250}", 0)
    for number in (1, 2):
        opened = await open_socket(
            sockets, f"/ws/v3/augsburg/de/chat/ip-device-{number}/", client=address
        )
        await opened.receive_type("chat.history")
    third = Socket("/ws/v3/augsburg/de/chat/ip-device-3/", client=address)
    await third.communicator.connect(timeout=5)
    assert await third.closed_with() == 4429
    await third.close()
    # Another address is not affected.
    other = await open_socket(sockets, "/ws/v3/augsburg/de/chat/ip-device-4/", client=("x", 0))
    await other.receive_type("chat.history")
    # Closing a socket frees its place.
    await sockets.pop(0).close()
    again = await open_socket(sockets, "/ws/v3/augsburg/de/chat/ip-device-3/", client=address)
    await again.receive_type("chat.history")


async def test_limits_off_for_load_tests(
    region: Region, sockets: list[Socket], settings: Any
) -> None:
    settings.WS_MAX_CONNECTIONS_PER_DEVICE = 1
    for _ in range(3):
        socket = await open_socket(sockets)
        await socket.receive_type("chat.history")


async def test_origin_policy(region: Region, sockets: list[Socket], settings: Any) -> None:
    settings.WS_ALLOWED_ORIGINS = ["https://web.integreat.app"]
    native = await open_socket(sockets)  # no Origin header: a native app
    await native.receive_type("chat.history")
    allowed = await open_socket(sockets, headers=[(b"origin", b"https://web.integreat.app")])
    await allowed.receive_type("chat.history")
    refused = Socket(headers=[(b"origin", b"https://evil.example")])
    connected, _ = await refused.communicator.connect(timeout=5)
    assert not connected
    await refused.close()

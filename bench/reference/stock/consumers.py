"""The consumer of the Channels tutorial, reduced to one device group and pushes."""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

READY = '{"type": "ready"}'
PONG = '{"type": "pong"}'


def group_name(device: str) -> str:
    return f"d.{device}"


class DeviceConsumer(AsyncWebsocketConsumer):
    group = ""

    async def connect(self) -> None:
        self.group = group_name(self.scope["url_route"]["kwargs"]["device"])
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send(text_data=READY)

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None and text_data.startswith('{"type": "ping"'):
            await self.send(text_data=PONG)

    async def push_frame(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])

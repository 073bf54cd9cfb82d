"""Frames over the size limit close the socket with 1009, as the wire contract says.

autobahn, under daphne, lets an application close only with 1000 or 3000-4999, and by default
answers an oversized message by dropping the TCP connection (1006). The limit has to be set on
the protocol factory daphne builds, with ``failByDrop`` off so that autobahn sends the 1009
close itself. daphne offers no hook for that, so its factory class is replaced once, on import
of ``chatserver.asgi``, which both ``daphne chatserver.asgi:application`` and ``manage.py serve``
do before daphne builds the factory.
"""

from __future__ import annotations

from typing import Any

import daphne.server
from daphne.ws_protocol import WebSocketFactory
from django.conf import settings


class LimitedWebSocketFactory(WebSocketFactory):  # type: ignore[misc]
    def setProtocolOptions(self, **options: Any) -> None:
        limit = settings.WS_MAX_FRAME_BYTES
        options["maxMessagePayloadSize"] = min(options.get("maxMessagePayloadSize") or limit, limit)
        options["maxFramePayloadSize"] = min(options.get("maxFramePayloadSize") or limit, limit)
        options["failByDrop"] = False
        super().setProtocolOptions(**options)


def install() -> None:
    daphne.server.WebSocketFactory = LimitedWebSocketFactory

"""Origin policy: native apps send no ``Origin`` and are let in; browsers only from the
allow-list. (Channels' ``AllowedHostsOriginValidator`` refuses a missing Origin, which would lock
every native app out.)"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from channels.security.websocket import WebsocketDenier
from django.conf import settings


class OriginValidator:
    _asgi_single_callable = True  # an ASGI 3 application, though __call__ is no coroutine

    def __init__(self, application: Any, allowed: list[str] | None = None) -> None:
        self.application = application
        self.allowed = allowed

    def is_allowed(self, origin: str | None) -> bool:
        if origin is None:
            return True
        allowed = self.allowed if self.allowed is not None else settings.WS_ALLOWED_ORIGINS
        return "*" in allowed or origin.rstrip("/") in {item.rstrip("/") for item in allowed}

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[Any]:
        # Not a coroutine itself: it hands back the application's, which the server awaits, so
        # an open socket does not keep a frame of this function alive for its whole life.
        origin = None
        for name, value in scope.get("headers", []):
            if name == b"origin":
                origin = value.decode("latin1")
                break
        if scope["type"] == "websocket" and not self.is_allowed(origin):
            denier = WebsocketDenier()
            return denier(scope, receive, send)  # type: ignore[arg-type]
        result: Awaitable[Any] = self.application(scope, receive, send)
        return result

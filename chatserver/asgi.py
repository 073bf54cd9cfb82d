"""ASGI entry point: ``daphne chatserver.asgi:application`` serves HTTP and WebSockets."""

import gc
import os
from typing import Any

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatserver.settings")
django.setup(set_prefix=False)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from chatserver import daphne_protocol  # noqa: E402
from chatserver.middleware import is_api_path  # noqa: E402
from consumers.origin import OriginValidator  # noqa: E402
from consumers.routing import websocket_urlpatterns  # noqa: E402


class ChatASGIHandler(ASGIHandler):
    """Django's handler, minus a thread per API request.

    Django serves every request in a ``ThreadSensitiveContext``: a thread of its own, started
    and joined per request, for sync middleware and views. Starting it was the largest single
    cost of a webhook or a poll (docs/performance.md). The API's views are async and take the
    database through ``database_sync_to_async``, one self-contained transaction per call, so
    they share the process's database thread with the sockets instead; the admin keeps
    Django's way.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and is_api_path(scope["path"]):
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


daphne_protocol.install()

application = ProtocolTypeRouter(
    {
        "http": ChatASGIHandler(),
        "websocket": OriginValidator(URLRouter(websocket_urlpatterns)),
    }
)

# The garbage collector: everything loaded so far lives as long as the process, so it leaves
# the collector's generations; and young collections run less often. With thousands of open
# sockets, the collector's passes over long-lived objects were an eighth of a webhook's CPU
# (docs/performance.md).
gc.freeze()
gc.set_threshold(*settings.GC_THRESHOLDS)

"""ASGI entry point: ``daphne chatserver.asgi:application`` serves HTTP and WebSockets."""

import gc
import os
from typing import Any

import django
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatserver.settings")
django.setup(set_prefix=False)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from chatserver import daphne_protocol  # noqa: E402
from chatserver.middleware import is_api_path  # noqa: E402
from consumers.origin import OriginValidator  # noqa: E402
from consumers.routing import websocket_urlpatterns  # noqa: E402


class ChatASGIHandler(ASGIHandler):
    """Django's handler, minus a thread per API request and the hand-offs to it.

    Django serves every request in a ``ThreadSensitiveContext``: a thread of its own, started
    and joined per request, for sync middleware and views, and hands the request signals and
    ``response.close()`` to it. Those were the largest costs of a webhook or a poll
    (docs/performance.md). The API's views are async and reach the database through
    ``chatserver.db`` (threads of its own, one self-contained unit of work per call), so they
    need none of it; the admin keeps Django's way.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await super().__call__(scope, receive, send)
        elif "/attachments/" in scope["path"]:
            # Streamed from Zammad: Django's own way, which stops streaming when the client
            # hangs up.
            await self.handle(scope, receive, send)
        else:
            await self.handle_api(scope, receive, send)

    async def handle_api(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Django's ``handle``, minus its two thread hand-offs per request: the request
        signals' sync receivers and ``response.close()`` run inline (for these requests they
        only close database connections that this thread never opens)."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        response = await self.run_get_response(request) if request else error_response
        assert response is not None  # create_request gives a request or an error response
        try:
            await self.send_response(response, send)
        finally:
            response.close()
            body_file.close()


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

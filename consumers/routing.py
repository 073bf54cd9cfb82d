from typing import Any, cast

from django.urls import re_path

from .chat import ChatConsumer

# The path accepts any segment; the consumer validates it and closes with 4400, so that a bad
# device id gets a clear close code rather than a refused handshake.
websocket_urlpatterns = [
    re_path(
        r"^ws/v3/(?P<region>[^/]+)/(?P<language>[^/]+)/chat/(?P<device_id>[^/]+)/$",
        cast(Any, ChatConsumer.as_asgi()),
    ),
]

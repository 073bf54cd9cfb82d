"""The ASGI application of the stock reference, as the Channels tutorial wires it (without the
session/auth stack, which needs a database): HTTP through Django, ``/ws/<device>/`` to the
consumer."""

from __future__ import annotations

import os
from typing import Any, cast

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.reference.stock.settings")
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from bench.reference.stock.consumers import DeviceConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": URLRouter([path("ws/<str:device>/", cast(Any, DeviceConsumer.as_asgi()))]),
    }
)

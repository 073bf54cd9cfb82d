"""ASGI entry point: ``daphne chatserver.asgi:application`` serves HTTP and WebSockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatserver.settings")
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chatserver import daphne_protocol  # noqa: E402
from consumers.origin import OriginValidator  # noqa: E402
from consumers.routing import websocket_urlpatterns  # noqa: E402

daphne_protocol.install()

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": OriginValidator(URLRouter(websocket_urlpatterns)),
    }
)

"""Run inside the server's source tree, with the server's environment:
``python -m bench.provision DEVICES``. Inserts one chat per device (each with its Zammad ticket)
in bulk, and prints, as JSON, the settings the report shows, as the server will see them.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any


def main(devices: int) -> dict[str, Any]:
    import django

    django.setup()
    from asgiref.sync import SyncToAsync
    from django.conf import settings
    from django.db import connections
    from django.utils import timezone

    from bench.stack import LANGUAGE, REGION_SLUG, device_id, ticket_id
    from chatserver.models import Chat, Region

    region = Region.objects.get(slug=REGION_SLUG)
    now = timezone.now()
    Chat.objects.bulk_create(
        [
            Chat(
                region=region,
                device_id=device_id(index),
                language=LANGUAGE,
                zammad_ticket_id=ticket_id(index),
                created_at=now,
                last_activity_at=now,
                expires_at=now + timedelta(days=30),
            )
            for index in range(devices)
        ],
        batch_size=2000,
    )
    database: dict[str, Any] = dict(settings.DATABASES["default"])
    layer: dict[str, Any] = settings.CHANNEL_LAYERS["default"]
    config: dict[str, Any] = layer.get("CONFIG", {})
    connections.close_all()
    if database.get("OPTIONS", {}).get("pool"):
        # The pool's threads would keep this process from exiting.
        connections["default"].close_pool()  # type: ignore[attr-defined]
    return {
        "layer": layer["BACKEND"],
        "capacity": config.get("capacity"),
        "expiry": config.get("expiry"),
        "group_expiry": config.get("group_expiry"),
        "redis_max_connections": getattr(settings, "REDIS_MAX_CONNECTIONS", None),
        "conn_max_age": database.get("CONN_MAX_AGE"),
        "pool": database.get("OPTIONS", {}).get("pool"),
        "rate_limits": settings.CHAT_RATE_LIMITS_ENABLED,
        "log_level": settings.LOG_LEVEL,
        "ping_interval": getattr(settings, "WS_PING_INTERVAL_SECS", None),
        # Threads of the request path's database calls (chatserver/db.py); servers from before
        # it ran every consumer's calls in asgiref's one thread-sensitive thread.
        "consumer_db_threads": getattr(
            settings,
            "DB_THREADS",
            getattr(SyncToAsync.single_thread_executor, "_max_workers", None),
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1])), default=str))

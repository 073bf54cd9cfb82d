"""Server settings for measuring proposed changes without editing the server: the server's own
settings, plus the changes docs/performance.md recommends, each switched on by a variable.

Used as ``bench/run --server-env DJANGO_SETTINGS_MODULE=bench.server_settings --server-env
BENCH_...=...`` (or ``bench/run --fixes``, which sets them all). With no ``BENCH_`` variable set
it is exactly ``chatserver.settings``.

- ``BENCH_CONN_MAX_AGE``: seconds a database connection is kept (the server now uses 0 with a
  psycopg pool, as Django says for ASGI; this measures the old way).
- ``BENCH_DB_POOL_MAX``: the size of Django's psycopg connection pool (the server's default is
  ``DB_POOL_MAX_SIZE`` 16).
- ``BENCH_SYNC_THREADS``: threads for the consumers' database calls. Channels consumers run no
  ``ThreadSensitiveContext``, so every ``database_sync_to_async`` call of every socket runs on
  asgiref's one process-wide thread; this widens that executor (what ``thread_sensitive=False``
  on the consumers' read actions would do in the server's code).
- ``BENCH_LISTEN_BACKLOG``: the listen backlog of daphne's endpoint (Twisted's default is 50).
- ``BENCH_LAYER_EXPIRY``: seconds a push may wait in the layer's Redis queue before
  channels-redis discards it (the server now uses 300).
- ``BENCH_LAYER=batched``: the prototype of the batched receive (``bench/layers.py``) that the
  server's layer has since adopted in its own reader task.
- ``BENCH_LAYER=pubsub``: channels-redis's ``RedisPubSubChannelLayer`` instead of the server's
  layer (no per-message round trips on receive; loses messages across Redis blips, which the
  server's store-based catch-up would have to cover). A reference point, not a recommendation.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chatserver.settings import *  # noqa: F403
from chatserver.settings import CHANNEL_LAYERS, DATABASES

_layer: dict[str, Any] = CHANNEL_LAYERS["default"]["CONFIG"]  # type: ignore[assignment]

if "BENCH_LAYER_EXPIRY" in os.environ:
    _layer["expiry"] = int(os.environ["BENCH_LAYER_EXPIRY"])

if os.environ.get("BENCH_LAYER") == "batched":
    CHANNEL_LAYERS["default"]["BACKEND"] = "bench.layers.BatchedChatChannelLayer"

if os.environ.get("BENCH_LAYER") == "pubsub":
    CHANNEL_LAYERS["default"] = {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": _layer["hosts"], "prefix": _layer["prefix"]},
    }

if "BENCH_CONN_MAX_AGE" in os.environ:
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["BENCH_CONN_MAX_AGE"])

if "BENCH_DB_POOL_MAX" in os.environ:
    # A pool requires CONN_MAX_AGE 0: connections go back to the pool at the end of each use.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": int(os.environ["BENCH_DB_POOL_MAX"]),
        "timeout": 20,
    }

if "BENCH_SYNC_THREADS" in os.environ:
    from asgiref.sync import SyncToAsync

    SyncToAsync.single_thread_executor = ThreadPoolExecutor(
        max_workers=int(os.environ["BENCH_SYNC_THREADS"]), thread_name_prefix="sync"
    )

if "BENCH_LISTEN_BACKLOG" in os.environ:
    # daphne binds ``serverFromString`` when ``manage.py serve`` imports it, after settings.
    from twisted.internet import endpoints

    _server_from_string: Any = endpoints.serverFromString
    _backlog = int(os.environ["BENCH_LISTEN_BACKLOG"])

    def _with_backlog(reactor: Any, description: str) -> Any:
        if description.startswith("tcp:") and "backlog=" not in description:
            description = f"{description}:backlog={_backlog}"
        return _server_from_string(reactor, description)

    endpoints.serverFromString = _with_backlog

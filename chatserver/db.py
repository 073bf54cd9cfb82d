"""How the request path (views and sockets, through ``chatserver.actions``) reaches the database.

Each call runs in one of ``DB_THREADS`` long-lived threads, as one self-contained unit of work
that takes a pooled connection and gives it back (Channels' ``database_sync_to_async`` closes
old connections before and after each call). Django's way, a new thread per request, cost more
than most views (docs/performance.md); Channels' way for consumers, one thread for the whole
process, let one slow query or a database outage hold up every socket and request at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar, cast

from channels.db import DatabaseSyncToAsync
from django.conf import settings

P = ParamSpec("P")
R = TypeVar("R")

_executor = ThreadPoolExecutor(max_workers=settings.DB_THREADS, thread_name_prefix="db")


def database_sync_to_async(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """``channels.db.database_sync_to_async``, in the request path's database threads."""
    wrapped = DatabaseSyncToAsync(func, thread_sensitive=False, executor=_executor)
    return cast(Callable[P, Awaitable[R]], wrapped)

"""How the request path (views and sockets, through ``chatserver.actions``) reaches the database.

Each call runs in one of ``DB_THREADS`` long-lived threads, as one self-contained unit of work
that takes a pooled connection and gives it back: old connections are closed before and after
each call, as Channels' ``database_sync_to_async`` does. Django's way, a new thread per request,
cost more than most views; Channels' way for consumers, one thread for the whole process, let
one slow query or a database outage hold up every socket and request at once. And asgiref's
``sync_to_async`` machinery (thread-sensitivity, deadlock checks, copying context variables
back) cost more than a poll's query; a plain executor call with the caller's context does what
this code needs (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import wraps
from typing import ParamSpec, TypeVar

from django.conf import settings
from django.db import close_old_connections, connection

P = ParamSpec("P")
R = TypeVar("R")

_executor = ThreadPoolExecutor(max_workers=settings.DB_THREADS, thread_name_prefix="db")


def database_sync_to_async(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ``func`` in a database thread, with the caller's context variables (log context)."""

    @wraps(func)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_executor, context.run, _unit_of_work, func, args, kwargs)

    return call


def _unit_of_work(func: Callable[..., R], args: tuple[object, ...], kwargs: dict[str, object]) -> R:
    close_old_connections()
    try:
        return func(*args, **kwargs)
    finally:
        close_old_connections()


@functools.cache
def on_postgresql() -> bool:
    """Whether the database is PostgreSQL, read once: ``connection`` is a per-context proxy, and
    looking through it cost a tenth of a poll answered from memory."""
    return connection.vendor == "postgresql"

"""Read-only queries of the hot paths (a poll, a socket's history), run from the event loop.

On PostgreSQL they run on psycopg's async connections, from a small pool per event loop: a
poll then needs no thread hand-off at all, which cost more than its query (docs/performance.md).
They use Django's own adapters (JSON as text for the fields' converters, time stamps in the
connection's time zone), so rows become the same model instances as through the ORM. Elsewhere
(SQLite, the demo) they run in the database threads like every other query.

Writes never come here: they stay in Django's transactions (``chatserver.actions``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from django.conf import settings
from django.db import DatabaseError, connection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .db import database_sync_to_async, on_postgresql

Row = tuple[Any, ...]


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnectionPool] = (
    weakref.WeakKeyDictionary()
)


async def rows(sql: str, params: Sequence[Any]) -> list[Row]:
    """All rows of a read-only query (``%s`` placeholders, as Django's)."""
    pool = await _pool()
    if pool is None:
        return await database_sync_to_async(rows_in_thread)(sql, params)
    # A pooled connection that a database restart broke fails once, and the pool drops it:
    # a read is safe to try again on another (instead of checking every connection first).
    for attempt in range(2):
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchall()
        except PoolTimeout as error:
            # The request path maps Django's DatabaseError to "unavailable" (503, frames).
            raise DatabaseError(str(error)) from error
        except psycopg.OperationalError as error:
            if attempt == 1:
                raise DatabaseError(str(error)) from error
        except psycopg.Error as error:
            raise DatabaseError(str(error)) from error
    raise AssertionError("unreachable")


def rows_in_thread(sql: str, params: Sequence[Any]) -> list[Row]:
    """All rows of a query, in the calling thread (a database thread, or a transaction's)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


async def _pool() -> AsyncConnectionPool | None:
    if not on_postgresql():
        return None
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = _new_pool()
        await pool.open()
    return pool


def connection_kwargs() -> dict[str, Any]:
    """What psycopg needs to connect to Django's database, outside Django's connections."""
    database = connection.settings_dict
    return {
        "dbname": database["NAME"],
        "user": database["USER"] or None,
        "password": database["PASSWORD"] or None,
        "host": database["HOST"] or None,
        "port": database["PORT"] or None,
    }


def _new_pool() -> AsyncConnectionPool:
    from django.db.backends.postgresql.psycopg_any import get_adapters_template

    return AsyncConnectionPool(
        conninfo="",
        kwargs={
            **connection_kwargs(),
            "autocommit": True,
            # Django's adapters: JSON as text (the fields' converters parse it), time stamps in
            # Django's time zone.
            "context": get_adapters_template(settings.USE_TZ, connection.timezone),
        },
        min_size=1,
        max_size=settings.DB_READ_CONNECTIONS,
        timeout=settings.DB_POOL_TIMEOUT_SECS,
        open=False,
        name="reads",
    )


async def close_pools() -> None:
    """Close this loop's pool (tests run a loop per test; a server closes with its process)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()

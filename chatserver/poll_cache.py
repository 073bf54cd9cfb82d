"""Polls of unchanged chats, answered from memory, exactly, across processes.

Most polls find their chat as the last poll left it. On PostgreSQL each process remembers,
per device, what a poll last read of its chat (id, version, expiry, the rendered answers), and
PostgreSQL tells every process of every change: triggers on the chat and region tables NOTIFY
at the commit (migration 0003), and one listening connection per process forgets what changed.
A poll of a remembered chat then needs no query: a 304 by its ETag, or the stored answer.

Why a remembered answer is never older than the store, but for the notification's own delay:

- nothing is remembered, nor answered from memory, unless the listening connection is up and
  a notification sent to itself has come back (``_listen``); when it fails, everything is
  forgotten until it listens again, since notifications in between are lost (a connection
  lost without a word is noticed by the next such check, within 2 * CHECK_SECS);
- a read that may have crossed a change is not remembered: a read takes a ``ticket`` before
  its query, and ``remember`` refuses it if anything was forgotten since;
- this process's own writes forget their device at the commit (``forget_on_commit``, from
  ``actions.save_chat``), so a device that writes and then polls the same process reads its
  write; a change written by another process arrives with its notification (about a
  millisecond), like a poll that came that much earlier.

Elsewhere (SQLite, the demo) and with ``POLL_CACHE_BYTES`` 0 nothing is remembered.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from django.conf import settings
from django.db import transaction
from psycopg.rows import TupleRow

from . import metrics, reads
from .db import on_postgresql

logger = logging.getLogger(__name__)

CHANNEL = "chatserver_polls"
APPLICATION_NAME = "chatserver poll cache"  # the listening connection, in pg_stat_activity
# Payloads: a device id (never holds "*" or ":", validation.DEVICE_ID), or one of these.
EVERYTHING = "*"  # a change that may touch any chat (a region, a TRUNCATE)
# Every this many seconds the listener checks its connection by sending itself a notification;
# if it does not come back within the same time, everything is forgotten and it connects anew.
# (A connection lost without a word is noticed within twice this.)
CHECK_SECS = 5.0
CHECK_PREFIX = "check:"
# Each check also reads how full PostgreSQL's notification queue is; from this share on, warn.
QUEUE_USAGE_WARNING = 0.5
RETRY_SECS = (0.5, 1, 2, 5, 10)
MAX_BODIES = 4  # answers remembered per chat version (to different ``after``)
ENTRY_BYTES = 400  # what a remembered chat costs besides its answers, roughly


@dataclass
class Remembered:
    chat_id: int
    version: int
    expires_at: float  # time.time() of the chat's expiry
    bodies: dict[int, bytes] = field(default_factory=dict)  # after -> the GET's JSON

    def etag(self, after: int | None) -> str:
        return f'"{self.chat_id}.{self.version}.{after or 0}"'

    @property
    def size(self) -> int:
        return ENTRY_BYTES + sum(len(body) for body in self.bodies.values())


class PollCache:
    """What one event loop's polls remember; ``forget`` may be called from any thread."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # (region slug, device) -> its chat, the least recently remembered first
        self._chats: OrderedDict[tuple[str, str], Remembered] = OrderedDict()
        self._slugs: dict[str, set[str]] = {}  # device -> the slugs remembered for it
        self._bytes = 0
        self._forgotten = 0  # moves on with everything forgotten: a ticket's number
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while polls are remembered
        self._closing = False

    # --- the poll's side ------------------------------------------------------------------------

    def recall(self, slug: str, device_id: str) -> Remembered | None:
        remembered = self._chats.get((slug, device_id))
        if remembered is None or remembered.expires_at <= time.time():
            return None
        return remembered

    def ticket(self) -> int | None:
        """Taken before a read that may be remembered; None when nothing may be."""
        with self._lock:
            return self._forgotten if self.listening.is_set() else None

    def remember(self, ticket: int | None, slug: str, device_id: str, found: Remembered) -> None:
        """Remember a chat read after ``ticket`` was taken (with the answers it holds); refused
        if anything was forgotten since."""
        with self._lock:
            if ticket is None or ticket != self._forgotten:
                return
            key = (slug, device_id)
            known = self._chats.pop(key, None)
            if known is not None:
                self._bytes -= known.size
                if (known.chat_id, known.version) == (found.chat_id, found.version):
                    found.bodies = {**known.bodies, **found.bodies}
            if len(found.bodies) > MAX_BODIES or found.size > self.max_bytes // 100:
                found.bodies = {}
            self._chats[key] = found
            self._slugs.setdefault(device_id, set()).add(slug)
            self._bytes += found.size
            while self._bytes > self.max_bytes:
                self._drop_oldest()

    # --- forgetting -----------------------------------------------------------------------------

    def forget(self, device_ids: Iterable[str]) -> None:
        with self._lock:
            self._forgotten += 1
            for device_id in device_ids:
                for slug in self._slugs.pop(device_id, ()):
                    known = self._chats.pop((slug, device_id), None)
                    if known is not None:
                        self._bytes -= known.size

    def forget_everything(self) -> None:
        self._reset(listening=self.listening.is_set())

    def _reset(self, *, listening: bool) -> None:
        """Forget everything, and remember from now on only if ``listening``."""
        with self._lock:
            self._forgotten += 1
            self._chats.clear()
            self._slugs.clear()
            self._bytes = 0
            if listening:
                self.listening.set()
            else:
                self.listening.clear()
        metrics.POLL_CACHE_LISTENING.set(int(listening))

    def _drop_oldest(self) -> None:
        (slug, device_id), known = self._chats.popitem(last=False)
        self._bytes -= known.size
        slugs = self._slugs.get(device_id)
        if slugs is not None:
            slugs.discard(slug)
            if not slugs:
                del self._slugs[device_id]

    # --- listening ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._closing = True  # ends the loop even if a client library turns the cancel
            task.cancel()  # into an error of its own
            await asyncio.gather(task, return_exceptions=True)
        self._reset(listening=False)

    async def _listen(self) -> None:
        failures = 0
        while not self._closing:
            try:
                async with await psycopg.AsyncConnection.connect(
                    **reads.connection_kwargs(), autocommit=True, application_name=APPLICATION_NAME
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await self._check(conn)
                    # Every change since LISTEN has been heard: remember from now on.
                    self._reset(listening=True)
                    failures = 0
                    while True:
                        async for notify in conn.notifies(timeout=CHECK_SECS):
                            self._heard(notify.payload)
                        await self._check(conn)
            except (psycopg.Error, OSError, TimeoutError) as error:
                logger.warning("poll cache: listening for chat changes failed: %s", error)
            finally:
                self._reset(listening=False)
            if self._closing:
                return
            await asyncio.sleep(RETRY_SECS[min(failures, len(RETRY_SECS) - 1)])
            failures += 1

    async def _check(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        """Send the connection a notification and act on all before it; TimeoutError if it does
        not come back within CHECK_SECS."""
        check = f"{CHECK_PREFIX}{secrets.token_hex(8)}"
        async with asyncio.timeout(CHECK_SECS):
            cursor = await conn.execute(
                "SELECT pg_notification_queue_usage() FROM pg_notify(%s, %s)", [CHANNEL, check]
            )
            row = await cursor.fetchone()
            if row is not None:
                _report_queue_usage(float(row[0]))
            async for notify in conn.notifies():
                if notify.payload == check:
                    return
                self._heard(notify.payload)

    def _heard(self, payload: str) -> None:
        if payload == EVERYTHING:
            self.forget_everything()
        elif not payload.startswith(CHECK_PREFIX):
            self.forget([payload])


def _report_queue_usage(usage: float) -> None:
    """How full PostgreSQL's notification queue is (0 to 1; the whole cluster's, so every
    process reports the same). It fills only while a listener of any channel stops reading."""
    metrics.NOTIFICATION_QUEUE_USAGE.set(usage)
    if usage >= QUEUE_USAGE_WARNING:
        logger.warning(
            "PostgreSQL's notification queue is %.0f%% full: a process that listens but does "
            "not read holds it (pg_stat_activity; at 100%% commits that notify fail)",
            100 * usage,
        )


_caches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PollCache] = (
    weakref.WeakKeyDictionary()
)


def cache() -> PollCache | None:
    """This event loop's poll cache, listening from its first use; None where there is none."""
    if settings.POLL_CACHE_BYTES <= 0 or not on_postgresql():
        return None
    loop = asyncio.get_running_loop()
    found = _caches.get(loop)
    if found is None:
        found = _caches[loop] = PollCache(settings.POLL_CACHE_BYTES)
        found.start()
    return found


def forget_on_commit(device_ids: Iterable[str]) -> None:
    """This process's polls forget these devices when the current transaction commits."""
    if _caches:
        forgotten = list(device_ids)
        transaction.on_commit(lambda: _forget(forgotten))


def _forget(device_ids: list[str]) -> None:
    for found in list(_caches.values()):
        found.forget(device_ids)


async def start() -> None:
    """Listen from now on, on this event loop (a server's start: its first polls can be
    remembered)."""
    cache()


async def close() -> None:
    """Stop this loop's listener (tests run a loop per test; a server closes with its process)."""
    found = _caches.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.close()

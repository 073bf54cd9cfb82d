"""Polls of unchanged chats answered from memory (chatserver/poll_cache.py): never older than
the store but for the notification's delay, whoever writes, and off whenever it cannot hear.

Against real PostgreSQL: its triggers and NOTIFY are what is tested. A write made with
``session_replication_role = replica`` fires no trigger, so PostgreSQL tells nobody: a poll that
still shows the old state afterwards was answered from memory."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import AsyncClient
from prometheus_client import REGISTRY

from chatserver import actions, metrics, poll_cache, reads
from chatserver.db import database_sync_to_async
from chatserver.models import Chat, Region

from .helpers import wait_for


def with_notify(test: Any) -> Any:
    """Real NOTIFY: PostgreSQL, and transactions that commit."""
    on_postgresql = pytest.mark.skipif(
        "postgresql" not in settings.DATABASES["default"]["ENGINE"],
        reason="NOTIFY is PostgreSQL's; elsewhere nothing is remembered",
    )
    return on_postgresql(pytest.mark.django_db(transaction=True)(test))


DEVICE = "5b2e6c1a-7d3f-4e8a-9c0b-1d2e3f4a5b6c"
CHAT = f"/api/v3/augsburg/de/chat/{DEVICE}/"


@pytest.fixture
def client() -> AsyncClient:
    return AsyncClient()


@pytest.fixture
async def polls(client: AsyncClient, region: Region) -> poll_cache.PollCache:
    """This test's poll cache, listening, and the device's chat with one message, "Hallo"."""
    found = poll_cache.cache()
    assert found is not None
    await asyncio.wait_for(found.listening.wait(), 10)
    assert (await client.post(CHAT, {"message": "Hallo"})).status_code == 200
    return found


async def messages_of(client: AsyncClient, **headers: Any) -> list[str]:
    answer = await client.get(CHAT, headers=headers)
    assert answer.status_code == 200
    return [message["content"] for message in json.loads(answer.content)["messages"]]


async def unheard(sql: str, params: list[Any]) -> None:
    """Write without firing triggers: PostgreSQL notifies no one."""
    async with (
        await psycopg.AsyncConnection.connect(**reads.connection_kwargs(), autocommit=True) as conn,
        conn.transaction(),
    ):
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql, params)


async def execute(sql: str, params: list[Any]) -> None:
    """Write as another process would: committed, and PostgreSQL notifies every listener."""
    async with await psycopg.AsyncConnection.connect(
        **reads.connection_kwargs(), autocommit=True
    ) as conn:
        await conn.execute(sql, params)


RENAME_FIRST_MESSAGE = (
    "UPDATE chatserver_message SET content = %s WHERE id = "
    "(SELECT MIN(m.id) FROM chatserver_message m JOIN chatserver_chat c ON c.id = m.chat_id "
    "WHERE c.device_id = %s)"
)
BUMP_VERSION = "UPDATE chatserver_chat SET version = version + 1 WHERE device_id = %s"


@with_notify
async def test_a_poll_of_an_unchanged_chat_is_answered_from_memory_byte_for_byte(
    client: AsyncClient, polls: poll_cache.PollCache
) -> None:
    polls.forget([DEVICE])
    first = await client.get(CHAT)  # read from the store
    await unheard(RENAME_FIRST_MESSAGE, ["changed behind its back", DEVICE])
    again = await client.get(CHAT)
    assert again.content == first.content
    assert {**again.headers, "X-Request-Id": ""} == {**first.headers, "X-Request-Id": ""}
    assert json.loads(again.content)["messages"][0]["content"] == "Hallo"
    by_etag = await client.get(CHAT, headers={"If-None-Match": first.headers["ETag"]})
    assert by_etag.status_code == 304
    assert by_etag.headers["ETag"] == first.headers["ETag"]
    # Each ``after`` is an answer of its own, remembered as read.
    after = json.loads(first.content)["messages"][0]["id"]
    assert json.loads((await client.get(f"{CHAT}?after={after}")).content)["messages"] == []


@with_notify
async def test_a_change_written_elsewhere_reaches_the_next_polls(
    client: AsyncClient, polls: poll_cache.PollCache
) -> None:
    etag = (await client.get(CHAT)).headers["ETag"]
    await unheard(RENAME_FIRST_MESSAGE, ["a counsellor's edit", DEVICE])
    await execute(BUMP_VERSION, [DEVICE])

    async def changed() -> bool:
        return (await client.get(CHAT, headers={"If-None-Match": etag})).status_code == 200

    await wait_for(changed, what="the notification of the change")
    assert await messages_of(client) == ["a counsellor's edit"]


@with_notify
async def test_this_process_reads_its_own_write_at_once(
    client: AsyncClient, polls: poll_cache.PollCache
) -> None:
    """A write of this process forgets the device at its commit, before any notification: the
    write here fires no trigger, so only that can make the next poll see it."""
    before = await client.get(CHAT)

    @database_sync_to_async
    def consent_unheard() -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL session_replication_role = replica")
            chat = Chat.objects.select_for_update().get(device_id=DEVICE, is_current=True)
            chat.evaluation_consent = True
            chat.version += 1
            actions.save_chat(chat)

    await consent_unheard()
    after = await client.get(CHAT)
    assert after.headers["ETag"] != before.headers["ETag"]
    assert json.loads(after.content)["evaluation_consent"] is True


@with_notify
async def test_a_region_changed_anywhere_forgets_every_chat(
    client: AsyncClient, region: Region, polls: poll_cache.PollCache
) -> None:
    assert (await client.get(CHAT)).status_code == 200
    await execute("UPDATE chatserver_region SET chat_enabled = false WHERE id = %s", [region.pk])

    async def refused() -> bool:
        return (await client.get(CHAT)).status_code != 200

    await wait_for(refused, what="the region's notification")
    assert (await client.get(CHAT)).status_code == 503  # not configured


@with_notify
async def test_nothing_is_remembered_while_the_listener_is_lost(
    client: AsyncClient, polls: poll_cache.PollCache
) -> None:
    """Notifications sent while nobody listens are lost: memory is dropped with the connection,
    and comes back only once the listener hears again."""
    assert await messages_of(client) == ["Hallo"]
    await execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        [poll_cache.APPLICATION_NAME],
    )
    await wait_for(lambda: not polls.listening.is_set(), what="the listener to notice")
    await unheard(RENAME_FIRST_MESSAGE, ["while nobody listened", DEVICE])
    assert await messages_of(client) == ["while nobody listened"]
    await asyncio.wait_for(polls.listening.wait(), 10)
    assert await messages_of(client) == ["while nobody listened"]
    await unheard(RENAME_FIRST_MESSAGE, ["remembered again", DEVICE])
    assert await messages_of(client) == ["while nobody listened"]


@with_notify
async def test_the_listener_reports_how_full_the_notification_queue_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Read with each check (the first before anything is remembered); past the warning share
    (here 0, as a real queue takes gigabytes to fill) each check warns."""
    metrics.NOTIFICATION_QUEUE_USAGE.set(-1)
    monkeypatch.setattr(poll_cache, "QUEUE_USAGE_WARNING", 0.0)
    found = poll_cache.cache()
    assert found is not None
    await asyncio.wait_for(found.listening.wait(), 10)
    usage = REGISTRY.get_sample_value("chat_notification_queue_usage")
    assert usage is not None and 0 <= usage < 0.5
    assert "notification queue is 0% full" in caplog.text


async def test_nothing_is_remembered_on_sqlite_or_when_switched_off(settings: Any) -> None:
    if "sqlite" in settings.DATABASES["default"]["ENGINE"]:
        assert poll_cache.cache() is None
    settings.POLL_CACHE_BYTES = 0
    assert poll_cache.cache() is None


# --- the memory itself ---------------------------------------------------------------------------


def remembered(chat_id: int = 1, version: int = 1, body: bytes = b"{}") -> poll_cache.Remembered:
    return poll_cache.Remembered(chat_id, version, time.time() + 60, {0: body})


def listening_cache(max_bytes: int = 1 << 20) -> poll_cache.PollCache:
    polls = poll_cache.PollCache(max_bytes)
    polls._reset(listening=True)
    return polls


def test_a_read_that_crossed_a_change_is_not_remembered() -> None:
    polls = listening_cache()
    ticket = polls.ticket()
    polls.forget(["some other device"])
    polls.remember(ticket, "augsburg", DEVICE, remembered())
    assert polls.recall("augsburg", DEVICE) is None
    polls.remember(polls.ticket(), "augsburg", DEVICE, remembered())
    assert polls.recall("augsburg", DEVICE) is not None


def test_nothing_is_remembered_unless_listening() -> None:
    polls = poll_cache.PollCache(1 << 20)
    assert polls.ticket() is None
    polls.remember(None, "augsburg", DEVICE, remembered())
    assert polls.recall("augsburg", DEVICE) is None


def test_an_expired_chat_is_not_answered_from_memory() -> None:
    polls = listening_cache()
    stale = remembered()
    stale.expires_at = time.time() - 1
    polls.remember(polls.ticket(), "augsburg", DEVICE, stale)
    assert polls.recall("augsburg", DEVICE) is None


def test_answers_of_one_version_add_up_and_a_new_version_replaces_them() -> None:
    polls = listening_cache()
    polls.remember(polls.ticket(), "augsburg", DEVICE, remembered(body=b"all"))
    second = remembered()
    second.bodies = {5: b"after 5"}
    polls.remember(polls.ticket(), "augsburg", DEVICE, second)
    found = polls.recall("augsburg", DEVICE)
    assert found is not None and found.bodies == {0: b"all", 5: b"after 5"}
    polls.remember(polls.ticket(), "augsburg", DEVICE, remembered(version=2, body=b"new"))
    found = polls.recall("augsburg", DEVICE)
    assert found is not None and found.bodies == {0: b"new"}


def test_memory_stays_within_its_bytes_the_oldest_go_first() -> None:
    body = b"x" * 1000
    polls = listening_cache(max_bytes=100 * (poll_cache.ENTRY_BYTES + len(body)))
    for number in range(150):
        polls.remember(polls.ticket(), "augsburg", f"device-{number}", remembered(body=body))
    assert polls._bytes <= polls.max_bytes
    assert polls.recall("augsburg", "device-0") is None
    assert polls.recall("augsburg", "device-149") is not None
    polls.forget([f"device-{number}" for number in range(150)])
    assert polls._bytes == 0 and not polls._slugs


def test_an_answer_too_large_to_remember_keeps_only_the_etag() -> None:
    polls = listening_cache(max_bytes=100_000)
    polls.remember(polls.ticket(), "augsburg", DEVICE, remembered(body=b"x" * 5_000))
    found = polls.recall("augsburg", DEVICE)
    assert found is not None and found.bodies == {} and found.etag(None) == '"1.1.0"'

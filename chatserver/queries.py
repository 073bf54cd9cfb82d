"""Hand-written SQL for the hot paths: a poll's and a socket's reads, and the webhook's batch.

Django compiles a queryset anew every time it runs: about 0.6 ms of CPU for the chat with its
region, more than everything else in a poll (docs/performance.md). These are the same queries,
written once; rows become model instances through the fields' own database converters, as
the ORM's would (JSON, and SQLite's dates and booleans). A poll's reads are async (``reads``:
on PostgreSQL straight from the event loop); those of sockets opening together and the
webhook's batch run in a database thread, the batch's in its transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from django.db import connection
from django.db.models import Model

from . import poll_cache, reads
from .db import on_postgresql
from .models import Chat, Message, Region, WebhookDelivery, Work

M = TypeVar("M", bound=Model)
Converter = Callable[[Any, Any, Any], Any]


@cache
def _columns(model: type[Model], alias: str) -> str:
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(str(field.column))}" for field in model._meta.concrete_fields)


@cache
def _loader(model: type[Model]) -> tuple[list[str], list[tuple[int, Any, list[Converter]]]]:
    """The model's attribute names in column order, and the converters of each column."""
    names = []
    converters = []
    for index, field in enumerate(model._meta.concrete_fields):
        names.append(field.attname)
        column = field.get_col(model._meta.db_table)
        found = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if found:
            converters.append((index, column, found))
    return names, converters


def _instance(model: type[M], values: Sequence[Any]) -> M:
    names, converters = _loader(model)
    row = list(values)
    for index, column, found in converters:
        for convert in found:
            row[index] = convert(row[index], column, connection)
    return model.from_db(connection.alias, names, row)


@cache
def _table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


# Identifiers come from the models; every value is a query parameter.
@cache
def _current_chat_sql() -> str:
    return (
        f"SELECT {_columns(Chat, 'c')}, {_columns(Region, 'r')} FROM {_table(Chat)} c "  # noqa: S608
        f"JOIN {_table(Region)} r ON r.id = c.region_id "
        "WHERE r.slug = %s AND c.device_id = %s AND c.is_current"
    )


@cache
def _messages_sql() -> str:
    return f"SELECT {_columns(Message, 'm')} FROM {_table(Message)} m WHERE m.chat_id = %s"  # noqa: S608


async def current_chat(region_slug: str, device_id: str) -> Chat | None:
    """The device's current chat in the region, with the region: one query."""
    found = await reads.rows(_current_chat_sql(), [region_slug, device_id])
    if not found:
        return None
    row = found[0]
    split = len(Chat._meta.concrete_fields)
    chat = _instance(Chat, row[:split])
    chat.region = _instance(Region, row[split:])
    return chat


async def messages(chat: Chat, after: int | None = None) -> list[Message]:
    """The chat's messages in id order, only those with ``id > after`` if given."""
    sql = _messages_sql()
    params: list[Any] = [chat.pk]
    if after:
        sql += " AND m.id > %s"
        params.append(after)
    found = [_instance(Message, row) for row in await reads.rows(sql + " ORDER BY m.id", params)]
    for message in found:
        message.chat = chat
    return found


def _placeholders(values: Sequence[Any]) -> str:
    """``%s, %s, ...``: one query parameter for each of ``values`` (an ``IN`` list)."""
    return ", ".join(["%s"] * len(values))


# --- sockets opening together (chatserver.actions._read_socket_conversations) -------------------

# Through ``raw()``, which still converts the values, and only the columns a socket's history
# needs: a reconnect storm runs thousands a second (1.4 ms a connect through the ORM, most of
# it compiling, against 0.5 ms).
_SOCKET_CHATS_SQL = (
    "SELECT c.id, c.region_id, c.device_id, c.language, c.expires_at, c.last_message_id,"
    " c.evaluation_consent, c.bot_typing, c.zammad_ticket_id, r.slug AS region_slug,"
    " r.chat_enabled AS region_enabled, r.zammad_url AS region_zammad_url,"
    " r.zammad_token AS region_zammad_token"
    " FROM chatserver_chat c JOIN chatserver_region r ON r.id = c.region_id"
    " WHERE r.slug IN ({slugs}) AND c.device_id IN ({devices}) AND c.is_current"
)
_SOCKET_MESSAGES_SQL = (
    "SELECT id, chat_id, role, content, automatic, created_at, status, client_id, attachments"
    " FROM chatserver_message WHERE {missed} ORDER BY chat_id, id"
)


def socket_chats(slugs: Sequence[str], devices: Sequence[str]) -> list[Chat]:
    """The current chats of these devices in these regions, each with the part of its region
    a socket needs (slug, switch, Zammad settings): one query for any number of sockets."""
    if not slugs or not devices:
        return []
    sql = _SOCKET_CHATS_SQL.format(slugs=_placeholders(slugs), devices=_placeholders(devices))
    chats = []
    for chat in Chat.objects.raw(sql, [*slugs, *devices]):
        selected = chat.__dict__  # the region's columns came along as extra attributes
        chat.region = Region(
            id=chat.region_id,
            slug=selected.pop("region_slug"),
            chat_enabled=selected.pop("region_enabled"),
            zammad_url=selected.pop("region_zammad_url"),
            zammad_token=selected.pop("region_zammad_token"),
        )
        chats.append(chat)
    return chats


def messages_after_each(after: dict[int, int]) -> list[Message]:
    """For each chat id in ``after``, its messages with a higher id; by chat, then by id."""
    if not after:
        return []
    sql = _SOCKET_MESSAGES_SQL.format(
        missed=" OR ".join(["(chat_id = %s AND id > %s)"] * len(after))
    )
    params = [value for chat_id, last in after.items() for value in (chat_id, last)]
    return list(Message.objects.raw(sql, params))


# --- the webhook's batch (chatserver.actions._apply_ticket_changes) -----------------------------


def regions_by_token(tokens: Sequence[str]) -> dict[str, Region]:
    if not tokens:
        return {}
    sql = (
        f"SELECT {_columns(Region, 'r')} FROM {_table(Region)} r "  # noqa: S608
        f"WHERE r.webhook_token IN ({_placeholders(tokens)})"
    )
    regions = [_instance(Region, row) for row in reads.rows_in_thread(sql, tokens)]
    return {region.webhook_token: region for region in regions}


@dataclass
class TicketState:
    """What a webhook batch needs to know before it writes."""

    seen: set[tuple[int, str]]  # (region id, delivery id) recorded before
    chats: list[Chat]  # the tickets' chats, locked, in id order
    article_ids: list[tuple[int, int]]  # (chat id, Zammad article id) of their messages


def ticket_state(
    region_ids: Sequence[int], delivery_ids: Sequence[str], ticket_ids: Sequence[int]
) -> TicketState:
    """The deliveries seen before, the tickets' chats (locked for update in id order, so that
    two batches never wait on each other in a circle) and the Zammad articles those chats have.

    Three plain queries: psycopg's pipeline mode would send them in one round trip, but waits
    for the answers by polling, which cost more CPU than the two round trips it saves."""
    regions, tickets = _placeholders(region_ids), _placeholders(ticket_ids)
    lock = " FOR UPDATE OF c" if connection.features.has_select_for_update_of else ""
    statements: list[tuple[str, list[Any]]] = [
        (
            f"SELECT {_columns(Chat, 'c')} FROM {_table(Chat)} c "  # noqa: S608
            f"WHERE c.region_id IN ({regions}) AND c.zammad_ticket_id IN ({tickets}) "
            f"ORDER BY c.id{lock}",
            [*region_ids, *ticket_ids],
        ),
        (
            f"SELECT m.chat_id, m.zammad_article_id FROM {_table(Message)} m "  # noqa: S608
            f"JOIN {_table(Chat)} c ON c.id = m.chat_id "
            f"WHERE c.region_id IN ({regions}) AND c.zammad_ticket_id IN ({tickets}) "
            "AND m.zammad_article_id IS NOT NULL",
            [*region_ids, *ticket_ids],
        ),
    ]
    if delivery_ids:
        statements.append(
            (
                f"SELECT region_id, delivery_id FROM {_table(WebhookDelivery)} "  # noqa: S608
                f"WHERE region_id IN ({regions}) "
                f"AND delivery_id IN ({_placeholders(delivery_ids)})",
                [*region_ids, *delivery_ids],
            )
        )
    results = [reads.rows_in_thread(sql, params) for sql, params in statements]
    return TicketState(
        seen={(row[0], row[1]) for row in results[2]} if delivery_ids else set(),
        chats=[_instance(Chat, row) for row in results[0]],
        article_ids=[(row[0], row[1]) for row in results[1]],
    )


def chats_with_queued(chat_ids: Sequence[int], kind: str) -> set[int]:
    """The ids of these chats that have work of this kind queued."""
    if not chat_ids:
        return set()
    sql = (
        f"SELECT DISTINCT chat_id FROM {_table(Work)} "  # noqa: S608
        f"WHERE chat_id IN ({_placeholders(chat_ids)}) AND kind = %s AND state = %s"
    )
    return {row[0] for row in reads.rows_in_thread(sql, [*chat_ids, kind, Work.State.QUEUED])}


def save_chats(chats: Sequence[Chat], fields: Sequence[str]) -> None:
    """``chat.save(update_fields=fields)`` for many chats, without compiling a queryset."""
    if not chats:
        return
    model_fields = [field for field in Chat._meta.concrete_fields if field.name in fields]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(str(field.column))} = %s" for field in model_fields)
    sql = f"UPDATE {_table(Chat)} SET {assignments} WHERE id = %s"  # noqa: S608
    rows = [
        [field.get_db_prep_save(getattr(chat, field.attname), connection) for field in model_fields]
        + [chat.pk]
        for chat in chats
    ]
    # One prepared statement per chat; executemany() would use psycopg's pipeline mode, whose
    # polling wait cost more CPU than the round trips.
    with connection.cursor() as cursor:
        for row in rows:
            cursor.execute(sql, row)
    poll_cache.forget_on_commit(chat.device_id for chat in chats)


def insert(objects: Sequence[Model], *, ignore_conflicts: bool = False) -> None:
    """``bulk_create`` for the webhook's batch: one statement, the new ids set on the objects
    (unless conflicts are ignored), without compiling a queryset."""
    if not objects:
        return
    model = type(objects[0])
    fields = _insert_fields(model)
    values = [
        [field.get_db_prep_save(field.pre_save(obj, add=True), connection) for field in fields]
        for obj in objects
    ]
    sql, params = _insert_sql(model, values)
    if ignore_conflicts:
        with connection.cursor() as cursor:
            cursor.execute(sql + " ON CONFLICT DO NOTHING", params)
        return
    # Ids come back in the order of the rows, as Django's bulk_create relies on too.
    for obj, (pk,) in zip(
        objects, reads.rows_in_thread(sql + " RETURNING id", params), strict=True
    ):
        obj.pk = pk
        obj._state.adding = False


def _insert_sql(model: type[Model], values: list[list[Any]]) -> tuple[str, list[Any]]:
    if on_postgresql():
        # One array per column (as Django's own bulk_create does on PostgreSQL): the same
        # statement for any number of rows, so it is parsed and prepared once, not per batch.
        return _unnest_insert_sql(model), [list(column) for column in zip(*values, strict=True)]
    rows = ", ".join([f"({_placeholders(_insert_fields(model))})"] * len(values))
    sql = f"INSERT INTO {_table(model)} ({_insert_columns(model)}) VALUES {rows}"  # noqa: S608
    return sql, [value for row in values for value in row]


def _insert_fields(model: type[Model]) -> list[Any]:
    return [field for field in model._meta.concrete_fields if not field.primary_key]


@cache
def _insert_columns(model: type[Model]) -> str:
    quote = connection.ops.quote_name
    return ", ".join(quote(str(field.column)) for field in _insert_fields(model))


@cache
def _unnest_insert_sql(model: type[Model]) -> str:
    # Written once per model, like the module's other SQL, not on every batch.
    arrays = ", ".join(f"%s::{field.db_type(connection)}[]" for field in _insert_fields(model))
    columns = _insert_columns(model)
    return f"INSERT INTO {_table(model)} ({columns}) SELECT * FROM unnest({arrays})"  # noqa: S608

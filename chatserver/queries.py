"""Hand-written SQL for the queries of a poll: the device's current chat, and its messages.

Django compiles a queryset anew every time it runs: about 0.6 ms of CPU for the chat with its
region, more than everything else in a poll (docs/performance.md). These are the same queries,
written once; rows become model instances through the fields' own database converters, as
the ORM's would (JSON, and SQLite's dates and booleans).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

from django.db import connection
from django.db.models import Model

from .models import Chat, Message, Region

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


def current_chat(region_slug: str, device_id: str) -> Chat | None:
    """The device's current chat in the region, with the region: one query."""
    with connection.cursor() as cursor:
        cursor.execute(_current_chat_sql(), [region_slug, device_id])
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(Chat._meta.concrete_fields)
    chat = _instance(Chat, row[:split])
    chat.region = _instance(Region, row[split:])
    return chat


def messages(chat: Chat, after: int | None = None) -> list[Message]:
    """The chat's messages in id order, only those with ``id > after`` if given."""
    sql = _messages_sql()
    params: list[Any] = [chat.pk]
    if after:
        sql += " AND m.id > %s"
        params.append(after)
    with connection.cursor() as cursor:
        cursor.execute(sql + " ORDER BY m.id", params)
        rows = cursor.fetchall()
    found = [_instance(Message, row) for row in rows]
    for message in found:
        message.chat = chat
    return found

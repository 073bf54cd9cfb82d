"""Log context: the ids of what a log line is about, on every line, without passing them around.

The request middleware sets a short random request id (also sent back as ``X-Request-Id``) and,
for Zammad's webhook, the delivery id; actions and background work add what they know with
``log_context(chat_id=..., delivery_id=...)``. The ids live in a context variable, so they follow
the request into ``database_sync_to_async`` threads and tasks it starts, and never leak into
another request. ``ContextFilter`` copies them onto every record that passes the console handler;
``JsonFormatter`` writes one JSON object per line for ``LOG_FORMAT=json``.

Nothing here redacts: callers only pass ids that are safe to log (never a device id, token or
secret; device ids are shortened by ``actions.log_device`` before they reach a message).
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

# The ids a record may carry, in the order the plain format prints them.
CONTEXT_KEYS = ("request_id", "chat_id", "delivery_id")
REQUEST_ID_BYTES = 6  # 12 hex characters: unique enough to grep one request's lines
CONTEXT_VALUE_MAX_CHARS = 64

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "chatserver_log_context", default=MappingProxyType({})
)


def new_request_id() -> str:
    return secrets.token_hex(REQUEST_ID_BYTES)


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Add ids to every log line written inside the block (``None`` values are skipped)."""
    added = {
        key: str(value)[:CONTEXT_VALUE_MAX_CHARS] for key, value in ids.items() if value is not None
    }
    token = _context.set({**_context.get(), **added})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current ids on the record: one attribute each, and ``context`` for plain text
    (`` [request_id=… chat_id=…]``, empty when there are none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get()
        for key in CONTEXT_KEYS:
            if not hasattr(record, key):
                setattr(record, key, ids.get(key))
        shown = [
            f"{key}={value}" for key in CONTEXT_KEYS if (value := getattr(record, key)) is not None
        ]
        shown += [f"{key}={value}" for key, value in ids.items() if key not in CONTEXT_KEYS]
        record.context = f" [{' '.join(shown)}]" if shown else ""
        return True


class RedactPathsFilter(logging.Filter):
    """Django's own request logger quotes full paths (``Not Found: /api/v3/.../<device id>/``):
    device ids are shortened here as everywhere else."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .middleware import redact_path

        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_path(arg.split("?", 1)[0]) if isinstance(arg, str) else arg
                for arg in record.args
            )
        request = getattr(record, "request", None)
        if request is not None:
            record.request = None  # its repr would carry the path and the query string
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        for key, value in _context.get().items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)

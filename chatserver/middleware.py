"""Request logging: every request once, with status and duration, and no secrets.

daphne's access log prints raw paths (device ids, the webhook's ``?token=``), so it is switched
off in the documented commands and this logs instead, with device ids shortened.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

logger = logging.getLogger("chatserver.requests")

_CHAT_PATH = re.compile(r"(/(?:chat|extensions/v3/chat)/|/api/v3/[^/]+/)([^/]{9,})")


def redact_path(path: str) -> str:
    """Shorten device ids to 8 characters; the query string (webhook token) is never logged."""
    return _CHAT_PATH.sub(lambda match: f"{match.group(1)}{match.group(2)[:8]}…", path)


class RequestLogMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response = await self.get_response(request)
        logger.info(
            "%s %s %s %.1fms",
            request.method,
            redact_path(request.path),
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

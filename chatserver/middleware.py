"""Request logging: every request once, with status and duration, and no secrets.

daphne's access log prints raw paths (device ids, the webhook's ``?token=``), so it is switched
off in the documented commands and this logs instead, with device ids shortened.

Each request gets a short random id, sent back as ``X-Request-Id`` and carried by every log line
written while it is served (with the webhook's delivery id), see ``chatserver.logging``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from .logging import log_context, new_request_id

logger = logging.getLogger("chatserver.requests")

_CHAT_PATH = re.compile(r"(/(?:chat|extensions/v3/chat)/|/api/v3/[^/]+/)([^/]{9,})")
# Polled every few seconds by orchestrators and Prometheus: logged at DEBUG unless they fail.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
REQUEST_ID_HEADER = "X-Request-Id"


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
        request_id = new_request_id()
        with log_context(
            request_id=request_id, delivery_id=request.headers.get("X-Zammad-Delivery")
        ):
            response = await self.get_response(request)
            quiet = request.path in PROBE_PATHS and response.status_code < 400
            logger.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %s %.1fms",
                request.method,
                redact_path(request.path),
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
        response[REQUEST_ID_HEADER] = request_id
        return response

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
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, resolve

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


def is_api_path(path: str) -> bool:
    """The chat API, the webhook and the probes: async views that use no session, user, CSRF
    token or message (those serve the admin and the demo page)."""
    return path.startswith(API_PREFIXES) or "/wp-json/" in path


API_PREFIXES = ("/api/", "/healthz", "/readyz", "/metrics")


class ApiMiddleware:
    """API requests go straight to their view, past the admin's middleware.

    Django runs each of the session, auth, CSRF and message middleware as sync hooks, one thread
    hand-off per hook and request; for a poll or a webhook those hand-offs cost more than the
    view (docs/performance.md). The API uses none of them. It keeps what they add to every
    answer: the security headers, X-Frame-Options and Content-Length, set here inline (pure
    header work, nothing that blocks). A path that resolves to no view takes the usual way.
    """

    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)
        self.security = SecurityMiddleware(get_response)
        self.common = CommonMiddleware(get_response)
        self.frame_options = XFrameOptionsMiddleware(get_response)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if not is_api_path(request.path_info):
            return await self.get_response(request)
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return await self.get_response(request)
        early = self.security.process_request(request) or self.common.process_request(request)
        if early is not None:
            return early
        request.resolver_match = match
        response: HttpResponse = await match.func(request, *match.args, **match.kwargs)
        response = self.security.process_response(request, response)
        common: HttpResponseBase = self.common.process_response(request, response)
        return self.frame_options.process_response(request, common)  # type: ignore[arg-type]

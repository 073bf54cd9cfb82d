"""The Zammad REST client: the only module that talks HTTP to Zammad.

Every call sends the region's token as ``Authorization: Token token=<token>`` and JSON, with a
timeout of seconds. Failures come out as exactly two types, so callers only decide "retry later"
or "give up and tell an admin":

- ``PermanentUpstreamError``: Zammad refused the request (401/403/404/422, other 4xx, a redirect).
  Retrying the same request cannot help; usually the token, group or ticket id is wrong.
- ``TemporaryUpstreamError``: Zammad is down, slow, answered 5xx/408/429, or sent a body that is
  not the JSON we expect (a proxy's HTML error page, a half-written body).

Error details are plain words built from the method, the path and Zammad's own error text; the
token never appears in them.

Sessions: aiohttp wants one long-lived ``ClientSession`` (connection pool) per event loop. daphne
runs no ASGI lifespan events, so sessions are created lazily on first use in each loop and closed
by ``close_sessions()`` (called on shutdown and by tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
from django.conf import settings

from chatserver.errors import PermanentUpstreamError, TemporaryUpstreamError, UpstreamError
from chatserver.metrics import UPSTREAM_ERRORS, UPSTREAM_SECONDS

SERVICE = "zammad"

# Zammad's error bodies are small JSON objects; anything longer is an HTML page we do not need.
ERROR_BODY_LIMIT_BYTES = 64 * 1024
ERROR_TEXT_LIMIT_CHARS = 200
ATTACHMENT_CHUNK_BYTES = 64 * 1024

# 408 and 429 are 4xx but mean "not now" (a proxy timeout, a rate limit), so they are retried.
TEMPORARY_4XX = frozenset({408, 429})

_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def _session() -> aiohttp.ClientSession:
    """The running loop's session, created on first use."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        # Loops that were closed without close_sessions() (tests, a dead worker) leave entries
        # whose sessions cannot be closed any more; forget them so the dict does not grow.
        for old_loop in [old for old in _sessions if old.is_closed()]:
            del _sessions[old_loop]
        session = aiohttp.ClientSession(raise_for_status=False)
        _sessions[loop] = session
    return session


async def close_sessions() -> None:
    """Close the running loop's session (a session can only be closed from its own loop)."""
    loop = asyncio.get_running_loop()
    session = _sessions.pop(loop, None)
    if session is not None and not session.closed:
        await session.close()


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    data: bytes
    mime_type: str


class AttachmentStream:
    """An attachment download in progress; read it with ``chunks()`` inside ``open_attachment``."""

    def __init__(self, response: aiohttp.ClientResponse, path: str) -> None:
        self._response = response
        self._path = path
        self.content_type: str = response.headers.get("Content-Type", "application/octet-stream")
        self.content_length: int | None = response.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece, straight from the socket, never all of it in memory."""
        try:
            async for chunk in self._response.content.iter_chunked(ATTACHMENT_CHUNK_BYTES):
                yield chunk
        except TimeoutError as exc:
            _fail("timeout", f"GET {self._path}: timed out while downloading", exc=exc)
        except aiohttp.ClientError as exc:
            _fail(
                "connection",
                f"GET {self._path}: download broke off ({type(exc).__name__})",
                exc=exc,
            )


class ZammadClient:
    """Calls to one Zammad instance with one token (one region)."""

    def __init__(self, base_url: str, token: str, *, timeout_secs: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_secs = (
            timeout_secs if timeout_secs is not None else float(settings.ZAMMAD_TIMEOUT_SECS)
        )

    def __repr__(self) -> str:
        # Keep the token out of logs and tracebacks that print the client.
        return f"ZammadClient({self.base_url!r})"

    # -- public calls -------------------------------------------------------------------------

    async def me(self) -> dict[str, Any]:
        """The integration user the token belongs to; its ``login`` is the chats' customer."""
        path = "/api/v1/users/me"
        user = _expect_object(await self._request_json("GET", path), "GET", path)
        if not isinstance(user.get("login"), str):
            _fail("bad_response", f"GET {path}: the user has no login")
        return user

    async def create_ticket(self, *, title: str, group: str, customer: str) -> dict[str, Any]:
        """Open a ticket without an article; the first message follows as an article."""
        path = "/api/v1/tickets"
        body = {"title": title, "group": group, "customer": customer}
        return _expect_object(await self._request_json("POST", path, body), "POST", path)

    async def create_article(
        self,
        *,
        ticket_id: int,
        body: str,
        sender: str,
        subject: str,
        internal: bool,
        article_type: str = "web",
        content_type: str = "text/html",
        attachments: Sequence[OutgoingAttachment] = (),
        preferences: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        path = "/api/v1/ticket_articles"
        payload: dict[str, Any] = {
            "ticket_id": ticket_id,
            "body": body,
            "content_type": content_type,
            "type": article_type,
            "internal": internal,
            "sender": sender,
            "subject": subject,
        }
        if attachments:
            # Zammad takes files inline as base64; note the hyphen in "mime-type".
            payload["attachments"] = [
                {
                    "filename": item.filename,
                    "data": base64.b64encode(item.data).decode("ascii"),
                    "mime-type": item.mime_type,
                }
                for item in attachments
            ]
        if preferences is not None:
            payload["preferences"] = preferences
        return _expect_object(await self._request_json("POST", path, payload), "POST", path)

    async def list_articles(self, ticket_id: int) -> list[dict[str, Any]]:
        """Every article of the ticket (Zammad does not page this call)."""
        path = f"/api/v1/ticket_articles/by_ticket/{int(ticket_id)}"
        articles = await self._request_json("GET", path)
        if not isinstance(articles, list) or not all(_has_int_id(item) for item in articles):
            _fail("bad_response", f"GET {path}: expected a list of articles")
        return articles

    async def search_tickets(self, query: str) -> list[dict[str, Any]]:
        """``tickets/search`` with ``expand=true``: a list of tickets."""
        path = f"/api/v1/tickets/search?query={quote(query)}&expand=true&limit=50"
        tickets = await self._request_json("GET", path)
        if not isinstance(tickets, list) or not all(_has_int_id(item) for item in tickets):
            _fail("bad_response", "GET /api/v1/tickets/search: not a list of tickets")
        return tickets

    async def get_ticket(self, ticket_id: int) -> dict[str, Any]:
        path = f"/api/v1/tickets/{int(ticket_id)}"
        return _expect_object(await self._request_json("GET", path), "GET", path)

    async def update_ticket(self, ticket_id: int, attributes: dict[str, Any]) -> dict[str, Any]:
        path = f"/api/v1/tickets/{int(ticket_id)}"
        return _expect_object(await self._request_json("PUT", path, attributes), "PUT", path)

    @asynccontextmanager
    async def open_attachment(
        self, ticket_id: int, article_id: int, attachment_id: int
    ) -> AsyncIterator[AttachmentStream]:
        """Stream an attachment's content; the response is released when the block ends.

        The timeout bounds connecting and every single read, not the whole download, so a large
        file on a slow link still gets through while a stalled one fails.
        """
        path = f"/api/v1/ticket_attachment/{int(ticket_id)}/{int(article_id)}/{int(attachment_id)}"
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeout_secs,  # includes waiting for a free pooled connection
            sock_connect=self.timeout_secs,
            sock_read=self.timeout_secs,
        )
        started = time.monotonic()
        try:
            response = await _session().get(
                self.base_url + path,
                headers=self._headers(accept="*/*"),
                timeout=timeout,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            _fail_from_exception("GET", path, exc)
        finally:
            UPSTREAM_SECONDS.labels(SERVICE).observe(time.monotonic() - started)
        try:
            if response.status >= 300:
                text = self._redact(await _error_text(response))
                _fail_status("GET", path, response.status, text)
            yield AttachmentStream(response, path)
        finally:
            # Returns the connection to the pool, or closes it if the body was not read to the end.
            response.release()

    # -- plumbing -----------------------------------------------------------------------------

    # Admin resources (groups, object attributes, webhooks, triggers) for provisioning.

    async def list_resources(self, kind: str) -> list[dict[str, Any]]:
        items = await self._request_json("GET", f"/api/v1/{kind}")
        if not isinstance(items, list) or not all(_has_int_id(item) for item in items):
            _fail("bad_response", f"GET /api/v1/{kind}: not a list of objects with ids")
        return items

    async def create_resource(self, kind: str, attributes: dict[str, Any]) -> dict[str, Any]:
        path = f"/api/v1/{kind}"
        return _expect_object(await self._request_json("POST", path, attributes), "POST", path)

    async def update_resource(
        self, kind: str, resource_id: int, attributes: dict[str, Any]
    ) -> dict[str, Any]:
        path = f"/api/v1/{kind}/{resource_id}"
        return _expect_object(await self._request_json("PUT", path, attributes), "PUT", path)

    async def execute_attribute_migrations(self) -> None:
        await self._request_json("POST", "/api/v1/object_manager_attributes_execute_migrations", {})

    def _headers(self, *, accept: str = "application/json") -> dict[str, str]:
        return {
            "Authorization": f"Token token={self._token}",
            "Content-Type": "application/json",
            "Accept": accept,
        }

    def _redact(self, text: str) -> str:
        # Zammad does not echo tokens, but details end up in logs and the admin: be sure.
        return text.replace(self._token, "[token]") if self._token else text

    async def _request_json(self, method: str, path: str, body: Any = None) -> Any:
        """One call; returns the parsed JSON of a 2xx answer or raises a typed error."""
        data = None if body is None else json.dumps(body).encode()
        started = time.monotonic()
        try:
            async with _session().request(
                method,
                self.base_url + path,
                data=data,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.timeout_secs),
                allow_redirects=False,
            ) as response:
                if response.status >= 300:
                    text = self._redact(await _error_text(response))
                    _fail_status(method, path, response.status, text)
                raw = await response.read()
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            _fail_from_exception(method, path, exc)
        finally:
            UPSTREAM_SECONDS.labels(SERVICE).observe(time.monotonic() - started)
        try:
            return json.loads(raw)
        except ValueError:  # also UnicodeDecodeError
            _fail("bad_response", f"{method} {path}: the answer is not JSON")


# -- error helpers ------------------------------------------------------------------------------


def _fail(
    kind: str,
    detail: str,
    status: int | None = None,
    *,
    permanent: bool = False,
    exc: BaseException | None = None,
) -> NoReturn:
    UPSTREAM_ERRORS.labels(SERVICE, kind).inc()
    error_type = PermanentUpstreamError if permanent else TemporaryUpstreamError
    raise error_type(SERVICE, detail, status) from exc


def _fail_status(method: str, path: str, status: int, text: str) -> NoReturn:
    detail = f"{method} {path} answered {status}"
    if text:
        detail += f": {text}"
    if status >= 500:
        _fail("http_5xx", detail, status)
    if status >= 400:
        _fail("http_4xx", detail, status, permanent=status not in TEMPORARY_4XX)
    # Zammad never redirects API calls; a redirect means a wrong base URL (http vs https, a
    # login page in front of it). Following it would drop the token or turn POST into GET.
    _fail("redirect", detail, status, permanent=True)


def _fail_from_exception(method: str, path: str, exc: BaseException) -> NoReturn:
    # aiohttp's ServerTimeoutError is both a ClientError and a TimeoutError: check timeouts first.
    if isinstance(exc, TimeoutError):
        _fail("timeout", f"{method} {path}: no answer in time", exc=exc)
    _fail("connection", f"{method} {path}: connection failed ({type(exc).__name__})", exc=exc)


async def _error_text(response: aiohttp.ClientResponse) -> str:
    """Zammad's ``error_human``/``error`` text, or nothing for bodies that are not its JSON."""
    try:
        raw = await response.content.read(ERROR_BODY_LIMIT_BYTES)
        parsed = json.loads(raw)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return ""
    if not isinstance(parsed, dict):
        return ""
    text = parsed.get("error_human") or parsed.get("error")
    if not isinstance(text, str):
        return ""
    return " ".join(text.split())[:ERROR_TEXT_LIMIT_CHARS]


def _has_int_id(item: Any) -> bool:
    # bool is an int subclass; an "id": true is as wrong as a missing id.
    return (
        isinstance(item, dict)
        and isinstance(item.get("id"), int)
        and not isinstance(item.get("id"), bool)
    )


def _expect_object(parsed: Any, method: str, path: str) -> dict[str, Any]:
    if not _has_int_id(parsed):
        _fail("bad_response", f"{method} {path}: expected an object with an id")
    result: dict[str, Any] = parsed
    return result

"""The only module that talks HTTP to the integreat-chat bot (spec/chatbot.md, section A).

The bot is a Django service with two quirks every call has to respect:

- Its POST views compare the lower-cased ``Content-Type`` header with ``application/json``
  exactly, so ``application/json; charset=utf-8`` is refused. The JSON is therefore serialised here
  and sent as bytes with the bare header, whatever aiohttp's payload defaults are.
- Most of its errors are HTTP 200 with ``"status": "error"``, so ``status`` is checked on every
  answer.

Sessions: one ``aiohttp.ClientSession`` per event loop, created on first use, because daphne has no
ASGI lifespan events to create one at startup (pitfalls.md). Whoever owns a loop calls
``close_sessions()`` before it ends. Code that drives the client from sync code should keep one
long-lived loop rather than ``async_to_sync`` per call, which would open a session per call.

Metrics: ``chat_upstream_seconds{service="bot"}`` observes each public call from start to
result, retries included (that is what the chat waits for). ``chat_upstream_errors_total`` counts
every failed HTTP attempt by kind (``connection``, ``connect_timeout``, ``http_5xx``, ``refused``,
``bad_response``), also the ones a retry recovered from, so a flaky bot shows up even when users
do not notice; a passed deadline or timeout counts once as ``timeout``.

Message texts are never logged: they are what users wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings

from chatserver.errors import PermanentUpstreamError, TemporaryUpstreamError
from chatserver.metrics import UPSTREAM_ERRORS, UPSTREAM_SECONDS

logger = logging.getLogger(__name__)

SERVICE = "bot"
ANSWER_PATH = "/chatanswers/extract_answer/"
TRANSLATE_PATH = "/chatanswers/translate_message/"
HEALTH_PATH = "/health/"
JSON_CONTENT_TYPE = "application/json"

# A connection that cannot even be opened in this time is tried again (within the answer's
# deadline) rather than waited for: the bot answers nothing before it is done, so there is no
# useful read timeout shorter than the deadline, but connecting takes milliseconds when it is up.
CONNECT_TIMEOUT_SECS = 5.0
RETRY_BACKOFF_FIRST_SECS = 0.2
RETRY_BACKOFF_MAX_SECS = 2.0
# The real health view pings the language model with a 30 s timeout; a probe should not wait that
# long to learn that the bot is slow.
HEALTH_TIMEOUT_SECS = 10.0
# Error texts from the bot go into exceptions and logs; keep them short.
DETAIL_MAX_CHARS = 200


@dataclass(frozen=True)
class BotAnswer:
    answer: str  # HTML as the bot sent it (sanitising is done elsewhere)
    automatic_answers: bool  # false: the user asked for a human


class BotRefused(PermanentUpstreamError):
    """The bot gave its final word against this request: ``status: error`` in a 200, a 4xx, or a
    complete answer that is not what its API promises. Asking again would give the same."""


class _AttemptFailed(Exception):
    """One request failed in a way the next one may not (connection trouble, HTTP 5xx)."""

    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail if status is None else f"{detail} (HTTP {status})")
        self.kind = kind
        self.detail = detail
        self.status = status


_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        # Sessions of loops that ended without close_sessions() cannot be closed any more (closing
        # needs their loop); forget them so the table does not grow.
        for stale in [other for other in _sessions if other.is_closed()]:
            del _sessions[stale]
        session = aiohttp.ClientSession(
            # A fresh connection per call: the bot's calls take seconds, so reuse saves nothing,
            # while a kept-alive connection its server has already closed would fail a
            # translation (one attempt) for no reason.
            connector=aiohttp.TCPConnector(force_close=True),
            # No session-wide timeout: every call brings its own deadline.
            timeout=aiohttp.ClientTimeout(total=None),
            headers={"Accept": JSON_CONTENT_TYPE, "User-Agent": "integreat-chatserver"},
        )
        _sessions[loop] = session
    return session


async def close_sessions() -> None:
    """Close the bot sessions of this process: the running loop's at once, other loops' on them."""
    current = asyncio.get_running_loop()
    for loop, session in list(_sessions.items()):
        del _sessions[loop]
        if loop is current:
            await session.close()
        elif loop.is_running():
            # A session must be closed on its own loop; do not wait for another loop that may be
            # busy or about to stop.
            asyncio.run_coroutine_threadsafe(session.close(), loop)


def _count(kind: str) -> None:
    UPSTREAM_ERRORS.labels(SERVICE, kind).inc()


def _refused(kind: str, detail: str, status: int | None = None) -> BotRefused:
    _count(kind)
    return BotRefused(SERVICE, detail[:DETAIL_MAX_CHARS], status)


def _error_text(body: dict[str, Any]) -> str:
    # The answer view says "message", the translate view "reason".
    text = body.get("message") or body.get("reason") or "no reason given"
    return f"refused: {text}"


class ChatbotClient:
    """Calls of the bot's HTTP API; errors are ``TemporaryUpstreamError`` or ``BotRefused``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    async def answer(
        self,
        messages: Sequence[str],
        *,
        language: str,
        region: str,
        deadline_secs: float | None = None,
    ) -> BotAnswer:
        """Ask for an automatic answer to the chat's recent user messages (oldest first).

        Connection trouble and 5xx are retried until ``deadline_secs`` (default
        ``CHATBOT_ANSWER_TIMEOUT_SECS``) has passed; ``status: error`` is final at once.
        """
        if not messages:
            raise ValueError("the bot needs at least one message to answer")
        if deadline_secs is None:
            deadline_secs = settings.CHATBOT_ANSWER_TIMEOUT_SECS
        history = list(messages)[-settings.CHAT_BOT_HISTORY_MESSAGES :]
        payload = {
            "messages": [{"role": "user", "content": text} for text in history],
            "language": language,
            "region": region,
        }
        started = time.monotonic()
        try:
            body = await self._post_with_retries(ANSWER_PATH, payload, deadline_secs)
        finally:
            UPSTREAM_SECONDS.labels(SERVICE).observe(time.monotonic() - started)
        answer = body.get("answer")
        # An older bot without hand-over detection sends no "automatic_answers": it never hands
        # over, so a missing flag means true.
        automatic = body.get("automatic_answers", True)
        # A 200 with a malformed body is treated as final: the bot finished its (expensive)
        # pipeline and this is what it produced; asking again would burn another minute of model
        # time for, most likely, the same body.
        if not isinstance(answer, str) or not answer.strip():
            raise _refused("bad_response", "answer missing or not a string")
        if not isinstance(automatic, bool):
            raise _refused("bad_response", "automatic_answers is not a boolean")
        return BotAnswer(answer=answer, automatic_answers=automatic)

    async def translate(
        self,
        message: str,
        *,
        source_language: str,
        target_language: str,
        timeout_secs: float | None = None,
    ) -> str:
        """Translate one message; one attempt, retries are the caller's (durable work) business."""
        if timeout_secs is None:
            timeout_secs = settings.CHATBOT_TRANSLATE_TIMEOUT_SECS
        payload = {
            "message": message,
            "source_language": source_language,
            "target_language": target_language,
        }
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_secs):
                status, raw = await self._send("POST", TRANSLATE_PATH, payload, timeout_secs)
                body = _parse_call_answer(status, raw)
        except TimeoutError:
            _count("timeout")
            raise TemporaryUpstreamError(
                SERVICE, f"no translation within {timeout_secs:g} s"
            ) from None
        except _AttemptFailed as exc:
            raise TemporaryUpstreamError(SERVICE, exc.detail, exc.status) from exc
        finally:
            UPSTREAM_SECONDS.labels(SERVICE).observe(time.monotonic() - started)
        translation = body.get("translation")
        if not isinstance(translation, str):
            raise _refused("bad_response", "translation missing or not a string")
        return translation

    async def health(self, *, timeout_secs: float = HEALTH_TIMEOUT_SECS) -> dict[str, Any]:
        """The bot's own health report (``status`` is ``healthy`` or ``degraded``).

        A report is returned whatever the HTTP status, so a degraded bot is seen as such; no report
        at all is a ``TemporaryUpstreamError``.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_secs):
                status, raw = await self._send(
                    "GET", HEALTH_PATH, None, timeout_secs, accept_5xx=True
                )
        except TimeoutError:
            _count("timeout")
            raise TemporaryUpstreamError(
                SERVICE, f"no health report within {timeout_secs:g} s"
            ) from None
        except _AttemptFailed as exc:
            raise TemporaryUpstreamError(SERVICE, exc.detail, exc.status) from exc
        finally:
            UPSTREAM_SECONDS.labels(SERVICE).observe(time.monotonic() - started)
        report = _json_object(raw)
        if report is None or not isinstance(report.get("status"), str):
            _count("http_5xx" if status >= 500 else "bad_response")
            raise TemporaryUpstreamError(SERVICE, "health answer is not a report", status)
        return report

    async def _post_with_retries(
        self, path: str, payload: dict[str, Any], deadline_secs: float
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_secs
        backoff = RETRY_BACKOFF_FIRST_SECS
        attempt = 0
        try:
            # The deadline bounds everything, attempts and pauses alike; when it passes, the
            # request in flight is cancelled (which also closes its connection).
            async with asyncio.timeout_at(deadline):
                while True:
                    attempt += 1
                    try:
                        status, raw = await self._send(
                            "POST", path, payload, deadline - loop.time()
                        )
                        return _parse_call_answer(status, raw)
                    except _AttemptFailed as exc:
                        logger.warning(
                            "bot %s attempt %d failed (%s), retrying", path, attempt, exc
                        )
                    # Jitter keeps many chats that failed together from retrying in step.
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, RETRY_BACKOFF_MAX_SECS)
        except TimeoutError:
            _count("timeout")
            logger.warning(
                "bot %s: no answer within %g s (%d attempts)", path, deadline_secs, attempt
            )
            raise TemporaryUpstreamError(SERVICE, f"no answer within {deadline_secs:g} s") from None

    async def _send(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        time_left_secs: float,
        *,
        accept_5xx: bool = False,
    ) -> tuple[int, bytes]:
        """One HTTP request; connection trouble and (unless accepted) 5xx are ``_AttemptFailed``."""
        if not self.base_url:
            raise BotRefused(SERVICE, "no bot URL configured (CHATBOT_URL)")
        data: bytes | None = None
        headers: dict[str, str] = {}
        if payload is not None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            headers["Content-Type"] = JSON_CONTENT_TYPE  # bare: the bot refuses any parameter
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=max(0.001, min(CONNECT_TIMEOUT_SECS, time_left_secs))
        )
        try:
            async with _session().request(
                method, self.base_url + path, data=data, headers=headers, timeout=timeout
            ) as response:
                raw = await response.read()
                status = response.status
        # Only the connect timeout raises here: the caller's deadline cancels instead.
        except TimeoutError as exc:
            _count("connect_timeout")
            raise _AttemptFailed("connect_timeout", "connecting timed out") from exc
        except aiohttp.ClientError as exc:
            _count("connection")
            raise _AttemptFailed("connection", f"{type(exc).__name__}: {exc}") from exc
        if status >= 500 and not accept_5xx:
            _count("http_5xx")
            raise _AttemptFailed("http_5xx", "server error", status)
        return status, raw


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _parse_call_answer(status: int, raw: bytes) -> dict[str, Any]:
    """The JSON object of a (non-5xx) answer to a POST, or ``BotRefused``."""
    body = _json_object(raw)
    if status >= 400:
        detail = _error_text(body) if body is not None else f"HTTP {status}"
        raise _refused("refused", detail, status)
    if body is None:
        raise _refused("bad_response", "answer is not a JSON object")
    if body.get("status") == "error":
        raise _refused("refused", _error_text(body))
    if body.get("status") != "success":
        raise _refused("bad_response", f"unexpected status {body.get('status')!r}")
    return body

"""A fake integreat-chat bot: a real aiohttp application with the real API and its quirks.

What it copies from the real bot (research/clients-and-bot.md, B.2):

- POST views act only when the lower-cased ``Content-Type`` header is exactly
  ``application/json``; anything else, or another method, gets HTTP 200
  ``{"status": "error", "message": "unsupported method"}``.
- Missing fields are HTTP 200 with ``"status": "error"``, not 4xx.
- The answer view takes ``messages`` (or the older ``message``), keeps the last 10 user messages,
  and hands over to a human when asked (``automatic_answers: false``).

Its answers are deterministic so tests can recognise them: see ``automatic_answer_html``,
``HUMAN_HANDOVER_ANSWER`` and ``fake_translation``.

Controls, from Python on ``FakeChatbotServer`` or over HTTP under ``/__fake__/``: delays per call
type, failure modes for the next N calls or for all (``error``, ``http_500``, ``stall``,
``garbage``), the list of received requests, and ``reset``. ``stall`` holds a call until
``release()`` (then it is answered normally) or until the server stops (then its connection is
dropped), so a stalled call never keeps ``stop()`` from finishing.
"""

from __future__ import annotations

import asyncio
import enum
import html
import json
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, TypeVar, get_args

from aiohttp import web

from chatserver.fakes.base import ThreadedServer

FailMode = Literal["error", "http_500", "stall", "garbage"]
CallType = Literal["answer", "translate", "health"]

ANSWER_PATHS = ("/chatanswers/extract_answer/", "/chatanswers/chat/")
TRANSLATE_PATHS = ("/chatanswers/translate_message/", "/translate/message/")
HEALTH_PATH = "/health/"
CONTROL_PREFIX = "/__fake__/"

REQUEST_MAX_MESSAGES = 10  # the real bot's limit
HUMAN_REQUEST_MARKERS = ("human", "mensch", "talk to a person")
HUMAN_HANDOVER_ANSWER = (
    "<p>A counsellor will answer you as soon as possible. Automatic answers are switched off.</p>"
)
UNSUPPORTED = "unsupported method"
SIMULATED_FAILURE = "simulated failure"
DEFAULT_FAIL_ON: frozenset[CallType] = frozenset({"answer", "translate"})

T = TypeVar("T")


class ReceivedRequest(TypedDict):
    path: str
    method: str
    content_type: str  # the raw header, "" when absent
    json: Any  # the parsed body; None when there is none or it is not JSON


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET


def automatic_answer_html(last_message: str, *, language: str, region: str) -> str:
    """The fake's automatic answer: recognisable, with the citation list the real one ends with."""
    link = f"https://integreat.app/{region}/{language}/"
    return (
        f"<p>Automatic answer ({html.escape(language)}): {html.escape(last_message)}</p>"
        f'<ul><li><a href="{html.escape(link)}">Integreat</a></li></ul>'
    )


def fake_translation(message: str, *, source_language: str, target_language: str) -> str:
    if source_language == target_language:
        return message
    return f"[{target_language}] {message}"


def asks_for_human(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in HUMAN_REQUEST_MARKERS)


def _bot_error(message: str, key: str = "message") -> web.Response:
    # The real bot reports its errors in an HTTP 200.
    return web.json_response({"status": "error", key: message})


class FakeChatbot:
    """State and views of the fake; used on the event loop that serves it."""

    def __init__(self) -> None:
        self.answer_delay_secs = 0.0
        self.translate_delay_secs = 0.0
        self.fail: FailMode | None = None
        self.fail_count: int | None = None  # None: every call fails while ``fail`` is set
        self.fail_on: frozenset[CallType] = DEFAULT_FAIL_ON
        self._received: list[ReceivedRequest] = []
        self._received_changed = asyncio.Condition()
        # Stalled calls wait on the current event; release() sets it and starts a new one, so
        # calls arriving later stall again while the fail mode is still "stall".
        self._release = asyncio.Event()
        self._stopping = asyncio.Event()

    @classmethod
    def start_threaded(cls, host: str = "127.0.0.1", port: int = 0) -> FakeChatbotServer:
        server = FakeChatbotServer(cls(), host, port)
        server.start()
        return server

    def make_app(self) -> web.Application:
        app = web.Application()
        for path in ANSWER_PATHS:
            app.router.add_route("*", path, self._answer_view)
        for path in TRANSLATE_PATHS:
            app.router.add_route("*", path, self._translate_view)
        app.router.add_get(HEALTH_PATH, self._health_view)
        app.router.add_post(CONTROL_PREFIX + "configure", self._configure_view)
        app.router.add_get(CONTROL_PREFIX + "received", self._received_view)
        app.router.add_post(CONTROL_PREFIX + "reset", self._reset_view)
        app.router.add_post(CONTROL_PREFIX + "release", self._release_view)
        app.on_shutdown.append(self._on_shutdown)
        return app

    # --- controls -----------------------------------------------------------------------------

    def configure(
        self,
        *,
        answer_delay_secs: float | _Unset = _UNSET,
        translate_delay_secs: float | _Unset = _UNSET,
        fail: FailMode | _Unset | None = _UNSET,
        fail_count: int | _Unset | None = _UNSET,
        fail_on: Iterable[CallType] | _Unset = _UNSET,
    ) -> None:
        """Change what is passed, keep the rest. Setting ``fail`` without ``fail_count`` means
        every call fails until it is set to None; with it, the next ``fail_count`` calls of the
        ``fail_on`` types (default answer and translate) fail."""
        if not isinstance(answer_delay_secs, _Unset):
            self.answer_delay_secs = _non_negative(answer_delay_secs, "answer_delay_secs")
        if not isinstance(translate_delay_secs, _Unset):
            self.translate_delay_secs = _non_negative(translate_delay_secs, "translate_delay_secs")
        if not isinstance(fail, _Unset):
            if fail is not None and fail not in get_args(FailMode):
                raise ValueError(f"unknown fail mode {fail!r}")
            self.fail = fail
            self.fail_count = None
        if not isinstance(fail_count, _Unset):
            if fail_count is not None and (isinstance(fail_count, bool) or fail_count < 0):
                raise ValueError("fail_count must be a non-negative integer or None")
            self.fail_count = fail_count
        if not isinstance(fail_on, _Unset):
            calls = frozenset(fail_on)
            if not calls <= set(get_args(CallType)):
                raise ValueError(f"fail_on must be among {get_args(CallType)}")
            self.fail_on = calls

    def received(self) -> list[ReceivedRequest]:
        return list(self._received)

    def reset(self) -> None:
        """Back to a fresh fake: no delays, no failures, nothing received, no call stalled."""
        self.answer_delay_secs = 0.0
        self.translate_delay_secs = 0.0
        self.fail = None
        self.fail_count = None
        self.fail_on = DEFAULT_FAIL_ON
        self._received.clear()
        self.release()

    def release(self) -> None:
        """Let the calls stalled so far go on and be answered normally."""
        self._release.set()
        self._release = asyncio.Event()

    async def wait_received(self, count: int, timeout_secs: float) -> list[ReceivedRequest]:
        """Wait until at least ``count`` bot calls arrived (control calls do not count)."""
        try:
            async with asyncio.timeout(timeout_secs), self._received_changed:
                await self._received_changed.wait_for(lambda: len(self._received) >= count)
        except TimeoutError:
            raise TimeoutError(
                f"{len(self._received)} of {count} requests arrived within {timeout_secs:g} s"
            ) from None
        return self.received()

    # --- the bot's API ------------------------------------------------------------------------

    async def _answer_view(self, request: web.Request) -> web.StreamResponse:
        return await self._bot_call(request, "answer", self._answer)

    async def _translate_view(self, request: web.Request) -> web.StreamResponse:
        return await self._bot_call(request, "translate", self._translate)

    async def _health_view(self, request: web.Request) -> web.StreamResponse:
        return await self._bot_call(request, "health", self._health)

    async def _bot_call(
        self,
        request: web.Request,
        call: CallType,
        produce: Callable[[dict[str, Any]], web.Response],
    ) -> web.StreamResponse:
        raw = await request.read()
        await self._record(request, raw)
        failure = self._take_failure(call)
        delay = {"answer": self.answer_delay_secs, "translate": self.translate_delay_secs}
        await self._pause(delay.get(call, 0.0))
        if failure is not None:
            response = await self._fail(request, call, failure)
            if response is not None:
                return response
        if call == "health":
            return produce({})
        # The real views: `request.method == "POST" and request.META["CONTENT_TYPE"].lower() ==
        # "application/json"`, so a charset parameter is refused.
        content_type = request.headers.get("Content-Type", "")
        if request.method != "POST" or content_type.lower() != "application/json":
            return _bot_error(UNSUPPORTED)
        try:
            body = json.loads(raw)
        except ValueError:
            return _bot_error("request body is not JSON")
        if not isinstance(body, dict):
            return _bot_error("request body is not a JSON object")
        return produce(body)

    def _answer(self, body: dict[str, Any]) -> web.Response:
        region, language = body.get("region"), body.get("language")
        if not isinstance(region, str) or not region:
            return _bot_error("missing region")
        if not isinstance(language, str) or not language:
            return _bot_error("missing language")
        if "messages" in body:
            items = body["messages"]
            if not isinstance(items, list):
                return _bot_error("messages must be a list")
            texts = [
                item["content"]
                for item in items[-REQUEST_MAX_MESSAGES:]
                if isinstance(item, dict)
                and item.get("role") == "user"
                and isinstance(item.get("content"), str)
            ]
        elif isinstance(body.get("message"), str):
            texts = [body["message"]]
        else:
            return _bot_error("missing messages")
        if not texts:
            return _bot_error("no user messages")
        last = texts[-1]
        if asks_for_human(last):
            answer, automatic = HUMAN_HANDOVER_ANSWER, False
        else:
            answer, automatic = automatic_answer_html(last, language=language, region=region), True
        return web.json_response(
            {
                "status": "success",
                "answer": answer,
                "original_answer": answer,
                "automatic_answers": automatic,
                "rag_message": last,
                "rag_language": language,
                "details": [],
                "messages": [{"content": text, "role": "user"} for text in texts],
                "length_generated_answer": len(answer),
                "length_final_message": len(answer),
            }
        )

    def _translate(self, body: dict[str, Any]) -> web.Response:
        fields = {key: body.get(key) for key in ("message", "source_language", "target_language")}
        for key, value in fields.items():
            if not isinstance(value, str):
                return _bot_error(f"missing {key}", key="reason")
        message, source, target = (str(value) for value in fields.values())
        return web.json_response(
            {
                "translation": fake_translation(
                    message, source_language=source, target_language=target
                ),
                "target_language": target,
                "status": "success",
            }
        )

    def _health(self, _body: dict[str, Any]) -> web.Response:
        return web.json_response(_health_report("healthy"))

    # --- failures, delays, records ------------------------------------------------------------

    def _take_failure(self, call: CallType) -> FailMode | None:
        # Decided when the call arrives, so concurrent calls take the next N in arrival order.
        if self.fail is None or call not in self.fail_on:
            return None
        failure = self.fail
        if self.fail_count is not None:
            if self.fail_count <= 0:  # "fail the next 0 calls"
                self.fail, self.fail_count = None, None
                return None
            self.fail_count -= 1
            if self.fail_count == 0:
                self.fail, self.fail_count = None, None
        return failure

    async def _fail(
        self, request: web.Request, call: CallType, failure: FailMode
    ) -> web.StreamResponse | None:
        """The failure's response, or None when a stalled call was released."""
        if failure == "error":
            if call == "health":
                return web.json_response(_health_report("degraded"))
            return _bot_error(SIMULATED_FAILURE, key="reason" if call == "translate" else "message")
        if failure == "http_500":
            # What Django answers when a view raises.
            return web.Response(
                status=500, text="<h1>Server Error (500)</h1>", content_type="text/html"
            )
        if failure == "garbage":
            return web.Response(
                text="<html><body>502 Bad Gateway</body></html>", content_type="text/html"
            )
        released = self._release
        await _first_of(released.wait(), self._stopping.wait())
        if released.is_set():
            return None
        # Stopping: drop the connection without an answer, as a dying server would.
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=503)

    async def _pause(self, delay_secs: float) -> None:
        if delay_secs > 0:
            # Sleeps end early when the server stops, so stop() is never held up by a delay.
            await _first_of(asyncio.sleep(delay_secs), self._stopping.wait())

    async def _record(self, request: web.Request, raw: bytes) -> None:
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        self._received.append(
            {
                "path": request.path,
                "method": request.method,
                "content_type": request.headers.get("Content-Type", ""),
                "json": parsed,
            }
        )
        async with self._received_changed:
            self._received_changed.notify_all()

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._stopping.set()

    # --- controls over HTTP -------------------------------------------------------------------

    async def _configure_view(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            unknown = set(body) - {
                "answer_delay_secs",
                "translate_delay_secs",
                "fail",
                "fail_count",
                "fail_on",
            }
            if unknown:
                raise ValueError(f"unknown settings {sorted(unknown)}")
            self.configure(**body)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self._settings())

    async def _received_view(self, _request: web.Request) -> web.Response:
        return web.json_response(self.received())

    async def _reset_view(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self._settings())

    async def _release_view(self, _request: web.Request) -> web.Response:
        self.release()
        return web.json_response({"released": True})

    def _settings(self) -> dict[str, Any]:
        return {
            "answer_delay_secs": self.answer_delay_secs,
            "translate_delay_secs": self.translate_delay_secs,
            "fail": self.fail,
            "fail_count": self.fail_count,
            "fail_on": sorted(self.fail_on),
        }


class FakeChatbotServer(ThreadedServer):
    """The fake served from a background thread, with sync controls for tests."""

    def __init__(self, fake: FakeChatbot, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(fake.make_app, host, port)
        self.fake = fake

    def configure(
        self,
        *,
        answer_delay_secs: float | _Unset = _UNSET,
        translate_delay_secs: float | _Unset = _UNSET,
        fail: FailMode | _Unset | None = _UNSET,
        fail_count: int | _Unset | None = _UNSET,
        fail_on: Iterable[CallType] | _Unset = _UNSET,
    ) -> None:
        """See ``FakeChatbot.configure``."""
        self._on_loop(
            lambda: self.fake.configure(
                answer_delay_secs=answer_delay_secs,
                translate_delay_secs=translate_delay_secs,
                fail=fail,
                fail_count=fail_count,
                fail_on=fail_on,
            )
        )

    def received(self) -> list[ReceivedRequest]:
        return self._on_loop(self.fake.received)

    def reset(self) -> None:
        self._on_loop(self.fake.reset)

    def release(self) -> None:
        self._on_loop(self.fake.release)

    def wait_received(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """Block until ``count`` bot calls arrived. From async code use ``wait_received_async``:
        blocking the loop that sends the requests would wait for nothing."""
        return self.call(self.fake.wait_received(count, timeout), timeout=timeout + 5)

    async def wait_received_async(
        self, count: int, timeout_secs: float = 5.0
    ) -> list[ReceivedRequest]:
        future = asyncio.run_coroutine_threadsafe(
            self.fake.wait_received(count, timeout_secs), self.loop
        )
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        if not self.loop.is_closed():
            super().stop()

    def _on_loop(self, function: Callable[[], T]) -> T:
        # The fake's state belongs to the server's loop; touch it only there.
        async def run() -> T:
            return function()

        return self.call(run())


async def _first_of(*awaitables: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _health_report(status: str) -> dict[str, Any]:
    state = "healthy" if status == "healthy" else "unhealthy"
    return {
        "status": status,
        "timestamp": datetime.now(UTC).isoformat(),
        "total_indexes": 1,
        "total_documents": 1,
        "llm": {"status": state, "server": "fake"},
        "opensearch": {"status": "healthy", "total_indexes": 1, "total_documents": 1},
    }


def _non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds")
    return float(value)

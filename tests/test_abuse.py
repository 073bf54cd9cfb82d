"""Fault and abuse suite: what hostile, broken or unlucky peers do to the server.

Malformed and oversized socket frames, REST bodies and webhook bodies; unicode edge cases on every
route; a device hammering one socket; a slowloris client; a webhook flood with duplicates; Zammad
answering garbage, error pages or nothing; Redis and PostgreSQL restarting under traffic; daphne's
memory across a storm of connections and posts.

Every test records what it tried and what came out in ``tests.abuse_report.FIGURES``, which is
printed at the end of the run ("fault and abuse suite"), and asserts that nothing was lost, nothing
doubled and no request answered 500. Outages use private Redis and PostgreSQL servers; the
machine's shared ones are never stopped. No test sleeps to wait for an event: waits are on
conditions with timeouts (the only sleeps are the slowloris client's pace, which is the attack,
and a client's retry pace while a server is impaired).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import random
import subprocess
import sys
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import psycopg
import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient
from django.utils import timezone
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatserver.asgi import application
from chatserver.errors import Unavailable
from chatserver.fakes.base import free_port
from chatserver.fakes.zammad import FakeZammadServer
from chatserver.models import Message, Region, WebhookDelivery, Work

from .abuse_report import FIGURES, Memory
from .conftest import (
    ROOT,
    SIGNATURE_SECRET,
    WEBHOOK_TOKEN,
    ZAMMAD_TOKEN,
    Daphne,
    PrivateRedis,
    drain,
    server_env,
    skip_without_shared_services,
)
from .helpers import Capture, check_frame, wait_for, wait_for_sync
from .private_postgres import PG_BIN, PrivatePostgres

pytestmark = pytest.mark.django_db(transaction=True)

REGION = "augsburg"
HOOK = f"/api/v3/webhook/zammad/?token={WEBHOOK_TOKEN}"
MAX_CHARS = 10_000
FRAME_LIMIT_BYTES = 64 * 1024
TIMEOUT_SECS = 15


@pytest.fixture(autouse=True)
def _counted() -> None:
    FIGURES.tests += 1


def new_device(prefix: str) -> str:
    """Unique across runs: the database is reused and Redis keeps rate-limit windows."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def chat_path(device: str) -> str:
    return f"/api/v3/{REGION}/de/chat/{device}/"


def socket_path(device: str, after: int | None = None) -> str:
    query = f"?after={after}" if after is not None else ""
    return f"/ws/v3/{REGION}/de/chat/{device}/{query}"


def sign(raw: bytes) -> str:
    return "sha1=" + hmac.new(SIGNATURE_SECRET.encode(), raw, hashlib.sha1).hexdigest()


def as_html(text: str) -> str:
    """Device text as the server stores and forwards it (wire contract: escaped, ``<br>``)."""
    return html.escape(text, quote=False).replace("\n", "<br>")


def tally(expected: Iterable[Any], seen: Iterable[Any]) -> tuple[int, int]:
    """(lost, doubled): expected items never seen, and extra copies of seen ones."""
    counts = Counter(seen)
    lost = sum(1 for item in set(expected) if counts[item] == 0)
    doubled = sum(count - 1 for count in counts.values() if count > 1)
    return lost, doubled


def assert_delivered(what: str, expected: Iterable[Any], seen: Iterable[Any]) -> None:
    expected, seen = list(expected), list(seen)
    lost, doubled = tally(expected, seen)
    FIGURES.outcome(lost=lost, doubled=doubled)
    assert (lost, doubled) == (0, 0), f"{what}: {lost} lost, {doubled} doubled"
    assert set(seen) <= set(expected), f"{what}: unexpected {set(seen) - set(expected)}"


# --- in-process clients ------------------------------------------------------------------------


async def rest(
    client: AsyncClient,
    method: str,
    path: str,
    body: bytes | str = b"",
    content_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> Any:
    response = await client.generic(
        method, path, body, content_type=content_type, headers=headers or {}
    )
    FIGURES.http(response.status_code)
    assert response.status_code != 500, response.content[:500]
    return response


async def post_form(client: AsyncClient, device: str, fields: dict[str, str]) -> Any:
    return await rest(
        client,
        "POST",
        chat_path(device),
        urlencode(fields),
        "application/x-www-form-urlencoded",
    )


async def post_json(client: AsyncClient, device: str, payload: Any) -> Any:
    # ensure_ascii: lone surrogates travel as JSON escapes ("\ud800"), as a buggy client sends.
    return await rest(client, "POST", chat_path(device), json.dumps(payload), "application/json")


def error_body(response: Any) -> str:
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"], body
    return body["error"]


class InProcessSocket:
    """A socket through Channels' communicator: the consumer runs on the test's loop, so an
    exception in it fails the test instead of hiding in a log."""

    def __init__(self, device: str, after: int | None = None) -> None:
        self.communicator = WebsocketCommunicator(application, socket_path(device, after))

    async def open(self) -> dict[str, Any]:
        connected, _ = await self.communicator.connect(timeout=TIMEOUT_SECS)
        assert connected
        history = await self.frame()
        assert history["type"] == "chat.history", history
        return history

    async def frame(self, timeout: float = TIMEOUT_SECS) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.communicator.receive_from(timeout))
        check_frame(frame)
        return frame

    async def next_of(self, kind: str, timeout: float = TIMEOUT_SECS) -> dict[str, Any]:
        while True:
            frame = await self.frame(timeout)
            if frame["type"] == kind:
                return frame

    async def send_text(self, text: str) -> None:
        # Straight to the application: send_to() refuses an empty text frame.
        await self.communicator.send_input({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.communicator.send_input({"type": "websocket.receive", "bytes": data})

    async def send(self, frame: Any) -> None:
        await self.send_text(json.dumps(frame))

    async def still_open(self) -> None:
        await self.send({"type": "ping"})
        assert (await self.next_of("pong"))["type"] == "pong"

    async def close(self) -> None:
        await self.communicator.disconnect()


@asynccontextmanager
async def in_process_socket(device: str, after: int | None = None) -> AsyncIterator[Any]:
    socket = InProcessSocket(device, after)
    await socket.open()
    try:
        yield socket
    finally:
        await socket.close()


async def stored_texts(device: str) -> list[str]:
    return [m.content async for m in Message.objects.filter(chat__device_id=device).order_by("id")]


async def zammad_bodies(zammad: FakeZammadServer) -> dict[int, list[str]]:
    """Article bodies the fake Zammad received, by the server's message id (its own mark)."""
    bodies: dict[int, list[str]] = {}
    for entry in await asyncio.to_thread(zammad.received, "/api/v1/ticket_articles"):
        payload = entry["json"]
        if entry["method"] != "POST" or not isinstance(payload, dict):
            continue
        mark = (payload.get("preferences") or {}).get("integreat_chat") or {}
        if "message_id" in mark:
            bodies.setdefault(mark["message_id"], []).append(payload["body"])
    return bodies


async def zammad_articles_by_message(zammad: FakeZammadServer) -> Counter[int]:
    """How many articles Zammad holds for each server message id (what agents see)."""
    counts: Counter[int] = Counter()
    for ticket in await asyncio.to_thread(zammad.tickets):
        for article in await asyncio.to_thread(zammad.articles, ticket["id"]):
            mark = (article.get("preferences") or {}).get("integreat_chat") or {}
            if "message_id" in mark:
                counts[mark["message_id"]] += 1
    return counts


async def make_due() -> None:
    """Retries are due now: the tests force them instead of waiting out the backoff."""
    await Work.objects.filter(state=Work.State.QUEUED).aupdate(run_after=timezone.now())


# --- real daphne processes -----------------------------------------------------------------------


class LoggedDaphne(Daphne):
    """A daphne whose log goes to a file: outages make it talk, and crashes are looked for."""

    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        super().__init__(port, env)
        self.log = log

    def start(self) -> LoggedDaphne:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for_sync(self._ready, timeout=30, what=f"daphne on port {self.port}")
        return self

    def crashes(self) -> list[str]:
        """Log lines of unexpected exceptions: a view's 500 or a consumer that died."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        markers = ("unexpected error", "Exception inside application", "Internal Server Error")
        return [line for line in text.splitlines() if any(m in line for m in markers)]

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def abuse_daphne(
    django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedDaphne]:
    """One daphne on the test database and the shared Redis, for the tests that need one."""
    skip_without_shared_services()
    log = tmp_path_factory.mktemp("abuse-daphne") / "daphne.log"
    server = LoggedDaphne(free_port(), server_env(CHATBOT_URL=""), log).start()
    yield server
    server.stop()


def assert_no_crashes(server: LoggedDaphne, known: str | None = None) -> int:
    """No unexpected exception in the log; returns how many lines matched the ``known`` one."""
    crashes = server.crashes()
    unknown = [line for line in crashes if known is None or known not in line]
    assert not unknown, "\n".join(unknown[:20])
    return len(crashes) - len(unknown)


class LiveSocket:
    """A socket to a real daphne with a reader task: frames are recorded as they come."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.history: dict[str, Any] | None = None
        self.pushed: Counter[int] = Counter()  # message id -> chat.message frames
        self.contents: dict[int, str] = {}
        self.answers: dict[str, dict[str, Any]] = {}  # client_id -> its ack or error
        self.errors: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.last_id = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                frame = json.loads(raw)
                check_frame(frame)
                kind = frame["type"]
                if kind == "chat.history":
                    self.history = frame
                    for message in frame["messages"]:
                        self.contents[message["id"]] = message["content"]
                    self.last_id = max([self.last_id, *(m["id"] for m in frame["messages"])])
                elif kind == "chat.message":
                    message = frame["message"]
                    self.pushed[message["id"]] += 1
                    self.contents[message["id"]] = message["content"]
                    self.last_id = max(self.last_id, message["id"])
                    FIGURES.received_messages("socket pushes")
                elif kind == "chat.ack":
                    self.answers[frame["client_id"]] = frame
                elif kind == "error":
                    self.errors.append(frame)
                    if "client_id" in frame:
                        self.answers[frame["client_id"]] = frame
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.connection.close_code
            if self.close_code is not None:
                FIGURES.closed(self.close_code)

    def has_pushed_all(self, message_ids: Iterable[int]) -> bool:
        return all(self.pushed[message_id] for message_id in message_ids)

    def has_pushed_at_least(self, count: int) -> bool:
        return sum(self.pushed.values()) >= count

    async def send(self, client_id: str, text: str) -> dict[str, Any]:
        """One chat.send, answered by its ack or an error frame."""
        self.answers.pop(client_id, None)
        await self.connection.send(
            json.dumps({"type": "chat.send", "client_id": client_id, "message": text})
        )
        FIGURES.sent_messages("socket")
        answer: dict[str, Any] = await wait_for(
            lambda: self.answers.get(client_id), timeout=TIMEOUT_SECS, what=f"answer {client_id}"
        )
        return answer

    async def close(self) -> None:
        await self.connection.close()
        with suppress(asyncio.CancelledError):
            await self.reader


@asynccontextmanager
async def live_socket(
    server: Daphne, device: str, after: int | None = None
) -> AsyncIterator[LiveSocket]:
    connection = await connect(server.ws_url + socket_path(device, after), open_timeout=10)
    socket = LiveSocket(connection)
    try:
        await wait_for(lambda: socket.history is not None, timeout=TIMEOUT_SECS, what="history")
        yield socket
    finally:
        await socket.close()


async def http_post(
    http: aiohttp.ClientSession,
    url: str,
    *,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.post(url, data=data, headers=headers or {}) as answer:
        FIGURES.http(answer.status)
        body = await answer.read()
        assert answer.status < 500 or answer.status == 503, (answer.status, body[:500])
        try:
            return answer.status, json.loads(body)
        except ValueError:
            return answer.status, body


# === 1. malformed and oversized socket frames =====================================================

DEEP = 50_000  # nesting levels: past Python's recursion limit, inside the 64 KiB frame limit
JUNK_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("not JSON", "hello", "invalid_frame"),
    ("truncated JSON", '{"type": "chat.send", "client_id": "a"', "invalid_frame"),
    ("empty text", "", "invalid_frame"),
    ("whitespace", " \n\t ", "invalid_frame"),
    ("binary frame", b"\x00\x01\x02binary", "invalid_frame"),
    ("binary JSON", b'{"type": "ping"}', "invalid_frame"),
    ("array", "[]", "invalid_frame"),
    ("array of frames", '[{"type": "ping"}]', "invalid_frame"),
    ("number", "42", "invalid_frame"),
    ("string", '"chat.send"', "invalid_frame"),
    ("null", "null", "invalid_frame"),
    ("boolean", "true", "invalid_frame"),
    ("no type", "{}", "invalid_frame"),
    ("unknown type", '{"type": "chat.delete", "id": 1}', "invalid_frame"),
    ("type as number", '{"type": 5}', "invalid_frame"),
    ("type as list", '{"type": ["ping"]}', "invalid_frame"),
    ("type as object", '{"type": {"chat.send": true}}', "invalid_frame"),
    ("type with NUL", '{"type": "ping\\u0000"}', "invalid_frame"),
    ("type lone surrogate", '{"type": "\\ud800"}', "invalid_frame"),
    ("duplicate keys", '{"type": "ping", "type": "chat.send"}', "invalid_frame"),
    ("no client_id", '{"type": "chat.send", "message": "x"}', "invalid_frame"),
    ("client_id number", '{"type": "chat.send", "client_id": 7, "message": "x"}', "invalid_frame"),
    ("client_id empty", '{"type": "chat.send", "client_id": "", "message": "x"}', "invalid_frame"),
    (
        "client_id list",
        '{"type": "chat.send", "client_id": ["a"], "message": "x"}',
        "invalid_frame",
    ),
    ("client_id null", '{"type": "chat.send", "client_id": null, "message": "x"}', "invalid_frame"),
    (
        "client_id 65 chars",
        json.dumps({"type": "chat.send", "client_id": "c" * 65, "message": "x"}),
        "invalid_frame",
    ),
    (
        "client_id 60,000 chars",
        json.dumps({"type": "chat.send", "client_id": "c" * 60_000, "message": "x"}),
        "invalid_frame",
    ),
    (
        "client_id control chars",
        json.dumps({"type": "chat.send", "client_id": "a\nb\x00", "message": "x"}),
        "invalid_message",
    ),
    ("message number", '{"type": "chat.send", "client_id": "m", "message": 1}', "invalid_message"),
    (
        "message list",
        '{"type": "chat.send", "client_id": "m", "message": ["x"]}',
        "invalid_message",
    ),
    (
        "message object",
        '{"type": "chat.send", "client_id": "m", "message": {"text": "x"}}',
        "invalid_message",
    ),
    ("message bool", '{"type": "chat.send", "client_id": "m", "message": true}', "invalid_message"),
    ("message NaN", '{"type": "chat.send", "client_id": "m", "message": NaN}', "invalid_message"),
    (
        "message huge number",
        '{"type": "chat.send", "client_id": "m", "message": 1e999999}',
        "invalid_message",
    ),
    (
        "message 5,000-digit integer",
        '{"type": "chat.send", "client_id": "m", "message": ' + "9" * 5000 + "}",
        "invalid_frame",  # Python refuses to parse integers this long: not valid JSON to us
    ),
    ("message null", '{"type": "chat.send", "client_id": "m", "message": null}', "invalid_message"),
    ("message missing", '{"type": "chat.send", "client_id": "m"}', "invalid_message"),
    ("message empty", '{"type": "chat.send", "client_id": "m", "message": ""}', "invalid_message"),
    (
        "message blank",
        '{"type": "chat.send", "client_id": "m", "message": " \\n\\t "}',
        "invalid_message",
    ),
    (
        "message only control chars",
        '{"type": "chat.send", "client_id": "m", "message": "\\u0000\\u0001\\u001b\\ud800"}',
        "invalid_message",
    ),
    (
        "message 10,001 chars",
        json.dumps({"type": "chat.send", "client_id": "m", "message": "x" * (MAX_CHARS + 1)}),
        "invalid_message",
    ),
    (
        "consent junk",
        '{"type": "chat.send", "client_id": "m", "message": "x", "evaluation_consent": "maybe"}',
        "invalid_message",
    ),
    (
        "consent number",
        '{"type": "chat.send", "client_id": "m", "message": "x", "evaluation_consent": 2}',
        "invalid_message",
    ),
    ("nested arrays", "[" * DEEP + "]" * DEEP, "invalid_frame"),
    ("nested objects", '{"a":' * 10_000 + "1" + "}" * 10_000, "invalid_frame"),
    (
        "nested junk in a field",
        '{"type": "chat.send", "client_id": "m", "message": "x", "extra": '
        + "[" * DEEP
        + "]" * DEEP
        + "}",
        "invalid_frame",
    ),
    (
        "nested message",
        '{"type": "chat.send", "client_id": "m", "message": ' + "[" * 20_000 + "]" * 20_000 + "}",
        "invalid_frame",
    ),
]


async def test_malformed_frames_get_error_frames_and_the_socket_stays_open(
    live_region: Region,
) -> None:
    device = new_device("junk-frames")
    async with in_process_socket(device) as socket:
        for name, raw, code in JUNK_FRAMES:
            if isinstance(raw, bytes):
                await socket.send_bytes(raw)
            else:
                await socket.send_text(raw)
            FIGURES.tried("socket frames")
            frame = await socket.next_of("error")
            assert frame["code"] == code, (name, frame)
            assert isinstance(frame["detail"], str) and frame["detail"], (name, frame)
            await socket.still_open()
        # Still a working socket: a good frame after all that junk is stored and acked.
        await socket.send({"type": "chat.send", "client_id": "good", "message": "still here"})
        ack = await socket.next_of("chat.ack")
        FIGURES.sent_messages("socket")
    assert ack["client_id"] == "good"
    assert await stored_texts(device) == ["still here"]


def padded_send(client_id: str, text: str, size: int) -> str:
    """A valid chat.send of exactly ``size`` bytes (an unknown field pads it; those are ignored)."""
    frame = {"type": "chat.send", "client_id": client_id, "message": text, "padding": ""}
    base = len(json.dumps(frame).encode())
    frame["padding"] = "p" * (size - base)
    raw = json.dumps(frame)
    assert len(raw.encode()) == size
    return raw


@pytest.mark.e2e
async def test_frame_size_limit_on_real_daphne(
    abuse_daphne: LoggedDaphne, live_region: Region
) -> None:
    device = new_device("frame-size")
    long_text = "\u3042" * MAX_CHARS  # 10,000 characters, 60,000 bytes as JSON escapes
    async with live_socket(abuse_daphne, device) as socket:
        for client_id, size in (("63k", 63 * 1024), ("64k", FRAME_LIMIT_BYTES)):
            await socket.connection.send(padded_send(client_id, long_text, size))
            FIGURES.tried("socket frames")
            FIGURES.sent_messages("socket")
            ack = await wait_for(partial(socket.answers.get, client_id), what=client_id)
            assert ack["type"] == "chat.ack", ack
            await wait_for(partial(socket.has_pushed_all, [ack["id"]]), what="the echo")
            assert socket.contents[ack["id"]] == long_text

    oversized: list[tuple[str, str | list[str]]] = [
        ("one byte over", padded_send("over", "x", FRAME_LIMIT_BYTES + 1)),
        ("1 MiB", padded_send("mib", "x", 1024 * 1024)),
        ("not JSON, 100 KiB", "x" * 100 * 1024),
        ("five 16 KiB fragments", ["y" * 16 * 1024] * 5),
    ]
    for name, raw in oversized:
        async with live_socket(abuse_daphne, device) as socket:
            with suppress(ConnectionClosed):
                await socket.connection.send(raw)
            FIGURES.tried("socket frames")
            await wait_for(socket.reader.done, what=f"close after {name}")
            assert socket.close_code == 1009, (name, socket.close_code)
    assert await stored_texts(device) == [long_text, long_text]
    assert_no_crashes(abuse_daphne)


# === 2. malformed REST and webhook bodies ========================================================


@dataclass(frozen=True)
class Body:
    name: str
    body: bytes | str
    content_type: str
    statuses: frozenset[int]
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    query: str = ""


def junk(
    name: str,
    body: bytes | str,
    content_type: str = "application/json",
    statuses: Iterable[int] = (400,),
    **extra: Any,
) -> Body:
    return Body(name, body, content_type, frozenset(statuses), **extra)


MULTIPART = "multipart/form-data; boundary=XyZ"
REST_JUNK = [
    junk("bad JSON", '{"message": '),
    junk("JSON array", '["message", "hi"]'),
    junk("JSON string", '"hi"'),
    junk("JSON null", "null"),
    junk("JSON number", "3"),
    junk("empty JSON object", "{}"),
    junk("empty JSON body", ""),
    junk("message as number", '{"message": 5}'),
    junk("message as list", '{"message": ["hi"]}'),
    junk("message as object", '{"message": {"text": "hi"}}'),
    junk("message NaN", '{"message": NaN}'),
    junk("message null", '{"message": null}'),
    junk("message blank", '{"message": "  \\n "}'),
    junk("message only NUL and controls", '{"message": "\\u0000\\u0007\\udfff"}'),
    junk("message 10,001 chars", json.dumps({"message": "x" * (MAX_CHARS + 1)})),
    junk("10,001 emoji", json.dumps({"message": "\U0001f600" * (MAX_CHARS + 1)})),
    junk("consent junk", '{"message": "hi", "evaluation_consent": "perhaps"}'),
    junk("consent as list", '{"message": "hi", "evaluation_consent": [true]}'),
    junk("client_id too long", json.dumps({"message": "hi", "client_id": "k" * 65})),
    junk("client_id as number", '{"message": "hi", "client_id": 12}'),
    junk("client_id control chars", json.dumps({"message": "hi", "client_id": "a\tb"})),
    junk(
        "Idempotency-Key header too long",
        '{"message": "hi"}',
        headers=(("Idempotency-Key", "k" * 8000),),
    ),
    junk("nested arrays", "[" * DEEP + "]" * DEEP),
    junk("nested message", '{"message": ' + "[" * DEEP + "]" * DEEP + "}"),
    junk("5,000-digit integer", '{"message": ' + "9" * 5000 + "}"),
    junk("non-UTF-8 JSON", b'{"message": "\xff\xfe\xc3\x28"}'),
    junk("Latin-1 JSON", '{"message": "Grüße"}'.encode("latin-1")),
    junk("text/plain", "message=hi", "text/plain"),
    junk("XML", "<message>hi</message>", "application/xml"),
    junk("an image", b"\x89PNG\r\n\x1a\n", "image/png"),
    junk("JSON with a wrong subtype", '{"message": "hi"}', "application/x-json-junk"),
    junk("multipart without boundary", "message=hi", "multipart/form-data"),
    junk("multipart junk", b"\x00\xffrandom bytes, no parts at all", MULTIPART),
    junk(
        "multipart cut in its headers",
        "--XyZ\r\nContent-Disposition: form-da",
        MULTIPART,
    ),
    junk(
        "multipart without message",
        '--XyZ\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--XyZ--\r\n',
        MULTIPART,
    ),
    junk(
        "multipart four attachments",
        "".join(
            f'--XyZ\r\nContent-Disposition: form-data; name="attachment"; filename="{n}.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\nhello\r\n"
            for n in range(4)
        )
        + "--XyZ--\r\n",
        MULTIPART,
    ),
    junk(
        "multipart attachment of a forbidden type",
        '--XyZ\r\nContent-Disposition: form-data; name="attachment"; filename="x.exe"\r\n'
        "Content-Type: application/octet-stream\r\n\r\nMZ\x90\x00\x03\r\n--XyZ--\r\n",
        MULTIPART,
    ),
    junk(
        "form message 10,001 chars",
        urlencode({"message": "x" * (MAX_CHARS + 1)}),
        "application/x-www-form-urlencoded",
    ),
    junk(
        "form message 2 MB",
        urlencode({"message": "x" * 2_000_000}),
        "application/x-www-form-urlencoded",
    ),
    junk(
        "form body 3 MB",
        urlencode({"message": "x" * 3_000_000}),
        "application/x-www-form-urlencoded",
        statuses=(413,),
    ),
    junk(
        "form with 5,000 fields",
        "&".join(f"f{n}=v" for n in range(5000)),
        "application/x-www-form-urlencoded",
    ),
    junk(
        "form consent 1 MB",
        urlencode({"message": "hi", "evaluation_consent": "y" * 1_000_000}),
        "application/x-www-form-urlencoded",
    ),
    junk("form only NUL", "message=%00%01", "application/x-www-form-urlencoded"),
    junk("GET after=abc", "", "", method="GET", query="?after=abc"),
    junk("GET after=-1", "", "", method="GET", query="?after=-1"),
    junk("GET after=10**30", "", "", method="GET", query="?after=" + "9" * 30),
    junk("PUT", '{"message": "hi"}', statuses=(405,), method="PUT"),
    junk("DELETE", "", statuses=(405,), method="DELETE"),
]


async def test_malformed_rest_bodies_get_their_documented_answers(live_region: Region) -> None:
    client = AsyncClient()
    device = new_device("junk-rest")
    for case in REST_JUNK:
        response = await rest(
            client,
            case.method,
            chat_path(device) + case.query,
            case.body,
            case.content_type,
            dict(case.headers),
        )
        FIGURES.tried("REST bodies")
        assert response.status_code in case.statuses, (case.name, response.status_code)
        error_body(response)
    bad_paths = [
        f"/api/v3/{REGION}/de/chat/{'d' * 65}/",
        f"/api/v3/{REGION}/de/chat/{quote('gerät-ü')}/",
        f"/api/v3/{REGION}/de/chat/{quote('a' + chr(0) + 'b')}/",
        f"/api/v3/{REGION}/DE_de/chat/{device}/",
        f"/api/v3/{REGION}/{quote('ع')}/chat/{device}/",
        f"/api/v3/{quote('nö-region')}/de/chat/{device}/",
    ]
    for path in bad_paths:
        response = await rest(client, "POST", path, '{"message": "hi"}', "application/json")
        FIGURES.tried("REST bodies")
        assert response.status_code == 404, (path, response.status_code)
        assert error_body(response) == "Not found."
    # Nothing of that was stored; the device never got a chat.
    assert await Message.objects.acount() == 0
    response = await rest(client, "GET", chat_path(device))
    assert response.status_code == 404 and error_body(response) == "Chat not found."


async def test_rest_accepts_the_limits_and_replaces_undecodable_form_bytes(
    live_region: Region,
) -> None:
    client = AsyncClient()
    device = new_device("edge-rest")
    accepted: list[tuple[str, bytes | str, str]] = [
        ("10,000 chars form", urlencode({"message": "x" * MAX_CHARS}), "x" * MAX_CHARS),
        (
            "non-UTF-8 form bytes",
            "message=caf%E9+%FF%FE+ok",
            "caf\ufffd \ufffd\ufffd ok",  # as Django decodes them: replacement characters
        ),
        (
            "non-UTF-8 multipart field",
            b'--XyZ\r\nContent-Disposition: form-data; name="message"\r\n\r\n'
            b"gr\xfc\xdfe\r\n--XyZ--\r\n",
            "gr\ufffd\ufffde",
        ),
        ("JSON with charset", '{"message": "mit charset"}', "mit charset"),
    ]
    content_types = [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded",
        MULTIPART,
        "application/json; charset=utf-8",
    ]
    for (name, body, text), content_type in zip(accepted, content_types, strict=True):
        response = await rest(client, "POST", chat_path(device), body, content_type)
        FIGURES.tried("REST bodies")
        FIGURES.sent_messages("REST")
        assert response.status_code == 200, (name, response.content[:300])
        assert json.loads(response.content)["messages"][-1]["content"] == as_html(text), name
    assert await stored_texts(device) == [as_html(text) for _, _, text in accepted]


def webhook_junk(name: str, raw: bytes, statuses: Iterable[int] = (400,), **extra: Any) -> Body:
    """A body signed correctly, so that it is its content that is judged."""
    headers = (("X-Hub-Signature", sign(raw)), ("X-Zammad-Delivery", str(uuid.uuid4())))
    return Body(name, raw, "application/json", frozenset(statuses), headers=headers, **extra)


def webhook_junk_cases(ticket_id: int) -> list[Body]:
    big = json.dumps(
        {"ticket": {"id": ticket_id}, "article": {"id": 1, "body": "x" * (1024 * 1024)}}
    ).encode()
    huge = b'{"ticket": {"id": 1}, "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    good = json.dumps({"ticket": {"id": ticket_id, "article_ids": []}, "article": {}}).encode()
    return [
        webhook_junk("not JSON", b"hello"),
        webhook_junk("empty", b""),
        webhook_junk("truncated", b'{"ticket": {"id": 1'),
        webhook_junk("array", b"[]"),
        webhook_junk("string", b'"ticket"'),
        webhook_junk("null", b"null"),
        webhook_junk("no ticket", b"{}"),
        webhook_junk("ticket a number", b'{"ticket": 5}'),
        webhook_junk("ticket id a string", b'{"ticket": {"id": "5"}}'),
        webhook_junk("ticket id a float", b'{"ticket": {"id": 1.5}}'),
        webhook_junk("ticket id null", b'{"ticket": {"id": null}}'),
        webhook_junk(
            "article a string", f'{{"ticket": {{"id": {ticket_id}}}, "article": "x"}}'.encode()
        ),
        webhook_junk(
            "article a number", f'{{"ticket": {{"id": {ticket_id}}}, "article": 7}}'.encode()
        ),
        webhook_junk(
            "article id a string",
            f'{{"ticket": {{"id": {ticket_id}}}, "article": {{"id": "7"}}}}'.encode(),
        ),
        webhook_junk(
            "article without id",
            f'{{"ticket": {{"id": {ticket_id}}}, "article": {{"body": "x"}}}}'.encode(),
        ),
        webhook_junk("nested arrays", ("[" * DEEP + "]" * DEEP).encode()),
        webhook_junk(
            "nested ticket", ('{"ticket": ' + '{"a":' * 20_000 + "1" + "}" * 20_001).encode()
        ),
        webhook_junk("non-UTF-8", b'{"ticket": {"id": 1}, "x": "\xff\xfe"}'),
        webhook_junk("5,000-digit ticket id", b'{"ticket": {"id": ' + b"9" * 5000 + b"}}"),
        webhook_junk("over 1 MiB", big, statuses=(413,)),
        webhook_junk("5 MiB", huge, statuses=(413,)),
        Body(
            "wrong token",
            good,
            "application/json",
            frozenset({404}),
            query="?token=nope",
            headers=(("X-Hub-Signature", sign(good)),),
        ),
        Body(
            "no token",
            good,
            "application/json",
            frozenset({404}),
            query="?",
            headers=(("X-Hub-Signature", sign(good)),),
        ),
        Body(
            "token twice, first wrong",
            good,
            "application/json",
            frozenset({404}),
            query=f"?token=nope&token={WEBHOOK_TOKEN}x",
            headers=(("X-Hub-Signature", sign(good)),),
        ),
        Body("no signature", good, "application/json", frozenset({401})),
        Body(
            "signature of another body",
            good,
            "application/json",
            frozenset({401}),
            headers=(("X-Hub-Signature", sign(good + b" ")),),
        ),
        Body(
            "signature without hex",
            good,
            "application/json",
            frozenset({401}),
            headers=(("X-Hub-Signature", "sha1="),),
        ),
        Body(
            "sha256 signature",
            good,
            "application/json",
            frozenset({401}),
            headers=(("X-Hub-Signature", "sha256=" + "0" * 64),),
        ),
        Body(
            "signature 100 KB",
            good,
            "application/json",
            frozenset({401}),
            headers=(("X-Hub-Signature", "sha1=" + "a" * 100_000),),
        ),
        Body(
            "signature non-ASCII",
            good,
            "application/json",
            frozenset({401}),
            headers=(("X-Hub-Signature", "sha1=ÿÿ"),),
        ),
        Body("GET", b"", "", frozenset({405}), method="GET"),
    ]


async def test_malformed_webhook_bodies_touch_nothing(
    live_region: Region, zammad: FakeZammadServer
) -> None:
    client = AsyncClient()
    device = new_device("junk-hook")
    assert (await post_form(client, device, {"message": "Hallo"})).status_code == 200
    await drain()
    [ticket] = await asyncio.to_thread(zammad.tickets)
    before = await stored_texts(device)
    work_before = await Work.objects.acount()
    for case in webhook_junk_cases(ticket["id"]):
        path = HOOK if not case.query else f"/api/v3/webhook/zammad/{case.query}"
        response = await rest(
            client, case.method, path, case.body, case.content_type, dict(case.headers)
        )
        FIGURES.tried("webhook bodies")
        assert response.status_code in case.statuses, (case.name, response.status_code)
        error_body(response)
    assert await stored_texts(device) == before
    assert await WebhookDelivery.objects.acount() == 0
    assert await Work.objects.acount() == work_before


# === 3. unicode edge cases on every route ========================================================


@dataclass(frozen=True)
class Text:
    name: str
    sent: str
    stored: str  # the text after cleaning: no control characters, NFC
    in_forms: bool = True  # lone surrogates cannot be written in a UTF-8 form body


def same(name: str, text: str) -> Text:
    return Text(name, text, text)


UNICODE = [
    same("Arabic with bidi marks", "\u200fمرحبا\u200e بكم \u202bفي\u202c \u2067الدردشة\u2069 ؟"),  # noqa: RUF001
    same("Farsi with ZWNJ", "می\u200cخواهم با مشاور صحبت کنم\u200f؟"),  # noqa: RUF001
    same("RTL override", "abc \u202egnp.exe\u202c def"),
    same("emoji ZWJ sequences", "👩\u200d👩\u200d👧\u200d👦 👨🏽\u200d💻 🏳️\u200d🌈 ❤️\u200d🔥"),
    same("flags", "🇩🇪🇺🇦🇸🇾🇦🇫🇪🇺 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"),
    same("skin tones and keycaps", "👋🏿 ✌🏻 1️⃣ #️⃣"),
    Text("NUL", "vor\x00nach", "vornach"),
    Text("C0 controls and DEL", "a\x01\x02\x07\x08\x0b\x0c\x0e\x1b[31mrot\x1f\x7fb", "a[31mrotb"),
    Text(
        "newlines and tab",
        "Zeile 1\r\nZeile 2\rZeile 3\n\tEnde",
        "Zeile 1\nZeile 2\nZeile 3\n\tEnde",
    ),
    Text("lone surrogates", "ok\ud800 \udfff!\udbff", "ok !", in_forms=False),
    Text("combining characters", "e\u0301 A\u030a n\u0303 \u1100\u1161", "é Å ñ 가"),
    Text(
        "stacked combining marks",
        "Z\u0351\u0352\u0353a\u0489\u0489l\u0336g\u0337o",
        unicodedata.normalize("NFC", "Z\u0351\u0352\u0353a\u0489\u0489l\u0336g\u0337o"),
    ),
    same("HTML and entities", "<b>fett</b> & <script>alert('x')</script> &amp; \"q\""),
    same("BOM, non-characters, last plane", "\ufeffBOM \uffff \U0010fffd \U0001d11e"),
    same("10,000 emoji", "\U0001f600" * MAX_CHARS),
]


def forwarded_headers(delivery: dict[str, Any]) -> dict[str, str]:
    keep = {"x-zammad-delivery", "x-hub-signature", "x-zammad-trigger"}
    return {k: v for k, v in delivery["headers"].items() if k.lower() in keep}


async def test_unicode_is_stored_and_forwarded_cleaned_but_intact(
    live_region: Region, zammad: FakeZammadServer
) -> None:
    client = AsyncClient()
    devices = {route: new_device(f"uni-{route}") for route in ("json", "form", "socket")}
    expected: dict[str, list[str]] = {route: [] for route in devices}

    for case in UNICODE:
        FIGURES.tried("unicode cases", 3 if case.in_forms else 2)
        response = await post_json(client, devices["json"], {"message": case.sent})
        FIGURES.sent_messages("REST")
        assert response.status_code == 200, (case.name, response.content[:300])
        assert json.loads(response.content)["messages"][-1]["content"] == as_html(case.stored)
        expected["json"].append(as_html(case.stored))
        if case.in_forms:
            response = await post_form(client, devices["form"], {"message": case.sent})
            FIGURES.sent_messages("REST")
            assert response.status_code == 200, (case.name, response.content[:300])
            assert json.loads(response.content)["messages"][-1]["content"] == as_html(case.stored)
            expected["form"].append(as_html(case.stored))

    async with in_process_socket(devices["socket"]) as socket:
        for number, case in enumerate(UNICODE):
            await socket.send(
                {"type": "chat.send", "client_id": f"u{number}", "message": case.sent}
            )
            FIGURES.sent_messages("socket")
            ack = await socket.next_of("chat.ack")
            echo = await socket.next_of("chat.message")
            FIGURES.received_messages("socket pushes")
            assert echo["message"]["id"] == ack["id"]
            assert echo["message"]["content"] == as_html(case.stored), case.name
            expected["socket"].append(as_html(case.stored))
        # Over the limit by one character (not by bytes or UTF-16 units): refused.
        await socket.send(
            {"type": "chat.send", "client_id": "over", "message": "\U0001f600" * (MAX_CHARS + 1)}
        )
        assert (await socket.next_of("error"))["code"] == "invalid_message"

    for route, device in devices.items():
        assert await stored_texts(device) == expected[route], route
        response = await rest(client, "GET", chat_path(device))
        contents = [m["content"] for m in json.loads(response.content)["messages"]]
        assert contents == expected[route], route

    # Forwarded to Zammad as stored, each exactly once.
    await drain()
    stored = {
        m.pk: m.content
        async for m in Message.objects.filter(chat__device_id__in=list(devices.values()))
    }
    bodies = await zammad_bodies(zammad)
    assert_delivered("unicode to Zammad", stored, [i for i, b in bodies.items() for _ in b])
    FIGURES.received_messages("Zammad articles", sum(len(b) for b in bodies.values()))
    for message_id, content in stored.items():
        assert bodies[message_id] == [content]


async def test_unicode_in_agent_articles_is_cleaned_but_intact(
    live_region: Region, zammad: FakeZammadServer, capture: Capture
) -> None:
    client = AsyncClient()
    device = new_device("uni-agent")
    assert (await post_form(client, device, {"message": "Hallo"})).status_code == 200
    await drain()
    [ticket] = await asyncio.to_thread(zammad.tickets)
    expected: list[str] = []
    async with in_process_socket(device) as socket:
        for case in UNICODE:
            replies = [
                (
                    "text/html",
                    f"<p>{html.escape(case.sent, quote=False)}</p>",
                    f"<p>{html.escape(case.stored, quote=False)}</p>",
                ),
                ("text/plain", case.sent, as_html(case.stored)),
            ]
            for content_type, body, stored in replies:
                FIGURES.tried("unicode cases")
                if case.in_forms:
                    count = len(capture.deliveries)
                    await asyncio.to_thread(
                        zammad.agent_reply, ticket["id"], body, content_type=content_type
                    )
                    delivery = (await capture.wait_async(count + 1))[count]
                    raw, headers = delivery["body"], forwarded_headers(delivery)
                else:
                    # The fake cannot send lone surrogates; Zammad can (JSON escapes): the same
                    # payload shape, written by hand, signed.
                    template = (await capture.wait_async(1))[0]
                    raw, headers = surrogate_delivery(template, body, content_type)
                response = await rest(client, "POST", HOOK, raw, "application/json", headers)
                assert response.status_code == 200, (case.name, content_type, response.content)
                push = await socket.next_of("chat.message")
                FIGURES.received_messages("socket pushes")
                assert push["message"]["content"] == stored, (case.name, content_type)
                expected.append(stored)
    assert (await stored_texts(device))[1:] == expected


def surrogate_delivery(
    template: dict[str, Any], body: str, content_type: str
) -> tuple[bytes, dict[str, str]]:
    payload = json.loads(template["body"])
    payload["article"]["id"] = 90_000 + random.randrange(10_000)
    payload["article"]["body"] = body
    payload["article"]["content_type"] = content_type
    raw = json.dumps(payload).encode()  # ensure_ascii: "\ud800" escapes
    return raw, {"X-Hub-Signature": sign(raw), "X-Zammad-Delivery": str(uuid.uuid4())}


# === 4. one device, one socket, 1,000 rapid sends =================================================

RAPID_SENDS = 1000


@pytest.mark.parametrize("limits", ["default limits", "limits off"])
async def test_rapid_sends_over_one_socket(
    live_region: Region, request: pytest.FixtureRequest, limits: str
) -> None:
    if limits == "default limits":
        request.getfixturevalue("rate_limits")
    device = new_device("rapid")
    client_ids = [f"r{number:04d}" for number in range(RAPID_SENDS)]
    answers: dict[str, dict[str, Any]] = {}
    pushed: Counter[int] = Counter()
    async with in_process_socket(device) as socket:
        started = time.monotonic()
        for client_id in client_ids:
            await socket.send({"type": "chat.send", "client_id": client_id, "message": client_id})
        FIGURES.sent_messages("socket", RAPID_SENDS)
        while len(answers) < RAPID_SENDS or sum(pushed.values()) < sum(
            1 for a in answers.values() if a["type"] == "chat.ack"
        ):
            frame = await socket.frame()
            if frame["type"] in {"chat.ack", "error"}:
                assert frame["client_id"] not in answers, ("answered twice", frame)
                answers[frame["client_id"]] = frame
            elif frame["type"] == "chat.message":
                pushed[frame["message"]["id"]] += 1
        elapsed = time.monotonic() - started
        await socket.still_open()
        # Usable after the storm: a resend of an acked client_id is acked with the same id.
        acked = {cid: a["id"] for cid, a in answers.items() if a["type"] == "chat.ack"}
        refused = [a for a in answers.values() if a["type"] == "error"]
        if limits == "limits off":
            some = next(iter(acked))
            await socket.send({"type": "chat.send", "client_id": some, "message": "again"})
            again = await socket.next_of("chat.ack")
            assert (again["client_id"], again["id"]) == (some, acked[some])
    FIGURES.received_messages("socket pushes", sum(pushed.values()))
    for error in refused:
        assert error["code"] == "rate_limited", error
        assert isinstance(error["retry_after"], int) and 1 <= error["retry_after"] <= 60, error
    if limits == "limits off":
        assert not refused and len(acked) == RAPID_SENDS
    else:
        # 30 a minute by default; a window boundary during the burst allows up to twice that.
        assert 1 <= len(acked) <= 60 and len(refused) == RAPID_SENDS - len(acked)
    stored = [
        (m.client_id, m.pk)
        async for m in Message.objects.filter(chat__device_id=device).order_by("id")
    ]
    assert_delivered("acked sends stored", acked.items(), stored)
    assert_delivered("echoes of acked sends", acked.values(), list(pushed.elements()))
    FIGURES.note(
        f"1,000 rapid sends ({limits}): {len(acked)} acked, {len(refused)} rate_limited, "
        f"{elapsed:.1f} s, socket usable after"
    )


# === 5. slowloris against a real daphne ===========================================================

SLOW_CLIENTS = 100
SLOW_BYTE_INTERVAL_SECS = 0.2
RESPONSIVE_BOUND_SECS = 2.0


async def slow_client(port: int, opened: list[int], closed: list[int], stop: asyncio.Event) -> None:
    """Sends request headers one byte at a time, never finishing them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened.append(1)
    headers = (
        b"POST /api/v3/augsburg/de/chat/slowloris-device/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nX-Padding: "
    )
    payload = iter(headers + b"a" * 100_000)
    try:
        while not stop.is_set():
            writer.write(bytes([next(payload)]))
            await writer.drain()
            # The pace of the attack, not a wait for an event.
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SLOW_BYTE_INTERVAL_SECS)
    except (ConnectionError, OSError):
        closed.append(1)
    finally:
        writer.close()
        with suppress(ConnectionError, OSError):
            await writer.wait_closed()
        del reader


@pytest.mark.e2e
async def test_slowloris_does_not_starve_other_clients(
    abuse_daphne: LoggedDaphne, live_region: Region
) -> None:
    stop = asyncio.Event()
    opened: list[int] = []
    closed: list[int] = []
    attackers = [
        asyncio.create_task(slow_client(abuse_daphne.port, opened, closed, stop))
        for _ in range(SLOW_CLIENTS)
    ]
    latencies: list[float] = []
    device = new_device("beside-slowloris")
    try:
        await wait_for(lambda: len(opened) == SLOW_CLIENTS, what="slow connections")
        async with aiohttp.ClientSession() as http:
            url = abuse_daphne.url + chat_path(device)
            for number in range(20):
                started = time.monotonic()
                status, body = await http_post(http, url, data={"message": f"normal {number}"})
                latencies.append(time.monotonic() - started)
                FIGURES.sent_messages("REST")
                assert status == 200, body
                started = time.monotonic()
                async with http.get(url) as answer:
                    FIGURES.http(answer.status)
                    assert answer.status == 200
                latencies.append(time.monotonic() - started)
            started = time.monotonic()
            async with live_socket(abuse_daphne, device) as socket:
                ack = await socket.send("round-trip", "through the socket")
                await wait_for(lambda: socket.pushed[ack["id"]] == 1, what="the echo")
            latencies.append(time.monotonic() - started)
        still_open = SLOW_CLIENTS - len(closed)
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
    FIGURES.tried("slowloris connections", SLOW_CLIENTS)
    FIGURES.note(
        f"slowloris: {SLOW_CLIENTS} connections trickling headers ({still_open} still open at "
        f"the end); 41 normal requests and a socket round trip, slowest {max(latencies):.3f} s "
        f"(bound {RESPONSIVE_BOUND_SECS} s)"
    )
    assert max(latencies) < RESPONSIVE_BOUND_SECS, latencies
    assert_no_crashes(abuse_daphne)


# === 6. a webhook flood with duplicates ==========================================================

FLOOD_TICKETS = 5
FLOOD_REPLIES_PER_TICKET = 50
FLOOD_CONCURRENCY = 50


@pytest.mark.e2e
async def test_webhook_flood_with_duplicates(
    abuse_daphne: LoggedDaphne, live_region: Region, zammad: FakeZammadServer, capture: Capture
) -> None:
    client = AsyncClient()
    devices = [new_device("flood") for _ in range(FLOOD_TICKETS)]
    for device in devices:
        assert (await post_form(client, device, {"message": "Hallo"})).status_code == 200
    await drain()
    tickets = {
        device: next(
            t["id"] for t in await asyncio.to_thread(zammad.tickets) if device in t["title"]
        )
        for device in devices
    }
    articles: dict[str, list[int]] = {device: [] for device in devices}
    for number in range(FLOOD_REPLIES_PER_TICKET):
        for device, ticket_id in tickets.items():
            article = await asyncio.to_thread(
                zammad.agent_reply, ticket_id, f"<p>Antwort {number}</p>"
            )
            articles[device].append(article["id"])
    unique = await capture.wait_async(FLOOD_TICKETS * FLOOD_REPLIES_PER_TICKET)
    shuffler = random.Random(20261126)
    deliveries = unique + shuffler.sample(unique, len(unique))  # every one twice: 50% duplicates
    shuffler.shuffle(deliveries)
    FIGURES.tried("webhook deliveries", len(deliveries))

    semaphore = asyncio.Semaphore(FLOOD_CONCURRENCY)
    statuses: Counter[int] = Counter()

    async def deliver(http: aiohttp.ClientSession, delivery: dict[str, Any]) -> None:
        async with semaphore:
            headers = {**forwarded_headers(delivery), "Content-Type": "application/json"}
            status, _ = await http_post(
                http, abuse_daphne.url + HOOK, data=delivery["body"], headers=headers
            )
            statuses[status] += 1

    async with AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(live_socket(abuse_daphne, d)) for d in devices]
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(deliver(http, delivery) for delivery in deliveries))
        elapsed = time.monotonic() - started
        assert statuses == Counter({200: len(deliveries)}), statuses
        for live in opened:
            await wait_for(
                partial(live.has_pushed_at_least, FLOOD_REPLIES_PER_TICKET), what="the pushes"
            )
    await drain()  # reconciliations that out-of-order deliveries asked for
    for live, device in zip(opened, devices, strict=True):
        stored = {
            m.zammad_article_id: m.pk
            async for m in Message.objects.filter(chat__device_id=device, role="agent")
        }
        assert_delivered(f"agent articles of {device}", articles[device], list(stored))
        assert_delivered(f"pushes to {device}", stored.values(), live.pushed.elements())
        assert sorted(live.contents[i] for i in live.pushed) == sorted(
            f"<p>Antwort {n}</p>" for n in range(FLOOD_REPLIES_PER_TICKET)
        )
    FIGURES.received_messages("webhook articles", len(unique))
    FIGURES.note(
        f"webhook flood: {len(deliveries)} signed deliveries ({len(unique)} unique), shuffled, "
        f"{FLOOD_CONCURRENCY} at a time, in {elapsed:.1f} s: all 200, every article once"
    )
    assert_no_crashes(abuse_daphne)


# === 7. Zammad answering garbage, error pages, 5xx, or nothing in time ===========================


@dataclass(frozen=True)
class Fault:
    name: str
    path: str
    count: int = 1
    status: int | None = 500
    body: str | None = None
    content_type: str | None = None
    stall_secs: float | None = None
    down: bool = False  # connections dropped without an answer


HTML_PAGE = "<!doctype html><html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
ZAMMAD_FAULTS = [
    Fault(
        "garbage JSON on ticket creation",
        "/api/v1/tickets",
        1,
        200,
        '{"id": 1,',
        "application/json",
    ),
    Fault("HTML error page", "/api/v1/ticket_articles", 1, 502, HTML_PAGE, "text/html"),
    Fault("HTML page with 200", "/api/v1/ticket_articles", 1, 200, HTML_PAGE, "text/html"),
    Fault("wrong JSON shape", "/api/v1/ticket_articles", 1, 200, '["ok"]', "application/json"),
    Fault("5xx twice", "/api/v1/ticket_articles", 2, 500),
    Fault("503", "/api/v1/ticket_articles", 1, 503),
    Fault("stall past the timeout", "/api/v1/ticket_articles", 1, None, stall_secs=60),
    Fault("down, connections dropped", "/api/v1/ticket_articles", 0, None, down=True),
]


async def forward_until_sent(device: str, zammad: FakeZammadServer, rounds: int = 10) -> int:
    """Run the worker, making retries due at once, until the device's messages are sent."""
    for failures in range(rounds):
        await drain()
        pending = await Message.objects.filter(chat__device_id=device, status="pending").acount()
        if pending == 0:
            return failures
        await make_due()
    raise AssertionError(f"{device}: messages still pending after {rounds} rounds")


async def test_zammad_garbage_errors_and_stalls_lose_and_double_nothing(
    live_region: Region, zammad: FakeZammadServer, settings: Any
) -> None:
    settings.ZAMMAD_TIMEOUT_SECS = 0.5
    client = AsyncClient()
    device = new_device("zammad-faults")
    failures = 0
    async with in_process_socket(device) as socket:
        for number, fault in enumerate(ZAMMAD_FAULTS):
            FIGURES.tried("Zammad faults")
            if fault.down:
                await asyncio.to_thread(zammad.go_down)
            else:
                await asyncio.to_thread(
                    zammad.fail_next,
                    fault.count,
                    fault.status,
                    fault.stall_secs,
                    fault.path,
                    body=fault.body,
                    content_type=fault.content_type,
                )
            response = await post_form(client, device, {"message": f"fault {number}"})
            FIGURES.sent_messages("REST")
            assert response.status_code == 200
            message_id = json.loads(response.content)["messages"][-1]["id"]
            await drain()
            assert await Message.objects.filter(pk=message_id, status="pending").aexists(), fault
            if fault.down:
                await asyncio.to_thread(zammad.come_back)
            if fault.stall_secs:
                # The stalled call goes on in Zammad after the server gave up on it: let it
                # finish (come_back wakes it), so that the retry finds the article instead of
                # writing it again.
                await asyncio.to_thread(zammad.come_back)
                await wait_for(
                    partial(zammad_has_article, zammad, message_id), what="the late article"
                )
            await make_due()
            failures += 1 + await forward_until_sent(device, zammad)
            status = await socket.next_of("chat.status")
            assert status == {"type": "chat.status", "id": message_id, "status": "sent"}, fault
    messages = [m.pk async for m in Message.objects.filter(chat__device_id=device)]
    assert await Message.objects.filter(chat__device_id=device, status="sent").acount() == len(
        messages
    )
    in_zammad = await zammad_articles_by_message(zammad)
    assert_delivered("messages in Zammad", messages, list(in_zammad.elements()))
    FIGURES.received_messages("Zammad articles", sum(in_zammad.values()))
    tickets = await asyncio.to_thread(zammad.tickets)
    FIGURES.note(
        f"Zammad faults: {len(ZAMMAD_FAULTS)} kinds, {failures} failed attempts retried, "
        f"{len(messages)} messages sent exactly once, {len(tickets)} ticket(s)"
    )
    assert len(tickets) == 1, [t["title"] for t in tickets]


async def zammad_has_article(zammad: FakeZammadServer, message_id: int) -> bool:
    return (await zammad_articles_by_message(zammad))[message_id] >= 1


# === 8. Redis and PostgreSQL restarted under traffic ==============================================


@dataclass
class Traffic:
    """What a device's client sent and what it was answered."""

    device: str
    acked: dict[str, int]  # client_id (or REST text) -> message id
    refused: Counter[str]  # error codes and statuses seen while the server was impaired

    @classmethod
    def new(cls, device: str) -> Traffic:
        return cls(device, {}, Counter())


async def socket_traffic(
    socket: LiveSocket, traffic: Traffic, count: int, progress: list[int], retry_until: float
) -> None:
    """Sends one after the other; a refused send is resent with the same client_id, as an app
    does, until it is acked."""
    for number in range(count):
        client_id = f"{traffic.device[-6:]}-{number}"
        while True:
            answer = await socket.send(client_id, f"socket {client_id}")
            if answer["type"] == "chat.ack":
                traffic.acked[client_id] = answer["id"]
                break
            assert answer["code"] == "unavailable", answer
            traffic.refused[answer["code"]] += 1
            assert time.monotonic() < retry_until, "still refused"
            await asyncio.sleep(0.05)  # an app's retry pace while the server is impaired
        progress.append(1)


async def rest_traffic(
    http: aiohttp.ClientSession,
    server: Daphne,
    traffic: Traffic,
    count: int,
    progress: list[int],
    retry_until: float,
) -> None:
    """POSTs with an Idempotency-Key, retried on 503 as the legacy apps' retry would."""
    url = server.url + chat_path(traffic.device)
    for number in range(count):
        text = f"rest {traffic.device[-6:]}-{number}"
        while True:
            FIGURES.sent_messages("REST")
            status, body = await http_post(
                http, url, data={"message": text}, headers={"Idempotency-Key": text[5:]}
            )
            if status == 200:
                [mine] = [m for m in body["messages"] if m["content"] == text]
                traffic.acked[text] = mine["id"]
                break
            assert status == 503 and body == {"error": Unavailable.message}, (status, body)
            traffic.refused[str(status)] += 1
            assert time.monotonic() < retry_until, "still refused"
            await asyncio.sleep(0.05)
        progress.append(1)


async def check_after_recovery(
    server: Daphne, traffics: list[Traffic], sockets: dict[str, LiveSocket], before: dict[str, int]
) -> None:
    """Live sockets got every acked message once; a client resuming with ``after`` gets every
    message since, exactly once, in order."""
    for traffic in traffics:
        expected = set(traffic.acked.values())
        live = sockets[traffic.device]
        await wait_for(partial(live.has_pushed_all, expected), timeout=20, what="catch-up")
        assert_delivered(f"live pushes to {traffic.device}", expected, live.pushed.elements())
        async with live_socket(server, traffic.device, after=before[traffic.device]) as resumed:
            assert resumed.history is not None
            ids = [m["id"] for m in resumed.history["messages"]]
            FIGURES.received_messages("resumed histories", len(ids))
            assert ids == sorted(ids)
            assert_delivered(f"resume of {traffic.device}", expected, ids)


@pytest.mark.e2e
async def test_redis_restart_during_traffic(
    live_region: Region, private_redis: PrivateRedis, zammad: FakeZammadServer, tmp_path: Path
) -> None:
    skip_without_shared_services()
    env = server_env(CHATBOT_URL="", REDIS_URL=private_redis.url)
    server = LoggedDaphne(free_port(), env, tmp_path / "daphne.log")
    await asyncio.to_thread(server.start)
    traffics = [Traffic.new(new_device("redis-sock")) for _ in range(3)]
    poster = Traffic.new(new_device("redis-rest"))
    per_client = 24
    progress: list[int] = []
    try:
        async with (
            aiohttp.ClientSession() as http,
            live_socket(server, traffics[0].device) as first,
            live_socket(server, traffics[1].device) as second,
            live_socket(server, traffics[2].device) as third,
            live_socket(server, poster.device) as listener,
        ):
            sockets = dict(zip([t.device for t in traffics], [first, second, third], strict=True))
            sockets[poster.device] = listener
            before = {device: socket.last_id for device, socket in sockets.items()}
            retry_until = time.monotonic() + 60
            tasks = [
                *(
                    socket_traffic(sockets[t.device], t, per_client, progress, retry_until)
                    for t in traffics
                ),
                rest_traffic(http, server, poster, per_client, progress, retry_until),
            ]
            running = asyncio.gather(*tasks)
            total = per_client * (len(traffics) + 1)
            await wait_for(lambda: len(progress) >= total // 4, timeout=30, what="traffic")
            await asyncio.to_thread(private_redis.stop)
            at_stop = len(progress)
            await wait_for(lambda: len(progress) >= at_stop + 12, timeout=60, what="traffic")
            during = len(progress) - at_stop
            await asyncio.to_thread(private_redis.start)
            await asyncio.wait_for(running, 90)
            await check_after_recovery(server, [*traffics, poster], sockets, before)
    finally:
        await asyncio.to_thread(server.stop)
    await forward_all_exactly_once(zammad, [*traffics, poster])
    refused = sum((t.refused for t in [*traffics, poster]), Counter[str]())
    FIGURES.note(
        f"Redis restart: {total} messages ({during} answered while Redis was down), "
        f"refusals {dict(refused) or 'none'}; every one stored, pushed, resumed and sent to "
        "Zammad exactly once"
    )
    assert_no_crashes(server)


async def forward_all_exactly_once(zammad: FakeZammadServer, traffics: list[Traffic]) -> None:
    await drain(limit=2000)
    in_zammad = await zammad_articles_by_message(zammad)
    for traffic in traffics:
        stored = [m.pk async for m in Message.objects.filter(chat__device_id=traffic.device)]
        assert_delivered(f"store of {traffic.device}", traffic.acked.values(), stored)
        assert_delivered(
            f"Zammad articles of {traffic.device}",
            stored,
            [i for i in in_zammad.elements() if i in set(stored)],
        )
        FIGURES.received_messages("Zammad articles", len(stored))


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "manage.py", "chat_worker", "--concurrency", "4"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True
    )


@pytest.mark.e2e
async def test_postgres_restart_during_traffic(
    live_region: Region, zammad: FakeZammadServer, tmp_path: Path
) -> None:
    if not PrivatePostgres.available():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    postgres = PrivatePostgres()
    worker: subprocess.Popen[bytes] | None = None
    server: LoggedDaphne | None = None
    try:
        await asyncio.to_thread(postgres.start)
        url = await asyncio.to_thread(postgres.create_database, "chat")
        env = server_env(
            CHATBOT_URL="",
            DATABASE_URL=url,
            CHANNEL_PREFIX=f"abuse-pg-{postgres.port}",
            WORKER_POLL_INTERVAL_SECS="0.05",
            WORKER_MAX_BACKOFF_SECS="0.2",
        )
        await asyncio.to_thread(manage, env, "migrate", "--noinput")
        await asyncio.to_thread(
            manage,
            env,
            "create_region",
            "--slug", REGION,
            "--name", "Augsburg",
            "--default-language", "de",
            "--zammad-url", zammad.url,
            "--zammad-token", ZAMMAD_TOKEN,
            "--webhook-token", WEBHOOK_TOKEN,
            "--signature-secret", SIGNATURE_SECRET,
        )  # fmt: skip
        server = LoggedDaphne(free_port(), env, tmp_path / "daphne.log")
        await asyncio.to_thread(server.start)
        worker = await asyncio.to_thread(start_worker, env, tmp_path / "worker.log")
        senders = [Traffic.new(new_device("pg-sock")) for _ in range(2)]
        poster = Traffic.new(new_device("pg-rest"))
        per_client = 20
        progress: list[int] = []
        outage: dict[str, Any] = {}
        async with (
            aiohttp.ClientSession() as http,
            live_socket(server, senders[0].device) as first,
            live_socket(server, senders[1].device) as second,
            live_socket(server, poster.device) as listener,
        ):
            sockets = {senders[0].device: first, senders[1].device: second, poster.device: listener}
            before = {device: socket.last_id for device, socket in sockets.items()}
            retry_until = time.monotonic() + 90
            running = asyncio.gather(
                *(socket_traffic(sockets[t.device], t, per_client, progress, retry_until)
                  for t in senders),
                rest_traffic(http, server, poster, per_client, progress, retry_until),
            )  # fmt: skip
            total = per_client * 3
            await wait_for(lambda: len(progress) >= total // 4, timeout=30, what="traffic")
            await asyncio.to_thread(postgres.stop)
            # While it is down: documented answers only, and the sockets stay open.
            refused_before = sum(sum(t.refused.values()) for t in [*senders, poster])
            await wait_for(
                lambda: (
                    sum(sum(t.refused.values()) for t in [*senders, poster]) >= refused_before + 15
                ),
                timeout=30,
                what="refusals during the outage",
            )
            outage["get"] = await outage_get(http, server, poster.device)
            outage["connect"] = await outage_connect(server, poster.device)
            await asyncio.to_thread(postgres.start)
            await asyncio.wait_for(running, 120)
            assert all(s.close_code is None for s in sockets.values()), "a socket closed"
            await check_after_recovery(server, [*senders, poster], sockets, before)

        # The worker on the restarted database forwards everything, each exactly once.
        stored = await asyncio.to_thread(private_messages, url)
        for traffic in [*senders, poster]:
            assert_delivered(
                f"store of {traffic.device}", traffic.acked.values(), stored[traffic.device]
            )
        everything = [i for ids in stored.values() for i in ids]
        await wait_for(
            lambda: zammad_has_all(zammad, everything), timeout=60, what="Zammad to get all"
        )
        in_zammad = await zammad_articles_by_message(zammad)
        assert_delivered("Zammad articles", everything, list(in_zammad.elements()))
        FIGURES.received_messages("Zammad articles", len(everything))
        refused = sum((t.refused for t in [*senders, poster]), Counter[str]())
        FIGURES.note(
            f"PostgreSQL restart: {total} messages; during the outage {dict(refused)} "
            f"(socket 'unavailable' error frames, REST 503), GET {outage['get']}, a new socket "
            f"{outage['connect']}; open sockets stayed open; after recovery every message "
            "stored, pushed, resumed and sent to Zammad exactly once"
        )
        # A socket that connects while the database is down is told to try again later.
        assert outage["connect"] == ("closed", 1013), outage["connect"]
        assert_no_crashes(server)
    finally:
        if worker is not None:
            worker.terminate()
            await asyncio.to_thread(worker.wait, 10)
        if server is not None:
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(postgres.remove)


async def outage_get(http: aiohttp.ClientSession, server: Daphne, device: str) -> int:
    async with http.get(server.url + chat_path(device)) as answer:
        FIGURES.http(answer.status)
        body = await answer.json()
        assert answer.status == 503 and body == {"error": Unavailable.message}, body
        return answer.status


async def outage_connect(server: Daphne, device: str) -> Any:
    try:
        async with connect(server.ws_url + socket_path(device), open_timeout=10) as connection:
            raw = await asyncio.wait_for(connection.recv(), TIMEOUT_SECS)
            return ("frame", raw)
    except ConnectionClosed as closed:
        return ("closed", closed.rcvd.code if closed.rcvd else None)
    except Exception as error:
        return ("error", repr(error))


def private_messages(url: str) -> dict[str, list[int]]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT c.device_id, m.id FROM chatserver_message m "
            "JOIN chatserver_chat c ON c.id = m.chat_id ORDER BY m.id"
        ).fetchall()
    stored: dict[str, list[int]] = {}
    for device, message_id in rows:
        stored.setdefault(device, []).append(message_id)
    return stored


async def zammad_has_all(zammad: FakeZammadServer, message_ids: list[int]) -> bool:
    in_zammad = await zammad_articles_by_message(zammad)
    return all(in_zammad[i] >= 1 for i in message_ids)


# === 9. memory across a storm =====================================================================

# 1,000 of each keeps the storm near a minute on a 2-core machine (daphne spends ~15-20 ms of
# CPU on each); runs with 2,000 of each grew the RSS by 7-9 MiB, as much as these do.
STORM_CONNECTS = 1000
STORM_POSTS = 1000
STORM_CONCURRENCY = 20
RSS_BOUND_KIB = 20 * 1024


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_memory_returns_after_a_storm(live_region: Region, tmp_path: Path) -> None:
    skip_without_shared_services()
    server = LoggedDaphne(free_port(), server_env(CHATBOT_URL=""), tmp_path / "daphne.log")
    await asyncio.to_thread(server.start)
    try:
        at_start = server.rss_kib()
        await storm(server, connects=200, posts=200)  # warm-up: pools, caches, imports
        before = server.rss_kib()
        started = time.monotonic()
        await storm(server, connects=STORM_CONNECTS, posts=STORM_POSTS)
        elapsed = time.monotonic() - started
        after = server.rss_kib()
    finally:
        await asyncio.to_thread(server.stop)
    FIGURES.memory.append(
        Memory(
            f"daphne RSS, {STORM_CONNECTS} socket connects/disconnects and {STORM_POSTS} "
            f"REST posts in {elapsed:.0f} s",
            before,
            after,
            RSS_BOUND_KIB,
            at_start,
        )
    )
    assert after - before <= RSS_BOUND_KIB, (before, after)
    assert_no_crashes(server)


async def storm(server: Daphne, *, connects: int, posts: int) -> None:
    """``STORM_CONCURRENCY`` clients connecting and disconnecting sockets (full lifecycle: the
    history frame, then a close) next to as many posting over REST, spread over many devices so
    that conversations stay short and the storm measures the server, not JSON of long chats."""

    async def connecting(count: int) -> None:
        device = new_device("storm-socket")
        for _ in range(count):
            async with live_socket(server, device):
                pass
        FIGURES.tried("storm connects", count)

    async def posting(http: aiohttp.ClientSession, count: int) -> None:
        devices = [new_device("storm-rest") for _ in range(max(1, count // 10))]
        for number in range(count):
            url = server.url + chat_path(devices[number % len(devices)])
            status, body = await http_post(http, url, data={"message": f"storm {number}"})
            assert status == 200, body
        FIGURES.sent_messages("REST", count)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(
            *(connecting(connects // STORM_CONCURRENCY) for _ in range(STORM_CONCURRENCY)),
            *(posting(http, posts // STORM_CONCURRENCY) for _ in range(STORM_CONCURRENCY)),
        )


async def test_stalled_ticket_creation_opens_one_ticket(
    live_region: Region, zammad: FakeZammadServer, settings: Any
) -> None:
    settings.ZAMMAD_TIMEOUT_SECS = 0.5
    client = AsyncClient()
    device = new_device("ticket-stall")
    FIGURES.tried("Zammad faults")
    await asyncio.to_thread(zammad.fail_next, 1, None, 60, "/api/v1/tickets")
    response = await post_form(client, device, {"message": "erste Nachricht"})
    FIGURES.sent_messages("REST")
    assert response.status_code == 200
    await drain()
    await asyncio.to_thread(zammad.come_back)  # the stalled creation completes in Zammad
    await wait_for(partial(ticket_count, zammad, device, 1), what="the late ticket")
    await make_due()
    await forward_until_sent(device, zammad)
    # The message itself is neither lost nor doubled ...
    messages = [m.pk async for m in Message.objects.filter(chat__device_id=device)]
    in_zammad = await zammad_articles_by_message(zammad)
    assert_delivered("message in Zammad", messages, list(in_zammad.elements()))
    # ... and the retry found the late ticket instead of opening a second one.
    tickets = await ticket_count(zammad, device, 0)
    FIGURES.note(f"stalled ticket creation: {tickets} ticket(s) in Zammad for one chat")
    assert tickets == 1


async def ticket_count(zammad: FakeZammadServer, device: str, at_least: int) -> int:
    tickets = await asyncio.to_thread(zammad.tickets)
    count = sum(1 for ticket in tickets if device in ticket["title"])
    return count if count >= at_least else 0

"""The load generator's peers: device sockets that record every frame with its arrival time,
and a Zammad that posts signed webhooks with bounded concurrency.

Receiving is kept as cheap as possible while load runs (a timestamp and the raw text per frame);
frames are parsed after the measurement, so the generator's own CPU distorts latencies as little
as it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bench.payloads import Delivery

MESSAGE_PREFIX = '{"type": "chat.message"'
HISTORY_PREFIX = '{"type": "chat.history"'


@dataclass
class Sink:
    """Message frames received by all sockets of a fleet: counted, and an event set on each, so
    that the generator waits for frames instead of polling thousands of sockets."""

    count: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Socket:
    """One device's socket. ``frames`` holds (perf_counter at arrival, raw text)."""

    device: int
    url: str
    connection: ClientConnection | None = None
    started_at: float = 0.0
    opened_at: float | None = None  # handshake done
    history_at: float | None = None  # chat.history received: the socket is usable
    failure: str | None = None  # why it never became usable
    closed: str | None = None  # how it ended while it should have stayed open
    frames: list[tuple[float, str]] = field(default_factory=list)
    message_frames: int = 0
    reader: asyncio.Task[None] | None = None
    # (prefix, future): the reader resolves the future with the arrival time of the next frame
    # that starts with the prefix (see ``wait_frame``).
    watch: tuple[str, asyncio.Future[float]] | None = None
    sink: Sink | None = None

    @property
    def ready(self) -> bool:
        return self.history_at is not None and self.closed is None

    def expect(self, prefix: str) -> asyncio.Future[float]:
        """A future of the arrival time of the next frame starting with ``prefix``."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.watch = (prefix, future)
        return future


def _failure(error: BaseException) -> str:
    if isinstance(error, InvalidStatus):
        return f"handshake refused ({error.response.status_code})"
    if isinstance(error, ConnectionClosed):
        code = error.rcvd.code if error.rcvd is not None else "no close frame"
        return f"closed before chat.history ({code})"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, InvalidHandshake):
        return f"handshake error ({type(error).__name__})"
    if isinstance(error, OSError):
        name = errno.errorcode.get(error.errno or 0, type(error).__name__)
        return f"connect error ({name})"
    return f"{type(error).__name__}"


async def open_socket(
    socket: Socket,
    *,
    open_timeout: float,
    history_timeout: float,
    first_frame: str = HISTORY_PREFIX,
    delay: float = 0.0,
) -> Socket:
    """Connect (after ``delay`` s) and wait for the first frame (``chat.history`` from the chat
    server); then keep reading in the background."""
    if delay > 0:
        await asyncio.sleep(delay)
    socket.started_at = time.perf_counter()
    try:
        socket.connection = await connect(
            socket.url,
            open_timeout=open_timeout,
            # The server pings; the apps answer. Client pings would only add noise.
            ping_interval=None,
            # daphne declines permessage-deflate anyway; not offering it saves client memory.
            compression=None,
            close_timeout=2,
            max_queue=None,
            proxy=None,
        )
        socket.opened_at = time.perf_counter()
        raw = await asyncio.wait_for(socket.connection.recv(), history_timeout)
        now = time.perf_counter()
        if not isinstance(raw, str) or not raw.startswith(first_frame):
            socket.failure = f"first frame is not {first_frame}...}}"
            await socket.connection.close()
            return socket
        socket.history_at = now
        socket.frames.append((now, raw))
    except (TimeoutError, OSError, InvalidHandshake, ConnectionClosed) as error:
        socket.failure = _failure(error)
        if socket.connection is not None:
            with contextlib.suppress(Exception):
                await socket.connection.close()
        return socket
    socket.reader = asyncio.create_task(_read(socket))
    return socket


async def _read(socket: Socket) -> None:
    assert socket.connection is not None
    frames = socket.frames
    clock = time.perf_counter
    try:
        async for raw in socket.connection:
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", "replace")
            now = clock()
            frames.append((now, raw))
            if raw.startswith(MESSAGE_PREFIX):
                socket.message_frames += 1
                if socket.sink is not None:
                    socket.sink.count += 1
                    socket.sink.arrived.set()
            if socket.watch is not None and raw.startswith(socket.watch[0]):
                if not socket.watch[1].done():
                    socket.watch[1].set_result(now)
                socket.watch = None
    except ConnectionClosed as error:
        code = error.rcvd.code if error.rcvd is not None else "no close frame"
        socket.closed = f"closed by the server ({code})"
        return
    socket.closed = f"closed by the server ({socket.connection.close_code})"


def chat_path(region: str, language: str) -> Callable[[str], str]:
    """The chat server's socket path of a device."""
    return lambda device_id: f"/ws/v3/{region}/{language}/chat/{device_id}/"


class Fleet:
    """All device sockets of a run, one per device index. Device ``i`` connects to server
    process ``i % len(bases)``."""

    def __init__(
        self,
        bases: Sequence[str],
        path: Callable[[str], str],
        *,
        first_frame: str = HISTORY_PREFIX,
    ) -> None:
        self.bases = list(bases)
        self.path = path
        self.first_frame = first_frame
        self.sockets: dict[int, Socket] = {}
        self.sink = Sink()
        self._closing = False

    def sibling(self) -> Fleet:
        """An empty fleet to the same servers."""
        return Fleet(self.bases, self.path, first_frame=self.first_frame)

    def url(self, index: int, device_id: str, after: int | None = None) -> str:
        query = f"?after={after}" if after is not None else ""
        return f"{self.bases[index % len(self.bases)]}{self.path(device_id)}{query}"

    async def open(
        self,
        devices: Iterable[tuple[int, str]],
        *,
        open_timeout: float,
        history_timeout: float,
        after: dict[int, int] | None = None,
        spread_secs: float = 0.0,
    ) -> list[Socket]:
        """Open one socket per (index, device id): all at once, or spread evenly over
        ``spread_secs``; with ``after``, each resumes after that message id."""
        after = after or {}
        sockets = [
            Socket(index, self.url(index, device, after.get(index)), sink=self.sink)
            for index, device in devices
        ]
        for socket in sockets:
            self.sockets[socket.device] = socket
        step = spread_secs / len(sockets) if sockets else 0.0
        await asyncio.gather(
            *(
                open_socket(
                    socket,
                    open_timeout=open_timeout,
                    history_timeout=history_timeout,
                    first_frame=self.first_frame,
                    delay=number * step,
                )
                for number, socket in enumerate(sockets)
            )
        )
        return sockets

    def drop(self) -> int:
        """Abort every socket's TCP connection, with no close handshake (a phone losing its
        network); forget them. Returns how many were open."""
        dropped = 0
        for socket in self.sockets.values():
            if socket.reader is not None:
                socket.reader.cancel()
            if socket.connection is not None:
                socket.connection.transport.abort()
                dropped += 1
        self.sockets.clear()
        return dropped

    @property
    def ready(self) -> list[Socket]:
        return [socket for socket in self.sockets.values() if socket.ready]

    def message_frames(self) -> int:
        """Message frames received by this fleet's sockets so far, including sockets since
        closed or dropped."""
        return self.sink.count

    def closed_unexpectedly(self) -> Counter[str]:
        return Counter(
            socket.closed
            for socket in self.sockets.values()
            if socket.closed is not None and socket.history_at is not None
        )

    async def close(self) -> None:
        self._closing = True
        sockets = [s for s in self.sockets.values() if s.connection is not None]
        for socket in sockets:
            if socket.reader is not None:
                socket.reader.cancel()
        await asyncio.gather(
            *(self._close_one(socket) for socket in sockets), return_exceptions=True
        )
        self.sockets.clear()

    @staticmethod
    async def _close_one(socket: Socket) -> None:
        assert socket.connection is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(socket.connection.close(), 5)


@dataclass
class Sent:
    delivery: Delivery
    sent_at: float
    answered_at: float | None = None
    status: int | None = None
    outcome: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


async def post_one(
    session: aiohttp.ClientSession, url: str, sent: Sent, body: bytes | None = None
) -> None:
    """POST one delivery (its own body, or ``body``) and record the answer in ``sent``."""
    try:
        async with session.post(
            url, data=sent.delivery.body if body is None else body, headers=sent.delivery.headers
        ) as answer:
            text = await answer.read()
            sent.answered_at = time.perf_counter()
            sent.status = answer.status
            with contextlib.suppress(ValueError, AttributeError):
                sent.outcome = json.loads(text).get("outcome")
    except (aiohttp.ClientError, TimeoutError) as error:
        sent.answered_at = time.perf_counter()
        sent.error = type(error).__name__


def http_session(in_flight: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=in_flight),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


Deliver = Callable[[Sent], Awaitable[None]]
UrlOf = str | Callable[[Delivery], str]


async def send_all(
    deliveries: Sequence[Delivery], deliver: Deliver, *, concurrency: int
) -> list[Sent]:
    """Deliver every item as fast as the other end takes them, at most ``concurrency`` in
    flight, in order (a worker takes the next item as soon as its previous one is done)."""
    results: list[Sent] = []
    queue = iter(deliveries)

    async def worker() -> None:
        for delivery in queue:
            sent = Sent(delivery, time.perf_counter())
            results.append(sent)
            await deliver(sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def send_paced(
    deliveries: Sequence[Delivery], deliver: Deliver, *, rate: float, max_in_flight: int
) -> list[Sent]:
    """Deliver the items on a fixed schedule (``rate`` per second, whatever the answers take),
    as Zammad does for a busy team; only when ``max_in_flight`` are unanswered does the sender
    wait, and then it falls behind the schedule (the achieved rate shows it)."""
    results: list[Sent] = []
    slots = asyncio.Semaphore(max_in_flight)
    tasks: list[asyncio.Task[None]] = []

    async def one(sent: Sent) -> None:
        try:
            await deliver(sent)
        finally:
            slots.release()

    started = time.perf_counter()
    for index, delivery in enumerate(deliveries):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        sent = Sent(delivery, time.perf_counter())
        results.append(sent)
        tasks.append(asyncio.create_task(one(sent)))
    await asyncio.gather(*tasks)
    return results


def _url_of(url: UrlOf) -> Callable[[Delivery], str]:
    return (lambda delivery: url) if isinstance(url, str) else url


async def post_webhooks(
    url: UrlOf,
    deliveries: Sequence[Delivery],
    *,
    concurrency: int,
    timeout: float = 30,
) -> list[Sent]:
    """POST every delivery (to ``url``, or to ``url(delivery)``) as fast as the server takes
    them, at most ``concurrency`` in flight (``send_all``)."""
    url_of = _url_of(url)
    async with http_session(concurrency, timeout) as session:
        return await send_all(
            deliveries,
            lambda sent: post_one(session, url_of(sent.delivery), sent),
            concurrency=concurrency,
        )


async def post_webhooks_paced(
    url: UrlOf,
    deliveries: Sequence[Delivery],
    *,
    rate: float,
    max_in_flight: int,
    timeout: float = 30,
) -> list[Sent]:
    """POST the deliveries on a fixed schedule (``send_paced``)."""
    url_of = _url_of(url)
    async with http_session(max_in_flight, timeout) as session:
        return await send_paced(
            deliveries,
            lambda sent: post_one(session, url_of(sent.delivery), sent),
            rate=rate,
            max_in_flight=max_in_flight,
        )


def spread_over(count: int, seed: int = 6) -> Callable[[Delivery], int]:
    """Which of ``count`` server processes takes a delivery: fixed per article and independent
    of which process holds the device's socket (device ``i`` on process ``i % count``), so that
    about ``1 - 1/count`` of the pushes cross processes."""
    return lambda delivery: random.Random(seed * 1_000_003 + delivery.article_id).randrange(count)


def parse_frame(raw: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None

"""Run an aiohttp application on its own event loop in a background thread.

Tests use this to talk to a fake over real HTTP from sync and async code alike; the management
commands run the same applications in the foreground.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadedServer:
    """An aiohttp app served from a thread; ``call`` runs a coroutine on the server's loop."""

    def __init__(
        self,
        make_app: Callable[[], Awaitable[web.Application] | web.Application],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._make_app = make_app
        self.host = host
        self.port = port or free_port(host)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ThreadedServer:
        self._thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    async def _start(self) -> None:
        app = self._make_app()
        if not isinstance(app, web.Application):
            app = await app
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def close_listener(self) -> None:
        """Stop accepting connections (the service "goes down"); ``reopen_listener`` undoes it."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def reopen_listener(self) -> None:
        if self._site is None:
            await self._listen()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def serve_until_signal(
    app: web.Application, host: str, port: int, on_started: Callable[[str], None]
) -> None:
    """Serve ``app`` in the foreground until SIGINT or SIGTERM (the simulators' commands);
    ``on_started`` gets the URL, with the real port when ``port`` is 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        on_started(f"http://{host}:{runner.addresses[0][1]}")
        await stop.wait()
    finally:
        # The fakes release stalled calls and cancel pending webhooks on cleanup: no hang.
        await runner.cleanup()

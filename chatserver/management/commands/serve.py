from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Serve HTTP and WebSockets with daphne, configured as documented: access log off "
        "(requests are logged redacted by the server), WebSocket pings, the frame size limit. "
        "Equivalent to `daphne chatserver.asgi:application` with those flags."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--with-worker",
            action="store_true",
            help="run the background worker in this process (needed with the in-process "
            "channel layer, when REDIS_URL is not set)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        serve(options["host"], options["port"], with_worker=options["with_worker"])


def serve(host: str, port: int, *, with_worker: bool = False) -> None:
    # daphne.server installs Twisted's asyncio reactor on import: import it first.
    from daphne.server import Server
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from chatserver import chatbot, poll_cache, reads, zammad
    from chatserver.asgi import application
    from chatserver.worker import run_worker

    stop = asyncio.Event()
    # Listening for chat changes from the start, so that the first polls can be remembered
    # (from a task: the reactor's start-up calls run before its asyncio loop does).
    reactor.callWhenRunning(lambda: asyncio.ensure_future(poll_cache.start()))
    if with_worker:
        tasks: list[asyncio.Future[None]] = []

        def start_worker() -> None:
            tasks.append(asyncio.ensure_future(run_worker(stop)))

        reactor.callWhenRunning(start_worker)
        reactor.addSystemEventTrigger("before", "shutdown", stop.set)  # type: ignore[arg-type]

    async def close_sessions() -> None:
        await zammad.close_sessions()
        await chatbot.close_sessions()
        await poll_cache.close()
        await reads.close_pools()

    def closing_sessions() -> Deferred[None]:
        return Deferred.fromFuture(asyncio.ensure_future(close_sessions()))

    reactor.addSystemEventTrigger("before", "shutdown", closing_sessions)  # type: ignore[arg-type]
    interface = host.strip("[]")
    Server(
        application=application,
        endpoints=[
            f"tcp:port={port}:interface={interface.replace(':', chr(92) + ':')}"
            f":backlog={settings.LISTEN_BACKLOG}"
        ],
        signal_handlers=True,
        action_logger=None,
        ping_interval=settings.WS_PING_INTERVAL_SECS,
        ping_timeout=settings.WS_PING_INTERVAL_SECS * 2,
        websocket_handshake_timeout=settings.WS_HANDSHAKE_TIMEOUT_SECS,
        websocket_max_message_size=settings.WS_MAX_FRAME_BYTES,
        verbosity=0,
    ).run()

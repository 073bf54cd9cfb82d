from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from chatserver import chatbot, zammad
from chatserver.worker import run_worker


class Command(BaseCommand):
    help = (
        "Run a background worker: forwards messages to Zammad, asks the bot, posts answers and "
        "translations, retrying while Zammad or the bot is down. Any number may run at once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency", type=int, default=None, help="work items run at once (default 8)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(self._run(options["concurrency"]))

    async def _run(self, concurrency: int | None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await run_worker(stop, concurrency)
        finally:
            await zammad.close_sessions()
            await chatbot.close_sessions()

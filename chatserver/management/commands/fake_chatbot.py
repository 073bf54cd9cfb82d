"""Run the fake integreat-chat bot in the foreground, for development without the real one."""

from __future__ import annotations

import asyncio
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from chatserver.fakes.base import serve_until_signal
from chatserver.fakes.chatbot import ANSWER_PATHS, CONTROL_PREFIX, HEALTH_PATH, FakeChatbot


class Command(BaseCommand):
    help = (
        "Serve a fake integreat-chat bot over HTTP until interrupted. It answers "
        f"{ANSWER_PATHS[0]} with 'Automatic answer (<lang>): <last message>', translates "
        "'x' to '[<target>] x', hands over to a human when a message mentions 'human', and "
        "refuses a Content-Type other than exactly application/json, as the real bot does. "
        f"Point CHATBOT_URL at the printed URL. Controls: POST {CONTROL_PREFIX}configure, "
        f"GET {CONTROL_PREFIX}received, POST {CONTROL_PREFIX}reset, POST {CONTROL_PREFIX}release."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--port", type=int, default=0, help="port to listen on (default: 0, any free port)"
        )
        parser.add_argument(
            "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
        )
        parser.add_argument(
            "--answer-delay",
            type=float,
            default=0.0,
            metavar="SECS",
            help="seconds each answer takes (the real bot takes 15 to 20; default: 0)",
        )
        parser.add_argument(
            "--translate-delay",
            type=float,
            default=0.0,
            metavar="SECS",
            help="seconds each translation takes (default: 0)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        fake = FakeChatbot()
        try:
            fake.configure(
                answer_delay_secs=options["answer_delay"],
                translate_delay_secs=options["translate_delay"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        try:
            asyncio.run(self._serve(fake, options["host"], options["port"]))
        except OSError as exc:  # the port is taken, the address is not ours
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']}: {exc}"
            ) from exc

    async def _serve(self, fake: FakeChatbot, host: str, port: int) -> None:
        def started(url: str) -> None:
            self.stdout.write(f"Fake chat bot at {url} (health: {url}{HEALTH_PATH}); Ctrl-C stops")
            self.stdout.flush()

        await serve_until_signal(fake.make_app(), host, port, started)

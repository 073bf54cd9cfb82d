"""Run the fake Zammad in the foreground, for development and demos without a real Zammad."""

from __future__ import annotations

import asyncio
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from chatserver.fakes.base import serve_until_signal
from chatserver.fakes.zammad import AGENT_LOGIN, DEFAULT_TOKEN, INTEGRATION_LOGIN, FakeZammad


class Command(BaseCommand):
    help = (
        "Serve a fake Zammad over HTTP until interrupted: the REST calls the chat server makes "
        "(/api/v1/users/me, tickets, ticket_articles, ticket_attachment) with recorded shapes, "
        "token checks (403 without, 401 wrong) and a webhook emitter like Integreat's trigger. "
        f"The API token belongs to {INTEGRATION_LOGIN}; agent replies are written by "
        f"{AGENT_LOGIN}. An agent console is at /__fake__/, JSON controls under /__fake__/ "
        "(tickets/<id>/reply, tickets/<id>/close, fail, down, up, webhook, delivery_mode, "
        "deliveries/release, received, deliveries, state, reset)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--port", type=int, default=0, help="port to listen on (default: 0, any free port)"
        )
        parser.add_argument(
            "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
        )
        parser.add_argument(
            "--token",
            default=DEFAULT_TOKEN,
            help=f"the API token to accept (default: {DEFAULT_TOKEN})",
        )
        parser.add_argument(
            "--webhook-url",
            metavar="URL",
            help="where to POST webhooks, e.g. http://127.0.0.1:8000/api/v3/webhook/zammad/"
            "?token=... (default: no webhooks until PUT /__fake__/webhook)",
        )
        parser.add_argument(
            "--signature-secret",
            metavar="SECRET",
            help="sign webhooks with X-Hub-Signature: sha1=<hmac> using this secret",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        fake = FakeZammad(
            token=options["token"],
            webhook_url=options["webhook_url"],
            signature_secret=options["signature_secret"],
        )
        try:
            asyncio.run(self._serve(fake, options["host"], options["port"]))
        except OSError as exc:  # the port is taken, the address is not ours
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']}: {exc}"
            ) from exc

    async def _serve(self, fake: FakeZammad, host: str, port: int) -> None:
        def started(url: str) -> None:
            fake.public_url = url  # attachment URLs in webhook payloads point here
            lines = [
                f"Fake Zammad at {url} (token {fake.token!r}); Ctrl-C stops",
                f"Agent console   {url}/__fake__/",
                f"Webhook         {fake.webhook.url or 'none (PUT /__fake__/webhook to set)'}",
            ]
            self.stdout.write("\n".join(lines))
            self.stdout.flush()

        await serve_until_signal(fake.make_app(), host, port, started)

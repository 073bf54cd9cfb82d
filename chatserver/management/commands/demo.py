from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from chatserver.fakes.chatbot import FakeChatbot
from chatserver.fakes.zammad import FakeZammad
from chatserver.management.commands.serve import serve
from chatserver.models import Region

DEMO_ZAMMAD_TOKEN = "demo-zammad-token"
DEMO_WEBHOOK_TOKEN = "demo-webhook-token"
DEMO_SIGNATURE_SECRET = "demo-signature-secret"


class Command(BaseCommand):
    help = (
        "Run everything on one machine with embedded defaults: migrate the database, start the "
        "bundled Zammad and chat bot simulators, create the demo region `demo`, and serve with "
        "an in-process worker. For development and evaluation only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument(
            "--bot-delay",
            type=float,
            default=2.0,
            help="seconds the simulated bot takes per answer",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = options["host"], options["port"]
        base = f"http://{host}:{port}"
        call_command("migrate", verbosity=0, interactive=False)
        webhook_url = f"{base}/api/v3/webhook/zammad/?token={DEMO_WEBHOOK_TOKEN}"
        zammad = FakeZammad.start_threaded(
            host=host,
            token=DEMO_ZAMMAD_TOKEN,
            webhook_url=webhook_url,
            signature_secret=DEMO_SIGNATURE_SECRET,
        )
        bot = FakeChatbot.start_threaded(host=host)
        bot.configure(answer_delay_secs=options["bot_delay"])
        if not settings.CHATBOT_URL:
            settings.CHATBOT_URL = bot.url
        Region.objects.update_or_create(
            slug="demo",
            defaults={
                "name": "Demo region",
                "default_language": "de",
                "chat_enabled": True,
                "zammad_url": zammad.url,
                "zammad_token": DEMO_ZAMMAD_TOKEN,
                "webhook_token": DEMO_WEBHOOK_TOKEN,
                "signature_secret": DEMO_SIGNATURE_SECRET,
                "beta_percentage": 100,
            },
        )
        chat = f"{base}/api/v3/demo/en/chat/my-device-1/"
        # The browser demo client at /demo/, its agent console, and its WebSocket origin.
        console = f"{zammad.url}/__fake__/"
        settings.CHAT_DEMO_PAGE = True
        settings.CHAT_DEMO_ZAMMAD_CONSOLE_URL = console
        settings.WS_ALLOWED_ORIGINS = [
            *settings.WS_ALLOWED_ORIGINS,
            *(f"http://{name}:{port}" for name in {host, "127.0.0.1", "localhost"}),
        ]
        self.stdout.write(
            "\n".join(
                [
                    "",
                    f"Demo page       {base}/demo/  (browser chat and agent console)",
                    f"Chat server     {base}/",
                    f"Fake Zammad     {console}  (answer as a counsellor here)",
                    f"Fake chat bot   {settings.CHATBOT_URL}/",
                    f"Admin           {base}/admin/  (python manage.py createsuperuser)",
                    "",
                    "Try it:",
                    f"  curl -s -X POST -F 'message=Hello, I need help' {chat}",
                    f"  curl -s {chat}",
                    f"  websocket: ws://{host}:{port}/ws/v3/demo/en/chat/my-device-1/",
                    "",
                ]
            )
        )
        try:
            serve(host, port, with_worker=True)
        finally:
            zammad.stop()
            bot.stop()

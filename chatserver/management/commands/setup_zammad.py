"""One-time Zammad setup for a region, through Zammad's API, idempotent (everything by name)."""

from __future__ import annotations

import asyncio
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatserver import zammad
from chatserver.actions import AUTOMATIC_SUBJECT
from chatserver.errors import UpstreamError
from chatserver.models import Region
from chatserver.zammad import ZammadClient

WEBHOOK_NAME = "Integreat chat server"
TRIGGER_NAME = "Notify Integreat chat server on ticket update"

TICKET_ATTRIBUTES: list[dict[str, Any]] = [
    {
        "name": name,
        "object": "Ticket",
        "display": display,
        "data_type": "boolean",
        "data_option": {"default": default, "options": {"true": "yes", "false": "no"}},
        "active": True,
        "screens": {},
        "position": position,
    }
    for name, display, default, position in (
        ("automatic_answers", "Automatic answers", True, 1200),
        ("evaluation_consent", "Evaluation consent", False, 1201),
    )
]


class Command(BaseCommand):
    help = (
        "Set up a region's Zammad for the chat server through Zammad's API: the ticket group, "
        "the ticket attributes automatic_answers and evaluation_consent, a webhook to this "
        "server with the region's signature secret, and the trigger that calls it on every "
        "ticket update whose article subject does not contain the bot's marker. Idempotent: "
        "existing items (by name) are updated. The region's token needs admin permissions "
        "(admin.group, admin.object, admin.webhook, admin.trigger)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="the region, as given to create_region --slug")
        parser.add_argument(
            "--server-url",
            required=True,
            help="this chat server's public base URL, e.g. https://chat.example.org",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        region = Region.objects.filter(slug=options["slug"]).first()
        if region is None or not region.zammad_url or not region.zammad_token:
            raise CommandError("No such region with a Zammad URL and token; see create_region.")
        webhook_url = (
            f"{options['server_url'].rstrip('/')}/api/v3/webhook/zammad/?token="
            f"{region.webhook_token}"
        )
        try:
            lines = asyncio.run(provision(region, webhook_url))
        except UpstreamError as error:
            raise CommandError(f"Zammad refused the setup: {error}") from error
        for line in lines:
            self.stdout.write(line)


async def provision(region: Region, webhook_url: str) -> list[str]:
    client = ZammadClient(region.zammad_url, region.zammad_token)
    try:
        group = await _ensure(client, "groups", {"name": region.ticket_group, "active": True})
        for attribute in TICKET_ATTRIBUTES:
            await _ensure(client, "object_manager_attributes", attribute)
        await client.execute_attribute_migrations()
        webhook = await _ensure(
            client,
            "webhooks",
            {
                "name": WEBHOOK_NAME,
                "endpoint": webhook_url,
                "http_method": "post",
                "signature_token": region.signature_secret or None,
                "ssl_verify": True,
                "active": True,
                "note": f"Integreat chat, region {region.slug}",
            },
        )
        await _ensure(
            client,
            "triggers",
            {
                "name": TRIGGER_NAME,
                "activator": "action",
                "execution_condition_mode": "always",
                "condition": {
                    "ticket.action": {"operator": "is", "value": "update"},
                    "ticket.group_id": {"operator": "is", "value": [str(group["id"])]},
                    "article.subject": {"operator": "contains not", "value": AUTOMATIC_SUBJECT},
                },
                "perform": {"notification.webhook": {"webhook_id": webhook["id"]}},
                "active": True,
                "note": "Pushes counsellors' replies to the Integreat chat server",
            },
        )
    finally:
        await zammad.close_sessions()
    return [
        f"group {region.ticket_group!r}: ok",
        "ticket attributes automatic_answers, evaluation_consent: ok",
        f"webhook {WEBHOOK_NAME!r} -> {webhook_url.split('?')[0]}?token=…: ok",
        f"trigger {TRIGGER_NAME!r}: ok",
    ]


async def _ensure(client: ZammadClient, kind: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """Create ``kind`` named ``attributes["name"]``, or update the one that exists."""
    for item in await client.list_resources(kind):
        if item.get("name") == attributes["name"]:
            if kind == "object_manager_attributes":
                return item  # changing an attribute's type needs a migration; leave it be
            return await client.update_resource(kind, int(item["id"]), attributes)
    return await client.create_resource(kind, attributes)

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from chatserver.models import Region


class Command(BaseCommand):
    help = (
        "Create or update a region (idempotent): enabled unless --disable. "
        "Secrets are stored, never printed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--slug", required=True)
        parser.add_argument("--name", required=True)
        parser.add_argument("--default-language", required=True)
        parser.add_argument("--zammad-url", required=True, help="base URL, without /api/v1")
        parser.add_argument("--zammad-token", required=True)
        parser.add_argument("--webhook-token", required=True, help="?token= of the webhook URL")
        parser.add_argument("--signature-secret", default="", help="HMAC secret of the webhook")
        parser.add_argument("--ticket-group", default="integreat-chat")
        parser.add_argument(
            "--beta-percentage", type=int, default=100, choices=range(101), metavar="0..100"
        )
        parser.add_argument("--privacy-policy-url", default="")
        parser.add_argument("--disable", action="store_true", help="store it with chat disabled")

    def handle(self, *args: Any, **options: Any) -> None:
        region, created = Region.objects.update_or_create(
            slug=options["slug"],
            defaults={
                "name": options["name"],
                "default_language": options["default_language"],
                "zammad_url": options["zammad_url"].rstrip("/"),
                "zammad_token": options["zammad_token"],
                "webhook_token": options["webhook_token"],
                "signature_secret": options["signature_secret"],
                "ticket_group": options["ticket_group"],
                "beta_percentage": options["beta_percentage"],
                "privacy_policy_url": options["privacy_policy_url"],
                "chat_enabled": not options["disable"],
            },
        )
        state = "enabled" if region.chat_enabled else "disabled"
        self.stdout.write(f"{'Created' if created else 'Updated'} region {region.slug} ({state}).")

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatserver import chatbot, health, zammad
from chatserver.models import Region

OK, FAIL, NOTE = "ok", "FAIL", "note"
Line = tuple[str, str]


class Command(BaseCommand):
    help = (
        "Check that a region can chat: call its Zammad with the stored token (users/me) and the "
        "bot's health (when CHATBOT_URL is set), and say in plain words what is wrong. One line "
        "per check; exit status 0 when all is well, 1 otherwise (also for an unknown region). "
        "Tokens are never printed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="the region's slug, as given to create_region --slug")
        parser.add_argument(
            "--timeout",
            type=float,
            default=None,
            metavar="SECS",
            help="how long to wait for each answer (default: ZAMMAD_TIMEOUT_SECS, 10)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        slug: str = options["slug"]
        region = Region.objects.filter(slug=slug).first()
        if region is None:
            known = ", ".join(Region.objects.order_by("slug").values_list("slug", flat=True))
            raise CommandError(
                f"There is no region {slug!r}. "
                + (f"Known regions: {known}. " if known else "No region exists yet. ")
                + "Add or update one with `python manage.py create_region`."
            )
        timeout: float = options["timeout"] or float(settings.ZAMMAD_TIMEOUT_SECS)
        results = asyncio.run(region_report(region, timeout))
        for outcome, line in results:
            self.stdout.write(f"{outcome:<4}  {line}")
        checks = [outcome for outcome, _ in results if outcome != NOTE]
        failures = checks.count(FAIL)
        if failures:
            raise CommandError(
                f"Region {region.slug}: {failures} of {len(checks)} checks failed.", returncode=1
            )
        self.stdout.write(f"Region {region.slug}: all {len(checks)} checks passed.")


async def region_report(region: Region, timeout_secs: float) -> list[Line]:
    """One line per check, in plain words (also the admin's "check connection" action)."""
    try:
        zammad_result, bot_result = await asyncio.gather(
            _check_zammad(region, timeout_secs), _check_bot(timeout_secs)
        )
    finally:
        await zammad.close_sessions()
        await chatbot.close_sessions()
    return [_region_line(region), zammad_result, _group_line(region), bot_result]


async def _check_zammad(region: Region, timeout_secs: float) -> Line:
    if not region.zammad_url or not region.zammad_token:
        missing = "URL" if not region.zammad_url else "token"
        return FAIL, (
            f"Zammad: the region has no Zammad {missing}; set it with "
            "`create_region` or in the admin"
        )
    where = _address(region.zammad_url)
    check, user = await health.check_zammad(
        region.zammad_url, region.zammad_token, timeout_secs=timeout_secs
    )
    if not check["ok"]:
        return FAIL, f"Zammad at {where}: {check['detail']}"
    assert user is not None
    return OK, (
        f"Zammad at {where} accepted the token; tickets are opened as user "
        f"{user['login']!r} (id {user['id']})"
    )


async def _check_bot(timeout_secs: float) -> Line:
    url: str = settings.CHATBOT_URL
    if not url:
        return NOTE, "Bot: not configured (CHATBOT_URL is unset): no automatic answers"
    check = await health.check_bot(url, timeout_secs=timeout_secs)
    if not check["ok"]:
        return FAIL, f"Bot at {_address(url)}: {check['detail']}"
    return OK, f"Bot at {_address(url)} is healthy"


def _region_line(region: Region) -> Line:
    if not region.chat_enabled:
        return NOTE, (
            f"Region {region.slug}: chat is switched off (the apps are told it is not enabled); "
            "switch it on with `create_region` (without --disable) or in the admin"
        )
    return (
        NOTE,
        f"Region {region.slug}: chat is switched on for {region.beta_percentage}% of devices",
    )


def _group_line(region: Region) -> Line:
    # The Zammad client has no call that lists groups (and the fake Zammad has no such route);
    # a missing group shows up as a 422 when the first ticket is opened.
    return NOTE, (
        f"Ticket group {region.ticket_group!r}: not checked here; if it does not exist in "
        "Zammad, opening a ticket fails with HTTP 422"
    )


def _address(url: str) -> str:
    """Scheme, host and port of a URL: never user, password, path or query."""
    scheme = url.split("://", 1)[0] if "://" in url else "http"
    return f"{scheme}://{health.host_port(url, default_port=None)}"

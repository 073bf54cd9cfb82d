"""Admin: configure regions, read chats, watch background work and webhook deliveries.

Secrets (Zammad token, webhook token, signature secret) never appear in list views.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from .models import BetaRoll, Chat, Message, Region, WebhookDelivery, Work


@admin.register(Region)
class RegionAdmin(admin.ModelAdmin[Region]):
    list_display = ("slug", "name", "default_language", "chat_enabled", "zammad_url", "configured")
    search_fields = ("slug", "name")
    actions = ["check_connection"]
    fieldsets = (
        (None, {"fields": ("slug", "name", "default_language", "chat_enabled")}),
        ("Zammad", {"fields": ("zammad_url", "zammad_token", "ticket_group")}),
        ("Webhook", {"fields": ("webhook_token", "signature_secret")}),
        ("Rollout", {"fields": ("beta_percentage", "privacy_policy_url")}),
    )

    @admin.display(boolean=True)
    def configured(self, region: Region) -> bool:
        return region.is_configured

    @admin.action(description="Check connection (Zammad and bot)")
    def check_connection(self, request: HttpRequest, queryset: QuerySet[Region]) -> None:
        """Calls each region's Zammad and the bot, and says in plain words what is wrong."""
        from .management.commands.check_region import FAIL, OK, region_report

        levels = {OK: messages.SUCCESS, FAIL: messages.ERROR}
        for region in queryset:
            lines = async_to_sync(region_report)(region, float(settings.ZAMMAD_TIMEOUT_SECS))
            for outcome, line in lines:
                self.message_user(request, line, levels.get(outcome, messages.INFO))


class MessageInline(admin.TabularInline[Message, Chat]):
    model = Message
    extra = 0
    fields = ("id", "role", "automatic", "status", "content", "zammad_article_id", "created_at")
    readonly_fields = fields
    can_delete = False
    show_change_link = True


class WorkInline(admin.TabularInline[Work, Chat]):
    model = Work
    extra = 0
    fields = ("id", "kind", "state", "attempts", "run_after", "last_error")
    readonly_fields = fields
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Work]:
        return super().get_queryset(request).exclude(state=Work.State.DONE)


@admin.register(Chat)
class ChatAdmin(admin.ModelAdmin[Chat]):
    list_display = (
        "id",
        "region",
        "device",
        "language",
        "zammad_ticket_id",
        "is_current",
        "last_activity_at",
    )
    list_filter = ("region", "is_current", "language")
    search_fields = ("device_id__startswith", "=zammad_ticket_id")
    readonly_fields = ("device_id", "version", "last_message_id", "ignored_article_ids")
    inlines = [MessageInline, WorkInline]

    @admin.display(description="device")
    def device(self, chat: Chat) -> str:
        return chat.device_id[:8]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin[Message]):
    list_display = ("id", "chat", "role", "automatic", "status", "zammad_article_id", "created_at")
    list_filter = ("status", "role", "automatic")
    raw_id_fields = ("chat", "translation_of")


@admin.register(Work)
class WorkAdmin(admin.ModelAdmin[Work]):
    list_display = ("id", "kind", "chat", "state", "attempts", "run_after", "last_error")
    list_filter = ("state", "kind", "lane")
    raw_id_fields = ("chat", "message")
    actions = ["retry"]

    @admin.action(description="Retry now")
    def retry(self, request: HttpRequest, queryset: QuerySet[Work]) -> None:
        count = queryset.exclude(state=Work.State.RUNNING).update(
            state=Work.State.QUEUED, run_after=timezone.now(), finished_at=None
        )
        self.message_user(request, f"{count} item(s) queued again.", messages.SUCCESS)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin[WebhookDelivery]):
    list_display = ("received_at", "region", "delivery_id", "ticket_id", "article_id", "outcome")
    list_filter = ("region", "outcome")
    search_fields = ("=delivery_id", "=ticket_id")


@admin.register(BetaRoll)
class BetaRollAdmin(admin.ModelAdmin[BetaRoll]):
    list_display = ("region", "device", "enabled", "created_at")
    list_filter = ("region", "enabled")

    @admin.display(description="device")
    def device(self, roll: BetaRoll) -> str:
        return roll.device_id[:8]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

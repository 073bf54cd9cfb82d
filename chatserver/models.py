"""The server's own store: the truth that REST answers and socket resumes are served from.

Every message a device may see is a ``Message`` with an id that only grows. Messages of one chat
are only ever inserted while the chat row is locked (``actions.locked_chat``), so within a chat the
commit order is the id order and ``after={id}`` can never skip a message.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


def new_webhook_token() -> str:
    return secrets.token_urlsafe(32)


def new_attachment_token() -> str:
    return secrets.token_urlsafe(32)


class Region(models.Model):
    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    default_language = models.CharField(max_length=16, default="de")
    chat_enabled = models.BooleanField(default=True)
    zammad_url = models.URLField(max_length=256, blank=True)
    zammad_token = models.CharField(max_length=200, blank=True)
    webhook_token = models.CharField(max_length=200, unique=True, default=new_webhook_token)
    signature_secret = models.CharField(
        max_length=200, blank=True, help_text="HMAC-SHA1 secret of Zammad's webhook (optional)"
    )
    ticket_group = models.CharField(max_length=100, default="integreat-chat")
    beta_percentage = models.PositiveSmallIntegerField(
        default=100, validators=[MaxValueValidator(100)]
    )
    privacy_policy_url = models.URLField(max_length=512, blank=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_configured(self) -> bool:
        return bool(self.chat_enabled and self.zammad_url and self.zammad_token)

    def ticket_url(self, ticket_id: int) -> str:
        return f"{self.zammad_url.rstrip('/')}/#ticket/zoom/{ticket_id}"


class BetaRoll(models.Model):
    """The one-time roll of ``is_chat_enabled`` for a device in a region."""

    region = models.ForeignKey(Region, on_delete=models.CASCADE, related_name="beta_rolls")
    device_id = models.CharField(max_length=64)
    enabled = models.BooleanField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["region", "device_id"], name="beta_roll_per_device")
        ]

    def __str__(self) -> str:
        return f"{self.region_id}/{self.device_id[:8]}: {self.enabled}"


def device_key(device_id: str) -> str:
    """A fixed-length digest of a device id, for group names and keys built from ids only."""
    return hashlib.sha256(device_id.encode()).hexdigest()[:32]


class Chat(models.Model):
    region = models.ForeignKey(Region, on_delete=models.CASCADE, related_name="chats")
    device_id = models.CharField(max_length=64)
    language = models.CharField(max_length=16)
    is_current = models.BooleanField(default=True)
    zammad_ticket_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_activity_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    automatic_answers = models.BooleanField(default=True)
    evaluation_consent = models.BooleanField(default=False)
    bot_typing = models.BooleanField(default=False)
    # Bumped on every change a client can see; with the chat id it makes the REST ETag.
    version = models.PositiveBigIntegerField(default=0)
    last_message_id = models.BigIntegerField(default=0)
    # Zammad articles that are not messages (internal notes, translations of questions):
    # remembered so that a webhook listing them does not trigger a reconciliation each time.
    ignored_article_ids = models.JSONField(default=list, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["region", "device_id"],
                condition=Q(is_current=True),
                name="one_current_chat_per_device",
            ),
            models.UniqueConstraint(
                fields=["region", "zammad_ticket_id"],
                condition=Q(zammad_ticket_id__isnull=False),
                name="one_chat_per_ticket",
            ),
        ]
        indexes = [models.Index(fields=["region", "device_id", "is_current"])]

    def __str__(self) -> str:
        return f"{self.region.slug}/{self.device_id[:8]} #{self.pk}"

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= timezone.now()

    @staticmethod
    def expiry_from(now: Any) -> Any:
        return now + timedelta(days=settings.CHAT_EXPIRY_DAYS)


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        AGENT = "agent"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"

    chat = models.ForeignKey(Chat, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=8, choices=Role.choices)
    content = models.TextField(help_text="HTML as clients see it: escaped or sanitised")
    automatic = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    zammad_article_id = models.BigIntegerField(null=True, blank=True)
    # NULL, not "": the unique constraint holds only where a client sent one.
    client_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    translation_of = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="translation"
    )
    # [{"name", "size", "mime_type", "token", "article_id", "attachment_id"}]
    attachments = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["chat", "zammad_article_id"],
                condition=Q(zammad_article_id__isnull=False),
                name="one_message_per_article",
            ),
            models.UniqueConstraint(
                fields=["chat", "client_id"],
                condition=Q(client_id__isnull=False),
                name="one_message_per_client_id",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} message {self.pk}"


class Upload(models.Model):
    """A device's attachment, kept until Zammad has it (then it is served from Zammad)."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="uploads")
    token = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    mime_type = models.CharField(max_length=100)
    data = models.BinaryField()

    def __str__(self) -> str:
        return self.name


class Work(models.Model):
    """Durable background work: a transactional outbox, claimed with row locks by workers.

    Within a chat and a lane, items run strictly in id order: an item is only claimed when no
    earlier item of the same chat and lane is still queued or running.
    """

    class Kind(models.TextChoices):
        FORWARD_MESSAGE = "forward_message"  # a device message -> customer article
        POST_MESSAGE = "post_message"  # a bot answer or reply translation -> public article
        TRANSLATE_QUESTION = "translate_question"  # -> internal article for counsellors
        ANSWER = "answer"  # ask the bot; the answer becomes a message + POST_MESSAGE
        TRANSLATE_REPLY = "translate_reply"  # counsellor reply -> message + POST_MESSAGE
        SET_ATTRIBUTES = "set_attributes"  # ticket attributes (consent, automatic answers)
        SYNC_TICKET = "sync_ticket"  # reconcile with Zammad's article list

    class Lane(models.TextChoices):
        ZAMMAD = "zammad"  # ordered writes to the ticket
        BOT = "bot"  # slow bot calls, never holding up the ticket's writes
        SYNC = "sync"

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    lane = models.CharField(max_length=8, choices=Lane.choices)
    chat = models.ForeignKey(Chat, on_delete=models.CASCADE, related_name="work")
    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.CASCADE, related_name="work"
    )
    payload = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=8, choices=State.choices, default=State.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    run_after = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "work"
        indexes = [
            models.Index(
                fields=["state", "run_after"],
                name="work_due",
                condition=Q(state__in=["queued", "running"]),
            ),
            models.Index(fields=["chat", "lane", "state"], name="work_chat_lane"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk} ({self.state})"


class WebhookDelivery(models.Model):
    region = models.ForeignKey(Region, on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001
    received_at = models.DateTimeField(default=timezone.now)
    ticket_id = models.BigIntegerField(null=True, blank=True)
    article_id = models.BigIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=32)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["region", "delivery_id"],
                condition=Q(delivery_id__isnull=False),
                name="one_delivery_per_id",
            )
        ]
        indexes = [models.Index(fields=["received_at"])]

    def __str__(self) -> str:
        return f"{self.delivery_id or '(no id)'}: {self.outcome}"

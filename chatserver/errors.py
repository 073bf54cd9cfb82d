"""Typed errors with codes, mapped to REST answers, error frames and close codes in one place.

Actions raise these; views and consumers only translate them (``rest_response``, ``error_frame``).
Errors of external services are the separate ``UpstreamError`` family: they are never shown to
clients, only decide whether background work is retried.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChatError(Exception):
    """A request the server refuses, with what every edge needs to say so."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 400
    close_code: ClassVar[int | None] = None
    message: ClassVar[str] = "Bad request."

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.message
        super().__init__(self.detail)

    def rest_body(self) -> dict[str, Any]:
        return {"error": self.detail}


class NotFound(ChatError):
    code = "not_found"
    http_status = 404
    close_code = 4404
    message = "Not found."


class InvalidPath(NotFound):
    """A malformed device id or language: a 404 over REST, close 4400 on a socket."""

    close_code = 4400


class ChatNotFound(NotFound):
    code = "chat_not_found"
    message = "Chat not found."


class AttachmentNotFound(NotFound):
    message = "Attachment not found."


class NotConfigured(ChatError):
    code = "not_configured"
    http_status = 503
    close_code = 4503
    message = "No chat server is configured for your region."


class InvalidMessage(ChatError):
    code = "invalid_message"
    message = "The message is empty."


class InvalidAttachment(InvalidMessage):
    code = "invalid_attachment"


class InvalidFrame(ChatError):
    code = "invalid_frame"
    message = "The frame is not a JSON object with a known type."


class InvalidWebhook(ChatError):
    code = "invalid_webhook"


class WebhookUnauthorized(ChatError):
    code = "unauthorized"
    http_status = 401
    message = "Invalid signature."


class PayloadTooLarge(ChatError):
    code = "too_large"
    http_status = 413
    message = "The request body is too large."


class RateLimited(ChatError):
    code = "rate_limited"
    http_status = 429
    close_code = 4429
    message = "Too many requests."

    def __init__(self, retry_after_secs: int, detail: str | None = None) -> None:
        super().__init__(detail)
        self.retry_after_secs = max(1, retry_after_secs)


class Unavailable(ChatError):
    """The database is unreachable: nothing can be stored now, so nothing is acknowledged."""

    code = "unavailable"
    http_status = 503
    close_code = 1013  # try again later
    message = "The chat server is temporarily unavailable. Please try again later."


INTERNAL_ERROR_TEXT = "An error occurred while attempting to connect to the chat server."


class UpstreamError(Exception):
    """A call to Zammad or the bot failed. ``temporary`` decides retry versus giving up."""

    temporary: ClassVar[bool] = True

    def __init__(self, service: str, detail: str, status: int | None = None) -> None:
        self.service = service
        self.detail = detail
        self.status = status
        super().__init__(str(self))

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.service}: {self.detail}{status}"


class TemporaryUpstreamError(UpstreamError):
    """Down, slow, 5xx, garbage: try again later."""


class PermanentUpstreamError(UpstreamError):
    """Refused for good (401/403/404/422): retrying cannot help."""

    temporary = False

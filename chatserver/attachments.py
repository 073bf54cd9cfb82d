"""Attachments: what a device may upload (checked by content, not by the declared type), and
how an owner downloads one (streamed from Zammad, or from the server while Zammad has not got it
yet)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile

from .errors import AttachmentNotFound, InvalidAttachment, PermanentUpstreamError
from .zammad import ZammadClient

if TYPE_CHECKING:
    from .actions import AttachmentRef

SNIFF_BYTES = 4096


@dataclass(frozen=True)
class NewAttachment:
    name: str
    mime_type: str
    data: bytes


def sniff(head: bytes) -> str | None:
    """The type of a file by its first bytes; None for anything not recognised."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if _is_text(head):
        return "text/plain"
    return None


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut off by the sniffing window is still text.
        if error.start < len(head) - 3:
            return False
    return True


def safe_name(name: str | None) -> str:
    """A file name without paths or control characters, at most 200 characters."""
    base = (name or "attachment").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(char for char in base if char.isprintable() and char not in '"<>|*?:')
    return cleaned.strip()[:200] or "attachment"


def validate(files: Sequence[UploadedFile[Any]]) -> list[NewAttachment]:
    """The CMS's checks and texts: count, size, type (here by content)."""
    limit = settings.CHAT_ATTACHMENT_MAX_COUNT
    if len(files) > limit:
        raise InvalidAttachment(f"At most {limit} attachments can be sent per message.")
    accepted = []
    for upload in files:
        name = safe_name(upload.name)
        if upload.size is None or upload.size > settings.CHAT_ATTACHMENT_MAX_BYTES:
            raise InvalidAttachment(f"Attachment '{name}' exceeds the maximum allowed size.")
        data = b"".join(upload.chunks())
        if len(data) > settings.CHAT_ATTACHMENT_MAX_BYTES:
            raise InvalidAttachment(f"Attachment '{name}' exceeds the maximum allowed size.")
        mime_type = sniff(data[:SNIFF_BYTES]) if data else None
        if mime_type is None or mime_type not in settings.CHAT_ATTACHMENT_TYPES:
            raise InvalidAttachment(f"Attachment '{name}' has an unsupported file type.")
        accepted.append(NewAttachment(name=name, mime_type=mime_type, data=data))
    return accepted


async def single_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


@dataclass(frozen=True)
class Download:
    content_type: str
    content_length: int | None
    chunks: AsyncIterator[bytes]


async def open_download(ref: AttachmentRef) -> Download:
    """The file as a stream; from Zammad without holding it in memory whole."""
    if ref.data is not None:
        return Download(ref.mime_type, len(ref.data), single_chunk(ref.data))
    if ref.ticket_id is None or ref.article_id is None or ref.attachment_id is None:
        raise AttachmentNotFound
    stack = contextlib.AsyncExitStack()
    client = ZammadClient(ref.region.zammad_url, ref.region.zammad_token)
    try:
        stream = await stack.enter_async_context(
            client.open_attachment(ref.ticket_id, ref.article_id, ref.attachment_id)
        )
    except PermanentUpstreamError as error:
        await stack.aclose()
        raise AttachmentNotFound from error
    except BaseException:
        await stack.aclose()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        async with stack:
            async for chunk in stream.chunks():
                yield chunk

    return Download(stream.content_type or ref.mime_type, stream.content_length, chunks())

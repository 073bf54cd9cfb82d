"""Attachments: upload checked by content and forwarded to Zammad; download by the owning
device only, streamed from Zammad byte for byte."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import AsyncClient

from chatserver.actions import enqueue
from chatserver.attachments import sniff
from chatserver.models import Chat, Message, Region, Upload, Work

from .conftest import drain

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = "attach-device-0001"
CHAT = f"/api/v3/augsburg/de/chat/{DEVICE}/"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)
PDF = b"%PDF-1.7\n" + os.urandom(5_000)


def png(name: str = "photo.png", data: bytes = PNG, content_type: str = "image/png") -> Any:
    return SimpleUploadedFile(name, data, content_type=content_type)


def body(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.content)
    return data


async def download(client: AsyncClient, url: str) -> tuple[int, bytes, Any]:
    response: Any = await client.get(url)
    if getattr(response, "streaming", False):
        content = b"".join([chunk async for chunk in response.streaming_content])
    else:
        content = response.content
    return response.status_code, content, response


async def test_upload_reaches_zammad_and_owner_downloads_it(region: Region, zammad: Any) -> None:
    client = AsyncClient()
    answer = await client.post(
        CHAT, {"message": "Mein Bescheid", "attachment": [png(), png("scan.pdf", PDF, "x/y")]}
    )
    assert answer.status_code == 200, answer.content
    [message] = body(answer)["messages"]
    assert [(a["name"], a["size"], a["mime_type"]) for a in message["attachments"]] == [
        ("photo.png", len(PNG), "image/png"),
        ("scan.pdf", len(PDF), "application/pdf"),
    ]
    # Before Zammad has it, the server serves its own copy.
    status, content, _ = await download(client, message["attachments"][0]["url"])
    assert (status, content) == (200, PNG)

    await drain()
    [ticket] = zammad.tickets()
    [article] = zammad.articles(ticket["id"])
    assert [(a["filename"], a["size"]) for a in article["attachments"]] == [
        ("photo.png", str(len(PNG))),
        ("scan.pdf", str(len(PDF))),
    ]
    assert await Upload.objects.acount() == 0  # the server's copies are gone

    data = body(await client.get(CHAT))
    for attachment, original in zip(data["messages"][0]["attachments"], (PNG, PDF), strict=True):
        status, content, response = await download(client, attachment["url"])
        assert status == 200
        assert content == original
        assert response["Content-Disposition"].startswith("attachment")
        assert response["X-Content-Type-Options"] == "nosniff"


async def test_agent_attachment_is_listed_and_streamed(region: Region, zammad: Any) -> None:
    client = AsyncClient()
    await client.post(CHAT, {"message": "Hallo"})
    await drain()
    [ticket] = zammad.tickets()
    article = zammad.agent_reply(
        ticket["id"],
        "<p>Das Formular</p>",
        attachments=[{"filename": "form.pdf", "data": PDF, "mime-type": "application/pdf"}],
    )
    # The reconciliation brings the article in with its attachment list.
    chat = await Chat.objects.aget()
    await sync_to_async(enqueue)(chat, Work.Kind.SYNC_TICKET)
    await drain()
    data = body(await client.get(CHAT))
    agent = data["messages"][-1]
    assert agent["content"] == "<p>Das Formular</p>"
    [listed] = agent["attachments"]
    assert (listed["name"], listed["size"], listed["mime_type"]) == (
        "form.pdf",
        len(PDF),
        "application/pdf",
    )
    status, content, response = await download(client, listed["url"])
    assert (status, content) == (200, PDF)
    assert response["Content-Type"] == "application/pdf"
    assert article["id"] > 0


async def test_wrong_owner_token_and_expired_chat_get_404(region: Region, zammad: Any) -> None:
    client = AsyncClient()
    data = body(await client.post(CHAT, {"message": "x", "attachment": png()}))
    url = data["messages"][0]["attachments"][0]["url"]
    token = url.rstrip("/").rsplit("/", 1)[-1]
    await client.post("/api/v3/augsburg/de/chat/other-device/", {"message": "mine"})
    for wrong in (
        f"/api/v3/augsburg/de/chat/other-device/attachments/{token}/",
        f"/api/v3/augsburg/de/chat/{DEVICE}/attachments/{token[:-1]}x/",
        f"/api/v3/augsburg/de/chat/{DEVICE}/attachments/guessed/",
        f"/api/v3/augsburg/de/chat/never-seen/attachments/{token}/",
    ):
        status, content, _ = await download(client, wrong)
        assert status == 404, wrong
        assert json.loads(content) == {"error": "Not found."}
    chat = await Chat.objects.aget(device_id=DEVICE)
    await Chat.objects.filter(pk=chat.pk).aupdate(expires_at=chat.created_at)
    status, _, _ = await download(client, url)
    assert status == 404


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            [png(data=b"MZ\x90\x00" + b"\x00" * 100, name="virus.png")],
            "Attachment 'virus.png' has an unsupported file type.",
        ),
        (
            [png(name="big.png", data=b"\x89PNG\r\n\x1a\n" + b"0" * (10 * 1024 * 1024))],
            "Attachment 'big.png' exceeds the maximum allowed size.",
        ),
        ([png(f"{n}.png") for n in range(4)], "At most 3 attachments can be sent per message."),
        (
            [png(name="../../etc/passwd", data=b"")],
            "Attachment 'passwd' has an unsupported file type.",
        ),
    ],
)
async def test_bad_attachments_are_refused_and_nothing_is_stored(
    region: Region, zammad: Any, files: list[Any], error: str
) -> None:
    answer = await AsyncClient().post(CHAT, {"message": "x", "attachment": files})
    assert answer.status_code == 400
    assert body(answer) == {"error": error}
    assert await Message.objects.acount() == 0
    assert await Upload.objects.acount() == 0


async def test_exactly_10_mib_is_accepted(region: Region) -> None:
    data = b"%PDF-" + b"0" * (10 * 1024 * 1024 - 5)
    answer = await AsyncClient().post(CHAT, {"attachment": png("max.pdf", data, "application/pdf")})
    assert answer.status_code == 200
    [message] = body(answer)["messages"]
    assert message["content"] == ""
    assert message["attachments"][0]["size"] == 10 * 1024 * 1024


def test_sniffing() -> None:
    assert sniff(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff(b"GIF89a...") == "image/gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff("Grüße, مرحبا".encode()) == "text/plain"
    assert sniff("ü".encode()[:1]) == "text/plain"  # a character cut by the window
    assert sniff(b"text\x00with nul") is None
    assert sniff(b"\xfe\xff\xfe\xff garbage") is None

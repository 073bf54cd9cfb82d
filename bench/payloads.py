"""Zammad webhook deliveries as the real trigger sends them, built ahead of the load.

The payloads come from the repository's fake Zammad (its records and its webhook shaping, which
follow payloads recorded on a real Zammad), so they carry the full default shape: the ticket
with its users, group, priority and ``article_ids``, the article with its sender objects. Each
article is an agent's public reply whose body names its article id, so that the frame a device
receives can be matched to the webhook that caused it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from bench.stack import device_id, ticket_id
from chatserver.fakes.zammad import FakeZammad

ARTICLE_MARK = re.compile(r"bench-article-(\d+)\b")


@dataclass(frozen=True)
class Delivery:
    device: int  # index of the device whose chat owns the ticket
    article_id: int
    body: bytes
    headers: dict[str, str]


def article_body(article_id: int, device: int) -> str:
    return f"<p>Reply bench-article-{article_id} for device {device}.</p>"


def article_of(content: str) -> int | None:
    """The article id named in a pushed message's content."""
    match = ARTICLE_MARK.search(content)
    return int(match.group(1)) if match else None


def sign(body: bytes, secret: str) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def _headers(raw: bytes, secret: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Zammad User Agent",
        "X-Zammad-Trigger": "Notify Integreat CMS on ticket update",
        "X-Zammad-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature": sign(raw, secret),
    }


def unknown_ticket(secret: str) -> Delivery:
    """A change of a ticket no chat has (the server acknowledges and ignores it)."""
    raw = json.dumps({"article": {}, "ticket": {"id": 10**9}}, sort_keys=True).encode()
    return Delivery(-1, -1, raw, _headers(raw, secret))


class Zammad:
    """The fake Zammad's records, used offline: tickets ``1..devices`` in the order of the
    devices, articles from 101 on, and payloads exactly as its webhook emitter shapes them."""

    def __init__(self, devices: int, secret: str) -> None:
        self.fake = FakeZammad()
        self.secret = secret
        for index in range(devices):
            ticket = self.fake.create_ticket(
                {
                    "title": f"Integreat chat {device_id(index)}",
                    "group": "integreat-chat",
                    "customer_id": self.fake.integration_user["id"],
                },
                self.fake.integration_user,
            )
            if ticket["id"] != ticket_id(index):
                raise RuntimeError("the fake Zammad numbers tickets differently than expected")

    def agent_reply(self, device: int) -> Delivery:
        """Emma answers ``device`` in the Zammad UI; the delivery the trigger would send now
        (the ticket's ``article_ids`` as they are at this moment)."""
        fake = self.fake
        ticket = fake.tickets[ticket_id(device)]
        article_id = fake._next_article_id
        draft = fake.parse_article(
            {
                "body": article_body(article_id, device),
                "type": "note",
                "sender": "Agent",
                "internal": False,
                "content_type": "text/html",
            },
            fake.agent_user,
        )
        article = fake.store_article(ticket, draft, fake.agent_user)
        assert article["id"] == article_id
        payload: dict[str, Any] = {
            "article": fake._article_payload(article),
            "ticket": fake._ticket_payload(ticket),
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        raw = body.encode()
        headers = _headers(raw, self.secret)
        return Delivery(device, article_id, raw, headers)


def reference_frame(article_id: int, device: int, sent_at: float) -> bytes:
    """What a reference server pushes: shaped like the chat server's ``chat.message`` frame,
    with the article id, a content that names it (as the chat server's pushes do) and the
    generator's clock when it was sent."""
    frame = {
        "type": "chat.message",
        "message": {"id": article_id, "content": article_body(article_id, device), "sent": sent_at},
    }
    return json.dumps(frame).encode()


def burst(zammad: Zammad, devices: int, per_device: int) -> list[Delivery]:
    """``per_device`` replies for each device, round by round (every device's first reply
    before any second one), as a counsellor team answering many chats would produce them."""
    return [zammad.agent_reply(device) for _ in range(per_device) for device in range(devices)]

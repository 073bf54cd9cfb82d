"""The admin an operator lives in: a region's "check connection" action, chats by short device
id and ticket, failed work with a retry action, webhook deliveries; no secrets in list views."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from chatserver.models import Chat, Work

from .conftest import ZAMMAD_TOKEN, make_region

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator() -> Client:
    user = User.objects.create_superuser("operator", "op@example.org", "pw")
    client = Client()
    client.force_login(user)
    return client


def messages_of(response: Any) -> list[tuple[str, str]]:
    return [(message.level_tag, str(message)) for message in response.context["messages"]]


def test_check_connection_reports_in_plain_words(operator: Client, zammad: Any) -> None:
    good = make_region(zammad.url)
    bad = make_region(
        zammad.url, slug="wrong", webhook_token="w2", zammad_token="not-" + ZAMMAD_TOKEN
    )
    answer = operator.post(
        "/admin/chatserver/region/",
        {"action": "check_connection", "_selected_action": [good.pk, bad.pk]},
        follow=True,
    )
    assert answer.status_code == 200
    shown = messages_of(answer)
    assert any(level == "success" and "accepted the token" in text for level, text in shown)
    assert any(level == "error" and "token" in text for level, text in shown)
    assert not any(ZAMMAD_TOKEN in text for _, text in shown)


def test_list_views_show_no_secrets(operator: Client, zammad: Any) -> None:
    region = make_region(zammad.url)
    Chat.objects.create(
        region=region, device_id="secret-device-id-123456", language="de",
        expires_at=Chat.expiry_from(timezone.now()), zammad_ticket_id=4711,
    )  # fmt: skip
    for path in ("/admin/chatserver/region/", "/admin/chatserver/chat/"):
        page = operator.get(path).content.decode()
        assert ZAMMAD_TOKEN not in page
        assert region.webhook_token not in page
        assert region.signature_secret not in page
        assert "secret-device-id-123456" not in page
    found = operator.get("/admin/chatserver/chat/", {"q": "secret-d"}).content.decode()
    assert "secret-d" in found
    by_ticket = operator.get("/admin/chatserver/chat/", {"q": "4711"}).content.decode()
    assert "4711" in by_ticket


def test_failed_work_can_be_retried(operator: Client, zammad: Any) -> None:
    region = make_region(zammad.url)
    chat = Chat.objects.create(
        region=region, device_id="d1", language="de", expires_at=Chat.expiry_from(timezone.now())
    )
    work = Work.objects.create(
        chat=chat, kind=Work.Kind.SET_ATTRIBUTES, lane=Work.Lane.ZAMMAD, state=Work.State.FAILED,
        last_error="zammad: refused (HTTP 401)",
    )  # fmt: skip
    listed = operator.get("/admin/chatserver/work/", {"state__exact": "failed"}).content.decode()
    assert "refused (HTTP 401)" in listed
    operator.post(
        "/admin/chatserver/work/", {"action": "retry", "_selected_action": [work.pk]}, follow=True
    )
    work.refresh_from_db()
    assert work.state == Work.State.QUEUED

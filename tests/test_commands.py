"""The operating interface: management commands with the flags deployment scripts use."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from chatserver.models import Region

from .conftest import ROOT

REGION_FLAGS = [
    "--slug", "muenchen", "--name", "München", "--default-language", "de",
    "--zammad-url", "https://zammad.example/", "--zammad-token", "t0ken",
    "--webhook-token", "w3bhook",
]  # fmt: skip


def create_region(*extra: str) -> str:
    out = io.StringIO()
    call_command("create_region", *REGION_FLAGS, *extra, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_create_region_is_idempotent_and_updates() -> None:
    assert "Created region muenchen (enabled)" in create_region()
    region = Region.objects.get(slug="muenchen")
    assert region.is_configured
    assert region.zammad_url == "https://zammad.example"
    assert region.beta_percentage == 100
    assert region.signature_secret == ""
    output = create_region(
        "--signature-secret", "s3cret", "--ticket-group", "chat", "--beta-percentage", "25",
        "--disable",
    )  # fmt: skip
    assert "Updated region muenchen (disabled)" in output
    assert "t0ken" not in output
    assert "s3cret" not in output
    region.refresh_from_db()
    assert Region.objects.filter(slug="muenchen").count() == 1
    assert (region.signature_secret, region.ticket_group, region.beta_percentage) == (
        "s3cret",
        "chat",
        25,
    )
    assert not region.is_configured
    create_region()
    region.refresh_from_db()
    assert region.chat_enabled


@pytest.mark.django_db
def test_create_region_refuses_bad_flags() -> None:
    with pytest.raises(CommandError, match="beta-percentage"):
        create_region("--beta-percentage", "101")
    assert not Region.objects.filter(slug="muenchen").exists()


@pytest.mark.parametrize(
    "command",
    [
        "create_region",
        "chat_worker",
        "serve",
        "demo",
        "fake_zammad",
        "fake_chatbot",
        "check_region",
        "setup_zammad",
    ],
)
def test_every_command_has_help(command: str, settings: Any) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.django_db
def test_setup_zammad_provisions_by_name_and_is_idempotent(zammad: Any) -> None:
    from .conftest import make_region

    region = make_region(zammad.url)
    for _ in range(2):
        out = io.StringIO()
        call_command("setup_zammad", region.slug, "--server-url", "https://chat.example.org/",
                     stdout=out)  # fmt: skip
        assert region.webhook_token not in out.getvalue()
    fake = zammad.fake
    groups = [group["name"] for group in fake.groups.values()]
    assert groups.count("integreat-chat") == 1
    attributes = fake.admin_resources["object_manager_attributes"].values()
    assert sorted(a["name"] for a in attributes) == ["automatic_answers", "evaluation_consent"]
    assert fake.migrations_executed == 2
    [webhook] = fake.admin_resources["webhooks"].values()
    assert webhook["endpoint"] == (
        f"https://chat.example.org/api/v3/webhook/zammad/?token={region.webhook_token}"
    )
    assert webhook["signature_token"] == region.signature_secret
    [trigger] = fake.admin_resources["triggers"].values()
    assert trigger["perform"] == {"notification.webhook": {"webhook_id": webhook["id"]}}
    assert trigger["condition"]["article.subject"] == {
        "operator": "contains not",
        "value": "automatically generated message",
    }


@pytest.mark.django_db
def test_setup_zammad_says_when_zammad_refuses(zammad: Any) -> None:
    from .conftest import make_region

    region = make_region(zammad.url, zammad_token="wrong")
    with pytest.raises(CommandError, match="Zammad refused the setup"):
        call_command("setup_zammad", region.slug, "--server-url", "https://chat.example.org")

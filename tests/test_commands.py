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
    "command", ["create_region", "chat_worker", "serve", "demo", "fake_zammad", "fake_chatbot"]
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

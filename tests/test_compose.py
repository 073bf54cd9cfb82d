"""docker-compose.yml is valid compose syntax: checked against the Compose Specification's JSON
schema (tests/data/compose-spec.json, from the compose-spec project as shipped in
docker-compose 1.29.2, Apache-2.0), since no Docker engine runs here."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import yaml

from .conftest import ROOT


def load_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_file_matches_the_compose_schema() -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [
        f"{list(error.path)}: {error.message}" for error in validator.iter_errors(load_compose())
    ]
    assert errors == []


def test_compose_runs_the_whole_stack() -> None:
    services = load_compose()["services"]
    commands = {
        name: " ".join(map(str, service.get("command") or [])) for name, service in services.items()
    }
    assert any("migrate" in command for command in commands.values())
    assert any("chat_worker" in command for command in commands.values())
    web = [name for name, command in commands.items() if "serve" in command or "daphne" in command]
    assert len(web) >= 2, "several daphne processes behind the proxy"
    assert any("zammad" in str(service.get("image", "")) for service in services.values())
    images = " ".join(str(service.get("image", "")) for service in services.values())
    assert "postgres" in images
    assert "redis" in images
    assert "nginx" in images

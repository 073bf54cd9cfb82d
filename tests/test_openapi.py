"""The OpenAPI document (chatserver/openapi.yaml, served at /api/v3/openapi.yaml) against the
real ASGI application, in process, with schemathesis.

Every documented operation is fuzzed (positive and negative data, schemathesis' examples,
coverage and fuzzing phases) and every answer must be documented: status code, content type,
headers and body schema, and never a 500. Generated region, device, token and webhook values are
swapped for real ones part of the time (``flatmap_case`` below), so the 200 answers are exercised
too, not only the 404s. The answers that generation cannot reach on its own (304, 401 versus 200
on the signed webhook, 413, 429, 503) are requested explicitly and checked the same way.

Generation is derandomised so that CI sees the same requests every run; set
``OPENAPI_FUZZ_RANDOM=1`` to explore new ones locally.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

import pytest
import schemathesis
import yaml
from django.urls import URLPattern, URLResolver
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.core.transport import HttpMethod
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chatserver import chatbot as chatbot_client
from chatserver import limits
from chatserver import zammad as zammad_client
from chatserver.asgi import application
from chatserver.models import Chat, Region

from .conftest import SIGNATURE_SECRET, WEBHOOK_TOKEN

pytestmark = pytest.mark.django_db(transaction=True)

JSON = "application/json"
OPENAPI_URL = "/api/v3/openapi.yaml"
CHAT = "/api/v3/{region}/{language}/chat/{device_id}/"
LEGACY = "/{region}/{language}/wp-json/extensions/v3/chat/{device_id}/"
ENABLED = "/api/v3/{region}/{device_id}/is_chat_enabled/"
ATTACHMENT = "/api/v3/{region}/{language}/chat/{device_id}/attachments/{token}/"
WEBHOOK = "/api/v3/webhook/zammad/"
DEVICE = "3f1c7d2e-8b4a-4c1e-9d2f-0a1b2c3d4e5f"  # the document's example device id
KNOWN_TICKET = 4242
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
PATH = {"region": "augsburg", "language": "de", "device_id": DEVICE}
AGENT_ARTICLE = {"id": 77, "internal": False, "sender": "Agent", "body": "Hallo"}

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", "30"))
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            "mode": "all",
            "max-examples": EXAMPLES,
            "database": "none",
            "deterministic": os.environ.get("OPENAPI_FUZZ_RANDOM", "") != "1",
        },
        "phases": {"stateful": {"enabled": False}},
    }
)

DOCUMENT = files("chatserver").joinpath("openapi.yaml")
# The packaged file (so collection needs no server); every request goes to the ASGI app in
# process. test_document_is_served_and_packaged checks that the app serves this very file.
schema = schemathesis.openapi.from_path(str(DOCUMENT), config=CONFIG)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """The real application. Schemathesis serves every request on one event loop of its own;
    the lifespan shutdown (``_close_app_clients``) closes the clients that loop opened."""
    if scope["type"] != "lifespan":
        await application(scope, receive, send)
        return
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await zammad_client.close_sessions()
    await chatbot_client.close_sessions()
    await limits.close_clients()
    await send({"type": "lifespan.shutdown.complete"})


schema.app = app


@pytest.fixture(scope="module", autouse=True)
def _close_app_clients() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()


@dataclass
class Known:
    """Real values the generated cases are pointed at part of the time."""

    region: str = "augsburg"
    language: str = "de"
    device_id: str = DEVICE
    token: str = ""


KNOWN = Known()
REAL_PATH_PARAMETERS = ("region", "language", "device_id", "token")


def sign(body: bytes, secret: str = SIGNATURE_SECRET) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def _with_real_path(case: Case[Any], names: list[str]) -> Case[Any]:
    real = {
        "region": KNOWN.region,
        "language": KNOWN.language,
        "device_id": KNOWN.device_id,
        "token": KNOWN.token,
    }
    case.path_parameters = {
        **case.path_parameters,
        **{name: real[name] for name in names},
    }
    return case


def _signed_webhook(case: Case[Any], known_ticket: bool) -> Case[Any]:
    payload: Any = case.body
    if known_ticket and isinstance(payload, dict) and isinstance(payload.get("ticket"), dict):
        payload = {**payload, "ticket": {**payload["ticket"], "id": KNOWN_TICKET}}
    case.query = {**(case.query or {}), "token": WEBHOOK_TOKEN}
    try:
        raw = json.dumps(payload).encode()
    except TypeError:  # negative data: raw bytes where JSON belongs; sent unsigned
        return case
    case.body = raw
    case.headers["X-Hub-Signature"] = sign(raw)
    return case


@schema.hook
def flatmap_case(context: Any, case: Case[Any]) -> Any:
    """Part of the time, the real region, language, device and attachment token (so GET and
    POST answer 200 and downloads find the file), and a webhook with the real token and a
    correct signature (200), or the real token and the generated signature (401)."""
    if case.operation.path == WEBHOOK:
        return st.sampled_from(["generated", "token", "signed", "signed_known"]).map(
            lambda choice: (
                case
                if choice == "generated"
                else _signed_webhook(case, choice == "signed_known")
                if choice.startswith("signed")
                else _with_token(case)
            )
        )
    names = [name for name in case.path_parameters or {} if name in REAL_PATH_PARAMETERS]
    if not names:
        return st.just(case)
    some = st.lists(st.sampled_from(names), unique=True)
    return st.one_of(st.just([]), st.just(names), some).map(
        lambda chosen: _with_real_path(case, chosen)
    )


def _with_token(case: Case[Any]) -> Case[Any]:
    case.query = {**(case.query or {}), "token": WEBHOOK_TOKEN}
    return case


@pytest.fixture
def known(region: Region) -> Known:
    """The fixture region with a chat for ``DEVICE``: one message with an attachment (kept by
    the server until forwarded), and a Zammad ticket id for the webhook to find."""
    form: Any = {"message": "Hallo", "attachment": [PNG]}
    case = schema[CHAT]["POST"].Case(
        path_parameters=PATH, body=form, media_type="multipart/form-data"
    )
    response = case.call()
    assert response.status_code == 200, response.text
    [message] = response.json()["messages"]
    [attachment] = message["attachments"]
    KNOWN.token = attachment["url"].rstrip("/").rsplit("/", 1)[-1]
    Chat.objects.filter(device_id=DEVICE).update(zammad_ticket_id=KNOWN_TICKET)
    return KNOWN


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_answer_is_documented(case: Case[Any], known: Known) -> None:
    case.call_and_validate(checks=CHECKS)


# --- answers generation does not reach by itself ------------------------------------------------


def call(path: str, method: HttpMethod, **fields: Any) -> tuple[Case[Any], Response]:
    """One explicit request, checked like the generated ones (a 503 is the expected answer
    where the test asks for one, so only 500s count as server errors here)."""
    case = schema[path][method].Case(**fields)
    response = case.call()
    assert response.status_code < 500 or response.status_code == 503, response.text
    case.validate_response(response, checks=CHECKS[1:])
    return case, response


def header(response: Response, name: str) -> str:
    [value] = response.headers[name.lower()]
    return value


def test_document_is_valid_openapi() -> None:
    schema.validate()  # against the OpenAPI 3.0 meta-schema


def test_document_is_served_and_packaged() -> None:
    _, response = call(OPENAPI_URL, "GET")
    assert header(response, "Content-Type") == "application/yaml"
    packaged = DOCUMENT.read_text()
    assert yaml.safe_load(response.text) == yaml.safe_load(packaged)
    assert response.text == packaged


def test_every_route_is_documented() -> None:
    """Each REST route of chatserver/urls.py has a path in the document (and back)."""
    from chatserver.urls import urlpatterns

    patterns = cast(list[URLPattern | URLResolver], urlpatterns)
    documented = {re.sub(r"\{[^}]+\}", "*", path) for path in schema.raw_schema["paths"]}
    served = set()
    for pattern in patterns:
        route = str(pattern.pattern)
        if route.startswith(("^", "admin/", "demo/")):
            continue
        served.add("/" + re.sub(r"<[^>]+>", "*", route))
    assert served == documented


@pytest.mark.parametrize("path", [CHAT, LEGACY])
def test_not_modified(known: Known, path: str) -> None:
    _, first = call(path, "GET", path_parameters=PATH)
    assert first.status_code == 200
    _, again = call(
        path, "GET", path_parameters=PATH, headers={"If-None-Match": header(first, "ETag")}
    )
    assert again.status_code == 304
    assert again.content == b""
    assert header(again, "ETag") == header(first, "ETag")


def test_attachment_download(known: Known) -> None:
    _, response = call(ATTACHMENT, "GET", path_parameters={**PATH, "token": known.token})
    assert response.status_code == 200
    assert response.content == PNG
    assert header(response, "Content-Type") == "image/png"


def test_webhook_answers(known: Known) -> None:
    body = {"ticket": {"id": KNOWN_TICKET}, "article": {}}
    raw = json.dumps(body).encode()
    _, ok = call(
        WEBHOOK,
        "POST",
        query={"token": WEBHOOK_TOKEN},
        headers={"X-Hub-Signature": sign(raw), "X-Zammad-Delivery": "d-1"},
        body=raw,
        media_type=JSON,
    )
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok", "outcome": "ticket_changed"}
    _, again = call(
        WEBHOOK,
        "POST",
        query={"token": WEBHOOK_TOKEN},
        headers={"X-Hub-Signature": sign(raw), "X-Zammad-Delivery": "d-1"},
        body=raw,
        media_type=JSON,
    )
    assert again.json() == {"status": "ok", "outcome": "duplicate"}
    _, unsigned = call(WEBHOOK, "POST", query={"token": WEBHOOK_TOKEN}, body=body, media_type=JSON)
    assert unsigned.status_code == 401
    _, unknown = call(WEBHOOK, "POST", query={"token": "nope"}, body=body)
    assert unknown.status_code == 404
    huge = b'{"ticket": {"id": 1}, "pad": "' + b"x" * (1024 * 1024) + b'"}'
    _, too_large = call(
        WEBHOOK,
        "POST",
        query={"token": WEBHOOK_TOKEN},
        headers={"X-Hub-Signature": sign(huge)},
        body=huge,
        media_type=JSON,
    )
    assert too_large.status_code == 413


def test_rate_limited(known: Known, rate_limits: Any) -> None:
    rate_limits.RATE_LIMIT_REST_PER_DEVICE = 1
    path = {**PATH, "device_id": f"limited-{uuid.uuid4()}"}
    _, first = call(CHAT, "GET", path_parameters=path)
    assert first.status_code == 404
    for operation in (CHAT, LEGACY):
        _, refused = call(operation, "GET", path_parameters=path)
        assert refused.status_code == 429
        assert 1 <= int(header(refused, "Retry-After")) <= 60


def test_not_configured(known: Known) -> None:
    Region.objects.filter(slug="augsburg").update(zammad_token="")
    for path in (CHAT, LEGACY):
        _, response = call(path, "GET", path_parameters=PATH)
        assert response.status_code == 503
        _, response = call(
            path, "POST", path_parameters=PATH, body={"message": "hi"}, media_type=JSON
        )
        assert response.status_code == 503
    _, response = call(ENABLED, "GET", path_parameters={"region": "augsburg", "device_id": DEVICE})
    assert response.json() == {"is_chat_enabled": False}


def test_other_methods_are_refused(known: Known) -> None:
    refused: list[tuple[str, HttpMethod]] = [
        (CHAT, "PUT"),
        (CHAT, "DELETE"),
        (LEGACY, "PATCH"),
        (WEBHOOK, "GET"),
    ]
    for path, method in refused:
        case = schema[path]["GET" if path != WEBHOOK else "POST"].Case(
            method=method, path_parameters=PATH if path != WEBHOOK else {}
        )
        response = case.call()
        assert response.status_code == 405, (method, path)
        assert response.json() == {"error": "Method not allowed."}


# --- server bugs this file found, kept fixed ------------------------------------------------


def test_nul_in_path_or_token_is_not_found(known: Known) -> None:
    statuses = {}
    for operation in (CHAT, LEGACY, ENABLED, ATTACHMENT, WEBHOOK):
        webhook = operation == WEBHOOK
        case = schema[operation]["POST" if webhook else "GET"].Case(
            path_parameters={} if webhook else {**PATH, "region": "aug\x00sburg", "token": "t"},
            query={"token": "web\x00hook"} if webhook else None,
            body={"ticket": {"id": 1}} if webhook else NOT_SET,
            media_type=JSON if webhook else None,
        )
        statuses[operation] = case.call().status_code
    assert statuses == dict.fromkeys(statuses, 404)


def signed_webhook(payload: dict[str, Any]) -> Response:
    raw = json.dumps(payload).encode()
    case = schema[WEBHOOK]["POST"].Case(
        query={"token": WEBHOOK_TOKEN},
        headers={"X-Hub-Signature": sign(raw)},
        body=raw,
        media_type=JSON,
    )
    return case.call()


def test_webhook_ids_over_64_bits_are_refused(known: Known) -> None:
    statuses = [
        signed_webhook({"ticket": {"id": 2**63}, "article": {}}).status_code,
        signed_webhook(
            {"ticket": {"id": KNOWN_TICKET}, "article": {**AGENT_ARTICLE, "id": 2**63}}
        ).status_code,
    ]
    assert statuses == [400, 400]


def test_webhook_article_values_do_not_crash(known: Known) -> None:
    impossible_date = {**AGENT_ARTICLE, "id": 78, "created_at": "2024-02-30T10:00:00Z"}
    superscript_size = {**AGENT_ARTICLE, "id": 79, "attachments": [{"id": 1, "size": "\u00b2"}]}
    statuses = [
        signed_webhook({"ticket": {"id": KNOWN_TICKET}, "article": article}).status_code
        for article in (impossible_date, superscript_size)
    ]
    assert all(status < 500 for status in statuses), statuses


def test_other_methods_are_refused_everywhere(known: Known) -> None:
    statuses = {}
    for operation in (ENABLED, ATTACHMENT):
        for method in ("POST", "PUT", "DELETE"):
            case = schema[operation]["GET"].Case(
                method=method, path_parameters={**PATH, "token": known.token}
            )
            statuses[method, operation] = case.call().status_code
    assert statuses == dict.fromkeys(statuses, 405)


def test_method_not_allowed_says_what_is(known: Known) -> None:
    chat = schema[CHAT]["GET"].Case(method="PUT", path_parameters=PATH).call()
    webhook = schema[WEBHOOK]["POST"].Case(method="GET").call()
    assert [chat.status_code, webhook.status_code] == [405, 405]
    assert "allow" in chat.headers
    assert "allow" in webhook.headers


def test_legacy_region_with_a_slash_is_a_json_404(known: Known) -> None:
    case = schema[LEGACY]["GET"].Case(path_parameters={**PATH, "region": "aug/sburg"})
    response = case.call()
    assert response.status_code == 404
    assert response.headers["content-type"] == [JSON]

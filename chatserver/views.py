"""REST v3, byte-compatible with the Integreat CMS. Thin: parse, call one action, answer."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.multipartparser import MultiPartParserError
from django.utils.http import content_disposition_header
from django.views.decorators.csrf import csrf_exempt

from . import actions, attachments, limits, metrics, validation
from .errors import (
    INTERNAL_ERROR_TEXT,
    ChatError,
    InvalidMessage,
    PayloadTooLarge,
    Unavailable,
    UpstreamError,
)
from .models import device_key

logger = logging.getLogger(__name__)

# Typed loosely on purpose: django-stubs' ``path()`` does not know async views.
View = Callable[..., Any]

ATTACHMENT_UNAVAILABLE_TEXT = "The attachment cannot be fetched from the chat server right now."

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "content-type, idempotency-key, if-none-match, "
    "x-integreat-development",
    "Access-Control-Expose-Headers": "ETag, Retry-After",
}


def error_response(error: ChatError) -> JsonResponse:
    response = JsonResponse(error.rest_body(), status=error.http_status)
    retry_after = getattr(error, "retry_after_secs", None)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def api_view(*methods: str) -> Callable[[Callable[..., Awaitable[HttpResponseBase]]], View]:
    """CORS, OPTIONS, allowed methods, and the one place where typed errors become REST
    answers."""
    allow = ", ".join([*methods, "OPTIONS"])

    def decorate(view: Callable[..., Awaitable[HttpResponseBase]]) -> View:
        @csrf_exempt
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return _with_cors(await _answer(view, allow, request, *args, **kwargs))

        return wrapper

    return decorate


async def _answer(
    view: Callable[..., Awaitable[HttpResponseBase]],
    allow: str,
    request: HttpRequest,
    *args: Any,
    **kwargs: Any,
) -> HttpResponseBase:
    if request.method == "OPTIONS":
        return HttpResponse(status=204, headers={"Allow": allow})
    if request.method not in allow.split(", "):
        return JsonResponse({"error": "Method not allowed."}, status=405, headers={"Allow": allow})
    try:
        return await view(request, *args, **kwargs)
    except ChatError as error:
        return error_response(error)
    except DatabaseError:
        logger.warning("database unavailable during %s", view.__name__, exc_info=True)
        return error_response(Unavailable())
    except RequestDataTooBig:
        return error_response(PayloadTooLarge())
    except (SuspiciousOperation, MultiPartParserError):
        return error_response(InvalidMessage("The request body is malformed."))
    except Exception:
        logger.exception("unexpected error in %s", view.__name__)
        return JsonResponse({"error": INTERNAL_ERROR_TEXT}, status=500)


def _with_cors(response: HttpResponseBase) -> HttpResponseBase:
    for header, value in CORS_HEADERS.items():
        response[header] = value
    return response


async def check_rate_limits(request: HttpRequest, device_id: str) -> None:
    """Per device and per client IP, as the CMS limits its chat endpoints (429 with Retry-After)."""
    if not settings.CHAT_RATE_LIMITS_ENABLED:
        return
    ip = limits.client_ip((request.META.get("REMOTE_ADDR", ""), 0), dict(request.headers))
    await limits.check_rate(f"rest:ip:{ip}", settings.RATE_LIMIT_REST_PER_IP)
    await limits.check_rate(
        f"rest:device:{device_key(device_id)}", settings.RATE_LIMIT_REST_PER_DEVICE
    )


@api_view("GET", "HEAD")
async def is_chat_enabled(request: HttpRequest, region: str, device_id: str) -> HttpResponse:
    device_id = validation.device_id(device_id)
    await check_rate_limits(request, device_id)
    enabled = await actions.is_chat_enabled(region, device_id)
    return JsonResponse({"is_chat_enabled": enabled})


@api_view("GET", "HEAD", "POST")
async def chat(request: HttpRequest, region: str, language: str, device_id: str) -> HttpResponse:
    language = validation.language(language)
    device_id = validation.device_id(device_id)
    await check_rate_limits(request, device_id)
    if request.method == "POST":
        return await _post(request, region, language, device_id)
    return await _get(request, region, device_id)


async def _get(request: HttpRequest, region: str, device_id: str) -> HttpResponse:
    after = _after(request.GET.get("after"))
    snapshot = await actions.read_conversation(
        region, device_id, after=after, if_none_match=request.headers.get("If-None-Match")
    )
    if snapshot.body is None:
        response = HttpResponse(status=304)
    else:
        response = _conversation_response(snapshot.body)
    response["ETag"] = snapshot.etag
    response["Cache-Control"] = "no-cache"
    return response


def _after(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 18:
        raise InvalidMessage("after must be a message id.")
    return int(value)


async def _post(request: HttpRequest, region: str, language: str, device_id: str) -> HttpResponse:
    fields = _post_fields(request)
    await actions.send_message(
        region,
        language,
        device_id,
        text=validation.message_text(_text_field(fields.get("message"))),
        consent=validation.consent(fields.get("evaluation_consent")),
        client_id=validation.client_id(
            fields.get("client_id") or request.headers.get("Idempotency-Key")
        ),
        attachments=attachments.validate(request.FILES.getlist("attachment")),
        route="rest",
    )
    snapshot = await actions.read_conversation(region, device_id)
    assert snapshot.body is not None
    response = _conversation_response(snapshot.body)
    response["ETag"] = snapshot.etag
    return response


def _text_field(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidMessage("message must be a text.")


def _post_fields(request: HttpRequest) -> dict[str, Any]:
    """The apps send multipart or urlencoded forms; JSON bodies are accepted as well."""
    content_type = request.content_type or ""
    if content_type == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, RecursionError) as error:  # also UnicodeDecodeError; too deep
            raise InvalidMessage("The body is not valid JSON.") from error
        if not isinstance(body, dict):
            raise InvalidMessage("The body is not a JSON object.")
        return body
    if content_type in {"multipart/form-data", "application/x-www-form-urlencoded", ""}:
        return {key: request.POST.get(key) for key in request.POST}
    raise InvalidMessage(f"Unsupported content type {content_type[:60]}.")


def _conversation_response(body: bytes) -> HttpResponse:
    return HttpResponse(body, content_type="application/json")


@api_view("GET", "HEAD")
async def attachment(
    request: HttpRequest, region: str, language: str, device_id: str, token: str
) -> HttpResponse | StreamingHttpResponse:
    """Only the device that owns the chat, with the attachment's unguessable token."""
    validation.language(language)
    device_id = validation.device_id(device_id)
    await check_rate_limits(request, device_id)
    ref = await actions.find_attachment(region, device_id, token)
    try:
        download = await attachments.open_download(ref)
    except UpstreamError:
        return JsonResponse({"error": ATTACHMENT_UNAVAILABLE_TEXT}, status=503)
    response = StreamingHttpResponse(download.chunks, content_type=download.content_type)
    if download.content_length is not None:
        response["Content-Length"] = str(download.content_length)
    response["Content-Disposition"] = content_disposition_header(True, ref.name) or "attachment"
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, no-store"
    return response


@api_view("POST")
async def zammad_webhook(request: HttpRequest) -> HttpResponse:
    try:
        body = _limited_body(request)
        outcome = await actions.receive_webhook(
            actions.Delivery(
                token=request.GET.get("token"),
                body=body,
                signature=request.headers.get("X-Hub-Signature"),
                delivery_id=request.headers.get("X-Zammad-Delivery"),
            )
        )
    except ChatError as error:
        # A wrong token or signature secret shows here long before anyone misses a reply.
        metrics.WEBHOOKS.labels(f"rejected_{error.code}").inc()
        raise
    return JsonResponse({"status": "ok", "outcome": outcome})


def _limited_body(request: HttpRequest) -> bytes:
    limit: int = settings.WEBHOOK_MAX_BODY_BYTES
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge
    body = request.body
    if len(body) > limit:
        raise PayloadTooLarge
    return body


@api_view("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
async def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    return JsonResponse({"error": "Not found."}, status=404)


async def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"alive": True})


def _openapi_document() -> bytes:
    from importlib.resources import files

    return files("chatserver").joinpath("openapi.yaml").read_bytes()


@csrf_exempt
async def openapi(request: HttpRequest) -> HttpResponse:
    """The OpenAPI document of the REST endpoints (chatserver/openapi.yaml, packaged with it)."""
    if request.method not in {"GET", "HEAD"}:
        return JsonResponse(
            {"error": "Method not allowed."}, status=405, headers={"Allow": "GET, HEAD"}
        )
    response = HttpResponse(_openapi_document(), content_type="application/yaml")
    response["Access-Control-Allow-Origin"] = "*"
    return response

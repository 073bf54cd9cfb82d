"""The browser demo client at ``/demo/``: development and evaluation only.

A plain HTML page with a small vanilla JavaScript chat client (``static/chatserver/demo.js``) that
speaks the WebSocket protocol of the wire contract (section 3) and falls back to REST polling
(section 2), and beside it the fake Zammad's agent console. Served only when
``settings.CHAT_DEMO_PAGE`` is on (it defaults to ``DEBUG``; ``manage.py demo`` turns it on);
otherwise every path here is a 404.

Query parameters: ``region`` (default ``demo``), ``language`` (default ``en``), ``device`` (by
default the page generates one and keeps it in the browser's localStorage) and ``transport``
(``auto``, the default: WebSocket with REST polling as the fallback; ``rest``: polling only).
Invalid values fall back to the defaults rather than failing, so the page always opens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.http import require_GET

from . import validation
from .errors import ChatError

ASSETS_DIR = Path(__file__).resolve().parent / "static" / "chatserver"
ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css"}
REGION_SLUG = re.compile(r"[-a-z0-9_]{1,100}")
DEFAULT_REGION = "demo"
DEFAULT_LANGUAGE = "en"
TRANSPORTS = ("auto", "rest")
# Languages whose chat column is laid out right to left (messages carry dir="auto" anyway).
RTL_LANGUAGES = frozenset({"ar", "fa", "fa-af", "ps", "ur", "he", "ckb", "ku", "prs", "dv"})
LANGUAGE_CHOICES = ("en", "de", "ar", "fa", "uk", "ru", "tr", "fr", "es", "ti", "so")


def _enabled() -> None:
    if not settings.CHAT_DEMO_PAGE:
        raise Http404("The demo page is off (CHAT_DEMO_PAGE).")


def _region(value: str | None) -> str:
    return value if value and REGION_SLUG.fullmatch(value) else DEFAULT_REGION


def _language(value: str | None) -> str:
    try:
        return validation.language(value or DEFAULT_LANGUAGE)
    except ChatError:
        return DEFAULT_LANGUAGE


def _device(value: str | None) -> str:
    """An explicit device id, or "" to let the page use (or generate) its stored one."""
    try:
        return validation.device_id(value or "")
    except ChatError:
        return ""


def _asset_version(name: str) -> str:
    try:
        return str(int((ASSETS_DIR / name).stat().st_mtime))
    except OSError:
        return "0"


@require_GET
def page(request: HttpRequest) -> HttpResponse:
    _enabled()
    region = _region(request.GET.get("region"))
    language = _language(request.GET.get("language"))
    transport = request.GET.get("transport", "auto")
    config: dict[str, Any] = {
        "region": region,
        "language": language,
        "device": _device(request.GET.get("device")),
        "transport": transport if transport in TRANSPORTS else "auto",
        "apiPath": f"/api/v3/{region}/{language}/chat/",
        "wsPath": f"/ws/v3/{region}/{language}/chat/",
        "pingIntervalMs": 20_000,
    }
    context = {
        "config": config,
        "region": region,
        "language": language,
        "languages": LANGUAGE_CHOICES,
        "chat_dir": "rtl" if language in RTL_LANGUAGES else "ltr",
        "console_url": settings.CHAT_DEMO_ZAMMAD_CONSOLE_URL,
        "css_version": _asset_version("demo.css"),
        "js_version": _asset_version("demo.js"),
    }
    response = render(request, "chatserver/demo.html", context)
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def console(request: HttpRequest) -> HttpResponseRedirect:
    """The agent console, wherever it is now: ``manage.py demo`` starts its fake Zammad on a new
    port every time, so the page embeds this address and reloads it after a reconnect."""
    _enabled()
    url = settings.CHAT_DEMO_ZAMMAD_CONSOLE_URL
    if not url:
        raise Http404("No agent console is configured (CHAT_DEMO_ZAMMAD_CONSOLE_URL).")
    response = HttpResponseRedirect(url)
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def asset(request: HttpRequest, name: str) -> FileResponse:
    """The page's script and style sheet (daphne serves no static files of its own)."""
    _enabled()
    content_type = ASSETS.get(name)
    if content_type is None:
        raise Http404("No such demo asset.")
    response = FileResponse(
        (ASSETS_DIR / name).open("rb"), content_type=f"{content_type}; charset=utf-8"
    )
    response["Cache-Control"] = "no-cache"
    return response

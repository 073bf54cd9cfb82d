"""Validation of what clients put in paths and bodies."""

from __future__ import annotations

import re

from django.conf import settings

from .content import clean_text
from .errors import InvalidMessage, InvalidPath, NotFound

REGION_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,100}")
DEVICE_ID = re.compile(r"[-a-zA-Z0-9_]{1,64}")
LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-zA-Z0-9]+)?")
CLIENT_ID_MAX_CHARS = 64


def region_slug(value: str) -> str:
    """Region slugs are Django slugs; anything else cannot name a region (404)."""
    if not REGION_SLUG.fullmatch(value):
        raise NotFound
    return value


def device_id(value: str) -> str:
    if not DEVICE_ID.fullmatch(value):
        raise InvalidPath
    return value


def language(value: str) -> str:
    if not LANGUAGE.fullmatch(value):
        raise InvalidPath
    return value.lower()


def message_text(value: str | None) -> str | None:
    """The text of a message, or None when there is none (empty or blank counts as none)."""
    if value is None:
        return None
    limit = settings.CHAT_MESSAGE_MAX_CHARS
    if len(value) > limit:
        raise InvalidMessage(f"The message is too long (at most {limit} characters).")
    text = clean_text(value)
    return text if text.strip() else None


def client_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > CLIENT_ID_MAX_CHARS or not value.isprintable():
        raise InvalidMessage(f"client_id must be a text of 1 to {CLIENT_ID_MAX_CHARS} characters.")
    return value


def consent(value: object) -> bool | None:
    """``evaluation_consent`` as the apps send it: a form string, or a JSON boolean."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "0", "no", "off"}:
        return False
    raise InvalidMessage("evaluation_consent must be true or false.")

"""What text becomes before a client sees it: device text escaped, counsellor and bot HTML
sanitised to a safe subset (links, lists, paragraphs, emphasis)."""

from __future__ import annotations

import html
import re
import unicodedata

import nh3

SAFE_TAGS = {"a", "p", "br", "ul", "ol", "li", "strong", "em", "b", "i", "u", "blockquote", "div"}
SAFE_ATTRIBUTES = {"a": {"href", "title"}}
SAFE_URL_SCHEMES = {"http", "https", "mailto", "tel"}

_LINE_BREAK = "<br>"
# C0 controls other than tab and newline, and lone surrogates: never stored, never forwarded.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Normalise a device's text: NFC, no control characters, unified newlines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def text_to_html(text: str) -> str:
    """Device text as HTML: escaped, newlines as ``<br>``. ``html_to_text`` reverses it."""
    return html.escape(text, quote=False).replace("\n", _LINE_BREAK)


def html_to_text(content: str) -> str:
    return html.unescape(content.replace(_LINE_BREAK, "\n"))


def sanitize_html(content: str) -> str:
    return nh3.clean(
        content,
        tags=SAFE_TAGS,
        attributes=SAFE_ATTRIBUTES,
        url_schemes=SAFE_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
    )

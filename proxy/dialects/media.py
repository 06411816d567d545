"""Images and audio in requests, as bytes: what a file is by its first bytes (its magic), data URLs, and
the image parts of a canonical chat request that still need fetching. Pure functions.

Every dialect's image becomes an OpenAI ``image_url`` part whose URL is a data URL before its worker sees
it: base64 images (Ollama's ``images``, Anthropic's base64 sources) are typed here by their bytes, and the
http(s) URLs (OpenAI's, Anthropic's url sources, the Responses API's ``input_image``) are fetched by the proxy
(``proxy.fetch``) and put back as data URLs (``proxy.api.media``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any, Literal

from proxy.errors import BadRequest

MediaKind = Literal["image", "audio"]

# what each kind may be, by the types' names as they appear in a data URL
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp")
AUDIO_TYPES = ("audio/wav", "audio/mpeg", "audio/flac", "audio/ogg")
NAMES = {"image": "a PNG, JPEG, GIF, WebP or BMP image", "audio": "WAV, MP3, FLAC or OGG audio"}
SNIFF_BYTES = 12  # the longest magic read here


def sniff(head: bytes, kind: MediaKind) -> str | None:
    """The media type ``head`` (a file's first bytes) starts like, among ``kind``'s; None: none of them."""
    if kind == "image":
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return "image/png"
        if head.startswith(b"\xff\xd8\xff"):
            return "image/jpeg"
        if head.startswith((b"GIF87a", b"GIF89a")):
            return "image/gif"
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return "image/webp"
        if head.startswith(b"BM") and len(head) >= 6:
            return "image/bmp"
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"  # an ID3 tag, or an MPEG audio frame's sync word
    return None


def declared_ok(content_type: str | None, kind: MediaKind) -> bool:
    """Whether a server's Content-Type may describe ``kind`` (absent and octet-stream say nothing)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("application/octet-stream", "binary/octet-stream"):
        return True
    if kind == "image":
        return media.startswith("image/")
    return media.startswith("audio/") or media in ("application/ogg", "video/ogg")


def decode_base64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{where}' is not valid base64", param=where) from None


def typed_base64(data: str, kind: MediaKind, where: str) -> str:
    """The media type of base64 ``data`` by its bytes (BadRequest: not base64, or not one of ``kind``'s)."""
    head = decode_base64(data[: (SNIFF_BYTES + 2) // 3 * 4], where) if data else b""
    media = sniff(head, kind)
    if media is None:
        raise BadRequest(f"'{where}' is not {NAMES[kind]} (its first bytes say so)", param=where)
    return media


def data_url(media: str, data: bytes) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def image_parts(request: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each ``image_url`` part of a canonical chat request's messages, with its place
    (``messages[i].content[j]``), for the parts whose ``image_url`` is an object with a string ``url``."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            inner = part.get("image_url")
            if isinstance(inner, str):  # an older shape some clients send: the URL alone
                part["image_url"] = inner = {"url": inner}
            if isinstance(inner, dict) and isinstance(inner.get("url"), str):
                yield f"messages[{i}].content[{j}]", inner


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def relabelled(url: str) -> str:
    """A base64 data URL labelled with the image type its bytes show; as it was when they show none (the
    gate, ``proxy.dialects.vision``, refuses it in its own words)."""
    header, sep, data = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        return url
    try:
        head = base64.b64decode(data[: (SNIFF_BYTES + 2) // 3 * 4], validate=True)
    except (binascii.Error, ValueError):
        return url
    media = sniff(head, "image")
    return url if media is None else f"data:{media};base64,{data}"


def typed_data_url(url: str, where: str) -> str:
    """A base64 image data URL labelled with the type its bytes show (BadRequest: not base64, not an image)."""
    header, sep, data = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise BadRequest(f"'{where}' must be a base64 data URL (data:image/png;base64,...)", param=where)
    media = typed_base64(data, "image", where)
    return f"data:{media};base64,{data}"

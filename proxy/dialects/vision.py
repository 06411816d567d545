"""Images in a canonical chat request for a vision model, checked before anything is leased or decoded.

Every dialect's images reach the gate as OpenAI ``image_url`` parts. An image given as a ``data:`` URL is
checked here from its first bytes only: valid base64, a format the model's decoder reads (llama.cpp's
``mtmd`` decodes with stb_image: PNG, JPEG, GIF, BMP; an external server may take WebP too), and its pixel
size read from the header against ``limits.max_image_pixels`` (413), so a decompression bomb never reaches a
worker. The bytes themselves are bounded by the body's own limits (``limits.max_json_bytes``,
``limits.max_body_bytes``). An http(s) URL is left to whoever fetches it. Pure: no I/O, stdlib only.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from proxy.errors import BadRequest, PayloadTooLarge, UnsupportedInput

# enough of the image for its header: a JPEG's frame header may follow an EXIF block of up to 64 KiB
_HEAD_CHARS = 4 * 32 * 1024  # base64 characters: 96 KiB of image
_P = "messages"
LLAMA_FORMATS = ("png", "jpeg", "gif", "bmp")


def image_urls(messages: Any) -> list[tuple[int, str | None]]:
    """Each ``image_url`` part's URL in the messages, with its message's index (None: no URL string)."""
    out: list[tuple[int, str | None]] = []
    if not isinstance(messages, list):
        return out
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                out.append((i, url if isinstance(url, str) else None))
    return out


def check_images(messages: Any, max_pixels: int, formats: tuple[str, ...] | None = LLAMA_FORMATS) -> None:
    """Every image of a vision model's chat: BadRequest (400) for one that is not an image, UnsupportedInput
    (400) for a format outside ``formats`` (None: any this module knows), PayloadTooLarge (413) past
    ``max_pixels``."""
    for i, url in image_urls(messages):
        where = f"messages[{i}]"
        if url is None:
            raise BadRequest(f"{where}: an image_url part needs image_url.url (a data: or http(s) URL)", param=_P)
        if url.startswith(("http://", "https://")):
            continue
        if not url.startswith("data:"):
            raise BadRequest(f"{where}: an image URL must be a data: URL or an http(s) URL", param="messages")
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadRequest(f"{where}: an image data: URL must be base64 (data:image/png;base64,...)", param=_P)
        head = _head(payload, where)
        kind, size = sniff(head)
        if kind is None:
            raise BadRequest(f"{where}: the image is not a PNG, JPEG, GIF, BMP or WebP image", param="messages")
        if formats is not None and kind not in formats:
            raise UnsupportedInput(
                f"{where}: this model reads {', '.join(f.upper() for f in formats)} images, not {kind.upper()}",
                param="messages",
            )
        if size is None or size[0] <= 0 or size[1] <= 0:
            raise BadRequest(f"{where}: the {kind.upper()} image has no readable size in its header", param="messages")
        width, height = size
        if width * height > max_pixels:
            raise PayloadTooLarge(
                f"{where}: the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                "(limits.max_image_pixels)",
                param="messages",
            )


def _head(payload: str, where: str) -> bytes:
    chars = payload[:_HEAD_CHARS].strip()
    try:
        return base64.b64decode(chars[: len(chars) // 4 * 4] or chars, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the image is not valid base64", param="messages") from None


def sniff(head: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """An image's format and (width, height) from its first bytes; (None, None) for none known, a size of
    None where the header is cut short or malformed."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) >= 24 and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return "png", (w, h)
        return "png", None
    if head.startswith(b"GIF87a") or head.startswith(b"GIF89a"):
        return "gif", struct.unpack("<HH", head[6:10]) if len(head) >= 10 else None
    if head.startswith(b"BM"):
        if len(head) >= 26:
            w, h = struct.unpack("<ii", head[18:26])
            return "bmp", (w, abs(h))  # a negative height: rows top-down
        return "bmp", None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", _webp_size(head)
    if head.startswith(b"\xff\xd8"):
        return "jpeg", _jpeg_size(head)
    return None, None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's size from its first frame header (SOF0..SOF15 but DHT, JPG, DAC), walking the markers."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[at + 5 : at + 9])
            return w, h
        if length < 2:
            return None
        at += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None

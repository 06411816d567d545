"""Images for a vision model, checked at the gate from their headers (proxy/dialects/vision.py): the format
the model's decoder reads, the pixel size against limits.max_image_pixels, before any worker decodes them."""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from proxy.dialects.gate import Limits, check_chat
from proxy.dialects.vision import check_images, sniff
from proxy.errors import BadRequest, PayloadTooLarge, UnsupportedInput
from tests.test_manager import model


def encoded(fmt: str, size: tuple[int, int] = (40, 30), **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, fmt, **save)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR chunk claiming this size (no pixels: what a bomb's header says)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def chat(*urls: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "what is it?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts}]


def data(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_sniff_reads_each_format_and_its_size_from_the_header(fmt: str) -> None:
    kind, size = sniff(encoded(fmt, (123, 45))[:200])
    assert kind == fmt.lower()
    assert size == (123, 45)


def test_a_jpeg_size_is_found_past_its_exif_block() -> None:
    exif = Image.Exif()
    exif[0x010E] = "x" * 30_000  # ImageDescription: a long APP1 before the frame header
    raw = encoded("JPEG", (77, 66), exif=exif.tobytes())
    assert len(raw) > 30_000
    assert sniff(raw) == ("jpeg", (77, 66))


def test_images_the_model_reads_pass() -> None:
    check_images(chat(data(encoded("PNG")), data(encoded("JPEG"), "image/jpeg")), max_pixels=4096 * 4096)
    check_images(chat("https://example.com/cat.png"), max_pixels=1)  # left to whoever fetches it


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        (data(png_header(100_000, 100_000)), PayloadTooLarge, "100000x100000"),
        (data(encoded("PNG")).replace(",", ",****", 1), BadRequest, "not valid base64"),  # not skipped as junk
        (data(b"hello, I am a text file, not a picture"), BadRequest, "not a PNG, JPEG"),
        (data(b"\x89PNG\r\n\x1a\n"), BadRequest, "no readable size"),
        (data(encoded("WEBP"), "image/webp"), UnsupportedInput, "not WEBP"),
        ("data:image/png,rawbytes", BadRequest, "must be base64"),
        ("file:///etc/passwd", BadRequest, "a data: URL or an http"),
    ],
)
def test_a_bad_or_huge_image_is_refused_before_decoding(url: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as caught:
        check_images(chat(url), max_pixels=4096 * 4096)
    assert type(caught.value) is error
    assert "messages[0]" in str(caught.value)


def test_the_gate_checks_images_for_vision_models_only_and_webp_for_llama_cpp_only() -> None:
    bomb = chat(data(png_header(5000, 5000)))
    small = Limits(image_pixels=4096 * 4096)
    vision = dataclasses.replace(model("seer"), vision=True, backend="llama_cpp")
    with pytest.raises(PayloadTooLarge, match="limits.max_image_pixels"):
        check_chat({"messages": bomb}, vision, small)
    with pytest.raises(UnsupportedInput, match="cannot read images"):
        check_chat({"messages": bomb}, dataclasses.replace(vision, vision=False), small)
    webp = {"messages": chat(data(encoded("WEBP"), "image/webp"))}
    with pytest.raises(UnsupportedInput, match="not WEBP"):
        check_chat(webp, vision, small)
    check_chat(webp, dataclasses.replace(vision, backend="external"), small)  # a server of its own may read it

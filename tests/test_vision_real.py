"""Vision on the real path: the tests' vision model (SmolLM2 with a random-weight image projector built by
scripts/make_vision_model.py) behind a live proxy, asked through the openai SDK with data-URL images.

Its words are noise; what is checked is that the image goes through the projector into the model."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import openai
import pytest
from PIL import Image

from tests.harness import LiveProxy

pytestmark = pytest.mark.real

VISION = "smolvlm-test"
IMAGE_TOKENS = 16  # scripts/make_vision_model.py: (IMAGE_SIZE // PATCH_SIZE) ** 2


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client: openai.OpenAI, *images: str, model: str = VISION, **kw: Any) -> Any:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is in this picture?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": parts}],  # type: ignore[list-item,misc]
        temperature=0,
        max_tokens=8,
        **kw,
    )


def test_the_image_changes_the_answer(
    vision_proxy: LiveProxy, openai_for: Callable[[LiveProxy], openai.OpenAI]
) -> None:
    client = openai_for(vision_proxy)
    red = ask(client, data_url((255, 0, 0))).choices[0].message.content
    blue = ask(client, data_url((0, 0, 255))).choices[0].message.content
    again = ask(client, data_url((255, 0, 0))).choices[0].message.content
    assert red and blue
    assert red != blue  # greedy decoding: only the image differs
    assert red == again

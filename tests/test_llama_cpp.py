"""The llama.cpp worker's handling of a vision model's messages (proxy/worker/backends/llama_cpp.py), as plain
functions; the real path (a projector loaded, images seen) is in test_vision_real.py."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.worker.backends.base import InvalidRequest
from proxy.worker.backends.llama_cpp import _flat_parts, _with_images

PNG = "data:image/png;base64,iVBORw0KGgo="


def user(*parts: dict[str, Any], role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": list(parts)}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def image(url: str = PNG) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_vision_message_keeps_its_images_and_a_text_one_becomes_a_string() -> None:
    with_image = user(text("what?"), image())
    assert _with_images(with_image, 0) is with_image  # the handler reads its image parts
    assert _with_images(user(text("a"), text("b")), 0)["content"] == "a\nb"


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (user(text("x"), image("https://example.com/a.png")), "must be a data: URL"),  # the worker never fetches
        (user(text("x"), image(), role="assistant"), "user messages only"),
        (user(text("x"), {"type": "input_audio", "input_audio": {}}), "'input_audio'"),
    ],
)
def test_a_vision_model_refuses_what_it_cannot_read(message: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        _with_images(message, 0)


def test_the_template_gets_one_string_with_the_media_marker_where_the_image_was() -> None:
    flat = _flat_parts(object, user(text("before"), image(), text("after")), "<__media__>")
    assert flat == {"role": "user", "content": "before\n<__media__>\nafter"}

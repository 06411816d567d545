"""Images in chat messages, for a model configured with ``vision: true``.

Here the proxy takes the image from either dialect and hands it to the worker in OpenAI's shape, which a
recording fake worker shows (a vision server plugs in as ``backend: external``), and the real llama.cpp
worker configured with ``vision: true`` but no projector (``model.mmproj``) gets the image and refuses it
with a clear 400. A llama.cpp model that sees (the tests' synthetic projector) is in test_vision_real.py;
the gate's checks of an image's header in test_dialect_vision.py; the proxy's own refusal for models
without ``vision`` in test_openai_api.py.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama as ollama_sdk
import openai
import pytest

from tests.harness import LiveProxy, fake_config, smollm2_config

MakeProxy = Callable[..., LiveProxy]
OpenAIFor = Callable[[LiveProxy], openai.OpenAI]


def png(width: int = 2, height: int = 2) -> bytes:
    """A small valid PNG (grey, 8 bits), made with the standard library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


IMAGE = base64.b64encode(png()).decode()
DATA_URL = f"data:image/png;base64,{IMAGE}"


def image_urls(body: dict[str, Any]) -> list[str]:
    return [
        part["image_url"]["url"]
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


def test_a_vision_model_gets_the_image_from_both_dialects(
    make_proxy: MakeProxy, openai_for: OpenAIFor, tmp_path: Path
) -> None:
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy([fake_config("eyes", "--record", str(record), vision=True), fake_config("blind")])
    content: Any = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": DATA_URL}}]
    reply = openai_for(proxy).chat.completions.create(model="eyes", messages=[{"role": "user", "content": content}])
    assert reply.choices[0].message.content
    with ollama_sdk.Client(host=proxy.url, timeout=60) as client:
        assert client.chat(model="eyes", messages=[{"role": "user", "content": "What?", "images": [png()]}]).done
        assert client.generate(model="eyes", prompt="And this?", images=[png()]).done
        assert "vision" in (client.show("eyes").capabilities or [])
        assert "vision" not in (client.show("blind").capabilities or [])
        with pytest.raises(ollama_sdk.ResponseError) as refused:  # the same image, to a model without vision
            client.chat(model="blind", messages=[{"role": "user", "content": "What?", "images": [png()]}])
        assert refused.value.status_code == 400 and "cannot read images" in refused.value.error
    sent = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    assert [image_urls(body) for body in sent] == [[DATA_URL]] * 3
    assert sent[0]["messages"][0]["content"][0] == {"type": "text", "text": "What is this?"}
    assert {"type": "text", "text": "And this?"} in sent[2]["messages"][-1]["content"]


@pytest.mark.real
def test_the_real_llama_cpp_worker_takes_text_parts_and_refuses_an_image_clearly(make_proxy: MakeProxy) -> None:
    """Configured with ``vision: true``, the image reaches the llama.cpp worker, which loads no projector:
    a 400 that says so (it was a 500, a TypeError in the chat template), and the worker serves on; text
    given as OpenAI's array of parts is read as text."""
    proxy = make_proxy([smollm2_config(vision=True)])
    text = {"type": "text", "text": "Describe the picture."}

    def ask(*parts: dict[str, Any]) -> httpx.Response:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}
        return httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=120)

    refused = ask(text, {"type": "image_url", "image_url": {"url": DATA_URL}})
    assert refused.status_code == 400, refused.text
    assert "reads text only" in refused.json()["error"]["message"]
    pid = proxy.status()["smollm2:135m"]["pid"]
    answered = ask(text, {"type": "text", "text": "In one word."})
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"]
    assert proxy.status()["smollm2:135m"]["pid"] == pid

"""Vision on the real path: the tests' vision model (SmolLM2 with a random-weight image projector built by
scripts/make_vision_model.py) behind a live proxy, asked through the openai SDK with data-URL images.

Its words are noise; what is checked is that the image goes through the projector into the model: the
answer depends on the image, each image costs its tokens in the usage, and the multimodal context is freed
with the model."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.harness import REPO, LiveProxy, running, smollm2_path

pytestmark = pytest.mark.real

VISION = "smolvlm-test"
IMAGE_TOKENS = 16  # scripts/make_vision_model.py: (IMAGE_SIZE // PATCH_SIZE) ** 2
OpenAIFor = Callable[[LiveProxy], openai.OpenAI]


def encoded(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def message(*images: str) -> list[Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is in this picture?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def ask(client: openai.OpenAI, *images: str, model: str = VISION) -> Any:
    return client.chat.completions.create(model=model, messages=message(*images), temperature=0, max_tokens=6)


def test_the_image_changes_the_answer_and_costs_its_tokens(vision_proxy: LiveProxy, openai_for: OpenAIFor) -> None:
    client = openai_for(vision_proxy)
    red, blue = data_url(encoded((255, 0, 0))), data_url(encoded((0, 0, 255), fmt="JPEG"), "image/jpeg")
    first = ask(client, red)
    other = ask(client, blue)
    assert first.choices[0].message.content and other.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content  # greedy: only the image differs
    # the same image again, streamed: the same answer, the same prompt (its image tokens counted, none cached)
    stream = client.chat.completions.create(
        model=VISION,
        messages=message(red),
        temperature=0,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and first.usage is not None
    assert usage.prompt_tokens == first.usage.prompt_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    text_only = client.chat.completions.create(model=VISION, messages=message(), temperature=0, max_tokens=1).usage
    assert text_only is not None
    # the image's embeddings, and the line that separates it from the text
    assert first.usage.prompt_tokens - text_only.prompt_tokens in (IMAGE_TOKENS, IMAGE_TOKENS + 1)


def test_bad_images_are_4xx_and_a_model_without_projector_refuses_them(
    vision_proxy: LiveProxy, openai_for: OpenAIFor
) -> None:
    client = openai_for(vision_proxy)
    png = encoded((0, 128, 0))
    with pytest.raises(openai.BadRequestError, match="cannot read images"):  # plain SmolLM2: the gate says so
        ask(client, data_url(png), model="smollm2")
    with pytest.raises(openai.BadRequestError, match="not a PNG, JPEG"):
        ask(client, data_url(b"just some text, base64 encoded"))
    with pytest.raises(openai.APIStatusError, match="limits.max_image_pixels") as huge:
        ask(client, data_url(encoded((1, 2, 3), size=(5000, 4000))))  # 20 Mpx: refused from its header
    assert huge.value.status_code == 413
    # a header that reads but pixels that do not: the worker's decoder refuses it, and the worker serves on
    with pytest.raises(openai.BadRequestError, match="bitmap"):
        ask(client, data_url(png[:60]))
    pid = vision_proxy.status()[VISION]["pid"]
    assert ask(client, data_url(png)).choices[0].message.content
    assert vision_proxy.status()[VISION]["pid"] == pid


def test_a_dropped_gguf_with_its_mmproj_is_a_vision_model(tmp_path: Path, vision_model: dict[str, Any]) -> None:
    """Discovery pairs ``X.gguf`` with ``mmproj-X*.gguf``: one model, ``vision`` in Ollama's lists, and it
    sees."""
    with running(tmp_path, []) as proxy:
        models = tmp_path / "models"
        os.symlink(smollm2_path(), models / "Seer.gguf")
        os.symlink(vision_model["model"]["mmproj"], models / "mmproj-Seer-f32.gguf")
        assert httpx.post(proxy.url + "/models/rescan", timeout=60).status_code == 200
        tags = {m["name"]: m for m in httpx.get(proxy.url + "/api/tags", timeout=30).json()["models"]}
        assert list(tags) == ["seer:latest"]
        assert "vision" in tags["seer:latest"]["capabilities"]
        shown = httpx.post(proxy.url + "/api/show", json={"model": "seer"}, timeout=60).json()
        assert "vision" in shown["capabilities"]
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        with client:
            assert ask(client, data_url(encoded((9, 9, 9))), model="seer").usage.prompt_tokens > IMAGE_TOKENS


CLOSE_CHECK = """
import json, sys
from proxy.worker.backends.llama_cpp import LlamaCppBackend
model, mmproj, image = sys.argv[1:4]
options = {"n_ctx": 512, "n_threads": 2, "n_gpu_layers": 0, "mmproj": mmproj}
backend = LlamaCppBackend("seer", model, options)
backend.load()
llm = backend._llm  # held here, so only an explicit close (not the collector) can free what it holds
handler = llm.chat_handler
content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": image}}]
answer = backend.chat({"messages": [{"role": "user", "content": content}], "max_tokens": 1})
made = handler.mtmd_ctx is not None  # made on the first image
backend.close()
print(json.dumps({"prompt_tokens": answer["usage"]["prompt_tokens"], "made": made, "freed": handler.mtmd_ctx is None}))
"""


def test_close_frees_the_multimodal_context(vision_model: dict[str, Any]) -> None:
    """llama-cpp-python frees the mtmd context on ``Llama.close`` (its exit stack; the leak fixed by its
    PR #2343 was a context left behind): the worker's ``close`` at unload reaches it. Run as a worker runs,
    in a process of its own."""
    image = data_url(encoded((5, 5, 5)))
    args = [sys.executable, "-c", CLOSE_CHECK, str(smollm2_path()), vision_model["model"]["mmproj"], image]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["prompt_tokens"] > IMAGE_TOKENS
    assert seen == {**seen, "made": True, "freed": True}

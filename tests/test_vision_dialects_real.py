"""Images through every dialect on the real path: the tests' vision model (SmolLM2 with a random-weight
projector, tests/conftest.py's ``vision_model``) behind a live proxy that fetches from an image server on
127.0.0.1 (``limits.fetch.allowed_hosts``). Greedy answers: a red and a blue picture give two different
answers in each dialect (Ollama's base64 images, Anthropic's url source, the Responses API's input_image
URL, a /v2 job's chat and the service API's ``image_url``), so each image went through the projector."""

from __future__ import annotations

import http.server
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import ollama as ollama_sdk
import openai
import pytest

from tests.bare import served
from tests.harness import LiveProxy
from tests.test_vision_real import VISION, encoded

pytestmark = pytest.mark.real

MakeProxy = Callable[..., LiveProxy]
PICTURES = {"/red.png": encoded((255, 0, 0)), "/blue.png": encoded((0, 0, 255))}
PROMPT = "What is in this picture?"


class _Pictures(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = PICTURES[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def pictures() -> Iterator[str]:
    with served(_Pictures) as address:
        yield f"http://{address}"


def test_each_dialect_gets_the_image_through_the_projector(
    make_proxy: MakeProxy, vision_model: dict[str, Any], pictures: str
) -> None:
    proxy = make_proxy([vision_model], limits={"fetch": {"allowed_hosts": ["127.0.0.1"]}})
    answers: dict[str, list[str]] = {}
    colours = ("red", "blue")
    with ollama_sdk.Client(host=proxy.url, timeout=120) as client:
        answers["ollama"] = [
            client.chat(
                model=VISION,
                messages=[{"role": "user", "content": PROMPT, "images": [PICTURES[f"/{c}.png"]]}],
                options={"temperature": 0, "num_predict": 6},
            ).message.content
            or ""
            for c in colours
        ]
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as claude:
        answers["anthropic"] = [
            "".join(
                block.text
                for block in claude.messages.create(
                    model=VISION,
                    max_tokens=6,
                    extra_body={"temperature": 0},
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": PROMPT},
                                {"type": "image", "source": {"type": "url", "url": f"{pictures}/{c}.png"}},
                            ],
                        }
                    ],
                ).content
                if block.type == "text"
            )
            for c in colours
        ]
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        answers["responses"] = [
            client.responses.create(
                model=VISION,
                max_output_tokens=6,
                temperature=0,
                input=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": PROMPT},
                            {"type": "input_image", "image_url": f"{pictures}/{c}.png", "detail": "auto"},
                        ],
                    }
                ],
            ).output_text
            for c in colours
        ]

    def chat(c: str) -> list[Any]:
        image = {"type": "image_url", "image_url": {"url": f"{pictures}/{c}.png"}}
        return [{"role": "user", "content": [{"type": "text", "text": PROMPT}, image]}]

    answers["job"] = [
        httpx.post(
            f"{proxy.url}/v2/{VISION}/runsync",
            json={
                "input": {
                    "messages": chat(c),
                    "max_tokens": 6,
                    "temperature": 0,
                }
            },
            timeout=120,
        ).json()["output"]["choices"][0]["message"]["content"]
        for c in colours
    ]
    answers["service"] = [
        httpx.post(
            f"{proxy.url}/api/v1/runsync",
            json={
                "model": VISION,
                "input": {"image_url": f"{pictures}/{c}.png", "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
            },
            timeout=120,
        ).json()["output"]["description"]
        for c in colours
    ]
    for dialect, (red, blue) in answers.items():
        assert red and blue and red != blue, (dialect, answers)
    # the same request in OpenAI's dialect as a job and as a service call: the same greedy answer
    assert answers["job"] == answers["service"] or [a.strip() for a in answers["job"]] == answers["service"]

"""Images from every dialect reach the worker as data URLs: a live proxy, a recording fake worker configured
as a vision model, each dialect's own client shape, and an image server on 127.0.0.1 (a loopback address,
so the proxy's ``limits.fetch.allowed_hosts`` names it; 127.0.0.2, also loopback, is not named and is
refused). The fetcher's rules themselves are in test_fetch.py; the projector on the real path in
test_vision.py."""

from __future__ import annotations

import base64
import http.server
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama as ollama_sdk
import openai
import pytest

from tests.bare import served
from tests.harness import LiveProxy, fake_config
from tests.test_vision import png

MakeProxy = Callable[..., LiveProxy]
PNG = png(3, 2)
# a JPEG's start: its frame header (3x2 pixels) is all the proxy reads; no worker decodes it here
JPEG = bytes.fromhex("ffd8ffc0001108000200030301220002110103110100") + b"\x00" * 32
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
JPEG_URL = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()


class _Images(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []  # the paths asked, in order

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.hits.append(self.path)
        body, kind = {"/a.png": (PNG, "image/png"), "/b.jpg": (JPEG, "image/jpeg")}.get(
            self.path, (b"<html></html>", "text/html")
        )
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    with served(_Images) as address:
        yield address


@pytest.fixture
def eyes(make_proxy: MakeProxy, tmp_path: Path) -> tuple[LiveProxy, Path]:
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy(
        [fake_config("eyes", "--record", str(record), vision=True), fake_config("blind")],
        limits={"fetch": {"allowed_hosts": ["127.0.0.1"], "max_bytes": 4096, "timeout": "10s"}},
    )
    return proxy, record


def sent_images(record: Path) -> list[list[str]]:
    bodies = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    return [
        [
            part["image_url"]["url"]
            for message in body["messages"]
            if isinstance(message["content"], list)
            for part in message["content"]
            if part.get("type") == "image_url"
        ]
        for body in bodies
    ]


def test_every_dialect_hands_the_worker_data_urls(eyes: tuple[LiveProxy, Path], images: str) -> None:
    proxy, record = eyes
    http_png, http_jpg = f"http://{images}/a.png", f"http://{images}/b.jpg"
    # OpenAI: an http(s) URL is fetched by the proxy
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        content: Any = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": http_png}}]
        client.chat.completions.create(model="eyes", messages=[{"role": "user", "content": content}])
        # the Responses API: input_image with a URL, and with a data URL
        client.responses.create(
            model="eyes",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "And these?"},
                        {"type": "input_image", "image_url": http_jpg, "detail": "auto"},
                        {"type": "input_image", "image_url": PNG_URL, "detail": "auto"},
                    ],
                }
            ],
        )
    # Anthropic: a url source and a base64 source whose media_type is wrong (the bytes decide)
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as claude:
        claude.messages.create(
            model="eyes",
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": http_png}},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": JPEG_URL.split(",")[1]},
                        },
                        {"type": "text", "text": "Which?"},
                    ],
                }
            ],
        )
    # Ollama: base64 images, which it labels as PNG whatever they are: a JPEG is labelled a JPEG
    with ollama_sdk.Client(host=proxy.url, timeout=60) as client:
        client.chat(model="eyes", messages=[{"role": "user", "content": "What?", "images": [JPEG]}])
        client.generate(model="eyes", prompt="And?", images=[PNG])
    # a job's chat: the URL is fetched once, at submit, and stored as a data URL
    job = {"input": {"messages": [{"role": "user", "content": content}]}}
    _Images.hits.clear()
    done = httpx.post(f"{proxy.url}/v2/eyes/runsync", json=job, timeout=60).json()
    assert done["status"] == "COMPLETED", done
    assert _Images.hits == ["/a.png"]  # not again by the dry run at submit, nor when it ran
    assert sent_images(record) == [
        [PNG_URL],
        [JPEG_URL, PNG_URL],
        [PNG_URL, JPEG_URL],
        [JPEG_URL],
        [PNG_URL],
        [PNG_URL],
    ]


def test_a_refused_fetch_is_a_400_naming_the_host_in_each_dialect(eyes: tuple[LiveProxy, Path], images: str) -> None:
    proxy, record = eyes
    port = images.split(":")[1]
    loopback = f"http://127.0.0.2:{port}/a.png"  # loopback, and not in allowed_hosts
    part = {"type": "image_url", "image_url": {"url": loopback}}
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "eyes", "messages": [{"role": "user", "content": [part]}]},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "'127.0.0.2'" in error["message"] and "loopback" in error["message"] and error["code"] == "fetch_failed"
    r = httpx.post(
        proxy.url + "/v1/messages",
        json={
            "model": "eyes",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": loopback}}]}],
        },
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "127.0.0.2" in r.json()["error"]["message"]
    r = httpx.post(
        proxy.url + "/v1/responses",
        json={
            "model": "eyes",
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": f"http://{images}/page"}]}],
        },
        timeout=30,
    )
    assert r.status_code == 400 and "text/html" in r.json()["error"]["message"], r.text
    r = httpx.post(
        proxy.url + "/v2/eyes/run",
        json={"input": {"messages": [{"role": "user", "content": [part]}]}},
        timeout=30,
    )
    assert r.status_code == 400 and "127.0.0.2" in r.json()["error"]["message"], r.text
    # an image that is not one, and a scheme the proxy does not fetch
    for url in ("data:image/png;base64," + base64.b64encode(b"plain text, no image").decode(), "file:///etc/passwd"):
        part = {"type": "image_url", "image_url": {"url": url}}
        r = httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "eyes", "messages": [{"role": "user", "content": [part]}]},
            timeout=30,
        )
        assert r.status_code == 400, r.text
    r = httpx.post(
        proxy.url + "/api/generate", json={"model": "eyes", "prompt": "x", "images": ["aGVsbG8="]}, timeout=30
    )
    assert r.status_code == 400 and "not a PNG, JPEG, GIF, BMP or WebP image" in r.json()["error"], r.text
    # a model without vision is refused before any URL is fetched
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "blind", "messages": [{"role": "user", "content": [part]}]},
        timeout=30,
    )
    assert r.status_code == 400 and "cannot read images" in r.json()["error"]["message"]
    assert not record.exists() or record.read_text() == ""  # nothing reached the worker

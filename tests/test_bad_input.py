"""Bad input: a 4xx in the caller's dialect naming the problem; none reaches a worker, none is a 500."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.harness import LiveProxy, fake_config

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    live = LiveProxy(
        tmp_path_factory.mktemp("bad"), [fake_config("fake")], limits={"max_body_bytes": 4096, "max_json_bytes": 4096}
    ).start()
    yield live
    live.stop()


def openai_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"]


def ollama_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"]


CASES: list[tuple[str, Callable[[str], httpx.Response], int, tuple[str, ...]]] = [
    (
        "invalid json",
        lambda u: httpx.post(u, content=b"{nope", headers={"content-type": "application/json"}),
        400,
        ("not valid JSON",),
    ),
    ("empty body", lambda u: httpx.post(u, content=b""), 400, ("empty",)),
    ("array body", lambda u: httpx.post(u, json=[1, 2]), 400, ("JSON object",)),
    ("missing model", lambda u: httpx.post(u, json={"messages": MSG}), 400, ("model",)),
    ("model not a string", lambda u: httpx.post(u, json={"model": 5, "messages": MSG}), 400, ("model", "string")),
    ("unknown model", lambda u: httpx.post(u, json={"model": "nope", "messages": MSG}), 404, ("nope",)),
    (
        "bad keep_alive",
        lambda u: httpx.post(u, json={"model": "fake", "messages": MSG, "keep_alive": "soon"}),
        400,
        ("keep_alive",),
    ),
    (
        "bad keep_alive in options",
        lambda u: httpx.post(u, json={"model": "fake", "messages": MSG, "options": {"keep_alive": True}}),
        400,
        ("options.keep_alive",),
    ),
    (
        "oversized body",
        lambda u: httpx.post(u, json={"model": "fake", "messages": MSG, "pad": "x" * 5000}),
        413,
        ("limit",),
    ),
    ("messages not a list", lambda u: httpx.post(u, json={"model": "fake", "messages": "hi"}), 400, ("messages",)),
    (
        "stream not a boolean",
        lambda u: httpx.post(u, json={"model": "fake", "messages": MSG, "stream": "yes"}),
        400,
        ("stream",),
    ),
]


@pytest.mark.parametrize(("name", "send", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_openai_dialect(
    proxy: LiveProxy, name: str, send: Callable[[str], httpx.Response], status: int, words: tuple[str, ...]
) -> None:
    openai_error(send(proxy.url + "/v1/chat/completions"), status, *words)
    assert proxy.status()["fake"]["state"] == "stopped"  # nothing reached (or started) a worker


@pytest.mark.parametrize(("name", "send", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_ollama_dialect(
    proxy: LiveProxy, name: str, send: Callable[[str], httpx.Response], status: int, words: tuple[str, ...]
) -> None:
    ollama_error(send(proxy.url + "/api/chat"), status, *words)
    assert proxy.status()["fake"]["state"] == "stopped"


def test_field_types(proxy: LiveProxy) -> None:
    url = proxy.url + "/v1/chat/completions"
    for field, value in [("temperature", "hot"), ("max_tokens", 1.5), ("stop", 3), ("tools", {}), ("n", True)]:
        openai_error(httpx.post(url, json={"model": "fake", "messages": MSG, field: value}), 400, field)
    openai_error(httpx.post(url, json={"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}), 400, "role")
    openai_error(httpx.post(proxy.url + "/v1/completions", json={"model": "fake", "prompt": 5}), 400, "prompt")
    openai_error(httpx.post(proxy.url + "/v1/embeddings", json={"model": "fake", "input": [1, 2]}), 400, "input")
    openai_error(
        httpx.post(proxy.url + "/v1/embeddings", json={"model": "fake", "input": "x", "encoding_format": "hex"}),
        400,
        "encoding_format",
    )
    ollama_error(
        httpx.post(
            proxy.url + "/api/generate", json={"model": "fake", "prompt": "x", "options": {"num_predict": "ten"}}
        ),
        400,
        "num_predict",
    )
    ollama_error(
        httpx.post(proxy.url + "/api/generate", json={"model": "fake", "prompt": "x", "format": 5}), 400, "format"
    )
    ollama_error(httpx.post(proxy.url + "/api/embed", json={"model": "fake", "input": 5}), 400, "input")
    ollama_error(httpx.post(proxy.url + "/api/show", json={}), 400, "model")
    assert proxy.status()["fake"]["state"] == "stopped"


def test_unknown_routes_and_methods(proxy: LiveProxy) -> None:
    openai_error(httpx.get(proxy.url + "/v1/nothing"), 404, "/v1/nothing")
    ollama_error(httpx.get(proxy.url + "/api/nothing"), 404, "/api/nothing")
    openai_error(httpx.get(proxy.url + "/v1/chat/completions"), 405, "GET")
    openai_error(httpx.get(proxy.url + "/v1/models/nope"), 404, "nope")
    ollama_error(httpx.post(proxy.url + "/api/show", json={"model": "nope"}), 404, "nope")


def test_images_refused_in_ollama_messages(proxy: LiveProxy) -> None:
    r = httpx.post(
        proxy.url + "/api/chat",
        json={"model": "fake", "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]},
    )
    ollama_error(r, 400, "images")
    r = httpx.post(proxy.url + "/api/generate", json={"model": "fake", "prompt": "x", "images": ["AAAA"]})
    ollama_error(r, 400, "images")
    assert proxy.status()["fake"]["state"] == "stopped"

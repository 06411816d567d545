"""Ollama's model management as its clients use it: `pull` of an installed model (its real sha256),
`ps`, `show` with the GGUF's own metadata, capabilities in `tags`, the calls that would change what is
installed (clear errors in Ollama's shape), and names with and without `:latest` on every route."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.harness import LiveProxy, fake_config, running, smollm2_path

MakeProxy = Callable[..., LiveProxy]


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.real
def test_pull_of_an_installed_model_streams_ollamas_sequence(smollm2_proxy: LiveProxy) -> None:
    with ollama.Client(host=smollm2_proxy.url) as client:
        lines = list(client.pull("smollm2:135m", stream=True))
        assert client.pull("smollm2").status == "success"  # stream: false
    statuses = [line.status for line in lines]
    weights = smollm2_path()
    digest = sha256(weights)
    assert statuses == [
        "pulling manifest",
        f"pulling {digest[7:19]}",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layer = lines[1]
    assert layer.digest == digest and layer.total == layer.completed == weights.stat().st_size
    # the digest is cached by path, size and mtime in models/.cache
    assert digest[7:] in (smollm2_proxy.root / "models" / ".cache" / "digests.json").read_text()


@pytest.mark.real
def test_ps_and_show_tell_what_the_gguf_says(smollm2_proxy: LiveProxy) -> None:
    with ollama.Client(host=smollm2_proxy.url) as client:
        client.generate(model="smollm2", prompt="hi", options={"num_predict": 2})
        running = {m.model: m for m in client.ps().models}
        shown = client.show("smollm2:latest")
        listed = {m.model: m for m in client.list().models}
    assert running["smollm2:135m"].context_length == 2048 and running["smollm2:135m"].details is not None
    info = shown.modelinfo or {}
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 8192  # the model's own, not the configured n_ctx
    assert info["llama.embedding_length"] == 576
    assert info["llama.attention.head_count"] == 9 and info["llama.attention.head_count_kv"] == 3
    assert info["llama.block_count"] == 30
    assert info["general.parameter_count"] > 100_000_000
    assert info["tokenizer.ggml.tokens"] is None  # long arrays are null, as Ollama shows them
    assert set(shown.capabilities or []) == {"completion", "tools", "embedding"}
    assert "smollm2:135m" in listed
    tags = httpx.get(smollm2_proxy.url + "/api/tags").json()["models"]
    assert set(tags[0]["capabilities"]) == {"completion", "tools", "embedding"}


def test_unknown_pull_and_management_calls_answer_in_ollamas_shape(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake", capabilities=["completion"], vision=True)])
    with ollama.Client(host=proxy.url) as client:
        with pytest.raises(ollama.ResponseError) as info:
            client.pull("llama3.2")
        # a model with no single weight file: the digest of its config
        lines = list(client.pull("fake:latest", stream=True))
    assert info.value.status_code == 404
    assert "not installed here" in info.value.error and "adding their files and a config" in info.value.error
    assert [line.status for line in lines][-1] == "success" and (lines[1].digest or "").startswith("sha256:")
    calls: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
        ("DELETE", "/api/delete", {"model": "fake"}, 403, "remove its config"),
        ("DELETE", "/api/delete", {"model": "nope"}, 404, "'nope' not found"),
        ("POST", "/api/copy", {"source": "fake", "destination": "x"}, 403, "aliases"),
        ("POST", "/api/copy", {"source": "nope", "destination": "x"}, 404, "'nope' not found"),
        ("POST", "/api/create", {"model": "x", "from": "fake"}, 403, "not created over the API"),
        ("POST", "/api/push", {"model": "fake"}, 403, "does not push"),
        ("POST", "/api/blobs/sha256:00", None, 403, "blobs are not uploaded"),
        ("POST", "/api/pull", {}, 400, "'model' is required"),
    ]
    for method, path, body, status, reason in calls:
        r = httpx.request(method, proxy.url + path, json=body)
        assert r.status_code == status and reason in r.json()["error"], (path, r.text)
    assert httpx.head(proxy.url + "/api/blobs/sha256:00").status_code == 404
    tags = httpx.get(proxy.url + "/api/tags").json()["models"]
    assert tags[0]["capabilities"] == ["completion", "embedding", "vision"]  # it serves /api/embed too


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("POST", "/api/generate", {"prompt": "hi", "stream": False}),
    ("POST", "/api/embed", {"input": "hi"}),
    ("POST", "/api/embeddings", {"prompt": "hi"}),
    ("POST", "/api/show", {}),
    ("POST", "/api/pull", {"stream": False}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"prompt": "hi"}),
    ("POST", "/v1/embeddings", {"input": "hi"}),
    ("GET", "/v1/models/{name}", None),
    ("POST", "/load/{name}", None),
    ("POST", "/unload/{name}", None),
    ("POST", "/models/unload", {}),
]


@pytest.fixture(scope="module")
def tagged_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    with running(tmp_path_factory.mktemp("tags"), [fake_config("plain"), fake_config("tagged:latest")]) as live:
        yield live


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_names_match_with_and_without_latest_everywhere(
    tagged_proxy: LiveProxy, method: str, path: str, body: dict[str, Any] | None
) -> None:
    proxy = tagged_proxy
    for asked in ("plain:latest", "tagged", "plain", "tagged:latest"):
        sent = None if body is None else {**body, "model": asked}
        r = httpx.request(method, proxy.url + path.format(name=asked), json=sent, timeout=60)
        assert r.status_code == 200, (asked, r.text)

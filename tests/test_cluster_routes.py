"""Every kind of model route through a cluster of three proxies (issue 27): embeddings, images, speech,
transcription (multipart, forwarded as the client sent it) and jobs (forwarded whole; their ids name the
node that stores them), and the listings that show each model's kind.

Each node is a live proxy (tests/harness.py) with fake workers (tests/fake_worker.py, which answers the
image, speech and transcription routes too) and a ``cluster:`` section, on a real redis-server. Node a serves
an LLM (chat) and an embedding model (embed), b an image model (draw) and a voice (say), c a Whisper-like
model (hear): every request below enters at a node that does not have its model.
"""

from __future__ import annotations

import functools
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from proxy.api.forwarding import FORWARDED, RAW, Routing, route_to_node
from proxy.cluster.net import ClusterNet
from proxy.cluster.routing import Forward
from proxy.cluster.view import ClusterView, ModelPresence, from_publication
from proxy.errors import NotFound, Unavailable
from tests.harness import LiveProxy, fake_config, wait_until
from tests.redis_server import RedisServer
from tests.test_cluster_routing import node as node_info
from tests.test_cluster_routing import view
from tests.test_ui_real import HTTP_4XX

SECRET = "cluster-secret-for-the-routes-0123456789abcdef"
TOKENS: dict[str, Any] = {"api_key": ["user-key", "other-key"], "admin_key": ["admin-key"]}
USER = {"Authorization": "Bearer user-key"}
OTHER = {"Authorization": "Bearer other-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
CATALOG: dict[str, list[dict[str, Any]]] = {
    "a": [fake_config("chat"), fake_config("embed", kind="embedding")],
    "b": [fake_config("draw", kind="image"), fake_config("say", kind="speech")],
    "c": [fake_config("hear", kind="transcription")],
}
KINDS = {"chat": "llm", "embed": "embedding", "draw": "image", "say": "speech", "hear": "transcription"}


def alive(node: LiveProxy) -> set[str]:
    r = httpx.get(node.url + "/cluster", headers=ADMIN, timeout=5)
    r.raise_for_status()
    return {n["node"] for n in r.json()["nodes"] if n["alive"]}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveProxy]]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    root = tmp_path_factory.mktemp("routes")
    cluster = {"redis_url": redis.url, "secret": SECRET}
    started = {
        name: LiveProxy(root / name, models, tokens=TOKENS, cluster={**cluster, "node": name})
        for name, models in CATALOG.items()
    }
    try:
        starts = [threading.Thread(target=node.start) for node in started.values()]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        for node in started.values():
            assert node.proc is not None, f"a node did not start: {node.log()}"
            wait_until(functools.partial(lambda n: len(alive(n)) == 3, node), timeout=15)
        yield started
    finally:
        for node in started.values():
            node.stop()
        redis.stop()


def post(node: LiveProxy, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(node.url + path, json=body, headers=headers or USER, timeout=60)


def test_every_node_lists_each_model_once_with_its_kind(nodes: dict[str, LiveProxy]) -> None:
    for name, node in nodes.items():
        data = httpx.get(node.url + "/v1/models", headers=USER, timeout=10).json()["data"]
        assert sorted(m["id"] for m in data) == sorted(KINDS), name
        assert {m["id"]: m.get("kind") for m in data} == KINDS, name
        # Ollama's list shows the language models only (chat, embeddings), wherever they are, as it does
        # a node's own, with what they can do
        tags = httpx.get(node.url + "/api/tags", headers=USER, timeout=10).json()["models"]
        assert {t["name"]: t["capabilities"] for t in tags} == {
            "chat:latest": ["completion", "tools", "embedding"],
            "embed:latest": ["embedding"],
        }, name


def test_a_publication_without_kinds_is_read_as_before() -> None:
    """A node that publishes no kind (an older one): its models are listed as they were, as LLMs."""
    old = {"node": "old", "advertise": "http://x", "models": [{"name": "m", "state": "ready"}], "catalog": ["m"]}
    info = from_publication(old, age=0.0, alive=True)
    presence = info.model("m")
    assert presence == ModelPresence("m", "ready") and presence.kind is None and presence.language_model
    new = ModelPresence("v", "stopped", kind="speech", capabilities=("speech",))
    assert ModelPresence.from_json(new.to_json()) == new and not new.language_model
    assert "kind" not in ModelPresence("m", "ready").to_json()


def test_embeddings_route(nodes: dict[str, LiveProxy]) -> None:
    r = post(nodes["c"], "/v1/embeddings", {"model": "embed", "input": ["one", "two"]})
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] == "a" and len(r.json()["data"]) == 2
    r = post(nodes["b"], "/api/embed", {"model": "embed", "input": "one"})
    assert r.status_code == 200 and r.headers["x-served-by"] == "a" and len(r.json()["embeddings"]) == 1


def test_images_route(nodes: dict[str, LiveProxy]) -> None:
    r = post(nodes["a"], "/v1/images/generations", {"model": "draw", "prompt": "a cat", "size": "256x256"})
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] == "b" and r.json()["data"][0]["b64_json"]
    body = {"prompt": "a cat", "width": 256, "height": 256, "override_settings": {"sd_model_checkpoint": "draw"}}
    r = post(nodes["c"], "/sdapi/v1/txt2img", body)  # AUTOMATIC1111's
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] == "b" and len(r.json()["images"]) == 1


def test_speech_route(nodes: dict[str, LiveProxy]) -> None:
    r = post(nodes["c"], "/v1/audio/speech", {"model": "say", "input": "hello there", "voice": "alloy"})
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] == "b" and r.content == b"fake audio: hello there"


def test_transcription_is_forwarded_as_the_client_sent_it(nodes: dict[str, LiveProxy]) -> None:
    audio = bytes(range(256)) * 40  # 10240 bytes, every byte value: the multipart body must arrive intact
    for entry in ("c", "a", "b"):  # c's own first: its load lease taken, the handler runs again on the body kept
        r = httpx.post(
            nodes[entry].url + "/v1/audio/transcriptions",
            files={"file": ("clip.wav", audio, "audio/wav")},
            data={"model": "hear", "response_format": "json"},
            headers=USER,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by"] == "c"
        assert r.json()["text"] == f"fake transcript of {len(audio)} bytes"
    r = httpx.post(
        nodes["a"].url + "/v1/audio/transcriptions",
        files={"file": ("clip.wav", audio, "audio/wav")},
        data={"model": "nobody-has-it"},
        headers=USER,
        timeout=60,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_job_goes_to_its_models_node_and_is_found_from_every_node(nodes: dict[str, LiveProxy]) -> None:
    chat = {"input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}
    r = post(nodes["b"], "/v2/chat/runsync", chat)
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] == "a" and r.json()["status"] == "COMPLETED"
    job = r.json()["id"]
    assert job.startswith("a~")  # stored on a, and its id says so
    for entry in ("a", "b", "c"):  # polled anywhere, answered by a, for the key that made it
        r = httpx.get(nodes[entry].url + f"/v2/chat/status/{job}", headers=USER, timeout=30)
        assert r.status_code == 200, (entry, r.text)
        assert r.headers["x-served-by"] == "a" and r.json()["output"]["choices"]
        r = httpx.get(nodes[entry].url + f"/api/v1/status/{job}", headers=USER, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "chat", (entry, r.text)
        assert httpx.get(nodes[entry].url + f"/api/v1/status/{job}", headers=OTHER, timeout=30).status_code == 404
    # the seed's service API: a speech job sent to c, stored and run on b
    r = post(nodes["c"], "/api/v1/run", {"model": "say", "input": {"text": "hello"}})
    assert r.status_code == 200, r.text
    spoken = r.json()["id"]
    assert spoken.startswith("b~")

    def done() -> dict[str, Any] | None:
        got = httpx.get(nodes["a"].url + f"/api/v1/status/{spoken}", headers=USER, timeout=30).json()
        return got if got["status"] == "COMPLETED" else None

    assert wait_until(done, timeout=30)["model"] == "say"
    r = httpx.post(nodes["c"].url + f"/v2/say/cancel/{spoken}", headers=USER, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED"  # a finished job stays as it is
    r = httpx.get(nodes["a"].url + "/v2/say/health", headers=USER, timeout=30)
    assert r.status_code == 200 and r.headers["x-served-by"] == "b" and r.json()["jobs"]["completed"] >= 1
    gone = f"z~{uuid.uuid4()}"  # no node of that name
    r = httpx.get(nodes["a"].url + f"/api/v1/status/{gone}", headers=USER, timeout=30)
    assert r.status_code == 404


def test_a_multipart_request_with_a_wrong_key_is_refused_before_any_forward(nodes: dict[str, LiveProxy]) -> None:
    r = httpx.post(
        nodes["a"].url + "/v1/audio/transcriptions",
        files={"file": ("clip.wav", b"x" * 10, "audio/wav")},
        data={"model": "hear"},
        headers={"Authorization": "Bearer wrong"},
        timeout=30,
    )
    assert r.status_code == 401


def test_the_status_page_shows_the_nodes(nodes: dict[str, LiveProxy]) -> None:
    """/ui on a node of a cluster: its own models, and every node from GET /cluster (an admin's), in a real
    headless Chromium (as tests/test_ui_real.py drives it)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: scripts/setup.sh --test installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(nodes["b"].url + "/ui")
            page.fill("#key", "admin-key")
            page.click("#keyform button[type=submit]")
            expect(page.locator('tr[data-model="draw"]')).to_be_visible(timeout=30_000)  # its own models
            expect(page.locator("#cluster-section")).to_be_visible(timeout=30_000)
            expect(page.locator("#cluster tbody tr")).to_have_count(3)
            row = page.locator('#cluster tr[data-node="c"]')
            expect(row.locator("td.alive")).to_have_text("alive")
            expect(row.locator("td.models")).to_have_text(re.compile(r"^hear( \((ready|starting|stopping)\))?$"))
            expect(row.locator("td.free")).to_contain_text("RAM")
            expect(row.locator("td.age")).to_have_text(re.compile(r"^\d+\.\d s$"))
            expect(page.locator('#cluster tr[data-node="b"] td.node')).to_have_text("b (this node)")
            assert all(HTTP_4XX.match(e) for e in errors), errors  # the key form's 401 only
        finally:
            browser.close()


class _Net:
    """What ``forwarding.route_to_node`` reads of the network: this node's name, the view, the heartbeat."""

    def __init__(self, v: ClusterView) -> None:
        self.node = v.here
        self.heartbeat = 1.0
        self._view = v

    def view(self) -> ClusterView:
        return self._view


def test_a_job_on_a_node_that_is_down_is_503_and_on_one_nobody_knows_404() -> None:
    v = view(node_info("a", catalog=()), node_info("b", catalog=(), alive=False), node_info("c", catalog=()))
    net = cast(ClusterNet, _Net(v))
    scope: dict[str, Any] = {RAW: b""}
    with pytest.raises(Unavailable) as down:
        route_to_node(net, scope, "b", "job 'b~1'")
    assert down.value.retry_after > 0
    with pytest.raises(NotFound):
        route_to_node(net, scope, "z", "job 'z~1'")
    with pytest.raises(Routing) as there:
        route_to_node(net, scope, "c", "job 'c~1'")
    assert there.value.pinned and there.value.decision == Forward("c", "http://c", "holds")
    route_to_node(net, scope, "a", "job 'a~1'")  # this node's own: served here
    route_to_node(net, {RAW: b"", FORWARDED: "c"}, "c", "job 'c~1'")  # came from another node: one hop at most


def test_ollama_ps_shows_the_language_models_loaded_elsewhere_only(nodes: dict[str, LiveProxy]) -> None:
    assert post(nodes["a"], "/v1/embeddings", {"model": "embed", "input": "one"}).status_code == 200
    image = {"model": "draw", "prompt": "a cat", "size": "256x256"}
    assert post(nodes["b"], "/v1/images/generations", image).status_code == 200

    def listed() -> set[str]:
        return {m["name"] for m in httpx.get(nodes["c"].url + "/api/ps", headers=USER, timeout=10).json()["models"]}

    def ready_on_b() -> bool:
        found = httpx.get(nodes["c"].url + "/cluster", headers=ADMIN, timeout=10).json()["nodes"]
        b = next(n for n in found if n["node"] == "b")
        return any(m["name"] == "draw" and m["state"] == "ready" for m in b["models"])

    wait_until(ready_on_b, timeout=10)  # c's view has it ready on b
    wait_until(lambda: "embed:latest" in listed(), timeout=10)
    assert "draw:latest" not in listed()  # an image model: not in Ollama's list, as on its own node

"""Three proxies on this machine and a real redis-server: one endpoint (issue 27).

Each node is a live proxy (tests/harness.py) with fake workers (tests/fake_worker.py) and a ``cluster:``
section; the nodes find each other through the redis-server the test starts. Node a serves alpha and
shared, b serves beta and shared, c serves shared only.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth import Principal, Role
from proxy.cluster.signing import Caller, Signer
from tests.harness import LiveProxy, fake_config, wait_until
from tests.redis_server import RedisServer

SECRET = "cluster-secret-for-tests-0123456789abcdef"
TOKENS: dict[str, Any] = {
    "api_key": ["user-key", {"key": "alpha-only", "models": ["alpha"]}],
    "admin_key": ["admin-key"],
}
USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
CATALOG = {"a": ("alpha", "shared"), "b": ("beta", "shared"), "c": ("shared",)}


def start_cluster(
    root: Path, redis_url: str, where: dict[str, dict[str, Any]] | None = None, **fake_flags: list[str]
) -> dict[str, LiveProxy]:
    """The three nodes of CATALOG; ``where``: more LiveProxy arguments by node (its host, its netns)."""
    nodes: dict[str, LiveProxy] = {}
    for name, models in CATALOG.items():
        configs = [fake_config(m, *fake_flags.get(m, [])) for m in models]
        cluster = {"redis_url": redis_url, "node": name, "secret": SECRET}
        nodes[name] = LiveProxy(root / name, configs, tokens=TOKENS, cluster=cluster, **(where or {}).get(name, {}))
    starts = [threading.Thread(target=node.start) for node in nodes.values()]  # side by side: quicker
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    try:
        for node in nodes.values():
            assert node.proc is not None, f"a node did not start: {node.log()}"
            wait_until(functools.partial(all_alive, node), timeout=15)
    except BaseException:
        stop_cluster(nodes)  # none left running
        raise
    return nodes


def stop_cluster(nodes: dict[str, LiveProxy]) -> None:
    for node in nodes.values():
        if node.proc is not None:
            node.stop()


def all_alive(node: LiveProxy) -> bool:
    return len(alive(node)) == 3


def alive(node: LiveProxy) -> set[str]:
    r = httpx.get(node.url + "/cluster", headers=ADMIN, timeout=5)
    r.raise_for_status()
    return {n["node"] for n in r.json()["nodes"] if n["alive"]}


def chat(node: LiveProxy, model: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(node.url + "/v1/chat/completions", json=body, headers=headers or USER, timeout=60)


def loads(node: LiveProxy, model: str) -> float:
    """The loads of ``model`` the node started (its /metrics), or is in (its /status)."""
    text = httpx.get(node.url + "/metrics", headers=ADMIN, timeout=5).text
    done = sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "proxy_model_loads_total" and s.labels.get("model") == model
    )
    state = httpx.get(node.url + "/status", headers=ADMIN, timeout=5).json()["models"]
    return max(done, sum(1.0 for m in state if m["name"] == model and m["state"] != "stopped"))


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[dict[str, LiveProxy]]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"), redis.url, shared=["--load-time", "1"])
    yield started
    stop_cluster(started)


def test_a_single_host_never_loads_redis() -> None:
    """Without cluster: in config.yml nothing of Redis is imported (the cluster's node is imported lazily)."""
    code = "import sys, proxy.app, proxy.__main__; print([m for m in sys.modules if m.split('.')[0] == 'redis'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_every_node_lists_the_whole_cluster_each_model_once(nodes: dict[str, LiveProxy]) -> None:
    for node in nodes.values():
        ids = [m["id"] for m in httpx.get(node.url + "/v1/models", headers=USER).json()["data"]]
        assert sorted(ids) == ["alpha", "beta", "shared"]
        tags = [m["name"] for m in httpx.get(node.url + "/api/tags", headers=USER).json()["models"]]
        assert sorted(tags) == ["alpha:latest", "beta:latest", "shared:latest"]
    status = httpx.get(nodes["c"].url + "/status", headers=USER).json()
    assert [m["name"] for m in status["models"]] == ["shared"]  # /status stays this node's own
    scoped = httpx.get(nodes["c"].url + "/v1/models", headers={"Authorization": "Bearer alpha-only"}).json()
    assert [m["id"] for m in scoped["data"]] == ["alpha"]
    assert httpx.get(nodes["c"].url + "/cluster", headers=USER).status_code == 403


def test_a_request_goes_to_the_node_that_has_the_model(nodes: dict[str, LiveProxy]) -> None:
    r = chat(nodes["c"], "alpha")
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] == "a"
    assert r.json()["choices"][0]["message"]["content"]
    assert chat(nodes["a"], "alpha").headers["x-served-by"] == "a"  # served where it is
    # once loaded, /api/ps on every node shows it, once
    wait_until(
        lambda: (
            [m["name"] for m in httpx.get(nodes["b"].url + "/api/ps", headers=USER).json()["models"]].count(
                "alpha:latest"
            )
            == 1
        ),
        timeout=5,
    )
    metrics = httpx.get(nodes["c"].url + "/metrics", headers=ADMIN).text
    assert 'proxy_cluster_forwards_total{node="a",outcome="ok"}' in metrics
    assert "proxy_cluster_forward_added_seconds_count" in metrics


def test_twenty_first_requests_across_the_nodes_load_the_model_once(nodes: dict[str, LiveProxy]) -> None:
    results: list[httpx.Response] = []
    entries = [nodes[n] for n in ("a", "b", "c")] * 7

    def ask(node: LiveProxy) -> None:
        results.append(chat(node, "shared"))

    threads = [threading.Thread(target=ask, args=(node,)) for node in entries[:20]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 20, [r.text for r in results if r.status_code != 200]
    assert len({r.headers["x-served-by"] for r in results}) == 1
    assert sum(loads(node, "shared") for node in nodes.values()) == 1


def test_a_stream_passes_through_a_hop(nodes: dict[str, LiveProxy]) -> None:
    client = openai.OpenAI(base_url=nodes["c"].url + "/v1", api_key="user-key")
    with client.chat.completions.with_streaming_response.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        assert response.headers["x-served-by"] == "b"
        chunks = [c for c in response.parse() if c.choices and c.choices[0].delta.content]
    assert len(chunks) >= 2
    r = httpx.post(
        nodes["a"].url + "/api/chat",
        json={"model": "beta", "messages": [{"role": "user", "content": "hi"}]},
        headers=USER,
        timeout=60,
    )
    lines = [line for line in r.text.splitlines() if line]
    assert r.headers["x-served-by"] == "b" and len(lines) >= 2 and '"done":true' in lines[-1]


def test_keys_and_scopes_hold_across_a_hop(nodes: dict[str, LiveProxy]) -> None:
    scoped = {"Authorization": "Bearer alpha-only"}
    r = chat(nodes["b"], "alpha", scoped)
    assert r.status_code == 200 and r.headers["x-served-by"] == "a"
    assert chat(nodes["a"], "beta", scoped).status_code == 404  # not in its scope, wherever it is
    assert chat(nodes["c"], "beta", {"Authorization": "Bearer wrong"}).status_code == 401
    r = chat(nodes["c"], "beta", USER, keep_alive=0)  # an admin's right, checked on both sides
    assert r.status_code == 403


def signed(
    method: str, path: str, body: bytes, *, secret: str = SECRET, age: float = 0.0, caller: Caller | None = None
) -> dict[str, str]:
    caller = caller or Caller(Principal(Role.ADMIN), "key:test")
    return Signer(secret, "b").sign(method, path, body, caller, time.time() - age)


def test_the_serving_node_applies_the_caller_the_forward_carries(nodes: dict[str, LiveProxy]) -> None:
    """What the entry node found of the caller (role, scope) binds the node that serves a forward."""
    json_type = {"Content-Type": "application/json"}
    scoped = Caller(Principal(Role.USER, frozenset({"alpha"})), "key:scoped")
    body = b'{"model":"beta","messages":[{"role":"user","content":"hi"}]}'
    r = httpx.post(
        nodes["b"].url + "/v1/chat/completions",
        content=body,
        headers={**json_type, **signed("POST", "/v1/chat/completions", body, caller=scoped)},
        timeout=30,
    )
    assert r.status_code == 404  # beta is outside the scope the forward says
    user = Caller(Principal(Role.USER), "key:user")
    body = b'{"model":"beta","messages":[{"role":"user","content":"hi"}],"keep_alive":0}'
    r = httpx.post(
        nodes["b"].url + "/v1/chat/completions",
        content=body,
        headers={**json_type, **signed("POST", "/v1/chat/completions", body, caller=user)},
        timeout=30,
    )
    assert r.status_code == 403  # keep_alive 0 is an admin's
    r = httpx.post(nodes["b"].url + "/unload", headers=signed("POST", "/unload", b"", caller=user), timeout=30)
    assert r.status_code == 403  # an admin route, for a user caller


def test_forged_unsigned_and_stale_forwards_are_refused(nodes: dict[str, LiveProxy]) -> None:
    body = b'{"model":"alpha","messages":[{"role":"user","content":"hi"}]}'
    url = nodes["a"].url
    json_type = {"Content-Type": "application/json"}
    good = signed("POST", "/v1/chat/completions", body)
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={**json_type, **good}, timeout=60)
    assert r.status_code == 200  # the same forward, signed with the cluster's secret, is served
    cases = {
        "forged": signed("POST", "/v1/chat/completions", body, secret="x" * 40),
        "unsigned": {"X-Cluster-Forward": "b"},
        "stale": signed("POST", "/v1/chat/completions", body, age=60),
        "other body": signed("POST", "/v1/chat/completions", body + b" "),
    }
    for why, headers in cases.items():
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={**json_type, **headers}, timeout=10)
        assert r.status_code == 401, why
        assert r.json()["error"]["type"], why  # OpenAI's error shape
    ollama_body = b'{"model":"alpha","messages":[]}'
    forged = signed("POST", "/api/chat", ollama_body, secret="x" * 40)
    r = httpx.post(url + "/api/chat", content=ollama_body, headers={**json_type, **forged}, timeout=10)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)  # Ollama's


def test_a_killed_node_is_left_out_and_its_work_moves(tmp_path: Path, redis_server: RedisServer) -> None:
    nodes = start_cluster(tmp_path, redis_server.url)
    try:
        assert chat(nodes["b"], "shared").status_code == 200  # loads on b (its own)
        assert chat(nodes["c"], "shared").status_code == 200  # c serves its own (the view says b; both fine)
        wait_until(lambda: chat(nodes["a"], "shared").headers["x-served-by"] in ("b", "c"), timeout=5)
        victim = chat(nodes["a"], "shared").headers["x-served-by"]
        proc = nodes[victim].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        r = chat(nodes["a"], "shared")  # before it is left out: another holder, or 503 at once
        assert r.status_code in (200, 503)
        if r.status_code == 503:
            assert "retry-after" in r.headers
        assert time.monotonic() - killed < 2
        wait_until(lambda: victim not in alive(nodes["a"]), timeout=4.5)
        assert time.monotonic() - killed <= 4.5
        r = chat(nodes["a"], "shared")
        assert r.status_code == 200 and r.headers["x-served-by"] != victim
    finally:
        stop_cluster(nodes)


def test_without_redis_each_node_serves_its_own_and_rejoins(tmp_path: Path, redis_server: RedisServer) -> None:
    nodes = start_cluster(tmp_path, redis_server.url)
    try:
        assert chat(nodes["a"], "beta").headers["x-served-by"] == "b"
        redis_server.stop()
        wait_until(lambda: alive(nodes["a"]) == {"a"}, timeout=5)
        r = chat(nodes["a"], "alpha")
        assert r.status_code == 200 and r.headers["x-served-by"] == "a"
        assert chat(nodes["a"], "beta").status_code == 404  # nobody it can see has it
        time.sleep(2.5)  # the outage lasts several heartbeats (not a synchronisation)
        redis_server.start()
        back = time.monotonic()
        wait_until(lambda: len(alive(nodes["a"])) == 3, timeout=5)
        assert time.monotonic() - back <= 2  # each node publishes at its next heartbeat; a reads them at its own
        assert chat(nodes["a"], "beta").headers["x-served-by"] == "b"
        for name, node in nodes.items():  # logged once by each node, and its return once
            assert node.log().count("is out of reach") == 1, name
            assert node.log().count("is back: node") == 1, name
    finally:
        stop_cluster(nodes)


def test_a_second_node_with_a_live_nodes_name_refuses_to_start(
    tmp_path: Path, redis: RedisServer, nodes: dict[str, LiveProxy]
) -> None:
    cluster = {"redis_url": redis.url, "node": "a", "secret": SECRET}
    twin = LiveProxy(tmp_path, [fake_config("alpha")], tokens=TOKENS, cluster=cluster)
    try:
        with pytest.raises(AssertionError, match="proxy exited"):
            twin.start()
    finally:
        if twin.proc is not None and twin.proc.poll() is None:
            twin.stop()  # it started after all: the test fails, and leaves nothing running
    assert twin.proc is not None and twin.proc.returncode != 0
    assert "'a' is the name of another live node of the cluster" in twin.log()
    assert all_alive(nodes["a"])  # the first one goes on

"""The cluster's faults with three live nodes and a real redis-server (issue 27): a node SIGSTOPped (its
kernel still takes connections, nothing answers) and a node's link cut (network namespaces, a veth pair).

In both, the forwards in flight to that node end explicitly once the registry shows it dead (within
``dead_after`` + a heartbeat): 503 with Retry-After before the answer's head, a broken stream after it.
The nodes keep the defaults: heartbeat 1 s, dead_after 3 s. Catalogs as in tests/test_cluster_nodes.py:
a serves alpha and shared, b beta and shared, c shared.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import LiveProxy, wait_until
from tests.redis_server import RedisServer
from tests.test_cluster_nodes import ADMIN, USER, alive, chat, start_cluster, stop_cluster

DEAD_AFTER = 3.0  # the default
HEARTBEAT = 1.0
# the registry sees a silent node dead within dead_after + a heartbeat; the forwards to it end then
WITHIN = DEAD_AFTER + HEARTBEAT + 0.5  # and half a second for a loaded machine


class Asked(threading.Thread):
    """A request in a thread of its own: what came back (status, or how the stream ended) and when."""

    def __init__(self, node: LiveProxy, model: str, *, stream: bool = False) -> None:
        super().__init__(daemon=True)
        self.node, self.model, self.stream = node, model, stream
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = ""
        self.ended = ""  # a stream's end: "complete" or "broken"
        self.at = 0.0  # time.monotonic() when it came back

    def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "stream": self.stream}
        with httpx.stream(
            "POST", self.node.url + "/v1/chat/completions", json=body, headers=USER, timeout=60
        ) as response:
            self.status, self.headers = response.status_code, dict(response.headers)
            try:
                self.body = response.read().decode()
                self.ended = "complete"
            except httpx.RemoteProtocolError:  # the connection closed before the end of the body
                self.ended = "broken"
        self.at = time.monotonic()


def waiting_on(node: LiveProxy, model: str) -> tuple[int, int]:
    """The node's requests for the model: served now, queued."""
    m = node.status(ADMIN)[model]
    return int(m["in_flight"]), int(m["queued"])


def shows_ready(node: LiveProxy, model: str, where: str) -> bool:
    """``node``'s view of the registry has ``model`` ready on ``where``."""
    nodes = httpx.get(node.url + "/cluster", headers=ADMIN, timeout=5).json()["nodes"]
    return any(
        n["node"] == where and {"name": model, "state": "ready"}.items() <= m.items()
        for n in nodes
        for m in n["models"]
    )


def test_a_stopped_node_fails_its_forwards_explicitly_and_its_work_moves(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGSTOP of the node serving a model mid-request: the forward waiting for its answer is a 503 with
    Retry-After, the stream under way breaks, both within dead_after + a heartbeat; the next request is
    served elsewhere; after SIGCONT the node rejoins and serves again."""
    gate = tmp_path / "open"
    gate.touch()
    nodes = start_cluster(
        tmp_path / "nodes", redis_server.url, shared=["--gate", str(gate), "--gate-answers", str(gate)]
    )
    a, b = nodes["a"], nodes["b"]
    assert b.proc is not None
    try:
        assert chat(b, "shared").headers["x-served-by"] == "b"  # loaded on b
        wait_until(lambda: shows_ready(a, "shared", "b"), timeout=5)
        gate.unlink()  # b's answers now wait
        streaming, waiting = Asked(a, "shared", stream=True), Asked(a, "shared")
        streaming.start()  # b sends its first chunk, then holds
        wait_until(lambda: waiting_on(b, "shared") == (1, 0), timeout=10)
        waiting.start()  # queued behind it on b (one slot): no head yet
        wait_until(lambda: waiting_on(b, "shared") == (1, 1), timeout=10)
        b.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        waiting.join(WITHIN + 5)
        streaming.join(5)
        assert not waiting.is_alive() and not streaming.is_alive(), "a forward to the stopped node hangs"
        assert waiting.status == 503 and "retry-after" in waiting.headers
        assert "b stopped answering" in waiting.body and '"error"' in waiting.body  # OpenAI's error shape
        assert streaming.status == 200 and streaming.ended == "broken"
        took = max(waiting.at, streaming.at) - stopped
        assert took <= WITHIN, took
        assert "b" not in alive(a)
        gate.touch()
        r = chat(a, "shared")
        assert r.status_code == 200 and r.headers["x-served-by"] in ("a", "c")
        b.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        wait_until(lambda: alive(a) == {"a", "b", "c"}, timeout=5)
        assert time.monotonic() - resumed <= 2 * HEARTBEAT + 0.5
        r = chat(b, "shared")
        assert r.status_code == 200 and r.headers["x-served-by"] == "b"
    finally:
        b.proc.send_signal(signal.SIGCONT)
        gate.touch()
        stop_cluster(nodes)


@dataclass(frozen=True)
class Link:
    """A veth pair: ``outer`` in this namespace (address ``here``), its peer in namespace ``ns`` (``there``)."""

    ns: str
    outer: str
    here: str
    there: str

    def set(self, state: str) -> None:
        subprocess.run(["ip", "link", "set", self.outer, state], check=True, capture_output=True)

    def inside(self, code: str) -> str:
        """Python run inside the namespace; its stdout."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def link() -> Iterator[Link]:
    """A namespace of the test's own and a veth pair to it, on 10.231.N.0/30 (addresses nobody else uses);
    removed afterwards, even when the test fails. Skipped where network namespaces are not permitted."""
    pid = os.getpid()
    ns, outer, inner = f"cfault{pid}", f"cf{pid}o", f"cf{pid}i"
    n = 16 + pid % 200
    here, there = f"10.231.{n}.1", f"10.231.{n}.2"
    try:
        _ip("netns", "add", ns)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"network namespaces are not permitted here (needs root and `ip netns`): {e}")
    try:
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{here}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{there}/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")  # its workers talk to it on 127.0.0.1
        yield Link(ns, outer, here, there)
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


ASK_INSIDE = """
import httpx
for model in ("beta", "alpha"):
    body = {{"model": model, "messages": [{{"role": "user", "content": "hi"}}]}}
    r = httpx.post("{url}/v1/chat/completions", json=body, headers={{"Authorization": "Bearer user-key"}}, timeout=30)
    print(model, r.status_code, r.headers.get("x-served-by"))
"""


def test_a_node_whose_link_is_cut_is_left_out_serves_alone_and_rejoins(tmp_path: Path, link: Link) -> None:
    """Node b in a namespace of its own behind a veth pair; Redis, a and c on this side. The link down: b is
    left out within dead_after + a heartbeat and a forward to it in flight is a 503; b itself serves its own
    models alone meanwhile (logged once); the link up: b rejoins and serves forwards again."""
    gate = tmp_path / "open"
    gate.touch()
    redis = RedisServer(tmp_path / "redis", also=(link.here,)).start()
    where: dict[str, dict[str, Any]] = {
        "a": {"host": link.here},
        "b": {"host": link.there, "netns": link.ns},
        "c": {"host": link.here},
    }
    nodes: dict[str, LiveProxy] = {}
    try:
        url = f"redis://{link.here}:{redis.port}/0"
        nodes = start_cluster(tmp_path / "nodes", url, where, beta=["--gate-answers", str(gate)])
        a, b = nodes["a"], nodes["b"]
        r = chat(a, "beta")
        assert r.status_code == 200 and r.headers["x-served-by"] == "b"  # across the link
        gate.unlink()
        waiting = Asked(a, "beta")
        waiting.start()
        wait_until(lambda: waiting_on(b, "beta") == (1, 0), timeout=10)
        link.set("down")
        cut = time.monotonic()
        waiting.join(WITHIN + 5)
        assert not waiting.is_alive(), "a forward over the cut link hangs"
        assert waiting.status == 503 and "retry-after" in waiting.headers
        assert waiting.at - cut <= WITHIN
        wait_until(lambda: alive(a) == alive(nodes["c"]) == {"a", "c"}, timeout=WITHIN)
        assert time.monotonic() - cut <= WITHIN
        gate.touch()
        assert chat(a, "beta").status_code == 404  # nobody a can see has it
        # b, cut off: alone once its heartbeat gives up on Redis (logged once), serving its own models
        wait_until(lambda: "is out of reach" in b.log(), timeout=5)
        assert link.inside(ASK_INSIDE.format(url=b.url)).splitlines() == ["beta 200 b", "alpha 404 b"]
        link.set("up")
        back = time.monotonic()
        wait_until(lambda: alive(a) == {"a", "b", "c"}, timeout=10)
        assert time.monotonic() - back <= 2 * HEARTBEAT + 1.5
        r = chat(a, "beta")
        assert r.status_code == 200 and r.headers["x-served-by"] == "b"
        assert b.log().count("is out of reach") == 1
    finally:
        gate.touch()
        link.set("up")
        stop_cluster(nodes)
        redis.stop()

"""The hop (proxy.cluster.hop): a forward to another node over real sockets, its answer relayed chunk by
chunk; an unreachable node skipped for the next, or 503 within a second; the client's going closes the
upstream. The other node is a small aiohttp server in the test's loop that checks the signature."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.api.security import HostPolicy
from proxy.auth import Principal, Role
from proxy.clock import SystemClock
from proxy.cluster import hop as hop_module
from proxy.cluster.config import ClusterSettings
from proxy.cluster.hop import SERVED_BY, TOOK, Hop, Outcome, Target
from proxy.cluster.net import ClusterNet
from proxy.cluster.signing import Caller, Signer
from proxy.cluster.view import ClusterView, NodeInfo
from proxy.errors import Forbidden, Unavailable
from proxy.streaming import ClosingStream
from tests.bare import bare_settings

SECRET = "x" * 32
CALLER = Caller(Principal(Role.USER, frozenset({"m"})), "key:1")


class Node:
    """The other node: answers /stream with chunks it sends one at a time, when the test allows."""

    def __init__(self, name: str = "b", *, cuts: bool = True) -> None:
        self.name = name
        self.cuts = cuts  # /cut hangs up mid-answer
        self.signer = Signer(SECRET, name)
        self.seen: list[dict[str, str]] = []
        self.peers: list[object] = []  # the address each request came from: one per connection
        self.next_chunk = asyncio.Event()
        self.cut = asyncio.Event()  # set when its client went away mid-answer
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(headers)
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        self.signer.verify(request.method, request.path_qs, body, headers, time.time())  # raises when forged
        if request.path == "/hang":  # takes the request and never answers (a SIGSTOPped node, a cut link)
            await asyncio.Event().wait()
        if request.path == "/json":
            return web.json_response({"echo": body.decode()}, headers={SERVED_BY: "b", TOOK: "0.0"})
        if request.path == "/cut" and not self.cuts:
            return web.json_response({"echo": body.decode()}, headers={SERVED_BY: self.name})
        if request.path == "/stall" and self.cuts:  # says 100 bytes, sends 10 and stops (a SIGSTOP mid-answer)
            stall = web.StreamResponse(headers={"Content-Length": "100", SERVED_BY: "b"})
            await stall.prepare(request)
            await stall.write(b"0123456789")
            await asyncio.Event().wait()
        if request.path == "/stall":
            return web.json_response({"echo": body.decode()}, headers={SERVED_BY: self.name})
        if request.path == "/cut":  # says 100 bytes, sends 10 and hangs up
            cut = web.StreamResponse(headers={"Content-Length": "100", SERVED_BY: "b"})
            await cut.prepare(request)
            await cut.write(b"0123456789")
            assert request.transport is not None
            request.transport.close()
            return cut
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream", SERVED_BY: "b"})
        await answer.prepare(request)
        try:
            for i in range(3):
                await answer.write(f"data: {i}\n\n".encode())
                await self.next_chunk.wait()
                self.next_chunk.clear()
            await answer.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.cut.set()
            raise
        return answer

    async def start(self) -> Node:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def dead_url() -> str:
    """An address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = await Node().start()
    yield n
    await n.stop()


def entry(hop: Hop, targets: list[Target]) -> Starlette:
    """The entry node's side: every request forwarded to ``targets``."""

    async def forward(request: Request) -> Response:
        body = await request.body()
        return await hop.forward(
            request.method,
            request.url.path + "?" + request.url.query if request.url.query else request.url.path,
            request.headers,
            body,
            CALLER,
            targets,
        )

    return Starlette(routes=[Route("/{tail:path}", forward, methods=["GET", "POST"])])


async def test_a_stream_passes_chunk_by_chunk_and_credentials_stay_home(node: Node) -> None:
    outcomes: list[Outcome] = []
    hop = Hop(Signer(SECRET, "a"), SystemClock(), on_forward=outcomes.append)
    stream = await hop.forward(
        "POST",
        "/stream?x=1",
        {"authorization": "Bearer secret", "x-api-key": "k", "accept": "text/event-stream", "origin": "http://a"},
        b'{"model":"m"}',
        CALLER,
        [Target("b", node.url)],
    )
    assert isinstance(stream, ClosingStream)  # relayed as it comes: no length known
    assert stream.status_code == 200
    assert stream.headers[SERVED_BY] == "b"
    chunks = stream.body_iterator.__aiter__()
    assert await asyncio.wait_for(chunks.__anext__(), 5) == b"data: 0\n\n"  # before the node sent the rest
    node.next_chunk.set()
    assert await asyncio.wait_for(chunks.__anext__(), 5) == b"data: 1\n\n"
    node.next_chunk.set()
    assert await asyncio.wait_for(chunks.__anext__(), 5) == b"data: 2\n\n"
    node.next_chunk.set()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(chunks.__anext__(), 5)
    await stream._on_close()
    seen = node.seen[-1]
    assert "authorization" not in seen and "x-api-key" not in seen
    assert "origin" not in seen  # the entry node checked it; the serving node is another host
    assert seen["accept"] == "text/event-stream"
    assert seen["x-cluster-forward"] == "a"
    assert [o.outcome for o in outcomes] == ["ok"] and outcomes[0].added is not None
    await hop.close()


async def test_through_an_asgi_entry_the_json_answer_and_status_pass(node: Node) -> None:
    hop = Hop(Signer(SECRET, "a"), SystemClock())
    app = entry(hop, [Target("b", node.url)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as client:
        r = await client.post("/json?q=2", content=b"hello", headers={"authorization": "Bearer k"})
    assert r.status_code == 200
    assert r.json() == {"echo": "hello"}
    assert r.headers[SERVED_BY] == "b"
    assert TOOK not in r.headers
    await hop.close()


async def test_answers_of_a_known_length_come_whole_over_one_pooled_connection(node: Node) -> None:
    """A JSON answer (its length known) is read whole and answered as a plain response, not relayed (a
    relay's tasks cost more than the rest of the hop); its connection goes back to the pool, so the next
    forward to that node opens none."""
    hop = Hop(Signer(SECRET, "a"), SystemClock())
    for i in range(5):
        answer = await hop.forward("POST", "/json", {}, str(i).encode(), CALLER, [Target("b", node.url)])
        assert not isinstance(answer, ClosingStream)
        assert answer.status_code == 200 and answer.body == b'{"echo": "%d"}' % i
        assert answer.headers[SERVED_BY] == "b" and TOOK not in answer.headers
    assert len(node.peers) == 5 and len(set(node.peers)) == 1
    await hop.close()


async def test_a_node_that_cuts_a_known_length_answer_is_skipped_for_the_next(node: Node) -> None:
    """Nothing has reached the client while a known-length answer is read: a node that hangs up before its
    end is taken as unreachable, and the next target is tried (503 when there is none)."""
    outcomes: list[Outcome] = []
    hop = Hop(Signer(SECRET, "a"), SystemClock(), on_forward=outcomes.append)
    with pytest.raises(Unavailable):
        await hop.forward("POST", "/cut", {}, b"x", CALLER, [Target("b", node.url)])
    assert [(o.node, o.outcome) for o in outcomes] == [("b", "unreachable")]
    other = await Node("c", cuts=False).start()
    try:
        answer = await hop.forward("POST", "/cut", {}, b"x", CALLER, [Target("b", node.url), Target("c", other.url)])
    finally:
        await other.stop()
    assert answer.status_code == 200 and answer.headers[SERVED_BY] == "c"
    assert [(o.node, o.outcome) for o in outcomes[1:]] == [("b", "unreachable"), ("c", "ok")]
    await hop.close()


async def test_a_node_cut_while_its_known_length_answer_is_read_is_skipped_for_the_next(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node seen dead after its head came but before the rest of a known-length answer: nothing has reached
    the client, so the next target serves it (no read timeout: only the cut ends the wait)."""
    reading = asyncio.Event()  # the head is in: the body's read is watched
    ender = hop_module._ender

    def watched(name: str, response: aiohttp.ClientResponse) -> Callable[[], None]:
        reading.set()
        return ender(name, response)

    monkeypatch.setattr(hop_module, "_ender", watched)
    hop = Hop(Signer(SECRET, "a"), SystemClock())
    other = await Node("c", cuts=False).start()
    try:
        targets = [Target("b", node.url), Target("c", other.url)]
        answer = asyncio.ensure_future(hop.forward("POST", "/stall", {}, b"x", CALLER, targets))
        await asyncio.wait_for(reading.wait(), 5)
        assert hop.cut("b") == 1
        served = await asyncio.wait_for(answer, 5)
        assert served.status_code == 200 and served.headers[SERVED_BY] == "c"
        assert hop.open_to() == []
    finally:
        await other.stop()
        await hop.close()


async def test_a_forged_forward_is_refused_by_the_other_node(node: Node) -> None:
    hop = Hop(Signer("y" * 32, "a"), SystemClock())  # not the cluster's secret
    answer = await hop.forward("POST", "/json", {}, b"x", CALLER, [Target("b", node.url)])
    assert answer.status_code == 500  # the test node turns the Unauthorized into a 500; the app's is 401
    await hop.close()


async def test_an_unreachable_node_is_skipped_for_the_next(node: Node) -> None:
    outcomes: list[Outcome] = []
    hop = Hop(Signer(SECRET, "a"), SystemClock(), on_forward=outcomes.append)
    answer = await hop.forward("POST", "/json", {}, b"x", CALLER, [Target("dead", dead_url()), Target("b", node.url)])
    assert answer.status_code == 200
    assert [(o.node, o.outcome) for o in outcomes] == [("dead", "unreachable"), ("b", "ok")]
    await hop.close()


async def test_no_node_reachable_is_a_503_with_retry_after_within_a_second() -> None:
    hop = Hop(Signer(SECRET, "a"), SystemClock(), connect_timeout=0.5)
    with socket.socket() as full, socket.socket() as filler:
        # a listener whose accept queue is full drops new connections: the connect times out, as to a
        # node whose host is gone, rather than being refused
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler.connect(full.getsockname())
        targets = [Target("dead", dead_url()), Target("black-hole", f"http://127.0.0.1:{full.getsockname()[1]}")]
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await hop.forward("POST", "/json", {}, b"x", CALLER, targets)
    assert time.monotonic() - started < 1.5
    assert caught.value.status == 503
    assert "Retry-After" in caught.value.headers()
    assert "dead, black-hole" in caught.value.message
    await hop.close()


async def test_the_client_going_away_closes_the_upstream(node: Node) -> None:
    hop = Hop(Signer(SECRET, "a"), SystemClock())
    stream = await hop.forward("POST", "/stream", {}, b"x", CALLER, [Target("b", node.url)])
    assert isinstance(stream, ClosingStream)
    chunks = stream.body_iterator.__aiter__()
    assert await asyncio.wait_for(chunks.__anext__(), 5) == b"data: 0\n\n"
    await stream._on_close()  # what ClosingStream runs when its client has gone
    node.next_chunk.set()
    await asyncio.wait_for(node.cut.wait(), 5)
    await hop.close()


async def test_a_cut_node_ends_its_forwards_in_flight_a_head_with_503_a_body_broken(node: Node) -> None:
    """A node seen dead (Hop.cut) that took the request and never answers: the forward waiting for its head
    is a 503 with Retry-After at once, a stream under way breaks (no head timeout, no read timeout)."""
    outcomes: list[Outcome] = []
    hop = Hop(Signer(SECRET, "a"), SystemClock(), on_forward=outcomes.append)
    waiting = asyncio.ensure_future(hop.forward("POST", "/hang", {}, b"x", CALLER, [Target("b", node.url)]))
    try:
        stream = await hop.forward("POST", "/stream", {}, b"x", CALLER, [Target("b", node.url)])
        assert isinstance(stream, ClosingStream)  # a chunked answer is relayed
        chunks = stream.body_iterator.__aiter__()
        assert await asyncio.wait_for(chunks.__anext__(), 5) == b"data: 0\n\n"
        while len(node.seen) < 2:  # both have reached the node
            await asyncio.sleep(0.01)
        assert hop.cut("c") == 0 and not waiting.done()  # another node's death ends nothing here
        assert hop.open_to() == ["b"]
        assert hop.cut("b") == 2
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(waiting, 1)
        assert caught.value.status == 503 and "Retry-After" in caught.value.headers()
        assert "b stopped answering" in caught.value.message
        with pytest.raises(aiohttp.ClientPayloadError, match="b stopped answering"):
            await asyncio.wait_for(chunks.__anext__(), 1)
        await stream._on_close()  # what ClosingStream runs when its body failed: the upstream is closed
        await asyncio.wait_for(node.cut.wait(), 5)
        assert hop.open_to() == []
        assert ("b", "dead") in [(o.node, o.outcome) for o in outcomes]
    finally:
        waiting.cancel()
        await hop.close()


class OneView:
    """A registry that only shows views (ClusterNet.seen reads none of it)."""

    def view(self) -> ClusterView:
        return ClusterView("a")

    def touch(self) -> None:
        pass

    async def lease(self, model: str, **kw: Any) -> None:
        return None

    async def release(self, lease: Any) -> None:
        pass


def seen_as(alive: bool | None, *, connected: bool = True) -> ClusterView:
    """A heartbeat's view where node b is alive, dead, or absent (None)."""
    me = NodeInfo("a", "http://a", 1, "", (), (), 0, (), 0.0, True)
    nodes = {"a": me}
    if alive is not None:
        nodes["b"] = NodeInfo("b", "http://b", 1, "", (), (), 0, (), 0.0 if alive else 9.0, alive)
    return ClusterView("a", nodes, connected=connected)


async def test_only_a_view_read_from_redis_showing_the_node_dead_ends_its_forwards(node: Node) -> None:
    net = ClusterNet("a", SECRET, OneView(), SystemClock())
    waiting = asyncio.ensure_future(net.hop.forward("POST", "/hang", {}, b"x", CALLER, [Target("b", node.url)]))
    try:
        while not node.seen:
            await asyncio.sleep(0.01)
        net.seen(seen_as(False, connected=False))  # Redis out of reach: this node alone, b not known dead
        net.seen(seen_as(None))  # b stopped cleanly (gone from the registry): its answers may still come
        net.seen(seen_as(True))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        net.seen(seen_as(False))
        with pytest.raises(Unavailable):
            await asyncio.wait_for(waiting, 1)
    finally:
        waiting.cancel()
        await net.close()


def test_a_node_takes_forwards_addressed_to_its_advertised_name() -> None:
    """A node on 0.0.0.0 advertised by its hostname: its forwards' Host is that name, which it must not
    refuse as a DNS-rebinding name (RequestGuard); other names still are."""
    cluster = ClusterSettings(redis_url="redis://r:6379/0", node="b", advertise="http://box-b:11434", secret=SECRET)
    settings = bare_settings(host="0.0.0.0", port=11434, cluster=cluster)
    policy = HostPolicy(settings)
    policy.check_host("box-b:11434")
    with pytest.raises(Forbidden):
        policy.check_host("evil.example:11434")
    with pytest.raises(Forbidden):
        HostPolicy(dataclasses.replace(settings, cluster=None)).check_host("box-b:11434")

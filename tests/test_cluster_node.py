"""proxy/cluster/node.py against a real redis-server (tests/redis_server.py): publication, liveness by Redis's
clock, load leases, duplicate names, Redis stopped and started, and no Redis command on the warm path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from proxy.cluster.config import ClusterSettings
from proxy.cluster.node import ClusterNode
from proxy.cluster.routing import Forward, Here, route
from proxy.cluster.view import LocalState, ModelPresence
from tests.redis_server import RedisServer

SECRET = "s" * 32


def settings(server: RedisServer, node: str, **kw: Any) -> ClusterSettings:
    base = ClusterSettings(
        redis_url=server.url,
        node=node,
        advertise=f"http://{node}.test:11434",
        secret=SECRET,
        heartbeat=0.1,
        dead_after=0.4,
        lease_ttl=1.0,
    )
    return replace(base, **kw)


def state(*models: ModelPresence, catalog: tuple[str, ...] = ("m",)) -> LocalState:
    return LocalState(models=models, catalog=catalog, weights=catalog, free_ram=8 << 30, ram_budget=16 << 30)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait (on the event loop) until predicate() holds; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[Callable[..., Awaitable[ClusterNode]]]:
    started: list[ClusterNode] = []

    async def make(name: str, local: LocalState | None = None, **kw: Any) -> ClusterNode:
        current = local or state()
        node = ClusterNode(settings(redis_server, name, **kw), lambda: current)
        await node.start()
        started.append(node)
        return node

    yield make
    for node in started:
        await node.stop()


async def test_publish_and_read_back(nodes: Callable[..., Awaitable[ClusterNode]]) -> None:
    ready = ModelPresence("m", "ready", in_flight=1, ram=1 << 30, parallel=2)
    a = await nodes("a", state(ready))
    b = await nodes("b", state())
    await eventually(lambda: "a" in b.view().nodes and "b" in a.view().nodes)
    seen = b.view().nodes["a"]
    assert seen.alive and seen.advertise == "http://a.test:11434" and seen.epoch >= 1
    assert seen.models == (ready,) and seen.catalog == ("m",) and seen.free_ram == 8 << 30
    assert [n.node for n in b.view().holders("m")] == ["a"]
    assert route(b.view(), "m", forwarded=False) == Forward("a", "http://a.test:11434", "ready")
    assert route(a.view(), "m", forwarded=False) == Here("ready")


async def test_lease_is_exclusive_and_tokens_grow(nodes: Callable[..., Awaitable[ClusterNode]]) -> None:
    members = [await nodes(f"n{i}") for i in range(4)]
    got = await asyncio.gather(*(members[i % 4].lease("m", ram=1 << 30) for i in range(20)))
    winners = [lease for lease in got if lease is not None]
    assert len(winners) == 1
    first = winners[0]
    # every loser now sees the winner loading it, so it forwards there instead of loading
    for member in members:
        if member.settings.node != first.node:
            assert route(member.view(), "m", forwarded=False) == Forward(
                first.node, f"http://{first.node}.test:11434", "loading"
            )
    holder = next(m for m in members if m.settings.node == first.node)
    await holder.release(first)
    again = await members[0].lease("m")
    assert again is not None and again.token > first.token

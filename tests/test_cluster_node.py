"""proxy/cluster/node.py against a real redis-server (tests/redis_server.py): publication, liveness by Redis's
clock, load leases, duplicate names, Redis stopped and started, and no Redis command on the warm path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.clock import ManualClock
from proxy.cluster.config import ClusterSettings
from proxy.cluster.node import ClusterNode, DuplicateNode, redacted
from proxy.cluster.routing import Forward, Here, NotFound, route
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
    return LocalState(
        models=models,
        catalog=catalog,
        weights=catalog,
        free_ram=8 << 30,
        ram_budget=16 << 30,
        aliases=tuple((f"{name}-alias", name) for name in catalog),
    )


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

    async def make(
        name: str, local: LocalState | None = None, quick: Callable[[LocalState], LocalState] | None = None, **kw: Any
    ) -> ClusterNode:
        current = local or state()
        node = ClusterNode(settings(redis_server, name, **kw), lambda: current, quick=quick)
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
    assert seen.aliases == (("m-alias", "m"),) and b.view().canonical("m-alias") == "m"
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


def crash(node: ClusterNode) -> None:
    """The node stops beating without a word, as a SIGKILLed proxy does (its keys stay until they lapse)."""
    assert node._task is not None
    node._task.cancel()


async def test_a_silent_node_is_dead_within_dead_after_plus_one_second(
    nodes: Callable[..., Awaitable[ClusterNode]],
) -> None:
    a = await nodes("a", state(ModelPresence("m", "ready", ram=1 << 30)))
    b = await nodes("b", state(catalog=()))
    await eventually(lambda: b.view().nodes.get("a") is not None and b.view().nodes["a"].alive)
    crash(a)
    took = await eventually(lambda: not b.view().nodes["a"].alive, timeout=10)
    assert took <= b.settings.dead_after + 1.0
    assert b.view().holders("m") == [] and route(b.view(), "m", forwarded=False) == NotFound()
    assert b.view().nodes["a"].age > b.settings.dead_after  # still listed (GET /cluster), not routed to


async def test_a_lease_is_taken_over_after_its_ttl(nodes: Callable[..., Awaitable[ClusterNode]]) -> None:
    a = await nodes("a")
    b = await nodes("b")
    first = await a.lease("m")
    assert first is not None and await b.lease("m") is None
    crash(a)  # no more renewals
    start = time.monotonic()
    taken: list[Any] = []

    async def again() -> bool:
        taken.append(await b.lease("m"))
        return taken[-1] is not None

    while not await again():
        assert time.monotonic() - start < b.settings.lease_ttl + 2
        await asyncio.sleep(0.05)
    assert time.monotonic() - start >= b.settings.lease_ttl - 0.3  # not before it lapsed
    assert taken[-1].token > first.token and taken[-1].node == "b"


async def test_a_held_lease_outlives_its_ttl_while_its_holder_beats(
    nodes: Callable[..., Awaitable[ClusterNode]],
) -> None:
    a = await nodes("a")
    b = await nodes("b")
    assert await a.lease("m") is not None
    deadline = time.monotonic() + a.settings.lease_ttl * 2.5
    while time.monotonic() < deadline:
        assert await b.lease("m") is None
        await asyncio.sleep(0.1)


async def test_a_second_node_with_the_same_name_is_refused(
    nodes: Callable[..., Awaitable[ClusterNode]], redis_server: RedisServer
) -> None:
    first = await nodes("same")
    twin = ClusterNode(settings(redis_server, "same"), state)
    with pytest.raises(DuplicateNode, match="'same' is the name of another live node"):
        await twin.start()
    assert first.view().nodes["same"].alive
    # a crashed node's name is free again once its claim lapsed: its restart is not refused
    crash(first)
    heir = await nodes("same")
    assert heir.epoch > first.epoch


async def test_a_cleanly_stopped_node_is_gone_at_once(nodes: Callable[..., Awaitable[ClusterNode]]) -> None:
    a = await nodes("a")
    b = await nodes("b")
    await eventually(lambda: "a" in b.view().nodes)
    await a.stop()
    await eventually(lambda: "a" not in b.view().nodes, timeout=1)
    again = await nodes("a")  # its name is free at once
    assert again.epoch > a.epoch


async def test_redis_down_each_node_serves_alone_and_rejoins_within_2s(
    nodes: Callable[..., Awaitable[ClusterNode]], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = await nodes("a", state(ModelPresence("m", "ready", ram=1 << 30)), heartbeat=0.5, dead_after=1.5)
    b = await nodes("b", state(catalog=("n",)), heartbeat=0.5, dead_after=1.5)
    await eventually(lambda: set(a.view().nodes) == set(b.view().nodes) == {"a", "b"})
    redis_server.stop()
    await eventually(lambda: not a.view().connected and not b.view().connected)
    assert set(a.view().nodes) == {"a"} and set(b.view().nodes) == {"b"}
    assert route(a.view(), "m", forwarded=False) == Here("ready")
    assert route(b.view(), "m", forwarded=False) == NotFound()  # it routes nothing it can't see
    lease = await b.lease("n")  # and loads its own models without asking anyone
    assert lease is not None and lease.token == 0
    await b.release(lease)
    await asyncio.sleep(1.5)  # several failed heartbeats: still one line each
    lost = [r for r in caplog.records if "out of reach" in r.getMessage()]
    assert sorted(r.getMessage().split("node ")[1][0] for r in lost) == ["a", "b"]
    redis_server.start()
    took = await eventually(lambda: set(a.view().nodes) == set(b.view().nodes) == {"a", "b"}, timeout=5)
    assert took <= 2.0
    assert a.view().connected and b.view().connected
    assert route(b.view(), "m", forwarded=False) == Forward("a", "http://a.test:11434", "ready")


async def test_a_hung_redis_is_left_within_a_heartbeat_and_rejoined_when_it_answers(
    nodes: Callable[..., Awaitable[ClusterNode]], redis_server: RedisServer
) -> None:
    a = await nodes("a", state(ModelPresence("m", "ready")), heartbeat=0.5, dead_after=1.5)
    b = await nodes("b", state(catalog=()), heartbeat=0.5, dead_after=1.5)
    await eventually(lambda: set(b.view().nodes) == {"a", "b"})
    redis_server.pause()
    try:
        # each heartbeat gives up on Redis after min(heartbeat, 1 s): alone within two heartbeats and a timeout
        await eventually(lambda: not a.view().connected and not b.view().connected, timeout=2.5)
        assert route(a.view(), "m", forwarded=False) == Here("ready")
    finally:
        redis_server.resume()
    took = await eventually(lambda: set(b.view().nodes) == {"a", "b"} and b.view().connected, timeout=5)
    assert took <= 2.0


async def test_routing_a_warm_request_sends_no_redis_command(
    nodes: Callable[..., Awaitable[ClusterNode]], redis_server: RedisServer
) -> None:
    a = await nodes("a", state(ModelPresence("m", "ready", parallel=4)), heartbeat=30, dead_after=90)
    await nodes("b", state(ModelPresence("n", "ready", parallel=4), catalog=("n",)), heartbeat=30, dead_after=90)
    await a._beat()  # a reads b (the next heartbeat is 30 s away)
    probe = aioredis.Redis.from_url(redis_server.url)
    try:
        await probe.config_resetstat()
        for _ in range(1000):
            a.touch()  # this node's own state is read again too
            assert route(a.view(), "m", forwarded=False) == Here("ready")
            assert route(a.view(), "n", forwarded=False) == Forward("b", "http://b.test:11434", "ready")
            await asyncio.sleep(0)  # as between requests: anything the route set going would run here
        stats = await probe.info("commandstats")
    finally:
        await probe.aclose()
    assert [k for k in stats if not k.startswith("cmdstat_config")] == []


async def test_touch_reads_this_nodes_state_again_between_heartbeats(
    nodes: Callable[..., Awaitable[ClusterNode]],
) -> None:
    now = {"m": ModelPresence("m", "stopped")}

    def quick(last: LocalState) -> LocalState:
        return replace(last, models=(now["m"],))

    a = await nodes("a", state(now["m"]), quick=quick, heartbeat=30, dead_after=90)
    assert route(a.view(), "m", forwarded=False) == Here("place")
    now["m"] = ModelPresence("m", "ready")
    assert route(a.view(), "m", forwarded=False) == Here("place")  # not told: the last read holds
    a.touch()
    assert route(a.view(), "m", forwarded=False) == Here("ready")
    now["m"] = ModelPresence("m", "ready", in_flight=1)
    a.touch()
    assert a.view().nodes["a"].models == (now["m"],)


async def test_a_lease_for_another_node_reserves_its_memory_in_every_view(
    nodes: Callable[..., Awaitable[ClusterNode]],
) -> None:
    a = await nodes("a", state(catalog=()))
    await nodes("b", state(ModelPresence("m", "stopped", ram=3 << 30)))
    c = await nodes("c", state(catalog=()))
    await eventually(lambda: "b" in a.view().nodes and "b" in c.view().nodes)
    assert route(a.view(), "m", forwarded=False) == Forward("b", "http://b.test:11434", "place")
    lease = await a.lease("m", node="b", ram=3 << 30)
    assert lease is not None and lease.node == "b"
    for member in (a, c):  # a at once, c from its next heartbeat
        await eventually(lambda m=member: m.view().nodes["b"].state_of("m") == "starting")  # type: ignore[misc]
        assert member.view().nodes["b"].free_ram == (8 << 30) - (3 << 30)
        assert route(member.view(), "m", forwarded=False) == Forward("b", "http://b.test:11434", "loading")
    await a.release(lease)
    await eventually(lambda: c.view().nodes["b"].state_of("m") == "stopped")


async def test_a_node_started_while_redis_is_down_joins_when_it_comes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server.stop()
    a = ClusterNode(settings(redis_server, "a"), lambda: state(ModelPresence("m", "ready")))
    b = ClusterNode(settings(redis_server, "b"), lambda: state(catalog=()))
    await a.start()
    await b.start()
    try:
        assert not a.view().connected and set(a.view().nodes) == {"a"}
        assert route(a.view(), "m", forwarded=False) == Here("ready")
        assert any("out of reach" in r.getMessage() for r in caplog.records)
        redis_server.start()
        await eventually(lambda: set(b.view().nodes) == {"a", "b"} and b.view().nodes["a"].alive, timeout=2)
        assert a.epoch >= 1 and b.view().nodes["a"].epoch == a.epoch
    finally:
        await a.stop()
        await b.stop()


def test_logs_never_show_redis_password() -> None:
    assert redacted("redis://:hunter2@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redacted("rediss://proxy:hunter2@r.example:6380") == "rediss://proxy:***@r.example:6380"
    assert redacted("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"


async def test_a_read_that_began_before_this_nodes_lease_does_not_hide_it(
    nodes: Callable[..., Awaitable[ClusterNode]],
) -> None:
    a = await nodes("a", heartbeat=30, dead_after=90)
    lease = await a.lease("m", ram=1 << 30)
    assert lease is not None
    a._absorb(0, [], [])  # what a read sent before the lease answers: no lease at all
    a.touch()
    assert a.view().nodes["a"].state_of("m") == "starting"


async def test_liveness_is_by_redis_clock_whatever_the_hosts_clocks_say(redis_server: RedisServer) -> None:
    # two hosts whose clocks are frozen and decades apart: only Redis's TIME moves
    a = ClusterNode(settings(redis_server, "a"), state, clock=ManualClock(wall=1_000_000_000.0))
    b = ClusterNode(settings(redis_server, "b"), state, clock=ManualClock(wall=2_000_000_000.0))
    await a.start()  # one publication each; their heartbeats wait on clocks that never move
    await b.start()
    try:
        await b._beat()
        assert b.view().nodes["a"].alive and b.view().nodes["a"].age < b.settings.dead_after
        start = time.monotonic()
        while b.view().nodes["a"].alive:
            assert time.monotonic() - start < b.settings.dead_after + 1
            await asyncio.sleep(0.05)
            await b._beat()
        assert time.monotonic() - start >= b.settings.dead_after - 0.2
    finally:
        await a.stop()
        await b.stop()


async def test_a_lease_held_by_a_node_not_read_yet_still_routes_there(
    nodes: Callable[..., Awaitable[ClusterNode]],
) -> None:
    a = await nodes("a", heartbeat=30, dead_after=90)  # its only read was before b existed
    b = await nodes("b", heartbeat=30, dead_after=90)
    assert "b" not in a.view().nodes
    assert await b.lease("m", ram=1 << 30) is not None
    assert await a.lease("m") is None
    assert route(a.view(), "m", forwarded=False) == Forward("b", "http://b.test:11434", "loading")

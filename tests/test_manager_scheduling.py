"""The scheduler's promises under races, through ModelManager with fake workers and a manual clock (issue 25).

Each test is a defect that was seen on real workers; the real path is tests/test_scheduling_real.py (room for
one model with two cold requests, an admin's pin against a user key).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from proxy.clock import ManualClock
from proxy.manager import ModelManager
from proxy.memory import MemoryStore, Need
from tests.fake_memory import FakeProbe, GiB
from tests.test_manager import FakeWorker, held, make, model, settings, settle, state
from tests.test_runtime_options import llm


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeWorker.instances.clear()


def up(manager: ModelManager) -> list[str]:
    """The models that hold memory or a slot now: starting, ready or stopping."""
    return [s.name for s in manager.status() if s.state in ("starting", "ready", "stopping")]


async def two_cold_requests(manager: ModelManager) -> None:
    """a and b asked for at once while neither is loaded and there is room for one: never both up."""
    first = asyncio.create_task(manager.acquire("a"))
    await settle()
    second = asyncio.create_task(manager.acquire("b"))
    await settle()
    assert up(manager) == ["a"]  # b waits for a's start: a starting model is a blocker, not free room
    assert state(manager, "b") == "stopped"
    assert "busy: a" in (next(s.waiting for s in manager.status() if s.name == "b") or "")
    FakeWorker.instances[0].gate.set()
    lease = await asyncio.wait_for(first, 5)
    await settle()
    assert up(manager) == ["a"] and not second.done()  # a is busy now: still a blocker
    lease.release()  # a idle: b evicts it, then starts
    for _ in range(5):
        await settle()
        if len(FakeWorker.instances) > 1:
            FakeWorker.instances[1].gate.set()
        assert len(up(manager)) <= 1
    (await asyncio.wait_for(second, 5)).release()
    assert up(manager) == ["b"] and FakeWorker.instances[0].stopped
    await manager.shutdown()


async def test_two_cold_models_with_one_slot_never_start_together() -> None:
    manager, _ = make(model("a"), model("b"), factory=held, max_loaded=1)
    await two_cold_requests(manager)


async def test_two_cold_models_with_memory_for_one_never_start_together() -> None:
    a, b = (model(n, memory=Need(40 * GiB, 0, "config")) for n in "ab")
    manager = ModelManager(
        settings(a, b, max_loaded=3),
        clock=ManualClock(),
        worker_factory=held,
        probe=FakeProbe(total=64 * GiB, available=64 * GiB),
        store=MemoryStore(None),
    )
    await two_cold_requests(manager)


async def test_a_user_key_cannot_shorten_an_admins_pin() -> None:
    manager, clock = make(model("a", keep_alive=300))
    (await manager.acquire("a", keep_alive=math.inf, admin=True)).release()
    (await manager.acquire("a", keep_alive=0.001, admin=False)).release()
    clock.advance(10**6)
    await settle()
    assert state(manager, "a") == "ready"
    assert next(s.keep_alive for s in manager.status()) == math.inf
    # an admin may shorten it
    (await manager.acquire("a", keep_alive=1, admin=True)).release()
    clock.advance(1.1)
    await settle()
    assert state(manager, "a") == "stopped"
    await manager.shutdown()


async def test_a_user_may_lengthen_and_shorten_only_the_configs_default() -> None:
    manager, clock = make(model("a", keep_alive=300))
    (await manager.acquire("a", keep_alive=60, admin=False)).release()  # shortens the config's: as Ollama does
    assert next(s.keep_alive for s in manager.status()) == 60
    (await manager.acquire("a", keep_alive=3600, admin=False)).release()  # lengthens
    (await manager.acquire("a", keep_alive=10, admin=False)).release()  # never shortens a caller's
    assert next(s.keep_alive for s in manager.status()) == 3600
    clock.advance(3599)
    await settle()
    assert state(manager, "a") == "ready"
    await manager.shutdown()


async def test_a_requests_keep_alive_survives_the_reload_its_own_num_ctx_causes() -> None:
    manager, clock = make(llm(keep_alive=600))
    (await manager.acquire("a")).release()
    lease = await manager.acquire("a", keep_alive=math.inf, options={"num_ctx": 2048})
    assert len(FakeWorker.instances) == 2 and FakeWorker.instances[0].stopped  # reloaded for its num_ctx
    lease.release()
    clock.advance(10**6)
    await settle()
    assert state(manager, "a") == "ready"
    assert next(s.keep_alive for s in manager.status()) == math.inf
    await manager.shutdown()


async def test_a_request_admitted_after_a_config_change_sees_the_new_config() -> None:
    old = model("a", keep_alive=600, system="old prompt", parallel=2)
    manager, _ = make(old)
    lease = await manager.acquire("a")  # busy: the model keeps its old config until the lease ends
    new = dataclasses.replace(old, system="a new, longer prompt")
    manager.replace_models([new])
    assert manager.resolve("a") == new  # what a request is built from (apply_model_defaults) from now on
    assert manager.resolve("a").system == "a new, longer prompt"
    assert lease.config == old
    later = asyncio.create_task(manager.acquire("a"))
    await settle()
    lease.release()
    second = await asyncio.wait_for(later, 5)
    assert second.config == new == manager.resolve("a")
    second.release()
    await manager.shutdown()
